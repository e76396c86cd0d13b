// The attention lab: every version of kernels/attention.cu that the training step does
// not run, numbered as when they were written. benchmarks/lab.py runs any of them against
// the NumPy oracle (emulator or GPU) and times it against the product kernel and PyTorch;
// tests/lab/test_attention_lab.py keeps each one correct. A version moves into
// kernels/attention.cu only with a GPU measurement that shows it faster (kernels/README.md).
//
//   simple (attention_{permute,unpermute,softmax_forward,unpermute_backward,
//      softmax_backward,permute_backward}_kernel1): the oracle's algorithm, batched GEMMs
//      from Python, the (B,NH,T,T) probabilities kept for the backward; fp32. H200, d12
//      B=16 T=1024 (2026-11-28): 8.22 ms fwd+bwd, 9 GiB of att.
//   2 (attention_flash_*_kernel2): tensor cores through wmma, scores in shared memory,
//      hs 64 or 128, bf16. H200: 6.81 ms fwd+bwd (version 3: 0.758).
//   4: version 3 with double-buffered tile loads (cp.async groups). Not measured.
//   5-8 (attention_flash_backward_kernel5..8 + preprocess/dq_convert kernel5): the
//      one-pass backward, dQ by fp32 atomics; 6/8 128 keys a block, 7/8 double-buffered
//      Q/dO. Forward: kernel3. Not measured.
//   9: a forward with 128 query rows (8 warps) per block (forward_kernel9) and version 7's
//      backward (backward_kernel9, the same template). Not measured.
//
// It includes the product file, so its helpers (common.cuh, flash3_*) and version 3's
// templates are shared; quoted includes here resolve against kernels/dev/ and kernels/.
#include "../attention.cu"


// ============================================================================
// The simple path
// Shapes: qkv/dqkv (B,T,3C) holding q, k, v one after another along the last
// axis; q,k,v,dq,dk,dv,y,dy (B,NH,T,hs) with C = NH*hs; preatt, att, datt,
// dpreatt (B,NH,T,T) seen as BNH*T rows of T; out/dout (B,T,C).
// Activation gradients overwrite (=). scale = 1/sqrt(hs), from the wrapper.
//
//   attention_permute_kernel1:            q[b,nh,t,d] = qkv[b,t,0*C + nh*hs + d]
//                                         (k: 1*C, v: 2*C)
//   attention_unpermute_kernel1:          out[b,t,nh*hs + d] = y[b,nh,t,d]
//   attention_softmax_forward_kernel1:    att[r, j] = softmax_{j<=t}(scale * preatt[r, j])
//                                         for j <= t, 0 for j > t (row r = (bnh, t));
//                                         att may alias preatt (in place)
//   attention_unpermute_backward_kernel1: dy[b,nh,t,d] = dout[b,t,nh*hs + d]
//   attention_softmax_backward_kernel1:   dpreatt[r, j] = scale * att[r,j] *
//                                             (datt[r,j] - sum_{i<=t} datt[r,i] * att[r,i])
//                                         for j <= t, 0 for j > t; dpreatt may alias datt
//   attention_permute_backward_kernel1:   dqkv[b,t,0*C + nh*hs + d] = dq[b,nh,t,d]
//                                         (dk: 1*C, dv: 2*C)
//
// Launch (the wrapper's grid/block helper), none uses shared memory:
//   permute, unpermute, unpermute_backward, permute_backward: one thread per
//       element of the (B,T,C) or (B,T,3C) tensor; grid CEIL_DIV(elements, 256),
//       block 256 (elements = B*T*C for the first three, B*T*3C for the last).
//   softmax_forward, softmax_backward: one warp per row; block 256 (8 warps; any
//       multiple of 32 works), grid CEIL_DIV(BNH*T * 32, 256).

extern "C" __global__ void attention_permute_kernel1(floatX* __restrict__ q,
                                                     floatX* __restrict__ k,
                                                     floatX* __restrict__ v,
                                                     const floatX* __restrict__ qkv,
                                                     int B, int T, int NH, int hs) {
    // one thread per element of q (and of k and v): idx over (B,NH,T,hs)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * NH * T * hs) { return; }
    const int C = NH * hs;
    int d = idx % hs;
    int t = (idx / hs) % T;
    int nh = (idx / (hs * T)) % NH;
    int b = idx / (hs * T * NH);
    int src = (b * T + t) * 3 * C + nh * hs + d;
    q[idx] = qkv[src];
    k[idx] = qkv[src + C];
    v[idx] = qkv[src + 2 * C];
}

extern "C" __global__ void attention_unpermute_kernel1(floatX* __restrict__ out,
                                                       const floatX* __restrict__ y,
                                                       int B, int T, int NH, int hs) {
    // one thread per element of out: idx over (B,T,NH,hs) = (B,T,C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int t = (idx / (hs * NH)) % T;
    int b = idx / (hs * NH * T);
    out[idx] = y[((b * NH + nh) * T + t) * hs + d];
}

extern "C" __global__ void attention_softmax_forward_kernel1(floatX* att,
                                                             const floatX* preatt,
                                                             float scale, int BNH, int T) {
    // no __restrict__: att may alias preatt. Each lane reads and then writes
    // only its own columns, after both reductions, so in place is safe.
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= BNH * T) { return; }  // the whole warp leaves together
    const int t = row % T;
    const floatX* x = preatt + (long long)row * T;
    floatX* y = att + (long long)row * T;

    float maxval = -INFINITY;
    for (int j = lane; j <= t; j += WARP_SIZE) { maxval = fmaxf(maxval, scale * to_float(x[j])); }
    maxval = warp_reduce_max(maxval);  // finite: column 0 is always unmasked

    float sum = 0.0f;
    for (int j = lane; j <= t; j += WARP_SIZE) { sum += expf(scale * to_float(x[j]) - maxval); }
    sum = warp_reduce_sum(sum);

    for (int j = lane; j < T; j += WARP_SIZE) {
        float p = (j <= t) ? expf(scale * to_float(x[j]) - maxval) / sum : 0.0f;
        y[j] = from_float(p);
    }
}

