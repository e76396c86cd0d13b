"""LayerNorm forward on the GPU: the product kernel against PyTorch's F.layer_norm (the
other versions: `python benchmarks/lab.py layernorm`).

    python -m pytest benchmarks/bench_layernorm.py            # needs CuPy and an NVIDIA GPU
    python -m pytest benchmarks/bench_layernorm.py -s         # also prints GB/s

GPT-2 124M shapes: B=8, T=1024, C=768 (N = 8192 rows), fp32. Each round
launches the kernel and synchronizes, so pytest-benchmark's wall-clock time is
the kernel time plus one launch and one sync (a few microseconds; the same
overhead for every row, PyTorch included).

Napkin math: the forward must read inp (N*C floats) and write out (N*C) and
mean, rstd (N each); weight and bias (2*C) stay in cache. That is
(2*N*C + 2*N) * 4 bytes = 50.4 MB here; achieved GB/s = bytes / time, to be
compared with the card's DRAM bandwidth (H100 SXM: 3.35 TB/s).

Without CuPy and a GPU every benchmark skips. Nothing asserts a time (the output is
checked against the oracle once).
"""

import numpy as np
import pytest

from llmcu import cuda as llmcu_cuda

pytestmark = pytest.mark.skipif(not llmcu_cuda.is_available(), reason="needs CuPy and an NVIDIA GPU")

B, T, C = 8, 1024, 768
N = B * T
BYTES = (2 * N * C + 2 * N) * 4


@pytest.fixture(scope="module")
def inputs():
    import cupy
    rng = np.random.default_rng(1)  # random inputs, as the kernel tests use
    x = (rng.standard_normal((B, T, C)) * 3.0 + 1.0).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, w, b, cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)


def report(benchmark, name):
    seconds = benchmark.stats.stats.median
    gbs = BYTES / seconds / 1e9
    benchmark.extra_info.update(bytes=BYTES, gb_per_s=round(gbs, 1))
    print(f"\n{name}: median {seconds * 1e6:.1f} us, {gbs:.0f} GB/s ({BYTES / 1e6:.1f} MB moved)")


def test_llmcu_layernorm_forward(benchmark, inputs):
    import cupy
    from llmcu.cpu.layernorm import layernorm_forward as cpu_forward
    from llmcu.cuda.layernorm import layernorm_forward
    x, w, b, dx, dw, db = inputs
    out = cupy.full((B, T, C), np.nan, np.float32)
    mean, rstd = cupy.empty((B, T), np.float32), cupy.empty((B, T), np.float32)

    def run():
        layernorm_forward(out, mean, rstd, dx, dw, db)
        cupy.cuda.get_current_stream().synchronize()

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
    ref = np.empty((B, T, C), np.float32)
    cpu_forward(ref, np.empty((B, T), np.float32), np.empty((B, T), np.float32), x, w, b)
    np.testing.assert_allclose(out.get(), ref, atol=1e-4, rtol=1e-4)
    report(benchmark, "llmcu layernorm_forward")


def test_torch_layer_norm(benchmark, inputs):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here (a CPU build): no peer to compare with")
    import torch.nn.functional as F
    x, w, b = (torch.from_numpy(a).cuda() for a in inputs[:3])

    def run():
        # F.layer_norm writes no mean/rstd (2*N*4 bytes fewer than the kernel): the GB/s
        # below uses BYTES for both, which favours PyTorch by 0.1%.
        F.layer_norm(x, (C,), w, b, eps=1e-5)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=5)
    report(benchmark, "torch.nn.functional.layer_norm")
