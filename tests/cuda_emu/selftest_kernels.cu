// nvcc launchers of the emulator self-test kernels. Nothing runs them on a GPU: tests/test_cuda_emu.py
// compiles this file with `nvcc -c` for sm_80 and sm_90 to prove selftest_kernels.cuh is real CUDA,
// not emulator-only C++. Each launcher mirrors a binding in emu_selftest.cpp: the same *_config(),
// with <<<grid, block, smem, stream>>> where the binding calls cuda_emu::launch.
#include <cuda_runtime.h>

#include "selftest_kernels.cuh"

namespace st = streamssl_emu_selftest;

namespace {
int status() { return int(cudaGetLastError()); }
cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
}  // namespace

int selftest_block_sum(const float* x, float* partial, float* out, int64_t n, int64_t max_partials, bool missing_sync,
                       void* stream) {
  const st::LaunchConfig cfg = st::block_sum_config(n, max_partials);
  const auto kernel = missing_sync ? st::block_sum_kernel<true> : st::block_sum_kernel<false>;
  kernel<<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(x, partial, n);
  kernel<<<1, cfg.block, 0, as_stream(stream)>>>(partial, out, int64_t(cfg.grid.x));
  return status();
}

template <class T>
int selftest_warp_sum(const T* x, T* out, int64_t n, int variant, void* stream) {
  const st::LaunchConfig cfg = st::warp_sum_config(n);
  st::warp_sum_kernel<T><<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(x, out, n, variant);
  return status();
}
template int selftest_warp_sum<float>(const float*, float*, int64_t, int, void*);
template int selftest_warp_sum<double>(const double*, double*, int64_t, int, void*);
template int selftest_warp_sum<int>(const int*, int*, int64_t, int, void*);
template int selftest_warp_sum<int64_t>(const int64_t*, int64_t*, int64_t, int, void*);

template <class T>
int selftest_shfl(const T* in, T* out, int64_t n, int kind, int arg, int width, void* stream) {
  const st::LaunchConfig cfg = st::shfl_config(n);
  st::shfl_kernel<T><<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(in, out, kind, arg, width);
  return status();
}
template int selftest_shfl<int>(const int*, int*, int64_t, int, int, int, void*);
template int selftest_shfl<__half>(const __half*, __half*, int64_t, int, int, int, void*);
template int selftest_shfl<double>(const double*, double*, int64_t, int, int, int, void*);

int selftest_compact(const float* x, int64_t n, float threshold, int* rank, int* block_stats, int* warp_votes,
                     void* stream) {
  const st::LaunchConfig cfg = st::compact_config(n);
  st::compact_kernel<<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(x, n, threshold, rank, block_stats, warp_votes);
  return status();
}

int selftest_histogram(const int* values, const float* fvalues, int64_t n, int* hist, unsigned long long* hist64,
                       float* fsum, double* dsum, int* vmax, float* fmax, unsigned int* total, void* stream) {
  const st::LaunchConfig cfg = st::histogram_config(n);
  st::histogram_kernel<<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(values, fvalues, n, hist, hist64, fsum,
                                                                               dsum, vmax, fmax, total);
  return status();
}

template <class T>
int selftest_reverse_segments(const T* x, T* y, int64_t n, int seg, void* stream) {
  const st::LaunchConfig cfg = st::reverse_segments_config(n, seg, sizeof(T));
  if (cfg.smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(st::reverse_segments_kernel<T>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(cfg.smem));
    if (e != cudaSuccess) return int(e);
  }
  st::reverse_segments_kernel<T><<<cfg.grid, cfg.block, cfg.smem, as_stream(stream)>>>(x, y, n, seg);
  return status();
}
template int selftest_reverse_segments<float>(const float*, float*, int64_t, int, void*);
template int selftest_reverse_segments<__half>(const __half*, __half*, int64_t, int, void*);
template int selftest_reverse_segments<double>(const double*, double*, int64_t, int, void*);

int selftest_smem_peek(unsigned int* out, int words, void* stream) {
  st::smem_peek_kernel<<<1, 64, size_t(words) * 4, as_stream(stream)>>>(out, words);
  return status();
}

int selftest_index(int* out, dim3 grid, dim3 block, void* stream) {
  st::index_kernel<<<grid, block, 0, as_stream(stream)>>>(out);
  return status();
}

template <class From, class To>
int selftest_convert(const From* x, To* y, int64_t n, void* stream) {
  const st::LaunchConfig c = st::elementwise_config(n);
  st::convert_kernel<From, To><<<c.grid, c.block, c.smem, as_stream(stream)>>>(x, y, n);
  return status();
}
template int selftest_convert<__half, float>(const __half*, float*, int64_t, void*);
template int selftest_convert<__nv_bfloat16, float>(const __nv_bfloat16*, float*, int64_t, void*);
template int selftest_convert<float, __half>(const float*, __half*, int64_t, void*);
template int selftest_convert<float, __nv_bfloat16>(const float*, __nv_bfloat16*, int64_t, void*);

int selftest_double_to_16bit(const double* x, unsigned short* y, int64_t n, int kind, void* stream) {
  const st::LaunchConfig c = st::elementwise_config(n);
  st::double_to_16bit_kernel<<<c.grid, c.block, c.smem, as_stream(stream)>>>(x, y, n, kind);
  return status();
}

template <class T>
int selftest_arith16(const T* a, const T* b, T* out, int* cmp, int64_t n, int op, void* stream) {
  const st::LaunchConfig c = st::elementwise_config(n);
  st::arith16_kernel<T><<<c.grid, c.block, c.smem, as_stream(stream)>>>(a, b, out, cmp, n, op);
  return status();
}
template int selftest_arith16<__half>(const __half*, const __half*, __half*, int*, int64_t, int, void*);
template int selftest_arith16<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, int*, int64_t,
                                             int, void*);

int selftest_warp_reduce(const int* x, int* out, int64_t n, void* stream) {
  st::warp_reduce_kernel<<<unsigned(n / 32), 32, 0, as_stream(stream)>>>(x, out);
  return status();
}

int selftest_warp_exchange(int* out, unsigned block, int missing_syncwarp, void* stream) {
  st::warp_exchange_kernel<<<1, block, 0, as_stream(stream)>>>(out, missing_syncwarp);
  return status();
}

int selftest_early_exit(int* out, unsigned block, int active, void* stream) {
  st::early_exit_kernel<<<1, block, 0, as_stream(stream)>>>(out, active);
  return status();
}

int selftest_tickets(int* counter, int* tickets, unsigned grid, unsigned block, void* stream) {
  st::ticket_kernel<<<grid, block, 0, as_stream(stream)>>>(counter, tickets);
  return status();
}

int selftest_sync_bug(int* out, int bug, unsigned block, void* stream) {
  st::sync_bug_kernel<<<1, block, 0, as_stream(stream)>>>(out, bug);
  return status();
}
