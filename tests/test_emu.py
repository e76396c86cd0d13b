"""The CPU emulator (llmcu.emu): small CUDA kernels run on the CPU against NumPy.

Every kernel here is also compiled with nvcc (when it is installed) to prove it
is valid CUDA. All kernels share one source file, so the session compiles it
once (~0.5 s); the error paths that are run-time errors (divergent barrier,
deadlock, shuffle from an exited lane) live there too and raise EmuError.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmcu.emu import EmuError, EmuModule, parse_kernels

PREAMBLE = r"""
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdio.h>
#include <assert.h>
#ifdef LLMCU_EMU
#define DYNAMIC_SHARED(T, name) T* name = (T*)emu_dynamic_shared()
#else
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
"""

KERNELS = PREAMBLE + r"""
// out[r][c] = a * x[r][c] + y[r][c], a 2-D grid of 2-D blocks.
extern "C" __global__ void axpy2d(float* __restrict__ out, const float* __restrict__ x,
                                  const float* __restrict__ y, float a, int rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int r = blockIdx.y * blockDim.y + threadIdx.y;
    if (r < rows && c < cols) out[r * cols + c] = a * x[r * cols + c] + y[r * cols + c];
}

// One block per row, tree reduction in static shared memory (blockDim 256).
extern "C" __global__ void row_sum_tree(float* out, const float* x, int cols) {
    __shared__ float buf[256];
    const float* row = x + (size_t)blockIdx.x * cols;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) acc += row[i];
    buf[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// Per-warp sums two ways. The lanes of a partial last warp (blockDim 80: 16
// lanes) reduce within a segment of `width` = their count (a power of two).
extern "C" __global__ void warp_sums(float* xor_out, float* down_out, const float* x) {
    int t = threadIdx.x, lane = t % 32, warp = t / 32;
    int lanes = min(32, (int)blockDim.x - warp * 32);
    float v = x[blockIdx.x * blockDim.x + t];
    float a = v, b = v;
    for (int off = lanes / 2; off > 0; off /= 2) {
        a += __shfl_xor_sync(0xffffffff, a, off, lanes);
        b += __shfl_down_sync(0xffffffff, b, off, lanes);
    }
    xor_out[blockIdx.x * blockDim.x + t] = a;  // every lane has the sum
    if (lane == 0) down_out[blockIdx.x * ((blockDim.x + 31) / 32) + warp] = b;
}

// Shuffle variants and votes: out[t] = value from lane (t+1)%32 via
// __shfl_sync, from lane t-1 via __shfl_up_sync; ballots of odd lanes.
extern "C" __global__ void warp_misc(int* rot, int* up, unsigned* ballot, int* any_all, int* count) {
    int t = threadIdx.x, lane = t % 32;
    rot[t] = __shfl_sync(0xffffffff, t * 10, (lane + 1) % 32);
    up[t] = __shfl_up_sync(0xffffffff, t * 10, 1);
    ballot[t] = __ballot_sync(0xffffffff, lane % 2);
    any_all[t] = __any_sync(0xffffffff, lane == 3) + 2 * __all_sync(0xffffffff, lane < 40)
               + 4 * __all_sync(0xffffffff, lane != 5);
    count[t] = __syncthreads_count(t % 3 == 0) + 1000 * __syncthreads_or(t == 7)
             + 100000 * __syncthreads_and(t >= 0);
}

// Each block reverses its slice through dynamic shared memory.
extern "C" __global__ void reverse_dyn(float* out, const float* x) {
    DYNAMIC_SHARED(float, buf);
    int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    buf[t] = x[base + t];
    __syncthreads();
    out[base + t] = buf[blockDim.x - 1 - t];
}

// Reads dynamic shared memory nobody wrote (the emulator fills it with 0xFF).
extern "C" __global__ void read_unwritten_dyn(float* out) {
    DYNAMIC_SHARED(float, buf);
    out[threadIdx.x] = buf[threadIdx.x];
}

// Reads static shared memory nobody in this block wrote; block 0 writes it
// first, so a stale value from the previous block would also show.
extern "C" __global__ void read_unwritten_static(float* out, int* iout) {
    __shared__ float f[64];
    __shared__ int i[64];
    if (blockIdx.x == 0) { f[threadIdx.x] = 1.0f; i[threadIdx.x] = 1; }
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = f[threadIdx.x];
    iout[blockIdx.x * blockDim.x + threadIdx.x] = i[threadIdx.x];
}

// The same from a template device function (g++ ignores a section attribute there:
// llmcu/emu/emu_shared.ld gathers such statics for the refill), whose tile is also a
// shared-memory operand for the emulator's checks (which = 1).
template <int N>
__device__ void template_static_tile(float* out, int which) {
    __shared__ __align__(16) float tile[N];
    if (blockIdx.x == 0) { tile[threadIdx.x] = 1.0f; }
    __syncthreads();
#ifdef LLMCU_EMU
    if (which == 1) { EMU_CHECK_SHARED(tile, 16, 16, "template tile"); }
#endif
    out[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x];
}
extern "C" __global__ void read_unwritten_template_static(float* out, int which) {
    template_static_tile<64>(out, which);
}

extern "C" __global__ void histogram(int* bins, float* total, const int* x, int n, int nbins) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        atomicAdd(&bins[x[i] % nbins], 1);
        atomicAdd(total, (float)x[i]);
    }
}