extern "C" __global__ void attention_unpermute_backward_kernel1(floatX* __restrict__ dy,
                                                                const floatX* __restrict__ dout,
                                                                int B, int T, int NH, int hs) {
    // one thread per element of dout: idx over (B,T,NH,hs) = (B,T,C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int t = (idx / (hs * NH)) % T;
    int b = idx / (hs * NH * T);
    dy[((b * NH + nh) * T + t) * hs + d] = dout[idx];
}

extern "C" __global__ void attention_softmax_backward_kernel1(floatX* dpreatt,
                                                              const floatX* datt,
                                                              const floatX* __restrict__ att,
                                                              float scale, int BNH, int T) {
    // no __restrict__ on dpreatt/datt: they may alias (in place), which is safe
    // for the same reason as in the forward.
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= BNH * T) { return; }  // the whole warp leaves together
    const int t = row % T;
    const long long off = (long long)row * T;

    float dot = 0.0f;  // sum_{j<=t} datt * att (att is 0 beyond t)
    for (int j = lane; j <= t; j += WARP_SIZE) { dot += to_float(datt[off + j]) * to_float(att[off + j]); }
    dot = warp_reduce_sum(dot);

    for (int j = lane; j < T; j += WARP_SIZE) {
        float g = 0.0f;
        if (j <= t) {
            float a = to_float(att[off + j]);
            g = scale * a * (to_float(datt[off + j]) - dot);
        }
        dpreatt[off + j] = from_float(g);
    }
}

extern "C" __global__ void attention_permute_backward_kernel1(floatX* __restrict__ dqkv,
                                                              const floatX* __restrict__ dq,
                                                              const floatX* __restrict__ dk,
                                                              const floatX* __restrict__ dv,
                                                              int B, int T, int NH, int hs) {
    // one thread per element of dqkv: idx over (B,T,3,NH,hs) = (B,T,3C)
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * T * 3 * NH * hs) { return; }
    int d = idx % hs;
    int nh = (idx / hs) % NH;
    int which = (idx / (hs * NH)) % 3;
    int t = (idx / (hs * NH * 3)) % T;
    int b = idx / (hs * NH * 3 * T);
    int src = ((b * NH + nh) * T + t) * hs + d;
    const floatX* g = (which == 0) ? dq : (which == 1) ? dk : dv;
    dqkv[idx] = g[src];
}

#ifdef LLMCU_FLASH3
// Version 2 also needs the wmma header (GPU builds); the emulator replaces its one
// tensor-core helper with scalar code. Where mma.h is missing, version 2 is left out.
#if defined(LLMCU_EMU)
#define LLMCU_FLASH2 1
#elif defined(__has_include)
#if __has_include("mma.h")
#include "mma.h"
#define LLMCU_FLASH2 1
#endif
#endif

// ============================================================================
// Version 2: tensor cores (wmma, bf16 inputs, fp32 accumulation). GPU only.
//
// The element type is __nv_bfloat16 whatever floatX is (the bf16 tensor-core
// instructions take 16-bit inputs); the wrapper launches them from the bf16
// build (see the include note below) and passes bf16 arrays (uint16 bit patterns) for qkv, out, dout, dqkv and
// float for lse. hs must be 64 or 128 (a multiple of the 16-wide mma tile; two
// template instantiations). The CPU emulator models no tensor cores: under it
// (LLMCU_EMU) flash2_warp_mma, the one function that uses them, is scalar code.
//
//   attention_flash_forward_kernel2, attention_flash_backward_dq_kernel2:
//       grid (CEIL_DIV(T, 64), NH, B); attention_flash_backward_dkdv_kernel2:
//       grid (CEIL_DIV(T, 64), NKV, B); block 128 (4 warps, 16 rows each of a
//       64-row tile); dynamic shared memory FLASH2_*_SMEM(hs) bytes below (above
//       48 KiB: the wrapper opts in): forward 64/104 KiB, dq 88.5/136.5 KiB, dkdv
//       112.5/176.5 KiB at hs = 64/128 (hs = 128 backward exceeds an A100's
//       164 KiB: H100/H200 only).
//   attention_flash_backward_preprocess_kernel2: as kernel1, on bf16 arrays.
//
// Per tile, a warp computes its 16x64 block of scores with wmma (m16n16k16)
// into shared memory, does the online softmax there in fp32 (one row at a time,
// lanes over columns, warp shuffles for max and sum), rounds the probabilities
// to bf16 and multiplies them into the output accumulator (fp32, in shared
// memory, so the per-row rescaling can reach every element). The backward is
// the same recomputation as version 1 with the four products on tensor cores.
#define FLASH2_TILE 64
#define FLASH2_THREADS 128

#ifdef LLMCU_FLASH2
typedef __nv_bfloat16 bf16;

// dynamic shared memory of each version-2 kernel, in bytes (the wrapper uses the same formulas)
#define FLASH2_FWD_SMEM(hs) (3 * 64 * (hs) * 2 + 64 * 64 * 4 + 64 * 64 * 2 + 64 * (hs) * 4)
#define FLASH2_DQ_SMEM(hs) (4 * 64 * (hs) * 2 + 2 * 64 * 64 * 4 + 64 * 64 * 2 + 64 * (hs) * 4 + 2 * 64 * 4)
#define FLASH2_DKDV_SMEM(hs) (4 * 64 * (hs) * 2 + 2 * 64 * 64 * 4 + 2 * 64 * 64 * 2 + 2 * 64 * (hs) * 4 + 2 * 64 * 4)

// The dynamic shared memory, declared with 128-byte alignment: wmma loads and
// stores need 32-byte aligned addresses, and every region below starts at a
// multiple of 2 KiB from the base.
struct __align__(128) flash2_smem_unit { unsigned char bytes[128]; };

// Rows [row0, row0 + 64) of a (rows, ld) bf16 matrix, HS columns from src (src
// points at the head's first column), into a 64 x HS shared tile, 16 bytes at a time; rows >= T are zeros.
template <int HS>
__device__ __forceinline__ void flash2_load_tile(bf16* tile, const bf16* src, int row0, int T, long long ld) {
    typedef Packed128<bf16> pack;
    for (int i = threadIdx.x; i < FLASH2_TILE * HS / pack::size; i += blockDim.x) {
        int r = i / (HS / pack::size), c = (i % (HS / pack::size)) * pack::size;
        pack value;
        if (row0 + r < T) {
            value = *reinterpret_cast<const pack*>(src + (long long)(row0 + r) * ld + c);
        } else {
            for (int e = 0; e < pack::size; e++) { value[e] = __float2bfloat16(0.0f); }
        }
        *reinterpret_cast<pack*>(tile + r * HS + c) = value;
    }
}

