// attention: the elementwise and softmax parts of causal multi-head
// self-attention. The batched GEMMs (preatt = q k^T, y = att v, and their
// backward) go to cuBLAS from Python; the full forward is
//   q,k,v = permute(qkv); preatt = q k^T; att = softmax_forward(preatt, scale);
//   y = att v; out = unpermute(y)
// and the backward runs the same steps in reverse.
//
// Shapes: qkv/dqkv (B,T,3C) holding q, k, v one after another along the last
// axis; q,k,v,dq,dk,dv,y,dy (B,NH,T,hs) with C = NH*hs; preatt, att, datt,
// dpreatt (B,NH,T,T) seen as BNH*T rows of T; out/dout (B,T,C).
// Activation gradients overwrite (=). scale = 1/sqrt(hs), from the wrapper.
//
//   attention_permute_kernel1:            q[b,nh,t,d] = qkv[b,t,0*C + nh*hs + d]
//                                         (k: 1*C, v: 2*C)
//   attention_unpermute_kernel1:          out[b,t,nh*hs + d] = y[b,nh,t,d]
//   attention_softmax_forward_kernel1:    att[r, j] = softmax_{j<=t}(scale * preatt[r, j])
//                                         for j <= t, 0 for j > t (row r = (bnh, t));
//                                         att may alias preatt (in place)
//   attention_unpermute_backward_kernel1: dy[b,nh,t,d] = dout[b,t,nh*hs + d]
//   attention_softmax_backward_kernel1:   dpreatt[r, j] = scale * att[r,j] *
//                                             (datt[r,j] - sum_{i<=t} datt[r,i] * att[r,i])
//                                         for j <= t, 0 for j > t; dpreatt may alias datt
//   attention_permute_backward_kernel1:   dqkv[b,t,0*C + nh*hs + d] = dq[b,nh,t,d]
//                                         (dk: 1*C, dv: 2*C)
//
// Launch (the wrapper's grid/block helper), none uses shared memory:
//   permute, unpermute, unpermute_backward, permute_backward: one thread per
//       element of the (B,T,C) or (B,T,3C) tensor; grid CEIL_DIV(elements, 256),
//       block 256 (elements = B*T*C for the first three, B*T*3C for the last).
//   softmax_forward, softmax_backward: one warp per row; block 256 (8 warps; any
//       multiple of 32 works), grid CEIL_DIV(BNH*T * 32, 256).
//
// Versions:
//   1: plain port of the oracle; the softmaxes read a row three (forward) or
//      two (backward) times from global memory.
#include "common.cuh"

extern "C" __global__ void attention_permute_kernel1(floatX* __restrict__ q,
                                                     floatX* __restrict__ k,
                                                     floatX* __restrict__ v,
                                                     const floatX* __restrict__ qkv,
                                                     int B, int T, int NH, int hs) {
    // one thread per element of q (and of k and v): idx over (B,NH,T,hs)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) { return; }
    const int C = NH * hs;
    int d = idx % hs;
    int t = (idx / hs) % T;
    int nh = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    int src = (b * T + t) * 3 * C + nh * hs + d;
    q[idx] = qkv[src];
    k[idx] = qkv[src + C];
    v[idx] = qkv[src + 2 * C];
}

extern "C" __global__ void attention_unpermute_kernel1(floatX* __restrict__ out,
                                                       const floatX* __restrict__ y,
                                                       int B, int T, int NH, int hs) {
    // one thread per element of out: idx over (B,T,NH,hs) = (B,T,C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int t = (idx / (hs * NH)) % T;
    int b = idx / (hs * NH * T);
    out[idx] = y[((b * NH + nh) * T + t) * hs + d];
}

extern "C" __global__ void attention_softmax_forward_kernel1(floatX* att,
                                                             const floatX* preatt,
                                                             float scale, int BNH, int T) {
    // no __restrict__: att may alias preatt. Each lane reads and then writes
    // only its own columns, after both reductions, so in place is safe.
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= BNH * T) { return; }  // the whole warp leaves together
    const int t = row % T;
    const floatX* x = preatt + (long long)row * T;
    floatX* y = att + (long long)row * T;

    float maxval = -INFINITY;
    for (int j = lane; j <= t; j += WARP_SIZE) { maxval = fmaxf(maxval, scale * to_float(x[j])); }
    maxval = warp_reduce_max(maxval);  // finite: column 0 is always unmasked

    float sum = 0.0f;
    for (int j = lane; j <= t; j += WARP_SIZE) { sum += expf(scale * to_float(x[j]) - maxval); }
    sum = warp_reduce_sum(sum);

    for (int j = lane; j < T; j += WARP_SIZE) {
        float p = (j <= t) ? expf(scale * to_float(x[j]) - maxval) / sum : 0.0f;
        y[j] = from_float(p);
    }
}

extern "C" __global__ void attention_unpermute_backward_kernel1(floatX* __restrict__ dy,
                                                                const floatX* __restrict__ dout,
                                                                int B, int T, int NH, int hs) {
    // one thread per element of dout: idx over (B,T,NH,hs) = (B,T,C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int t = (idx / (hs * NH)) % T;
    int b = idx / (hs * NH * T);
    dy[((b * NH + nh) * T + t) * hs + d] = dout[idx];
}

extern "C" __global__ void attention_softmax_backward_kernel1(floatX* dpreatt,
                                                              const floatX* datt,
                                                              const floatX* __restrict__ att,
                                                              float scale, int BNH, int T) {
    // no __restrict__ on dpreatt/datt: they may alias (in place), which is safe
    // for the same reason as in the forward.
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= BNH * T) { return; }  // the whole warp leaves together
    const int t = row % T;
    const long long off = (long long)row * T;

    float dot = 0.0f;  // sum_{j<=t} datt * att (att is 0 beyond t)
    for (int j = lane; j <= t; j += WARP_SIZE) { dot += to_float(datt[off + j]) * to_float(att[off + j]); }
    dot = warp_reduce_sum(dot);

    for (int j = lane; j < T; j += WARP_SIZE) {
        float g = 0.0f;
        if (j <= t) {
            float a = to_float(att[off + j]);
            g = scale * a * (to_float(datt[off + j]) - dot);
        }
        dpreatt[off + j] = from_float(g);
    }
}

extern "C" __global__ void attention_permute_backward_kernel1(floatX* __restrict__ dqkv,
                                                              const floatX* __restrict__ dq,
                                                              const floatX* __restrict__ dk,
                                                              const floatX* __restrict__ dv,
                                                              int B, int T, int NH, int hs) {
    // one thread per element of dqkv: idx over (B,T,3,NH,hs) = (B,T,3C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * 3 * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int which = (idx / (hs * NH)) % 3;
    int t = (idx / (hs * NH * 3)) % T;
    int b = idx / (hs * NH * 3 * T);
    int src = ((b * NH + nh) * T + t) * hs + d;
    const floatX* g = (which == 0) ? dq : (which == 1) ? dk : dv;
    dqkv[idx] = g[src];
}
