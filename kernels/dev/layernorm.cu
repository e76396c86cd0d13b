// The layernorm lab: the versions of kernels/layernorm.cu the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_layernorm_lab.py keeps each one correct. A version moves into
// kernels/layernorm.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   0: one thread per row, a loop over C exactly like the oracle's row: kept for
//      teaching (docs/layernorm.md). Slower than 1, hence the lower number.
//      H200 (2026-11-28, fp32, N = 8192, C = 768): 90 GB/s (version 1: 1232).
//   1: plain port of the oracle; two passes over the row for mean then variance
//      (not E[x^2] - mean^2), exact 1/sqrtf rather than rsqrtf. The parameter
//      gradients walk the rows in order, one thread per column: deterministic
//      and the oracle's summation order, but only C threads.
//   2 (forward): as 1, but every load and store moves 16 bytes (x128, 4 floats)
//      instead of 4; needs C % x128::size == 0 and 16-byte aligned pointers.
//      H200 (2026-11-28, fp32, N = 8192, C = 768): 1038 GB/s against version 1's 1232.
//   1 (backward): layernorm_backward_kernel1 (a warp per row for dinp) and
//      layernorm_param_backward_kernel1 (a thread per column walking all N rows: C
//      threads, 1.2-1.8 ms at N = 8192, 1% of copy on an H200; the product's two-pass
//      kernel2 replaced it).
//   Launch: version 0 a thread per row (block 256, grid CEIL_DIV(N, 256)); forward 2 and
//   backward 1 a warp per row (block 256, grid CEIL_DIV(N * 32, 256)); the parameter
//   backward 1 a thread per column (grid CEIL_DIV(C, 256)). No shared memory.
#include "common.cuh"

// Version 0: one thread per row. Thread `row` walks its row three times
// (mean, variance, output), as the NumPy oracle does. Neighbouring threads read
// addresses C floats apart, so a warp's 32 loads never share a memory
// transaction: correct, and the slow baseline the other versions are measured by.
extern "C" __global__ void layernorm_forward_kernel0(floatX* __restrict__ out,
                                                     float* __restrict__ mean,
                                                     float* __restrict__ rstd,
                                                     const floatX* __restrict__ inp,
                                                     const floatX* __restrict__ weight,
                                                     const floatX* __restrict__ bias,
                                                     int N, int C, float eps) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= N) { return; }
    const floatX* x = inp + (long long)row * C;

    float sum = 0.0f;
    for (int c = 0; c < C; c++) { sum += to_float(x[c]); }
    const float m = sum / C;

    float sq = 0.0f;
    for (int c = 0; c < C; c++) {
        float d = to_float(x[c]) - m;
        sq += d * d;
    }
    const float s = 1.0f / sqrtf(sq / C + eps);

    floatX* o = out + (long long)row * C;
    for (int c = 0; c < C; c++) {
        float n = (to_float(x[c]) - m) * s;
        o[c] = from_float(n * to_float(weight[c]) + to_float(bias[c]));
    }
    if (mean != nullptr) { mean[row] = m; }
    if (rstd != nullptr) { rstd[row] = s; }
}

// Version 2: version 1 with 16-byte loads and stores. Lane `lane` handles the
// packets starting at c = lane * x128::size, then every 32 * x128::size, so a
// warp reads 512 contiguous bytes per step in 32 wide loads instead of 128
// narrow ones. Needs C % x128::size == 0 and 16-byte aligned inp, out, weight,
// bias (the wrapper checks).
extern "C" __global__ void layernorm_forward_kernel2(floatX* __restrict__ out,
                                                     float* __restrict__ mean,
                                                     float* __restrict__ rstd,
                                                     const floatX* __restrict__ inp,
                                                     const floatX* __restrict__ weight,
                                                     const floatX* __restrict__ bias,
                                                     int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    const floatX* x = inp + (long long)row * C;

    float sum = 0.0f;
    for (int c = lane * x128::size; c < C; c += WARP_SIZE * x128::size) {
        const x128 packet = load128(x + c);
        for (int k = 0; k < x128::size; k++) { sum += to_float(packet[k]); }
    }
    const float m = warp_reduce_sum(sum) / C;

    float sq = 0.0f;
    for (int c = lane * x128::size; c < C; c += WARP_SIZE * x128::size) {
        const x128 packet = load128(x + c);
        for (int k = 0; k < x128::size; k++) {
            float d = to_float(packet[k]) - m;
            sq += d * d;
        }
    }
    const float var = warp_reduce_sum(sq) / C;
    const float s = 1.0f / sqrtf(var + eps);

    floatX* o = out + (long long)row * C;
    for (int c = lane * x128::size; c < C; c += WARP_SIZE * x128::size) {
        const x128 xs = load128(x + c);
        const x128 ws = load128(weight + c);
        const x128 bs = load128(bias + c);
        x128 result;
        for (int k = 0; k < x128::size; k++) {
            float n = (to_float(xs[k]) - m) * s;
            result[k] = from_float(n * to_float(ws[k]) + to_float(bs[k]));
        }
        store128(o + c, result);
    }
    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
}

extern "C" __global__ void layernorm_backward_kernel1(floatX* __restrict__ dinp,
                                                      const floatX* __restrict__ dout,
                                                      const floatX* __restrict__ inp,
                                                      const floatX* __restrict__ weight,
                                                      const float* __restrict__ mean,
                                                      const float* __restrict__ rstd,
                                                      int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    const floatX* x = inp + (long long)row * C;
    const floatX* d = dout + (long long)row * C;
    const float m = mean[row];
    const float s = rstd[row];

    float g_sum = 0.0f;   // sum_c g
    float gn_sum = 0.0f;  // sum_c g * n
    for (int c = lane; c < C; c += WARP_SIZE) {
        float n = (to_float(x[c]) - m) * s;
        float g = to_float(d[c]) * to_float(weight[c]);
        g_sum += g;
        gn_sum += g * n;
    }
    const float g_mean = warp_reduce_sum(g_sum) / C;
    const float gn_mean = warp_reduce_sum(gn_sum) / C;

    floatX* dx = dinp + (long long)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float n = (to_float(x[c]) - m) * s;
        float g = to_float(d[c]) * to_float(weight[c]);
        dx[c] = from_float((g - g_mean - n * gn_mean) * s);
    }
}

extern "C" __global__ void layernorm_param_backward_kernel1(floatX* __restrict__ dweight,
                                                            floatX* __restrict__ dbias,
                                                            const floatX* __restrict__ dout,
                                                            const floatX* __restrict__ inp,
                                                            const float* __restrict__ mean,
                                                            const float* __restrict__ rstd,
                                                            int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float dw = 0.0f;
    float db = 0.0f;
    for (int row = 0; row < N; row++) {
        long long i = (long long)row * C + c;
        float d = to_float(dout[i]);
        float n = (to_float(inp[i]) - mean[row]) * rstd[row];
        dw += d * n;
        db += d;
    }
    dweight[c] = from_float(to_float(dweight[c]) + dw);
    dbias[c] = from_float(to_float(dbias[c]) + db);
}