#ifndef LLMCU_EMU
template <bool COL> struct flash2_b_layout { typedef nvcuda::wmma::row_major type; };
template <> struct flash2_b_layout<true> { typedef nvcuda::wmma::col_major type; };

// C (16 x N, fp32, row-major, ldc) = or += A (16 x K, bf16 row-major, lda) * B (K x N, bf16),
// by one warp. B_COL: B is given transposed, element (k, n) at b[n * ldb + k] (B = M^T for a
// row-major M); otherwise element (k, n) at b[k * ldb + n].
template <int K, int N, bool B_COL>
__device__ __forceinline__ void flash2_warp_mma(float* c, int ldc, bool accumulate, const bf16* a, int lda,
                                                const bf16* b, int ldb) {
    using namespace nvcuda;
    typedef typename flash2_b_layout<B_COL>::type b_layout;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, b_layout> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
#pragma unroll
    for (int n = 0; n < N / 16; n++) {
        if (accumulate) {
            wmma::load_matrix_sync(acc, c + n * 16, ldc, wmma::mem_row_major);
        } else {
            wmma::fill_fragment(acc, 0.0f);
        }
#pragma unroll
        for (int k = 0; k < K / 16; k++) {
            wmma::load_matrix_sync(fa, a + k * 16, lda);
            wmma::load_matrix_sync(fb, B_COL ? b + n * 16 * ldb + k * 16 : b + k * 16 * ldb + n * 16, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c + n * 16, acc, ldc, wmma::mem_row_major);
    }
}
#else
// The emulator has no tensor cores: the same product in scalar fp32 (bf16 inputs,
// fp32 sums), each lane owning whole elements of C. Everything else in the
// version-2 kernels (tiling, masking, online softmax, bf16 rounding of P and dS)
// runs unchanged, so the emulator tests it; only this function differs on the GPU.
template <int K, int N, bool B_COL>
__device__ __forceinline__ void flash2_warp_mma(float* c, int ldc, bool accumulate, const bf16* a, int lda,
                                                const bf16* b, int ldb) {
    for (int i = threadIdx.x % WARP_SIZE; i < 16 * N; i += WARP_SIZE) {
        const int r = i / N, n = i % N;
        float sum = 0.0f;
        for (int k = 0; k < K; k++) {
            sum += (float)a[r * lda + k] * (float)(B_COL ? b[n * ldb + k] : b[k * ldb + n]);
        }
        c[r * ldc + n] = accumulate ? c[r * ldc + n] + sum : sum;
    }
}
#endif

template <int HS>
__device__ void flash2_forward(bf16* out, float* lse, const bf16* qkv, int T, int NH, int NKV, float scale) {
    DYNAMIC_SHARED(flash2_smem_unit, smem_units);
    unsigned char* smem = (unsigned char*)smem_units;
    bf16* Qs = (bf16*)smem;                       // 64 x HS
    bf16* Ks = Qs + FLASH2_TILE * HS;             // 64 x HS
    bf16* Vs = Ks + FLASH2_TILE * HS;             // 64 x HS
    float* Ss = (float*)(Vs + FLASH2_TILE * HS);  // 64 x 64 scores
    bf16* Ps = (bf16*)(Ss + FLASH2_TILE * FLASH2_TILE);  // 64 x 64 probabilities
    float* Os = (float*)(Ps + FLASH2_TILE * FLASH2_TILE);  // 64 x HS output accumulator
    const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (NH / NKV);
    const long long W = (long long)(NH + 2 * NKV) * HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = warp * 16;  // this warp's rows of the tile

    flash2_load_tile<HS>(Qs, base + h * HS, qtile * FLASH2_TILE, T, W);
    for (int i = threadIdx.x; i < FLASH2_TILE * HS; i += blockDim.x) { Os[i] = 0.0f; }
    float m[16], l[16];  // the warp's 16 rows' running max and sum (same on every lane)
#pragma unroll
    for (int r = 0; r < 16; r++) { m[r] = -INFINITY; l[r] = 0.0f; }

    for (int kt = 0; kt <= qtile; kt++) {
        flash2_load_tile<HS>(Ks, base + (NH + kvh) * HS, kt * FLASH2_TILE, T, W);
        flash2_load_tile<HS>(Vs, base + (NH + NKV + kvh) * HS, kt * FLASH2_TILE, T, W);
        __syncthreads();
        flash2_warp_mma<HS, FLASH2_TILE, true>(Ss + row0 * FLASH2_TILE, FLASH2_TILE, false,
                                               Qs + row0 * HS, HS, Ks, HS);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int t = qtile * FLASH2_TILE + row0 + r;
            float s[2], p[2];
            float mx = -INFINITY;
            for (int e = 0; e < 2; e++) {
                int c = lane + e * WARP_SIZE, j = kt * FLASH2_TILE + c;
                s[e] = (j <= t) ? Ss[(row0 + r) * FLASH2_TILE + c] * scale : -INFINITY;
                mx = fmaxf(mx, s[e]);
            }
            const float m_new = fmaxf(m[r], warp_reduce_max(mx));  // finite: key 0 <= t on tile 0
            const float correction = expf(m[r] - m_new);
            float sum = 0.0f;
            for (int e = 0; e < 2; e++) {
                p[e] = expf(s[e] - m_new);
                sum += p[e];
                Ps[(row0 + r) * FLASH2_TILE + lane + e * WARP_SIZE] = __float2bfloat16(p[e]);
            }
            l[r] = l[r] * correction + warp_reduce_sum(sum);
            m[r] = m_new;
            for (int d = lane; d < HS; d += WARP_SIZE) { Os[(row0 + r) * HS + d] *= correction; }
        }
        __syncthreads();
        flash2_warp_mma<FLASH2_TILE, HS, false>(Os + row0 * HS, HS, true, Ps + row0 * FLASH2_TILE,
                                                FLASH2_TILE, Vs, HS);
        __syncthreads();  // Ks, Vs, Os settled before the next tile
    }
#pragma unroll
    for (int r = 0; r < 16; r++) {
        const int t = qtile * FLASH2_TILE + row0 + r;
        if (t < T) {
            const float inv = 1.0f / l[r];
            bf16* y = out + ((long long)b * T + t) * NH * HS + h * HS;
            for (int d = lane; d < HS; d += WARP_SIZE) { y[d] = __float2bfloat16(Os[(row0 + r) * HS + d] * inv); }
            if (lane == 0) { lse[((long long)b * NH + h) * T + t] = m[r] + logf(l[r]); }
        }
    }
}

