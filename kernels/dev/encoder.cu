// The encoder lab: versions of kernels/encoder.cu that the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_encoder_lab.py keeps each one correct. A version moves into
// kernels/encoder.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   1: plain port of the oracle. The backward is deterministic without atomics:
//      one thread per channel walks all B*T positions in order (same order as
//      the oracle's np.add.at), so it is slow (only 2*C threads) but exact.
//      With bf16 dwte, a token seen n times is rounded after each of its n adds.
//   Launch: grid (CEIL_DIV(C, 256), 2), block 256 (blockIdx.y 0: dwte, 1: dwpe).
#include "../encoder.cu"

extern "C" __global__ void encoder_backward_kernel1(floatX* __restrict__ dwte,
                                                    floatX* __restrict__ dwpe,
                                                    const floatX* __restrict__ dout,
                                                    const int* __restrict__ inp,
                                                    int B, int T, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    if (blockIdx.y == 0) {
        // dwte: positions in (b,t) order, so a token seen twice is summed in a
        // fixed order; read-modify-write per position like np.add.at.
        for (int bt = 0; bt < B * T; bt++) {
            int token = inp[bt];
            float acc = to_float(dwte[token * C + c]) + to_float(dout[bt * C + c]);
            dwte[token * C + c] = from_float(acc);
        }
    } else {
        // dwpe: sum over b in order, then one += per (t,c).
        for (int t = 0; t < T; t++) {
            float sum = 0.0f;
            for (int b = 0; b < B; b++) {
                sum += to_float(dout[(b * T + t) * C + c]);
            }
            dwpe[t * C + c] = from_float(to_float(dwpe[t * C + c]) + sum);
        }
    }
}
