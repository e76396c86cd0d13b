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
//      memory, exp computed twice per element.
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
