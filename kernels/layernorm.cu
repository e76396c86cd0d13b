// layernorm: normalise each row of C channels, then scale and shift.
//
//   forward:  mean = sum_c x / C;  var = sum_c (x - mean)^2 / C (biased);
//             rstd = 1 / sqrt(var + eps);  out = (x - mean) * rstd * weight + bias
//   backward: with n = (x - mean) * rstd and g = dout * weight:
//             dinp     = rstd * (g - mean_c(g) - n * mean_c(g * n))   (overwrite)
//             dweight += sum over rows of dout * n                     (accumulate)
//             dbias   += sum over rows of dout                         (accumulate)
// Shapes: N = B*T rows; inp/out/dout/dinp (N,C), weight/bias/dweight/dbias (C,),
// mean/rstd (N,) float, cached by the forward for the backward; the fused forward's
// inp1/inp2/residual and the fused backward's dres (N,C).
//
// Launch (the wrapper's grid/block helper):
//   layernorm_forward_kernel1:
//       one warp per row;
//       block 256 (8 warps; any multiple of 32 works), grid CEIL_DIV(N * 32, 256),
//       no shared memory. Warps past the last row return as a whole.
//   layernorm_backward_kernel2 (pass 1): one warp per row, rows grid-strided;
//       block 32 * W with W = min(8, 48 KiB / (8 * CP)) warps (8 at C = 768),
//       grid min(CEIL_DIV(N, W), PARTIAL_SUM_BLOCKS = 528), dynamic shared memory
//       W * 2 * CP floats (CP = C rounded up to 32 * V); scratch (grid, 2C) float.
//   layernorm_param_backward_reduce_kernel2 (pass 2): block 256 (8 warps x 32
//       columns), grid CEIL_DIV(2C, 32), 4 KiB static shared memory.
//   residual_layernorm_forward_kernel1: one warp per row, as layernorm_forward_kernel1
//       (block 256, grid CEIL_DIV(N * 32, 256), no shared memory).
//   layernorm_backward_add (wrapper): layernorm_backward_kernel2 with add = 1, then
//       layernorm_param_backward_reduce_kernel2, launched as above.
//
// Versions the training step runs (one kernel per op; the lab, kernels/dev/layernorm.cu,
// holds version 0 (a thread per row, the tutorial's start), the 16-byte forward 2 and the
// one-thread-per-column parameter backward 1):
//   layernorm_forward_kernel1: one warp per row, two passes over the row for mean then
//      variance (not E[x^2] - mean^2), exact 1/sqrtf. H200 (2026-11-28, N = 8192, C = 768,
//      fp32): 1232 GB/s, F.layer_norm 1213 (version 2 of the lab: 1038).
//   residual_layernorm_forward_kernel1: the residual add fused in (below).
//   layernorm_backward_kernel2 + layernorm_param_backward_reduce_kernel2: two passes,
//      deterministic (below). H200, bf16 d12 B=16 T=1024: 1.29 ms a step, 37% of copy
//      (version 1: 1% of copy).
//
// The residual adds fused in (llm.c's fused_residual_forward5 and its layernorm backward
// adding into dinp):
//   residual_layernorm_forward_kernel1: residual = inp1 + inp2 (rounded to floatX,
//      stored) and the layernorm of it in one warp per row; wide = 0 sums the row in
//      layernorm_forward_kernel1's order, wide = 1 (16-byte loads and stores) in the lab's
//      forward kernel2's, so it equals residual_forward + that layernorm bit for bit.
//      Per row in floatX it moves 4C (reads inp1, inp2; writes residual, out) where the
//      two calls move 5C (read 2C, write C; read the residual back, write out).
//   layernorm_backward_kernel2, add = 1: dinp += the input gradient in fp32 with one
//      rounding (bf16: one rounding fewer than layernorm_backward into a temporary and
//      residual_forward), dweight/dbias unchanged. Per row it moves 4C (reads dout,
//      inp, dres; writes dres) where the two calls move 6C (dout, inp, dtmp; then
//      dres, dtmp, dres).
//      In the step since GPU pass 4's preparation: the same arithmetic with fewer bytes;
//      what it saves is not measured on a GPU yet.
#include "common.cuh"

