"""Every backward of the NumPy oracle against float64 finite differences.

The layer functions are plain NumPy, so they run on float64 arrays; each test
uses tiny shapes and random (never zero) inputs, takes the loss to be a random
linear functional  L = sum(w * out),  so the analytic gradient is the layer's
backward with dout = w, and compares it to central differences of L.

Tolerance: central differences have truncation error ~eps^2 * |f'''| ~ 1e-12
and rounding error ~u * |L| / eps ~ 1e-16 * 10 / 1e-6 = 1e-9 (u = 2^-53,
|L| ~ 10 here). The measured worst case over these tests is 3.2e-9 absolute
(matmul dweight; `pytest -s` prints every one), so atol = 1e-7, rtol = 1e-6
leaves a >30x margin while any real bug (a missing term, a wrong sign, a
transposed axis) is O(1).

The second half checks the gradient-buffer convention stated at the top of
every module: parameter gradients accumulate (+=), activation gradients
overwrite (=), by calling each backward twice on pre-filled buffers.
"""

import numpy as np
import pytest

from helpers import assert_close
from llmcu.config import GPT2Config
from llmcu.cpu import gpt2 as gpt2_module
from llmcu.cpu.attention import attention_backward, attention_forward
from llmcu.cpu.classifier import (crossentropy_forward, crossentropy_softmax_backward,
                                  fused_classifier, softmax_forward)
from llmcu.cpu.encoder import encoder_backward, encoder_forward
from llmcu.cpu.gelu import gelu_backward, gelu_forward
from llmcu.cpu.layernorm import layernorm_backward, layernorm_forward
from llmcu.cpu.matmul import matmul_backward, matmul_forward
from llmcu.cpu.residual import residual_backward, residual_forward

F64 = np.float64
EPS = 1e-6
ATOL, RTOL = 1e-7, 1e-6


def rand(rng, *shape, scale=1.0):
    """Random float64 array; standard normals are never exactly zero in practice."""
    return rng.standard_normal(shape) * scale


def numerical_grad(loss, x, eps=EPS):
    """Central differences of the scalar loss() wrt every element of x (in place, restored)."""
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x), "numerical_grad needs a contiguous array"
    grad = np.zeros(x.size, dtype=F64)
    for i in range(x.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss()
        flat[i] = old - eps
        down = loss()
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(x.shape)


# --- encoder ---------------------------------------------------------------

def _encoder_case(rng):
    Vp, maxT, C = 6, 5, 3
    # repeated ids in a row and across rows; T=4 < maxT so wpe[4] must get 0
    inp = np.array([[1, 3, 1, 1], [3, 0, 5, 1]])
    wte, wpe = rand(rng, Vp, C), rand(rng, maxT, C)
    w = rand(rng, *inp.shape, C)
    return inp, wte, wpe, w


def test_encoder_fd():
    rng = np.random.default_rng(0)
    inp, wte, wpe, w = _encoder_case(rng)
    out = np.empty(inp.shape + (wte.shape[1],))

    def loss():
        encoder_forward(out, inp, wte, wpe)
        return float((w * out).sum())

    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    encoder_backward(dwte, dwpe, w, inp)
    assert_close("encoder dwte", dwte, numerical_grad(loss, wte), ATOL, RTOL)
    assert_close("encoder dwpe", dwpe, numerical_grad(loss, wpe), ATOL, RTOL)
    assert np.all(dwte[[2, 4]] == 0.0) and np.all(dwpe[4] == 0.0)  # never looked up


# --- layernorm -------------------------------------------------------------

def test_layernorm_fd():
    rng = np.random.default_rng(1)
    B, T, C = 2, 3, 5
    x = rand(rng, B, T, C, scale=2.0) + 0.5
    weight, bias = rand(rng, C) + 1.0, rand(rng, C)
    w = rand(rng, B, T, C)
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))

    def loss():
        layernorm_forward(out, mean, rstd, x, weight, bias)
        return float((w * out).sum())

    loss()  # fills mean, rstd at the unperturbed point
    dx = np.empty_like(x)
    dweight, dbias = np.zeros(C), np.zeros(C)
    layernorm_backward(dx, dweight, dbias, w, x, weight, mean.copy(), rstd.copy())
    assert_close("layernorm dinp", dx, numerical_grad(loss, x), ATOL, RTOL)
    assert_close("layernorm dweight", dweight, numerical_grad(loss, weight), ATOL, RTOL)
    assert_close("layernorm dbias", dbias, numerical_grad(loss, bias), ATOL, RTOL)


