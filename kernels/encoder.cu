// encoder: token + position embedding.
//
//   forward:  out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]
//   backward: dwte[inp[b,t],:] += dout[b,t,:]   (in (b,t) order)
//             dwpe[t,:]        += sum_b dout[b,t,:]   (in b order)
// Shapes: inp (B,T) int32 token ids in [0,V), wte (Vp,C), wpe (maxT,C),
// out/dout (B,T,C). Parameter gradients accumulate (+=); no activation gradient.
//
// Launch (the wrapper's grid/block helper):
//   encoder_forward_kernel1:  grid CEIL_DIV(B*T*C, 256), block 256, no shared memory.
//   encoder_forward_kernel2:  grid CEIL_DIV(B*T*C / x128::size, 256), block 256.
//   encoder_backward_kernel1: grid (CEIL_DIV(C, 256), 2), block 256, no shared memory;
//                             blockIdx.y == 0 does dwte, blockIdx.y == 1 does dwpe.
//
// Versions:
//   1: plain port of the oracle. The backward is deterministic without atomics:
//      one thread per channel walks all B*T positions in order (same order as
//      the oracle's np.add.at), so it is slow (only 2*C threads) but exact.
//      With bf16 dwte, a token seen n times is rounded after each of its n adds.
//   2 (forward): one 16-byte packet per thread (x128: 4 floats or 8 bf16);
//      needs C % x128::size == 0 (a packet never crosses a row) and 16-byte
//      aligned out, wte, wpe (the wrapper checks). Same arithmetic as 1.
//      Bought: not measured on a GPU yet (benchmarks/bench_kernels.py).
#include "common.cuh"

extern "C" __global__ void encoder_forward_kernel1(floatX* __restrict__ out,
                                                   const int* __restrict__ inp,
                                                   const floatX* __restrict__ wte,
                                                   const floatX* __restrict__ wpe,
                                                   int B, int T, int C) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;  // over (B,T,C)
    if (idx >= B * T * C) { return; }
    int bt = idx / C;
    int c = idx % C;
    int t = bt % T;
    int token = inp[bt];
    out[idx] = from_float(to_float(wte[token * C + c]) + to_float(wpe[t * C + c]));
}

extern "C" __global__ void encoder_forward_kernel2(floatX* __restrict__ out,
                                                   const int* __restrict__ inp,
                                                   const floatX* __restrict__ wte,
                                                   const floatX* __restrict__ wpe,
                                                   int B, int T, int C) {
    int idx = (blockIdx.x * blockDim.x + threadIdx.x) * x128::size;  // over (B,T,C)
    if (idx >= B * T * C) { return; }
    int bt = idx / C;
    int c = idx % C;
    int t = bt % T;
    int token = inp[bt];
    const x128 w = load128(wte + (long long)token * C + c);
    const x128 p = load128(wpe + (long long)t * C + c);
    x128 result;
    for (int k = 0; k < x128::size; k++) { result[k] = from_float(to_float(w[k]) + to_float(p[k])); }
    store128(out + idx, result);
}

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
