// attention: fused ("flash") causal multi-head self-attention, grouped-query heads
// included. The (T,T) scores never reach global memory: the forward saves a (B,NH,T)
// log-sum-exp for the backward instead of the (B,NH,T,T) probabilities.
//
// Shapes: qkv/dqkv (B,T,(NH+2*NKV)*hs), out/dout (B,T,NH*hs), lse and D (B,NH,T) float;
// each version's section below gives its own in full.
// Launch: a block per (query or key tile, head, batch row); each section gives its grid,
// block and shared memory (llmcu/cuda/attention.py launches them).
//
// Versions the training step runs (llmcu/cuda/attention.py picks by dtype and head size):
//   3 (attention_flash_*_kernel3): bf16 at hs = 64, FlashAttention-2 style (mma.sync
//      tensor cores, scores in registers, cp.async). H200, B=16 NH=12 T=1024 hs=64
//      (2026-11-28): 0.187 ms fwd, 0.758 ms fwd+bwd (PyTorch flash 0.227 / 0.717).
//   1 (attention_flash_*_kernel1): everything else (fp32, other head sizes, Llama's
//      shapes): fp32 scalar, one thread per row of a 32-row tile, the readable
//      reference. H200, same shapes in fp32: 83.6 ms fwd+bwd.
// The backward preprocess (D = rowsum(dout * out)) is kernel1 for both (the bf16 build
// for version 3, as measured).
// The other versions (the simple permute/softmax path, the wmma version 2, versions 4-9)
// live in the lab, kernels/dev/attention.cu (kernels/README.md).
#include "common.cuh"

// ============================================================================
// Fused ("flash") causal attention: the (T,T) scores never reach global memory.
//
// Shapes: qkv/dqkv (B,T,(NH+2*NKV)*hs) = NH query heads, then NKV key heads,
// then NKV value heads, each hs wide (GPT-2: NKV = NH, the (B,T,3C) layout
// above); query head h reads kv head h / (NH/NKV). out/dout (B,T,NH*hs);
// lse (B,NH,T) float = log-sum-exp of row t's scaled, masked scores;
// D (B,NH,T) float = sum_d dout[b,t,h,d] * out[b,t,h,d] (backward scratch).
//
//   attention_flash_forward_kernel1:     out = softmax_{j<=t}(q_t . k_j * scale) v,
//                                        lse[t] = log sum_{j<=t} exp(q_t . k_j * scale)
//   attention_flash_backward_preprocess_kernel1:  D[t] = dout_t . out_t
//   attention_flash_backward_dq_kernel1: p = exp(s - lse), ds = p * (dout_t . v_j - D[t]),
//                                        dq_t = scale * sum_{j<=t} ds k_j
//   attention_flash_backward_dkdv_kernel1: dv_j = sum_{h in group} sum_{t>=j} p dout_t,
//                                        dk_j = scale * sum_{h in group} sum_{t>=j} ds q_t
//
// Launch (llmcu/cuda/attention.py), FLASH_TILE = 32, hs <= FLASH_HS_MAX = 128:
//   forward, backward_dq:  grid (CEIL_DIV(T, FLASH_TILE), NH, B), block FLASH_TILE:
//       one thread per query row of a FLASH_TILE-row query tile;
//   backward_dkdv:         grid (CEIL_DIV(T, FLASH_TILE), NKV, B), block FLASH_TILE:
//       one thread per key row of a key tile; it loops over the NH/NKV query heads
//       of its group itself, so dk/dv are summed without atomics (deterministic);
//   backward_preprocess:   one warp per (b, h, t) row: grid CEIL_DIV(B*NH*T*32, 256), block 256.
//   Static shared memory only: 2 * FLASH_TILE * FLASH_HS_MAX floats (32 KiB) + 256 bytes.
//
// Version 1 streams FLASH_TILE-row key (forward, dq) or query (dkdv) tiles
// through shared memory with an online softmax; tiles wholly above the causal
// diagonal are skipped (FLASH_TILE query rows and keys per tile, so tile kt is
// needed by query tile qt only when kt <= qt). All arithmetic is fp32 scalar
// code: the readable reference for the tensor-core version below.
#define FLASH_TILE 32
#define FLASH_HS_MAX 128

