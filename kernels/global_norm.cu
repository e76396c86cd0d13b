// global_norm: the squared L2 norm of the gradients, for gradient clipping.
//
//   partial[blockIdx.x] = sum of data[i]^2 over i in this block's grid-stride share
//   norm[0] = sqrt(sum of partial[0 .. n) in double, in index order)   (finish)
//   grad_scale[0] = the clipping factor of norm[0] (llmcu/cpu/adamw.clip_scale)
// Shapes: data flat, n elements (all gradients in one buffer); partial
// (gridDim.x,) float, overwritten; norm (1,) double, grad_scale (1,) float.
//
// Launch (the wrapper's grid/block helper): block 1024 (any multiple of 32 up
// to 1024: block_reduce_sum assumptions), grid min(CEIL_DIV(n, 1024), 264)
// (2 blocks per SM of a 132-SM H100; partial must hold gridDim.x floats), no
// dynamic shared memory. For a fixed grid and block the result is
// deterministic: no atomics, fixed order. global_norm_finish_kernel1: one
// block of one thread (grid 1, block 1), after the squared kernel on the same stream.
//
// Versions:
//   1: plain grid-stride loop and one block reduction. The partials were summed
//      on the host (a device-to-host copy and a sync every step) until
//      global_norm_finish_kernel1 (same version number: a new kernel, not a
//      faster one) finished the norm and the clip scale on the device, so a
//      captured CUDA graph computes them and AdamW (adamw_kernel4) reads the
//      scale from device memory.
//   2 (16-byte loads): in the lab, kernels/dev/global_norm.cu (not measured on a GPU).
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


// The partials' sum in double in index order, the norm, and the clip scale with
// exactly clip_scale's double arithmetic, rounded once to float at the end: the
// host (global_norm, then clip_scale on the returned norm) and a graph replay
// (this kernel's grad_scale) then get the same float32 scale bit for bit
// (IEEE double sqrt, compare and divide are exact-rounded on both). grad_clip
// is a double so the host's Python float arrives unrounded; <= 0 disables clipping.
// n <= a few hundred: one thread is plenty.
extern "C" __global__ void global_norm_finish_kernel1(double* __restrict__ norm,
                                                      float* __restrict__ grad_scale,
                                                      const float* __restrict__ partial, int n,
                                                      double grad_clip) {
    if (blockIdx.x != 0 || threadIdx.x != 0) { return; }
    double sum = 0.0;
    for (int i = 0; i < n; i++) { sum += (double)partial[i]; }
    const double total = sqrt(sum);
    norm[0] = total;
    grad_scale[0] = (grad_clip <= 0.0 || total <= grad_clip) ? 1.0f
                                                             : (float)(grad_clip / (total + 1e-6));
}
