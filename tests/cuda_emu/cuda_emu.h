// cuda_emu.h — run unmodified CUDA kernel sources (csrc/cuda/*.cuh) on the CPU with g++/clang++.
// README.md beside this file says how to bind a kernel; this comment is the reference.
//
// What it emulates
//   * threadIdx / blockIdx / blockDim / gridDim / warpSize, dim3, uint3 and the vector types.
//   * Every CUDA thread of a block has its own stack and runs the kernel to completion; the blocks
//     of a grid run one after another, so a function-local `static` is exactly block-shared memory:
//     `__shared__` is `static`. Dynamic shared memory is spelled STREAMSSL_EXTERN_SHARED(type, name)
//     (csrc/common/macros.h) and points at a per-launch buffer. Both kinds of shared memory are
//     filled with 0xFF bytes (NaN for floats, -1 for ints) before every block, as a stand-in for the
//     GPU's undefined contents.
//   * __syncthreads (and _count/_and/_or) as a block barrier; the warp shuffles, votes, __syncwarp
//     and __reduce_*_sync as per-warp barriers with the exact PTX lane arithmetic (width, clamping).
//     All live lanes of the warp must take part: a mask that leaves out a live lane is reported
//     (partial masks are not supported). Lanes that exited, or that do not exist in a partial last
//     warp, are fine; reading from them gives a poison value of all-ones bytes.
//   * Threads that have exited no longer hold up __syncthreads or warp intrinsics. That is what GPUs
//     do in practice for `if (i >= n) return;` before a barrier; CUDA itself leaves a barrier that
//     not every thread reaches undefined.
//   * __CUDA_ARCH__ and __CUDACC__ are not defined: code behind them takes its host path here.
//   * atomics (relaxed, as on the GPU), __ldg and the other cache-hint loads, bit intrinsics, the
//     fast-math intrinsics (computed with the precise libm function), __half and __nv_bfloat16
//     (bit-compatible; conversions round to nearest even exactly like cuda_fp16.h/cuda_bf16.h).
//   * Checks: barriers that cannot complete (deadlock), __syncthreads at different source lines in
//     one barrier phase, lanes of a warp meeting at different intrinsics, partial masks, launch
//     configurations a GPU refuses, __trap(). The launch then returns an error code and the message
//     is in cuda_emu::last_error() (cuda_emu_last_error() from Python), naming file:line.
//
// What it does not emulate: timing, occupancy, coalescing and bank conflicts, true warp lockstep
// (lanes meet only at warp intrinsics), the GPU memory model beyond what the schedule produces, FMA
// contraction (nvcc fuses a*b+c by default, g++ on baseline x86-64 does not) and the reduced
// accuracy of the fast-math intrinsics, textures, cooperative groups, __activemask, dynamic
// parallelism, streams (a launch runs to completion before it returns), device printf ordering.
// Out-of-bounds accesses are not caught (build with -fsanitize=address for that). Function-local
// statics other than __shared__ in device code or bindings would be poisoned like shared memory.
//
// Schedules (CUDA_EMU_SCHEDULE, or cuda_emu_set_schedule(); default "random:0"):
//   forward      the threads of a block run one at a time, in thread order, each until it reaches
//                a barrier, a warp intrinsic or its end, then hands over to the next runnable
//                thread (round robin);
//   reverse      the same in reverse thread order, and the blocks in reverse order;
//   random:SEED  the same in a seeded permutation of the threads, drawn again after every
//                __syncthreads, and a seeded permutation of the blocks;
//   parallel     one OS thread per CUDA thread, all running at once (nondeterministic). Built with
//                -fsanitize=thread it is a precise race detector: only CUDA's own ordering (block
//                start/end, __syncthreads, __syncwarp) is declared to ThreadSanitizer.
// The token schedules run the threads as fibers (ucontext) on the calling thread: one runs at a
// time, so this is the same as OS threads passing a token, at a fraction of the cost. They are
// deterministic: a missing __syncthreads gives the same wrong answer every time in at least one of
// them, which is what makes the emulated tests able to fail.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is the host-compiler CUDA emulator; nvcc compiles the kernels natively"
#endif

#ifndef STREAMSSL_CUDA_EMU
#define STREAMSSL_CUDA_EMU 1
#endif

#if defined(STREAMSSL_HD) && !defined(STREAMSSL_EXTERN_SHARED)
#error "csrc/common/macros.h was included before cuda_emu.h without STREAMSSL_CUDA_EMU: include cuda_emu.h first or compile with -DSTREAMSSL_CUDA_EMU"
#endif

#include <dlfcn.h>
#include <elf.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <math.h>

// ------------------------------------------------------------------------------------------------
// Keywords. __restrict__ is native in g++ and clang++.
// ------------------------------------------------------------------------------------------------
#define __global__ inline  // kernels live in headers; inline keeps several TUs from clashing
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __shared__ static  // blocks run one after another: a static is exactly block-shared
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#include "common/macros.h"

