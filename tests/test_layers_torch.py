"""Every layer of the NumPy oracle against PyTorch autograd, in float32.

Forward outputs and activation gradients are poisoned (NaN-filled) before the
NumPy function runs, so an element it never writes fails the comparison;
parameter gradients start at zero (they accumulate; test_layers_fd.py checks
that). Inputs are random, never zeros. Shapes: llm.c's small test shape
B=2, T=7, C=48, NH=4, plus an odd C=1023 for the layers whose kernels tile
over C (layernorm, gelu, matmul) and the real GPT-2 vocabulary for the
classifier.

Tolerances (float32, unit roundoff u = 6e-8): both sides compute the same
formulas but reduce in different orders, so the differences are rounding
noise of size ~u * sqrt(n) * (magnitude of the summed terms) for a reduction
over n terms. Each tolerance below sits 3-100x above the error measured on
these inputs (the comment beside it gives the measured number; `pytest -s`
prints every max |diff| and the share of the tolerance it used), far below
what any real bug (a dropped term, a wrong axis, an off-by-one mask) gives.
Where a bound is tight (gelu's tails, the 50257-way softmax) the comment says
why the error is as large as it is.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, poisoned
from llmcu.cpu.adamw import CHUNK, adamw_update, clip_scale, global_norm
from llmcu.cpu.attention import attention_backward, attention_forward
from llmcu.cpu.classifier import (crossentropy_forward, crossentropy_softmax_backward,
                                  fused_classifier, softmax_forward)
from llmcu.cpu.encoder import encoder_backward, encoder_forward
from llmcu.cpu.gelu import gelu_backward, gelu_forward
from llmcu.cpu.layernorm import layernorm_backward, layernorm_forward
from llmcu.cpu.matmul import matmul_backward, matmul_forward
from llmcu.cpu.residual import residual_backward, residual_forward

F32 = np.float32
B, T = 2, 7


def rand(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(F32)


def leaf(a):
    """A float32 torch leaf tensor on a copy of a (so autograd never aliases NumPy data)."""
    return torch.tensor(a.copy(), requires_grad=True)


# --- encoder ---------------------------------------------------------------

def test_encoder_vs_torch():
    rng = np.random.default_rng(0)
    Vp, maxT, C = 64, 16, 48
    inp = rng.integers(0, 10, size=(B, T))  # 14 ids drawn from 10: repeats guaranteed
    wte, wpe = rand(rng, Vp, C), rand(rng, maxT, C)
    dout = rand(rng, B, T, C)

    out = poisoned((B, T, C))
    encoder_forward(out, inp, wte, wpe)
    twte, twpe = leaf(wte), leaf(wpe)
    ref = F.embedding(torch.from_numpy(inp), twte) + twpe[:T]
    ref.backward(torch.from_numpy(dout))
    assert_close("encoder out", out, ref, 0.0, 0.0)  # one float add per element: exact

    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    encoder_backward(dwte, dwpe, dout, inp)
    # sums of up to B*T terms of size ~1, possibly in another order: measured 0 here
    assert_close("encoder dwte", dwte, twte.grad, 1e-5, 1e-5)
    assert_close("encoder dwpe", dwpe, twpe.grad, 1e-5, 1e-5)


# --- layernorm -------------------------------------------------------------

@pytest.mark.parametrize("C", [48, 1023])
def test_layernorm_vs_torch(C):
    rng = np.random.default_rng(C)
    x = rand(rng, B, T, C, scale=2.0, shift=0.5)  # non-zero mean, non-unit variance
    weight, bias = rand(rng, C, shift=1.0), rand(rng, C)
    dout = rand(rng, B, T, C)

    out, mean, rstd = poisoned((B, T, C)), poisoned((B, T)), poisoned((B, T))
    layernorm_forward(out, mean, rstd, x, weight, bias)
    tx, tw, tb = leaf(x), leaf(weight), leaf(bias)
    ref = F.layer_norm(tx, (C,), tw, tb, eps=1e-5)
    ref.backward(torch.from_numpy(dout))
    xd = x.astype(np.float64)
    # outputs up to ~10, statistics over C terms: measured <= 1.4e-6 (3% of the bound)
    assert_close(f"layernorm out C={C}", out, ref, 2e-5, 1e-5)
    assert_close(f"layernorm mean C={C}", mean, xd.mean(-1), 1e-6, 1e-5)
    assert_close(f"layernorm rstd C={C}", rstd, 1 / np.sqrt(xd.var(-1) + 1e-5), 1e-6, 1e-5)

    dx, dw, db = poisoned(x.shape), np.zeros(C, F32), np.zeros(C, F32)
    layernorm_backward(dx, dw, db, dout, x, weight, mean, rstd)
    # dinp: two means over C of terms ~1, times rstd ~0.5; dweight/dbias: sums of
    # B*T=14 terms ~1-10. measured <= 1.9e-6 (5% of the bound)
    assert_close(f"layernorm dinp C={C}", dx, tx.grad, 2e-5, 1e-5)
    assert_close(f"layernorm dweight C={C}", dw, tw.grad, 2e-5, 1e-5)
    assert_close(f"layernorm dbias C={C}", db, tb.grad, 2e-5, 1e-5)


# --- matmul ----------------------------------------------------------------

@pytest.mark.parametrize("C,OC", [(48, 144), (1023, 259)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_matmul_vs_torch(C, OC, with_bias):
    rng = np.random.default_rng(C + OC + with_bias)
    x = rand(rng, B, T, C)
    weight = rand(rng, OC, C, scale=1 / np.sqrt(C))  # keeps outputs ~1 at any C
    bias = rand(rng, OC) if with_bias else None
    dout = rand(rng, B, T, OC)

    out = poisoned((B, T, OC))
    matmul_forward(out, x, weight, bias)
    tx, tw = leaf(x), leaf(weight)
    tb = leaf(bias) if with_bias else None
    ref = F.linear(tx, tw, tb)
    ref.backward(torch.from_numpy(dout))
    # dot products of C terms ~1/sqrt(C): measured <= 1.6e-6 at C=1023 (9% of the bound)
    assert_close(f"matmul out C={C}", out, ref, 1e-5, 1e-5)

    dx, dw = poisoned(x.shape), np.zeros_like(weight)
    db = np.zeros(OC, F32) if with_bias else None
    matmul_backward(dx, dw, db, dout, x, weight)
    # dinp: OC terms ~1/sqrt(C); dweight/dbias: B*T=14 terms ~1. measured <= 2.9e-6 (10%)
    assert_close(f"matmul dinp C={C}", dx, tx.grad, 1e-5, 1e-5)
    assert_close(f"matmul dweight C={C}", dw, tw.grad, 1e-5, 1e-5)
    if with_bias:
        assert_close(f"matmul dbias C={C}", db, tb.grad, 1e-5, 1e-5)


# --- attention -------------------------------------------------------------

def torch_attention(qkv, NH):
    """Causal softmax attention written out in torch (not F.scaled_dot_product_attention,
    so the probabilities can be compared too)."""
    Bq, Tq, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=-1)
    q, k, v = (t.reshape(Bq, Tq, NH, C // NH).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / (C // NH) ** 0.5
    mask = torch.triu(torch.ones(Tq, Tq, dtype=torch.bool), diagonal=1)
    att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    y = (att @ v).transpose(1, 2).reshape(Bq, Tq, C)
    return y, att


@pytest.mark.parametrize("T_,C,NH", [(7, 48, 4), (1, 48, 4), (64, 64, 4)])
def test_attention_vs_torch(T_, C, NH):
    rng = np.random.default_rng(T_ * C)
    qkv = rand(rng, B, T_, 3 * C)
    dout = rand(rng, B, T_, C)

    out, att = poisoned((B, T_, C)), poisoned((B, NH, T_, T_))
    attention_forward(out, att, qkv, NH)
    tqkv = leaf(qkv)
    ref, ref_att = torch_attention(tqkv, NH)
    ref.backward(torch.from_numpy(dout))
    # scores: hs=12..16-term dots of ~1 terms; softmax and weighted sums over T
    # terms: measured att 1.2e-7, out 4.8e-7, dqkv 1.4e-6 at T=64 (<= 5% of the bounds)
    assert_close(f"attention att T={T_}", att, ref_att, 1e-6, 1e-5)
    assert_close(f"attention out T={T_}", out, ref, 1e-5, 1e-5)

    dqkv = poisoned(qkv.shape)
    attention_backward(dqkv, dout, qkv, att, NH)
    assert_close(f"attention dqkv T={T_}", dqkv, tqkv.grad, 1e-5, 1e-5)


# --- gelu and residual -----------------------------------------------------

@pytest.mark.parametrize("C", [48, 1023])
def test_gelu_vs_torch(C):
    rng = np.random.default_rng(C + 7)
    x = rand(rng, B, T, C, scale=3.0)  # reaches both flat tails
    dout = rand(rng, B, T, C)
    out = poisoned(x.shape)
    gelu_forward(out, x)
    tx = leaf(x)
    ref = F.gelu(tx, approximate="tanh")
    ref.backward(torch.from_numpy(dout))
    # elementwise: a few ulps of values up to ~10; measured 4.8e-7 (16% of the bound)
    assert_close(f"gelu out C={C}", out, ref, 1e-6, 1e-5)
    dx = poisoned(x.shape)
    gelu_backward(dx, dout, x)
    # In the tails (|x| > 4) the derivative is 0.5(1 + th) plus a term
    # ~0.5 x sech^2 * sqrt(2/pi)(1 + 0.134 x^2), i.e. float32 rounding of th
    # near -1 (a few ulps of 6e-8) times 0.5|x| sqrt(2/pi)(1 + 0.134 x^2) ~ 10
    # at x ~ -5.4 (further out th rounds to exactly -1 and the error vanishes):
    # NumPy and torch are each ~1e-6 off the float64 value (measured 1.2e-6
    # and 1.0e-6, often in opposite directions, e.g. 1.3e-6 vs exactly 0), so
    # they differ by up to ~4e-6 (measured 3.8e-6, 29% of the bound).
    assert_close(f"gelu dinp C={C}", dx, tx.grad, 1e-5, 1e-5)


def test_residual_vs_torch():
    rng = np.random.default_rng(11)
    a, b, dout = rand(rng, B, T, 48), rand(rng, B, T, 48), rand(rng, B, T, 48)
    out = poisoned(a.shape)
    residual_forward(out, a, b)
    ta, tb = leaf(a), leaf(b)
    (ta + tb).backward(torch.from_numpy(dout))
    assert_close("residual out", out, ta + tb, 0.0, 0.0)  # one add: exact
    da, db = poisoned(a.shape), poisoned(b.shape)
    residual_backward(da, db, dout)
    assert_close("residual dinp1", da, ta.grad, 0.0, 0.0)
    assert_close("residual dinp2", db, tb.grad, 0.0, 0.0)


# --- classifier ------------------------------------------------------------

@pytest.mark.parametrize("V,Vp", [(7, 8), (1000, 1024), (50257, 50304)])
def test_classifier_vs_torch(V, Vp):
    rng = np.random.default_rng(V)
    logits = rand(rng, B, T, Vp, scale=3.0)
    logits[..., V:] = rng.uniform(50, 100, size=(B, T, Vp - V))  # padding that would dominate
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 0] = V - 1  # the last real column
    dlosses = rand(rng, B, T, scale=0.1, shift=1.0)

    losses, probs = poisoned((B, T)), poisoned((B, T, Vp))
    fused_classifier(losses, probs, logits, targets, V)
    tl = leaf(logits)
    ref = F.cross_entropy(tl[..., :V].reshape(-1, V), torch.from_numpy(targets).reshape(-1),
                          reduction="none").reshape(B, T)
    ref.backward(torch.from_numpy(dlosses))
    ref_probs = torch.softmax(torch.from_numpy(logits[..., :V]), dim=-1)
    # losses ~log V + 3 from a logsumexp over V terms: measured <= 4e-6 (2% of
    # the bound). probs: the normalizing sum over V terms has relative error
    # ~u sqrt(V) ~ 1e-5 at V=50257: measured 8.8e-7 on p ~ 0.1-1 (13%).
    assert_close(f"classifier losses V={V}", losses, ref, 1e-5, 1e-5)
    assert_close(f"classifier probs V={V}", probs[..., :V], ref_probs, 1e-7, 3e-5)
    assert np.all(probs[..., V:] == 0.0)

    # the unfused halves (softmax_forward, crossentropy_forward) are public too
    probs2, losses2 = poisoned((B, T, Vp)), poisoned((B, T))
    softmax_forward(probs2, logits, V)
    crossentropy_forward(losses2, logits, targets, V)
    assert_close(f"softmax_forward probs V={V}", probs2[..., :V], ref_probs, 1e-7, 3e-5)
    assert np.all(probs2[..., V:] == 0.0)
    assert_close(f"crossentropy_forward losses V={V}", losses2, ref, 1e-5, 1e-5)

    dlogits = poisoned(logits.shape)
    crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V)
    assert_close(f"classifier dlogits V={V}", dlogits, tl.grad, 1e-7, 3e-5)  # padded: 0 both sides
    assert np.all(dlogits[..., V:] == 0.0)


# --- AdamW -----------------------------------------------------------------

@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37], ids=["unclipped", "clipped"])
def test_adamw_vs_torch(weight_decay, grad_scale):
    rng = np.random.default_rng(int(weight_decay * 10) + int(grad_scale * 100))
    n = CHUNK + 1234  # one full chunk and a ragged tail
    params = rand(rng, n)
    m, v = np.zeros(n, F32), np.zeros(n, F32)
    tp = torch.tensor(params.copy(), requires_grad=True)
    opt = torch.optim.AdamW([tp], lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=weight_decay, foreach=False)
    for step in range(1, 6):
        lr = 1e-3 * (1.0 - 0.1 * step)  # a schedule: lr changes every step
        grads = rand(rng, n, scale=0.1 * step)
        grads_before = grads.copy()
        adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8,
                     weight_decay=weight_decay, grad_scale=grad_scale)
        assert np.array_equal(grads, grads_before), "adamw_update must not modify grads"
        # torch gets the clipped gradient, as clip_grad_norm_ would leave it
        tp.grad = torch.from_numpy(grads * F32(grad_scale))
        opt.param_groups[0]["lr"] = lr
        opt.step()
    state = opt.state[tp]
    # per step the update differs by a few ulps of lr ~1e-3 and of p ~1 (torch
    # folds the bias corrections and weight decay in differently): measured 2.4e-7
    # without and 9.5e-7 (2 ulps of |p| ~ 4) with weight decay, 24% of the bound
    assert_close("adamw params", params, tp, 2e-6, 1e-6)
    assert_close("adamw m", m, state["exp_avg"], 1e-7, 1e-5)
    assert_close("adamw v", v, state["exp_avg_sq"], 1e-9, 1e-5)


def test_global_norm_vs_torch():
    rng = np.random.default_rng(21)
    g = rand(rng, (1 << 20) + 4321, scale=1e-2)  # more than one of global_norm's 1M chunks
    norm = global_norm(g)
    exact = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
    # float32 sums of ~1M positive terms. Measured relative error against the
    # float64 norm: global_norm 1.5e-6, torch's float32 vector_norm 1.2e-5
    # (torch is the less accurate one here), hence the looser bound vs torch.
    assert_close("global_norm vs float64", norm, exact, 0.0, 1e-5)
    assert_close("global_norm vs torch", norm, torch.linalg.vector_norm(torch.from_numpy(g)).item(), 0.0, 5e-5)
    assert global_norm(np.zeros(0, F32)) == 0.0


def test_clip_scale_semantics():
    assert clip_scale(0.5, 1.0) == 1.0          # under max_norm: untouched
    assert clip_scale(1.0, 1.0) == 1.0          # exactly at max_norm: untouched
    for disabled in (None, 0.0, -1.0):
        assert clip_scale(123.0, disabled) == 1.0
    assert clip_scale(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6), rel=1e-12)

    # over max_norm it matches torch.nn.utils.clip_grad_norm_ (same 1e-6 guard)
    rng = np.random.default_rng(22)
    grads = rand(rng, 10_000)
    max_norm = 1.0
    tg = torch.zeros(grads.size, requires_grad=True)
    tg.grad = torch.from_numpy(grads.copy())
    total = torch.nn.utils.clip_grad_norm_([tg], max_norm, foreach=False)
    norm = global_norm(grads)
    assert_close("clip: grad norm", norm, total, 0.0, 1e-6)
    scale = clip_scale(norm, max_norm)
    assert scale < 1.0
    assert_close("clip: clipped grads", grads * F32(scale), tg.grad, 1e-8, 1e-6)
    assert global_norm(grads * F32(scale)) == pytest.approx(max_norm, rel=1e-5)