# --- matmul ----------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_matmul_fd(with_bias):
    rng = np.random.default_rng(2)
    B, T, C, OC = 2, 3, 4, 5
    x, weight = rand(rng, B, T, C), rand(rng, OC, C)
    bias = rand(rng, OC) if with_bias else None
    w = rand(rng, B, T, OC)
    out = np.empty((B, T, OC))

    def loss():
        matmul_forward(out, x, weight, bias)
        return float((w * out).sum())

    dx, dweight = np.empty_like(x), np.zeros_like(weight)
    dbias = np.zeros(OC) if with_bias else None
    matmul_backward(dx, dweight, dbias, w, x, weight)
    assert_close("matmul dinp", dx, numerical_grad(loss, x), ATOL, RTOL)
    assert_close("matmul dweight", dweight, numerical_grad(loss, weight), ATOL, RTOL)
    if with_bias:
        assert_close("matmul dbias", dbias, numerical_grad(loss, bias), ATOL, RTOL)

    # dinp=None (the first layer's input needs no gradient) still gives dweight
    dweight2 = np.zeros_like(weight)
    matmul_backward(None, dweight2, None, w, x, weight)
    assert_close("matmul dweight (dinp=None)", dweight2, dweight, 0.0, 0.0)


# --- attention -------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 5])
def test_attention_fd(T):
    rng = np.random.default_rng(3 + T)
    B, NH, C = 2, 2, 4
    qkv = rand(rng, B, T, 3 * C)
    w = rand(rng, B, T, C)
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))

    def loss():
        attention_forward(out, att, qkv, NH)
        return float((w * out).sum())

    loss()
    # causal: row t of every head sums to 1 and has nothing after column t
    assert_close("attention rows sum to 1", att.sum(-1), np.ones((B, NH, T)), 1e-12, 0.0)
    assert np.all(att[..., np.triu(np.ones((T, T), dtype=bool), k=1)] == 0.0)
    dqkv = np.empty_like(qkv)
    attention_backward(dqkv, w, qkv, att.copy(), NH)
    assert_close(f"attention dqkv T={T}", dqkv, numerical_grad(loss, qkv), ATOL, RTOL)
    if T == 1:
        # one position: out = v, so q and k get exactly zero gradient
        assert np.all(dqkv[..., :2 * C] == 0.0)


# --- gelu and residual -----------------------------------------------------

def test_gelu_fd():
    rng = np.random.default_rng(4)
    x = rand(rng, 2, 3, 7, scale=2.0)  # covers the curved region and both tails
    w = rand(rng, *x.shape)
    out = np.empty_like(x)

    def loss():
        gelu_forward(out, x)
        return float((w * out).sum())

    dx = np.empty_like(x)
    gelu_backward(dx, w, x)
    assert_close("gelu dinp", dx, numerical_grad(loss, x), ATOL, RTOL)


def test_residual_fd():
    rng = np.random.default_rng(5)
    a, b = rand(rng, 2, 3, 4), rand(rng, 2, 3, 4)
    w = rand(rng, 2, 3, 4)
    out = np.empty_like(a)

    def loss():
        residual_forward(out, a, b)
        return float((w * out).sum())

    da, db = np.empty_like(a), np.empty_like(b)
    residual_backward(da, db, w)
    assert_close("residual dinp1", da, numerical_grad(loss, a), ATOL, RTOL)
    assert_close("residual dinp2", db, numerical_grad(loss, b), ATOL, RTOL)


# --- classifier ------------------------------------------------------------

V, VP = 7, 8