// ------------------------------------------------------------------------------------------------
// Vector types and dim3 (layout and alignment as in CUDA's vector_types.h).
// ------------------------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct int3 { int x, y, z; };
struct float3 { float x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(4) short2 { short x, y; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
inline int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
inline double2 make_double2(double x, double y) { return double2{x, y}; }
inline longlong2 make_longlong2(long long x, long long y) { return longlong2{x, y}; }
inline short2 make_short2(short x, short y) { return short2{x, y}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return ushort2{x, y}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return char4{x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return uchar4{x, y, z, w}; }

// ------------------------------------------------------------------------------------------------
// Built-in variables. threadIdx/blockIdx are per OS thread (the fiber schedules set the running
// thread's copy at every switch); blockDim/gridDim are per launch, and launches are serialised.
// ------------------------------------------------------------------------------------------------
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace cuda_emu {

// Launch status codes (what a binding returns; 0 is success).
enum Status : int {
  kSuccess = 0,
  kInvalidConfiguration = 1,  // grid/block/shared-memory sizes a GPU would refuse
  kSyncError = 2,             // deadlock, divergent barrier, partial mask, mismatched warp intrinsics
  kKernelFault = 3,           // __trap() or an exception escaping the kernel
  kResourceError = 4,         // the OS refused a thread
  kInvalidValue = 5,          // bad schedule or a binding's argument check
};

constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxOptInDynamicSmem = 227 * 1024;   // sm_90 opt-in limit
constexpr uint64_t kMaxBlocksPerLaunch = uint64_t(1) << 24;

namespace detail {

enum class Mode { kForward, kReverse, kRandom, kParallel };
struct Schedule {
  Mode mode = Mode::kRandom;
  uint64_t seed = 0;
};

enum Counter { kLaunches, kBlocks, kThreadRuns, kBlockBarriers, kWarpOps, kTokenPasses, kNumCounters };

struct Globals {
  std::mutex launch_mutex;  // one launch at a time: static __shared__ arrays belong to the kernel
  std::mutex config_mutex;  // guards the fields below
  bool has_override = false;
  Schedule override_schedule;
  std::map<const void*, size_t> max_dynamic_smem;
  std::atomic<int64_t> counters[kNumCounters] = {};
};
inline Globals& globals() {
  static Globals g;
  return g;
}
inline thread_local std::string tl_last_error;  // per calling thread, read right after a failure

inline int set_error(int code, const std::string& msg) {
  tl_last_error = msg;
  return code;
}

inline std::string format(const char* fmt, va_list ap) {
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}

inline bool parse_schedule(const char* spec, Schedule* out, std::string* err) {
  const std::string s = spec;
  if (s == "forward") { *out = {Mode::kForward, 0}; return true; }
  if (s == "reverse") { *out = {Mode::kReverse, 0}; return true; }
  if (s == "parallel") { *out = {Mode::kParallel, 0}; return true; }
  if (s == "random") { *out = {Mode::kRandom, 0}; return true; }
  if (s.rfind("random:", 0) == 0 && s.size() > 7) {
    char* end = nullptr;
    const unsigned long long seed = std::strtoull(s.c_str() + 7, &end, 10);
    if (end && *end == '\0' && s[7] != '-') { *out = {Mode::kRandom, seed}; return true; }
  }
  *err = "CUDA_EMU_SCHEDULE/schedule '" + s + "' is not one of forward, reverse, random[:SEED], parallel";
  return false;
}

inline std::string schedule_name(const Schedule& s) {
  switch (s.mode) {
    case Mode::kForward: return "forward";
    case Mode::kReverse: return "reverse";
    case Mode::kParallel: return "parallel";
    case Mode::kRandom: return "random:" + std::to_string(s.seed);
  }
  return "?";
}

// The schedule set through cuda_emu_set_schedule(), else $CUDA_EMU_SCHEDULE, else random:0.
inline bool current_schedule(Schedule* out, std::string* err) {
  {
    std::lock_guard<std::mutex> g(globals().config_mutex);
    if (globals().has_override) { *out = globals().override_schedule; return true; }
  }
  const char* env = std::getenv("CUDA_EMU_SCHEDULE");
  if (env == nullptr || *env == '\0') { *out = Schedule{}; return true; }
  return parse_schedule(env, out, err);
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fisher-Yates with our own generator, so the permutation is the same with every standard library.
inline void seeded_permutation(std::vector<uint32_t>& v, uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t state = seed ^ (a * 0xD1B54A32D192ED03ull) ^ (b * 0xABC98388FB8FAC03ull);
  for (uint32_t i = 0; i < v.size(); ++i) v[i] = i;
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix64(state) % i]);
}

struct Aborted {};  // unwinds a worker's kernel after an error (never escapes a worker)

struct Site {
  const char* what = "";
  const char* file = "";
  int line = 0;
};
inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.what, b.what) == 0 && std::strcmp(a.file, b.file) == 0;
}

enum class Wait : uint8_t { kRunnable, kBlockBarrier, kWarpBarrier, kDone };
enum class WarpOp : uint8_t { kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll,
                              kReduceAdd, kReduceMin, kReduceMax, kReduceMinU, kReduceMaxU,
                              kReduceAnd, kReduceOr, kReduceXor };

struct ThreadSlot {
  std::condition_variable cv;
  Wait wait = Wait::kDone;
  Site site;
};

struct WarpState {
  uint32_t live = 0;     // lanes that exist and have not exited
  uint32_t arrived = 0;  // lanes waiting at the current warp barrier
  uint64_t gen = 0;
  WarpOp op = WarpOp::kSyncwarp;
  Site site;
  int first_tid = -1;
  uint32_t participants[2] = {0, 0};  // double-buffered by gen parity: a lane reads generation g
  uint64_t values[2][32] = {};        // before it can arrive at g+1, so g+2 may reuse the buffer
};

class Engine;
inline thread_local Engine* tl_engine = nullptr;
inline thread_local int tl_tid = -1;

[[noreturn]] inline void die_outside_kernel(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s called outside an emulated kernel launch\n", what);
  std::abort();
}

inline std::string dim_str(const uint3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

// Static __shared__ arrays are function-local statics; on the GPU they are uninitialised at every
// block start, here they would keep the previous block's values, which can hide a missing
// barrier. So before every block they are filled with 0xFF bytes like dynamic shared memory. They
// are found in this library's own ELF symbol table: zero-initialised function-local statics (mangled
// _ZZ...) without a guard variable, outside the emulator and the standard library. A function-local
// static of a binding's host code would be poisoned too; bindings have no reason for one.
struct StaticRange {
  char* addr;
  size_t size;
};

inline bool starts_with(const char* s, const char* prefix) { return std::strncmp(s, prefix, std::strlen(prefix)) == 0; }

inline std::vector<StaticRange> find_shared_statics() {
  std::vector<StaticRange> out;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&find_shared_statics), &info) == 0) return out;
  const char* path = info.dli_fname != nullptr && info.dli_fname[0] != '\0' ? info.dli_fname : "/proc/self/exe";
  std::FILE* f = std::fopen(path, "rb");
  if (f == nullptr) return out;
  std::vector<char> data;
  char chunk[1 << 16];
  for (size_t got; (got = std::fread(chunk, 1, sizeof chunk, f)) > 0;) data.insert(data.end(), chunk, chunk + got);
  std::fclose(f);
  if (data.size() < sizeof(Elf64_Ehdr) || std::memcmp(data.data(), ELFMAG, SELFMAG) != 0 ||
      data[EI_CLASS] != ELFCLASS64)
    return out;
  Elf64_Ehdr eh;
  std::memcpy(&eh, data.data(), sizeof eh);
  if (eh.e_shoff == 0 || eh.e_shoff + uint64_t(eh.e_shnum) * sizeof(Elf64_Shdr) > data.size()) return out;
  std::vector<Elf64_Shdr> sh(eh.e_shnum);
  std::memcpy(sh.data(), data.data() + eh.e_shoff, sh.size() * sizeof(Elf64_Shdr));
  char* const base = eh.e_type == ET_DYN ? static_cast<char*>(info.dli_fbase) : nullptr;
  for (const Elf64_Shdr& s : sh) {
    if (s.sh_type != SHT_SYMTAB || s.sh_link >= sh.size()) continue;
    const Elf64_Shdr& strtab = sh[s.sh_link];
    if (s.sh_offset + s.sh_size > data.size() || strtab.sh_offset + strtab.sh_size > data.size()) return out;
    const char* names = data.data() + strtab.sh_offset;
    std::vector<Elf64_Sym> syms(s.sh_size / sizeof(Elf64_Sym));
    std::memcpy(syms.data(), data.data() + s.sh_offset, syms.size() * sizeof(Elf64_Sym));
    std::vector<std::string> guards;
    for (const Elf64_Sym& y : syms)
      if (y.st_name < strtab.sh_size && starts_with(names + y.st_name, "_ZGVZ")) guards.emplace_back(names + y.st_name + 4);
    std::sort(guards.begin(), guards.end());
    static const char* const kSkip[] = {"_ZZN8cuda_emu", "_ZZNK8cuda_emu", "_ZZNSt", "_ZZNKSt", "_ZZSt",
                                        "_ZZN9__gnu_cxx", "_ZZNK9__gnu_cxx"};
    for (const Elf64_Sym& y : syms) {
      if (ELF64_ST_TYPE(y.st_info) != STT_OBJECT || y.st_size == 0 || y.st_shndx >= sh.size() ||
          sh[y.st_shndx].sh_type != SHT_NOBITS || y.st_name >= strtab.sh_size)
        continue;
      const char* name = names + y.st_name;
      if (!starts_with(name, "_ZZ")) continue;
      bool skip = std::binary_search(guards.begin(), guards.end(), std::string(name + 2));
      for (const char* p : kSkip) skip = skip || starts_with(name, p);
      if (!skip) out.push_back({base + y.st_value, size_t(y.st_size)});
    }
  }
  return out;
}

inline const std::vector<StaticRange>& shared_statics() {
  static const std::vector<StaticRange> ranges = find_shared_statics();
  return ranges;
}

// ThreadSanitizer (parallel schedule only): the engine's own bookkeeping, guarded by one mutex, is
// hidden from it, and only the edges CUDA guarantees are declared (block start and end,
// __syncthreads, __syncwarp). Otherwise every barrier's mutex would order unrelated accesses and hide
// exactly the races a missing barrier causes.
#if defined(__SANITIZE_THREAD__)
#define CUDA_EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CUDA_EMU_TSAN 1
#endif
#endif
#if defined(CUDA_EMU_TSAN)
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

struct TsanQuiet {
  explicit TsanQuiet(bool on) : on_(on) {
#if defined(CUDA_EMU_TSAN)
    if (on_) {
      AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
      AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
      AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
#endif
  }
  ~TsanQuiet() {
#if defined(CUDA_EMU_TSAN)
    if (on_) {
      AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
      AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
      AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    }
#endif
  }
  TsanQuiet(const TsanQuiet&) = delete;
  TsanQuiet& operator=(const TsanQuiet&) = delete;

 private:
  bool on_;
};
// Declared edges, called inside a TsanQuiet region: sync is un-ignored just for the annotation.
inline void tsan_release(void* addr) {
#if defined(CUDA_EMU_TSAN)
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  __tsan_release(addr);
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#else
  (void)addr;
#endif
}
inline void tsan_acquire(void* addr) {
#if defined(CUDA_EMU_TSAN)
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  __tsan_acquire(addr);
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#else
  (void)addr;
#endif
}

// One CUDA thread's work: calls the kernel with the launch's arguments.
struct Body {
  void (*call)(void*);
  void* context;
};

// Runs one launch. Token schedules (forward/reverse/random) run the CUDA threads of a block as
// fibers (ucontext) on the calling OS thread: exactly one runs at a time, so this is observably the
// same as OS threads handing a token around, and a hand-off costs a user-space context switch
// instead of two futex round trips. The parallel schedule runs one OS thread per CUDA thread.
class Engine {
 public:
  Engine(dim3 grid, dim3 block, size_t smem_bytes, Schedule sched, const Body& body)
      : grid_(grid), block_(block), smem_bytes_(smem_bytes), sched_(sched), body_(body) {}

