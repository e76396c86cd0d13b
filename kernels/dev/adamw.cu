// The adamw lab: versions of kernels/adamw.cu that the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_adamw_lab.py keeps each one correct. A version moves into
// kernels/adamw.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   3: kernel2 with 16-byte loads and stores: a thread takes one x128 packet of
//      params and grads (4 floats or 8 bf16) and the matching f128 packets of
//      m, v and master weights; the params are read only without master
//      weights. Needs n % x128::size == 0 and 16-byte aligned arrays (the
//      wrapper checks). Element for element the arithmetic and the random bits
//      of kernel2, so its results are kernel2's bit for bit.
//      Bought: not measured on a GPU yet (benchmarks/bench_kernels.py).
//      H200 (2026-11-28, fp32, 124M parameters): 102% of the copy ceiling, kernel1 71%;
//      the step runs kernel1/2 eagerly and kernel4 (its wide mode is this packet path) in
//      the graph, so a promotion needs the step measured with it.
#include "../adamw.cu"

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
        adamw_packet(params, master_params, grads, m, v, i, i, seed, lr, beta1, beta2,
                     beta1_correction, beta2_correction, eps, weight_decay, grad_scale);
    }
}