// mean and rstd may be null (inference).
extern "C" __global__ void layernorm_forward_kernel1(floatX* __restrict__ out,
                                                     float* __restrict__ mean,
                                                     float* __restrict__ rstd,
                                                     const floatX* __restrict__ inp,
                                                     const floatX* __restrict__ weight,
                                                     const floatX* __restrict__ bias,
                                                     int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    const floatX* x = inp + (long long)row * C;

    float sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) { sum += to_float(x[c]); }
    const float m = warp_reduce_sum(sum) / C;

    float sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float d = to_float(x[c]) - m;
        sq += d * d;
    }
    const float var = warp_reduce_sum(sq) / C;
    const float s = 1.0f / sqrtf(var + eps);

    floatX* o = out + (long long)row * C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        float n = (to_float(x[c]) - m) * s;
        o[c] = from_float(n * to_float(weight[c]) + to_float(bias[c]));
    }
    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
}

// ----------------------------------------------------------------------------
// The residual add fused into the layernorm that reads it (llm.c's
// fused_residual_forward5): residual = inp1 + inp2, rounded to floatX and stored,
// then out/mean/rstd = layernorm(residual) computed from the rounded values. The
// separate residual_forward + layernorm_forward pair writes residual, then reads
// it back for the layernorm; here the row stays in the warp's L1/L2 between the
// three passes. Same arithmetic, in the same order, as residual_forward_kernel1/2
// followed by layernorm_forward_kernel1 (V = 1) or layernorm_forward_kernel2
// (V = x128::size), so the results are the same bit for bit (tested).

// One warp's row: lane `lane` handles columns c = lane * V + k + p * 32 * V in
// every pass, so it reads back only the residual values it wrote itself.
template <int V>
__device__ void residual_layernorm_row(floatX* __restrict__ res, floatX* __restrict__ out,
                                       float* __restrict__ mean, float* __restrict__ rstd,
                                       const floatX* __restrict__ inp1,
                                       const floatX* __restrict__ inp2,
                                       const floatX* __restrict__ weight,
                                       const floatX* __restrict__ bias,
                                       int row, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int step = WARP_SIZE * V;
    const long long offset = (long long)row * C;
    floatX* r = res + offset;

    float sum = 0.0f;
    for (int c = lane * V; c < C; c += step) {
        float as[V], bs[V], rs[V];
        load_floats<V>(as, inp1 + offset + c);
        load_floats<V>(bs, inp2 + offset + c);
#pragma unroll
        for (int k = 0; k < V; k++) {
            rs[k] = to_float(from_float(as[k] + bs[k]));  // the stored (rounded) residual
            sum += rs[k];
        }
        store_floats<V>(r + c, rs);  // exact: rs[k] are floatX values already
    }
    const float m = warp_reduce_sum(sum) / C;

    float sq = 0.0f;
    for (int c = lane * V; c < C; c += step) {
        float xs[V];
        load_floats<V>(xs, r + c);
#pragma unroll
        for (int k = 0; k < V; k++) {
            float d = xs[k] - m;
            sq += d * d;
        }
    }
    const float var = warp_reduce_sum(sq) / C;
    const float s = 1.0f / sqrtf(var + eps);

    floatX* o = out + offset;
    for (int c = lane * V; c < C; c += step) {
        float xs[V], ws[V], bs[V], result[V];
        load_floats<V>(xs, r + c);
        load_floats<V>(ws, weight + c);
        load_floats<V>(bs, bias + c);
#pragma unroll
        for (int k = 0; k < V; k++) {
            float n = (xs[k] - m) * s;
            result[k] = n * ws[k] + bs[k];
        }
        store_floats<V>(o + c, result);
    }
    if (lane == 0) {
        if (mean != nullptr) { mean[row] = m; }
        if (rstd != nullptr) { rstd[row] = s; }
    }
}