template <int HS>
__device__ void flash2_backward_dq(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                   const float* D, int T, int NH, int NKV, float scale) {
    DYNAMIC_SHARED(flash2_smem_unit, smem_units);
    unsigned char* smem = (unsigned char*)smem_units;
    bf16* Qs = (bf16*)smem;                        // 64 x HS
    bf16* dOs = Qs + FLASH2_TILE * HS;             // 64 x HS
    bf16* Ks = dOs + FLASH2_TILE * HS;             // 64 x HS
    bf16* Vs = Ks + FLASH2_TILE * HS;              // 64 x HS
    float* Ss = (float*)(Vs + FLASH2_TILE * HS);   // 64 x 64 scores
    float* dPs = Ss + FLASH2_TILE * FLASH2_TILE;   // 64 x 64 dout v^T
    bf16* dSs = (bf16*)(dPs + FLASH2_TILE * FLASH2_TILE);  // 64 x 64
    float* dQs = (float*)(dSs + FLASH2_TILE * FLASH2_TILE);  // 64 x HS accumulator
    float* lse_s = dQs + FLASH2_TILE * HS;         // 64
    float* D_s = lse_s + FLASH2_TILE;              // 64
    const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (NH / NKV);
    const long long W = (long long)(NH + 2 * NKV) * HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = warp * 16;

    flash2_load_tile<HS>(Qs, base + h * HS, qtile * FLASH2_TILE, T, W);
    flash2_load_tile<HS>(dOs, dout + (long long)b * T * NH * HS + h * HS, qtile * FLASH2_TILE, T,
                         (long long)NH * HS);
    for (int i = threadIdx.x; i < FLASH2_TILE * HS; i += blockDim.x) { dQs[i] = 0.0f; }
    for (int r = threadIdx.x; r < FLASH2_TILE; r += blockDim.x) {
        int t = qtile * FLASH2_TILE + r;
        lse_s[r] = t < T ? lse[((long long)b * NH + h) * T + t] : 0.0f;
        D_s[r] = t < T ? D[((long long)b * NH + h) * T + t] : 0.0f;
    }
    for (int kt = 0; kt <= qtile; kt++) {
        flash2_load_tile<HS>(Ks, base + (NH + kvh) * HS, kt * FLASH2_TILE, T, W);
        flash2_load_tile<HS>(Vs, base + (NH + NKV + kvh) * HS, kt * FLASH2_TILE, T, W);
        __syncthreads();
        flash2_warp_mma<HS, FLASH2_TILE, true>(Ss + row0 * FLASH2_TILE, FLASH2_TILE, false,
                                               Qs + row0 * HS, HS, Ks, HS);
        flash2_warp_mma<HS, FLASH2_TILE, true>(dPs + row0 * FLASH2_TILE, FLASH2_TILE, false,
                                               dOs + row0 * HS, HS, Vs, HS);
        __syncthreads();
        for (int i = lane; i < 16 * FLASH2_TILE; i += WARP_SIZE) {
            int r = row0 + i / FLASH2_TILE, c = i % FLASH2_TILE;
            int t = qtile * FLASH2_TILE + r, j = kt * FLASH2_TILE + c;
            float ds = 0.0f;
            if (j <= t && t < T) {
                float p = expf(Ss[r * FLASH2_TILE + c] * scale - lse_s[r]);
                ds = p * (dPs[r * FLASH2_TILE + c] - D_s[r]);
            }
            dSs[r * FLASH2_TILE + c] = __float2bfloat16(ds);
        }
        __syncthreads();
        flash2_warp_mma<FLASH2_TILE, HS, false>(dQs + row0 * HS, HS, true, dSs + row0 * FLASH2_TILE,
                                                FLASH2_TILE, Ks, HS);
        __syncthreads();
    }
    for (int i = threadIdx.x; i < FLASH2_TILE * HS; i += blockDim.x) {
        int r = i / HS, d = i % HS, t = qtile * FLASH2_TILE + r;
        if (t < T) { dqkv[((long long)b * T + t) * W + h * HS + d] = __float2bfloat16(dQs[i] * scale); }
    }
}

