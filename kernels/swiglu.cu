// swiglu: the gated MLP activations SwiGLU (Llama) and GeGLU (Gemma), elementwise
// over the [gate | up] halves of each row.
//
//   swiglu forward:  out = silu(g) * u,  silu(g) = g / (1 + exp(-g))
//   swiglu backward: dg = dout * u * sig * (1 + g * (1 - sig)),  du = dout * silu(g),
//                    sig = 1 / (1 + exp(-g))
//   geglu forward:   out = gelu(g) * u  (tanh approximation, Gemma's
//                    gelu_pytorch_tanh; the formula of gelu.cu)
//   geglu backward:  dg = dout * u * gelu'(g),  du = dout * gelu(g)
// Activation gradients overwrite (=).
// Shapes: N = B*T rows; inp/dinp (N, 2H) with the gate in columns [0, H) and up
// in [H, 2H); out/dout (N, H).
//
// Launch (the wrapper's grid/block helper): one thread per output element,
// N*H threads; block 256, grid CEIL_DIV(N*H, 256), no shared memory.
//
// Versions:
//   1: plain port of the oracle, one element per thread, scalar loads, expf/tanhf.
#include "common.cuh"

#define GELU_SCALING_FACTOR 0.7978845608028654f  // sqrt(2/pi)
#define GELU_CUBE 0.044715f

// 1 / (1 + exp(-g)): expf overflows to inf for g < -88, giving the right limit 0.
__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_forward_kernel1(floatX* __restrict__ out,
                                                  const floatX* __restrict__ inp, int N, int H) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * H) { return; }
    const long long row = idx / H;
    const int j = (int)(idx % H);
    const float g = to_float(inp[row * 2 * H + j]);
    const float u = to_float(inp[row * 2 * H + H + j]);
    out[idx] = from_float(g * sigmoid_f(g) * u);
}

extern "C" __global__ void swiglu_backward_kernel1(floatX* __restrict__ dinp,
                                                   const floatX* __restrict__ dout,
                                                   const floatX* __restrict__ inp, int N, int H) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * H) { return; }
    const long long row = idx / H;
    const int j = (int)(idx % H);
    const float g = to_float(inp[row * 2 * H + j]);
    const float u = to_float(inp[row * 2 * H + H + j]);
    const float d = to_float(dout[idx]);
    const float sig = sigmoid_f(g);
    dinp[row * 2 * H + j] = from_float(d * u * sig * (1.0f + g * (1.0f - sig)));
    dinp[row * 2 * H + H + j] = from_float(d * g * sig);
}

extern "C" __global__ void geglu_forward_kernel1(floatX* __restrict__ out,
                                                 const floatX* __restrict__ inp, int N, int H) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * H) { return; }
    const long long row = idx / H;
    const int j = (int)(idx % H);
    const float g = to_float(inp[row * 2 * H + j]);
    const float u = to_float(inp[row * 2 * H + H + j]);
    const float th = tanhf(GELU_SCALING_FACTOR * (g + GELU_CUBE * g * g * g));
    out[idx] = from_float(0.5f * g * (1.0f + th) * u);
}

extern "C" __global__ void geglu_backward_kernel1(floatX* __restrict__ dinp,
                                                  const floatX* __restrict__ dout,
                                                  const floatX* __restrict__ inp, int N, int H) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)N * H) { return; }
    const long long row = idx / H;
    const int j = (int)(idx % H);
    const float g = to_float(inp[row * 2 * H + j]);
    const float u = to_float(inp[row * 2 * H + H + j]);
    const float d = to_float(dout[idx]);
    const float g2 = g * g;
    const float th = tanhf(GELU_SCALING_FACTOR * (g + GELU_CUBE * g2 * g));
    const float sech2 = 1.0f - th * th;
    const float local = 0.5f * (1.0f + th)
                      + 0.5f * g * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * GELU_CUBE * g2);
    dinp[row * 2 * H + j] = from_float(d * u * local);
    dinp[row * 2 * H + H + j] = from_float(d * 0.5f * g * (1.0f + th));
}
