// shim.h: CUDA's device-side API for plain C++, force-included (g++ -include)
// before a kernel .cu by llmcu.emu, so the unmodified kernel source runs on the
// CPU. Every CUDA thread of a block is a fiber (runtime.cpp); blocks run one
// after another on the calling OS thread.
//
// What is modelled: threadIdx/blockIdx/blockDim/gridDim, __syncthreads (and
// _count/_and/_or), warp shuffles/votes/__syncwarp among the lanes of a warp,
// static __shared__ (a function-static: one copy, blocks run in sequence),
// dynamic shared memory through emu_dynamic_shared() (0xFF-filled per block),
// atomics (plain read-modify-write: one OS thread), CUDA math and integer
// intrinsics, vector types, __nv_bfloat16.
//
// What is not: blocks running concurrently (inter-block spin-waits, grid
// sync), intra-block spin-waits/locks (fibers switch only at barriers and warp
// operations, so a spin loop never ends), the GPU memory model and exact GPU
// arithmetic, launch limits beyond the block size, inline PTX, tensor cores,
// textures, host-set __constant__, cooperative groups, __half. cp.async is
// modelled through CUDA's pipeline primitives (__pipeline_memcpy_async, below): a copy
// lands only at the wait that covers it, its destination NaN-poisoned until then
// (LLMCU_EMU_CP_ASYNC=late, the default; =eager copies at issue).
// Unsupported features fail to compile rather than run wrongly.
// Fibers do not save the x87/MXCSR control words: kernels must not change the
// floating-point rounding mode.
#ifndef LLMCU_EMU_SHIM_H
#define LLMCU_EMU_SHIM_H

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>
#include <utility>

#define LLMCU_EMU 1
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
// The arch the project targets (H100): code paths chosen by __CUDA_ARCH__ are
// the ones the GPU runs. Override with -D__CUDA_ARCH__=800.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

// ---------------------------------------------------------------------------
// Qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline  // not always_inline: see EMULATION.md pitfall 4
#define __inline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __grid_constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
// Function-static: one copy per kernel, shared by the fibers of the running
// block (blocks run one after another). `extern __shared__ T a[];` does not
// compile (extern static): use DYNAMIC_SHARED from kernels/common.cuh.
// All of them live in one linker section, which the runtime fills with 0xFF
// bytes before every block, as it does dynamic shared memory: a read of
// shared memory the block has not written gives NaN (or -1), not a stale or
// zero value that happens to work. g++ ignores the attribute in template
// functions (each such static gets a .bss._ZZ<name> section of its own):
// emu_shared.ld gathers those into emu_shared_t, refilled the same way. Under AddressSanitizer they stay plain
// statics (ASan puts no redzones around globals in named sections), and in
// files where g++ refuses the section ("section type conflict": __shared__ in
// an inline function or template beside one in a plain function) the
// launcher rebuilds with -DLLMCU_EMU_PLAIN_SHARED: no poisoning there.
#if defined(__SANITIZE_ADDRESS__) || defined(LLMCU_EMU_PLAIN_SHARED)
#define __shared__ static
#else
#define __shared__ static __attribute__((section("emu_shared")))
#endif
#define __constant__ static

// ---------------------------------------------------------------------------
// Vector types and dim3
#define EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    inline N##2 make_##N##2(T x, T y) { N##2 v; v.x = x; v.y = y; return v; }
#define EMU_VEC3(T, N) struct N##3 { T x, y, z; }; \
    inline N##3 make_##N##3(T x, T y, T z) { N##3 v; v.x = x; v.y = y; v.z = z; return v; }
#define EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    inline N##4 make_##N##4(T x, T y, T z, T w) { N##4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
#define EMU_VEC(T, N, A2, A4) EMU_VEC2(T, N, A2) EMU_VEC3(T, N) EMU_VEC4(T, N, A4)
EMU_VEC(signed char, char, 2, 4)
EMU_VEC(unsigned char, uchar, 2, 4)
EMU_VEC(short, short, 4, 8)
EMU_VEC(unsigned short, ushort, 4, 8)
EMU_VEC(int, int, 8, 16)
EMU_VEC(unsigned int, uint, 8, 16)
EMU_VEC(long long, longlong, 16, 16)
EMU_VEC(unsigned long long, ulonglong, 16, 16)
EMU_VEC(float, float, 8, 16)
EMU_VEC(double, double, 16, 16)
#undef EMU_VEC
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The launcher passes grid and block as three uint32 each.
struct emu_dim3 { unsigned int x, y, z; };

