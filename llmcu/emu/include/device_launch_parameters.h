// Stub for the llmcu CPU emulator: shim.h (force-included) already provides
// what this CUDA header would; this file only keeps `#include <device_launch_parameters.h>` working.
#pragma once
