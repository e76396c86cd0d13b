// common.cuh: definitions shared by every kernel file in kernels/.
//
// Each .cu here is compiled twice: on the GPU by CuPy's RawModule (NVRTC,
// options like -DfloatX=float -std=c++17 -I kernels/), and as plain C++ by g++
// for the CPU emulator (llmcu/emu), which force-includes a shim that defines
// LLMCU_EMU and runs every CUDA thread as a fiber. Hence the kernels use a small
// CUDA subset only (see kernels/README.md): no cooperative groups, no inline
// PTX, no float4 (16-byte loads go through Packed128 below), full-warp
// shuffles, dynamic shared memory only through DYNAMIC_SHARED below. NVRTC
// includes no system headers, so nothing here includes any.
#pragma once

// Activations, parameters and their gradients are floatX (float, or
// __nv_bfloat16 when the wrapper compiles with -DfloatX=__nv_bfloat16
// -DLLMCU_BF16); statistics, losses, reductions, AdamW moments and master
// weights are always float.
#ifndef floatX
#define floatX float
#endif

// bf16 needs CUDA's header on the GPU (NVRTC finds it in the CUDA toolkit; the
// wrapper adds its include path). The emulator's shim defines __nv_bfloat16
// itself and keeps a stub of this header, so the line is harmless there.
#ifdef LLMCU_BF16
#include <cuda_bf16.h>
#endif

// Reads and writes of floatX go through these two: to_float is exact, from_float
// rounds to nearest even (one rounding, <= 2^-9 relative, for bf16). Kernels
// load floatX, compute in float, and store through from_float.
#ifdef LLMCU_BF16
__device__ __forceinline__ float to_float(floatX x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX from_float(float x) { return __float2bfloat16_rn(x); }
#else
__device__ __forceinline__ float to_float(floatX x) { return (float)x; }
__device__ __forceinline__ floatX from_float(float x) { return (floatX)x; }
#endif

// A counter-based random number: a 32-bit hash of (seed, index), so every
// element of every step draws an independent-looking value with no state to
// carry. Two rounds of a multiply-xorshift mix (the constants are the odd
// multipliers of a well-mixing 32-bit finaliser); the 64-bit index is folded in
// half by half, so arrays past 2^32 elements still get distinct values.
__device__ __forceinline__ unsigned int mix32(unsigned int h) {
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}
__device__ __forceinline__ unsigned int random_u32(unsigned int seed, long long index) {
    unsigned int lo = (unsigned int)(index & 0xffffffffLL);
    unsigned int hi = (unsigned int)((unsigned long long)index >> 32);
    unsigned int h = mix32(seed ^ 0x9e3779b9u);
    h = mix32(h ^ lo);
    return mix32(h ^ (hi * 0x85ebca6bu));
}

// Stochastic rounding float -> floatX: rounds |x| up to the next bf16 with
// probability (dropped low 16 bits) / 2^16 and down otherwise, so the rounded
// value is unbiased: E[result] = x. Adding a uniform 16-bit value to the low
// half of the float's bits and truncating does exactly that (a carry into the
// exponent is the correct next value up; NaN stays a quiet NaN). For
// floatX = float it is the identity, so a kernel can use it for either type.
__device__ __forceinline__ floatX from_float_stochastic(float x, unsigned int random) {
#ifdef LLMCU_BF16
    unsigned int bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return __ushort_as_bfloat16((unsigned short)((bits >> 16) | 0x40u));
    }
    if ((bits & 0x7f800000u) != 0x7f800000u) {  // finite: inf must not move
        bits += random & 0xffffu;
    }
    return __ushort_as_bfloat16((unsigned short)(bits >> 16));
#else
    (void)random;
    return from_float(x);
#endif
}

#define WARP_SIZE 32
#define CEIL_DIV(M, N) (((M) + (N) - 1) / (N))

// NVRTC has no math.h, so INFINITY is not defined there.
#ifndef INFINITY
#ifdef LLMCU_EMU
#define INFINITY __builtin_huge_valf()
#else
#define INFINITY __int_as_float(0x7f800000)
#endif
#endif