// Built-in variables: the running fiber's values, kept in globals by the
// scheduler (it updates them on every switch), so threadIdx.x is one load.
extern uint3 emu_g_threadIdx;
extern uint3 emu_g_blockIdx;
extern dim3 emu_g_blockDim;
extern dim3 emu_g_gridDim;
#define threadIdx (static_cast<const uint3&>(emu_g_threadIdx))
#define blockIdx (static_cast<const uint3&>(emu_g_blockIdx))
#define blockDim (static_cast<const dim3&>(emu_g_blockDim))
#define gridDim (static_cast<const dim3&>(emu_g_gridDim))
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Runtime entry points (runtime.cpp)
void* emu_dynamic_shared();
int emu_block_sync(int kind, int pred, const char* file, int line);
struct emu_warp_result {
    const unsigned long long* vals;  // this operation's 32 published values
    unsigned int written;            // lanes that published (arrived)
    unsigned int lane;               // the caller's lane
};
emu_warp_result emu_warp_exchange(int kind, unsigned int mask, unsigned long long value,
                                  const char* file, int line);
[[noreturn]] void emu_bad_lane(const char* op, int src, const char* file, int line);
[[noreturn]] void emu_device_assert(const char* expr, const char* file, int line);
unsigned int emu_active_mask();
// Shared-memory operands of instructions the emulator writes out (ldmatrix, cp.async): the
// address must lie in this block's shared memory (dynamic or static) and be `align`-byte
// aligned, or the launch fails naming `what` and the line (on a GPU: a misaligned-address
// fault or a garbage address). Static __shared__ cannot be told apart from other statics
// in ASan and plain-shared builds (see __shared__ above), so there only dynamic shared
// memory counts as known and other addresses pass.
#if defined(__SANITIZE_ADDRESS__) || defined(LLMCU_EMU_PLAIN_SHARED)
#define EMU_STATIC_SHARED_KNOWN 0
#else
#define EMU_STATIC_SHARED_KNOWN 1
#endif
void emu_check_shared(const void* p, size_t bytes, size_t align, int static_known, const char* what,
                      const char* file, int line);
#define EMU_CHECK_SHARED(p, bytes, align, what) \
    emu_check_shared((p), (bytes), (align), EMU_STATIC_SHARED_KNOWN, (what), __FILE__, __LINE__)
// cp.async (the pipeline primitives below; runtime.cpp says how copies land: LLMCU_EMU_CP_ASYNC)
void emu_cp_async(void* dst, const void* src, size_t bytes, size_t zfill, int static_known);
void emu_cp_async_commit();
void emu_cp_async_wait(size_t prior);
// CUDA's pipeline primitives (cuda_pipeline_primitives.h): cp.async from global to shared
// memory, in groups. On the GPU each copy lands at some moment between
// __pipeline_memcpy_async and the __pipeline_wait_prior that covers it; here
// (LLMCU_EMU_CP_ASYNC=late, the default) the destination reads as NaN (0xFF bytes) for that
// whole window and gets the data at the wait, so a kernel that reads too early, or refills
// a buffer other warps still read, fails its tests; LLMCU_EMU_CP_ASYNC=eager copies at issue.
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

enum { EMU_SYNC_PLAIN = 0, EMU_SYNC_COUNT = 1, EMU_SYNC_AND = 2, EMU_SYNC_OR = 3 };
enum { EMU_WARP_SHFL = 0, EMU_WARP_VOTE = 1, EMU_WARP_SYNC = 2, EMU_WARP_REDUCE = 3 };

// ---------------------------------------------------------------------------
// Barriers (the call site is recorded for divergence/deadlock messages)
#define __syncthreads() ((void)emu_block_sync(EMU_SYNC_PLAIN, 1, __FILE__, __LINE__))
#define __syncthreads_count(p) emu_block_sync(EMU_SYNC_COUNT, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_and(p) emu_block_sync(EMU_SYNC_AND, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_or(p) emu_block_sync(EMU_SYNC_OR, (p) != 0, __FILE__, __LINE__)
#define __syncwarp(...) emu_syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
inline void emu_syncwarp(const char* file, int line, unsigned int mask = 0xffffffffu) {
    emu_warp_exchange(EMU_WARP_SYNC, mask, 0, file, line);
}
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline unsigned int __activemask() { return emu_active_mask(); }

