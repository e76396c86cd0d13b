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
// kernel4: kernel2's arrays over all parameter tensors at once (see version 4).
//
// Launch (the wrapper's grid/block helper): block 256, grid CEIL_DIV(n, 256)
// (kernel3: CEIL_DIV(n / x128::size, 256)), no shared memory. The grid-stride loop makes any grid correct, so a smaller
// grid (a few blocks per SM) also works. kernel4: one block per chunk of the
// launch table (grid n_chunks), block 256 (any size works: a block loops over
// its chunk).
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
//   3: kernel2 with 16-byte packets: in the lab (kernels/dev/adamw.cu); its packet
//      helper (adamw_packet) is kernel4's wide mode.
//   4: one launch for all parameter tensors (kernel2 is launched once per
//      tensor: 16 times for GPT-2, whose layers are stacked as in llm.c), and the per-step scalars read from device memory (lr, bias
//      corrections, clip scale in hyper; seed and step in step_seed), so a
//      captured CUDA graph replays it with each step's values. One block per
//      chunk of one tensor; a launch table (llmcu/cuda/adamw.py,
//      adamw_tensor_table) gives each block its tensor and first element, each
//      tensor its first element and weight decay. Per element kernel2's
//      arithmetic (adamw_element) with tensor t's decay and the random bits
//      random_u32(seed_t, i - tensor_start[t]), seed_t = mix32(mix32(mix32(seed)
//      ^ step) ^ (t + 1)) (llmcu/cuda/mixed_precision.rounding_seed): its results
//      are the per-tensor kernel2 launches' bit for bit.
//      Bought (H200, 2026-11-28, GPT-2 d12's 16 tensors, before the wide mode; an
//      inline timing script, mean of 20; benchmarks/RESULTS.md "GPU pass 3"): about the
//      time of the 16 per-tensor launches (fp32 1.05 ms vs kernel1 1.24; bf16 with master
//      weights 0.99 vs 0.97; bf16 without 0.94 vs 0.86): what it buys is the captured
//      graph's device-side scalars, not speed.
//      Launch: grid n_chunks, block 256. Shapes: params,
//      grads, m, v, master_params n elements; chunk_tensor, chunk_start
//      (n_chunks,); tensor_start (n_tensors + 1,); tensor_decay (n_tensors,);
//      hyper (4,) = [lr, beta1_correction, beta2_correction, grad_scale];
//      step_seed (2,) = [seed, step].
//      wide = 1: 16-byte loads and stores (adamw_packet, version 3's), where every tensor
//      starts at a multiple of x128::size, the chunk is one, and the arrays are 16-byte
//      aligned (the wrapper checks): the same arithmetic and random bits, so the same results.
//      Bought: not measured on a GPU.
#include "common.cuh"

// One AdamW element, the formula of versions 2 to 4 written once: updates the
// moments m, v in place and returns the new fp32 parameter from the old one, p.
// grad is the unscaled gradient (already widened to float). Version 1 spells out
// the same operations in the same order, so for fp32 without master weights
// kernel2 (and 3, 4) equal kernel1 bit for bit.
__device__ __forceinline__ float adamw_element(float grad, float& m, float& v, float p, float lr,
                                               float beta1, float beta2, float beta1_correction,
                                               float beta2_correction, float eps,
                                               float weight_decay, float grad_scale) {
    float g = grad * grad_scale;
    m += (1.0f - beta1) * (g - m);
    v += (1.0f - beta2) * (g * g - v);
    float m_hat = m / beta1_correction;
    float v_hat = v / beta2_correction;
    return p - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * p);
}