extern "C" __global__ void attention_flash_forward_kernel1(floatX* __restrict__ out,
                                                           float* __restrict__ lse,
                                                           const floatX* __restrict__ qkv,
                                                           int B, int T, int NH, int NKV, int hs,
                                                           float scale) {
    __shared__ float k_tile[FLASH_TILE][FLASH_HS_MAX];
    __shared__ float v_tile[FLASH_TILE][FLASH_HS_MAX];
    const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (NH / NKV);
    const int W = (NH + 2 * NKV) * hs;  // qkv row width
    const floatX* base = qkv + (long long)b * T * W;
    const int t = qtile * FLASH_TILE + threadIdx.x;
    const bool active = t < T;  // inactive threads still take part in the tile loads and barriers

    float q[FLASH_HS_MAX], o[FLASH_HS_MAX];
    for (int d = 0; d < hs; d++) {
        q[d] = active ? to_float(base[(long long)t * W + h * hs + d]) * scale : 0.0f;
        o[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;  // running max and sum of exp(s - m)

    for (int kt = 0; kt <= qtile; kt++) {  // causal: key tiles after the diagonal are fully masked
        for (int i = threadIdx.x; i < FLASH_TILE * hs; i += blockDim.x) {
            int r = i / hs, d = i % hs, j = kt * FLASH_TILE + r;
            long long row = (long long)j * W;
            k_tile[r][d] = j < T ? to_float(base[row + (NH + kvh) * hs + d]) : 0.0f;
            v_tile[r][d] = j < T ? to_float(base[row + (NH + NKV + kvh) * hs + d]) : 0.0f;
        }
        __syncthreads();
        if (active) {
            const int n = min(FLASH_TILE, t - kt * FLASH_TILE + 1);  // keys j <= t in this tile (>= 1)
            float s[FLASH_TILE];
            float m_new = m;
            for (int jj = 0; jj < n; jj++) {
                float dot = 0.0f;
                for (int d = 0; d < hs; d++) { dot += q[d] * k_tile[jj][d]; }
                s[jj] = dot;
                m_new = fmaxf(m_new, dot);
            }
            const float correction = expf(m - m_new);  // 0 on the first tile (m = -inf)
            l *= correction;
            for (int d = 0; d < hs; d++) { o[d] *= correction; }
            for (int jj = 0; jj < n; jj++) {
                float p = expf(s[jj] - m_new);
                l += p;
                for (int d = 0; d < hs; d++) { o[d] += p * v_tile[jj][d]; }
            }
            m = m_new;
        }
        __syncthreads();  // everyone is done with the tile before the next load
    }
    if (active) {
        const float inv = 1.0f / l;
        floatX* y = out + ((long long)b * T + t) * NH * hs + h * hs;
        for (int d = 0; d < hs; d++) { y[d] = from_float(o[d] * inv); }
        lse[((long long)b * NH + h) * T + t] = m + logf(l);
    }
}

extern "C" __global__ void attention_flash_backward_preprocess_kernel1(float* __restrict__ D,
                                                                       const floatX* __restrict__ dout,
                                                                       const floatX* __restrict__ out,
                                                                       int B, int T, int NH, int hs) {
    // one warp per row r = (b, h, t) of D (B,NH,T)
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (row >= B * NH * T) { return; }  // the whole warp leaves together
    const int t = row % T, h = (row / T) % NH, b = row / (T * NH);
    const long long off = ((long long)b * T + t) * NH * hs + h * hs;
    float sum = 0.0f;
    for (int d = lane; d < hs; d += WARP_SIZE) { sum += to_float(dout[off + d]) * to_float(out[off + d]); }
    sum = warp_reduce_sum(sum);
    if (lane == 0) { D[row] = sum; }
}

extern "C" __global__ void attention_flash_backward_dq_kernel1(floatX* __restrict__ dqkv,
                                                               const floatX* __restrict__ dout,
                                                               const floatX* __restrict__ qkv,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ D,
                                                               int B, int T, int NH, int NKV, int hs,
                                                               float scale) {
    // writes the query part of dqkv; the key and value parts are dkdv's
    __shared__ float k_tile[FLASH_TILE][FLASH_HS_MAX];
    __shared__ float v_tile[FLASH_TILE][FLASH_HS_MAX];
    const int qtile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (NH / NKV);
    const int W = (NH + 2 * NKV) * hs;
    const floatX* base = qkv + (long long)b * T * W;
    const int t = qtile * FLASH_TILE + threadIdx.x;
    const bool active = t < T;

    float q[FLASH_HS_MAX], dy[FLASH_HS_MAX], dq[FLASH_HS_MAX];
    const long long yoff = ((long long)b * T + t) * NH * hs + h * hs;
    for (int d = 0; d < hs; d++) {
        q[d] = active ? to_float(base[(long long)t * W + h * hs + d]) * scale : 0.0f;
        dy[d] = active ? to_float(dout[yoff + d]) : 0.0f;
        dq[d] = 0.0f;
    }
    const long long srow = ((long long)b * NH + h) * T + t;
    const float row_lse = active ? lse[srow] : 0.0f;
    const float row_D = active ? D[srow] : 0.0f;

    for (int kt = 0; kt <= qtile; kt++) {
        for (int i = threadIdx.x; i < FLASH_TILE * hs; i += blockDim.x) {
            int r = i / hs, d = i % hs, j = kt * FLASH_TILE + r;
            long long row = (long long)j * W;
            k_tile[r][d] = j < T ? to_float(base[row + (NH + kvh) * hs + d]) : 0.0f;
            v_tile[r][d] = j < T ? to_float(base[row + (NH + NKV + kvh) * hs + d]) : 0.0f;
        }
        __syncthreads();
        if (active) {
            const int n = min(FLASH_TILE, t - kt * FLASH_TILE + 1);
            for (int jj = 0; jj < n; jj++) {
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < hs; d++) {
                    s += q[d] * k_tile[jj][d];
                    dp += dy[d] * v_tile[jj][d];
                }
                const float ds = expf(s - row_lse) * (dp - row_D);
                for (int d = 0; d < hs; d++) { dq[d] += ds * k_tile[jj][d]; }
            }
        }
        __syncthreads();
    }
    if (active) {
        floatX* g = dqkv + ((long long)b * T + t) * W + h * hs;
        for (int d = 0; d < hs; d++) { g[d] = from_float(dq[d] * scale); }
    }
}

extern "C" __global__ void attention_flash_backward_dkdv_kernel1(floatX* __restrict__ dqkv,
                                                                 const floatX* __restrict__ dout,
                                                                 const floatX* __restrict__ qkv,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ D,
                                                                 int B, int T, int NH, int NKV, int hs,
                                                                 float scale) {
    // writes the key and value parts of dqkv for kv head blockIdx.y
    __shared__ float q_tile[FLASH_TILE][FLASH_HS_MAX];   // scaled queries
    __shared__ float dy_tile[FLASH_TILE][FLASH_HS_MAX];
    __shared__ float lse_tile[FLASH_TILE];
    __shared__ float D_tile[FLASH_TILE];
    const int ktile = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int G = NH / NKV;
    const int W = (NH + 2 * NKV) * hs;
    const floatX* base = qkv + (long long)b * T * W;
    const int j = ktile * FLASH_TILE + threadIdx.x;
    const bool active = j < T;
    const int num_tiles = CEIL_DIV(T, FLASH_TILE);

    float k[FLASH_HS_MAX], v[FLASH_HS_MAX], dk[FLASH_HS_MAX], dv[FLASH_HS_MAX];
    for (int d = 0; d < hs; d++) {
        k[d] = active ? to_float(base[(long long)j * W + (NH + kvh) * hs + d]) : 0.0f;
        v[d] = active ? to_float(base[(long long)j * W + (NH + NKV + kvh) * hs + d]) : 0.0f;
        dk[d] = 0.0f;
        dv[d] = 0.0f;
    }

    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        for (int qt = ktile; qt < num_tiles; qt++) {  // causal: query tiles before the diagonal see no key here
            for (int i = threadIdx.x; i < FLASH_TILE * hs; i += blockDim.x) {
                int r = i / hs, d = i % hs, t = qt * FLASH_TILE + r;
                q_tile[r][d] = t < T ? to_float(base[(long long)t * W + h * hs + d]) * scale : 0.0f;
                dy_tile[r][d] = t < T ? to_float(dout[((long long)b * T + t) * NH * hs + h * hs + d]) : 0.0f;
            }
            for (int r = threadIdx.x; r < FLASH_TILE; r += blockDim.x) {
                int t = qt * FLASH_TILE + r;
                lse_tile[r] = t < T ? lse[((long long)b * NH + h) * T + t] : 0.0f;
                D_tile[r] = t < T ? D[((long long)b * NH + h) * T + t] : 0.0f;
            }
            __syncthreads();
            if (active) {
                const int first = max(0, j - qt * FLASH_TILE);  // query rows t >= j
                const int last = min(FLASH_TILE, T - qt * FLASH_TILE);
                for (int ii = first; ii < last; ii++) {
                    float s = 0.0f, dp = 0.0f;
                    for (int d = 0; d < hs; d++) {
                        s += q_tile[ii][d] * k[d];
                        dp += dy_tile[ii][d] * v[d];
                    }
                    const float p = expf(s - lse_tile[ii]);
                    const float ds = p * (dp - D_tile[ii]);
                    for (int d = 0; d < hs; d++) {
                        dv[d] += p * dy_tile[ii][d];
                        dk[d] += ds * q_tile[ii][d];  // q_tile holds scale * q: dk = scale * sum ds q
                    }
                }
            }
            __syncthreads();
        }
    }
    if (active) {
        floatX* g = dqkv + ((long long)b * T + j) * W;
        for (int d = 0; d < hs; d++) {
            g[(NH + kvh) * hs + d] = from_float(dk[d]);
            g[(NH + NKV + kvh) * hs + d] = from_float(dv[d]);
        }
    }
}

