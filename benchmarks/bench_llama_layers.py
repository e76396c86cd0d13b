"""The Llama-family layer kernels on the GPU (rmsnorm, rope, swiglu, geglu,
grouped-query attention;
forward and backward) against a PyTorch peer doing the same work.

    python -m pytest benchmarks/bench_llama_layers.py            # needs CuPy and an NVIDIA GPU
    python -m pytest benchmarks/bench_llama_layers.py -s         # also prints time and GB/s

Shapes: Llama 3.2 1B's (C=2048, NH=32, NKV=8, hs=64, H=8192) at B=4, T=1024
(N = B*T = 4096 rows), fp32. Each round launches and synchronizes, so the time
is the kernel(s) plus one launch and one sync per kernel (a few microseconds,
the same overhead for the peer).

Napkin math: the bytes each op must move at the least (4 bytes a float;
weights and cos/sin tables stay in cache), used for llmcu and the peer alike,
so GB/s is an effective bandwidth to compare with the card's DRAM bandwidth
(H100 SXM: 3.35 TB/s):
  rmsnorm forward   read inp, write out, rstd             (2*N*C + N) * 4      =  67 MB
  rmsnorm backward  read dout, inp, rstd, write dinp      (3*N*C + N) * 4      = 101 MB
                    (version 1 reads dout and inp twice: its weight-gradient
                    kernel walks them again, 5*N*C floats in all)
  rope fwd / bwd    read and write (B,T,(NH+2*NKV)*hs)     2*N*W * 4            =  101 MB
  swiglu/geglu fwd  read (N,2H), write (N,H)              3*N*H * 4            = 403 MB
  swiglu/geglu bwd  read (N,2H) and dout (N,H), write (N,2H)  5*N*H * 4        = 671 MB
The peers: F.rms_norm; Hugging Face's rotate_half formula on q and k plus a
copy of v; F.silu(g) * u and F.gelu(g, approximate="tanh") * u; their
backwards through torch.autograd.grad on a retained graph.

Without CuPy and a GPU every benchmark skips. This is a benchmark, not a test:
nothing asserts a time (each llmcu benchmark checks its output against the
oracle once). Figures: not measured yet (no GPU was at hand when this was
written); record them in benchmarks/RESULTS.md with card, date, command, commit.
"""

import numpy as np
import pytest

from llmcu import cuda as llmcu_cuda

pytestmark = pytest.mark.skipif(not llmcu_cuda.is_available(), reason="needs CuPy and an NVIDIA GPU")

B, T, C = 4, 1024, 2048
NH, NKV, HS = 32, 8, 64
H = 8192
N = B * T
W = (NH + 2 * NKV) * HS
BYTES = {
    "rmsnorm_forward": (2 * N * C + N) * 4,
    "rmsnorm_backward": (3 * N * C + N) * 4,
    "rope_forward": 2 * N * W * 4,
    "rope_backward": 2 * N * W * 4,
    "glu_forward": 3 * N * H * 4,
    "glu_backward": 5 * N * H * 4,
}
ROUNDS = dict(rounds=30, iterations=1, warmup_rounds=3)


