// classifier: softmax + cross-entropy over the padded vocabulary, fused with
// the backward into the logits buffer (llm.c's fused classifier).
//
//   fused_classifier: per row (b,t), over the first V columns only:
//       maxval = max_j logits[j];  sum = sum_j exp(logits[j] - maxval)
//       losses[row] = log(sum) + maxval - logits[target]   (logsumexp - logit:
//                     exact where -log(p[target]) would underflow)
//       if write_dlogits: logits[j] = dloss * (p_j - [j == target]) for j < V,
//                         0 for V <= j < Vp   (in place: dlogits overwrite the logits)
//   softmax_forward: probs[row, j] = exp(logits[j] - maxval) / sum for j < V,
//                    0 for V <= j < Vp   (inference and tests)
// Shapes: N = B*T rows; logits (N,Vp) floatX; probs (N,Vp) float; targets (N,)
// int32 in [0,V); losses (N,) float. dloss is the same for every row (1/(B*T)
// for a mean loss). Activation gradients overwrite (=).
//
// Launch (the wrapper's grid/block helper): one block per row; grid N,
// block 1024 (any multiple of 32 up to 1024: block_reduce_* assumptions),
// no dynamic shared memory (a static 32-float buffer).
//
// Versions:
//   1: plain port; the row is read three times (max, sum, write) from global
//      memory, exp computed twice per element. H200 (2026-11-28): 32% of copy.
//   2 (fused_classifier_kernel2): one read pass for both the max and the sum
//      (online softmax: each thread keeps a running max m and the sum s of
//      exp(x - m), rescaling s when m grows; threads, then warps merge their
//      (m, s) pairs in a fixed tree, so the result is deterministic), then the
//      read+write pass for dlogits: 3 row-sized transfers instead of 4, and 16-byte
//      loads and stores (x128). Needs Vp % x128::size == 0 and 16-byte aligned
//      logits (the wrapper checks). Same launch as 1. H200 (2026-11-28, bf16 d12 B=16):
//      2.05 ms for the dlogits pass, 40% of copy (benchmarks/RESULTS.md, GPU pass 3).
//   The lab (kernels/dev/classifier.cu) holds version 3 (the row kept in registers).
#include "common.cuh"

extern "C" __global__ void fused_classifier_kernel1(floatX* logits, float* __restrict__ losses,
                                                    const int* __restrict__ targets,
                                                    float dloss, int N, int V, int Vp,
                                                    int write_dlogits) {
    __shared__ float shared[WARP_SIZE];
    const int row = blockIdx.x;
    if (row >= N) { return; }  // the whole block leaves together
    floatX* x = logits + (long long)row * Vp;
    const int target = targets[row];
    // Read the target's logit before any thread overwrites the row; the
    // barriers inside block_reduce_max order this read before the writes.
    const float target_logit = to_float(x[target]);

    float maxval = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) { maxval = fmaxf(maxval, to_float(x[j])); }
    maxval = block_reduce_max(maxval, shared);

    float sum = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) { sum += expf(to_float(x[j]) - maxval); }
    sum = block_reduce_sum(sum, shared);

    if (threadIdx.x == 0) { losses[row] = logf(sum) + maxval - target_logit; }

    if (write_dlogits) {
        // each thread rewrites only the columns it read: in place is safe
        for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
            float g = 0.0f;
            if (j < V) {
                float p = expf(to_float(x[j]) - maxval) / sum;
                g = dloss * (p - (j == target ? 1.0f : 0.0f));
            }
            x[j] = from_float(g);
        }
    }
}

// (m, s) <- the merge of two online-softmax states (running max, sum of exp(x - max)).
// Symmetric in its two arguments, so both lanes of a shuffle pair agree; a state with
// m = -inf (no elements yet) has s = 0 and merges as the identity.
__device__ __forceinline__ void online_softmax_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = (m == mx ? s : s * expf(m - mx)) + (m2 == mx ? s2 : s2 * expf(m2 - mx));
    m = mx;
}