// Threads past n return before the barrier; exited threads count as arrived.
extern "C" __global__ void early_exit_sum(float* out, const float* x, int n) {
    __shared__ float buf[128];
    int t = threadIdx.x;
    if (t >= n) return;
    buf[t] = x[t];
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s += buf[i];
        out[0] = s;
    }
}

// out[t] = the order in which threads ran (LLMCU_EMU_ORDER changes it).
extern "C" __global__ void run_order(int* out, int* counter) {
    out[threadIdx.x] = atomicAdd(counter, 1);
}

// Each warp writes its 32 values to shared memory and reads the other warp's 32 after two
// shuffles (warp operations, as in an emulated mma), with (fixed = 1) or without (fixed = 0)
// the __syncthreads that must come between: two warps of 32, block 64.
extern "C" __global__ void cross_warp_read(float* out, const float* x, int fixed) {
    __shared__ float buf[64];
    const int t = threadIdx.x;
    buf[t] = x[t];
    if (fixed) { __syncthreads(); }
    float v = __shfl_xor_sync(0xffffffff, x[t], 1);
    v = __shfl_xor_sync(0xffffffff, v, 1);  // x[t] again
    out[t] = buf[(t + 32) % 64] + (v - x[t]);
}

extern "C" __global__ void bf16_round(__nv_bfloat16* out, const float* x, float* back, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = __float2bfloat16(x[i]);
        back[i] = __bfloat162float(out[i]);
    }
}

extern "C" __global__ void say_hello(int tag) {
    if (threadIdx.x == 1 && blockIdx.x == 2) printf("hello from emu %d\n", tag);
}

extern "C" __global__ void checks_assert(const int* x) {
    assert(x[threadIdx.x] >= 0);
}

// --- bugs the emulator must report -----------------------------------------

