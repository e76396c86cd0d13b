"""Every kernel in kernels/ against the NumPy oracle (llmcu/cpu/).

Each test runs on two backends with the same wrappers: "emu" (the .cu sources
compiled as C++ and run on the CPU; always, this is what CI exercises) and
"cuda" (a real GPU through CuPy; skipped without one). Inputs are random,
outputs are NaN-poisoned before the kernel runs so an unwritten element fails.

Tolerances (fp32): the kernels sum in a different order than NumPy's pairwise
sums and use CUDA's/glibc's expf/tanhf, which differ from NumPy's by a few ulp.
Sums of up to ~1000 terms of O(1) values then differ by ~1e-6 relative, so
atol = rtol = 1e-5 has a 10x margin without hiding a real error (a missing
term or a wrong index is O(1e-2) or larger). Gathers and elementwise copies
are compared exactly.
"""

import math

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.config import GPT2Config
from llmcu.cpu import adamw as cpu_adamw
from llmcu.cpu import attention as cpu_attention
from llmcu.cpu import classifier as cpu_classifier
from llmcu.cpu import encoder as cpu_encoder
from llmcu.cpu import gelu as cpu_gelu
from llmcu.cpu import layernorm as cpu_layernorm
from llmcu.cpu import matmul as cpu_matmul
from llmcu.cpu import residual as cpu_residual
from llmcu.cpu.gpt2 import GPT2 as CPUGPT2
from llmcu.cpu.gpt2 import init_parameters

TOL = dict(atol=1e-5, rtol=1e-5)

BACKENDS = KERNEL_BACKENDS


@pytest.fixture(params=BACKENDS)
def dev(request):
    """Moves NumPy arrays to the backend under test and back."""
    return Device(request.param)


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _import(dev):
    from llmcu.cuda import (adamw, attention, classifier, encoder, gelu, layernorm, matmul,
                            residual)
    return dict(adamw=adamw, attention=attention, classifier=classifier, encoder=encoder,
                gelu=gelu, layernorm=layernorm, matmul=matmul, residual=residual)


@pytest.mark.parametrize("B,T,C,V", [(2, 7, 48, 101), (1, 5, 1023, 37)])
def test_encoder(dev, B, T, C, V):
    k = _import(dev)["encoder"]
    rng = np.random.default_rng(0)
    Vp, maxT = V + 3, T + 2
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    inp[0, :3] = 1  # repeated ids: the backward must sum them
    wte, wpe, dout = rand(rng, Vp, C), rand(rng, maxT, C), rand(rng, B, T, C)
    out = dev.poisoned((B, T, C))
    k.encoder_forward(out, dev.put(inp), dev.put(wte), dev.put(wpe))
    ref = np.empty((B, T, C), np.float32)
    cpu_encoder.encoder_forward(ref, inp, wte, wpe)
    assert_close("encoder out", dev.get(out), ref, atol=0, rtol=0)

    start_wte, start_wpe = rand(rng, Vp, C), rand(rng, maxT, C)  # accumulate onto these
    dwte, dwpe = dev.put(start_wte), dev.put(start_wpe)
    k.encoder_backward(dwte, dwpe, dev.put(dout), dev.put(inp))
    rwte, rwpe = start_wte.copy(), start_wpe.copy()
    cpu_encoder.encoder_backward(rwte, rwpe, dout, inp)
    assert_close("encoder dwte", dev.get(dwte), rwte, **TOL)
    assert_close("encoder dwpe", dev.get(dwpe), rwpe, **TOL)