  ~Engine() {
    std::free(smem_);
    if (stacks_ != nullptr) munmap(stacks_, stacks_bytes_);
  }

  int run() {
    n_ = int(block_.x * block_.y * block_.z);
    nwarps_ = (n_ + 31) / 32;
    parallel_ = sched_.mode == Mode::kParallel;
    slots_.reset(new ThreadSlot[n_]);
    warps_.assign(nwarps_, WarpState{});
    order_.resize(n_);
    pos_of_.resize(n_);
    for (int i = 0; i < n_; ++i) order_[i] = uint32_t(sched_.mode == Mode::kReverse ? n_ - 1 - i : i);
    // 128-byte alignment: more than CUDA guarantees for dynamic shared memory (16 bytes).
    smem_ = std::aligned_alloc(128, std::max<size_t>(128, (smem_bytes_ + 127) / 128 * 128));
    if (smem_ == nullptr) return fail_setup(kResourceError, "cannot allocate dynamic shared memory");
    if (int rc = parallel_ ? start_threads() : make_stacks()) return rc;

    const uint64_t nblocks = uint64_t(grid_.x) * grid_.y * grid_.z;
    std::vector<uint32_t> block_order(nblocks);
    if (sched_.mode == Mode::kRandom) {
      seeded_permutation(block_order, sched_.seed, ~uint64_t(0), 0);
    } else {
      for (uint64_t i = 0; i < nblocks; ++i)
        block_order[i] = uint32_t(sched_.mode == Mode::kReverse ? nblocks - 1 - i : i);
    }
    for (uint64_t i = 0; i < nblocks && !abort_; ++i) run_block(block_order[i]);
    if (parallel_) stop_threads();

    auto& c = globals().counters;
    c[kLaunches] += 1;
    for (int k = 1; k < kNumCounters; ++k) c[k] += counts_[k];
    return status_;
  }

  const std::string& error() const { return error_; }
  void* smem() const { return smem_; }

  // __syncthreads and its reducing variants: returns how many of the threads that took part (those
  // that have not exited) passed a nonzero pred, and how many took part.
  std::pair<int, int> sync_block(int pred, const Site& site) {
    const int tid = tl_tid;
    Guard g(*this);
    if (abort_) throw Aborted();
    if (block_arrived_ == 0) {
      block_site_ = site;
      block_first_ = tid;
    } else if (!same_site(site, block_site_)) {
      fail(kSyncError, "divergent barrier in block " + dim_str(cur_block_) + ": thread " + tid_str(tid) +
                           " reached " + site_str(site) + " while thread " + tid_str(block_first_) +
                           " waits at " + site_str(block_site_));
    }
    const uint64_t gen = block_gen_;
    tsan_release(&sync_count_[gen & 1]);
    sync_count_[gen & 1] += pred ? 1 : 0;
    ThreadSlot& me = slots_[tid];
    me.wait = Wait::kBlockBarrier;
    me.site = site;
    --running_;
    ++block_arrived_;
    if (block_arrived_ == live_) complete_block_barrier();
    yield(g, tid);
    tsan_acquire(&sync_count_[gen & 1]);
    return {sync_result_[gen & 1], sync_arrivals_[gen & 1]};
  }

  // Every warp intrinsic: publish this lane's 64-bit value, wait for the live lanes, compute.
  uint64_t warp_op(WarpOp op, uint32_t mask, uint64_t value, int b, int c, const Site& site) {
    const int tid = tl_tid;
    const int lane = tid & 31;
    Guard g(*this);
    if (abort_) throw Aborted();
    WarpState& w = warps_[tid >> 5];
    if ((mask & w.live) != w.live) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "mask 0x%08x leaves out live lanes 0x%08x", mask, w.live & ~mask);
      fail(kSyncError, std::string("partial warp masks are not supported: thread ") + tid_str(tid) + " at " +
                           site_str(site) + " uses " + buf);
    }
    if (w.arrived == 0) {
      w.op = op;
      w.site = site;
      w.first_tid = tid;
    } else if (w.op != op) {
      fail(kSyncError, "warp " + std::to_string(tid >> 5) + " of block " + dim_str(cur_block_) +
                           " diverged: thread " + tid_str(tid) + " reached " + site_str(site) + " while thread " +
                           tid_str(w.first_tid) + " waits at " + site_str(w.site));
    }
    const uint64_t gen = w.gen;
    if (op == WarpOp::kSyncwarp) tsan_release(&w.participants[gen & 1]);  // only __syncwarp orders memory
    w.values[gen & 1][lane] = value;
    w.arrived |= 1u << lane;
    ThreadSlot& me = slots_[tid];
    me.wait = Wait::kWarpBarrier;
    me.site = site;
    --running_;
    ++counts_[kWarpOps];
    if (w.arrived == w.live) complete_warp_barrier(w);
    yield(g, tid);
    if (op == WarpOp::kSyncwarp) tsan_acquire(&w.participants[gen & 1]);

