// global_norm: the squared L2 norm of the gradients, for gradient clipping.
//
//   partial[blockIdx.x] = sum of data[i]^2 over i in this block's grid-stride share
// The host sums partial[0 .. gridDim.x) (in float64) and takes the square root.
// Shapes: data flat, n elements (all gradients in one buffer); partial
// (gridDim.x,) float, overwritten.
//
// Launch (the wrapper's grid/block helper): block 1024 (any multiple of 32 up
// to 1024: block_reduce_sum assumptions), grid min(CEIL_DIV(n, 1024), 264)
// (2 blocks per SM of a 132-SM H100; partial must hold gridDim.x floats), no
// dynamic shared memory. For a fixed grid and block the result is
// deterministic: no atomics, fixed order.
//
// Versions:
//   1: plain grid-stride loop and one block reduction.
#include "common.cuh"

extern "C" __global__ void global_norm_squared_kernel1(float* __restrict__ partial,
                                                       const floatX* __restrict__ data,
                                                       long long n) {
    __shared__ float shared[WARP_SIZE];
    const long long stride = (long long)gridDim.x * blockDim.x;
    float sum = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float x = to_float(data[i]);
        sum += x * x;
    }
    sum = block_reduce_sum(sum, shared);
    if (threadIdx.x == 0) { partial[blockIdx.x] = sum; }
}
