// Stub for the llmcu CPU emulator: shim.h (force-included) already provides CUDA's
// pipeline primitives (__pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior:
// cp.async, whose copies land only at the covering wait there); this file only keeps
// `#include <cuda_pipeline.h>` working.
#pragma once
