// matmul: the bias half of the linear layer out = inp @ weight^T + bias.
// The GEMMs themselves (forward, dinp, dweight) go to cuBLAS from Python.
//
//   matmul_bias_forward:  out[n,oc] += bias[oc]
//   matmul_bias_backward: dbias[oc] += sum_n dout[n,oc]   (rows in order)
// Shapes: N = B*T rows; out/dout (N,OC), bias/dbias (OC,).
// Parameter gradients accumulate (+=).
//
// Launch (the wrapper's grid/block helper):
//   matmul_bias_forward_kernel1:  grid CEIL_DIV(N*OC, 256), block 256, no shared memory.
//   matmul_bias_backward_kernel1: one thread per column; grid CEIL_DIV(OC, 256),
//                                 block 256, no shared memory.
//
// Versions:
//   1: plain port of the oracle. The bias gradient walks the rows in order, one
//      thread per column (coalesced across the warp): deterministic and the
//      oracle's order, but only OC threads.
#include "common.cuh"

extern "C" __global__ void matmul_bias_forward_kernel1(floatX* __restrict__ out,
                                                       const floatX* __restrict__ bias,
                                                       int N, int OC) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // over (N,OC)
    if (idx >= N * OC) { return; }
    out[idx] = from_float(to_float(out[idx]) + to_float(bias[idx % OC]));
}

extern "C" __global__ void matmul_bias_backward_kernel1(floatX* __restrict__ dbias,
                                                        const floatX* __restrict__ dout,
                                                        int N, int OC) {
    int oc = blockIdx.x * blockDim.x + threadIdx.x;
    if (oc >= OC) { return; }
    float sum = 0.0f;
    for (int n = 0; n < N; n++) {
        sum += to_float(dout[(long long)n * OC + oc]);
    }
    dbias[oc] = from_float(to_float(dbias[oc]) + sum);
}