// Every thread's (m, s) merged over the block, in a fixed tree (lanes, then warps): on
// return every thread of warp 0 holds the block's state (thread 0 is what the kernels use).
__device__ __forceinline__ void block_online_softmax_merge(float& m, float& s, float* shared_m, float* shared_s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        online_softmax_merge(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    }
    if (lane == 0) { shared_m[warp] = m; shared_s[warp] = s; }
    __syncthreads();
    const int num_warps = blockDim.x / WARP_SIZE;
    m = lane < num_warps ? shared_m[lane] : -INFINITY;
    s = lane < num_warps ? shared_s[lane] : 0.0f;
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        online_softmax_merge(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    }
}

extern "C" __global__ void fused_classifier_kernel2(floatX* logits, float* __restrict__ losses,
                                                    const int* __restrict__ targets,
                                                    float dloss, int N, int V, int Vp,
                                                    int write_dlogits) {
    __shared__ float shared_m[WARP_SIZE];
    __shared__ float shared_s[WARP_SIZE];
    const int row = blockIdx.x;
    if (row >= N) { return; }  // the whole block leaves together
    floatX* x = logits + (long long)row * Vp;
    const int target = targets[row];
    const float target_logit = to_float(x[target]);  // read before the barriers below, so before any write
    const int stride = blockDim.x * x128::size;

    float m = -INFINITY, s = 0.0f;
    for (int j0 = threadIdx.x * x128::size; j0 < V; j0 += stride) {
        const x128 packet = load128(x + j0);
        for (int k = 0; k < x128::size; k++) {
            if (j0 + k < V) {
                const float v = to_float(packet[k]);
                if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }  // one exp per element
                else { s += expf(v - m); }
            }
        }
    }
    block_online_softmax_merge(m, s, shared_m, shared_s);
    if (threadIdx.x == 0) { losses[row] = logf(s) + m - target_logit; }

    if (write_dlogits) {
        const float inv = 1.0f / s;
        for (int j0 = threadIdx.x * x128::size; j0 < Vp; j0 += stride) {  // the columns this thread read
            const x128 packet = load128(x + j0);
            x128 result;
            for (int k = 0; k < x128::size; k++) {
                const int j = j0 + k;
                float g = 0.0f;
                if (j < V) { g = dloss * (expf(to_float(packet[k]) - m) * inv - (j == target ? 1.0f : 0.0f)); }
                result[k] = from_float(g);
            }
            store128(x + j0, result);
        }
    }
}

extern "C" __global__ void softmax_forward_kernel1(float* __restrict__ probs,
                                                   const floatX* __restrict__ logits,
                                                   int N, int V, int Vp) {
    __shared__ float shared[WARP_SIZE];
    const int row = blockIdx.x;
    if (row >= N) { return; }  // the whole block leaves together
    const floatX* x = logits + (long long)row * Vp;
    float* p = probs + (long long)row * Vp;

    float maxval = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) { maxval = fmaxf(maxval, to_float(x[j])); }
    maxval = block_reduce_max(maxval, shared);

    float sum = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) { sum += expf(to_float(x[j]) - maxval); }
    sum = block_reduce_sum(sum, shared);

    for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
        p[j] = (j < V) ? expf(to_float(x[j]) - maxval) / sum : 0.0f;
    }
}


// classifier_loss_mean_kernel1: total[0] += scale * sum_i losses[i], i < n, summed in double: the
// mean loss kept on the device (scale = 1 / (B*T*micro-steps)), so a captured training
// step (llmcu/cuda/graphs.py) needs no host read until the caller wants the number.
// Launch: ONE block of 1024 threads (LOSS_MEAN_BLOCK), no dynamic shared memory; each
// thread sums a strided share in order, then a fixed tree over the threads: deterministic.
#define LOSS_MEAN_BLOCK 1024
extern "C" __global__ void classifier_loss_mean_kernel1(double* __restrict__ total,
                                             const float* __restrict__ losses, int n,
                                             double scale) {
    __shared__ double partial[LOSS_MEAN_BLOCK];
    double sum = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { sum += (double)losses[i]; }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int width = blockDim.x / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) { partial[threadIdx.x] += partial[threadIdx.x + width]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) { total[0] += scale * partial[0]; }
}