    const uint32_t part = w.participants[gen & 1];
    const uint64_t* vals = w.values[gen & 1];
    auto lane_value = [&](int j) -> uint64_t { return (part >> j) & 1u ? vals[j] : ~uint64_t(0); };
    // Shuffle lane arithmetic exactly as PTX shfl.sync defines it (c = clamp | segmask << 8).
    const int bval = b & 31, segmask = (c >> 8) & 31, minl = lane & segmask;
    const int maxl = minl | (c & 31 & ~segmask);
    const uint32_t voters = part & mask;
    switch (op) {
      case WarpOp::kSyncwarp: return 0;
      case WarpOp::kShflUp: { const int j = lane - bval; return lane_value(j >= minl ? j : lane); }
      case WarpOp::kShflDown: { const int j = lane + bval; return lane_value(j <= maxl ? j : lane); }
      case WarpOp::kShflXor: { const int j = lane ^ bval; return lane_value(j <= maxl ? j : lane); }
      case WarpOp::kShflIdx: { const int j = minl | (bval & ~segmask); return lane_value(j <= maxl ? j : lane); }
      case WarpOp::kBallot:
      case WarpOp::kAny:
      case WarpOp::kAll: {
        uint32_t ballot = 0;
        for (int j = 0; j < 32; ++j)
          if (((voters >> j) & 1u) && vals[j] != 0) ballot |= 1u << j;
        if (op == WarpOp::kBallot) return ballot;
        if (op == WarpOp::kAny) return ballot != 0;
        return ballot == voters;
      }
      default: {
        uint32_t acc = 0;
        bool first = true;
        for (int j = 0; j < 32; ++j) {
          if (!((voters >> j) & 1u)) continue;
          const uint32_t v = uint32_t(vals[j]);
          if (first) { acc = v; first = false; continue; }
          switch (op) {
            case WarpOp::kReduceAdd: acc += v; break;
            case WarpOp::kReduceMin: acc = uint32_t(std::min(int32_t(acc), int32_t(v))); break;
            case WarpOp::kReduceMax: acc = uint32_t(std::max(int32_t(acc), int32_t(v))); break;
            case WarpOp::kReduceMinU: acc = std::min(acc, v); break;
            case WarpOp::kReduceMaxU: acc = std::max(acc, v); break;
            case WarpOp::kReduceAnd: acc &= v; break;
            case WarpOp::kReduceOr: acc |= v; break;
            case WarpOp::kReduceXor: acc ^= v; break;
            default: break;
          }
        }
        return acc;
      }
    }
  }

  [[noreturn]] void trap(const Site& site) {
    Guard g(*this);
    fail(kKernelFault, "__trap() in thread " + tid_str(tl_tid) + " of block " + dim_str(cur_block_) + " at " +
                           site_str(site));
  }

 private:
  // The engine mutex, taken only in parallel mode: fibers never run concurrently, and a fiber must
  // not hold a lock while it switches to another fiber on the same OS thread.
  struct Guard {
    TsanQuiet quiet;
    std::unique_lock<std::mutex> lk;
    explicit Guard(Engine& e) : quiet(e.parallel_), lk(e.m_, std::defer_lock) {
      if (e.parallel_) lk.lock();
    }
  };

  struct Fiber {
    ucontext_t ctx;
  };

  static constexpr size_t kFiberStack = 256 * 1024;
  static constexpr size_t kGuardPage = 4096;

  uint3 thread_index(int tid) const {
    return uint3{unsigned(tid) % block_.x, unsigned(tid) / block_.x % block_.y, unsigned(tid) / (block_.x * block_.y)};
  }
  std::string tid_str(int tid) const { return dim_str(thread_index(tid)); }
  static std::string site_str(const Site& s) {
    return std::string(s.what) + " (" + s.file + ":" + std::to_string(s.line) + ")";
  }

  int fail_setup(int code, const std::string& msg) {
    status_ = code;
    error_ = msg;
    return code;
  }

  // First error wins; every waiting thread then unwinds. Caller holds the Guard.
  void record_error(int code, const std::string& msg) {
    if (!abort_) {
      abort_ = true;
      status_ = code;
      error_ = msg;
    }
    if (parallel_)
      for (int t = 0; t < n_; ++t) slots_[t].cv.notify_one();
  }
  [[noreturn]] void fail(int code, const std::string& msg) {
    record_error(code, msg);
    throw Aborted();
  }

  // Runs the kernel body for one thread; never lets an exception out (a fiber cannot unwind past
  // its entry, and an OS thread would terminate).
  void run_body(int tid) {
    try {
      body_.call(body_.context);
    } catch (const Aborted&) {
    } catch (const std::exception& e) {
      Guard g(*this);
      record_error(kKernelFault, std::string("exception in thread ") + tid_str(tid) + ": " + e.what());
    } catch (...) {
      Guard g(*this);
      record_error(kKernelFault, "unknown exception in thread " + tid_str(tid));
    }
  }

  // ---- fibers (token schedules) ----
  int make_stacks() {
    stacks_bytes_ = size_t(n_) * (kFiberStack + kGuardPage);
    void* p = mmap(nullptr, stacks_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      stacks_bytes_ = 0;
      return fail_setup(kResourceError, "cannot map " + std::to_string(n_) + " fiber stacks");
    }
    stacks_ = static_cast<char*>(p);
    for (int t = 0; t < n_; ++t)  // a guard page below every stack turns an overflow into a crash
      mprotect(stacks_ + size_t(t) * (kFiberStack + kGuardPage), kGuardPage, PROT_NONE);
    fibers_.reset(new Fiber[n_]);
    return kSuccess;
  }

  static void fiber_entry() {
    Engine* e = tl_engine;
    const int tid = tl_tid;
    if (!e->abort_) e->run_body(tid);
    e->exit_thread(tid);  // switches away for good
    std::abort();         // unreachable
  }

  // Make `t` the running fiber (threadIdx is the runner thread's thread_local, set per switch).
  void switch_to(int t, ucontext_t* save) {
    tl_tid = t;
    threadIdx = thread_index(t);
    ++counts_[kTokenPasses];
    if (save != nullptr) swapcontext(save, &fibers_[t].ctx);
    else setcontext(&fibers_[t].ctx);
  }

  // ---- OS threads (parallel schedule) ----
  struct Arg {
    Engine* engine;
    int tid;
  };
  static void* thread_entry(void* p) {
    Arg* a = static_cast<Arg*>(p);
    a->engine->worker(a->tid);
    return nullptr;
  }

  int start_threads() {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, kFiberStack * 4);
    threads_.reserve(n_);
    args_.resize(n_);
    for (int t = 0; t < n_; ++t) {
      args_[t] = {this, t};
      pthread_t th;
      const int rc = pthread_create(&th, &attr, &Engine::thread_entry, &args_[t]);
      if (rc != 0) {
        pthread_attr_destroy(&attr);
        stop_threads();
        return fail_setup(kResourceError, "cannot start emulated thread " + std::to_string(t) + " of " +
                                              std::to_string(n_) + ": " + std::strerror(rc));
      }
      threads_.push_back(th);
    }
    pthread_attr_destroy(&attr);
    return kSuccess;
  }

  void worker(int tid) {
    tl_engine = this;
    tl_tid = tid;
    threadIdx = thread_index(tid);
    uint64_t seen = 0;
    for (;;) {
      bool run_kernel;
      {
        TsanQuiet quiet(true);
        std::unique_lock<std::mutex> lk(m_);
        slots_[tid].cv.wait(lk, [&] { return shutdown_ || block_seq_ != seen; });
        if (shutdown_) break;
        tsan_acquire(&block_seq_);
        seen = block_seq_;
        blockIdx = cur_block_;
        run_kernel = !abort_;
      }
      if (run_kernel) run_body(tid);
      exit_thread(tid);
    }
    tl_engine = nullptr;
    tl_tid = -1;
  }

  void stop_threads() {
    {
      TsanQuiet quiet(true);
      std::lock_guard<std::mutex> lk(m_);
      shutdown_ = true;
      for (int t = 0; t < n_; ++t) slots_[t].cv.notify_one();
    }
    for (pthread_t th : threads_) pthread_join(th, nullptr);
    threads_.clear();
  }

  // ---- shared scheduling logic ----
  void run_block(uint32_t b) {
    Guard g(*this);
    cur_block_ = uint3{b % grid_.x, b / grid_.x % grid_.y, b / (grid_.x * grid_.y)};
    cur_block_linear_ = b;
    std::memset(smem_, 0xFF, smem_bytes_);  // uninitialised on the GPU: poison, NaN for floats
    for (const StaticRange& r : shared_statics()) std::memset(r.addr, 0xFF, r.size);
    live_ = running_ = n_;
    done_ = 0;
    block_arrived_ = 0;
    block_gen_ = 0;
    phase_ = 0;
    sync_count_[0] = sync_count_[1] = 0;
    for (int t = 0; t < n_; ++t) slots_[t].wait = Wait::kRunnable;
    for (int wi = 0; wi < nwarps_; ++wi) {
      WarpState& w = warps_[wi];
      const int lanes = std::min(32, n_ - 32 * wi);
      w.live = lanes == 32 ? ~0u : (1u << lanes) - 1;
      w.arrived = 0;
      w.gen = 0;
    }
    if (sched_.mode == Mode::kRandom) seeded_permutation(order_, sched_.seed, b, 0);
    for (int i = 0; i < n_; ++i) pos_of_[order_[i]] = i;
    ++counts_[kBlocks];
    counts_[kThreadRuns] += n_;
    if (parallel_) {
      ++block_seq_;
      tsan_release(&block_seq_);
      for (int t = 0; t < n_; ++t) slots_[t].cv.notify_one();
      done_cv_.wait(g.lk, [&] { return done_ == n_; });
      tsan_acquire(&done_);
      return;
    }
    Engine* const prev_engine = tl_engine;
    tl_engine = this;
    blockIdx = cur_block_;
    for (int t = 0; t < n_; ++t) {
      ucontext_t& ctx = fibers_[t].ctx;
      getcontext(&ctx);
      ctx.uc_stack.ss_sp = stacks_ + size_t(t) * (kFiberStack + kGuardPage) + kGuardPage;
      ctx.uc_stack.ss_size = kFiberStack;
      ctx.uc_link = nullptr;
      makecontext(&ctx, &Engine::fiber_entry, 0);
    }
    switch_to(int(order_[0]), &main_ctx_);  // returns when the last fiber has exited
    tl_engine = prev_engine;
    tl_tid = -1;
  }

  void exit_thread(int tid) {
    Guard g(*this);
    tsan_release(&done_);
    slots_[tid].wait = Wait::kDone;
    --live_;
    --running_;
    ++done_;
    WarpState& w = warps_[tid >> 5];
    w.live &= ~(1u << (tid & 31));
    // An exited thread no longer holds up a barrier (what current GPUs do for exited warps).
    if (block_arrived_ > 0 && block_arrived_ == live_) complete_block_barrier();
    if (w.arrived != 0 && w.arrived == w.live) complete_warp_barrier(w);
    if (parallel_) {
      if (done_ == n_) done_cv_.notify_one();
      else if (!abort_ && running_ == 0) deadlock();
      return;
    }
    if (done_ == n_) setcontext(&main_ctx_);
    int next = abort_ ? -1 : pick_next(tid);
    if (next < 0) {
      if (!abort_) deadlock();
      next = first_not_done();  // after an error every fiber is resumed once to unwind
    }
    switch_to(next, nullptr);
  }

  void complete_block_barrier() {
    sync_result_[block_gen_ & 1] = sync_count_[block_gen_ & 1];
    sync_arrivals_[block_gen_ & 1] = block_arrived_;
    sync_count_[(block_gen_ + 1) & 1] = 0;
    block_arrived_ = 0;
    ++block_gen_;
    ++phase_;
    ++counts_[kBlockBarriers];
    for (int t = 0; t < n_; ++t) {
      if (slots_[t].wait == Wait::kBlockBarrier) {
        slots_[t].wait = Wait::kRunnable;
        ++running_;
        if (parallel_) slots_[t].cv.notify_one();
      }
    }
    if (sched_.mode == Mode::kRandom) {
      seeded_permutation(order_, sched_.seed, cur_block_linear_, phase_);
      for (int i = 0; i < n_; ++i) pos_of_[order_[i]] = i;
    }
  }

  void complete_warp_barrier(WarpState& w) {
    w.participants[w.gen & 1] = w.arrived;
    const int base = 32 * int(&w - warps_.data());
    for (int j = 0; j < 32; ++j) {
      if ((w.arrived >> j) & 1u) {
        ThreadSlot& s = slots_[base + j];
        s.wait = Wait::kRunnable;
        ++running_;
        if (parallel_) s.cv.notify_one();
      }
    }
    w.arrived = 0;
    ++w.gen;
  }

  // Next runnable thread after `tid` in the schedule order (round robin, `tid` itself last).
  int pick_next(int tid) const {
    const int start = pos_of_[tid];
    for (int k = 1; k <= n_; ++k) {
      const int t = int(order_[(start + k) % n_]);
      if (slots_[t].wait == Wait::kRunnable) return t;
    }
    return -1;
  }
  int first_not_done() const {
    for (int t = 0; t < n_; ++t)
      if (slots_[t].wait != Wait::kDone) return t;
    return -1;
  }

  // Called after this thread arrived at a barrier (which it may have completed itself).
  void yield(Guard& g, int tid) {
    ThreadSlot& me = slots_[tid];
    if (parallel_) {
      if (me.wait != Wait::kRunnable && running_ == 0) deadlock();
      me.cv.wait(g.lk, [&] { return me.wait == Wait::kRunnable || abort_; });
    } else {
      const int next = pick_next(tid);
      if (next < 0) deadlock();
      else if (next != tid) switch_to(next, &fibers_[tid].ctx);
    }
    if (abort_) throw Aborted();
  }

  void deadlock() {
    std::map<std::string, int> waiting;
    int exited = 0;
    for (int t = 0; t < n_; ++t) {
      const ThreadSlot& s = slots_[t];
      if (s.wait == Wait::kDone) ++exited;
      else if (s.wait != Wait::kRunnable) ++waiting[site_str(s.site)];
    }
    std::string msg = "deadlock in block " + dim_str(cur_block_) + ":";
    for (const auto& kv : waiting) msg += " " + std::to_string(kv.second) + " threads wait at " + kv.first + ";";
    msg += " " + std::to_string(exited) + " threads have exited";
    record_error(kSyncError, msg);
  }

  const dim3 grid_, block_;
  const size_t smem_bytes_;
  const Schedule sched_;
  const Body body_;
  void* smem_ = nullptr;
  int n_ = 0, nwarps_ = 0;
  bool parallel_ = false;

  std::unique_ptr<ThreadSlot[]> slots_;
  std::vector<WarpState> warps_;
  std::vector<uint32_t> order_;
  std::vector<int> pos_of_;

  // fibers
  char* stacks_ = nullptr;
  size_t stacks_bytes_ = 0;
  std::unique_ptr<Fiber[]> fibers_;
  ucontext_t main_ctx_;

  // OS threads
  std::mutex m_;
  std::condition_variable done_cv_;
  std::vector<pthread_t> threads_;
  std::vector<Arg> args_;
  uint64_t block_seq_ = 0;
  bool shutdown_ = false;

  uint3 cur_block_{0, 0, 0};
  uint32_t cur_block_linear_ = 0;
  bool abort_ = false;
  int status_ = kSuccess;
  std::string error_;
  int live_ = 0, running_ = 0, done_ = 0;
  int block_arrived_ = 0, block_first_ = -1;
  Site block_site_;
  uint64_t block_gen_ = 0, phase_ = 0;
  int sync_count_[2] = {0, 0}, sync_result_[2] = {0, 0}, sync_arrivals_[2] = {0, 0};
  int64_t counts_[kNumCounters] = {};
};

