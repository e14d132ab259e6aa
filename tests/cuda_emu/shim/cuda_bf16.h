// Emulator stand-in for CUDA's <cuda_bf16.h>, so kernel headers that include it compile with g++.
#pragma once
#include "cuda_emu.h"
