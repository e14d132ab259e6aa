// The element types the CUDA launchers take, as plain C++ (no CUDA or PyTorch headers): ops.cpp
// maps a PyTorch dtype to it, the emulator tests pass the integer codes.
#pragma once

namespace streamssl {
namespace cuda {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace cuda
}  // namespace streamssl
