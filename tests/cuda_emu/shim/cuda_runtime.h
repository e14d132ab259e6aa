// Emulator stand-in for CUDA's <cuda_runtime.h>, so kernel headers that include it compile with g++.
#pragma once
#include "cuda_emu.h"
