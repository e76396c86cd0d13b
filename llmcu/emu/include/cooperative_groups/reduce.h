// Stub for the llmcu CPU emulator: the include works, but cooperative groups
// are not emulated, so code that uses cg:: fails to compile (never runs
// wrongly). The project's kernels use plain warp intrinsics instead.
#pragma once