template <int HS>
__device__ void flash2_backward_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                     const float* D, int T, int NH, int NKV, float scale) {
    DYNAMIC_SHARED(flash2_smem_unit, smem_units);
    unsigned char* smem = (unsigned char*)smem_units;
    bf16* Ks = (bf16*)smem;                        // 64 x HS (this block's keys)
    bf16* Vs = Ks + FLASH2_TILE * HS;
    bf16* Qs = Vs + FLASH2_TILE * HS;              // 64 x HS (a query tile)
    bf16* dOs = Qs + FLASH2_TILE * HS;
    float* St = (float*)(dOs + FLASH2_TILE * HS);  // 64 keys x 64 queries: k q^T
    float* dPt = St + FLASH2_TILE * FLASH2_TILE;   // v dout^T
    bf16* Pt = (bf16*)(dPt + FLASH2_TILE * FLASH2_TILE);
    bf16* dSt = Pt + FLASH2_TILE * FLASH2_TILE;
    float* dKs = (float*)(dSt + FLASH2_TILE * FLASH2_TILE);  // 64 x HS accumulators
    float* dVs = dKs + FLASH2_TILE * HS;
    float* lse_s = dVs + FLASH2_TILE * HS;
    float* D_s = lse_s + FLASH2_TILE;
    const int ktile = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int G = NH / NKV;
    const long long W = (long long)(NH + 2 * NKV) * HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE;
    const int row0 = warp * 16;  // this warp's keys of the tile
    const int num_tiles = CEIL_DIV(T, FLASH2_TILE);

    flash2_load_tile<HS>(Ks, base + (NH + kvh) * HS, ktile * FLASH2_TILE, T, W);
    flash2_load_tile<HS>(Vs, base + (NH + NKV + kvh) * HS, ktile * FLASH2_TILE, T, W);
    for (int i = threadIdx.x; i < FLASH2_TILE * HS; i += blockDim.x) { dKs[i] = 0.0f; dVs[i] = 0.0f; }
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        for (int qt = ktile; qt < num_tiles; qt++) {
            flash2_load_tile<HS>(Qs, base + h * HS, qt * FLASH2_TILE, T, W);
            flash2_load_tile<HS>(dOs, dout + (long long)b * T * NH * HS + h * HS, qt * FLASH2_TILE, T,
                                 (long long)NH * HS);
            for (int r = threadIdx.x; r < FLASH2_TILE; r += blockDim.x) {
                int t = qt * FLASH2_TILE + r;
                lse_s[r] = t < T ? lse[((long long)b * NH + h) * T + t] : 0.0f;
                D_s[r] = t < T ? D[((long long)b * NH + h) * T + t] : 0.0f;
            }
            __syncthreads();
            flash2_warp_mma<HS, FLASH2_TILE, true>(St + row0 * FLASH2_TILE, FLASH2_TILE, false,
                                                   Ks + row0 * HS, HS, Qs, HS);
            flash2_warp_mma<HS, FLASH2_TILE, true>(dPt + row0 * FLASH2_TILE, FLASH2_TILE, false,
                                                   Vs + row0 * HS, HS, dOs, HS);
            __syncthreads();
            for (int i = lane; i < 16 * FLASH2_TILE; i += WARP_SIZE) {
                int r = row0 + i / FLASH2_TILE, c = i % FLASH2_TILE;
                int j = ktile * FLASH2_TILE + r, t = qt * FLASH2_TILE + c;
                float p = 0.0f, ds = 0.0f;
                if (j <= t && t < T) {
                    p = expf(St[r * FLASH2_TILE + c] * scale - lse_s[c]);
                    ds = p * (dPt[r * FLASH2_TILE + c] - D_s[c]);
                }
                Pt[r * FLASH2_TILE + c] = __float2bfloat16(p);
                dSt[r * FLASH2_TILE + c] = __float2bfloat16(ds);
            }
            __syncthreads();
            flash2_warp_mma<FLASH2_TILE, HS, false>(dVs + row0 * HS, HS, true, Pt + row0 * FLASH2_TILE,
                                                    FLASH2_TILE, dOs, HS);
            flash2_warp_mma<FLASH2_TILE, HS, false>(dKs + row0 * HS, HS, true, dSt + row0 * FLASH2_TILE,
                                                    FLASH2_TILE, Qs, HS);
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < FLASH2_TILE * HS; i += blockDim.x) {
        int r = i / HS, d = i % HS, j = ktile * FLASH2_TILE + r;
        if (j < T) {
            bf16* g = dqkv + ((long long)b * T + j) * W;
            g[(NH + kvh) * HS + d] = __float2bfloat16(dKs[i] * scale);
            g[(NH + NKV + kvh) * HS + d] = __float2bfloat16(dVs[i]);
        }
    }
}

extern "C" __global__ void attention_flash_forward_kernel2(bf16* __restrict__ out, float* __restrict__ lse,
                                                           const bf16* __restrict__ qkv,
                                                           int B, int T, int NH, int NKV, int hs,
                                                           float scale) {
    if (hs == 64) { flash2_forward<64>(out, lse, qkv, T, NH, NKV, scale); }
    else { flash2_forward<128>(out, lse, qkv, T, NH, NKV, scale); }
}

extern "C" __global__ void attention_flash_backward_preprocess_kernel2(float* __restrict__ D,
                                                                       const bf16* __restrict__ dout,
                                                                       const bf16* __restrict__ out,
                                                                       int B, int T, int NH, int hs) {
    // as kernel1 (one warp per row of D), reading bf16
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= B * NH * T) { return; }
    const int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    const long long off = ((long long)b * T + t) * NH * hs + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) { sum += (float)dout[off + d] * (float)out[off + d]; }
    sum = warp_reduce_sum(sum);
    if (lane == 0) { D[row] = sum; }
}

extern "C" __global__ void attention_flash_backward_dq_kernel2(bf16* __restrict__ dqkv,
                                                               const bf16* __restrict__ dout,
                                                               const bf16* __restrict__ qkv,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ D,
                                                               int B, int T, int NH, int NKV, int hs,
                                                               float scale) {
    if (hs == 64) { flash2_backward_dq<64>(dqkv, dout, qkv, lse, D, T, NH, NKV, scale); }
    else { flash2_backward_dq<128>(dqkv, dout, qkv, lse, D, T, NH, NKV, scale); }
}

extern "C" __global__ void attention_flash_backward_dkdv_kernel2(bf16* __restrict__ dqkv,
                                                                 const bf16* __restrict__ dout,
                                                                 const bf16* __restrict__ qkv,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ D,
                                                                 int B, int T, int NH, int NKV, int hs,
                                                                 float scale) {
    if (hs == 64) { flash2_backward_dkdv<64>(dqkv, dout, qkv, lse, D, T, NH, NKV, scale); }
    else { flash2_backward_dkdv<128>(dqkv, dout, qkv, lse, D, T, NH, NKV, scale); }
}
#endif  // LLMCU_FLASH2

// ============================================================================
// Versions 4 and 9: version 3's templates with two stages or 8 query warps.
// Version 9's forward: 128 query rows (8 warps) per block; grid (CEIL_DIV(T, 128), NH, B), block 256.
extern "C" __global__ void attention_flash_forward_kernel9(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv,
                                int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash3_forward<1, 8>(out, lse, qkv, B, T, NH, NKV, hs, scale, order);
}

extern "C" __global__ void attention_flash_forward_kernel4(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv,
                                int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash3_forward<2>(out, lse, qkv, B, T, NH, NKV, hs, scale, order);
}

extern "C" __global__ void attention_flash_backward_dq_kernel4(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                    const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                    const float* __restrict__ D, int B, int T, int NH, int NKV, int hs,
                                    float scale, int order) {
    flash3_backward_dq<2>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, hs, scale, order);
}

extern "C" __global__ void attention_flash_backward_dkdv_kernel4(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                      const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                      const float* __restrict__ D, int B, int T, int NH, int NKV, int hs,
                                      float scale, int order) {
    flash3_backward_dkdv<2>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, hs, scale, order);
}