// res (N,C) = inp1 + inp2; out (N,C), mean/rstd (N,) = layernorm(res). One warp per
// row (warp_per_row). wide: 16-byte loads and stores (needs C % x128::size == 0 and
// every floatX array 16-byte aligned; the wrapper checks), else scalar. res and out
// must not overlap each other or the inputs (the wrapper checks). mean/rstd may be null.
extern "C" __global__ void residual_layernorm_forward_kernel1(floatX* __restrict__ res,
                                                              floatX* __restrict__ out,
                                                              float* __restrict__ mean,
                                                              float* __restrict__ rstd,
                                                              const floatX* __restrict__ inp1,
                                                              const floatX* __restrict__ inp2,
                                                              const floatX* __restrict__ weight,
                                                              const floatX* __restrict__ bias,
                                                              int N, int C, float eps, int wide) {
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= N) { return; }  // the whole warp leaves together
    if (wide) {
        residual_layernorm_row<x128::size>(res, out, mean, rstd, inp1, inp2, weight, bias, row, C, eps);
    } else {
        residual_layernorm_row<1>(res, out, mean, rstd, inp1, inp2, weight, bias, row, C, eps);
    }
}

// ----------------------------------------------------------------------------
// Version 2 of the backward: two passes, deterministic, no atomics.
//
// Pass 1, layernorm_backward_kernel2: one warp per row as in version 1 (dinp
// overwritten), rows grid-strided over a fixed grid of at most
// llmcu.cuda.runtime.PARTIAL_SUM_BLOCKS blocks. While a warp reads its row it
// also adds the row's dout * n and dout into per-warp fp32 accumulators in
// dynamic shared memory (each lane owns its columns, so no two lanes touch one
// slot); at the end the block adds its warps' accumulators in warp order and
// writes one row of partial sums, scratch[blockIdx.x] = [dweight (C) | dbias (C)].
// Pass 2, layernorm_param_backward_reduce_kernel2: for each of the 2C columns
// the partial rows are summed in a fixed order (warp w of the block takes rows
// w, w + warps, ... in order; then the warps' sums in warp order), and one +=
// goes into the floatX gradient (one rounding for bf16).
//
// Packets: `wide` (set by the wrapper) selects 16-byte loads and stores (V =
// x128::size elements per lane and step; needs C % x128::size == 0 and 16-byte
// aligned dinp, dout, inp, weight), else V = 1 (scalar loads, any C).
// Lane l, step p handles columns c = (p * 32 + l) * V + k, k < V, and keeps their
// partial sums at slot p * 32 * V + k * 32 + l: consecutive lanes hit consecutive
// shared-memory banks. A warp's accumulators are 2 * CP floats, CP = C rounded
// up to a multiple of 32 * V (the last step's slots past C stay zero).

// The rows of one warp: dinp, and the dweight/dbias partial sums into acc.
template <int V>
__device__ void layernorm_backward2_rows(floatX* __restrict__ dinp, float* acc,
                                         const floatX* __restrict__ dout,
                                         const floatX* __restrict__ inp,
                                         const floatX* __restrict__ weight,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ rstd,
                                         int N, int C, int add) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int step = WARP_SIZE * V;
    const int CP = CEIL_DIV(C, step) * step;
    float* dw_acc = acc + (long long)warp * 2 * CP;
    float* db_acc = dw_acc + CP;
    for (int row = blockIdx.x * warps + warp; row < N; row += gridDim.x * warps) {
        const floatX* x = inp + (long long)row * C;
        const floatX* d = dout + (long long)row * C;
        const float m = mean[row];
        const float s = rstd[row];

        float g_sum = 0.0f;   // sum_c g
        float gn_sum = 0.0f;  // sum_c g * n
        for (int c = lane * V, slot = lane; c < C; c += step, slot += step) {
            float xs[V], ds[V], ws[V];
            load_floats<V>(xs, x + c);
            load_floats<V>(ds, d + c);
            load_floats<V>(ws, weight + c);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float n = (xs[k] - m) * s;
                const float g = ds[k] * ws[k];
                g_sum += g;
                gn_sum += g * n;
                dw_acc[slot + k * WARP_SIZE] += ds[k] * n;
                db_acc[slot + k * WARP_SIZE] += ds[k];
            }
        }
        const float g_mean = warp_reduce_sum(g_sum) / C;
        const float gn_mean = warp_reduce_sum(gn_sum) / C;

        floatX* dx = dinp + (long long)row * C;
        for (int c = lane * V; c < C; c += step) {
            float xs[V], ds[V], ws[V], result[V];
            load_floats<V>(xs, x + c);
            load_floats<V>(ds, d + c);
            load_floats<V>(ws, weight + c);
#pragma unroll
            for (int k = 0; k < V; k++) {
                const float n = (xs[k] - m) * s;
                const float g = ds[k] * ws[k];
                result[k] = (g - g_mean - n * gn_mean) * s;
            }
            if (add) {  // dinp += the input gradient: fp32 add, one rounding
                float prev[V];
                load_floats<V>(prev, dx + c);
                // __fadd_rn: never contracted with the "* s" above into an FMA, so in fp32
                // this is residual_forward's add of the stored gradient, bit for bit
#pragma unroll
                for (int k = 0; k < V; k++) { result[k] = __fadd_rn(prev[k], result[k]); }
            }
            store_floats<V>(dx + c, result);
        }
    }
}

