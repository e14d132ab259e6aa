// Emulator bindings of the self-test kernels (tests/test_cuda_emu.py calls them through ctypes).
// Each mirrors a launcher in selftest_kernels.cu: same *_config(), cuda_emu::launch for <<<>>>.
#include "cuda_emu.h"
#include "selftest_kernels.cuh"

namespace st = streamssl_emu_selftest;

CUDA_EMU_BINDING(emu_selftest_block_sum, const float* x, float* partial, float* out, int64_t n, int64_t max_partials,
                 int64_t missing_sync) {
  if (n < 0) return cuda_emu::invalid_argument("n must be >= 0, got %lld", (long long)n);
  if (max_partials < 1 || max_partials > st::kSumBlock)
    return cuda_emu::invalid_argument("max_partials must be in [1, %d], got %lld", st::kSumBlock, (long long)max_partials);
  const auto kernel = missing_sync ? st::block_sum_kernel<true> : st::block_sum_kernel<false>;
  const st::LaunchConfig cfg = st::block_sum_config(n, max_partials);
  if (int rc = cuda_emu::launch(kernel, cfg.grid, cfg.block, cfg.smem, x, partial, n)) return rc;
  return cuda_emu::launch(kernel, dim3(1), cfg.block, 0, partial, out, int64_t(cfg.grid.x));
}

template <class T>
static int warp_sum(const T* x, T* out, int64_t n, int64_t variant) {
  if (variant < 0 || variant > 3) return cuda_emu::invalid_argument("variant must be in [0, 3], got %lld", (long long)variant);
  const st::LaunchConfig cfg = st::warp_sum_config(n);
  return cuda_emu::launch(st::warp_sum_kernel<T>, cfg.grid, cfg.block, cfg.smem, x, out, n, int(variant));
}
CUDA_EMU_BINDING(emu_selftest_warp_sum_f32, const float* x, float* out, int64_t n, int64_t variant) { return warp_sum(x, out, n, variant); }
CUDA_EMU_BINDING(emu_selftest_warp_sum_f64, const double* x, double* out, int64_t n, int64_t variant) { return warp_sum(x, out, n, variant); }
CUDA_EMU_BINDING(emu_selftest_warp_sum_i32, const int32_t* x, int32_t* out, int64_t n, int64_t variant) { return warp_sum(x, out, n, variant); }
CUDA_EMU_BINDING(emu_selftest_warp_sum_i64, const int64_t* x, int64_t* out, int64_t n, int64_t variant) { return warp_sum(x, out, n, variant); }

template <class T>
static int shfl(const void* in, void* out, int64_t n, int64_t kind, int64_t arg, int64_t width) {
  if (n <= 0 || n % 32 != 0) return cuda_emu::invalid_argument("n must be a positive multiple of 32, got %lld", (long long)n);
  const st::LaunchConfig cfg = st::shfl_config(n);
  return cuda_emu::launch(st::shfl_kernel<T>, cfg.grid, cfg.block, cfg.smem, static_cast<const T*>(in),
                          static_cast<T*>(out), int(kind), int(arg), int(width));
}
CUDA_EMU_BINDING(emu_selftest_shfl_i32, const void* in, void* out, int64_t n, int64_t kind, int64_t arg, int64_t width) {
  return shfl<int32_t>(in, out, n, kind, arg, width);
}
CUDA_EMU_BINDING(emu_selftest_shfl_f16, const void* in, void* out, int64_t n, int64_t kind, int64_t arg, int64_t width) {
  return shfl<__half>(in, out, n, kind, arg, width);
}
CUDA_EMU_BINDING(emu_selftest_shfl_f64, const void* in, void* out, int64_t n, int64_t kind, int64_t arg, int64_t width) {
  return shfl<double>(in, out, n, kind, arg, width);
}

CUDA_EMU_BINDING(emu_selftest_compact, const float* x, int64_t n, float threshold, int32_t* rank, int32_t* block_stats,
                 int32_t* warp_votes) {
  const st::LaunchConfig cfg = st::compact_config(n);
  return cuda_emu::launch(st::compact_kernel, cfg.grid, cfg.block, cfg.smem, x, n, threshold, rank, block_stats, warp_votes);
}

CUDA_EMU_BINDING(emu_selftest_histogram, const int32_t* values, const float* fvalues, int64_t n, int32_t* hist,
                 uint64_t* hist64, float* fsum, double* dsum, int32_t* vmax, float* fmax, uint32_t* total) {
  const st::LaunchConfig cfg = st::histogram_config(n);
  return cuda_emu::launch(st::histogram_kernel, cfg.grid, cfg.block, cfg.smem, values, fvalues, n, hist,
                          reinterpret_cast<unsigned long long*>(hist64), fsum, dsum, vmax, fmax, total);
}

template <class T>
static int reverse_segments(const void* x, void* y, int64_t n, int64_t seg) {
  if (seg < 1) return cuda_emu::invalid_argument("seg must be >= 1, got %lld", (long long)seg);
  const st::LaunchConfig cfg = st::reverse_segments_config(n, int(seg), sizeof(T));
  return cuda_emu::launch(st::reverse_segments_kernel<T>, cfg.grid, cfg.block, cfg.smem, static_cast<const T*>(x),
                          static_cast<T*>(y), n, int(seg));
}
CUDA_EMU_BINDING(emu_selftest_reverse_segments_f32, const void* x, void* y, int64_t n, int64_t seg) { return reverse_segments<float>(x, y, n, seg); }
CUDA_EMU_BINDING(emu_selftest_reverse_segments_f16, const void* x, void* y, int64_t n, int64_t seg) { return reverse_segments<__half>(x, y, n, seg); }
CUDA_EMU_BINDING(emu_selftest_reverse_segments_f64, const void* x, void* y, int64_t n, int64_t seg) { return reverse_segments<double>(x, y, n, seg); }