// ============================================================================
// Version 5: version 3's forward, and a backward in ONE pass over the key tiles
// with dQ accumulated by fp32 atomics (FlashAttention-2's backward). Version 6: the
// same with 128-key blocks. Versions 7 and 8: 5 and 6 with two query/dO buffers.
//
// Version 3's backward is two deterministic kernels: dkdv (per key tile: S, dP,
// dV += P^T dO, dK += dS^T Q) and dq (per query tile: S, dP again, dQ += dS K),
// 7 tile products per (query tile, key tile) pair. Here the dkdv kernel also
// does the dQ product, 5 products per pair: each step writes its dS^T tile (bf16,
// the values dK used) to shared memory, and each warp multiplies 16 query rows of
// it by the key tile (version 6: 16 query rows x 32 head-size columns, over 128
// keys), then adds its fp32 partial dQ into a (B, NH, T, 64) fp32 accumulator with
// atomics (float2 red on sm_90). The order of those additions varies from run to
// run on a GPU: dq's bits are not reproducible there (dk, dv are). Under the
// emulator blocks run in order, so its results are fixed. Version 6 halves the
// atomics and the Q/dO tile loads per key (each query tile is streamed once per
// 128 keys, not per 64) at the cost of one 8-warp block per SM instead of two
// 4-warp blocks (~240 registers a thread either way) and some fully masked work
// on the diagonal. Versions 7 and 8 keep two buffers for the query and dO tiles
// (and their lse and D rows): step s + 1's cp.async loads go out before step s's
// products, into the buffer step s - 1 used, whose readers all passed step s - 1's
// dS^T barrier; a step then needs two barriers (tiles landed / step s - 1 done, and
// dS^T written) where versions 5 and 6 need three. Only 2 (or 1) blocks fit an SM at
// ~230-250 registers a thread, so other blocks hide little of a tile load's latency:
// that is what the second buffer is for.
//
//   attention_flash_backward_preprocess_kernel5 (versions 3 to 9): D = rowsum(dout * out)
//       with 16-byte loads, 8 threads per row of (B,NH,T) (version 2's kernel: a warp per row
//       and 2-byte loads), and for versions 5 to 9 the row's 64 accumulator floats zeroed
//       with 16-byte stores; grid CEIL_DIV(B*NH*T*8, 256), block 256.
//   attention_flash_backward_kernel5: grid (CEIL_DIV(T, 64), NKV, B), block 128;
//   attention_flash_backward_kernel6: grid (CEIL_DIV(T, 128), NKV, B), block 256;
//   attention_flash_backward_kernel7, 8: as 5, 6;
//       dynamic shared memory (2 * 16 * warps + 2 * 64 * stages) * 72 * 2 bytes (versions
//       5-8: 36, 54, 54, 72 KiB: K and dS^T tiles of the block's keys, Q and dO tiles of
//       64 queries per stage).
//   attention_flash_backward_dq_convert_kernel5: dqkv's q third = bf16(scale * accumulator);
//       one thread per 8 values (two 16-byte loads, one 16-byte store), grid
//       CEIL_DIV(B*NH*T*64 / 8, 256), block 256.
// The wrapper checks that qkv, out, dout and dqkv are 16-byte aligned (every row of hs = 64
// bf16 then is: 128 bytes).
// The forward is attention_flash_forward_kernel3. Speed not measured on a GPU yet.

// p[0] += a, p[1] += b without a result (red.global): p 8-byte aligned.
__device__ __forceinline__ void flash5_red2(float* p, float a, float b) {
#ifndef LLMCU_EMU
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
#else  // the emulator: two scalar atomics (blocks run one after another there)
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// 8 bf16, 16 bytes (whatever floatX is). nvcc emits one 16-byte access for an element of
// an array of these (indexing a flash5_bf16x8 pointer), not always for a cast bf16 address.
typedef Packed128<bf16> flash5_bf16x8;

extern "C" __global__ void attention_flash_backward_preprocess_kernel5(float* __restrict__ D,
                                                                       float* __restrict__ dq_accum,
                                                                       const bf16* __restrict__ dout,
                                                                       const bf16* __restrict__ out,
                                                                       int B, int T, int NH) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long row = idx / 8;  // (b, h, t): 8 consecutive lanes share a row
    const int j = (int)(idx % 8);   // this thread's columns: 8j .. 8j + 7
    const bool live = row < (long long)B * NH * T;
    float sum = 0.0f;
    if (live) {
        const int t = (int)(row % T), h = (int)((row / T) % NH), b = (int)(row / ((long long)T * NH));
        const long long packet = (((long long)b * T + t) * NH * FLASH3_HS + h * FLASH3_HS) / 8 + j;
        const flash5_bf16x8 d = reinterpret_cast<const flash5_bf16x8*>(dout)[packet];
        const flash5_bf16x8 o = reinterpret_cast<const flash5_bf16x8*>(out)[packet];
#pragma unroll
        for (int k = 0; k < 8; k++) { sum += __bfloat162float(d[k]) * __bfloat162float(o[k]); }
        if (dq_accum != nullptr) {
            const f128 zero = {{0.0f, 0.0f, 0.0f, 0.0f}};
            store128f(dq_accum + row * FLASH3_HS + 8 * j, zero);
            store128f(dq_accum + row * FLASH3_HS + 8 * j + 4, zero);
        }
    }
    // every lane of the warp takes part (the block is whole warps); xor 4, 2, 1 stays
    // within the row's 8 lanes
#pragma unroll
    for (int offset = 4; offset > 0; offset /= 2) { sum += __shfl_xor_sync(0xffffffff, sum, offset); }
    if (live && j == 0) { D[row] = sum; }
}

// acc (16 x 8*NT) += A (16 x 16*KS, fragments) * M[0..16*KS)[col0 .. col0 + 8*NT) for shared
// rows M of FLASH3_LD elements: flash3_mma_ab for any key count and a column slice.
template <int KS, int NT>
__device__ __forceinline__ void flash5_mma_ab(float (*acc)[4], const unsigned (*a)[4], const bf16 (*m)[FLASH3_LD],
                                              int col0) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            unsigned b[4];
            flash3_ldmatrix_trans(b, &m[kk * 16 + ((lane / 8) % 2) * 8 + lane % 8][col0 + np * 16 + (lane / 16) * 8]);
            flash3_mma(acc[2 * np], a[kk], b);
            flash3_mma(acc[2 * np + 1], a[kk], b + 2);
        }
    }
}