// Pass 1. scratch: (gridDim.x, 2C) float, every element written. Dynamic shared
// memory: (blockDim.x / 32) * 2 * CP floats (the wrapper computes it).
// add = 0: dinp = the input gradient (layernorm_backward); add = 1: dinp += it, in
// fp32 with one rounding to floatX (layernorm_backward_add: the GPT-2 backward adds
// each layernorm's input gradient into the residual stream's gradient here instead
// of a separate residual_forward). dinp must not overlap dout or inp (__restrict__).
extern "C" __global__ void layernorm_backward_kernel2(floatX* __restrict__ dinp,
                                                      float* __restrict__ scratch,
                                                      const floatX* __restrict__ dout,
                                                      const floatX* __restrict__ inp,
                                                      const floatX* __restrict__ weight,
                                                      const float* __restrict__ mean,
                                                      const float* __restrict__ rstd,
                                                      int N, int C, int wide, int add) {
    DYNAMIC_SHARED(float, acc);
    const int V = wide ? x128::size : 1;
    const int step = WARP_SIZE * V;
    const int CP = CEIL_DIV(C, step) * step;
    const int warps = blockDim.x / WARP_SIZE;
    for (int i = threadIdx.x; i < warps * 2 * CP; i += blockDim.x) { acc[i] = 0.0f; }
    __syncthreads();
    if (wide) {
        layernorm_backward2_rows<x128::size>(dinp, acc, dout, inp, weight, mean, rstd, N, C, add);
    } else {
        layernorm_backward2_rows<1>(dinp, acc, dout, inp, weight, mean, rstd, N, C, add);
    }
    __syncthreads();
    float* partial = scratch + (long long)blockIdx.x * 2 * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const int slot = (c / step) * step + (c % V) * WARP_SIZE + (c % step) / V;
        float dw = 0.0f;
        float db = 0.0f;
        for (int w = 0; w < warps; w++) {  // warp order: fixed
            dw += acc[w * 2 * CP + slot];
            db += acc[w * 2 * CP + CP + slot];
        }
        partial[c] = dw;
        partial[C + c] = db;
    }
}

// Pass 2. Column j of the (P, 2C) partials: j < C adds to dweight[j], else to
// dbias[j - C]. Block: 32 columns (lane) x warps slices of the P rows.
extern "C" __global__ void layernorm_param_backward_reduce_kernel2(floatX* __restrict__ dweight,
                                                                   floatX* __restrict__ dbias,
                                                                   const float* __restrict__ scratch,
                                                                   int P, int C) {
    __shared__ float sums[WARP_SIZE][WARP_SIZE];  // [warp][lane]
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int warps = blockDim.x / WARP_SIZE;
    const int j = blockIdx.x * WARP_SIZE + lane;
    float sum = 0.0f;
    if (j < 2 * C) {
        for (int p = warp; p < P; p += warps) { sum += scratch[(long long)p * 2 * C + j]; }
    }
    sums[warp][lane] = sum;
    __syncthreads();
    if (warp == 0 && j < 2 * C) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) { total += sums[w][lane]; }
        floatX* grad = j < C ? dweight + j : dbias + (j - C);
        *grad = from_float(to_float(*grad) + total);
    }
}