// Version 3 runs on bf16 arrays (__nv_bfloat16 whatever floatX is); the wrapper launches
// it from the bf16 build (-DLLMCU_BF16), for which NVRTC gets the CUDA include directory.
// The fp32 NVRTC build leaves it out, so the fp32 step never depends on that header.
// The emulator needs no header (the shim defines __nv_bfloat16).
#if defined(LLMCU_EMU)
#define LLMCU_FLASH3 1
#elif defined(__CUDACC_RTC__) && !defined(LLMCU_BF16)
// NVRTC, fp32 build: no version 3
#elif defined(__has_include)
#if __has_include("cuda_bf16.h")
#include "cuda_bf16.h"
#define LLMCU_FLASH3 1
#endif
#endif

#ifdef LLMCU_FLASH3
typedef __nv_bfloat16 bf16;

// ============================================================================
// Version 3: FlashAttention-2-style tensor-core kernels, bf16 in, fp32
// accumulate, head size 64 only (GPT-2 124M..1.5B, Llama 3.2 1B).
//
// What changes against version 2: the scores, probabilities and the output
// accumulator never leave registers. Each warp owns 16 query rows (forward, dq)
// or 16 key rows (dkdv) of a 64-row tile and keeps them as mma.sync.m16n8k16
// fragments: S = Q K^T lands in the accumulator fragment layout, the online
// softmax works on it in place (a row's 64 scores sit on the 4 lanes of a quad,
// so a row max or sum is two shuffles), and the rounded probabilities are
// repacked as the A operand of the next product without a trip through shared
// memory. Shared memory only holds the K/V (or Q/dO) tiles, with rows padded to
// 72 elements so the 8 rows an ldmatrix reads fall in different banks; tiles come in
// with cp.async (16 bytes per instruction). Query tiles run longest-first.
//
//   attention_flash_forward_kernel3, attention_flash_backward_dq_kernel3:
//       grid (CEIL_DIV(T, 64), NH, B); attention_flash_backward_dkdv_kernel3:
//       grid (CEIL_DIV(T, 64), NKV, B); block 128 (4 warps); static shared
//       memory only: forward 27 KiB, dq 36 KiB, dkdv 36.5 KiB.
//   The backward preprocess (D = rowsum(dout * out)) is kernel1 from the bf16 build.
//
// Three PTX instructions do the tensor-core work (mma.sync, ldmatrix, cp.async),
// each behind one small function (flash3_mma, flash3_ldmatrix[_trans],
// flash3_cp16). Under the emulator (LLMCU_EMU) those functions are written out
// with warp shuffles from the fragment layouts in the PTX ISA manual ("Matrix
// fragments for mma.m16n8k16 with floating point type", "ldmatrix"), so every
// index computation of the kernels around them runs and is tested on the CPU;
// only the three functions' GPU versions are GPU-only.
//
// Fragment layouts (lane = 4 * g + t, g = lane / 4, t = lane % 4), two bf16 per
// 32-bit register, the lower column/row index in the low half:
//   A (16x16, row): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                   a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, col):  b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C/D (16x8 fp32): c[0], c[1] = C[g][2t, 2t+1]; c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; each
// lane gets, in register m, row g of matrix m at columns 2t, 2t+1 (.trans: rows
// 2t and 2t+1 at column g).
//
// Speed (H200, 2026-11-28, B=16 NH=12 T=1024, benchmarks/RESULTS.md "GPU pass 3"):
// forward 0.187 ms = 138 TFLOP/s (PyTorch's flash backend 0.227 ms), forward+backward
// 0.758 ms (PyTorch 0.717 ms). The backward's two deterministic kernels do 7 tile
// products where a backward with atomic dQ does 5 (S and dP are computed by both).
#define FLASH3_TILE 64
#define FLASH3_HS 64
#define FLASH3_LD (FLASH3_HS + 8)  // padded shared row: 144 bytes
#define FLASH3_THREADS 128
#define FLASH3_LOG2E 1.4426950408889634f
#define FLASH3_LN2 0.6931471805599453f

