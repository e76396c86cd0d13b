// CUDA's pipeline primitives (cuda_pipeline_primitives.h) for the llmcu CPU emulator:
// cp.async from global to shared memory, in groups. On the GPU each copy lands at some
// moment between __pipeline_memcpy_async and the __pipeline_wait_prior that covers it;
// here (LLMCU_EMU_CP_ASYNC=late, the default) the destination reads as NaN (0xFF bytes)
// for that whole window and gets the data at the wait, so a kernel that reads too early,
// or refills a buffer other warps still read, fails its tests. LLMCU_EMU_CP_ASYNC=eager
// copies at issue instead. See runtime.cpp (emu_cp_async).
#pragma once

// Copy size_and_align bytes (4, 8 or 16, both addresses aligned to it) from global memory
// to this block's shared memory (checked); the last zfill bytes of the destination become
// zeros instead of the source's.
inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                    size_t size_and_align, size_t zfill = 0) {
    emu_cp_async(dst_shared, src_global, size_and_align, zfill, EMU_STATIC_SHARED_KNOWN);
}
// Close this thread's group of copies (PTX cp.async.commit_group).
inline void __pipeline_commit() { emu_cp_async_commit(); }
// Wait until at most `prior` of this thread's newest committed groups are in flight
// (PTX cp.async.wait_group prior); copies not yet committed are not waited for.
inline void __pipeline_wait_prior(size_t prior) { emu_cp_async_wait(prior); }
