// rmsnorm: normalise each row of C channels by its root mean square, then scale
// (Llama's norm; no mean subtraction, no bias; Gemma scales by 1 + weight).
//
//   forward:  rstd = 1 / sqrt(sum_c x^2 / C + eps);  out = x * rstd * (weight_offset + weight)
//   backward: with n = x * rstd and g = dout * (weight_offset + weight):
//             dinp     = rstd * (g - n * mean_c(g * n))    (overwrite)
//             dweight += sum over rows of dout * n           (accumulate)
// weight_offset is 0 for Llama, 1 for Gemma (its weights are stored as the
// offset from one).
// Shapes: N = B*T rows; inp/out/dout/dinp (N,C), weight/dweight (C,), rstd (N,)
// float, cached by the forward for the backward.
//
// Launch (the wrapper's grid/block helper):
//   rmsnorm_forward_kernel1, rmsnorm_backward_kernel1: one warp per row;
//       block 256 (8 warps; any multiple of 32 works), grid CEIL_DIV(N * 32, 256),
//       no shared memory. Warps past the last row return as a whole.
//   rmsnorm_param_backward_kernel1: one thread per column c; block 256,
//       grid CEIL_DIV(C, 256), no shared memory.
//
// Versions:
//   1: plain port of the oracle, as layernorm.cu's version 1: a warp per row,
//      scalar loads, exact 1/sqrtf rather than rsqrtf. The weight gradient walks
//      the rows in order, one thread per column: deterministic, no atomics, and
//      the oracle's summation order, but only C threads.
#include "common.cuh"

// rstd may be null (inference).
extern "C" __global__ void rmsnorm_forward_kernel1(floatX* __restrict__ out,
                                                   float* __restrict__ rstd,
                                                   const floatX* __restrict__ inp,
                                                   const floatX* __restrict__ weight,
                                                   int N, int C, float eps, float weight_offset) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    const floatX* x = inp + (long long)row * C;

    float sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float v = to_float(x[c]);
        sq += v * v;
    }
    const float s = 1.0f / sqrtf(warp_reduce_sum(sq) / C + eps);

    floatX* o = out + (long long)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        o[c] = from_float(to_float(x[c]) * s * (weight_offset + to_float(weight[c])));
    }
    if (lane == 0 && rstd != nullptr) { rstd[row] = s; }
}

extern "C" __global__ void rmsnorm_backward_kernel1(floatX* __restrict__ dinp,
                                                    const floatX* __restrict__ dout,
                                                    const floatX* __restrict__ inp,
                                                    const floatX* __restrict__ weight,
                                                    const float* __restrict__ rstd,
                                                    int N, int C, float weight_offset) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    const floatX* x = inp + (long long)row * C;
    const floatX* d = dout + (long long)row * C;
    const float s = rstd[row];

    float gn_sum = 0.0f;  // sum_c g * n
    for (int c = lane; c < C; c += WARP_SIZE) {
        float n = to_float(x[c]) * s;
        float g = to_float(d[c]) * (weight_offset + to_float(weight[c]));
        gn_sum += g * n;
    }
    const float gn_mean = warp_reduce_sum(gn_sum) / C;

    floatX* dx = dinp + (long long)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float n = to_float(x[c]) * s;
        float g = to_float(d[c]) * (weight_offset + to_float(weight[c]));
        dx[c] = from_float((g - n * gn_mean) * s);
    }
}

extern "C" __global__ void rmsnorm_param_backward_kernel1(floatX* __restrict__ dweight,
                                                          const floatX* __restrict__ dout,
                                                          const floatX* __restrict__ inp,
                                                          const float* __restrict__ rstd,
                                                          int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float dw = 0.0f;
    for (int row = 0; row < N; row++) {
        long long i = (long long)row * C + c;
        dw += to_float(dout[i]) * (to_float(inp[i]) * rstd[row]);
    }
    dweight[c] = from_float(to_float(dweight[c]) + dw);
}
