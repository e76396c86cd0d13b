// The matmul lab: versions of kernels/matmul.cu that the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_matmul_lab.py keeps each one correct. A version moves into
// kernels/matmul.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   1: plain port of the oracle. The bias gradient walks the rows in order, one
//      thread per column (coalesced across the warp): deterministic and the
//      oracle's order, but only OC threads.
//   matmul_bias_forward_kernel1: out += bias per row (the step adds it in the cuBLASLt
//   epilogue instead: one rounding, no extra pass). Launch: a thread per element or column.
#include "../matmul.cu"

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