typedef bf16 flash3_tile[FLASH3_TILE][FLASH3_LD];

__device__ __forceinline__ unsigned flash3_pack(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}
__device__ __forceinline__ float flash3_lo(unsigned x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float flash3_hi(unsigned x) { return __uint_as_float(x & 0xffff0000u); }

#ifndef LLMCU_EMU
// d (16x8 fp32) += a (16x16 bf16) * b (16x8 bf16), one warp.
__device__ __forceinline__ void flash3_mma(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Four 8x8 bf16 matrices from shared memory; p is this lane's row address.
__device__ __forceinline__ void flash3_ldmatrix(unsigned* r, const bf16* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void flash3_ldmatrix_trans(unsigned* r, const bf16* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
// 16 bytes global -> shared without passing through registers; flash3_cp_wait
// waits for all of this thread's copies (then a __syncthreads publishes them).
__device__ __forceinline__ void flash3_cp16(bf16* smem, const bf16* gmem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void flash3_cp_wait() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
// Version 4's pipeline: close this thread's group of copies (flash3_cp_commit), and wait
// until at most the newest group is still in flight (flash3_cp_wait_prev).
__device__ __forceinline__ void flash3_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void flash3_cp_wait_prev() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void flash3_store2(bf16* p, unsigned v) { *reinterpret_cast<unsigned*>(p) = v; }
#else
// The emulator's versions: the same results from the layouts above, gathered
// with shuffles (fp32 sums in a fixed order; the tensor core's order is its own).
__device__ __forceinline__ void flash3_mma(float* d, const unsigned* a, const unsigned* b) {
    const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    for (int half = 0; half < 2; half++) {  // k in [8 half, 8 half + 8)
        for (int q = 0; q < 4; q++) {       // the pair k = 8 half + 2q, +1
            const unsigned a_top = __shfl_sync(0xffffffff, a[2 * half], 4 * g + q);      // A[g][k..]
            const unsigned a_bot = __shfl_sync(0xffffffff, a[2 * half + 1], 4 * g + q);  // A[g+8][k..]
            const unsigned b_c0 = __shfl_sync(0xffffffff, b[half], 4 * (2 * t) + q);     // B[k..][2t]
            const unsigned b_c1 = __shfl_sync(0xffffffff, b[half], 4 * (2 * t + 1) + q); // B[k..][2t+1]
            d[0] += flash3_lo(a_top) * flash3_lo(b_c0) + flash3_hi(a_top) * flash3_hi(b_c0);
            d[1] += flash3_lo(a_top) * flash3_lo(b_c1) + flash3_hi(a_top) * flash3_hi(b_c1);
            d[2] += flash3_lo(a_bot) * flash3_lo(b_c0) + flash3_hi(a_bot) * flash3_hi(b_c0);
            d[3] += flash3_lo(a_bot) * flash3_lo(b_c1) + flash3_hi(a_bot) * flash3_hi(b_c1);
        }
    }
}
__device__ __forceinline__ unsigned flash3_bits2(const bf16* lo, const bf16* hi) {
    return (unsigned)__bfloat16_as_ushort(*lo) | ((unsigned)__bfloat16_as_ushort(*hi) << 16);
}
__device__ __forceinline__ void flash3_ldmatrix(unsigned* r, const bf16* p) {
    const int lane = threadIdx.x % WARP_SIZE;
    EMU_CHECK_SHARED(p, 16, 16, "ldmatrix row");  // a shared, 16-byte aligned 8-element row
    for (int m = 0; m < 4; m++) {
        const bf16* row = __shfl_sync(0xffffffff, p, 8 * m + lane / 4);
        r[m] = flash3_bits2(row + 2 * (lane % 4), row + 2 * (lane % 4) + 1);
    }
}
__device__ __forceinline__ void flash3_ldmatrix_trans(unsigned* r, const bf16* p) {
    const int lane = threadIdx.x % WARP_SIZE;
    EMU_CHECK_SHARED(p, 16, 16, "ldmatrix.trans row");
    for (int m = 0; m < 4; m++) {
        const bf16* row0 = __shfl_sync(0xffffffff, p, 8 * m + 2 * (lane % 4));
        const bf16* row1 = __shfl_sync(0xffffffff, p, 8 * m + 2 * (lane % 4) + 1);
        r[m] = flash3_bits2(row0 + lane / 4, row1 + lane / 4);
    }
}
// cp.async as CUDA's pipeline primitives, which the emulator models (llmcu/emu/shim.h): a
// copy's destination reads NaN until the wait that covers it.
__device__ __forceinline__ void flash3_cp16(bf16* smem, const bf16* gmem) { __pipeline_memcpy_async(smem, gmem, 16); }
__device__ __forceinline__ void flash3_cp_wait() { __pipeline_commit(); __pipeline_wait_prior(0); }
__device__ __forceinline__ void flash3_cp_commit() { __pipeline_commit(); }
__device__ __forceinline__ void flash3_cp_wait_prev() { __pipeline_wait_prior(1); }
__device__ __forceinline__ void flash3_store2(bf16* p, unsigned v) {
    p[0] = __ushort_as_bfloat16((unsigned short)(v & 0xffffu));
    p[1] = __ushort_as_bfloat16((unsigned short)(v >> 16));
}
#endif

// Rows [row0, row0 + 64) of a (rows, ld) bf16 matrix, 64 columns from src, into a
// padded shared tile (cp.async); rows >= T become zeros. The caller waits
// (flash3_cp_wait) and synchronises.
__device__ __forceinline__ void flash3_load_tile(flash3_tile tile, const bf16* src, int row0, int T, long long ld) {
    for (int i = threadIdx.x; i < FLASH3_TILE * FLASH3_HS / 8; i += blockDim.x) {
        const int r = i / (FLASH3_HS / 8), c = (i % (FLASH3_HS / 8)) * 8;
        if (row0 + r < T) {
            flash3_cp16(&tile[r][c], src + (long long)(row0 + r) * ld + c);
        } else {
            for (int e = 0; e < 8; e++) { tile[r][c + e] = __float2bfloat16(0.0f); }
        }
    }
}

// A fragments (16 rows x 64 columns, 4 k-steps of 16) of this warp's rows [row0, row0 + 16).
__device__ __forceinline__ void flash3_load_a(unsigned (*frag)[4], const flash3_tile tile, int row0) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int kk = 0; kk < FLASH3_HS / 16; kk++) {
        flash3_ldmatrix(frag[kk], &tile[row0 + lane % 16][kk * 16 + (lane / 16) * 8]);
    }
}

// acc (16 x 64: 8 n-tiles) += A (16 x 64, fragments) * M^T for a 64 x 64 shared tile M:
// B[k][n] = M[n][k] (M's rows are the output columns; non-transposed ldmatrix).
__device__ __forceinline__ void flash3_mma_abt(float (*acc)[4], const unsigned (*a)[4], const flash3_tile m) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int kk = 0; kk < FLASH3_HS / 16; kk++) {
#pragma unroll
        for (int np = 0; np < FLASH3_TILE / 16; np++) {
            unsigned b[4];
            flash3_ldmatrix(b, &m[np * 16 + (lane / 16) * 8 + lane % 8][kk * 16 + ((lane / 8) % 2) * 8]);
            flash3_mma(acc[2 * np], a[kk], b);
            flash3_mma(acc[2 * np + 1], a[kk], b + 2);
        }
    }
}

// acc (16 x 64: 8 n-tiles) += A (16 x 64, fragments) * M for a 64 x 64 shared tile M:
// B[k][n] = M[k][n] (transposed ldmatrix).
__device__ __forceinline__ void flash3_mma_ab(float (*acc)[4], const unsigned (*a)[4], const flash3_tile m) {
    const int lane = threadIdx.x % WARP_SIZE;
#pragma unroll
    for (int kk = 0; kk < FLASH3_TILE / 16; kk++) {
#pragma unroll
        for (int np = 0; np < FLASH3_HS / 16; np++) {
            unsigned b[4];
            flash3_ldmatrix_trans(b, &m[kk * 16 + ((lane / 8) % 2) * 8 + lane % 8][np * 16 + (lane / 16) * 8]);
            flash3_mma(acc[2 * np], a[kk], b);
            flash3_mma(acc[2 * np + 1], a[kk], b + 2);
        }
    }
}

// The accumulator fragments (16 x 64) rounded to bf16 as A fragments (16 x 64, k = the 64 columns).
__device__ __forceinline__ void flash3_acc_to_a(unsigned (*a)[4], const float (*acc)[4]) {
#pragma unroll
    for (int kk = 0; kk < FLASH3_TILE / 16; kk++) {
        a[kk][0] = flash3_pack(acc[2 * kk][0], acc[2 * kk][1]);
        a[kk][1] = flash3_pack(acc[2 * kk][2], acc[2 * kk][3]);
        a[kk][2] = flash3_pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
        a[kk][3] = flash3_pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
    }
}

// Store the accumulator (16 x 64, times mul) as bf16 rows [row0, row0 + 16) of a
// (rows, ld) matrix at dst; rows >= T are skipped.
__device__ __forceinline__ void flash3_store_rows(bf16* dst, long long ld, int row0, int T, const float (*acc)[4],
                                                  float mul_top, float mul_bot) {
    const int lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nd = 0; nd < FLASH3_HS / 8; nd++) {
        if (row0 + g < T) {
            flash3_store2(dst + (long long)(row0 + g) * ld + nd * 8 + 2 * t,
                          flash3_pack(acc[nd][0] * mul_top, acc[nd][1] * mul_top));
        }
        if (row0 + g + 8 < T) {
            flash3_store2(dst + (long long)(row0 + g + 8) * ld + nd * 8 + 2 * t,
                          flash3_pack(acc[nd][2] * mul_bot, acc[nd][3] * mul_bot));
        }
    }
}

