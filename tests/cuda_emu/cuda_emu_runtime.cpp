// The emulator's C API, compiled once into every emulator library (tests/cuda_emu/build.py adds
// it). Python reads errors and picks the schedule through these.
#include "cuda_emu.h"

#define CUDA_EMU_API extern "C" __attribute__((visibility("default")))

// Message of the last failed launch or binding argument check on the calling thread.
CUDA_EMU_API const char* cuda_emu_last_error() { return cuda_emu::last_error(); }

// Overrides $CUDA_EMU_SCHEDULE for this library; NULL or "" goes back to the environment.
CUDA_EMU_API int cuda_emu_set_schedule(const char* spec) {
  using namespace cuda_emu::detail;
  Schedule s;
  std::string err;
  if (spec != nullptr && *spec != '\0' && !parse_schedule(spec, &s, &err)) return set_error(cuda_emu::kInvalidValue, err);
  std::lock_guard<std::mutex> g(globals().config_mutex);
  globals().has_override = spec != nullptr && *spec != '\0';
  globals().override_schedule = s;
  return cuda_emu::kSuccess;
}

// The schedule the next launch will use, as text (thread-local storage, valid until the next call).
CUDA_EMU_API const char* cuda_emu_schedule() {
  using namespace cuda_emu::detail;
  static thread_local std::string name;
  Schedule s;
  std::string err;
  if (!current_schedule(&s, &err)) {
    set_error(cuda_emu::kInvalidValue, err);
    return nullptr;
  }
  name = schedule_name(s);
  return name.c_str();
}

// The override set by cuda_emu_set_schedule(), or NULL when the environment decides.
CUDA_EMU_API const char* cuda_emu_schedule_override() {
  using namespace cuda_emu::detail;
  static thread_local std::string name;
  std::lock_guard<std::mutex> g(globals().config_mutex);
  if (!globals().has_override) return nullptr;
  name = schedule_name(globals().override_schedule);
  return name.c_str();
}

// Cumulative counters: launches, blocks, thread runs, block barriers, warp intrinsic calls, token
// passes. Writes min(n, 6) values; returns how many exist.
CUDA_EMU_API int cuda_emu_counters(int64_t* out, int64_t n) {
  using namespace cuda_emu::detail;
  for (int64_t i = 0; i < n && i < kNumCounters; ++i) out[i] = globals().counters[i].load();
  return kNumCounters;
}