// Dynamic shared memory (the launch's shared_mem bytes). Use it only as
//   DYNAMIC_SHARED(float, buf);
// inside a kernel body; the emulator hands out its own buffer.
#ifdef LLMCU_EMU
#define DYNAMIC_SHARED(T, name) T* name = (T*)emu_dynamic_shared()
#else
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ----------------------------------------------------------------------------
// 16-byte packets (llm.c's Packed128): one 128-bit load or store moves
// x128::size floatX values (4 floats, 8 bf16) instead of one. A plain aligned
// struct rather than float4, so it works for any floatX and runs unchanged
// under the emulator. The address must be 16-byte aligned: the base pointer
// (cudaMalloc/CuPy give 256-byte alignment) and the offset, i.e. a row of C
// values starts aligned only when C % x128::size == 0. The wrappers check both.

template <class T>
struct alignas(16) Packed128 {
    static constexpr int size = 16 / sizeof(T);
    T payload[size];
    __device__ __forceinline__ T& operator[](int i) { return payload[i]; }
    __device__ __forceinline__ const T& operator[](int i) const { return payload[i]; }
};
typedef Packed128<floatX> x128;

__device__ __forceinline__ x128 load128(const floatX* address) {
    return *reinterpret_cast<const x128*>(address);
}
__device__ __forceinline__ void store128(floatX* address, const x128& value) {
    *reinterpret_cast<x128*>(address) = value;
}

// The same for float arrays whatever floatX is (AdamW moments, master weights):
// f128 holds 4 floats, so an x128 of bf16 (8 values) pairs with two f128s.
typedef Packed128<float> f128;
__device__ __forceinline__ f128 load128f(const float* address) {
    return *reinterpret_cast<const f128*>(address);
}
__device__ __forceinline__ void store128f(float* address, const f128& value) {
    *reinterpret_cast<f128*>(address) = value;
}

// V floats from / to V consecutive floatX values, V = 1 (a scalar access, any
// address) or x128::size (one 16-byte access, aligned addresses only): lets one
// kernel body serve a 16-byte path and a scalar fallback (a template argument).
template <int V>
__device__ __forceinline__ void load_floats(float* dst, const floatX* src) {
    if constexpr (V == 1) {
        dst[0] = to_float(src[0]);
    } else {
        static_assert(V == x128::size, "V is 1 or x128::size");
        const x128 packet = load128(src);
#pragma unroll
        for (int k = 0; k < V; k++) { dst[k] = to_float(packet[k]); }
    }
}
template <int V>
__device__ __forceinline__ void store_floats(floatX* dst, const float* src) {
    if constexpr (V == 1) {
        dst[0] = from_float(src[0]);
    } else {
        static_assert(V == x128::size, "V is 1 or x128::size");
        x128 packet;
#pragma unroll
        for (int k = 0; k < V; k++) { packet[k] = from_float(src[k]); }
        store128(dst, packet);
    }
}

// ----------------------------------------------------------------------------
// Warp reductions: all 32 lanes of the warp must call them (full mask), and
// every lane gets the result. The butterfly order is fixed, so the result is
// deterministic (and identical on all lanes).

__device__ __forceinline__ float warp_reduce_sum(float val) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        val += __shfl_xor_sync(0xffffffff, val, offset);
    }
    return val;
}

__device__ __forceinline__ float warp_reduce_max(float val) {
#pragma unroll
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        val = fmaxf(val, __shfl_xor_sync(0xffffffff, val, offset));
    }
    return val;
}

// ----------------------------------------------------------------------------
// Block reductions. Assumptions, which the launching wrapper must meet:
//   - 1-D block (only threadIdx.x is used), blockDim.x a multiple of 32 and at
//     most 1024 (so at most 32 warps: one shared slot per warp);
//   - every thread of the block calls it (it contains __syncthreads), none has
//     returned early;
//   - `shared` is a __shared__ float[WARP_SIZE] declared in the kernel (the
//     kernel owns its shared memory; helpers declare none). The same buffer
//     may be reused by back-to-back calls: the leading barrier makes sure every
//     warp has finished reading the previous result before it is overwritten.
// Every thread returns the block-wide result; the order of additions is fixed
// for a given blockDim, so the result is deterministic.

__device__ __forceinline__ float block_reduce_sum(float val, float* shared) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    val = warp_reduce_sum(val);
    __syncthreads();
    if (lane == 0) { shared[warp] = val; }
    __syncthreads();
    val = (lane < num_warps) ? shared[lane] : 0.0f;
    return warp_reduce_sum(val);
}

__device__ __forceinline__ float block_reduce_max(float val, float* shared) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    val = warp_reduce_max(val);
    __syncthreads();
    if (lane == 0) { shared[warp] = val; }
    __syncthreads();
    val = (lane < num_warps) ? shared[lane] : -INFINITY;
    return warp_reduce_max(val);
}