// This block's (tile, head, batch) in a (tiles, heads or kv heads, B) grid; heavy_low: tile 0
// has the most work (the key tiles of the backward), else the last tile (the query tiles).
// order 0 ("grouped"): blockIdx as is, a (head, batch)'s tiles going out together, heaviest
// first; they read the same K/V (or Q/dO) tiles, which L2 then serves more than once.
// order 1 ("heavy_first"): the blocks go out in order of work over the whole grid (every
// (head, batch)'s heaviest tile, then every second heaviest, ...: the linear block index
// ranks them), so the last wave holds the lightest blocks and the tail is short, but one
// (head, batch)'s blocks run at different times. The same arithmetic per block either way.
__device__ __forceinline__ void flash3_block_coords(int order, bool heavy_low, int& tile, int& head, int& b) {
    if (order == 0) {
        tile = heavy_low ? (int)blockIdx.x : (int)(gridDim.x - 1 - blockIdx.x);
        head = blockIdx.y;
        b = blockIdx.z;
        return;
    }
    const long long groups = (long long)gridDim.y * gridDim.z;
    const long long linear = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
    const int rank = (int)(linear / groups), g = (int)(linear % groups);
    tile = heavy_low ? rank : (int)gridDim.x - 1 - rank;
    head = g % gridDim.y;
    b = g / gridDim.y;
}