inline Engine& engine(const char* what) {
  if (tl_engine == nullptr) die_outside_kernel(what);
  return *tl_engine;
}

inline int launch_impl(const void* kernel_id, dim3 grid, dim3 block, size_t smem, const Body& body) {
  if (tl_engine != nullptr)
    return set_error(kInvalidConfiguration, "launch from inside a kernel (dynamic parallelism) is not emulated");
  auto bad = [](const std::string& m) { return set_error(kInvalidConfiguration, "invalid configuration: " + m); };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0) return bad("blockDim " + dim_str(block) + " has a zero extent");
  if (block.x > 1024 || block.y > 1024 || block.z > 64)
    return bad("blockDim " + dim_str(block) + " exceeds the per-dimension limits (1024, 1024, 64)");
  if (threads > kMaxThreadsPerBlock)
    return bad("blockDim " + dim_str(block) + " has " + std::to_string(threads) + " threads, the limit is 1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return bad("gridDim " + dim_str(grid) + " has a zero extent");
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return bad("gridDim " + dim_str(grid) + " exceeds the limits (2^31-1, 65535, 65535)");
  if (uint64_t(grid.x) * grid.y * grid.z > kMaxBlocksPerLaunch)
    return bad("gridDim " + dim_str(grid) + " has more blocks than the emulator runs in one launch (2^24)");
  size_t smem_limit = kDefaultMaxDynamicSmem;
  {
    std::lock_guard<std::mutex> g(globals().config_mutex);
    auto it = globals().max_dynamic_smem.find(kernel_id);
    if (it != globals().max_dynamic_smem.end()) smem_limit = it->second;
  }
  if (smem > smem_limit)
    return bad("dynamic shared memory of " + std::to_string(smem) + " bytes exceeds the kernel's limit of " +
               std::to_string(smem_limit) + " (raise it with set_max_dynamic_smem, as cudaFuncSetAttribute does)");
  Schedule sched;
  std::string err;
  if (!current_schedule(&sched, &err)) return set_error(kInvalidValue, err);

  std::lock_guard<std::mutex> g(globals().launch_mutex);
  ::blockDim = block;
  ::gridDim = grid;
  Engine e(grid, block, smem, sched, body);
  const int rc = e.run();
  if (rc != kSuccess) return set_error(rc, e.error());
  return kSuccess;
}

template <class T>
inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp intrinsics move trivially copyable values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Exact rounding of m * 2^e2 (m < 2^64) to a binary format with kExp exponent and kMant mantissa
// bits, to nearest with ties to even, overflow to infinity: what cvt.rn does for f16/bf16.
template <int kExp, int kMant>
inline uint16_t round_to_small_float(bool negative, uint64_t m, int e2) {
  const uint16_t sign = negative ? uint16_t(1u << (kExp + kMant)) : uint16_t(0);
  if (m == 0) return sign;
  const int bias = (1 << (kExp - 1)) - 1;
  const int e = 63 - __builtin_clzll(m) + e2;  // exponent of the leading bit
  if (e > bias) return uint16_t(sign | (((1u << kExp) - 1) << kMant));  // beyond the largest binade
  const int ulp_exp = std::max(e, 1 - bias) - kMant;                   // subnormals share 2^(1-bias-kMant)
  const int shift = ulp_exp - e2;
  unsigned __int128 q;
  if (shift <= 0) {
    q = (unsigned __int128)m << -shift;
  } else if (shift >= 66) {
    q = 0;  // below a quarter of the smallest subnormal: rounds to zero
  } else {
    const unsigned __int128 wide = m;
    q = wide >> shift;
    const unsigned __int128 rem = wide & ((((unsigned __int128)1) << shift) - 1);
    const unsigned __int128 half = ((unsigned __int128)1) << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
  }
  // q carries the implicit bit for normals, so adding (biased exponent - 1) << kMant composes the
  // encoding, and a carry out of the mantissa moves to the next binade (or to infinity) by itself.
  const uint32_t base = e >= 1 - bias ? uint32_t(e + bias - 1) << kMant : 0u;
  return uint16_t(sign | (base + uint32_t(q)));
}

template <int kExp, int kMant>
inline uint16_t double_to_small_float(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  const bool neg = (u >> 63) != 0;
  const uint64_t a = u & 0x7FFFFFFFFFFFFFFFull;
  if (a > 0x7FF0000000000000ull) return 0x7FFF;  // NaN: CUDA returns the canonical NaN 0x7FFF
  if (a == 0x7FF0000000000000ull)
    return uint16_t((neg ? 1u << (kExp + kMant) : 0u) | (((1u << kExp) - 1) << kMant));
  const int be = int(a >> 52);
  const uint64_t frac = a & ((uint64_t(1) << 52) - 1);
  if (be == 0) return round_to_small_float<kExp, kMant>(neg, frac, -1074);
  return round_to_small_float<kExp, kMant>(neg, frac | (uint64_t(1) << 52), be - 1075);
}

