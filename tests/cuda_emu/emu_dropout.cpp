// Emulator binding of the counter-based dropout's CUDA kernel (csrc/cuda/dropout.cuh), called by
// tests/test_cuda_emu_dropout.py through ctypes on CPU pointers. It runs the launch sequence that
// dropout.cu runs with <<<>>>, with a policy that launches on the emulator; `max_grid` caps the
// grid (0: the GPU's cap) so that small inputs run the grid-stride loop too.
#include "cuda_emu.h"  // first: defines STREAMSSL_CUDA_EMU and the CUDA built-ins
#include "cuda/dropout.cuh"
#include "emu_launch.h"

namespace k = streamssl::cuda::dropout_kernels;
using streamssl::cuda::Dtype;

CUDA_EMU_BINDING(emu_dropout, const void* x, void* y, int64_t n, int64_t dtype, double p, int64_t seed,
                 int64_t max_grid) {
  if (n < 0) return cuda_emu::invalid_argument("n must be >= 0, got %lld", (long long)n);
  if (dtype < 0 || dtype > 3) return cuda_emu::invalid_argument("dtype must be 0..3, got %lld", (long long)dtype);
  if (!(p >= 0.0 && p < 1.0)) return cuda_emu::invalid_argument("p must be in [0, 1), got %g", p);
  if (max_grid < 0) return cuda_emu::invalid_argument("max_grid must be >= 0, got %lld", (long long)max_grid);
  return k::run_dropout_any(x, y, n, static_cast<Dtype>(dtype), streamssl::make_dropout_rule(p, seed),
                            EmuLaunch{}, max_grid == 0 ? k::kMaxBlocks : max_grid);
}