// QW warps of 16 query rows each: 4 (a 64-row query tile, versions 3-8) or 8 (128 rows,
// version 9: each K/V tile is loaded once per 128 queries; only with STAGES = 1, whose
// 36 KiB of static shared memory fit).
template <int STAGES, int QW = 4>
__device__ __forceinline__ void flash3_forward(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv,
                                               int B, int T, int NH, int NKV, int hs, float scale, int order) {
    constexpr int NQ = 16 * QW;  // query rows per block
    __shared__ __align__(16) flash3_tile Qb[QW / 4];  // NQ rows
    __shared__ __align__(16) flash3_tile Kb[STAGES];
    __shared__ __align__(16) flash3_tile Vb[STAGES];
    bf16 (*Qs)[FLASH3_LD] = Qb[0];
    int qtile, h, b;
    flash3_block_coords(order, false, qtile, h, b);
    const int kvh = h / (NH / NKV);
    const long long W = (long long)(NH + 2 * NKV) * FLASH3_HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    const int q0 = qtile * NQ + warp * 16 + g;  // this lane's query rows: q0 and q0 + 8
    const float sl2 = scale * FLASH3_LOG2E;     // scores in log2 units: exp(x) = exp2(x log2 e)
    // the key tiles up to the block's last query row (or T); for QW = 4, kt <= qtile
    const int last_kt = (min(qtile * NQ + NQ, T) - 1) / FLASH3_TILE;

    for (int r = 0; r < NQ; r += FLASH3_TILE) {
        flash3_load_tile(Qs + r, base + h * FLASH3_HS, qtile * NQ + r, T, W);
    }
    flash3_cp_wait();
    __syncthreads();
    unsigned qf[FLASH3_HS / 16][4];
    flash3_load_a(qf, Qs, warp * 16);

    float o[FLASH3_HS / 8][4];
#pragma unroll
    for (int nd = 0; nd < FLASH3_HS / 8; nd++) { o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f; }
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // per row, log2 units; l per lane

    auto load_kv = [&](int kt, int buf) {
        flash3_load_tile(Kb[buf], base + (NH + kvh) * FLASH3_HS, kt * FLASH3_TILE, T, W);
        flash3_load_tile(Vb[buf], base + (NH + NKV + kvh) * FLASH3_HS, kt * FLASH3_TILE, T, W);
    };
    if (STAGES == 2) { load_kv(0, 0); flash3_cp_commit(); }  // the first tile's loads in flight
    for (int kt = 0; kt <= last_kt; kt++) {
        const int buf = STAGES == 2 ? kt % 2 : 0;
        if (STAGES == 2) {
            // the next tile's loads go out before this tile's products; the buffer they fill
            // was last read in iteration kt - 1, which every warp has left (barrier below)
            if (kt < last_kt) { load_kv(kt + 1, buf ^ 1); flash3_cp_commit(); flash3_cp_wait_prev(); }
            else { flash3_cp_wait(); }
            __syncthreads();
        } else {
            __syncthreads();  // every warp is done with the previous K/V tile
            load_kv(kt, 0);
            flash3_cp_wait();
            __syncthreads();
        }
        flash3_tile& Ks = Kb[buf];
        flash3_tile& Vs = Vb[buf];

        float s[FLASH3_TILE / 8][4];
#pragma unroll
        for (int nt = 0; nt < FLASH3_TILE / 8; nt++) { s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f; }
        flash3_mma_abt(s, qf, Ks);

        // a tile with a key after one of the block's queries (keys >= T included): for QW = 4
        // only kt == qtile; for QW = 8 the last two, where a warp may find all its keys masked
        // (then p = 0 and its running max stays that of tile 0, which every row attends)
        const bool diag = kt * FLASH3_TILE + FLASH3_TILE - 1 > qtile * NQ;
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = kt * FLASH3_TILE + nt * 8 + 2 * t + (i & 1), q = q0 + 8 * (i / 2);
                float v = s[nt][i] * sl2;
                if (diag && key > q) { v = -INFINITY; }
                s[nt][i] = v;
                mx[i / 2] = fmaxf(mx[i / 2], v);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {  // a row's 64 scores are on the 4 lanes of a quad
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
            corr[r] = exp2f(m_run[r] - mx[r]);  // 0 on the first tile (m_run = -inf); key kt*64 <= q keeps mx finite
            m_run[r] = mx[r];
            l_run[r] *= corr[r];
        }
#pragma unroll
        for (int nd = 0; nd < FLASH3_HS / 8; nd++) {
            o[nd][0] *= corr[0]; o[nd][1] *= corr[0];
            o[nd][2] *= corr[1]; o[nd][3] *= corr[1];
        }
#pragma unroll
        for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s[nt][i] = exp2f(s[nt][i] - mx[i / 2]);
                l_run[i / 2] += s[nt][i];
            }
        }
        unsigned pf[FLASH3_TILE / 16][4];
        flash3_acc_to_a(pf, s);
        flash3_mma_ab(o, pf, Vs);
        if (STAGES == 2) { __syncthreads(); }  // every warp done with buf before it is refilled
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 1);
        l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 2);
        inv[r] = 1.0f / l_run[r];
        const int q = q0 + 8 * r;
        if (t == 0 && q < T) {
            lse[((long long)b * NH + h) * T + q] = (m_run[r] + log2f(l_run[r])) * FLASH3_LN2;
        }
    }
    flash3_store_rows(out + (long long)b * T * NH * FLASH3_HS + h * FLASH3_HS, (long long)NH * FLASH3_HS,
                      qtile * NQ + warp * 16, T, o, inv[0], inv[1]);
}

extern "C" __global__ void attention_flash_forward_kernel3(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv,
                                int B, int T, int NH, int NKV, int hs, float scale, int order) {
    flash3_forward<1>(out, lse, qkv, B, T, NH, NKV, hs, scale, order);
}