template <int kExp, int kMant, class I>
inline uint16_t int_to_small_float(I v) {
  const bool neg = std::is_signed<I>::value && v < 0;
  const uint64_t mag = neg ? uint64_t(0) - uint64_t(v) : uint64_t(v);
  return round_to_small_float<kExp, kMant>(neg, mag, 0);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t u;
  if (exp == 0x1F) {
    u = mant ? 0x7FFFFFFFu : (sign | 0x7F800000u);  // NaN -> canonical, as cuda_fp16.hpp does
  } else if (exp == 0) {
    const float f = std::ldexp(float(mant), -24);  // exact: mant < 2^10
    return sign ? -f : f;
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;  // exact, NaN payload kept (as cuda_bf16.hpp does)
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class T>
inline T atomic_float_add(T* address, T val) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  U* p = reinterpret_cast<U*>(address);
  U old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T f;
    std::memcpy(&f, &old, sizeof f);
    f += val;
    U desired;
    std::memcpy(&desired, &f, sizeof f);
    if (__atomic_compare_exchange_n(p, &old, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      T r;
      std::memcpy(&r, &old, sizeof r);
      return r;
    }
  }
}

template <class T>
struct ArgCode {
  static_assert(std::is_pointer<T>::value || std::is_arithmetic<T>::value,
                "emulator bindings take pointers, integers, float, double or bool");
  static constexpr char value = std::is_pointer<T>::value                ? 'p'
                                : std::is_same<T, bool>::value           ? 'b'
                                : std::is_same<T, float>::value          ? 'f'
                                : std::is_floating_point<T>::value       ? 'd'
                                : sizeof(T) == 8                         ? (std::is_signed<T>::value ? 'l' : 'L')
                                : sizeof(T) == 4                         ? (std::is_signed<T>::value ? 'i' : 'I')
                                                                         : '?';
  static_assert(value != '?' && !std::is_same<T, long double>::value,
                "emulator binding integers must be 32 or 64 bits wide (use int64_t), floats float or double");
};
template <class F>
struct Signature;
template <class... A>
struct Signature<int(A...)> {
  static constexpr char value[] = {ArgCode<A>::value..., '\0'};
};

}  // namespace detail

// The emulator's kernel<<<grid, block, dynamic_smem_bytes>>>(args...): runs the whole grid before
// returning and returns a Status (0 on success; the message is in last_error()).
template <class... Params, class... Args>
inline int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "cuda_emu::launch: wrong number of kernel arguments");
  // Converted once like <<<>>> does; every thread then gets its own by-value copies.
  using Frame = std::pair<void (*)(Params...), std::tuple<typename std::decay<Params>::type...>>;
  Frame frame(kernel, std::tuple<typename std::decay<Params>::type...>(std::forward<Args>(args)...));
  const detail::Body body{[](void* f) {
                            Frame& fr = *static_cast<Frame*>(f);
                            std::apply(fr.first, fr.second);
                          },
                          &frame};
  return detail::launch_impl(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem_bytes, body);
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
template <class... Params>
inline int set_max_dynamic_smem(void (*kernel)(Params...), size_t bytes) {
  if (bytes > kMaxOptInDynamicSmem)
    return detail::set_error(kInvalidValue, "max dynamic shared memory " + std::to_string(bytes) +
                                                " exceeds the largest opt-in (227 KiB)");
  std::lock_guard<std::mutex> g(detail::globals().config_mutex);
  detail::globals().max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = bytes;
  return kSuccess;
}

// For bindings: reject bad arguments with a message that names them. Returns kInvalidValue.
inline int invalid_argument(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = detail::format(fmt, ap);
  va_end(ap);
  return detail::set_error(kInvalidValue, msg);
}

inline const char* last_error() { return detail::tl_last_error.c_str(); }

// The buffer behind STREAMSSL_EXTERN_SHARED (sized by the launch's dynamic_smem_bytes).
inline void* dynamic_smem() { return detail::engine("dynamic shared memory").smem(); }

}  // namespace cuda_emu

// An exported binding: extern "C", returns a Status, and publishes its parameter types so the
// Python loader can check calls (cuda_emu_signature_<name>).
#define CUDA_EMU_BINDING(name, ...)                                                             \
  extern "C" __attribute__((visibility("default"))) int name(__VA_ARGS__);                      \
  extern "C" __attribute__((visibility("default"))) const char* cuda_emu_signature_##name() {   \
    return ::cuda_emu::detail::Signature<decltype(name)>::value;                                \
  }                                                                                             \
  extern "C" int name(__VA_ARGS__)

// ------------------------------------------------------------------------------------------------
// Synchronisation and warp intrinsics. Default arguments record the call site for error messages.
// ------------------------------------------------------------------------------------------------
#define CUDA_EMU_SITE const char *cuda_emu_file = __builtin_FILE(), int cuda_emu_line = __builtin_LINE()
#define CUDA_EMU_AT(name) ::cuda_emu::detail::Site{name, cuda_emu_file, cuda_emu_line}

inline void __syncthreads(CUDA_EMU_SITE) {
  ::cuda_emu::detail::engine("__syncthreads").sync_block(0, CUDA_EMU_AT("__syncthreads"));
}
inline int __syncthreads_count(int pred, CUDA_EMU_SITE) {
  return ::cuda_emu::detail::engine("__syncthreads_count").sync_block(pred, CUDA_EMU_AT("__syncthreads_count")).first;
}
inline int __syncthreads_and(int pred, CUDA_EMU_SITE) {
  const auto r = ::cuda_emu::detail::engine("__syncthreads_and").sync_block(pred, CUDA_EMU_AT("__syncthreads_and"));
  return r.first == r.second;
}
inline int __syncthreads_or(int pred, CUDA_EMU_SITE) {
  return ::cuda_emu::detail::engine("__syncthreads_or").sync_block(pred, CUDA_EMU_AT("__syncthreads_or")).first != 0;
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, CUDA_EMU_SITE) {
  ::cuda_emu::detail::engine("__syncwarp")
      .warp_op(::cuda_emu::detail::WarpOp::kSyncwarp, mask, 0, 0, 0x1F, CUDA_EMU_AT("__syncwarp"));
}

