// The gelu lab. The training step runs no GELU kernel: the GELU and its gradient are
// cuBLASLt epilogues of the fc GEMMs (llmcu/cuda/matmul.py; the emulator computes the same
// at the same call site). These two versions stay here for the lab harness
// (benchmarks/lab.py gelu N) and the next layer that needs an element-wise GELU.
// H200 (2026-11-28, B*T = 8192, 4C = 3072): version 2 fp32 72% / 76% of copy (fwd / bwd),
// version 1 52% / 63%. A version returns to kernels/ only by the promotion rule
// (kernels/README.md). Run them with benchmarks/lab.py gelu; tests in tests/lab/.
//
// gelu: GELU with the tanh approximation (as GPT-2), elementwise.
//
//   forward:  out = 0.5 x (1 + tanh(s (x + 0.044715 x^3))),  s = sqrt(2/pi)
//   backward: dinp = dout * (0.5 (1 + th) + 0.5 x (1 - th^2) s (1 + 3 * 0.044715 x^2)),
//             th = tanh(s (x + 0.044715 x^3))
// Shapes: any, N elements (B*T*4C in GPT-2); out/dinp like inp.
// Activation gradients overwrite (=).
//
// Launch (the wrapper's grid/block helper): grid CEIL_DIV(N, 256), block 256
// (version 2: CEIL_DIV(N / x128::size, 256)), no shared memory.
//
// Versions:
//   1: plain port of the oracle, one element per thread, tanhf.
//   2: one 16-byte packet per thread (x128: 4 floats or 8 bf16), so each load
//      and store is one wide access; needs N % x128::size == 0 and 16-byte
//      aligned pointers (the wrapper checks). Same arithmetic per element as 1.
//      Bought: not measured on a GPU yet (benchmarks/bench_kernels.py).
#include "common.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)
#define GELU_CUBE 0.044715f

extern "C" __global__ void gelu_forward_kernel1(floatX* out, const floatX* inp, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    float x = to_float(inp[i]);
    float th = tanhf(GELU_SCALING_FACTOR * (x + GELU_CUBE * x * x * x));
    out[i] = from_float(0.5f * x * (1.0f + th));
}

__device__ __forceinline__ float gelu_value(float x) {
    float th = tanhf(GELU_SCALING_FACTOR * (x + GELU_CUBE * x * x * x));
    return 0.5f * x * (1.0f + th);
}

__device__ __forceinline__ float gelu_derivative(float x) {
    float x2 = x * x;
    float th = tanhf(GELU_SCALING_FACTOR * (x + GELU_CUBE * x2 * x));
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th)
         + 0.5f * x * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * GELU_CUBE * x2);
}

extern "C" __global__ void gelu_backward_kernel1(floatX* dinp, const floatX* inp,
                                                 const floatX* dout, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    float x = to_float(inp[i]);
    float x2 = x * x;
    float th = tanhf(GELU_SCALING_FACTOR * (x + GELU_CUBE * x2 * x));
    float sech2 = 1.0f - th * th;
    float local = 0.5f * (1.0f + th)
                + 0.5f * x * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * GELU_CUBE * x2);
    dinp[i] = from_float(local * to_float(dout[i]));
}

// Version 2: thread i handles elements [i * x128::size, (i + 1) * x128::size).
extern "C" __global__ void gelu_forward_kernel2(floatX* out, const floatX* inp, int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= N) { return; }
    const x128 x = load128(inp + i);
    x128 result;
    for (int k = 0; k < x128::size; k++) { result[k] = from_float(gelu_value(to_float(x[k]))); }
    store128(out + i, result);
}

extern "C" __global__ void gelu_backward_kernel2(floatX* dinp, const floatX* inp,
                                                 const floatX* dout, int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= N) { return; }
    const x128 x = load128(inp + i);
    const x128 d = load128(dout + i);
    x128 result;
    for (int k = 0; k < x128::size; k++) {
        result[k] = from_float(gelu_derivative(to_float(x[k])) * to_float(d[k]));
    }
    store128(dinp + i, result);
}
