// residual: the residual connection out = inp1 + inp2, elementwise.
// Its backward needs no kernel (both inputs receive dout); the GPT-2 backward
// also uses this kernel to add a layernorm's input gradient into the residual
// gradient in place (out == inp1).
// Shapes: any, N elements (B*T*C in GPT-2).
//
// Launch (the wrapper's grid/block helper): grid CEIL_DIV(N, 256), block 256
// (version 2: CEIL_DIV(N / x128::size, 256)), no shared memory.
//
// Versions:
//   1: plain port, one element per thread. No __restrict__: out may alias inp1
//      (or inp2); each thread reads its element before writing it.
//   2: one 16-byte packet per thread (x128: 4 floats or 8 bf16); needs
//      N % x128::size == 0 and 16-byte aligned pointers (the wrapper checks).
//      Aliasing as in 1: a thread loads both packets before storing its own.
//      Bought: not measured on a GPU yet (benchmarks/bench_kernels.py).
#include "common.cuh"

extern "C" __global__ void residual_forward_kernel1(floatX* out, const floatX* inp1,
                                                    const floatX* inp2, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = from_float(to_float(inp1[i]) + to_float(inp2[i]));
}

extern "C" __global__ void residual_forward_kernel2(floatX* out, const floatX* inp1,
                                                    const floatX* inp2, int N) {
    int i = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;
    if (i >= N) { return; }
    const x128 a = load128(inp1 + i);
    const x128 b = load128(inp2 + i);
    x128 result;
    for (int k = 0; k < x128::size; k++) { result[k] = from_float(to_float(a[k]) + to_float(b[k])); }
    store128(out + i, result);
}