// ---------------------------------------------------------------------------
// Warp shuffles: every lane publishes its value in the warp's exchange area,
// one warp barrier, then each lane reads its source lane. Source-lane rules
// follow the CUDA programming guide (width segments; out-of-segment sources
// return the caller's own value). Reading a lane that exited, that is not in
// the mask, or that does not exist (partial warp) is an error.
template <class T>
inline unsigned long long emu_to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "emu: warp shuffles support trivially copyable types of at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T emu_shfl_read(const emu_warp_result& r, int src, T own, const char* op, const char* file, int line) {
    if (src == (int)r.lane) return own;
    if (!((r.written >> src) & 1u)) emu_bad_lane(op, src, file, line);
    T out;
    memcpy(&out, &r.vals[src], sizeof(T));
    return out;
}
template <class T>
inline T emu_shfl_xor(const char* file, int line, unsigned int mask, T v, int laneMask, int width = 32) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_SHFL, mask, emu_to_bits(v), file, line);
    int lane = (int)r.lane, src = lane ^ laneMask;
    if (src >= (lane / width + 1) * width || src < 0) src = lane;
    return emu_shfl_read(r, src, v, "__shfl_xor_sync", file, line);
}
template <class T>
inline T emu_shfl_down(const char* file, int line, unsigned int mask, T v, unsigned int delta, int width = 32) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_SHFL, mask, emu_to_bits(v), file, line);
    int lane = (int)r.lane, src = lane + (int)delta;
    if (src >= (lane / width + 1) * width) src = lane;
    return emu_shfl_read(r, src, v, "__shfl_down_sync", file, line);
}
template <class T>
inline T emu_shfl_up(const char* file, int line, unsigned int mask, T v, unsigned int delta, int width = 32) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_SHFL, mask, emu_to_bits(v), file, line);
    int lane = (int)r.lane, src = lane - (int)delta;
    if (src < (lane / width) * width) src = lane;
    return emu_shfl_read(r, src, v, "__shfl_up_sync", file, line);
}
template <class T>
inline T emu_shfl_idx(const char* file, int line, unsigned int mask, T v, int srcLane, int width = 32) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_SHFL, mask, emu_to_bits(v), file, line);
    int lane = (int)r.lane, src = (lane / width) * width + (srcLane & (width - 1));
    return emu_shfl_read(r, src, v, "__shfl_sync", file, line);
}
#define __shfl_xor_sync(...) emu_shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) emu_shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) emu_shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(...) emu_shfl_idx(__FILE__, __LINE__, __VA_ARGS__)

inline unsigned int emu_ballot(const char* file, int line, unsigned int mask, int pred) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_VOTE, mask, pred != 0, file, line);
    unsigned int out = 0;
    for (int i = 0; i < 32; i++)
        if (((r.written >> i) & 1u) && r.vals[i]) out |= 1u << i;
    return out;
}
inline int emu_all(const char* file, int line, unsigned int mask, int pred) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_VOTE, mask, pred != 0, file, line);
    for (int i = 0; i < 32; i++)
        if (((r.written >> i) & 1u) && !r.vals[i]) return 0;
    return 1;
}
#define __ballot_sync(m, p) emu_ballot(__FILE__, __LINE__, (m), (p))
#define __any_sync(m, p) (emu_ballot(__FILE__, __LINE__, (m), (p)) != 0u)
#define __all_sync(m, p) emu_all(__FILE__, __LINE__, (m), (p))

template <class T, class Op>
inline T emu_warp_reduce(const char* file, int line, unsigned int mask, T v, Op op) {
    emu_warp_result r = emu_warp_exchange(EMU_WARP_REDUCE, mask, emu_to_bits(v), file, line);
    bool first = true;
    T acc = v;
    for (int i = 0; i < 32; i++) {
        if (!((r.written >> i) & 1u)) continue;
        T x;
        memcpy(&x, &r.vals[i], sizeof(T));
        acc = first ? x : op(acc, x);
        first = false;
    }
    return acc;
}
template <class T> inline T emu_add(T a, T b) { return a + b; }
template <class T> inline T emu_min2(T a, T b) { return b < a ? b : a; }
template <class T> inline T emu_max2(T a, T b) { return a < b ? b : a; }
#define __reduce_add_sync(m, v) emu_warp_reduce(__FILE__, __LINE__, (m), (v), emu_add<decltype(+(v))>)
#define __reduce_min_sync(m, v) emu_warp_reduce(__FILE__, __LINE__, (m), (v), emu_min2<decltype(+(v))>)
#define __reduce_max_sync(m, v) emu_warp_reduce(__FILE__, __LINE__, (m), (v), emu_max2<decltype(+(v))>)

