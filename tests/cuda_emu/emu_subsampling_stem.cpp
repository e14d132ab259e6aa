// Emulator bindings of the subsampling stem's fused-backward CUDA kernels
// (tests/test_cuda_emu_subsampling_stem.py calls them through ctypes). They run the launch
// sequence of csrc/cuda/subsampling_stem.cuh -- the one subsampling_stem.cu runs with <<<>>> --
// with a policy that launches on the emulator.
#include "cuda_emu.h"  // first: defines STREAMSSL_CUDA_EMU and the CUDA built-ins
#include "cuda/subsampling_stem.cuh"
#include "emu_launch.h"

namespace k = streamssl::cuda::subsampling_stem_kernels;
using streamssl::cuda::StemProblem;

namespace {

int make_problem(int64_t B, int64_t T, int64_t F, int64_t C, int64_t pad, int64_t float64, StemProblem* p) {
  if (B < 0 || T < 0 || F < 0 || C < 1 || (pad != 0 && pad != 1)) {
    return cuda_emu::invalid_argument("bad problem B=%lld T=%lld F=%lld C=%lld pad=%lld", (long long)B,
                                      (long long)T, (long long)F, (long long)C, (long long)pad);
  }
  *p = StemProblem{B, T, F, C, pad, float64 != 0};
  return 0;
}

}  // namespace

CUDA_EMU_BINDING(emu_stem_workspace_bytes, int64_t B, int64_t T, int64_t F, int64_t C, int64_t pad,
                 int64_t float64, int64_t* out) {
  StemProblem p;
  if (int rc = make_problem(B, T, F, C, pad, float64, &p)) return rc;
  *out = static_cast<int64_t>(k::workspace_bytes(p));
  return 0;
}

CUDA_EMU_BINDING(emu_stem_backward, const void* grad_y1, const void* y0, const void* feats, const void* w1,
                 int64_t B, int64_t T, int64_t F, int64_t C, int64_t pad, int64_t float64, void* grad_w0,
                 void* grad_b0, void* grad_w1, void* workspace) {
  StemProblem p;
  if (int rc = make_problem(B, T, F, C, pad, float64, &p)) return rc;
  const EmuLaunch launch;
  if (p.float64) {
    return k::run_backward<double>(p, grad_y1, y0, feats, w1, grad_w0, grad_b0, grad_w1, workspace, launch);
  }
  return k::run_backward<float>(p, grad_y1, y0, feats, w1, grad_w0, grad_b0, grad_w1, workspace, launch);
}
