// adamw: one AdamW step with llm.c's semantics (llmcu/cpu/adamw.py), in place.
//
//   g = grads[i] * grad_scale                      (grad_scale: the clipping factor)
//   m = beta1 m + (1 - beta1) g                    v = beta2 v + (1 - beta2) g^2
//   m_hat = m / beta1_correction                   v_hat = v / beta2_correction
//   params[i] -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * params[i])
// with beta1_correction = 1 - beta1^t and beta2_correction = 1 - beta2^t at the
// 1-based step t, computed on the host. Decoupled weight decay uses the old
// parameter; the wrapper passes weight_decay = 0 for biases and layernorms.
// Shapes: kernel1: params, grads, m, v flat float arrays of n elements.
// kernel2: params and grads floatX, master_params, m, v float (master weights
// and moments stay fp32 whatever floatX is); master_params may be null.
//
// Launch (the wrapper's grid/block helper): block 256, grid CEIL_DIV(n, 256)
// (kernel3: CEIL_DIV(n / x128::size, 256)), no shared memory. The grid-stride loop makes any grid correct, so a smaller
// grid (a few blocks per SM) also works.
//
// Versions:
//   1: plain port, one element per loop iteration; the moment updates are
//      written m += (1 - beta1)(g - m) as in the oracle. fp32 only.
//   2: mixed precision (llm.c's -w): floatX params and grads. With fp32 master
//      weights (master_params != null) the update reads and writes the master
//      copy, exactly as kernel1 does on fp32 params, and writes the floatX
//      params as the master value stochastically rounded; without them
//      (master_params == null) the floatX params are read, updated in fp32 and
//      stochastically rounded in place. Stochastic rounding keeps updates much
//      smaller than a bf16 ulp from vanishing (rounding to nearest would drop
//      every one of them); its random bits are a hash of (seed, element
//      index), so no RNG state is kept. For floatX = float the rounding is the
//      identity and, without master weights, kernel2 equals kernel1.
//      Not a speed version: same memory pattern as 1.
//   3: kernel2 with 16-byte loads and stores: a thread takes one x128 packet of
//      params and grads (4 floats or 8 bf16) and the matching f128 packets of
//      m, v and master weights; the params are read only without master
//      weights. Needs n % x128::size == 0 and 16-byte aligned arrays (the
//      wrapper checks). Element for element the arithmetic and the random bits
//      of kernel2, so its results are kernel2's bit for bit.
//      Bought: not measured on a GPU yet (benchmarks/bench_kernels.py).
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

extern "C" __global__ void adamw_kernel2(floatX* __restrict__ params,
                                         float* __restrict__ master_params,
                                         const floatX* __restrict__ grads,
                                         float* __restrict__ m, float* __restrict__ v,
                                         long long n, float lr, float beta1, float beta2,
                                         float beta1_correction, float beta2_correction,
                                         float eps, float weight_decay, float grad_scale,
                                         unsigned int seed) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float g = to_float(grads[i]) * grad_scale;
        float mi = m[i];
        float vi = v[i];
        mi += (1.0f - beta1) * (g - mi);
        vi += (1.0f - beta2) * (g * g - vi);
        m[i] = mi;
        v[i] = vi;
        float m_hat = mi / beta1_correction;
        float v_hat = vi / beta2_correction;
        float p = (master_params != nullptr) ? master_params[i] : to_float(params[i]);
        p = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
        if (master_params != nullptr) { master_params[i] = p; }
        params[i] = from_float_stochastic(p, random_u32(seed, i));
    }
}

extern "C" __global__ void adamw_kernel3(floatX* __restrict__ params,
                                         float* __restrict__ master_params,
                                         const floatX* __restrict__ grads,
                                         float* __restrict__ m, float* __restrict__ v,
                                         long long n, float lr, float beta1, float beta2,
                                         float beta1_correction, float beta2_correction,
                                         float eps, float weight_decay, float grad_scale,
                                         unsigned int seed) {
    const long long stride = (long long)gridDim.x * blockDim.x * x128::size;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * x128::size; i < n;
         i += stride) {
        const x128 g = load128(grads + i);
        x128 p_old;
        if (master_params == nullptr) { p_old = load128(params + i); }
        x128 p_new;
        for (int j = 0; j < x128::size; j += f128::size) {
            f128 mj = load128f(m + i + j);
            f128 vj = load128f(v + i + j);
            f128 pj;
            if (master_params != nullptr) {
                pj = load128f(master_params + i + j);
            } else {
                for (int k = 0; k < f128::size; k++) { pj[k] = to_float(p_old[j + k]); }
            }
            for (int k = 0; k < f128::size; k++) {
                float gk = to_float(g[j + k]) * grad_scale;
                float mk = mj[k];
                float vk = vj[k];
                mk += (1.0f - beta1) * (gk - mk);
                vk += (1.0f - beta2) * (gk * gk - vk);
                mj[k] = mk;
                vj[k] = vk;
                float m_hat = mk / beta1_correction;
                float v_hat = vk / beta2_correction;
                float p = pj[k];
                p = p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
                pj[k] = p;
                p_new[j + k] = from_float_stochastic(p, random_u32(seed, i + j + k));
            }
            store128f(m + i + j, mj);
            store128f(v + i + j, vj);
            if (master_params != nullptr) { store128f(master_params + i + j, pj); }
        }
        store128(params + i, p_new);
    }
}