def test_classifier_fd():
    rng = np.random.default_rng(6)
    B, T = 2, 3
    logits = rand(rng, B, T, VP, scale=2.0)
    targets = np.array([[0, 6, 3], [6, 6, 1]])  # includes the last real column
    wl = rand(rng, B, T)  # dlosses
    losses, probs, probs_tmp = np.empty((B, T)), np.empty((B, T, VP)), np.empty((B, T, VP))

    def loss():
        crossentropy_forward(losses, logits, targets, V)
        return float((wl * losses).sum())

    softmax_forward(probs, logits, V)
    dlogits = np.empty_like(logits)
    crossentropy_softmax_backward(dlogits, wl, probs, targets, V)
    numeric = numerical_grad(loss, logits)

    def fused_loss():  # the fused forward must define the same loss
        fused_classifier(losses, probs_tmp, logits, targets, V)
        return float((wl * losses).sum())

    numeric_fused = numerical_grad(fused_loss, logits)
    assert_close("classifier dlogits vs fused forward", dlogits, numeric_fused, ATOL, RTOL)
    assert_close("classifier dlogits (real columns)", dlogits[..., :V], numeric[..., :V], ATOL, RTOL)
    assert np.all(dlogits[..., V:] == 0.0), "padded columns must get exactly 0 gradient"
    assert np.all(numeric[..., V:] == 0.0), "the loss must not depend on padded columns"
    # the loss is -log p[target] of the same softmax
    picked = np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
    crossentropy_forward(losses, logits, targets, V)
    assert_close("classifier loss = -log p", losses, -np.log(picked), 1e-12, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("huge", [1e4, 1e30])
def test_classifier_padded_columns_ignored(dtype, huge):
    rng = np.random.default_rng(7)
    B, T = 2, 3
    logits = rand(rng, B, T, VP).astype(dtype)
    targets = rng.integers(0, V, size=(B, T))
    ref_losses, ref_probs = np.empty((B, T), dtype), np.empty((B, T, VP), dtype)
    fused_classifier(ref_losses, ref_probs, logits, targets, V)

    logits[..., V:] = huge  # would swamp the softmax if the padding were included
    losses, probs = np.full((B, T), np.nan, dtype), np.full((B, T, VP), np.nan, dtype)
    fused_classifier(losses, probs, logits, targets, V)
    assert np.all(probs[..., V:] == 0.0)
    assert_close("probs with huge padding", probs, ref_probs, 0.0, 0.0)
    assert_close("losses with huge padding", losses, ref_losses, 0.0, 0.0)
    # the unfused halves agree with the fused forward (rounding aside)
    probs2, losses2 = np.full_like(probs, np.nan), np.full_like(losses, np.nan)
    softmax_forward(probs2, logits, V)
    crossentropy_forward(losses2, logits, targets, V)
    assert np.all(probs2[..., V:] == 0.0)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert_close("softmax_forward with huge padding", probs2, ref_probs, tol, tol)
    assert_close("crossentropy_forward with huge padding", losses2, ref_losses, tol, tol)
    dlogits = np.full_like(logits, np.nan)
    crossentropy_softmax_backward(dlogits, np.ones((B, T), dtype), probs, targets, V)
    assert np.all(dlogits[..., V:] == 0.0)
    assert np.all(np.isfinite(dlogits))
    # "zero on padded columns" holds whatever the padded probs hold
    junk = probs.copy()
    junk[..., V:] = 0.5
    crossentropy_softmax_backward(dlogits, np.ones((B, T), dtype), junk, targets, V)
    assert np.all(dlogits[..., V:] == 0.0)


# --- the whole model -------------------------------------------------------

TINY = GPT2Config(max_seq_len=5, vocab_size=V, num_layers=2, num_heads=2, channels=4,
                  padded_vocab_size=VP)


def _tiny_batch():
    # B*T = 8 so dlosses = 1/8 is exact in float32 (gpt2.backward builds it in float32);
    # T=4 < maxT=5 so wpe[4] is never used; ids repeat.
    inputs = np.array([[1, 3, 1, 6], [0, 3, 3, 5]])
    targets = np.array([[3, 1, 6, 0], [3, 5, 2, 2]])
    return inputs, targets


def _random_params(dtype, seed=8):
    # Every parameter random and non-zero (biases and layernorm weights too, and
    # the padded wte row, whose gradient must nevertheless come out exactly 0).
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(TINY.num_parameters()) * 0.5).astype(dtype)


