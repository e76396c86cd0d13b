// The classifier lab: versions of kernels/classifier.cu that the training step does not run,
// numbered as when they were written. benchmarks/lab.py runs each against the NumPy
// oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_classifier_lab.py keeps each one correct. A version moves into
// kernels/classifier.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   3 (fused_classifier_kernel3, below): kernel2 with the row kept in registers: read
//      once, written once, the loads issued together. Speed not measured yet.
#include "../classifier.cu"

// fused_classifier_kernel3: kernel2 with the row kept in registers. Each thread loads
// its packets of the row (at most CLASSIFIER3_PACKETS x128 packets: columns
// (threadIdx.x + p * blockDim.x) * x128::size) all at once, runs the online softmax
// on them and writes dlogits from the same registers: the row is read once and
// written once (kernel2 reads it twice), and the loads are issued together instead
// of one packet per loop trip. Element for element the arithmetic and the order of
// kernel2, so the results are kernel2's. Needs Vp % x128::size == 0, 16-byte
// aligned logits and Vp <= blockDim.x * x128::size * CLASSIFIER3_PACKETS (1024
// threads: 65536 bf16 or 32768 fp32 columns; the wrapper checks). Same launch as 1.
#define CLASSIFIER3_PACKETS 8
extern "C" __global__ void fused_classifier_kernel3(floatX* logits, float* __restrict__ losses,
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

    x128 keep[CLASSIFIER3_PACKETS];
#pragma unroll
    for (int p = 0; p < CLASSIFIER3_PACKETS; p++) {
        const int j0 = (threadIdx.x + p * blockDim.x) * x128::size;
        if (j0 < Vp) { keep[p] = load128(x + j0); }
    }
    float m = -INFINITY, s = 0.0f;
#pragma unroll
    for (int p = 0; p < CLASSIFIER3_PACKETS; p++) {
        const int j0 = (threadIdx.x + p * blockDim.x) * x128::size;
        for (int k = 0; k < x128::size; k++) {
            if (j0 + k < V) {
                const float v = to_float(keep[p][k]);
                if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }  // one exp per element
                else { s += expf(v - m); }
            }
        }
    }
    block_online_softmax_merge(m, s, shared_m, shared_s);
    if (threadIdx.x == 0) { losses[row] = logf(s) + m - target_logit; }

    if (write_dlogits) {
        const float inv = 1.0f / s;
#pragma unroll
        for (int p = 0; p < CLASSIFIER3_PACKETS; p++) {
            const int j0 = (threadIdx.x + p * blockDim.x) * x128::size;
            if (j0 >= Vp) { continue; }
            x128 result;
            for (int k = 0; k < x128::size; k++) {
                const int j = j0 + k;
                float g = 0.0f;
                if (j < V) { g = dloss * (expf(to_float(keep[p][k]) - m) * inv - (j == target ? 1.0f : 0.0f)); }
                result[k] = from_float(g);
            }
            store128(x + j0, result);
        }
    }
}
