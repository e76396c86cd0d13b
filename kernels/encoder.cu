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
//   encoder_wpe_backward_kernel2: grid CEIL_DIV(T*C / V, 256), block 256 (V below).
//   encoder_wte_backward_kernel2: grid (B*T, CEIL_DIV(C / V, 32)), block 32; needs the
//                             wrapper's stable sort of the positions by token.
//
// Versions the training step runs (the lab, kernels/dev/encoder.cu, holds the backward's
// version 1: a thread per channel walking every position, 1% of copy on an H200):
//   2 (forward): one 16-byte packet per thread (x128: 4 floats or 8 bf16);
//      needs C % x128::size == 0 (a packet never crosses a row) and 16-byte
//      aligned out, wte, wpe (the wrapper checks). Same arithmetic as 1.
//      H200 (2026-11-28, fp32, B*T = 8192, C = 768): 37% of copy, version 1 26%;
//      version 1 stays as the scalar path for other C and alignments.
//   2 (backward): deterministic without atomics and parallel. Version 1 runs 2*C
//      threads, each walking all B*T positions: 1.8-2.6 ms on an H200, 1% of the
//      copy ceiling (benchmarks/RESULTS.md). dwpe: one thread per (t, packet of V
//      channels), B adds each in b order. dwte: the wrapper sorts the positions
//      stably by token (plus, per sorted index, the end of its token's run); one
//      warp per (run start, 32 packets of channels) sums the token's rows in
//      position order in fp32 and does one += (blocks at other sorted indices exit
//      at once: B*T x CEIL_DIV(C/V, 32) one-warp blocks, 49152 at B*T = 16384,
//      C = 768 bf16, nearly all of them leaving after two index loads).
//      16-byte loads when C % x128::size == 0. A token seen k times costs its warp
//      k serial row loads (unrolled 4 deep); a very frequent token is the tail.
//      Should buy: the backward near the bandwidth of reading dout once; GPU speed
//      not measured yet (benchmarks/bench_kernels.py runs 1 and 2 side by side).
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


// ----------------------------------------------------------------------------
// Version 2 of the backward: deterministic without atomics, parallel.
//
// encoder_wpe_backward_kernel2: one thread per (t, packet of V channels), V =
// x128::size when `wide` (C % x128::size == 0, 16-byte aligned dwpe and dout),
// else 1: sums dout[b,t,c] over b in order in fp32, then one += into dwpe[t,c].
// encoder_wte_backward_kernel2: the wrapper hands it the positions sorted
// stably by token (order, (B*T,) int32: positions of one token together, in
// increasing position) and, for each sorted index i, end[i] = one past the last
// sorted index holding the same token. Grid (B*T, CEIL_DIV(C / V, 32)), block
// 32: block (i, y) exits at once unless i starts its token's run; otherwise its
// lane handles the packet of V channels at (y * 32 + lane) * V, adds the
// token's dout rows in position order in fp32 and does one += into dwte (one
// rounding for bf16, where version 1 rounds after each of the token's adds).
// Tokens never seen have no run, so their rows of dwte are untouched.

// grad[0..V) += sum[0..V), one rounding each.
template <int V>
__device__ __forceinline__ void encoder_accumulate(floatX* grad, const float* sum) {
    float acc[V];
    load_floats<V>(acc, grad);
#pragma unroll
    for (int k = 0; k < V; k++) { acc[k] += sum[k]; }
    store_floats<V>(grad, acc);
}

template <int V>
__device__ __forceinline__ void encoder_wpe_backward2(floatX* __restrict__ dwpe,
                                                      const floatX* __restrict__ dout,
                                                      int B, int T, int C) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;  // over (T,C)
    const long long TC = (long long)T * C;
    if (i >= TC) { return; }
    float sum[V];
#pragma unroll
    for (int k = 0; k < V; k++) { sum[k] = 0.0f; }
    for (int b = 0; b < B; b++) {
        float d[V];
        load_floats<V>(d, dout + b * TC + i);
#pragma unroll
        for (int k = 0; k < V; k++) { sum[k] += d[k]; }
    }
    encoder_accumulate<V>(dwpe + i, sum);
}

extern "C" __global__ void encoder_wpe_backward_kernel2(floatX* __restrict__ dwpe,
                                                        const floatX* __restrict__ dout,
                                                        int B, int T, int C, int wide) {
    if (wide) {
        encoder_wpe_backward2<x128::size>(dwpe, dout, B, T, C);
    } else {
        encoder_wpe_backward2<1>(dwpe, dout, B, T, C);
    }
}

template <int V>
__device__ __forceinline__ void encoder_wte_backward2(floatX* __restrict__ dwte,
                                                      const floatX* __restrict__ dout,
                                                      int token, const int* __restrict__ order,
                                                      int start, int end, int C) {
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V;
    if (c >= C) { return; }
    float sum[V];
#pragma unroll
    for (int k = 0; k < V; k++) { sum[k] = 0.0f; }
#pragma unroll 4
    for (int j = start; j < end; j++) {  // the token's positions, in increasing order
        float d[V];
        load_floats<V>(d, dout + (long long)order[j] * C + c);
#pragma unroll
        for (int k = 0; k < V; k++) { sum[k] += d[k]; }
    }
    encoder_accumulate<V>(dwte + (long long)token * C + c, sum);
}

extern "C" __global__ void encoder_wte_backward_kernel2(floatX* __restrict__ dwte,
                                                        const floatX* __restrict__ dout,
                                                        const int* __restrict__ inp,
                                                        const int* __restrict__ order,
                                                        const int* __restrict__ end,
                                                        int C, int wide) {
    const int i = blockIdx.x;  // an index into the sorted positions
    const int token = inp[order[i]];
    if (i > 0 && inp[order[i - 1]] == token) { return; }  // not the start of a run: the block leaves
    if (wide) {
        encoder_wte_backward2<x128::size>(dwte, dout, token, order, i, end[i], C);
    } else {
        encoder_wte_backward2<1>(dwte, dout, token, order, i, end[i], C);
    }
}
