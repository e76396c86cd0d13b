// assert.h for the llmcu CPU emulator (found before the system's on the -I
// path, so `#include <assert.h>`/<cassert> in a kernel, which re-defines
// assert, still gets this one): a failed device-side assert becomes a launch
// error (EmuError naming the thread and line), not a process abort. Like the
// C header it has no include guard: assert follows NDEBUG at each include.
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : emu_device_assert(#e, __FILE__, __LINE__))
#endif