#define CUDA_EMU_SHFL(fname, op, cexpr)                                                                  \
  template <class T>                                                                                     \
  inline T fname(unsigned mask, T var, int b, int width = warpSize, CUDA_EMU_SITE) {                     \
    const int c = (cexpr);                                                                               \
    return ::cuda_emu::detail::from_bits<T>(::cuda_emu::detail::engine(#fname).warp_op(                  \
        ::cuda_emu::detail::WarpOp::op, mask, ::cuda_emu::detail::to_bits(var), b, c, CUDA_EMU_AT(#fname))); \
  }
// c as cuda's sm_30_intrinsics.hpp builds it: clamp in bits 0-4, segment mask in bits 8-12.
CUDA_EMU_SHFL(__shfl_sync, kShflIdx, ((warpSize - width) << 8) | 0x1F)
CUDA_EMU_SHFL(__shfl_up_sync, kShflUp, (warpSize - width) << 8)
CUDA_EMU_SHFL(__shfl_down_sync, kShflDown, ((warpSize - width) << 8) | 0x1F)
CUDA_EMU_SHFL(__shfl_xor_sync, kShflXor, ((warpSize - width) << 8) | 0x1F)
#undef CUDA_EMU_SHFL

inline unsigned __ballot_sync(unsigned mask, int pred, CUDA_EMU_SITE) {
  return unsigned(::cuda_emu::detail::engine("__ballot_sync")
                      .warp_op(::cuda_emu::detail::WarpOp::kBallot, mask, pred != 0, 0, 0x1F,
                               CUDA_EMU_AT("__ballot_sync")));
}
inline int __any_sync(unsigned mask, int pred, CUDA_EMU_SITE) {
  return int(::cuda_emu::detail::engine("__any_sync")
                 .warp_op(::cuda_emu::detail::WarpOp::kAny, mask, pred != 0, 0, 0x1F, CUDA_EMU_AT("__any_sync")));
}
inline int __all_sync(unsigned mask, int pred, CUDA_EMU_SITE) {
  return int(::cuda_emu::detail::engine("__all_sync")
                 .warp_op(::cuda_emu::detail::WarpOp::kAll, mask, pred != 0, 0, 0x1F, CUDA_EMU_AT("__all_sync")));
}

#define CUDA_EMU_REDUCE(fname, T, op)                                                                      \
  inline T fname(unsigned mask, T value, CUDA_EMU_SITE) {                                                 \
    return T(uint32_t(::cuda_emu::detail::engine(#fname).warp_op(::cuda_emu::detail::WarpOp::op, mask,    \
                                                                  uint32_t(value), 0, 0x1F,               \
                                                                  CUDA_EMU_AT(#fname))));                  \
  }
CUDA_EMU_REDUCE(__reduce_add_sync, unsigned, kReduceAdd)
CUDA_EMU_REDUCE(__reduce_add_sync, int, kReduceAdd)
CUDA_EMU_REDUCE(__reduce_min_sync, unsigned, kReduceMinU)
CUDA_EMU_REDUCE(__reduce_min_sync, int, kReduceMin)
CUDA_EMU_REDUCE(__reduce_max_sync, unsigned, kReduceMaxU)
CUDA_EMU_REDUCE(__reduce_max_sync, int, kReduceMax)
CUDA_EMU_REDUCE(__reduce_and_sync, unsigned, kReduceAnd)
CUDA_EMU_REDUCE(__reduce_or_sync, unsigned, kReduceOr)
CUDA_EMU_REDUCE(__reduce_xor_sync, unsigned, kReduceXor)
#undef CUDA_EMU_REDUCE

[[noreturn]] inline void __trap(CUDA_EMU_SITE) { ::cuda_emu::detail::engine("__trap").trap(CUDA_EMU_AT("__trap")); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ------------------------------------------------------------------------------------------------
// Atomics (relaxed, like CUDA's atomicXxx).
// ------------------------------------------------------------------------------------------------
#define CUDA_EMU_ATOMIC_INT(T)                                                                              \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }                    \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }                    \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }                  \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }                    \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }                      \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }                    \
  inline T atomicCAS(T* a, T expected, T desired) {                                                       \
    __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);         \
    return expected;                                                                                       \
  }                                                                                                        \
  inline T atomicMax(T* a, T v) {                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                          \
    while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }                                                                                                        \
  inline T atomicMin(T* a, T v) {                                                                          \
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                          \
    while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) { \
    }                                                                                                      \
    return old;                                                                                            \
  }
CUDA_EMU_ATOMIC_INT(int)
CUDA_EMU_ATOMIC_INT(unsigned int)
CUDA_EMU_ATOMIC_INT(unsigned long long int)
CUDA_EMU_ATOMIC_INT(long long int)
#undef CUDA_EMU_ATOMIC_INT
inline float atomicAdd(float* a, float v) { return ::cuda_emu::detail::atomic_float_add(a, v); }
inline double atomicAdd(double* a, double v) { return ::cuda_emu::detail::atomic_float_add(a, v); }
inline float atomicExch(float* a, float v) {
  const uint32_t old = __atomic_exchange_n(reinterpret_cast<uint32_t*>(a), ::cuda_emu::detail::from_bits<uint32_t>(::cuda_emu::detail::to_bits(v)), __ATOMIC_RELAXED);
  float r;
  std::memcpy(&r, &old, 4);
  return r;
}
inline unsigned int atomicInc(unsigned int* a, unsigned int limit) {
  unsigned int old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(a, &old, old >= limit ? 0u : old + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// ------------------------------------------------------------------------------------------------
// Loads with cache hints, bit and integer intrinsics.
// ------------------------------------------------------------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline int __float_as_int(float x) { return ::cuda_emu::detail::from_bits<int>(::cuda_emu::detail::to_bits(x)); }
inline unsigned int __float_as_uint(float x) { return ::cuda_emu::detail::from_bits<unsigned>(::cuda_emu::detail::to_bits(x)); }
inline float __int_as_float(int x) { return ::cuda_emu::detail::from_bits<float>(::cuda_emu::detail::to_bits(x)); }
inline float __uint_as_float(unsigned int x) { return ::cuda_emu::detail::from_bits<float>(::cuda_emu::detail::to_bits(x)); }
inline long long __double_as_longlong(double x) { return ::cuda_emu::detail::from_bits<long long>(::cuda_emu::detail::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::cuda_emu::detail::from_bits<double>(::cuda_emu::detail::to_bits(x)); }

// CUDA's device-side min/max overloads (the host has no unqualified min/max).
#define CUDA_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(double(a), b); }
inline double max(float a, double b) { return std::fmax(double(a), b); }
inline double min(double a, float b) { return std::fmin(a, double(b)); }
inline double max(double a, float b) { return std::fmax(a, double(b)); }
inline unsigned int min(int a, unsigned int b) { return min(unsigned(a), b); }
inline unsigned int max(int a, unsigned int b) { return max(unsigned(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, unsigned(b)); }
inline unsigned int max(unsigned int a, int b) { return max(a, unsigned(b)); }

// ------------------------------------------------------------------------------------------------
// Math intrinsics. The fast-math ones use the precise libm function (the GPU is less accurate).
// glibc declares __expf, __sinf, ... itself, so those are macros rather than overloads.
// ------------------------------------------------------------------------------------------------
namespace cuda_emu {
namespace math {
inline float rsqrtf_(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt_(double x) { return 1.0 / std::sqrt(x); }
inline float saturatef_(float x) { return std::isnan(x) ? 0.0f : std::fmin(1.0f, std::fmax(0.0f, x)); }
inline void sincosf_(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
}  // namespace math
}  // namespace cuda_emu
#define rsqrtf(x) ::cuda_emu::math::rsqrtf_(x)
#define rsqrt(x) ::cuda_emu::math::rsqrt_(x)
#define __expf(x) ::expf(x)
#define __exp10f(x) ::powf(10.0f, (x))
#define __logf(x) ::logf(x)
#define __log2f(x) ::log2f(x)
#define __log10f(x) ::log10f(x)
#define __sinf(x) ::sinf(x)
#define __cosf(x) ::cosf(x)
#define __tanf(x) ::tanf(x)
#define __powf(x, y) ::powf((x), (y))
#define __sincosf(x, s, c) ::cuda_emu::math::sincosf_((x), (s), (c))
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return ::cuda_emu::math::saturatef_(x); }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(std::trunc(x)); }
inline int __float2int_rd(float x) { return int(std::floor(x)); }
inline int __float2int_ru(float x) { return int(std::ceil(x)); }
inline unsigned int __float2uint_rn(float x) { return unsigned(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return float(x); }
inline long long __float2ll_rn(float x) { return (long long)std::nearbyint(x); }
inline long long __double2ll_rn(double x) { return (long long)std::nearbyint(x); }
inline int __double2int_rn(double x) { return int(std::nearbyint(x)); }
inline float __double2float_rn(double x) { return float(x); }

// ------------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: 16-bit structs, bit-compatible with cuda_fp16.h / cuda_bf16.h.
// Implicit conversions and operators follow the same opt-out macros as CUDA
// (__CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_HALF_OPERATORS__, __CUDA_NO_BFLOAT16_CONVERSIONS__,
// __CUDA_NO_HALF2_OPERATORS__), which PyTorch's extension builds define. Arithmetic goes through
// float and rounds once, which is exact for + - * / (float has 24 >= 2*11+2 bits).
// ------------------------------------------------------------------------------------------------
struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

#define CUDA_EMU_SMALL_FLOAT(T, RAW, EXP, MANT, TOF, NO_CONV)                                               \
  struct alignas(2) T {                                                                                    \
    unsigned short __x;                                                                                    \
    T() = default;                                                                                         \
    constexpr T(const RAW& r) : __x(r.x) {}                                                                \
    T& operator=(const RAW& r) { __x = r.x; return *this; }                                                \
    operator RAW() const { return RAW{__x}; }                                                              \
    CUDA_EMU_IF_CONV_##NO_CONV(                                                                            \
    T(float f) : __x(::cuda_emu::detail::double_to_small_float<EXP, MANT>(f)) {}                           \
    T(double d) : __x(::cuda_emu::detail::double_to_small_float<EXP, MANT>(d)) {}                          \
    T(short v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                              \
    T(unsigned short v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                     \
    T(int v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                                \
    T(unsigned int v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                       \
    T(long v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                               \
    T(unsigned long v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                      \
    T(long long v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                          \
    T(unsigned long long v) : __x(::cuda_emu::detail::int_to_small_float<EXP, MANT>(v)) {}                 \
    operator float() const { return ::cuda_emu::detail::TOF(__x); }                                        \
    T& operator=(float f) { __x = ::cuda_emu::detail::double_to_small_float<EXP, MANT>(f); return *this; } \
    T& operator=(double d) { __x = ::cuda_emu::detail::double_to_small_float<EXP, MANT>(d); return *this; })\
  };

#if defined(__CUDA_NO_HALF_CONVERSIONS__)
#define CUDA_EMU_IF_CONV_HALF(...)
#else
#define CUDA_EMU_IF_CONV_HALF(...) __VA_ARGS__
#endif
#if defined(__CUDA_NO_BFLOAT16_CONVERSIONS__)
#define CUDA_EMU_IF_CONV_BF16(...)
#else
#define CUDA_EMU_IF_CONV_BF16(...) __VA_ARGS__
#endif
CUDA_EMU_SMALL_FLOAT(__half, __half_raw, 5, 10, half_bits_to_float, HALF)
CUDA_EMU_SMALL_FLOAT(__nv_bfloat16, __nv_bfloat16_raw, 8, 7, bf16_bits_to_float, BF16)
#undef CUDA_EMU_SMALL_FLOAT
#undef CUDA_EMU_IF_CONV_HALF
#undef CUDA_EMU_IF_CONV_BF16
static_assert(sizeof(__half) == 2 && std::is_trivial<__half>::value, "__half must be a trivial 16-bit type");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivial<__nv_bfloat16>::value, "bf16 must be trivial");

typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __ushort_as_half(unsigned short v) { return __half_raw{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __short_as_half(short v) { return __half_raw{(unsigned short)v}; }
inline short __half_as_short(__half h) { return short(h.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16_raw{v}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short v) { return __nv_bfloat16_raw{(unsigned short)v}; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return short(h.__x); }

inline __half __float2half(float f) { return __half_raw{::cuda_emu::detail::double_to_small_float<5, 10>(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __half_raw{::cuda_emu::detail::double_to_small_float<5, 10>(d)}; }
inline __half __int2half_rn(int v) { return __half_raw{::cuda_emu::detail::int_to_small_float<5, 10>(v)}; }
inline __half __ll2half_rn(long long v) { return __half_raw{::cuda_emu::detail::int_to_small_float<5, 10>(v)}; }
inline float __half2float(__half h) { return ::cuda_emu::detail::half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16_raw{::cuda_emu::detail::double_to_small_float<8, 7>(f)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) {
  return __nv_bfloat16_raw{::cuda_emu::detail::double_to_small_float<8, 7>(d)};
}
inline __nv_bfloat16 __int2bfloat16_rn(int v) { return __nv_bfloat16_raw{::cuda_emu::detail::int_to_small_float<8, 7>(v)}; }
inline __nv_bfloat16 __ll2bfloat16_rn(long long v) {
  return __nv_bfloat16_raw{::cuda_emu::detail::int_to_small_float<8, 7>(v)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return ::cuda_emu::detail::bf16_bits_to_float(h.__x); }

inline __half2 make_half2(__half x, __half y) { return __half2{x, y}; }
inline __half2 __halves2half2(__half x, __half y) { return __half2{x, y}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline __half2 __float2half2_rn(float f) { return __floats2half2_rn(f, f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162{x, y}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 x, __nv_bfloat16 y) { return __nv_bfloat162{x, y}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return __floats2bfloat162_rn(f, f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }

// Half-precision arithmetic and comparisons (functions always; operators unless opted out). The
// exact result rounded to double and then to 16 bits is the correctly rounded 16-bit result for
// + - * / (53 >= 2*11+2), which is what the GPU computes.
#define CUDA_EMU_SMALL_FLOAT_MATH(T, TOF, FROMD)                                                     \
  inline T __hadd(T a, T b) { return FROMD(double(TOF(a)) + TOF(b)); }                             \
  inline T __hsub(T a, T b) { return FROMD(double(TOF(a)) - TOF(b)); }                             \
  inline T __hmul(T a, T b) { return FROMD(double(TOF(a)) * TOF(b)); }                             \
  inline T __hdiv(T a, T b) { return FROMD(double(TOF(a)) / TOF(b)); }                             \
  inline T __hfma(T a, T b, T c) { return FROMD(std::fma(double(TOF(a)), double(TOF(b)), double(TOF(c)))); } \
  inline T __hneg(T a) { T r = a; r.__x ^= 0x8000; return r; }                                     \
  inline T __habs(T a) { T r = a; r.__x &= 0x7FFF; return r; }                                     \
  inline bool __hisnan(T a) { return std::isnan(TOF(a)); }                                          \
  inline bool __hisinf(T a) { return std::isinf(TOF(a)); }                                          \
  /* ordered comparisons are false on NaN, the ...u forms true */                                   \
  inline bool __heq(T a, T b) { return TOF(a) == TOF(b); }                                          \
  inline bool __hne(T a, T b) { return TOF(a) < TOF(b) || TOF(a) > TOF(b); }                        \
  inline bool __hlt(T a, T b) { return TOF(a) < TOF(b); }                                           \
  inline bool __hle(T a, T b) { return TOF(a) <= TOF(b); }                                          \
  inline bool __hgt(T a, T b) { return TOF(a) > TOF(b); }                                           \
  inline bool __hge(T a, T b) { return TOF(a) >= TOF(b); }                                          \
  inline bool __hequ(T a, T b) { return !__hne(a, b); }                                             \
  inline bool __hneu(T a, T b) { return !__heq(a, b); }                                             \
  inline bool __hltu(T a, T b) { return !__hge(a, b); }                                            \
  inline bool __hleu(T a, T b) { return !__hgt(a, b); }                                            \
  inline bool __hgtu(T a, T b) { return !__hle(a, b); }                                            \
  inline bool __hgeu(T a, T b) { return !__hlt(a, b); }                                            \
  /* NaN loses to a number, two NaNs give the canonical NaN, and +0 > -0 */                        \
  inline T __hmax(T a, T b) {                                                                       \
    if (__hisnan(a) && __hisnan(b)) { T r; r.__x = 0x7FFF; return r; }                              \
    if (__hisnan(a) || __hlt(a, b)) return b;                                                       \
    if (__hisnan(b) || __hgt(a, b)) return a;                                                       \
    return (a.__x & 0x8000) ? b : a;                                                                \
  }                                                                                                 \
  inline T __hmin(T a, T b) {                                                                       \
    if (__hisnan(a) && __hisnan(b)) { T r; r.__x = 0x7FFF; return r; }                              \
    if (__hisnan(a) || __hgt(a, b)) return b;                                                       \
    if (__hisnan(b) || __hlt(a, b)) return a;                                                       \
    return (a.__x & 0x8000) ? a : b;                                                                \
  }
CUDA_EMU_SMALL_FLOAT_MATH(__half, __half2float, __double2half)
CUDA_EMU_SMALL_FLOAT_MATH(__nv_bfloat16, __bfloat162float, __double2bfloat16)
#undef CUDA_EMU_SMALL_FLOAT_MATH

#define CUDA_EMU_SMALL_FLOAT_OPS(T)                                                 \
  inline T operator+(const T& a, const T& b) { return __hadd(a, b); }              \
  inline T operator-(const T& a, const T& b) { return __hsub(a, b); }              \
  inline T operator*(const T& a, const T& b) { return __hmul(a, b); }              \
  inline T operator/(const T& a, const T& b) { return __hdiv(a, b); }              \
  inline T& operator+=(T& a, const T& b) { return a = __hadd(a, b); }              \
  inline T& operator-=(T& a, const T& b) { return a = __hsub(a, b); }              \
  inline T& operator*=(T& a, const T& b) { return a = __hmul(a, b); }              \
  inline T& operator/=(T& a, const T& b) { return a = __hdiv(a, b); }              \
  inline T operator-(const T& a) { return __hneg(a); }                             \
  inline T operator+(const T& a) { return a; }                                     \
  inline bool operator==(const T& a, const T& b) { return __heq(a, b); }           \
  inline bool operator!=(const T& a, const T& b) { return __hneu(a, b); }          \
  inline bool operator<(const T& a, const T& b) { return __hlt(a, b); }            \
  inline bool operator<=(const T& a, const T& b) { return __hle(a, b); }           \
  inline bool operator>(const T& a, const T& b) { return __hgt(a, b); }            \
  inline bool operator>=(const T& a, const T& b) { return __hge(a, b); }
#if !defined(__CUDA_NO_HALF_OPERATORS__)
CUDA_EMU_SMALL_FLOAT_OPS(__half)
#endif
#if !defined(__CUDA_NO_BFLOAT16_OPERATORS__)
CUDA_EMU_SMALL_FLOAT_OPS(__nv_bfloat16)
#endif
#undef CUDA_EMU_SMALL_FLOAT_OPS