template <int STAGES>
__device__ __forceinline__ void flash3_backward_dq(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                   const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                                   const float* __restrict__ D, int B, int T, int NH, int NKV,
                                                   int hs, float scale, int order) {
    __shared__ __align__(16) flash3_tile Kb[STAGES];  // Q in Kb[0], then K tiles
    __shared__ __align__(16) flash3_tile Vb[STAGES];  // dO in Vb[0], then V tiles
    flash3_tile& Qs = Kb[0];
    flash3_tile& dOs = Vb[0];
    int qtile, h, b;
    flash3_block_coords(order, false, qtile, h, b);
    const int kvh = h / (NH / NKV);
    const long long W = (long long)(NH + 2 * NKV) * FLASH3_HS, WO = (long long)NH * FLASH3_HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4, t = lane % 4;
    const int q0 = qtile * FLASH3_TILE + warp * 16 + g;
    const float sl2 = scale * FLASH3_LOG2E;

    flash3_load_tile(Qs, base + h * FLASH3_HS, qtile * FLASH3_TILE, T, W);
    flash3_load_tile(dOs, dout + (long long)b * T * WO + h * FLASH3_HS, qtile * FLASH3_TILE, T, WO);
    flash3_cp_wait();
    __syncthreads();
    unsigned qf[FLASH3_HS / 16][4], dof[FLASH3_HS / 16][4];
    flash3_load_a(qf, Qs, warp * 16);
    flash3_load_a(dof, dOs, warp * 16);
    float lse2[2], Dr[2];  // per row: lse in log2 units, D
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int q = q0 + 8 * r;
        lse2[r] = q < T ? lse[((long long)b * NH + h) * T + q] * FLASH3_LOG2E : INFINITY;
        Dr[r] = q < T ? D[((long long)b * NH + h) * T + q] : 0.0f;
    }
    float dq[FLASH3_HS / 8][4];
#pragma unroll
    for (int nd = 0; nd < FLASH3_HS / 8; nd++) { dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.0f; }

    auto load_kv = [&](int kt, int buf) {
        flash3_load_tile(Kb[buf], base + (NH + kvh) * FLASH3_HS, kt * FLASH3_TILE, T, W);
        flash3_load_tile(Vb[buf], base + (NH + NKV + kvh) * FLASH3_HS, kt * FLASH3_TILE, T, W);
    };
    if (STAGES == 2) {
        __syncthreads();  // every warp has its Q and dO fragments: buffer 0 may be refilled
        load_kv(0, 0);
        flash3_cp_commit();
    }
    for (int kt = 0; kt <= qtile; kt++) {
        const int buf = STAGES == 2 ? kt % 2 : 0;
        if (STAGES == 2) {  // as in flash3_forward: the next tile's loads before this tile's products
            if (kt < qtile) { load_kv(kt + 1, buf ^ 1); flash3_cp_commit(); flash3_cp_wait_prev(); }
            else { flash3_cp_wait(); }
            __syncthreads();
        } else {
            __syncthreads();  // fragments loaded / the previous tile consumed by every warp
            load_kv(kt, 0);
            flash3_cp_wait();
            __syncthreads();
        }
        flash3_tile& Ks = Kb[buf];
        flash3_tile& Vs = Vb[buf];

        float s[FLASH3_TILE / 8][4], dp[FLASH3_TILE / 8][4];
#pragma unroll
        for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
            dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
        }
        flash3_mma_abt(s, qf, Ks);    // S = Q K^T
        flash3_mma_abt(dp, dof, Vs);  // dP = dO V^T
        const bool diag = kt == qtile;
#pragma unroll
        for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = kt * FLASH3_TILE + nt * 8 + 2 * t + (i & 1), q = q0 + 8 * (i / 2);
                const float p = (diag && key > q) ? 0.0f : exp2f(s[nt][i] * sl2 - lse2[i / 2]);
                s[nt][i] = p * (dp[nt][i] - Dr[i / 2]);  // dS (without the scale)
            }
        }
        unsigned dsf[FLASH3_TILE / 16][4];
        flash3_acc_to_a(dsf, s);
        flash3_mma_ab(dq, dsf, Ks);  // dQ += dS K
        if (STAGES == 2) { __syncthreads(); }  // every warp done with buf before it is refilled
    }
    flash3_store_rows(dqkv + (long long)b * T * W + h * FLASH3_HS, W, qtile * FLASH3_TILE + warp * 16, T, dq,
                      scale, scale);
}

extern "C" __global__ void attention_flash_backward_dq_kernel3(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                    const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                    const float* __restrict__ D, int B, int T, int NH, int NKV, int hs,
                                    float scale, int order) {
    flash3_backward_dq<1>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, hs, scale, order);
}

// One step of the dK/dV backward for this warp's 16 key rows (k0, k0 + 8 on this lane) and a
// 64-row query tile starting at q_base: S^T = K Q^T and dP^T = V dO^T (kf, vf: K's and V's A
// fragments), P = exp(S scale - lse) (0 above the diagonal when diag), dS^T = P (dP - D)
// without the scale, dV += P^T dO, dK += dS^T Q. dsf gets dS^T's bf16 A fragments (version
// 5's dQ product reuses them). lse_s (in log2 units) and D_s: the tile's 64 rows.
__device__ __forceinline__ void flash3_dkdv_tile(float (*dk)[4], float (*dv)[4], unsigned (*dsf)[4],
                                                 const unsigned (*kf)[4], const unsigned (*vf)[4],
                                                 const flash3_tile Qs, const flash3_tile dOs,
                                                 const float* lse_s, const float* D_s, bool diag,
                                                 int q_base, int k0, float sl2) {
    const int t = threadIdx.x % WARP_SIZE % 4;
    float s[FLASH3_TILE / 8][4], dp[FLASH3_TILE / 8][4];  // transposed: rows = keys, columns = queries
#pragma unroll
    for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
    }
    flash3_mma_abt(s, kf, Qs);    // S^T = K Q^T
    flash3_mma_abt(dp, vf, dOs);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < FLASH3_TILE / 8; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int c = nt * 8 + 2 * t + (i & 1);
            const int q = q_base + c, key = k0 + 8 * (i / 2);
            const float p = (diag && key > q) ? 0.0f : exp2f(s[nt][i] * sl2 - lse_s[c]);
            s[nt][i] = p;
            dp[nt][i] = p * (dp[nt][i] - D_s[c]);  // dS^T (without the scale)
        }
    }
    flash3_acc_to_a(dsf, s);
    flash3_mma_ab(dv, dsf, dOs);  // dV += P^T dO
    flash3_acc_to_a(dsf, dp);
    flash3_mma_ab(dk, dsf, Qs);   // dK += dS^T Q
}

