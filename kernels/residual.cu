// residual: the residual connection out = inp1 + inp2, elementwise.
// Its backward needs no kernel (both inputs receive dout); the GPT-2 backward
// also uses this kernel to add a layernorm's input gradient into the residual
// gradient in place (out == inp1).
// Shapes: any, N elements (B*T*C in GPT-2).
//
// Launch (the wrapper's grid/block helper): grid CEIL_DIV(N, 256), block 256,
// no shared memory.
//
// Versions:
//   1: plain port, one element per thread. No __restrict__: out may alias inp1
//      (or inp2); each thread reads its element before writing it.
#include "common.cuh"

extern "C" __global__ void residual_forward_kernel1(floatX* out, const floatX* inp1,
                                                    const floatX* inp2, int N) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) { return; }
    out[i] = from_float(to_float(inp1[i]) + to_float(inp2[i]));
}
