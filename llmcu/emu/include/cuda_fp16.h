// Stub for the llmcu CPU emulator: the include works, but __half is not
// emulated, so code that uses it fails to compile (never runs wrongly).
#pragma once