template <int STAGES>
__device__ __forceinline__ void flash3_backward_dkdv(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                                     const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                                     const float* __restrict__ D, int B, int T, int NH, int NKV,
                                                     int hs, float scale, int order) {
    __shared__ __align__(16) flash3_tile Qb[STAGES];   // K in Qb[0], then query tiles
    __shared__ __align__(16) flash3_tile dOb[STAGES];  // V in dOb[0], then dO tiles
    flash3_tile& Qs = Qb[0];
    flash3_tile& dOs = dOb[0];
    __shared__ float lse_s[FLASH3_TILE], D_s[FLASH3_TILE];
    int ktile, kvh, b;
    flash3_block_coords(order, true, ktile, kvh, b);  // tile 0 has the most query tiles
    const int group = NH / NKV;
    const long long W = (long long)(NH + 2 * NKV) * FLASH3_HS, WO = (long long)NH * FLASH3_HS;
    const bf16* base = qkv + (long long)b * T * W;
    const int warp = threadIdx.x / WARP_SIZE, lane = threadIdx.x % WARP_SIZE, g = lane / 4;
    const int k0 = ktile * FLASH3_TILE + warp * 16 + g;  // this lane's key rows: k0 and k0 + 8
    const int ntiles = gridDim.x;
    const float sl2 = scale * FLASH3_LOG2E;

    flash3_load_tile(Qs, base + (NH + kvh) * FLASH3_HS, ktile * FLASH3_TILE, T, W);
    flash3_load_tile(dOs, base + (NH + NKV + kvh) * FLASH3_HS, ktile * FLASH3_TILE, T, W);
    flash3_cp_wait();
    __syncthreads();
    unsigned kf[FLASH3_HS / 16][4], vf[FLASH3_HS / 16][4];
    flash3_load_a(kf, Qs, warp * 16);
    flash3_load_a(vf, dOs, warp * 16);

    float dk[FLASH3_HS / 8][4], dv[FLASH3_HS / 8][4];
#pragma unroll
    for (int nd = 0; nd < FLASH3_HS / 8; nd++) {
        dk[nd][0] = dk[nd][1] = dk[nd][2] = dk[nd][3] = 0.0f;
        dv[nd][0] = dv[nd][1] = dv[nd][2] = dv[nd][3] = 0.0f;
    }

    // (query head, query tile) pairs in order: the query heads sharing this kv head, and for
    // each the query tiles from this key tile on (the earlier ones are fully masked)
    const int per_head = ntiles - ktile, steps = group * per_head;
    auto load_qdo = [&](int step, int buf) {
        const int h = kvh * group + step / per_head, qt = ktile + step % per_head;
        flash3_load_tile(Qb[buf], base + h * FLASH3_HS, qt * FLASH3_TILE, T, W);
        flash3_load_tile(dOb[buf], dout + (long long)b * T * WO + h * FLASH3_HS, qt * FLASH3_TILE, T, WO);
    };
    if (STAGES == 2) {
        __syncthreads();  // every warp has its K and V fragments: buffer 0 may be refilled
        load_qdo(0, 0);
        flash3_cp_commit();
    }
    for (int step = 0; step < steps; step++) {
        const int h = kvh * group + step / per_head, qt = ktile + step % per_head;
        const int buf = STAGES == 2 ? step % 2 : 0;
        if (STAGES == 2) {
            if (step + 1 < steps) { load_qdo(step + 1, buf ^ 1); flash3_cp_commit(); }
        } else {
            __syncthreads();
            load_qdo(step, 0);
        }
        for (int r = threadIdx.x; r < FLASH3_TILE; r += blockDim.x) {
            const int q = qt * FLASH3_TILE + r;
            lse_s[r] = q < T ? lse[((long long)b * NH + h) * T + q] * FLASH3_LOG2E : INFINITY;  // p = 0
            D_s[r] = q < T ? D[((long long)b * NH + h) * T + q] : 0.0f;
        }
        if (STAGES == 2 && step + 1 < steps) { flash3_cp_wait_prev(); } else { flash3_cp_wait(); }
        __syncthreads();
        unsigned dsf[FLASH3_TILE / 16][4];
        flash3_dkdv_tile(dk, dv, dsf, kf, vf, Qb[buf], dOb[buf], lse_s, D_s, qt == ktile, qt * FLASH3_TILE, k0, sl2);
        if (STAGES == 2) { __syncthreads(); }  // every warp done with buf, lse_s, D_s before the refill
    }
    bf16* dst = dqkv + (long long)b * T * W;
    flash3_store_rows(dst + (NH + kvh) * FLASH3_HS, W, ktile * FLASH3_TILE + warp * 16, T, dk, scale, scale);
    flash3_store_rows(dst + (NH + NKV + kvh) * FLASH3_HS, W, ktile * FLASH3_TILE + warp * 16, T, dv, 1.0f, 1.0f);
}

extern "C" __global__ void attention_flash_backward_dkdv_kernel3(bf16* __restrict__ dqkv, const bf16* __restrict__ dout,
                                      const bf16* __restrict__ qkv, const float* __restrict__ lse,
                                      const float* __restrict__ D, int B, int T, int NH, int NKV, int hs,
                                      float scale, int order) {
    flash3_backward_dkdv<1>(dqkv, dout, qkv, lse, D, B, T, NH, NKV, hs, scale, order);
}

#endif  // LLMCU_FLASH3