// The one-pass backward for a key tile of 16 * WARPS rows (16 per warp): WARPS = 4 is
// version 5, WARPS = 8 version 6 (128 keys: half the Q/dO tile loads and half the dQ
// atomics per key, one block of 8 warps per SM at ~240 registers a thread).
// Dynamic shared memory: K and dS^T tiles of 16 * WARPS rows, Q and dO tiles of 64 rows,
// FLASH3_LD bf16 per row (flash5_smem_bytes below; the wrapper's copy must match).
template <int WARPS, int STAGES>
__device__ __forceinline__ void flash5_backward(bf16* __restrict__ dqkv, float* __restrict__ dq_accum,
                                                const bf16* __restrict__ dout, const bf16* __restrict__ qkv,
                                                const float* __restrict__ lse, const float* __restrict__ D,
                                                int B, int T, int NH, int NKV, float scale, int order) {
    constexpr int NKEY = 16 * WARPS;            // keys per block
    constexpr int SPLIT = WARPS / 4;            // dQ: 4 groups of 16 query rows x SPLIT column slices
    constexpr int DQ_COLS = FLASH3_HS / SPLIT;  // head-size columns per warp in the dQ product
    DYNAMIC_SHARED(flash2_smem_unit, smem_units);
    bf16 (*Ks)[FLASH3_LD] = reinterpret_cast<bf16 (*)[FLASH3_LD]>(smem_units);  // NKEY rows: this block's keys
    bf16 (*dSs)[FLASH3_LD] = Ks + NKEY;   // NKEY rows: V first (its fragments), then dS^T (keys x queries)
    bf16 (*Qb)[FLASH3_LD] = dSs + NKEY;   // STAGES query tiles of 64 rows
    bf16 (*dOb)[FLASH3_LD] = Qb + STAGES * FLASH3_TILE;  // STAGES dO tiles of 64 rows
    __shared__ float lse_b[STAGES][FLASH3_TILE], D_b[STAGES][FLASH3_TILE];
    int ktile, kvh, b;
    flash3_block_coords(order, true, ktile, kvh, b);
    const int group = NH / NKV;
    const long long W = (long long)(NH + 2 * NKV) * FLASH3_HS, WO = (long long)NH * FLASH3_HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    const int kstart = ktile * NKEY;
    const int k0 = kstart + warp * 16 + g;  // this lane's key rows: k0 and k0 + 8
    const float sl2 = scale * FLASH3_LOG2E;

    // (query head, query tile) pairs: the query heads sharing this kv head, and for each the
    // 64-row query tiles from the first one holding a query >= kstart (earlier ones are masked)
    const int first_qt = kstart / FLASH3_TILE, nqt = (T + FLASH3_TILE - 1) / FLASH3_TILE;
    const int per_head = nqt - first_qt, steps = group * per_head;
    // one step's query and dO tiles (cp.async) and its rows' lse (log2 units) and D (plain
    // loads) into buffer buf
    auto load_step = [&](int step, int buf) {
        const int h = kvh * group + step / per_head, qt = first_qt + step % per_head;
        flash3_load_tile(Qb + buf * FLASH3_TILE, base + h * FLASH3_HS, qt * FLASH3_TILE, T, W);
        flash3_load_tile(dOb + buf * FLASH3_TILE, dout + (long long)b * T * WO + h * FLASH3_HS, qt * FLASH3_TILE,
                         T, WO);
        for (int r = threadIdx.x; r < FLASH3_TILE; r += blockDim.x) {
            const int q = qt * FLASH3_TILE + r;
            lse_b[buf][r] = q < T ? lse[((long long)b * NH + h) * T + q] * FLASH3_LOG2E : INFINITY;  // p = 0
            D_b[buf][r] = q < T ? D[((long long)b * NH + h) * T + q] : 0.0f;
        }
    };

    for (int r = 0; r < NKEY; r += FLASH3_TILE) {
        flash3_load_tile(Ks + r, base + (NH + kvh) * FLASH3_HS, kstart + r, T, W);
        flash3_load_tile(dSs + r, base + (NH + NKV + kvh) * FLASH3_HS, kstart + r, T, W);
    }
    if (STAGES == 2 && steps > 0) { load_step(0, 0); }  // step 0's tiles come with K and V
    flash3_cp_wait();
    __syncthreads();
    unsigned kf[FLASH3_HS / 16][4], vf[FLASH3_HS / 16][4];
    flash3_load_a(kf, Ks, warp * 16);
    flash3_load_a(vf, dSs, warp * 16);

    float dk[FLASH3_HS / 8][4], dv[FLASH3_HS / 8][4];
#pragma unroll
    for (int nd = 0; nd < FLASH3_HS / 8; nd++) {
        dk[nd][0] = dk[nd][1] = dk[nd][2] = dk[nd][3] = 0.0f;
        dv[nd][0] = dv[nd][1] = dv[nd][2] = dv[nd][3] = 0.0f;
    }
    for (int step = 0; step < steps; step++) {
        const int h = kvh * group + step / per_head, qt = first_qt + step % per_head;
        const int buf = STAGES == 2 ? step % 2 : 0;
        if (STAGES == 2) {
            // the next step's loads go out before this step's products. They refill the buffer
            // step - 1 used: every warp read that one's Q, dO, lse, D before the dS^T barrier
            // of step - 1, which this thread has passed.
            if (step + 1 < steps) {
                load_step(step + 1, buf ^ 1);
                flash3_cp_commit();
                flash3_cp_wait_prev();  // this step's group (issued one step earlier) has landed
            } else {
                flash3_cp_wait();
            }
            __syncthreads();  // this step's tiles are visible; every warp is done with step - 1 (dS^T, K)
        } else {
            __syncthreads();  // every warp is done with V's fragments / the previous step's Q, dO, dS^T, lse, D
            load_step(step, 0);
            flash3_cp_wait();
            __syncthreads();
        }
        bf16 (*Qs)[FLASH3_LD] = Qb + buf * FLASH3_TILE;
        bf16 (*dOs)[FLASH3_LD] = dOb + buf * FLASH3_TILE;
        const float* lse_s = lse_b[buf];
        const float* D_s = D_b[buf];

        unsigned pf[FLASH3_TILE / 16][4];  // dS^T's A fragments
        // diag: a key of this block may follow a query of the tile
        flash3_dkdv_tile(dk, dv, pf, kf, vf, Qs, dOs, lse_s, D_s, qt * FLASH3_TILE < kstart + NKEY,
                         qt * FLASH3_TILE, k0, sl2);
#pragma unroll
        for (int kk = 0; kk < FLASH3_TILE / 16; kk++) {  // dS^T (bf16, as dK used it) to shared
            flash3_store2(&dSs[warp * 16 + g][kk * 16 + 2 * t], pf[kk][0]);
            flash3_store2(&dSs[warp * 16 + g + 8][kk * 16 + 2 * t], pf[kk][1]);
            flash3_store2(&dSs[warp * 16 + g][kk * 16 + 8 + 2 * t], pf[kk][2]);
            flash3_store2(&dSs[warp * 16 + g + 8][kk * 16 + 8 + 2 * t], pf[kk][3]);
        }
        __syncthreads();  // the whole dS^T tile is written

        // dQ[16 query rows, DQ_COLS columns] += dS K: A = dS (16 queries x NKEY keys), the
        // columns (warp % 4) * 16.. of dS^T; B = K's rows, columns (warp / 4) * DQ_COLS..
        const int qrow = (warp % 4) * 16, col0 = (warp / 4) * DQ_COLS;
        unsigned af[NKEY / 16][4];
#pragma unroll
        for (int kk = 0; kk < NKEY / 16; kk++) {  // A[m][k] = dSs[k][qrow + m] (transposed ldmatrix)
            flash3_ldmatrix_trans(af[kk], &dSs[kk * 16 + (lane / 16) * 8 + lane % 8][qrow + ((lane / 8) % 2) * 8]);
        }
        float dq[DQ_COLS / 8][4];
#pragma unroll
        for (int nd = 0; nd < DQ_COLS / 8; nd++) { dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.0f; }
        flash5_mma_ab<NKEY / 16, DQ_COLS / 8>(dq, af, Ks, col0);
        const int q = qt * FLASH3_TILE + qrow + g;
        float* acc = dq_accum + (((long long)b * NH + h) * T + q) * FLASH3_HS + col0 + 2 * t;
#pragma unroll
        for (int nd = 0; nd < DQ_COLS / 8; nd++) {
            if (q < T) { flash5_red2(acc + nd * 8, dq[nd][0], dq[nd][1]); }
            if (q + 8 < T) { flash5_red2(acc + 8 * FLASH3_HS + nd * 8, dq[nd][2], dq[nd][3]); }
        }
    }
    bf16* dst = dqkv + (long long)b * T * W;
    flash3_store_rows(dst + (NH + kvh) * FLASH3_HS, W, kstart + warp * 16, T, dk, scale, scale);
    flash3_store_rows(dst + (NH + NKV + kvh) * FLASH3_HS, W, kstart + warp * 16, T, dv, 1.0f, 1.0f);
}

