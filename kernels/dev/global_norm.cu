// The global_norm lab: versions of kernels/global_norm.cu that the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_global_norm_lab.py keeps each one correct. A version moves into
// kernels/global_norm.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   2: the squared kernel with one 16-byte packet per load (x128: 4 floats or
//      8 bf16) where the data is 16-byte aligned; the n % x128::size tail
//      elements are added by the threads of block 0. Version 1's bf16 loads
//      moved 2 bytes each: 1038 GB/s, 27% of the copy ceiling, against 2906 GB/s
//      for fp32 (H200, benchmarks/gpu_runs/2026-11-28-h200/bench_kernels.log).
//      The same launch shape and finish kernel; the partial sums group the
//      squares differently, so the norm differs from version 1's in the last
//      bits (the graph and the eager step use the same version). Bought: not
//      measured on a GPU yet.
#include "../global_norm.cu"

extern "C" __global__ void global_norm_squared_kernel2(float* __restrict__ partial,
                                                       const floatX* __restrict__ data,
                                                       long long n) {
    __shared__ float shared[WARP_SIZE];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long packets = n / x128::size;
    float sum = 0.0f;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < packets; p += stride) {
        const x128 packet = load128(data + p * x128::size);
        for (int k = 0; k < x128::size; k++) {
            const float x = to_float(packet[k]);
            sum += x * x;
        }
    }
    if (blockIdx.x == 0) {  // the tail past the last whole packet
        for (long long i = packets * x128::size + threadIdx.x; i < n; i += blockDim.x) {
            const float x = to_float(data[i]);
            sum += x * x;
        }
    }
    sum = block_reduce_sum(sum, shared);
    if (threadIdx.x == 0) { partial[blockIdx.x] = sum; }
}