def test_gpt2_fd_float64(monkeypatch):
    """GPT2.forward/backward themselves, run in float64, against finite differences.

    GPT2.__init__ insists on float32 parameters and the activations come from
    gpt2._zeros, so the test builds the model in float32, then swaps in a
    float64 parameter array and makes _zeros allocate float64. The code under
    test is the unmodified forward and backward of llmcu/cpu/gpt2.py.
    """
    monkeypatch.setattr(gpt2_module, "_zeros", lambda *shape: np.zeros(shape, dtype=np.float64))
    inputs, targets = _tiny_batch()
    model = gpt2_module.GPT2(TINY, params=_random_params(np.float32))
    model.params = _random_params(np.float64)
    model.p = gpt2_module.parameter_views(TINY, model.params)

    model.forward(inputs, targets)
    assert model.acts.logits.dtype == np.float64  # really running in float64
    model.zero_grad()
    model.backward()
    analytic = model.grads.copy()
    numeric = numerical_grad(lambda: model.forward(inputs, targets), model.params)

    g_num = gpt2_module.parameter_views(TINY, numeric)
    g_ana = gpt2_module.parameter_views(TINY, analytic)
    for name, _ in TINY.parameter_shapes():
        assert_close(f"gpt2 d{name}", g_ana[name], g_num[name], ATOL, RTOL)
    assert np.all(g_ana["wte"][V:] == 0.0), "padded wte rows must get exactly 0"
    assert np.all(g_ana["wpe"][4] == 0.0), "wpe rows past T must get exactly 0"
    assert np.abs(analytic).max() > 1e-2  # the check above is not vacuous


def test_gpt2_directional_float32():
    """The float32 model as shipped (no patching): directional derivatives.

    L(p + d) - L(p - d) over 2 is compared with g . d for the float32
    perturbation d actually applied (float32(p + h u) - p, so rounding p + h u
    does not count as error). With h = 1e-3 the truncation error is ~h^2 ~ 1e-6
    and float32 rounding of the mean loss (~2) is ~2e-7, against a difference
    L(p + d) - L(p - d) ~ 2h|g| ~ 2e-3 (|g| ~ 1): ~1e-4 relative, measured
    8e-5. rtol = 2e-3 leaves a 25x margin. (Per-element coverage is the
    float64 test's job; this one guards the float32 path as shipped.)
    """
    inputs, targets = _tiny_batch()
    rng = np.random.default_rng(9)
    params = _random_params(np.float32)
    model = gpt2_module.GPT2(TINY, params=params)
    model.forward(inputs, targets)
    model.zero_grad()
    model.backward()
    g = model.grads.astype(np.float64)
    base = params.copy()
    h = 1e-3
    for k in range(4):
        # half random, half along the gradient, so g . d is well away from 0
        u = rng.standard_normal(params.size)
        u = u / np.linalg.norm(u) + g / np.linalg.norm(g)
        u /= np.linalg.norm(u)
        up = (base + h * u).astype(np.float32)
        down = (base - h * u).astype(np.float32)
        params[...] = up
        l_up = model.forward(inputs, targets)
        params[...] = down
        l_down = model.forward(inputs, targets)
        params[...] = base
        numeric = l_up - l_down
        analytic = float(g @ (up.astype(np.float64) - down.astype(np.float64)))
        assert_close(f"gpt2 float32 directional derivative {k}", numeric, analytic, 0.0, 2e-3)


# --- accumulate (+=) for parameter gradients, overwrite (=) for activations --

def _prefilled(rng, like):
    return rng.standard_normal(like.shape) + 3.0  # non-zero, so both mistakes show


def test_convention_encoder():
    rng = np.random.default_rng(10)
    inp, wte, wpe, w = _encoder_case(rng)
    ref_wte, ref_wpe = np.zeros_like(wte), np.zeros_like(wpe)
    encoder_backward(ref_wte, ref_wpe, w, inp)
    dwte, dwpe = _prefilled(rng, wte), _prefilled(rng, wpe)
    start_wte, start_wpe = dwte.copy(), dwpe.copy()
    for _ in range(2):
        encoder_backward(dwte, dwpe, w, inp)
    assert_close("encoder dwte accumulates", dwte, start_wte + 2 * ref_wte, 1e-12, 1e-12)
    assert_close("encoder dwpe accumulates", dwpe, start_wpe + 2 * ref_wpe, 1e-12, 1e-12)


def test_convention_layernorm():
    rng = np.random.default_rng(11)
    B, T, C = 2, 3, 5
    x, weight, bias, w = rand(rng, B, T, C), rand(rng, C), rand(rng, C), rand(rng, B, T, C)
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))
    layernorm_forward(out, mean, rstd, x, weight, bias)
    ref_dx, ref_dw, ref_db = np.empty_like(x), np.zeros(C), np.zeros(C)
    layernorm_backward(ref_dx, ref_dw, ref_db, w, x, weight, mean, rstd)
    dx, dw, db = _prefilled(rng, x), _prefilled(rng, weight), _prefilled(rng, bias)
    start_dw, start_db = dw.copy(), db.copy()
    for _ in range(2):
        layernorm_backward(dx, dw, db, w, x, weight, mean, rstd)
    assert_close("layernorm dinp overwrites", dx, ref_dx, 0.0, 0.0)
    assert_close("layernorm dweight accumulates", dw, start_dw + 2 * ref_dw, 1e-12, 1e-12)
    assert_close("layernorm dbias accumulates", db, start_db + 2 * ref_db, 1e-12, 1e-12)