def rand(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


@pytest.fixture(scope="module")
def host():
    rng = np.random.default_rng(0)
    from llmcu.cpu.rope import rope_frequencies
    cos, sin = rope_frequencies(HS, T, 500000.0)
    return dict(x=rand(rng, B, T, C, scale=2.0), w=rand(rng, C, shift=1.0), dx=rand(rng, B, T, C),
                qkv=rand(rng, B, T, W), dqkv=rand(rng, B, T, W), cos=cos, sin=sin,
                fc=rand(rng, B, T, 2 * H, scale=2.0), dfc=rand(rng, B, T, H))


def sync():
    import cupy
    cupy.cuda.get_current_stream().synchronize()


def report(benchmark, name, key):
    seconds = benchmark.stats.stats.median
    nbytes = BYTES[key]
    gbs = nbytes / seconds / 1e9
    benchmark.extra_info.update(bytes=nbytes, gb_per_s=round(gbs, 1))
    print(f"\n{name}: median {seconds * 1e6:.1f} us, {gbs:.0f} GB/s ({nbytes / 1e6:.1f} MB napkin)")


def check(name, got, ref):
    # Against the oracle once, with the kernel tests' reasoning at these sizes:
    # reductions over C = 2048 and a few ulp of expf/tanhf on values up to ~30.
    np.testing.assert_allclose(got.get(), ref, atol=1e-4, rtol=1e-4, err_msg=name)


# --- llmcu ------------------------------------------------------------------

def test_llmcu_rmsnorm(benchmark, host):
    import cupy
    from llmcu.cpu import rmsnorm as cpu
    from llmcu.cuda.rmsnorm import rmsnorm_forward
    x, w = cupy.asarray(host["x"]), cupy.asarray(host["w"])
    out, rstd = cupy.full((B, T, C), np.nan, np.float32), cupy.full((B, T), np.nan, np.float32)
    benchmark.pedantic(lambda: (rmsnorm_forward(out, rstd, x, w), sync()), **ROUNDS)
    ref, rref = np.empty((B, T, C), np.float32), np.empty((B, T), np.float32)
    cpu.rmsnorm_forward(ref, rref, host["x"], host["w"])
    check("rmsnorm out", out, ref)
    report(benchmark, "llmcu rmsnorm_forward_kernel1", "rmsnorm_forward")


def test_llmcu_rmsnorm_backward(benchmark, host):
    import cupy
    from llmcu.cuda.rmsnorm import rmsnorm_backward, rmsnorm_forward
    x, w, dout = (cupy.asarray(host[k]) for k in ("x", "w", "dx"))
    out, rstd = cupy.empty((B, T, C), np.float32), cupy.empty((B, T), np.float32)
    rmsnorm_forward(out, rstd, x, w)
    dinp, dw = cupy.full((B, T, C), np.nan, np.float32), cupy.zeros(C, np.float32)
    benchmark.pedantic(lambda: (rmsnorm_backward(dinp, dw, dout, x, w, rstd), sync()), **ROUNDS)
    assert bool(cupy.isfinite(dinp).all())
    report(benchmark, "llmcu rmsnorm_backward_kernel1 + param_backward", "rmsnorm_backward")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_llmcu_rope(benchmark, host, direction):
    import cupy
    from llmcu.cpu import rope as cpu
    from llmcu.cuda import rope
    fn = getattr(rope, f"rope_{direction}")
    inp, cos, sin = (cupy.asarray(host[k]) for k in ("qkv", "cos", "sin"))
    out = cupy.full((B, T, W), np.nan, np.float32)
    benchmark.pedantic(lambda: (fn(out, inp, cos, sin, NH, NKV), sync()), **ROUNDS)
    ref = np.empty((B, T, W), np.float32)
    getattr(cpu, f"rope_{direction}")(ref, host["qkv"], host["cos"], host["sin"], NH, NKV)
    check(f"rope {direction}", out, ref)
    report(benchmark, f"llmcu rope_{direction}_kernel1", f"rope_{direction}")


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_llmcu_glu(benchmark, host, kind):
    import cupy
    from llmcu.cpu import swiglu as cpu
    from llmcu.cuda import swiglu
    inp = cupy.asarray(host["fc"])
    out = cupy.full((B, T, H), np.nan, np.float32)
    fwd = getattr(swiglu, f"{kind}_forward")
    benchmark.pedantic(lambda: (fwd(out, inp), sync()), **ROUNDS)
    ref = np.empty((B, T, H), np.float32)
    getattr(cpu, f"{kind}_forward")(ref, host["fc"])
    check(f"{kind} out", out, ref)
    report(benchmark, f"llmcu {kind}_forward_kernel1", "glu_forward")


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_llmcu_glu_backward(benchmark, host, kind):
    import cupy
    from llmcu.cuda import swiglu
    inp, dout = cupy.asarray(host["fc"]), cupy.asarray(host["dfc"])
    dinp = cupy.full((B, T, 2 * H), np.nan, np.float32)
    bwd = getattr(swiglu, f"{kind}_backward")
    benchmark.pedantic(lambda: (bwd(dinp, dout, inp), sync()), **ROUNDS)
    assert bool(cupy.isfinite(dinp).all())
    report(benchmark, f"llmcu {kind}_backward_kernel1", "glu_backward")


# --- PyTorch peers ------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here (a CPU build): no peer to compare with")
    return torch


def torch_rope(torch, qkv, cos, sin):
    """Hugging Face's formula on the q and k heads, v copied: (B,T,W) -> (B,T,W)."""
    x = qkv.view(B, T, NH + 2 * NKV, HS)
    qk, v = x[:, :, :NH + NKV], x[:, :, NH + NKV:]
    c = torch.cat([cos, cos], -1)[:, None, :]
    s = torch.cat([sin, sin], -1)[:, None, :]
    rotated = torch.cat([-qk[..., HS // 2:], qk[..., :HS // 2]], -1)
    return torch.cat([qk * c + rotated * s, v], dim=2).view(B, T, W)


def peer(torch, kind, host):
    """(inputs requiring grad, a forward closure) for each peer."""
    import torch.nn.functional as F
    dev = lambda k: torch.from_numpy(host[k]).cuda()  # noqa: E731
    if kind == "rmsnorm":
        x, w = dev("x").requires_grad_(), dev("w").requires_grad_()
        return (x, w), dev("dx"), lambda: F.rms_norm(x, (C,), w, eps=1e-5)
    if kind == "rope":
        q = dev("qkv").requires_grad_()
        cos, sin = dev("cos"), dev("sin")
        return (q,), dev("dqkv"), lambda: torch_rope(torch, q, cos, sin)
    act = F.silu if kind == "swiglu" else (lambda g: F.gelu(g, approximate="tanh"))
    fc = dev("fc").requires_grad_()
    return (fc,), dev("dfc"), lambda: act(fc[..., :H]) * fc[..., H:]


@pytest.mark.parametrize("kind", ["rmsnorm", "rope", "swiglu", "geglu"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_torch_peer(benchmark, host, torch_cuda, kind, direction):
    torch = torch_cuda
    inputs, dout, forward = peer(torch, kind, host)
    if direction == "forward":
        def run():
            with torch.no_grad():
                forward()
            torch.cuda.synchronize()
    else:
        y = forward()

        def run():
            torch.autograd.grad(y, inputs, dout, retain_graph=True)
            torch.cuda.synchronize()
    benchmark.pedantic(run, **ROUNDS)
    key = f"glu_{direction}" if kind in ("swiglu", "geglu") else f"{kind}_{direction}"
    report(benchmark, f"torch {kind} {direction}", key)


# --- grouped-query attention (NH=32 query heads on NKV=8 kv heads) ---------------
#
# The fused kernel reads K/V of the kv head a query head maps to; the peer is
# scaled_dot_product_attention(..., is_causal=True, enable_gqa=True) on strided
# q, k, v views of the same (B,T,W) qkv. Napkin FLOPs of causal attention: the
# two GEMMs of the forward over the lower triangle, 2 * 2*B*NH*T*T*hs / 2; the
# backward does 2.5x that (dS, dQ, dK, dV and the score recomputation).

ATT_FWD_FLOPS = 2 * B * NH * T * T * HS
ATT_BWD_FLOPS = 2.5 * ATT_FWD_FLOPS


def report_flops(benchmark, name, flops):
    seconds = benchmark.stats.stats.median
    tflops = flops / seconds / 1e12
    benchmark.extra_info.update(flops=flops, tflop_per_s=round(tflops, 2))
    print(f"\n{name}: median {seconds * 1e6:.1f} us, {tflops:.2f} TFLOP/s ({flops / 1e9:.1f} GFLOP napkin)")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_llmcu_gqa_attention(benchmark, host, direction):
    import cupy
    from llmcu.cuda.attention import flash_attention_backward, flash_attention_forward
    qkv, dout = cupy.asarray(host["qkv"]), cupy.asarray(host["dqkv"][..., :NH * HS].copy())
    out, lse = cupy.full((B, T, NH * HS), np.nan, np.float32), cupy.full((B, NH, T), np.nan, np.float32)
    if direction == "forward":
        benchmark.pedantic(lambda: (flash_attention_forward(out, lse, qkv, NH, NKV), sync()), **ROUNDS)
        assert bool(cupy.isfinite(out).all())
        report_flops(benchmark, "llmcu flash attention forward (GQA 32/8)", ATT_FWD_FLOPS)
    else:
        flash_attention_forward(out, lse, qkv, NH, NKV)
        dqkv = cupy.full((B, T, W), np.nan, np.float32)
        benchmark.pedantic(lambda: (flash_attention_backward(dqkv, dout, qkv, out, lse, NH, NKV), sync()),
                           **ROUNDS)
        assert bool(cupy.isfinite(dqkv).all())
        report_flops(benchmark, "llmcu flash attention backward (GQA 32/8)", ATT_BWD_FLOPS)


# bf16, hs = 64 (Llama 3.2 1B's): the step's tensor-core kernels (flash_kernel_version: 3)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_llmcu_gqa_attention_bf16(benchmark, host, direction):
    import cupy
    from llmcu.cuda.attention import flash_attention_backward, flash_attention_forward
    from llmcu.formats import float32_to_bf16_bits
    qkv = cupy.asarray(float32_to_bf16_bits(host["qkv"]))
    dout = cupy.asarray(float32_to_bf16_bits(host["dqkv"][..., :NH * HS].copy()))
    out, lse = cupy.full((B, T, NH * HS), 0x7FC0, np.uint16), cupy.full((B, NH, T), np.nan, np.float32)
    name = f"llmcu flash attention bf16 {direction} (GQA 32/8)"
    if direction == "forward":
        benchmark.pedantic(lambda: (flash_attention_forward(out, lse, qkv, NH, NKV), sync()), **ROUNDS)
        report_flops(benchmark, name, ATT_FWD_FLOPS)
    else:
        flash_attention_forward(out, lse, qkv, NH, NKV)
        dqkv = cupy.full((B, T, W), 0x7FC0, np.uint16)
        benchmark.pedantic(lambda: (flash_attention_backward(dqkv, dout, qkv, out, lse, NH, NKV), sync()),
                           **ROUNDS)
        report_flops(benchmark, name, ATT_BWD_FLOPS)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_torch_gqa_attention(benchmark, host, torch_cuda, direction):
    torch = torch_cuda
    import torch.nn.functional as F
    qkv = torch.from_numpy(host["qkv"]).cuda().requires_grad_()
    dout = torch.from_numpy(host["dqkv"][..., :NH * HS].copy()).cuda().view(B, T, NH, HS).transpose(1, 2)

    def forward():
        x = qkv.view(B, T, NH + 2 * NKV, HS).transpose(1, 2)  # (B, heads, T, hs)
        q, k, v = x[:, :NH], x[:, NH:NH + NKV], x[:, NH + NKV:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if direction == "forward":
        def run():
            with torch.no_grad():
                forward()
            torch.cuda.synchronize()
        flops, name = ATT_FWD_FLOPS, "torch sdpa forward (GQA 32/8, fp32)"
    else:
        y = forward()

        def run():
            torch.autograd.grad(y, (qkv,), dout, retain_graph=True)
            torch.cuda.synchronize()
        flops, name = ATT_BWD_FLOPS, "torch sdpa backward (GQA 32/8, fp32)"
    benchmark.pedantic(run, **ROUNDS)
    report_flops(benchmark, name, flops)