// Device-side assert: include/assert.h (the emulator's own, first on the -I
// path) makes a failed one a launch error (EmuError), not a process abort.
#include <assert.h>

// ---------------------------------------------------------------------------
// min/max: CUDA's global overloads, including its mixed signed/unsigned ones.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long long min(long long a, unsigned long long b) { return min((unsigned long long)a, b); }
inline unsigned long long max(long long a, unsigned long long b) { return max((unsigned long long)a, b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, (unsigned long long)b); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, (unsigned long long)b); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin((double)a, b); }
inline double max(float a, double b) { return fmax((double)a, b); }
inline double min(double a, float b) { return fmin(a, (double)b); }
inline double max(double a, float b) { return fmax(a, (double)b); }

// ---------------------------------------------------------------------------
// Math intrinsics (glibc's functions: a few ulp away from CUDA's)
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned int __float2uint_rn(float x) { return (unsigned int)nearbyintf(x); }
inline unsigned int __float2uint_rz(float x) { return (unsigned int)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned int x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned int __float_as_uint(float x) { unsigned int i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned int i) { float x; memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; memcpy(&x, &i, 8); return x; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    unsigned int r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned int __umul24(unsigned int a, unsigned int b) { return a * b; }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
inline void __nanosleep(unsigned int) {}

// Cache-hinted loads and stores are plain accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------
// __nv_bfloat16: 16-bit storage, float arithmetic, round-to-nearest-even.
inline unsigned short emu_f2bf_bits(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float emu_bf_bits2f(unsigned short b) {
    unsigned int u = (unsigned int)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu_f2bf_bits(f)) {}
    __nv_bfloat16(double f) : __x(emu_f2bf_bits((float)f)) {}
    __nv_bfloat16(int i) : __x(emu_f2bf_bits((float)i)) {}
    __nv_bfloat16(unsigned int i) : __x(emu_f2bf_bits((float)i)) {}
    __nv_bfloat16(long long i) : __x(emu_f2bf_bits((float)i)) {}
    operator float() const { return emu_bf_bits2f(__x); }
    __nv_bfloat16& operator+=(const __nv_bfloat16& o) { *this = __nv_bfloat16((float)*this + (float)o); return *this; }
    __nv_bfloat16& operator-=(const __nv_bfloat16& o) { *this = __nv_bfloat16((float)*this - (float)o); return *this; }
    __nv_bfloat16& operator*=(const __nv_bfloat16& o) { *this = __nv_bfloat16((float)*this * (float)o); return *this; }
    __nv_bfloat16& operator/=(const __nv_bfloat16& o) { *this = __nv_bfloat16((float)*this / (float)o); return *this; }
};
typedef __nv_bfloat16 nv_bfloat16;
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __nv_bfloat162 nv_bfloat162;
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a + (float)b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a - (float)b); }
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a * (float)b); }
inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __nv_bfloat16((float)a / (float)b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { __nv_bfloat16 r; r.__x = (unsigned short)(a.__x ^ 0x8000u); return r; }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a == (float)b; }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a != (float)b; }
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a < (float)b; }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a <= (float)b; }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a > (float)b; }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a >= (float)b; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu_bf_bits2f(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 r; r.__x = u; return r; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { __nv_bfloat162 r; r.x = __nv_bfloat16(a); r.y = __nv_bfloat16(b); return r; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return make_float2((float)v.x, (float)v.y); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)a < (float)b ? b : a; }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return (float)b < (float)a ? b : a; }

// ---------------------------------------------------------------------------
// Atomics: one OS thread runs the grid, and a fiber switches only at a
// barrier or warp operation, so a plain read-modify-write is atomic.
#define EMU_ATOMIC_RMW(NAME, T, EXPR) inline T NAME(T* p, T v) { T old = *p; *p = (EXPR); return old; }
#define EMU_ATOMIC_ALL(NAME, EXPR) \
    EMU_ATOMIC_RMW(NAME, int, EXPR) EMU_ATOMIC_RMW(NAME, unsigned int, EXPR) \
    EMU_ATOMIC_RMW(NAME, unsigned long long, EXPR) EMU_ATOMIC_RMW(NAME, long long, EXPR)