def test_convention_matmul():
    rng = np.random.default_rng(12)
    B, T, C, OC = 2, 3, 4, 5
    x, weight, w = rand(rng, B, T, C), rand(rng, OC, C), rand(rng, B, T, OC)
    ref_dx, ref_dw, ref_db = np.empty_like(x), np.zeros_like(weight), np.zeros(OC)
    matmul_backward(ref_dx, ref_dw, ref_db, w, x, weight)
    dx, dw, db = _prefilled(rng, x), _prefilled(rng, weight), _prefilled(rng, ref_db)
    start_dw, start_db = dw.copy(), db.copy()
    for _ in range(2):
        matmul_backward(dx, dw, db, w, x, weight)
    assert_close("matmul dinp overwrites", dx, ref_dx, 0.0, 0.0)
    assert_close("matmul dweight accumulates", dw, start_dw + 2 * ref_dw, 1e-12, 1e-12)
    assert_close("matmul dbias accumulates", db, start_db + 2 * ref_db, 1e-12, 1e-12)


def test_convention_attention():
    rng = np.random.default_rng(13)
    B, T, NH, C = 2, 5, 2, 4
    qkv, w = rand(rng, B, T, 3 * C), rand(rng, B, T, C)
    out, att = np.empty((B, T, C)), np.empty((B, NH, T, T))
    attention_forward(out, att, qkv, NH)
    ref = np.empty_like(qkv)
    attention_backward(ref, w, qkv, att, NH)
    dqkv = _prefilled(rng, qkv)
    for _ in range(2):
        attention_backward(dqkv, w, qkv, att, NH)
    assert_close("attention dqkv overwrites", dqkv, ref, 0.0, 0.0)


def test_convention_gelu_residual():
    rng = np.random.default_rng(14)
    x, w = rand(rng, 2, 3, 4), rand(rng, 2, 3, 4)
    ref = np.empty_like(x)
    gelu_backward(ref, w, x)
    dx = _prefilled(rng, x)
    for _ in range(2):
        gelu_backward(dx, w, x)
    assert_close("gelu dinp overwrites", dx, ref, 0.0, 0.0)
    d1, d2 = _prefilled(rng, x), _prefilled(rng, x)
    for _ in range(2):
        residual_backward(d1, d2, w)
    assert_close("residual dinp1 overwrites", d1, w, 0.0, 0.0)
    assert_close("residual dinp2 overwrites", d2, w, 0.0, 0.0)


def test_convention_classifier():
    rng = np.random.default_rng(15)
    B, T = 2, 3
    logits, targets, dl = rand(rng, B, T, VP), rng.integers(0, V, (B, T)), rand(rng, B, T)
    probs = np.empty_like(logits)
    softmax_forward(probs, logits, V)
    ref = np.empty_like(logits)
    crossentropy_softmax_backward(ref, dl, probs, targets, V)
    dlogits = _prefilled(rng, logits)  # padded columns pre-filled too: must end up 0
    for _ in range(2):
        crossentropy_softmax_backward(dlogits, dl, probs, targets, V)
    assert_close("classifier dlogits overwrites", dlogits, ref, 0.0, 0.0)


def test_convention_gpt2_backward_accumulates():
    """Two backward() calls without zero_grad add up; zero_grad starts over."""
    inputs, targets = _tiny_batch()
    model = gpt2_module.GPT2(TINY, params=_random_params(np.float32))
    model.forward(inputs, targets)
    model.zero_grad()
    model.backward()
    once = model.grads.copy()
    model.backward()
    # float32: (a + b) + a + b vs 2 (a + b) for wte (LM head + encoder) may differ by an ulp
    assert_close("gpt2 grads after two backward()", model.grads, 2 * once, 1e-7, 1e-6)
    model.zero_grad()
    model.backward()
    assert_close("gpt2 grads after zero_grad + backward()", model.grads, once, 0.0, 0.0)