// Even and odd threads reach different __syncthreads.
extern "C" __global__ void divergent_barrier(float* x) {
    if (threadIdx.x % 2 == 0) {
        x[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        x[threadIdx.x] = 2.0f;
        __syncthreads();
    }
}

// Half of a warp shuffles while the other half waits at a block barrier.
extern "C" __global__ void shuffle_deadlock(float* x) {
    float v = x[threadIdx.x];
    if (threadIdx.x < 16) v += __shfl_xor_sync(0xffffffff, v, 1);
    __syncthreads();
    x[threadIdx.x] = v;
}

// 120 KB of locals: overflows the default 64 KiB fiber stack.
extern "C" __global__ void big_stack(float* out, int n) {
    float big[30000];
    for (int i = 0; i < n; i++) big[i] = (float)i;
    out[threadIdx.x] = big[n - 1 - threadIdx.x];
}

// Lanes 16-31 return, then lanes 0-15 read them with a shuffle.
extern "C" __global__ void shuffle_from_exited(float* x) {
    if (threadIdx.x >= 16) return;
    float v = x[threadIdx.x];
    v += __shfl_down_sync(0xffffffff, v, 16);
    x[threadIdx.x] = v;
}
"""

KERNELS += r"""
#include <cuda_pipeline.h>
// cp.async through CUDA's pipeline primitives. Sums element (t + 32) % 64 (the other warp's
// half) of each of `tiles` tiles of 64 floats, loaded into two shared buffers, the next
// tile's copies in flight during this tile's reads; block 64 (two warps), 16 threads copy
// 16 bytes each. bug = 1 drops the wait (reads a tile before it lands), bug = 2 drops the
// barrier after the reads (refills a buffer the other warp may still be reading).
extern "C" __global__ void pipelined_sum(float* out, const float* x, int tiles, int bug) {
    __shared__ __align__(16) float buf[2][64];
    const int t = threadIdx.x;
    float acc = 0.0f;
    if (t < 16) __pipeline_memcpy_async(&buf[0][4 * t], x + 4 * t, 16);
    __pipeline_commit();
    for (int k = 0; k < tiles; k++) {
        if (k + 1 < tiles && t < 16) __pipeline_memcpy_async(&buf[(k + 1) % 2][4 * t], x + (k + 1) * 64 + 4 * t, 16);
        __pipeline_commit();
        if (bug != 1) __pipeline_wait_prior(1);  // tile k's group has landed; k + 1's may not have
        __syncthreads();
        acc += buf[k % 2][(t + 32) % 64];
        if (bug != 2) __syncthreads();
    }
    out[t] = acc;
}

// One thread, three copies of 4 floats: A (group 0), B (group 1), C (not committed), and
// D (16 bytes, the last 8 zero-filled). out[0:4] = A after wait_prior(1); out[4:8] = B
// then (still in flight); out[8:12] = B after wait_prior(0); out[12:16] = C then (in
// flight: wait_group covers committed groups only); out[16:20] = D after a final wait.
extern "C" __global__ void pipeline_groups(float* out, const float* x) {
    __shared__ __align__(16) float s[16];
    __pipeline_memcpy_async(&s[0], x, 16);
    __pipeline_commit();
    __pipeline_memcpy_async(&s[4], x + 4, 16);
    __pipeline_commit();
    __pipeline_memcpy_async(&s[8], x + 8, 16);
    __pipeline_wait_prior(1);
    for (int i = 0; i < 8; i++) out[i] = s[i];
    __pipeline_wait_prior(0);
    for (int i = 0; i < 4; i++) { out[8 + i] = s[4 + i]; out[12 + i] = s[8 + i]; }
    __pipeline_memcpy_async(&s[12], x + 12, 16, 8);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    for (int i = 0; i < 4; i++) out[16 + i] = s[12 + i];
}

// cp.async copies global -> shared: a copy into global memory (which = 0) or from shared
// memory (which = 1) is refused.
extern "C" __global__ void pipeline_wrong_spaces(float* g, const float* x, int which) {
    __shared__ __align__(16) float s[8];
    if (which == 0) __pipeline_memcpy_async(g, x, 16);
    else __pipeline_memcpy_async(s + 4, s, 16);
    __pipeline_commit();
    __pipeline_wait_prior(0);
}

// The emulator's operand check for instructions it writes out (ldmatrix in attention.cu):
// which = 0 a 16-byte aligned static shared row (passes), 1 the same 4 bytes on (refused:
// misaligned), 2 a global pointer (refused: not shared), 3 dynamic shared memory (passes).
extern "C" __global__ void check_shared_operand(const float* g, int which) {
    __shared__ __align__(16) float s[16];
    DYNAMIC_SHARED(float, dyn);
    s[threadIdx.x] = g[threadIdx.x];
#ifdef LLMCU_EMU
    const void* p = which == 0 ? (const void*)s : which == 1 ? (const void*)(s + 1)
                  : which == 2 ? (const void*)g : (const void*)dyn;
    EMU_CHECK_SHARED(p, 16, 16, "test operand");
#endif
}

// cp.async needs aligned addresses: a 16-byte copy from x + 1 is refused.
extern "C" __global__ void pipeline_misaligned(const float* x) {
    __shared__ __align__(16) float s[4];
    __pipeline_memcpy_async(s, x + 1, 16);
    __pipeline_commit();
    __pipeline_wait_prior(0);
}
"""

KERNELS += r"""
// A warp-per-row "layernorm" (mean and rstd only), the shape of the real one.
extern "C" __global__ void row_stats(float* mean, float* rstd, const float* x, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;  // whole warps return together
    const float* r = x + (size_t)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += 32) s += r[i];
    for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
    float m = s / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += 32) { float d = r[i] - m; v += d * d; }
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
    if (lane == 0) { mean[row] = m; rstd[row] = rsqrtf(v / C + 1e-5f); }
}
"""


@pytest.fixture(scope="session")
def emu_env(tmp_path_factory):
    """A fresh library cache for the session, so every test run compiles what it tests."""
    cache = tmp_path_factory.mktemp("emu_cache")
    old = os.environ.get("LLMCU_EMU_CACHE")
    os.environ["LLMCU_EMU_CACHE"] = str(cache)
    yield cache
    if old is None:
        del os.environ["LLMCU_EMU_CACHE"]
    else:
        os.environ["LLMCU_EMU_CACHE"] = old


@pytest.fixture(scope="session")
def src_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu_src")
    (d / "kernels.cu").write_text(KERNELS)
    return d


@pytest.fixture(scope="session")
def mod(emu_env, src_dir):
    return EmuModule(src_dir / "kernels.cu")


def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------
# Kernels against NumPy


def test_elementwise_2d_grid(mod):
    rows, cols = 37, 53
    x = rng().standard_normal((rows, cols)).astype(np.float32)
    y = rng().standard_normal((rows, cols)).astype(np.float32) + 1
    out = np.full((rows, cols), np.nan, np.float32)
    block = (16, 8)
    grid = ((cols + 15) // 16, (rows + 7) // 8)
    mod.get_function("axpy2d")(grid, block, (out, x, y, np.float32(1.5), np.int32(rows), np.int32(cols)))
    np.testing.assert_allclose(out, np.float32(1.5) * x + y, rtol=1e-6, atol=1e-6)


def test_block_reduce_static_shared(mod):
    x = rng().standard_normal((13, 1000)).astype(np.float32)
    out = np.full(13, np.nan, np.float32)
    mod.get_function("row_sum_tree")(13, 256, (out, x, np.int32(1000)))
    np.testing.assert_allclose(out, x.sum(1, dtype=np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("threads", [96, 80])  # 80: the last warp has 16 lanes
def test_warp_shuffle_reduce(mod, threads):
    blocks = 3
    nwarps = (threads + 31) // 32
    x = rng().standard_normal(blocks * threads).astype(np.float32)
    xor_out = np.full(blocks * threads, np.nan, np.float32)
    down_out = np.full(blocks * nwarps, np.nan, np.float32)
    mod.get_function("warp_sums")(blocks, threads, (xor_out, down_out, x))
    want = np.array([x[b * threads + w * 32 : b * threads + min(threads, (w + 1) * 32)].sum()
                     for b in range(blocks) for w in range(nwarps)], np.float32)
    np.testing.assert_allclose(down_out, want, rtol=1e-5, atol=1e-5)
    lane_warp = np.array([b * nwarps + t // 32 for b in range(blocks) for t in range(threads)])
    np.testing.assert_allclose(xor_out, want[lane_warp], rtol=1e-5, atol=1e-5)


def test_shuffle_variants_votes_and_block_votes(mod):
    n = 64
    rot, up, cnt, anyall = (np.full(n, -1, np.int32) for _ in range(4))
    ballot = np.zeros(n, np.uint32)
    mod.get_function("warp_misc")(1, n, (rot, up, ballot, anyall, cnt))
    t = np.arange(n)
    lane = t % 32
    np.testing.assert_array_equal(rot, (t - lane + (lane + 1) % 32) * 10)
    np.testing.assert_array_equal(up, np.where(lane == 0, t, t - 1) * 10)
    np.testing.assert_array_equal(ballot, np.full(n, 0xAAAAAAAA, np.uint32))
    np.testing.assert_array_equal(anyall, np.full(n, 1 + 2 + 0))
    np.testing.assert_array_equal(cnt, np.full(n, (t % 3 == 0).sum() + 1000 + 100000))


def test_dynamic_shared_memory(mod):
    x = rng().standard_normal(4 * 64).astype(np.float32)
    out = np.full_like(x, np.nan)
    mod.get_function("reverse_dyn")(4, 64, (out, x), shared_mem=64 * 4)
    np.testing.assert_array_equal(out, x.reshape(4, 64)[:, ::-1].ravel())
    # Unwritten dynamic shared memory reads as NaN (0xFF bytes), as a hint.
    junk = np.zeros(32, np.float32)
    mod.get_function("read_unwritten_dyn")(1, 32, (junk,), shared_mem=32 * 4)
    assert np.isnan(junk).all()


def test_unwritten_static_shared_reads_poison(mod):
    """Each block starts with static shared memory filled with 0xFF bytes."""
    out = np.zeros(2 * 64, np.float32)
    iout = np.zeros(2 * 64, np.int32)
    mod.get_function("read_unwritten_static")(2, 64, (out, iout))
    assert (out[:64] == 1).all() and (iout[:64] == 1).all()
    assert np.isnan(out[64:]).all() and (iout[64:] == -1).all()


def test_unwritten_template_static_shared_reads_poison(mod):
    """Static shared memory of a template function is refilled before each block too (block 1
    reads NaN, not block 0's ones) and counts as shared memory for the operand checks."""
    for which in (0, 1):
        out = np.zeros(2 * 64, np.float32)
        mod.get_function("read_unwritten_template_static")(2, 64, (out, np.int32(which)))
        assert (out[:64] == 1).all() and np.isnan(out[64:]).all(), out


def test_atomic_histogram(mod):
    n, nbins = 1000, 7
    x = rng().integers(0, 100, n).astype(np.int32)
    bins = np.zeros(nbins, np.int32)
    total = np.zeros(1, np.float32)
    mod.get_function("histogram")((n + 127) // 128, 128, (bins, total, x, np.int32(n), np.int32(nbins)))
    np.testing.assert_array_equal(bins, np.bincount(x % nbins, minlength=nbins))
    assert total[0] == x.sum()


def test_threads_return_before_barrier(mod):
    x = rng().standard_normal(128).astype(np.float32)
    out = np.full(1, np.nan, np.float32)
    mod.get_function("early_exit_sum")(1, 128, (out, x, np.int32(50)))
    np.testing.assert_allclose(out[0], x[:50].sum(), rtol=1e-5)


def test_run_order_env(mod, monkeypatch):
    k = mod.get_function("run_order")
    for order, check in [("", lambda o: (o == np.arange(64)).all()),
                         ("reverse", lambda o: (o == np.arange(64)[::-1]).all()),
                         ("random", lambda o: sorted(o) == list(range(64)) and (o != np.arange(64)).any())]:
        monkeypatch.setenv("LLMCU_EMU_ORDER", order)
        out = np.full(64, -1, np.int32)
        k(1, 64, (out, np.zeros(1, np.int32)))
        assert check(out), (order, out)


def test_run_order_warp_serial(mod, monkeypatch):
    """warps: warp 0's lanes, then warp 1's (no shuffles here, so as the default order);
    warps-reverse: warp 1 first. An unknown order is refused, naming the ones there are."""
    k = mod.get_function("run_order")
    for order, want in [("warps", np.arange(64)),
                        ("warps-reverse", np.r_[np.arange(32, 64), np.arange(32)])]:
        monkeypatch.setenv("LLMCU_EMU_ORDER", order)
        out = np.full(64, -1, np.int32)
        k(1, 64, (out, np.zeros(1, np.int32)))
        assert (out == want).all(), (order, out)
    monkeypatch.setenv("LLMCU_EMU_ORDER", "sideways")
    with pytest.raises(EmuError, match="LLMCU_EMU_ORDER must be forward, reverse, random, warps or "
                                       "warps-reverse, got 'sideways'"):
        k(1, 64, (np.zeros(64, np.int32), np.zeros(1, np.int32)))


@pytest.mark.parametrize("order", ["", "reverse", "random", "warps", "warps-reverse"])
def test_missing_barrier_between_warps(mod, monkeypatch, order):
    """A warp reading another warp's shared-memory writes without a __syncthreads: the
    warp-serial orders run each warp alone to its barrier, so the reader finds the unwritten
    (NaN-filled) values and the bug shows; the default orders keep the warps in step at the
    shuffles, and the values happen to be there. With the barrier every order is right."""
    monkeypatch.setenv("LLMCU_EMU_ORDER", order)
    x = rng().standard_normal(64).astype(np.float32)
    k = mod.get_function("cross_warp_read")
    out = np.full(64, -1.0, np.float32)
    k(1, 64, (out, x, np.int32(1)))
    np.testing.assert_array_equal(out, np.roll(x, -32))
    out = np.full(64, -1.0, np.float32)
    k(1, 64, (out, x, np.int32(0)))
    if order.startswith("warps"):
        assert np.isnan(out).sum() == 32, out  # the warp that ran first read nothing written
    elif order != "random":  # (random may or may not: its interleaving varies)
        np.testing.assert_array_equal(out, np.roll(x, -32))  # what the lockstep orders miss



# --- cp.async (CUDA's pipeline primitives; LLMCU_EMU_CP_ASYNC) -------------------------

@pytest.mark.parametrize("mode", ["", "late", "eager"])
def test_cp_async_pipeline(mod, monkeypatch, mode):
    """A correct double-buffered pipeline is right in both modes. A missing wait reads
    poison (NaN) in the late mode, the default, where a copy lands only at its wait, and
    slips through the eager one (copies at issue: the emulator before it modelled cp.async).
    A missing barrier before a buffer is refilled shows in both: the poison (late) or the
    next tile (eager) reaches the other warp's reads."""
    monkeypatch.setenv("LLMCU_EMU_CP_ASYNC", mode)
    tiles = 5
    x = rng().standard_normal(tiles * 64).astype(np.float32)
    want = x.reshape(tiles, 64)[:, (np.arange(64) + 32) % 64].sum(0)
    k = mod.get_function("pipelined_sum")

    def run(bug):
        out = np.full(64, -1.0, np.float32)
        k(1, 64, (out, x, np.int32(tiles), np.int32(bug)))
        return out
    np.testing.assert_allclose(run(0), want, rtol=1e-6)
    no_wait = run(1)
    if mode == "eager":
        np.testing.assert_allclose(no_wait, want, rtol=1e-6)  # what copying at issue misses
    else:
        assert np.isnan(no_wait).all(), no_wait
    no_barrier = run(2)
    assert not np.allclose(no_barrier, want, rtol=1e-6, equal_nan=False), no_barrier
    if mode != "eager":
        assert np.isnan(no_barrier).any(), no_barrier  # reads of the half a refill had poisoned


def test_cp_async_groups_and_zero_fill(mod, monkeypatch):
    """wait_prior(n) lands all but the newest n committed groups, in order; uncommitted copies
    stay in flight through a wait; zfill zeroes the tail of a copy."""
    monkeypatch.delenv("LLMCU_EMU_CP_ASYNC", raising=False)
    x = np.arange(1, 17, dtype=np.float32)
    out = np.zeros(20, np.float32)
    mod.get_function("pipeline_groups")(1, 1, (out, x))
    np.testing.assert_array_equal(out[0:4], x[0:4])
    assert np.isnan(out[4:8]).all()          # B: its group is the newest, still in flight
    np.testing.assert_array_equal(out[8:12], x[4:8])
    assert np.isnan(out[12:16]).all()        # C: never committed, so not waited for
    np.testing.assert_array_equal(out[16:20], [13, 14, 0, 0])


def test_cp_async_errors(mod, monkeypatch):
    x = np.zeros(8, np.float32)
    with pytest.raises(EmuError, match=r"cp\.async of 16 bytes needs 16-byte aligned addresses"):
        mod.get_function("pipeline_misaligned")(1, 1, (x,))
    with pytest.raises(EmuError, match=r"cp\.async destination 0x[0-9a-f]+ is not in the block's shared memory"):
        mod.get_function("pipeline_wrong_spaces")(1, 1, (np.zeros(8, np.float32), x, np.int32(0)))
    with pytest.raises(EmuError, match=r"cp\.async source 0x[0-9a-f]+ is in shared memory"):
        mod.get_function("pipeline_wrong_spaces")(1, 1, (np.zeros(8, np.float32), x, np.int32(1)))
    monkeypatch.setenv("LLMCU_EMU_CP_ASYNC", "sometimes")
    with pytest.raises(EmuError, match="LLMCU_EMU_CP_ASYNC must be late or eager, got 'sometimes'"):
        mod.get_function("pipeline_groups")(1, 1, (np.zeros(20, np.float32), np.ones(16, np.float32)))


def test_shared_operand_check(mod):
    """EMU_CHECK_SHARED (what the emulated ldmatrix calls): a shared, aligned row passes;
    a misaligned one and a global pointer are refused, naming the operand and the line."""
    g = np.ones(16, np.float32)
    k = mod.get_function("check_shared_operand")
    k(1, 16, (g, np.int32(0)))
    k(1, 16, (g, np.int32(3)), shared_mem=64)
    with pytest.raises(EmuError, match=r"test operand at .*kernels\.cu:\d+: address 0x[0-9a-f]+ is not 16-byte aligned"):
        k(1, 16, (g, np.int32(1)))
    with pytest.raises(EmuError, match=r"test operand at .*: address 0x[0-9a-f]+ \(16 bytes\) is not in the block's shared memory"):
        k(1, 16, (g, np.int32(2)))


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits, nearest-even, NaN kept quiet."""
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def test_bf16_conversions_bit_exact(mod):
    specials = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38], np.float32)
    ties = (np.array([0x3F808000, 0x3F818000, 0x3F80_8001, 0x3F80_7FFF], np.uint32)).view(np.float32)
    x = np.concatenate([specials, ties, rng().standard_normal(1000).astype(np.float32) * 100])
    n = x.size
    out = np.zeros(n, np.uint16)
    back = np.zeros(n, np.float32)
    mod.get_function("bf16_round")((n + 255) // 256, 256, (out, x, back, np.int32(n)))
    np.testing.assert_array_equal(out, bf16_rne(x))
    np.testing.assert_array_equal(back.view(np.uint32), out.astype(np.uint32) << 16)


def test_printf(mod, capfd):
    mod.get_function("say_hello")(3, 4, (np.int32(42),))
    assert capfd.readouterr().out == "hello from emu 42\n"


# ---------------------------------------------------------------------------
# Argument checks (CuPy would pass all of these silently)


def test_argument_type_checks(mod):
    k = mod.get_function("axpy2d")
    assert k.param_types == ("float*", "const float*", "const float*", "float", "int", "int")
    assert k.param_names == ("out", "x", "y", "a", "rows", "cols")
    f = np.zeros(4, np.float32)
    good = (f, f, f, np.float32(1), np.int32(2), np.int32(2))
    k(1, 4, good)
    with pytest.raises(TypeError, match=r"axpy2d: parameter 4 `rows` \(int\) expects np.int32, got np.int64"):
        k(1, 4, good[:4] + (np.int64(2), np.int32(2)))
    with pytest.raises(TypeError, match=r"parameter 3 `a` \(float\) expects a numpy scalar np.float32, got float"):
        k(1, 4, good[:3] + (1.0,) + good[4:])
    with pytest.raises(TypeError, match=r"parameter 5 `cols`.*got int"):
        k(1, 4, good[:5] + (2,))
    with pytest.raises(TypeError, match=r"parameter 1 `x` \(const float\*\) expects a float32 array, got float64"):
        k(1, 4, (f, f.astype(np.float64)) + good[2:])
    with pytest.raises(TypeError, match="C-contiguous"):
        k(1, 4, (np.zeros(8, np.float32)[::2],) + good[1:])
    with pytest.raises(TypeError, match="takes 6 arguments"):
        k(1, 4, good[:5])
    with pytest.raises(EmuError, match="no kernel 'nope'.*available: axpy2d, row_sum_tree"):
        mod.get_function("nope")


def test_launch_config_checks(mod):
    k = mod.get_function("reverse_dyn")
    x = np.zeros(2048, np.float32)
    with pytest.raises(EmuError, match="at most 1024"):
        k(1, 1025, (x, x))
    with pytest.raises(EmuError, match=">= 1"):
        k((1, 0), 32, (x, x))
    with pytest.raises(EmuError, match="max_dynamic_shared_size_bytes"):
        k(1, 32, (x, x), shared_mem=64 * 1024)
    k.max_dynamic_shared_size_bytes = 64 * 1024  # the CUDA opt-in, as on a cupy.RawKernel
    k(1, 32, (x, x), shared_mem=64 * 1024)


# ---------------------------------------------------------------------------
# Bugs reported as errors, not hangs or garbage


def test_divergent_barrier_is_reported(mod):
    with pytest.raises(EmuError, match=r"divergent_barrier.*divergent barrier.*kernels\.cu:\d+.*kernels\.cu:\d+"):
        mod.get_function("divergent_barrier")(1, 64, (np.zeros(64, np.float32),))


def test_deadlock_is_reported(mod):
    with pytest.raises(EmuError, match=r"deadlock.*16 thread\(s\) wait at a warp shuffle.*16 thread\(s\) wait at "
                                       r"__syncthreads"):
        mod.get_function("shuffle_deadlock")(1, 32, (np.zeros(32, np.float32),))


def test_shuffle_from_exited_lane_is_reported(mod):
    with pytest.raises(EmuError, match=r"__shfl_down_sync.*reads lane 16, which has exited"):
        mod.get_function("shuffle_from_exited")(1, 32, (np.zeros(32, np.float32),))


def test_device_assert_is_reported(mod):
    k = mod.get_function("checks_assert")
    k(1, 8, (np.arange(8, dtype=np.int32),))
    bad = np.arange(8, dtype=np.int32)
    bad[5] = -1
    with pytest.raises(EmuError, match=r"thread \(5,0,0\).*assertion `x\[threadIdx.x\] >= 0` failed"):
        k(1, 8, (bad,))
    k(1, 8, (np.arange(8, dtype=np.int32),))  # the library still works after an error


STACK_SCRIPT = """
import sys, numpy as np
from llmcu.emu import EmuModule
out = np.zeros(4, np.float32)
EmuModule(sys.argv[1]).get_function("big_stack")(1, 4, (out, np.int32(30000)))
print(out[0])
"""


def test_stack_overflow_names_kernel_and_fix(mod, src_dir):
    """A crash kills the process (so: a subprocess), but says what to change."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-c", STACK_SCRIPT, str(src_dir / "kernels.cu")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "stack overflow in kernel big_stack, block (0,0,0), thread (0,0,0)" in r.stderr, r.stderr
    assert "LLMCU_EMU_STACK" in r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, env={**env, "LLMCU_EMU_STACK": "256K"}, timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, "29999.0"), r.stderr


ASAN_SCRIPT = """
import sys, numpy as np
from llmcu.emu import EmuModule
m = EmuModule(sys.argv[1])
x = np.ones(32, np.float32)
out = np.zeros(32, np.float32)
m.get_function("oob")(1, 32, (out, x, np.int32(31)))
print("in bounds ok", flush=True)
m.get_function("oob")(1, 32, (out, x, np.int32(32)))
"""


def _libasan():
    r = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True)
    p = Path(r.stdout.strip())
    return p if r.returncode == 0 and p.is_absolute() and p.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="g++ has no AddressSanitizer runtime")
