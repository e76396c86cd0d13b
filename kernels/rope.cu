// rope: rotary position embeddings on the fused qkv activation (Llama), with
// Hugging Face's "rotate_half" pairing: element i of a head pairs with element
// i + hs/2. At position t, with c = cos[t][i] and s = sin[t][i]:
//
//   forward:  x1' = x1 * c - x2 * s;   x2' = x2 * c + x1 * s
//   backward: dx1 = d1 * c + d2 * s;   dx2 = d2 * c - d1 * s   (the transposed
//             rotation; overwrite)
// Query and key heads are rotated; value heads are copied unchanged.
// Shapes: inp/out/dout/dinp (B,T,(NH+2*NKV)*hs): NH query heads, then NKV key
// heads, then NKV value heads, each hs wide (hs even); cos/sin (>= T, hs/2)
// float, row t for position t (the tables of llmcu.cpu.rope.rope_frequencies).
// out may alias inp (and dinp dout): each thread reads its pair, then writes it.
//
// Launch (the wrapper's grid/block helper): one thread per pair (x1, x2), i.e.
// B*T*(NH+2*NKV)*hs/2 threads; block 256, grid CEIL_DIV(threads, 256), no
// shared memory.
//
// Versions:
//   1: plain port of the oracle, one pair per thread, scalar loads.
#include "common.cuh"

// The rotation of one pair by angle (c, s); the backward passes -s.
__device__ __forceinline__ void rope_pair(floatX* out, const floatX* inp, const float* cos_table,
                                          const float* sin_table, float sign, int B, int T,
                                          int NH, int NKV, int hs) {
    const int half = hs / 2;
    const int heads = NH + 2 * NKV;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * T * heads * half) { return; }
    const int i = (int)(idx % half);                 // pair index inside the head
    const int h = (int)((idx / half) % heads);       // head: q 0..NH-1, k, then v
    const long long bt = idx / ((long long)half * heads);  // b * T + t
    const int t = (int)(bt % T);
    const long long base = bt * heads * hs + (long long)h * hs + i;
    const float x1 = to_float(inp[base]);
    const float x2 = to_float(inp[base + half]);
    if (h >= NH + NKV) {  // value head: copy
        out[base] = from_float(x1);
        out[base + half] = from_float(x2);
        return;
    }
    const float c = cos_table[(long long)t * half + i];
    const float s = sign * sin_table[(long long)t * half + i];
    out[base] = from_float(x1 * c - x2 * s);
    out[base + half] = from_float(x2 * c + x1 * s);
}

extern "C" __global__ void rope_forward_kernel1(floatX* out, const floatX* inp,
                                                const float* __restrict__ cos_table,
                                                const float* __restrict__ sin_table,
                                                int B, int T, int NH, int NKV, int hs) {
    rope_pair(out, inp, cos_table, sin_table, 1.0f, B, T, NH, NKV, hs);
}

extern "C" __global__ void rope_backward_kernel1(floatX* dinp, const floatX* dout,
                                                 const float* __restrict__ cos_table,
                                                 const float* __restrict__ sin_table,
                                                 int B, int T, int NH, int NKV, int hs) {
    rope_pair(dinp, dout, cos_table, sin_table, -1.0f, B, T, NH, NKV, hs);
}
