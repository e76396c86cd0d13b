// Stub for the llmcu CPU emulator: shim.h (force-included) already provides
// what this CUDA header would; this file only keeps `#include <cuda_runtime.h>` working.
#pragma once
