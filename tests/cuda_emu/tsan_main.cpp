// Runs the block-sum self-test kernel under the parallel schedule as a standalone program, so it can
// be built with -fsanitize=thread (a sanitizer runtime cannot be loaded into Python afterwards).
// Usage: tsan_main [correct|missing_sync]; prints the sum and exits with the launch status.
#include "cuda_emu.h"
#include "selftest_kernels.cuh"

#include <vector>

namespace st = streamssl_emu_selftest;

int main(int argc, char** argv) {
  const bool missing_sync = argc > 1 && std::strcmp(argv[1], "missing_sync") == 0;
  const auto kernel = missing_sync ? st::block_sum_kernel<true> : st::block_sum_kernel<false>;
  setenv("CUDA_EMU_SCHEDULE", "parallel", 1);
  const int64_t n = 600;  // three blocks of 256 threads
  std::vector<float> x(n);
  double expected = 0;
  for (int64_t i = 0; i < n; ++i) expected += (x[i] = float(i % 7) - 3.0f);  // small integers: exact sums
  float partial[3] = {0, 0, 0}, out = 0;
  const st::LaunchConfig cfg = st::block_sum_config(n, 3);
  int rc = cuda_emu::launch(kernel, cfg.grid, cfg.block, cfg.smem, x.data(), partial, n);
  if (rc == 0) rc = cuda_emu::launch(kernel, dim3(1), cfg.block, 0, partial, &out, int64_t(cfg.grid.x));
  std::printf("rc=%d out=%g expected=%g %s\n", rc, double(out), expected, cuda_emu::last_error());
  return rc;
}
