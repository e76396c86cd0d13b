// matmul: the bias half of the linear layer out = inp @ weight^T + bias.
// The GEMMs themselves go to cuBLASLt (forward, with the bias and GELU epilogues) and
// cuBLAS (dinp, dweight) from Python (llmcu/cuda/matmul.py).
//
//   matmul_bias_backward: dbias[oc] += sum_n dout[n,oc]
//   matmul_gemm_accumulate: out += an fp32 GEMM product, one rounding (bf16 dweight)
// Shapes: N = B*T rows; out/dout (N,OC), bias/dbias (OC,).
// Parameter gradients accumulate (+=).
//
// Launch (the wrapper's grid/block helper):
//   matmul_bias_backward_kernel2 (pass 1): block 256 (8 warps), grid
//       (CEIL_DIV(OC, 32 * V), P) with P = min(CEIL_DIV(N, 8), max(1, 528 / grid.x)),
//       dynamic shared memory 8 * 32 * V floats (8 KiB in bf16); scratch (P, OC) float.
//   matmul_bias_backward_reduce_kernel2 (pass 2): block 256 (8 warps x 32 columns),
//       grid CEIL_DIV(OC, 32), 4 KiB static shared memory.
//
// Versions the training step runs (the lab, kernels/dev/matmul.cu, holds the bias forward
// kernel, which the cuBLASLt bias epilogue replaces, and the one-thread-per-column bias
// backward 1):
//   2: two passes, deterministic (fixed order, no atomics). Version 1 runs OC
//      threads (768-3072), each walking all N rows serially, which made the bf16
//      matmul backward 4-14% of the GEMM ceiling on an H200 (benchmarks/RESULTS.md).
//      Version 2 gives each block 32 * V columns (V = 8 bf16 / 4 fp32 per 16-byte
//      load: a warp reads 512 contiguous bytes of a row) and a slice of the rows,
//      fp32 sums in registers, the block's 8 warps combined in warp order, one
//      partial row per row-slice; pass 2 adds the partial rows per column in a
//      fixed order. Grid: about 528 blocks (4 per SM of 132, one wave) split as
//      column tiles x row slices, e.g. OC = 768 bf16: 3 x 176, 12 rows per warp
//      at N = 16384; the partials (176 x 768 fp32, 0.5 MB) are ~2% of dout's
//      25 MB. The cap is a constant, so the summation order is the same on every card.
//      Should buy: the bias gradient at a fraction of the GEMMs' time instead of
//      most of it; GPU speed not measured yet (benchmarks/bench_kernels.py).
#include "common.cuh"


// ----------------------------------------------------------------------------
// Version 2 of the bias backward: two passes, deterministic, no atomics.
//
// Pass 1, matmul_bias_backward_kernel2: grid (CEIL_DIV(OC, 32 * V), P). A block
// owns 32 * V columns: lane l reads the V columns starting at
// (blockIdx.x * 32 + l) * V of a row (one 16-byte load when V = x128::size, so a
// warp reads 512 contiguous bytes per row), and its warps take the rows
// blockIdx.y * warps + warp, then every gridDim.y * warps, summing in fp32
// registers. The warps' sums are added in warp order through dynamic shared
// memory (warps * 32 * V floats) and written to scratch[blockIdx.y, columns].
// `wide` (set by the wrapper) selects V = x128::size (needs OC % x128::size == 0
// and 16-byte aligned dout), else V = 1.
// Pass 2, matmul_bias_backward_reduce_kernel2: sums the P partial rows of each
// column in a fixed order and does one += into dbias (one rounding for bf16);
// with accumulate == 0 it writes dbias = sum instead (the first backward after
// zero_grad, matmul_backward(accumulate_weight=False)).

template <int V>
__device__ __forceinline__ void matmul_bias_partial_sums(float* __restrict__ scratch, float* shared,
                                                         const floatX* __restrict__ dout,
                                                         int N, int OC) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int tile = WARP_SIZE * V;
    const int c = (blockIdx.x * WARP_SIZE + lane) * V;
    float sum[V];
#pragma unroll
    for (int k = 0; k < V; k++) { sum[k] = 0.0f; }
    if (c < OC) {
#pragma unroll 4
        for (int n = blockIdx.y * warps + warp; n < N; n += gridDim.y * warps) {
            const floatX* row = dout + (long long)n * OC + c;
            float v[V];
            load_floats<V>(v, row);
#pragma unroll
            for (int k = 0; k < V; k++) { sum[k] += v[k]; }
        }
    }
#pragma unroll
    for (int k = 0; k < V; k++) { shared[warp * tile + k * WARP_SIZE + lane] = sum[k]; }
    __syncthreads();
    for (int t = threadIdx.x; t < tile; t += blockDim.x) {
        const int col = blockIdx.x * tile + t;
        if (col >= OC) { continue; }
        const int slot = (t % V) * WARP_SIZE + t / V;
        float total = 0.0f;
        for (int w = 0; w < warps; w++) { total += shared[w * tile + slot]; }  // warp order
        scratch[(long long)blockIdx.y * OC + col] = total;
    }
}

// Pass 1. scratch: (gridDim.y, OC) float, every element written. Dynamic shared
// memory: (blockDim.x / 32) * 32 * V floats.
extern "C" __global__ void matmul_bias_backward_kernel2(float* __restrict__ scratch,
                                                        const floatX* __restrict__ dout,
                                                        int N, int OC, int wide) {
    DYNAMIC_SHARED(float, shared);
    if (wide) {
        matmul_bias_partial_sums<x128::size>(scratch, shared, dout, N, OC);
    } else {
        matmul_bias_partial_sums<1>(scratch, shared, dout, N, OC);
    }
}

// Pass 2. Block: 32 columns (lane) x warps slices of the P partial rows; grid
// CEIL_DIV(OC, 32).
extern "C" __global__ void matmul_bias_backward_reduce_kernel2(floatX* __restrict__ dbias,
                                                               const float* __restrict__ scratch,
                                                               int P, int OC, int accumulate) {
    __shared__ float sums[WARP_SIZE][WARP_SIZE];  // [warp][lane]
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int oc = blockIdx.x * WARP_SIZE + lane;
    float sum = 0.0f;
    if (oc < OC) {
        for (int p = warp; p < P; p += warps) { sum += scratch[(long long)p * OC + oc]; }
    }
    sums[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && oc < OC) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) { total += sums[w][lane]; }
        dbias[oc] = from_float(accumulate ? to_float(dbias[oc]) + total : total);
    }
}

// matmul_gemm_accumulate_kernel1: out[i] = round(out[i] + product[i]), the fp32 sum rounded once
// to floatX (llmcu/cuda/gemm.py's accumulate for bf16: cuBLAS's beta = 1 on a bf16
// output rounded twice on an H200). n elements; grid CEIL_DIV(n, 256), block 256.
// In a kernel instead of array expressions so it allocates no temporaries (a captured
// CUDA graph cannot) and reads and writes each element once.
extern "C" __global__ void matmul_gemm_accumulate_kernel1(floatX* __restrict__ out,
                                                   const float* __restrict__ product, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { out[i] = from_float(to_float(out[i]) + product[i]); }
}