@pytest.mark.parametrize("B,T,C", [(2, 7, 48), (1, 3, 1023), (4, 1, 32)])
def test_layernorm(dev, B, T, C):
    k = _import(dev)["layernorm"]
    rng = np.random.default_rng(1)
    x, w, b, dout = rand(rng, B, T, C, scale=3.0) + 1.0, rand(rng, C), rand(rng, C), rand(rng, B, T, C)
    out, mean, rstd = dev.poisoned((B, T, C)), dev.poisoned((B, T)), dev.poisoned((B, T))
    k.layernorm_forward(out, mean, rstd, dev.put(x), dev.put(w), dev.put(b))
    rout, rmean, rrstd = (np.empty(s, np.float32) for s in ((B, T, C), (B, T), (B, T)))
    cpu_layernorm.layernorm_forward(rout, rmean, rrstd, x, w, b)
    assert_close("layernorm out", dev.get(out), rout, **TOL)
    assert_close("layernorm mean", dev.get(mean), rmean, **TOL)
    assert_close("layernorm rstd", dev.get(rstd), rrstd, **TOL)

    dw0, db0 = rand(rng, C), rand(rng, C)
    dinp, dw, db = dev.poisoned((B, T, C)), dev.put(dw0), dev.put(db0)
    k.layernorm_backward(dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w), mean, rstd)
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0.copy(), db0.copy()
    cpu_layernorm.layernorm_backward(rdinp, rdw, rdb, dout, x, w, rmean, rrstd)
    assert_close("layernorm dinp", dev.get(dinp), rdinp, **TOL)
    assert_close("layernorm dweight", dev.get(dw), rdw, **TOL)
    assert_close("layernorm dbias", dev.get(db), rdb, **TOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("B,T,C,OC", [(2, 7, 48, 144), (1, 3, 1023, 37)])
def test_matmul(dev, B, T, C, OC, bias):
    k = _import(dev)["matmul"]
    rng = np.random.default_rng(2)
    x, w, dout = rand(rng, B, T, C), rand(rng, OC, C, scale=0.1), rand(rng, B, T, OC)
    bvec = rand(rng, OC) if bias else None
    out = dev.poisoned((B, T, OC))
    k.matmul_forward(out, dev.put(x), dev.put(w), dev.put(bvec) if bias else None)
    ref = np.empty((B, T, OC), np.float32)
    cpu_matmul.matmul_forward(ref, x, w, bvec)
    assert_close("matmul out", dev.get(out), ref, **TOL)

    dw0, db0 = rand(rng, OC, C), rand(rng, OC)
    dinp, dw = dev.poisoned((B, T, C)), dev.put(dw0)
    db = dev.put(db0) if bias else None
    k.matmul_backward(dinp, dw, db, dev.put(dout), dev.put(x), dev.put(w))
    rdinp, rdw, rdb = np.empty((B, T, C), np.float32), dw0.copy(), db0.copy() if bias else None
    cpu_matmul.matmul_backward(rdinp, rdw, rdb, dout, x, w)
    assert_close("matmul dinp", dev.get(dinp), rdinp, **TOL)
    assert_close("matmul dweight", dev.get(dw), rdw, **TOL)
    if bias:
        assert_close("matmul dbias", dev.get(db), rdb, **TOL)


@pytest.mark.parametrize("B,T,NH,hs", [(2, 7, 4, 8), (1, 1, 2, 16), (1, 64, 2, 16), (2, 33, 3, 5)])
def test_attention(dev, B, T, NH, hs):
    k = _import(dev)["attention"]
    rng = np.random.default_rng(3)
    C = NH * hs
    qkv, dout = rand(rng, B, T, 3 * C), rand(rng, B, T, C)
    out, att = dev.poisoned((B, T, C)), dev.poisoned((B, NH, T, T))
    k.attention_forward(out, att, dev.put(qkv), NH)
    rout, ratt = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    cpu_attention.attention_forward(rout, ratt, qkv, NH)
    assert_close("attention att", dev.get(att), ratt, **TOL)
    assert_close("attention out", dev.get(out), rout, **TOL)

    dqkv = dev.poisoned((B, T, 3 * C))
    k.attention_backward(dqkv, dev.put(dout), dev.put(qkv), att, NH)
    rdqkv = np.empty((B, T, 3 * C), np.float32)
    cpu_attention.attention_backward(rdqkv, dout, qkv, ratt, NH)
    assert_close("attention dqkv", dev.get(dqkv), rdqkv, **TOL)


@pytest.mark.parametrize("shape", [(2, 7, 192), (3, 1023)])
def test_gelu(dev, shape):
    k = _import(dev)["gelu"]
    rng = np.random.default_rng(4)
    x, dout = rand(rng, *shape, scale=2.0), rand(rng, *shape)
    out, dinp = dev.poisoned(shape), dev.poisoned(shape)
    k.gelu_forward(out, dev.put(x))
    k.gelu_backward(dinp, dev.put(dout), dev.put(x))
    rout, rdinp = np.empty(shape, np.float32), np.empty(shape, np.float32)
    cpu_gelu.gelu_forward(rout, x)
    cpu_gelu.gelu_backward(rdinp, dout, x)
    assert_close("gelu out", dev.get(out), rout, **TOL)
    assert_close("gelu dinp", dev.get(dinp), rdinp, **TOL)


def test_residual_including_in_place(dev):
    k = _import(dev)["residual"]
    rng = np.random.default_rng(5)
    a, b = rand(rng, 3, 7, 33), rand(rng, 3, 7, 33)
    out = dev.poisoned(a.shape)
    k.residual_forward(out, dev.put(a), dev.put(b))
    assert_close("residual out", dev.get(out), a + b, atol=0, rtol=0)
    acc = dev.put(a)
    k.residual_forward(acc, acc, dev.put(b))  # out aliases inp1, as the backward uses it
    assert_close("residual in place", dev.get(acc), a + b, atol=0, rtol=0)


@pytest.mark.parametrize("B,T,V,Vp", [(2, 7, 1000, 1024), (1, 3, 101, 128), (1, 2, 50257, 50304)])
@pytest.mark.parametrize("version", [1, 2, 3])  # 2: online softmax, 16-byte loads; 3: row in registers
def test_classifier(dev, B, T, V, Vp, version):
    k = _import(dev)["classifier"]
    rng = np.random.default_rng(6)
    logits = rand(rng, B, T, Vp, scale=3.0)
    logits[..., V:] = 1e4  # padded columns must be ignored however large
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    if version == 3 and Vp > 1024 * 8 * 4:  # fp32: a row of more than 32768 does not fit in registers
        with pytest.raises(ValueError, match="version 3 keeps a row in registers: Vp must be at most 32768"):
            k.fused_classifier_dlogits(dev.put(logits), dev.poisoned((B, T)), dev.put(targets), V,
                                       1.0, version=3)
        return
    probs, losses = dev.poisoned((B, T, Vp)), dev.poisoned((B, T))
    k.softmax_forward(probs, dev.put(logits), V)
    k.crossentropy_forward(losses, dev.put(logits), dev.put(targets), V, version=version)
    rprobs, rlosses = np.empty_like(logits), np.empty((B, T), np.float32)
    cpu_classifier.softmax_forward(rprobs, logits, V)
    cpu_classifier.crossentropy_forward(rlosses, logits, targets, V)
    assert_close("softmax probs", dev.get(probs), rprobs, **TOL)
    assert_close("crossentropy losses", dev.get(losses), rlosses, **TOL)

    dloss = 1.0 / (B * T)
    dlogits, losses2 = dev.put(logits), dev.poisoned((B, T))
    k.fused_classifier_dlogits(dlogits, losses2, dev.put(targets), V, dloss, version=version)
    rdlogits, rlosses2 = logits.copy(), np.empty((B, T), np.float32)
    cpu_classifier.fused_classifier_dlogits(rdlogits, rlosses2, targets, V, dloss)
    assert_close("fused losses", dev.get(losses2), rlosses2, **TOL)
    assert_close("fused dlogits", dev.get(dlogits), rdlogits, atol=1e-7, rtol=1e-5)
    assert not np.any(dev.get(dlogits)[..., V:]), "padded columns of dlogits must be exactly 0"


@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_adamw(dev, weight_decay, grad_scale):
    k = _import(dev)["adamw"]
    rng = np.random.default_rng(7)
    n = 5003
    p, g = rand(rng, n), rand(rng, n)
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    dp, dg, dm, dv = dev.put(p), dev.put(g), dev.put(m), dev.put(v)
    for step in (1, 2, 3):
        k.adamw_update(dp, dg, dm, dv, step, 1e-3, 0.9, 0.95, 1e-8, weight_decay, grad_scale)
        cpu_adamw.adamw_update(p, g, m, v, step, 1e-3, 0.9, 0.95, 1e-8, weight_decay, grad_scale)
    assert_close("adamw params", dev.get(dp), p, atol=1e-6, rtol=1e-6)
    assert_close("adamw m", dev.get(dm), m, atol=1e-7, rtol=1e-6)
    assert_close("adamw v", dev.get(dv), v, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_global_norm(dev, n):
    k = _import(dev)["adamw"]
    g = rand(np.random.default_rng(8), n)
    got = k.global_norm(dev.put(g))
    want = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
    assert abs(got - want) <= 1e-5 * want, (got, want)


def test_wrapper_rejects_bad_arguments():
    from llmcu.cuda import gelu, layernorm
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"gelu_forward: out must have dtype float32, got float64"):
        gelu.gelu_forward(np.ones((2, 3)), x)
    with pytest.raises(ValueError, match=r"gelu_forward: out must have shape \(2, 3\), got \(3, 2\)"):
        gelu.gelu_forward(np.ones((3, 2), np.float32), x)
    with pytest.raises(ValueError, match=r"C-contiguous"):
        gelu.gelu_forward(np.ones((3, 2), np.float32).T, x)
    with pytest.raises(ValueError, match=r"layernorm_forward: weight must have shape \(3,\)"):
        layernorm.layernorm_forward(x.copy(), np.ones(2, np.float32), np.ones(2, np.float32), x,
                                    np.ones(4, np.float32), np.ones(3, np.float32))


def _tiny_config():
    return GPT2Config(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=32)


def test_gpt2_steps_match_the_numpy_model(dev):
    """End to end: 3 AdamW steps of a tiny GPT-2 on the kernels against the oracle:
    logits, loss, every gradient, and the losses."""
    from llmcu.cuda.gpt2 import GPT2
    config = _tiny_config()
    params = init_parameters(config, seed=5)
    rng = np.random.default_rng(9)
    x = rng.integers(0, config.vocab_size, (2, 8))
    y = rng.integers(0, config.vocab_size, (2, 8))
    ours = GPT2(config, params.copy(), device=dev.name)
    ref = CPUGPT2(config, params.copy())
    for step in range(1, 4):
        loss = ours.forward(x, y)
        rloss = ref.forward(x, y)
        if step == 1:
            assert_close("logits", dev.get(ours.acts.logits), ref.acts.logits, **TOL)
        assert abs(loss - rloss) < 1e-5, (step, loss, rloss)
        ours.zero_grad()
        ref.zero_grad()
        ours.backward()
        ref.backward()
        if step == 1:
            ours_g = dev.get(ours.grads)
            from llmcu.config import parameter_views
            got = parameter_views(config, ours_g)
            for name, want in ref.g.items():
                scale = float(np.abs(want).max()) or 1.0
                assert_close(f"grad {name}", got[name] / scale, want / scale, atol=1e-5, rtol=0)
        n1 = ours.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        n2 = ref.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        assert abs(n1 - n2) <= 1e-5 * n2
    assert_close("params after 3 steps", ours.params_host(), ref.params, atol=1e-5, rtol=1e-5)