extern "C" __global__ void attention_flash_backward_kernel5(bf16* __restrict__ dqkv, float* __restrict__ dq_accum, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const float* __restrict__ lse, const float* __restrict__ D,
        int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash5_backward<4, 1>(dqkv, dq_accum, dout, qkv, lse, D, B, T, NH, NKV, scale, order);
}

extern "C" __global__ void attention_flash_backward_kernel6(bf16* __restrict__ dqkv, float* __restrict__ dq_accum, const bf16* __restrict__ dout,
        const bf16* __restrict__ qkv, const float* __restrict__ lse, const float* __restrict__ D,
        int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash5_backward<8, 1>(dqkv, dq_accum, dout, qkv, lse, D, B, T, NH, NKV, scale, order);
}

extern "C" __global__ void attention_flash_backward_kernel7(bf16* __restrict__ dqkv, float* __restrict__ dq_accum,
        const bf16* __restrict__ dout, const bf16* __restrict__ qkv, const float* __restrict__ lse,
        const float* __restrict__ D, int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash5_backward<4, 2>(dqkv, dq_accum, dout, qkv, lse, D, B, T, NH, NKV, scale, order);
}

extern "C" __global__ void attention_flash_backward_kernel8(bf16* __restrict__ dqkv, float* __restrict__ dq_accum,
        const bf16* __restrict__ dout, const bf16* __restrict__ qkv, const float* __restrict__ lse,
        const float* __restrict__ D, int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash5_backward<8, 2>(dqkv, dq_accum, dout, qkv, lse, D, B, T, NH, NKV, scale, order);
}

extern "C" __global__ void attention_flash_backward_dq_convert_kernel5(bf16* __restrict__ dqkv,
                                                                       const float* __restrict__ dq_accum,
                                                                       int B, int T, int NH, int NKV, int hs,
                                                                       float scale) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;  // (B,NH,T,64) index
    if (i >= (long long)B * NH * T * FLASH3_HS) { return; }
    const int d = (int)(i % FLASH3_HS), t = (int)((i / FLASH3_HS) % T);
    const int h = (int)((i / ((long long)FLASH3_HS * T)) % NH), b = (int)(i / ((long long)FLASH3_HS * T * NH));
    const f128 lo = load128f(dq_accum + i), hi = load128f(dq_accum + i + 4);
    flash5_bf16x8 packet;  // one 16-byte store
#pragma unroll
    for (int k = 0; k < 4; k++) {
        packet[k] = __float2bfloat16(lo[k] * scale);
        packet[4 + k] = __float2bfloat16(hi[k] * scale);
    }
    reinterpret_cast<flash5_bf16x8*>(dqkv)[(((long long)b * T + t) * (NH + 2 * NKV) * FLASH3_HS + h * FLASH3_HS + d) / 8] =
        packet;
}

// Version 9's backward: version 7's (the same template), numbered with its forward.
extern "C" __global__ void attention_flash_backward_kernel9(bf16* __restrict__ dqkv, float* __restrict__ dq_accum,
        const bf16* __restrict__ dout, const bf16* __restrict__ qkv, const float* __restrict__ lse,
        const float* __restrict__ D, int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash5_backward<4, 2>(dqkv, dq_accum, dout, qkv, lse, D, B, T, NH, NKV, scale, order);
}

#endif  // LLMCU_FLASH3
