// The emulator's launch policy for the launch sequences of csrc/cuda/*.cuh (the counterpart of
// StreamLaunch in csrc/cuda/launch_config.h). Include after cuda_emu.h.
#pragma once

#include "cuda/launch_config.h"

struct EmuLaunch {
  template <typename Kernel, typename Args>
  int operator()(Kernel kernel, const streamssl::cuda::LaunchConfig& c, const Args& args) const {
    return cuda_emu::launch(kernel, c.grid, c.block, c.smem, args);
  }
};
