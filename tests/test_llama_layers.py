"""The Llama-family layers of the NumPy oracle (rmsnorm, rope, swiglu/geglu)
against PyTorch autograd in float32, against transformers' own modules where
importable (LlamaRMSNorm, GemmaRMSNorm, LlamaRotaryEmbedding,
apply_rotary_pos_emb, ACT2FN["silu"], ACT2FN["gelu_pytorch_tanh"]), and
against float64 finite differences on tiny shapes.

Outputs and activation gradients are poisoned (NaN-filled) before the NumPy
function runs, so an element it never writes fails; parameter gradients start
at zero here and the +=/= convention is checked by calling each backward
twice on pre-filled buffers. Inputs are random, never zeros.

Tolerances (float32, u = 6e-8): the two sides evaluate the same formulas; the
only differences are reduction order (rmsnorm's mean over C, dweight's sum
over rows), 1/sqrt versus torch.rsqrt, and a few ulp between NumPy's and
PyTorch's exp/tanh/cos/sin. Each bound is stated beside its assertion with the
error measured on these inputs (`pytest -s` prints every max |diff| and the
share of the tolerance used); any real bug (a dropped term, the wrong half of
a head, a sign) is O(1). Float64 finite differences: as tests/test_layers_fd.py,
atol 1e-7, rtol 1e-6 against a truncation + rounding error of ~1e-9.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, poisoned
from llmcu.cpu.rmsnorm import rmsnorm_backward, rmsnorm_forward
from llmcu.cpu.rope import rope_backward, rope_forward, rope_frequencies
from llmcu.cpu.swiglu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward

try:  # transformers' own modules; the plain-torch versions below run regardless
    from transformers import LlamaConfig
    from transformers.activations import ACT2FN
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)
    HAVE_HF = True
except ImportError:  # pragma: no cover - transformers is a dev dependency
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers not importable")

F32, F64 = np.float32, np.float64
B, T = 2, 7


def rand(rng, *shape, scale=1.0, shift=0.0, dtype=F32):
    return (rng.standard_normal(shape) * scale + shift).astype(dtype)


def leaf(a):
    """A torch leaf tensor on a copy of a (autograd never aliases NumPy data)."""
    return torch.tensor(a.copy(), requires_grad=True)


# --- rmsnorm ---------------------------------------------------------------

def torch_rmsnorm(x, w, eps, offset):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("C", [48, 1023])
def test_rmsnorm_vs_torch(C, offset):
    rng = np.random.default_rng(C + int(offset))
    eps = 1e-6 if offset else 1e-5
    x = rand(rng, B, T, C, scale=2.0, shift=0.5)
    weight = rand(rng, C, scale=0.5, shift=1.0 - offset)  # the scale ~1 either way
    dout = rand(rng, B, T, C)

    out, rstd = poisoned((B, T, C)), poisoned((B, T))
    rmsnorm_forward(out, rstd, x, weight, eps=eps, weight_offset=offset)
    tx, tw = leaf(x), leaf(weight)
    ref = torch_rmsnorm(tx, tw, eps, offset)
    ref.backward(torch.from_numpy(dout))
    xd = x.astype(F64)
    # outputs up to ~5, a mean over C terms and rsqrt vs 1/sqrt: measured <= 9.5e-7
    assert_close(f"rmsnorm out C={C}", out, ref, 1e-5, 1e-5)
    assert_close(f"rmsnorm rstd C={C}", rstd, 1 / np.sqrt((xd * xd).mean(-1) + eps), 1e-6, 1e-5)

    dx, dw = poisoned(x.shape), np.zeros(C, F32)
    rmsnorm_backward(dx, dw, dout, x, weight, rstd, weight_offset=offset)
    # dinp: a mean over C of terms ~1 times rstd; dweight: sums of B*T=14 terms ~1-5.
    # measured <= 4.8e-7 (dinp), 1.9e-6 (dweight)
    assert_close(f"rmsnorm dinp C={C}", dx, tx.grad, 2e-5, 1e-5)
    assert_close(f"rmsnorm dweight C={C}", dw, tw.grad, 2e-5, 1e-5)


@needs_hf
@pytest.mark.parametrize("gemma", [False, True], ids=["LlamaRMSNorm", "GemmaRMSNorm"])
def test_rmsnorm_vs_transformers(gemma):
    rng = np.random.default_rng(7 + gemma)
    C, eps = 96, 1e-6
    x = rand(rng, B, T, C, scale=3.0)
    weight = rand(rng, C, scale=0.5, shift=0.0 if gemma else 1.0)
    dout = rand(rng, B, T, C)
    module = GemmaRMSNorm(C, eps=eps) if gemma else LlamaRMSNorm(C, eps=eps)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
    tx = leaf(x)
    ref = module(tx)
    ref.backward(torch.from_numpy(dout))

    offset = 1.0 if gemma else 0.0
    out, rstd = poisoned((B, T, C)), poisoned((B, T))
    rmsnorm_forward(out, rstd, x, weight, eps=eps, weight_offset=offset)
    dx, dw = poisoned(x.shape), np.zeros(C, F32)
    rmsnorm_backward(dx, dw, dout, x, weight, rstd, weight_offset=offset)
    # same bounds and reasons as test_rmsnorm_vs_torch; measured <= 9.5e-7
    assert_close("hf rmsnorm out", out, ref, 1e-5, 1e-5)
    assert_close("hf rmsnorm dinp", dx, tx.grad, 2e-5, 1e-5)
    assert_close("hf rmsnorm dweight", dw, module.weight.grad, 2e-5, 1e-5)


# --- rope ------------------------------------------------------------------

def split_heads(qkv, NH, NKV):
    """(B,T,(NH+2*NKV)*hs) -> q (B,NH,T,hs), k (B,NKV,T,hs), v (B,NKV,T,hs) as torch."""
    Bq, Tq, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    x = qkv.reshape(Bq, Tq, NH + 2 * NKV, hs).transpose(1, 2)
    return x[:, :NH], x[:, NH:NH + NKV], x[:, NH + NKV:]


def full_table(half):
    """(T, hs/2) -> (T, hs), the cat(freqs, freqs) layout Hugging Face uses."""
    return np.concatenate([half, half], axis=-1)


@needs_hf
@pytest.mark.parametrize("theta,hs,max_T", [(10000.0, 16, 64), (500000.0, 64, 1024), (10000.0, 256, 300)])
def test_rope_frequencies_vs_transformers(theta, hs, max_T):
    cfg = LlamaConfig(hidden_size=4 * hs, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hs, max_position_embeddings=max_T, rope_theta=theta,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    hcos, hsin = rotary(x, torch.arange(max_T)[None])
    cos, sin = rope_frequencies(hs, max_T, theta)
    assert cos.dtype == np.float32 and sin.dtype == np.float32
    assert cos.shape == (max_T, hs // 2) and sin.shape == (max_T, hs // 2)
    # Both take float32 angles t * inv_freq; torch's and NumPy's float32 pow and
    # cos/sin may differ by an ulp, and an ulp of inv_freq is t * 6e-8 of angle at
    # position t (6e-5 at t = 1023). measured <= 6.0e-8 (identical angles here)
    assert_close("rope cos", full_table(cos), hcos[0], 1e-4, 0.0)
    assert_close("rope sin", full_table(sin), hsin[0], 1e-4, 0.0)


def torch_rope(q, k, cos, sin):
    """rotate_half RoPE written out in torch (cos/sin (T, hs))."""
    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("NH,NKV,hs", [(4, 4, 16), (4, 2, 16), (6, 1, 8), (8, 2, 64)],
                         ids=["mha", "gqa", "mqa", "gqa-hs64"])
@pytest.mark.parametrize("use_hf", [False, True], ids=["torch", "transformers"])
def test_rope_vs_torch(NH, NKV, hs, use_hf):
    if use_hf and not HAVE_HF:
        pytest.skip("transformers not importable")
    rng = np.random.default_rng(NH * 100 + NKV * 10 + hs)
    W = (NH + 2 * NKV) * hs
    cos, sin = rope_frequencies(hs, 32, 10000.0)
    qkv = rand(rng, B, T, W)
    dout = rand(rng, B, T, W)

    out = poisoned((B, T, W))
    rope_forward(out, qkv, cos, sin, NH, NKV)
    tqkv = leaf(qkv)
    q, k, v = split_heads(tqkv, NH, NKV)
    tc, ts = torch.from_numpy(full_table(cos[:T])), torch.from_numpy(full_table(sin[:T]))
    if use_hf:  # cos/sin (B,T,hs) as LlamaRotaryEmbedding returns them
        qr, kr = apply_rotary_pos_emb(q, k, tc[None].expand(B, T, hs), ts[None].expand(B, T, hs))
    else:
        qr, kr = torch_rope(q, k, tc, ts)
    ref = torch.cat([qr, kr, v], dim=1).transpose(1, 2).reshape(B, T, W)
    (ref * torch.from_numpy(dout)).sum().backward()
    # The same products and one add/sub per element on both sides (x1*c - x2*s is
    # x1*c + (-x2)*s exactly): measured 0. Bound 1e-6 allows an FMA-contracted torch.
    assert_close("rope out", out, ref, 1e-6, 1e-6)
    assert_close("rope values copied", out.reshape(B, T, -1, hs)[:, :, NH + NKV:],
                 qkv.reshape(B, T, -1, hs)[:, :, NH + NKV:], 0.0, 0.0)

    dx = poisoned((B, T, W))
    rope_backward(dx, dout, cos, sin, NH, NKV)
    assert_close("rope dinp", dx, tqkv.grad, 1e-6, 1e-6)  # as above; measured 0


def test_rope_in_place_and_position_zero():
    """out may be inp; position 0 is the identity (cos 1, sin 0)."""
    rng = np.random.default_rng(3)
    NH, NKV, hs = 4, 2, 8
    cos, sin = rope_frequencies(hs, T, 10000.0)
    qkv = rand(rng, B, T, (NH + 2 * NKV) * hs)
    expected = poisoned(qkv.shape)
    rope_forward(expected, qkv, cos, sin, NH, NKV)
    inplace = qkv.copy()
    rope_forward(inplace, inplace, cos, sin, NH, NKV)
    assert_close("rope in place", inplace, expected, 0.0, 0.0)
    assert_close("rope position 0", expected[:, 0], qkv[:, 0], 0.0, 0.0)
    assert not np.allclose(expected[:, 1:], qkv[:, 1:])  # later positions do rotate
    back = poisoned(qkv.shape)
    rope_backward(back, expected, cos, sin, NH, NKV)
    # the backward of a rotation is its inverse: one rounding per step, ~1e-7
    assert_close("rope backward inverts forward", back, qkv, 1e-5, 1e-5)


def test_rope_shape_errors():
    cos, sin = rope_frequencies(8, 4, 10000.0)
    with pytest.raises(ValueError, match="rope_forward"):
        rope_forward(np.empty((1, 2, 33), F32), np.empty((1, 2, 33), F32), cos, sin, 2, 1)
    with pytest.raises(ValueError, match="rope_backward.*cos/sin"):
        rope_backward(np.empty((1, 5, 32), F32), np.empty((1, 5, 32), F32), cos, sin, 2, 1)
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(7, 4)


# --- swiglu / geglu --------------------------------------------------------

ACTS = {
    "swiglu": (swiglu_forward, swiglu_backward, F.silu, "silu"),
    "geglu": (geglu_forward, geglu_backward, lambda g: F.gelu(g, approximate="tanh"), "gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("use_hf", [False, True], ids=["torch", "transformers"])
@pytest.mark.parametrize("H", [48, 1023])
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_vs_torch(kind, H, use_hf):
    if use_hf and not HAVE_HF:
        pytest.skip("transformers not importable")
    forward, backward, act, hf_name = ACTS[kind]
    if use_hf:
        act = ACT2FN[hf_name]
    rng = np.random.default_rng(H + len(kind))
    # gates out to +-10 (both tails exercised), up ~1
    inp = np.concatenate([rand(rng, B, T, H, scale=3.0), rand(rng, B, T, H)], axis=-1)
    dout = rand(rng, B, T, H)

    out = poisoned((B, T, H))
    forward(out, inp)
    tinp = leaf(inp)
    gate, up = tinp[..., :H], tinp[..., H:]
    ref = act(gate) * up
    ref.backward(torch.from_numpy(dout))
    # elementwise: a few ulp between NumPy's and torch's exp/tanh on outputs up to
    # ~30: measured <= 1.9e-6
    assert_close(f"{kind} out H={H}", out, ref, 1e-5, 1e-5)
    dinp = poisoned((B, T, 2 * H))
    backward(dinp, dout, inp)
    # d gate = dout * up * act'(gate). For gelu, act' in the tail (gate ~ -5) is
    # 0.5(1 + th) + ..., where th rounds near -1: NumPy and torch differ there
    # by up to ~4e-6 (see test_gelu_vs_torch in test_layers_torch.py), times
    # |dout * up| up to ~10 here: measured <= 5.3e-6 for geglu, 1.9e-6 for swiglu
    atol = 5e-5 if kind == "geglu" else 1e-5
    assert_close(f"{kind} dinp H={H}", dinp, tinp.grad, atol, 1e-5)


def test_glu_extreme_gates_stay_finite():
    """Gates far in either tail: silu/gelu -> 0 or x, derivatives -> 0 or 1, no NaN/overflow."""
    g = np.array([-200.0, -90.0, -20.0, 20.0, 90.0, 200.0], F32)
    inp = np.concatenate([g, np.full_like(g, 2.0)])[None, None]
    dout = np.ones((1, 1, g.size), F32)
    for kind, (forward, backward, act, _) in ACTS.items():
        out, dinp = poisoned((1, 1, g.size)), poisoned(inp.shape)
        forward(out, inp)
        backward(dinp, dout, inp)
        tinp = leaf(inp)
        ref = act(tinp[..., :g.size]) * tinp[..., g.size:]
        ref.backward(torch.from_numpy(dout))
        assert_close(f"{kind} tails out", out, ref, 1e-5, 1e-6)  # measured 0
        assert_close(f"{kind} tails dinp", dinp, tinp.grad, 1e-5, 1e-6)


@needs_hf
@pytest.mark.parametrize("gemma", [False, True], ids=["LlamaMLP", "GemmaMLP"])
def test_mlp_vs_transformers(gemma):
    """The whole gated MLP with llmcu's layout: fcw = [gate_proj; up_proj] rows, one
    matmul to (B,T,2H), then swiglu/geglu, then fcprojw = down_proj."""
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    from llmcu.cpu.matmul import matmul_backward, matmul_forward
    C, H = 48, 37
    if gemma:
        mlp = GemmaMLP(GemmaConfig(hidden_size=C, intermediate_size=H, hidden_act="gelu_pytorch_tanh",
                                   hidden_activation="gelu_pytorch_tanh", num_attention_heads=4,
                                   num_key_value_heads=1, head_dim=12))
    else:
        mlp = LlamaMLP(LlamaConfig(hidden_size=C, intermediate_size=H, hidden_act="silu",
                                   num_attention_heads=4, num_key_value_heads=4))
    forward, backward = (geglu_forward, geglu_backward) if gemma else (swiglu_forward, swiglu_backward)
    rng = np.random.default_rng(9 + gemma)
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            lin.weight.copy_(torch.from_numpy(rand(rng, *lin.weight.shape, scale=0.3)))
    x, dout = rand(rng, B, T, C), rand(rng, B, T, C)
    tx = leaf(x)
    ref = mlp(tx)
    ref.backward(torch.from_numpy(dout))

    fcw = np.concatenate([mlp.gate_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()])
    projw = mlp.down_proj.weight.detach().numpy().copy()
    h, a, out = poisoned((B, T, 2 * H)), poisoned((B, T, H)), poisoned((B, T, C))
    matmul_forward(h, x, fcw)
    forward(a, h)
    matmul_forward(out, a, projw)
    # Three layers deep, values and gradients up to ~20 (sums of 37-48 terms of
    # weights 0.3 times activations up to ~10, then over B*T=14 rows for the
    # weights): float32 reduction-order noise ~u * sqrt(n) * sum|terms| ~ 1e-5.
    # measured <= 3.8e-6 (out), 1.9e-5 (d gate_proj), <= 48% of 1e-5 + 1e-5|x|,
    # so the bound is 3e-5 + 3e-5|x|; a layout bug (gate and up swapped) is O(1).
    tol = dict(atol=3e-5, rtol=3e-5)
    assert_close("mlp out", out, ref, **tol)

    da, dh, dx = poisoned(a.shape), poisoned(h.shape), poisoned(x.shape)
    dfcw, dprojw = np.zeros_like(fcw), np.zeros_like(projw)
    matmul_backward(da, dprojw, None, dout, a, projw)
    backward(dh, da, h)
    matmul_backward(dx, dfcw, None, dh, x, fcw)
    assert_close("mlp dinp", dx, tx.grad, **tol)
    assert_close("mlp d gate_proj", dfcw[:H], mlp.gate_proj.weight.grad, **tol)
    assert_close("mlp d up_proj", dfcw[H:], mlp.up_proj.weight.grad, **tol)
    assert_close("mlp d down_proj", dprojw, mlp.down_proj.weight.grad, **tol)


# --- float64 finite differences -------------------------------------------

EPS_FD = 1e-6
ATOL, RTOL = 1e-7, 1e-6


def numerical_grad(loss, x, eps=EPS_FD):
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x)
    grad = np.zeros(x.size, F64)
    for i in range(x.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(x.shape)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_rmsnorm_finite_differences(offset):
    rng = np.random.default_rng(11)
    C = 5
    x, w = rand(rng, 2, 3, C, shift=0.3, dtype=F64), rand(rng, C, dtype=F64)
    wl = rand(rng, 2, 3, C, dtype=F64)

    def loss():
        out, rstd = np.empty_like(x), np.empty(x.shape[:-1])
        rmsnorm_forward(out, rstd, x, w, eps=1e-5, weight_offset=offset)
        return float((wl * out).sum())

    out, rstd = np.empty_like(x), np.empty(x.shape[:-1])
    rmsnorm_forward(out, rstd, x, w, eps=1e-5, weight_offset=offset)
    dx, dw = np.full_like(x, 7.0), np.zeros_like(w)
    rmsnorm_backward(dx, dw, wl, x, w, rstd, weight_offset=offset)
    assert_close("rmsnorm fd dinp", dx, numerical_grad(loss, x), ATOL, RTOL)
    assert_close("rmsnorm fd dweight", dw, numerical_grad(loss, w), ATOL, RTOL)
    # conventions: dweight accumulates (+=), dinp overwrites (=)
    dw1 = dw.copy()
    rmsnorm_backward(dx, dw, wl, x, w, rstd, weight_offset=offset)
    assert_close("rmsnorm dweight accumulates", dw, 2 * dw1, 1e-12, 1e-12)
    assert_close("rmsnorm dinp overwrites", dx, numerical_grad(loss, x), ATOL, RTOL)


def test_rope_finite_differences():
    rng = np.random.default_rng(12)
    NH, NKV, hs = 3, 1, 4
    cos, sin = rope_frequencies(hs, 8, 10000.0)
    cos, sin = cos.astype(F64), sin.astype(F64)
    x = rand(rng, 2, 3, (NH + 2 * NKV) * hs, dtype=F64)
    wl = rand(rng, *x.shape, dtype=F64)

    def loss():
        out = np.empty_like(x)
        rope_forward(out, x, cos, sin, NH, NKV)
        return float((wl * out).sum())

    dx = np.full_like(x, 7.0)
    rope_backward(dx, wl, cos, sin, NH, NKV)
    assert_close("rope fd dinp", dx, numerical_grad(loss, x), ATOL, RTOL)


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_finite_differences(kind):
    forward, backward, _, _ = ACTS[kind]
    rng = np.random.default_rng(13)
    H = 6
    x = rand(rng, 2, 3, 2 * H, scale=2.0, dtype=F64)
    wl = rand(rng, 2, 3, H, dtype=F64)

    def loss():
        out = np.empty(wl.shape)
        forward(out, x)
        return float((wl * out).sum())

    dx = np.full_like(x, 7.0)
    backward(dx, wl, x)
    assert_close(f"{kind} fd dinp", dx, numerical_grad(loss, x), ATOL, RTOL)