// Element i of versions 2 and 4: read grads, m, v and the master (or floatX) parameter,
// adamw_element, write them back, and the floatX parameter stochastically rounded with
// the random bits random_u32(seed, r) (r: the index within the launch's tensor).
__device__ __forceinline__ void adamw_index(floatX* __restrict__ params, float* __restrict__ master_params,
                                            const floatX* __restrict__ grads, float* __restrict__ m,
                                            float* __restrict__ v, long long i, long long r,
                                            unsigned int seed, float lr, float beta1, float beta2,
                                            float beta1_correction, float beta2_correction, float eps,
                                            float weight_decay, float grad_scale) {
    float mi = m[i];
    float vi = v[i];
    float p = (master_params != nullptr) ? master_params[i] : to_float(params[i]);
    p = adamw_element(to_float(grads[i]), mi, vi, p, lr, beta1, beta2, beta1_correction,
                      beta2_correction, eps, weight_decay, grad_scale);
    m[i] = mi;
    v[i] = vi;
    if (master_params != nullptr) { master_params[i] = p; }
    params[i] = from_float_stochastic(p, random_u32(seed, r));
}

// The x128 packet of elements [i, i + x128::size) (16-byte loads and stores), each as
// adamw_index with random index r + its offset in the packet: versions 3 and 4 (wide).
__device__ __forceinline__ void adamw_packet(floatX* __restrict__ params, float* __restrict__ master_params,
                                             const floatX* __restrict__ grads, float* __restrict__ m,
                                             float* __restrict__ v, long long i, long long r,
                                             unsigned int seed, float lr, float beta1, float beta2,
                                             float beta1_correction, float beta2_correction, float eps,
                                             float weight_decay, float grad_scale) {
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
            float p = adamw_element(to_float(g[j + k]), mj[k], vj[k], pj[k], lr, beta1,
                                    beta2, beta1_correction, beta2_correction, eps,
                                    weight_decay, grad_scale);
            pj[k] = p;
            p_new[j + k] = from_float_stochastic(p, random_u32(seed, r + j + k));
        }
        store128f(m + i + j, mj);
        store128f(v + i + j, vj);
        if (master_params != nullptr) { store128f(master_params + i + j, pj); }
    }
    store128(params + i, p_new);
}

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
        adamw_index(params, master_params, grads, m, v, i, i, seed, lr, beta1, beta2,
                    beta1_correction, beta2_correction, eps, weight_decay, grad_scale);
    }
}


extern "C" __global__ void adamw_kernel4(floatX* __restrict__ params,
                                         float* __restrict__ master_params,
                                         const floatX* __restrict__ grads,
                                         float* __restrict__ m, float* __restrict__ v,
                                         const int* __restrict__ chunk_tensor,
                                         const long long* __restrict__ chunk_start,
                                         const long long* __restrict__ tensor_start,
                                         const float* __restrict__ tensor_decay,
                                         const float* __restrict__ hyper,
                                         const unsigned int* __restrict__ step_seed,
                                         float beta1, float beta2, float eps, int chunk, int wide) {
    // This block's chunk: elements [start, end) of tensor t, never past its end.
    const int t = chunk_tensor[blockIdx.x];
    const long long first = tensor_start[t];
    const long long start = chunk_start[blockIdx.x];
    const long long end = min(start + (long long)chunk, tensor_start[t + 1]);
    const float weight_decay = tensor_decay[t];
    // The step's scalars, from device memory (a CUDA graph replays the launch as is).
    const float lr = hyper[0];
    const float beta1_correction = hyper[1];
    const float beta2_correction = hyper[2];
    const float grad_scale = hyper[3];
    // mixed_precision.rounding_seed(seed, step, t): each tensor's random bits are
    // those of its own kernel2 launch, indexed from the tensor's first element.
    const unsigned int seed = mix32(mix32(mix32(step_seed[0]) ^ step_seed[1]) ^ (unsigned int)(t + 1));
    if (wide) {  // every tensor start and the chunk a multiple of x128::size, arrays 16-byte aligned
        for (long long i = start + (long long)threadIdx.x * x128::size; i < end;
             i += (long long)blockDim.x * x128::size) {
            adamw_packet(params, master_params, grads, m, v, i, i - first, seed, lr, beta1, beta2,
                         beta1_correction, beta2_correction, eps, weight_decay, grad_scale);
        }
        return;
    }
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        adamw_index(params, master_params, grads, m, v, i, i - first, seed, lr, beta1, beta2,
                    beta1_correction, beta2_correction, eps, weight_decay, grad_scale);
    }
}
