// adamw: one AdamW step with llm.c's semantics (llmcu/cpu/adamw.py), in place.
//
//   g = grads[i] * grad_scale                      (grad_scale: the clipping factor)
//   m = beta1 m + (1 - beta1) g                    v = beta2 v + (1 - beta2) g^2
//   m_hat = m / beta1_correction                   v_hat = v / beta2_correction
//   params[i] -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * params[i])
// with beta1_correction = 1 - beta1^t and beta2_correction = 1 - beta2^t at the
// 1-based step t, computed on the host. Decoupled weight decay uses the old
// parameter; the wrapper passes weight_decay = 0 for biases and layernorms.
// Shapes: params, grads, m, v flat float arrays of n elements (master weights
// and moments stay fp32 whatever floatX is).
//
// Launch (the wrapper's grid/block helper): block 256, grid CEIL_DIV(n, 256),
// no shared memory. The grid-stride loop makes any grid correct, so a smaller
// grid (a few blocks per SM) also works.
//
// Versions:
//   1: plain port, one element per loop iteration; the moment updates are
//      written m += (1 - beta1)(g - m) as in the oracle.
#include "common.cuh"

extern "C" __global__ void adamw_kernel1(float* __restrict__ params,
                                         const float* __restrict__ grads,
                                         float* __restrict__ m, float* __restrict__ v,
                                         long long n, float lr, float beta1, float beta2,
                                         float beta1_correction, float beta2_correction,
                                         float eps, float weight_decay, float grad_scale) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = grads[i] * grad_scale;
        float mi = m[i];
        float vi = v[i];
        mi += (1.0f - beta1) * (g - mi);
        vi += (1.0f - beta2) * (g * g - vi);
        m[i] = mi;
        v[i] = vi;
        float m_hat = mi / beta1_correction;
        float v_hat = vi / beta2_correction;
        float p = params[i];
        params[i] = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
    }
}