// Mirrors cudaFuncSetAttribute(reverse_segments_kernel<float>, MaxDynamicSharedMemorySize, bytes).
CUDA_EMU_BINDING(emu_selftest_set_reverse_f32_max_smem, int64_t bytes) {
  return cuda_emu::set_max_dynamic_smem(st::reverse_segments_kernel<float>, size_t(bytes));
}

CUDA_EMU_BINDING(emu_selftest_smem_peek, uint32_t* out, int64_t words) {
  return cuda_emu::launch(st::smem_peek_kernel, dim3(1), dim3(64), size_t(words) * 4, out, int(words));
}

CUDA_EMU_BINDING(emu_selftest_index, int32_t* out, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz) {
  return cuda_emu::launch(st::index_kernel, dim3(unsigned(gx), unsigned(gy), unsigned(gz)),
                          dim3(unsigned(bx), unsigned(by), unsigned(bz)), 0, out);
}

// Storage codes: 0 float32, 1 float16, 2 bfloat16.
CUDA_EMU_BINDING(emu_selftest_convert, const void* x, void* y, int64_t n, int64_t from, int64_t to) {
  const st::LaunchConfig c = st::elementwise_config(n);
  if (from == 1 && to == 0) return cuda_emu::launch(st::convert_kernel<__half, float>, c.grid, c.block, c.smem, static_cast<const __half*>(x), static_cast<float*>(y), n);
  if (from == 2 && to == 0) return cuda_emu::launch(st::convert_kernel<__nv_bfloat16, float>, c.grid, c.block, c.smem, static_cast<const __nv_bfloat16*>(x), static_cast<float*>(y), n);
  if (from == 0 && to == 1) return cuda_emu::launch(st::convert_kernel<float, __half>, c.grid, c.block, c.smem, static_cast<const float*>(x), static_cast<__half*>(y), n);
  if (from == 0 && to == 2) return cuda_emu::launch(st::convert_kernel<float, __nv_bfloat16>, c.grid, c.block, c.smem, static_cast<const float*>(x), static_cast<__nv_bfloat16*>(y), n);
  return cuda_emu::invalid_argument("unsupported conversion from code %lld to %lld", (long long)from, (long long)to);
}

CUDA_EMU_BINDING(emu_selftest_double_to_16bit, const double* x, uint16_t* y, int64_t n, int64_t kind) {
  const st::LaunchConfig c = st::elementwise_config(n);
  return cuda_emu::launch(st::double_to_16bit_kernel, c.grid, c.block, c.smem, x, y, n, int(kind));
}

// Storage code 1 float16, 2 bfloat16 (raw 16-bit patterns in and out).
CUDA_EMU_BINDING(emu_selftest_arith16, const void* a, const void* b, void* out, int32_t* cmp, int64_t n, int64_t op,
                 int64_t storage) {
  const st::LaunchConfig c = st::elementwise_config(n);
  if (storage == 1)
    return cuda_emu::launch(st::arith16_kernel<__half>, c.grid, c.block, c.smem, static_cast<const __half*>(a),
                            static_cast<const __half*>(b), static_cast<__half*>(out), cmp, n, int(op));
  if (storage == 2)
    return cuda_emu::launch(st::arith16_kernel<__nv_bfloat16>, c.grid, c.block, c.smem,
                            static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b),
                            static_cast<__nv_bfloat16*>(out), cmp, n, int(op));
  return cuda_emu::invalid_argument("storage must be 1 (float16) or 2 (bfloat16), got %lld", (long long)storage);
}

CUDA_EMU_BINDING(emu_selftest_warp_reduce, const int32_t* x, int32_t* out, int64_t n) {
  if (n <= 0 || n % 32 != 0) return cuda_emu::invalid_argument("n must be a positive multiple of 32, got %lld", (long long)n);
  return cuda_emu::launch(st::warp_reduce_kernel, dim3(unsigned(n / 32)), dim3(32), 0, x, out);
}

CUDA_EMU_BINDING(emu_selftest_warp_exchange, int32_t* out, int64_t block, int64_t missing_syncwarp) {
  if (block < 1 || block > 256 || block % 2) return cuda_emu::invalid_argument("block must be even and in [2, 256], got %lld", (long long)block);
  return cuda_emu::launch(st::warp_exchange_kernel, dim3(1), dim3(unsigned(block)), 0, out, int(missing_syncwarp));
}

CUDA_EMU_BINDING(emu_selftest_early_exit, int32_t* out, int64_t block, int64_t active) {
  return cuda_emu::launch(st::early_exit_kernel, dim3(1), dim3(unsigned(block)), 0, out, int(active));
}

CUDA_EMU_BINDING(emu_selftest_tickets, int32_t* counter, int32_t* tickets, int64_t grid, int64_t block) {
  return cuda_emu::launch(st::ticket_kernel, dim3(unsigned(grid)), dim3(unsigned(block)), 0, counter, tickets);
}

CUDA_EMU_BINDING(emu_selftest_sync_bug, int32_t* out, int64_t bug, int64_t block) {
  return cuda_emu::launch(st::sync_bug_kernel, dim3(1), dim3(unsigned(block)), 0, out, int(bug));
}