def test_asan_names_the_out_of_bounds_line(emu_env, tmp_path):
    src = tmp_path / "oob.cu"
    src.write_text(PREAMBLE + r"""
extern "C" __global__ void oob(float* out, const float* x, int n) {
    __shared__ float s[32];
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x] + s[(threadIdx.x + 1) % 32];
    if (threadIdx.x == 0) out[n] = 1.0f;  // out-of-bounds when n == 32
}
""")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LLMCU_EMU_ASAN": "1",
           "LD_PRELOAD": str(_libasan()), "ASAN_OPTIONS": "detect_leaks=0"}
    r = subprocess.run([sys.executable, "-c", ASAN_SCRIPT, str(src)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert "in bounds ok" in r.stdout, r.stderr
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "oob.cu:" + str(PREAMBLE.count("\n") + 7) in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# Building


def test_compile_error_carries_stderr(emu_env, tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(EmuError, match=r"(?s)broken\.cu.*undefined_name.*not declared"):
        EmuModule(src)


def test_shared_in_inline_helper_and_kernel(emu_env, tmp_path):
    """__shared__ in a template/inline helper beside one in a kernel: g++ will
    not put both in the poisoned section, so the launcher builds it without."""
    src = tmp_path / "helpers.cu"
    src.write_text(PREAMBLE + r"""
template <int N> __device__ float rotate(float v) {
    __shared__ float s[N];
    s[threadIdx.x] = v;
    __syncthreads();
    return s[(threadIdx.x + 1) % N];
}
extern "C" __global__ void rotate_plus_count(float* out) {
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, 1);
    __syncthreads();
    out[threadIdx.x] = rotate<32>((float)threadIdx.x) + count;
}
""")
    out = np.zeros(32, np.float32)
    EmuModule(src).get_function("rotate_plus_count")(2, 32, (out,))
    np.testing.assert_array_equal(out, (np.arange(32) + 1) % 32 + 32)


def test_no_kernels_is_an_error(emu_env, tmp_path):
    src = tmp_path / "empty.cu"
    src.write_text("__device__ float f(float x) { return x; }\n")
    with pytest.raises(EmuError, match="no `extern \"C\" __global__ void` kernels"):
        EmuModule(src)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch, mod, emu_env):
    monkeypatch.setenv("LLMCU_EMU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    for obj in emu_env.glob("runtime-*.o"):  # reuse the session's compiled runtime
        shutil.copy(obj, tmp_path / "cache")
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "val.cuh").write_text("#define VAL 3.0f\n")
    src = tmp_path / "cached.cu"
    src.write_text('#include "val.cuh"\nextern "C" __global__ void fill(float* x) { x[threadIdx.x] = VAL * SCALE; }\n')

    def run(**kw):
        m = EmuModule(src, include_dirs=(inc,), **kw)
        x = np.zeros(4, np.float32)
        m.get_function("fill")(1, 4, (x,))
        return m, x[0]

    t0 = time.perf_counter()
    m1, v1 = run(options=("-DSCALE=2",))
    t1 = time.perf_counter()
    m2, v2 = run(options=("-DSCALE=2",))
    t2 = time.perf_counter()
    assert (m1.compiled, m2.compiled, v1, v2) == (True, False, 6.0, 6.0)
    assert m1.library_path == m2.library_path and m1.library_path.is_file()
    assert t2 - t1 < (t1 - t0) / 3, (t1 - t0, t2 - t1)
    m3, v3 = run(options=("-DSCALE=5",))  # other flags: rebuilt
    assert (m3.compiled, v3) == (True, 15.0)
    (inc / "val.cuh").write_text("#define VAL 4.0f\n")  # an included header changed: rebuilt
    m4, v4 = run(options=("-DSCALE=2",))
    assert (m4.compiled, v4) == (True, 8.0)
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_ucontext_fallback(emu_env, monkeypatch, src_dir):
    monkeypatch.setenv("LLMCU_EMU_UCONTEXT", "1")
    m = EmuModule(src_dir / "kernels.cu")
    x = rng().standard_normal(3 * 96).astype(np.float32)
    xo, do = np.zeros(3 * 96, np.float32), np.zeros(9, np.float32)
    m.get_function("warp_sums")(3, 96, (xo, do, x))
    np.testing.assert_allclose(do, x.reshape(9, 32).sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(EmuError, match="deadlock"):
        m.get_function("shuffle_deadlock")(1, 32, (np.zeros(32, np.float32),))


def test_layernorm_like_warp_per_row(mod):
    m = mod
    N, C = 256, 768
    x = rng().standard_normal((N, C)).astype(np.float32)
    mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    m.get_function("row_stats")(N // 8, 256, (mean, rstd, x, np.int32(N), np.int32(C)))
    np.testing.assert_allclose(mean, x.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x.var(1) + 1e-5), rtol=1e-5)


def test_parse_kernels():
    src = r'''
    // extern "C" __global__ void commented_out(int x)
    extern "C" __global__ void __launch_bounds__(256, 2) k1(float* __restrict__ out, const float *  inp,
        int N, /* c */ float eps, unsigned n, const floatX* __restrict__ w) {}
    extern "C" __global__ __launch_bounds__(1024) void k2(void) {}
    extern "C" __device__ void not_a_kernel(int a) {}
    '''
    assert parse_kernels(src) == {
        "k1": (("float*", "const float*", "int", "float", "unsigned", "const floatX*"),
               ("out", "inp", "N", "eps", "n", "w")),
        "k2": ((), ()),
    }


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_sources_are_valid_cuda(src_dir, tmp_path):
    r = subprocess.run(["nvcc", "-arch=sm_90", "-c", str(src_dir / "kernels.cu"), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