EMU_ATOMIC_ALL(atomicAdd, old + v)
EMU_ATOMIC_RMW(atomicAdd, float, old + v)
EMU_ATOMIC_RMW(atomicAdd, double, old + v)
EMU_ATOMIC_RMW(atomicAdd, __nv_bfloat16, __nv_bfloat16((float)old + (float)v))
EMU_ATOMIC_ALL(atomicSub, old - v)
EMU_ATOMIC_ALL(atomicExch, v)
EMU_ATOMIC_RMW(atomicExch, float, v)
EMU_ATOMIC_ALL(atomicMin, v < old ? v : old)
EMU_ATOMIC_ALL(atomicMax, old < v ? v : old)
EMU_ATOMIC_ALL(atomicAnd, old & v)
EMU_ATOMIC_ALL(atomicOr, old | v)
EMU_ATOMIC_ALL(atomicXor, old ^ v)
EMU_ATOMIC_RMW(atomicInc, unsigned int, old >= v ? 0u : old + 1u)
EMU_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > v) ? v : old - 1u)
#undef EMU_ATOMIC_ALL
#undef EMU_ATOMIC_RMW
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicExch_block atomicExch
#define atomicCAS_block atomicCAS

// ---------------------------------------------------------------------------
// Launch glue used by the generated translation unit: EMU_ENTRY(kernel)
// exports `int emu_entry_<kernel>(grid, block, shmem, args)` (args as for
// cudaLaunchKernel: one pointer per parameter, to the parameter's value) and
// `const char* emu_sig_<kernel>()`, the parameter types as the compiler sees
// them, which the Python side checks arguments against.
typedef void (*emu_body_fn)(void** args);
int emu_launch(const char* name, const emu_dim3* grid, const emu_dim3* block, size_t shmem,
               void** args, emu_body_fn body);

template <class T>
struct emu_type_code {
    typedef typename std::remove_cv<T>::type U;
    static const char* get() {
        if (std::is_same<U, __nv_bfloat16>::value) return "bf16";
        if (std::is_same<U, float>::value) return "f32";
        if (std::is_same<U, double>::value) return "f64";
        if (std::is_same<U, bool>::value) return "b8";
        if (std::is_integral<U>::value) {
            bool s = std::is_signed<U>::value;
            switch (sizeof(U)) {
                case 1: return s ? "i8" : "u8";
                case 2: return s ? "i16" : "u16";
                case 4: return s ? "i32" : "u32";
                case 8: return s ? "i64" : "u64";
            }
        }
        if (std::is_void<U>::value) return "void";
        if (std::is_pointer<U>::value) return "ptr";
        return "other";
    }
};
template <class T>
const char* emu_param_code() {
    typedef typename std::remove_cv<typename std::remove_reference<T>::type>::type U;
    static char buf[48];
    if (std::is_pointer<U>::value)
        snprintf(buf, sizeof buf, "p:%s", emu_type_code<typename std::remove_pointer<U>::type>::get());
    else
        snprintf(buf, sizeof buf, "s:%s:%zu", emu_type_code<U>::get(), sizeof(U));
    return buf;
}
template <class F> struct emu_sig;
template <class... P>
struct emu_sig<void(P...)> {
    static constexpr size_t n = sizeof...(P);
    static const char* get() {
        static char buf[4096];
        buf[0] = 0;
        const char* codes[] = {emu_param_code<P>()..., ""};
        // emu_param_code returns a per-type static buffer: copy each now.
        size_t used = 0;
        for (size_t i = 0; i < n; i++) {
            used += snprintf(buf + used, sizeof buf - used, "%s%s", i ? " " : "", codes[i]);
            if (used >= sizeof buf) break;
        }
        return buf;
    }
    template <size_t... I>
    static void call(void (*f)(P...), void** a, std::index_sequence<I...>) {
        f(*static_cast<typename std::remove_reference<P>::type*>(a[I])...);
    }
};
template <auto F>
void emu_body(void** a) {
    typedef emu_sig<typename std::remove_pointer<decltype(F)>::type> S;
    S::call(F, a, std::make_index_sequence<S::n>{});
}
#define EMU_ENTRY(K)                                                                          \
    extern "C" __attribute__((visibility("default"))) int emu_entry_##K(                      \
        const emu_dim3* g, const emu_dim3* b, size_t shmem, void** args) {                     \
        return emu_launch(#K, g, b, shmem, args, &emu_body<&K>);                              \
    }                                                                                          \
    extern "C" __attribute__((visibility("default"))) const char* emu_sig_##K() {             \
        return emu_sig<typename std::remove_pointer<decltype(&K)>::type>::get();               \
    }

#endif  // LLMCU_EMU_SHIM_H
