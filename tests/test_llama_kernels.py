"""The Llama-family kernels (kernels/rmsnorm.cu, rope.cu, swiglu.cu) against the
NumPy oracle (llmcu/cpu/rmsnorm.py, rope.py, swiglu.py), plus the wrappers'
argument checks.

Each test runs on KERNEL_BACKENDS: "emu" (the .cu sources compiled as C++ and
run on the CPU; always, this is what CI exercises) and "cuda" (a real GPU
through CuPy; skipped without one). Inputs are random, outputs NaN-poisoned
before the kernel runs, so an unwritten element fails; parameter gradients
start random, so a kernel that overwrites instead of accumulating fails.
Shapes include odd ones (T=7, C=1023, H=37, row counts that leave a block
part-empty or span several blocks), grouped-query and multi-query head counts
and the smallest head (hs=2). Every kernel also runs with floatX = bf16
(section "bf16" below, its own tolerance note).

Tolerances (fp32, u = 6e-8):
- rmsnorm: the kernel sums C squares in 32 strided partial sums then a
  butterfly, NumPy pairwise; ~u * sqrt(C) relative on the statistic, and
  outputs up to ~10: atol = rtol = 1e-5 has a >5x margin over the measured
  (`pytest -s` prints it) while a missing term is O(1e-2) or more.
- rope: two products and one add per element; the only difference possible
  is an FMA contraction by the GPU compiler (one rounding fewer), <= 1 ulp of
  values ~3: atol = rtol = 1e-6. Value heads are copies: compared exactly.
- swiglu/geglu: expf/tanhf differ from NumPy's by a few ulp; for geglu's
  gate gradient that is amplified in the tail (gate ~ -5, see
  tests/test_layers_torch.py's gelu) by |dout * up| up to ~10, hence atol 5e-5
  there; everything else atol = rtol = 1e-5.
"""

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.cpu import rmsnorm as cpu_rmsnorm
from llmcu.cpu import rope as cpu_rope
from llmcu.cpu import swiglu as cpu_swiglu

TOL = dict(atol=1e-5, rtol=1e-5)
ROPE_TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def kernels():
    from llmcu.cuda import rmsnorm, rope, swiglu
    return rmsnorm, rope, swiglu


def rand(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


# --- rmsnorm ---------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("B,T,C", [(2, 7, 48), (1, 7, 1023), (4, 9, 130), (1, 1, 1)])
def test_rmsnorm(dev, B, T, C, offset):
    k = kernels()[0]
    rng = np.random.default_rng(C + int(offset))
    eps = 1e-6 if offset else 1e-5
    x = rand(rng, B, T, C, scale=3.0, shift=0.5)
    w = rand(rng, C, scale=0.5, shift=1.0 - offset)
    dout = rand(rng, B, T, C)

    out, rstd = dev.poisoned((B, T, C)), dev.poisoned((B, T))
    k.rmsnorm_forward(out, rstd, dev.put(x), dev.put(w), eps=eps, weight_offset=offset)
    rout, rrstd = np.empty((B, T, C), np.float32), np.empty((B, T), np.float32)
    cpu_rmsnorm.rmsnorm_forward(rout, rrstd, x, w, eps=eps, weight_offset=offset)
    assert_close(f"rmsnorm out C={C}", dev.get(out), rout, **TOL)
    assert_close(f"rmsnorm rstd C={C}", dev.get(rstd), rrstd, **TOL)

    dw0 = rand(rng, C)  # parameter gradients accumulate onto what is there
    dinp, dw = dev.poisoned((B, T, C)), dev.put(dw0)
    k.rmsnorm_backward(dinp, dw, dev.put(dout), dev.put(x), dev.put(w), rstd, weight_offset=offset)
    rdinp, rdw = np.empty((B, T, C), np.float32), dw0.copy()
    cpu_rmsnorm.rmsnorm_backward(rdinp, rdw, dout, x, w, rrstd, weight_offset=offset)
    assert_close(f"rmsnorm dinp C={C}", dev.get(dinp), rdinp, **TOL)
    assert_close(f"rmsnorm dweight C={C}", dev.get(dw), rdw, **TOL)


# --- rope ------------------------------------------------------------------

@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 7, 4, 4, 16), (2, 7, 4, 2, 16), (1, 7, 6, 1, 8),
                                           (2, 5, 8, 2, 64), (1, 3, 3, 1, 2), (1, 9, 2, 1, 256)],
                         ids=["mha", "gqa", "mqa", "gqa-hs64", "hs2", "gemma-hs256"])
def test_rope(dev, B, T, NH, NKV, hs):
    k = kernels()[1]
    rng = np.random.default_rng(NH * 100 + NKV * 10 + hs)
    W = (NH + 2 * NKV) * hs
    cos, sin = cpu_rope.rope_frequencies(hs, T + 5, 10000.0)  # table longer than T
    x, dout = rand(rng, B, T, W), rand(rng, B, T, W)
    dcos, dsin = dev.put(cos), dev.put(sin)

    out = dev.poisoned((B, T, W))
    k.rope_forward(out, dev.put(x), dcos, dsin, NH, NKV)
    ref = np.empty_like(x)
    cpu_rope.rope_forward(ref, x, cos, sin, NH, NKV)
    assert_close("rope out", dev.get(out), ref, **ROPE_TOL)
    got = dev.get(out).reshape(B, T, -1, hs)
    assert_close("rope values copied", got[:, :, NH + NKV:], x.reshape(B, T, -1, hs)[:, :, NH + NKV:],
                 0.0, 0.0)

    dinp = dev.poisoned((B, T, W))
    k.rope_backward(dinp, dev.put(dout), dcos, dsin, NH, NKV)
    rdinp = np.empty_like(x)
    cpu_rope.rope_backward(rdinp, dout, cos, sin, NH, NKV)
    assert_close("rope dinp", dev.get(dinp), rdinp, **ROPE_TOL)


def test_rope_in_place_and_default_kv_heads(dev):
    k = kernels()[1]
    rng = np.random.default_rng(5)
    B, T, NH, hs = 2, 7, 3, 8
    cos, sin = cpu_rope.rope_frequencies(hs, T, 500000.0)
    x = rand(rng, B, T, 3 * NH * hs)
    buf = dev.put(x)
    k.rope_forward(buf, buf, dev.put(cos), dev.put(sin), NH)  # num_kv_heads=None means NH
    ref = np.empty_like(x)
    cpu_rope.rope_forward(ref, x, cos, sin, NH, NH)
    assert_close("rope in place", dev.get(buf), ref, **ROPE_TOL)
    k.rope_backward(buf, buf, dev.put(cos), dev.put(sin), NH)
    # backward inverts forward up to two roundings of values ~3
    assert_close("rope backward(forward(x)) in place", dev.get(buf), x, 1e-5, 1e-5)


# --- swiglu / geglu --------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 7, 1023), (3, 37), (1, 1, 1)])
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu(dev, kind, shape):
    k = kernels()[2]
    rng = np.random.default_rng(sum(shape) + len(kind))
    H = shape[-1]
    lead = shape[:-1]
    inp = np.concatenate([rand(rng, *lead, H, scale=3.0), rand(rng, *lead, H, scale=2.0)], axis=-1)
    dout = rand(rng, *lead, H)

    out = dev.poisoned(shape)
    getattr(k, f"{kind}_forward")(out, dev.put(inp))
    ref = np.empty(shape, np.float32)
    getattr(cpu_swiglu, f"{kind}_forward")(ref, inp)
    assert_close(f"{kind} out", dev.get(out), ref, **TOL)

    dinp = dev.poisoned(inp.shape)
    getattr(k, f"{kind}_backward")(dinp, dev.put(dout), dev.put(inp))
    rdinp = np.empty_like(inp)
    getattr(cpu_swiglu, f"{kind}_backward")(rdinp, dout, inp)
    tol = dict(atol=5e-5, rtol=1e-5) if kind == "geglu" else TOL
    assert_close(f"{kind} dinp", dev.get(dinp), rdinp, **tol)


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_extreme_gates(dev, kind):
    """Gates far in both tails: no NaN or inf from expf overflow, limits 0 and x."""
    k = kernels()[2]
    g = np.array([-200.0, -90.0, -20.0, -5.5, 5.5, 20.0, 90.0, 200.0], np.float32)
    inp = np.concatenate([g, np.linspace(-2, 2, g.size).astype(np.float32) + 0.1])[None]
    dout = np.ones((1, g.size), np.float32)
    out, dinp = dev.poisoned((1, g.size)), dev.poisoned(inp.shape)
    getattr(k, f"{kind}_forward")(out, dev.put(inp))
    getattr(k, f"{kind}_backward")(dinp, dev.put(dout), dev.put(inp))
    ref, rdinp = np.empty((1, g.size), np.float32), np.empty_like(inp)
    getattr(cpu_swiglu, f"{kind}_forward")(ref, inp)
    getattr(cpu_swiglu, f"{kind}_backward")(rdinp, dout, inp)
    assert_close(f"{kind} tails out", dev.get(out), ref, **TOL)
    assert_close(f"{kind} tails dinp", dev.get(dinp), rdinp, 5e-5, 1e-5)


# --- bf16 (floatX = __nv_bfloat16) ---------------------------------------------
#
# bf16 arrays are uint16 bit patterns (llmcu.formats, round to nearest even).
# The kernel gets bf16 inputs, the fp32 oracle the same rounded values widened,
# so what is left is the kernel's own rounding of each output: every output
# here is computed in fp32 and rounded once (dweight: start + fp32 sum, rounded
# once), i.e. within U |y| of the fp32 result, U = 2^-8 (8 significant bits),
# on top of the fp32 tolerance above: rtol = U + 1e-5, atol = the fp32 atol
# scaled by the output's magnitude. Truncation instead of rounding (2U) or any
# indexing error fails. rstd and the cos/sin tables stay fp32.

U = 2.0 ** -8


def bf16(rng, *shape, scale=1.0, shift=0.0):
    """(bf16 bits for the kernel, their exact fp32 values for the oracle)."""
    from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits
    bits = float32_to_bf16_bits(rand(rng, *shape, scale=scale, shift=shift))
    return bits, bf16_bits_to_float32(bits)


def widened(a):
    from llmcu.formats import bf16_bits_to_float32
    return bf16_bits_to_float32(np.asarray(a))


def bf16_tol(ref, atol=1e-5):
    scale = max(float(np.abs(ref).max()), 1.0)
    return dict(atol=atol * scale, rtol=U + 1e-5)


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("B,T,C", [(2, 7, 48), (1, 3, 1023)])
def test_rmsnorm_bf16(dev, B, T, C, offset):
    k = kernels()[0]
    rng = np.random.default_rng(20 + C)
    (x, x_f), (w, w_f), (dout, dout_f), (dw0, dw0_f) = (
        bf16(rng, B, T, C, scale=3.0, shift=0.5), bf16(rng, C, scale=0.5, shift=1.0 - offset),
        bf16(rng, B, T, C), bf16(rng, C))
    out, rstd = dev.poisoned((B, T, C), np.uint16), dev.poisoned((B, T))
    k.rmsnorm_forward(out, rstd, dev.put(x), dev.put(w), weight_offset=offset)
    rout, rrstd = np.empty((B, T, C), np.float32), np.empty((B, T), np.float32)
    cpu_rmsnorm.rmsnorm_forward(rout, rrstd, x_f, w_f, weight_offset=offset)
    assert_close("rmsnorm bf16 rstd", dev.get(rstd), rrstd, **TOL)  # fp32 statistic of exact inputs
    assert_close("rmsnorm bf16 out", widened(dev.get(out)), rout, **bf16_tol(rout))

    dinp, dw = dev.poisoned((B, T, C), np.uint16), dev.put(dw0)
    k.rmsnorm_backward(dinp, dw, dev.put(dout), dev.put(x), dev.put(w), dev.put(rrstd),
                       weight_offset=offset)
    rdinp, rdw = np.empty((B, T, C), np.float32), dw0_f.copy()
    cpu_rmsnorm.rmsnorm_backward(rdinp, rdw, dout_f, x_f, w_f, rrstd, weight_offset=offset)
    assert_close("rmsnorm bf16 dinp", widened(dev.get(dinp)), rdinp, **bf16_tol(rdinp))
    assert_close("rmsnorm bf16 dweight", widened(dev.get(dw)), rdw, **bf16_tol(rdw))


@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 7, 4, 2, 16), (1, 5, 2, 1, 256)])
def test_rope_bf16(dev, B, T, NH, NKV, hs):
    k = kernels()[1]
    rng = np.random.default_rng(21 + hs)
    W = (NH + 2 * NKV) * hs
    cos, sin = cpu_rope.rope_frequencies(hs, T, 10000.0)
    (x, x_f), (dout, dout_f) = bf16(rng, B, T, W), bf16(rng, B, T, W)
    for direction, src, src_f in (("forward", x, x_f), ("backward", dout, dout_f)):
        out = dev.poisoned((B, T, W), np.uint16)
        getattr(k, f"rope_{direction}")(out, dev.put(src), dev.put(cos), dev.put(sin), NH, NKV)
        ref = np.empty((B, T, W), np.float32)
        getattr(cpu_rope, f"rope_{direction}")(ref, src_f, cos, sin, NH, NKV)
        assert_close(f"rope bf16 {direction}", widened(dev.get(out)), ref, **bf16_tol(ref))
        got = dev.get(out).reshape(B, T, -1, hs)[:, :, NH + NKV:]
        np.testing.assert_array_equal(got, src.reshape(B, T, -1, hs)[:, :, NH + NKV:],
                                      err_msg=f"rope bf16 {direction}: value heads copied bit for bit")


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(2, 7, 48), (1, 3, 1023)])
def test_glu_bf16(dev, kind, shape):
    k = kernels()[2]
    rng = np.random.default_rng(22 + shape[-1])
    H, lead = shape[-1], shape[:-1]
    (g, g_f), (u, u_f), (dout, dout_f) = (bf16(rng, *lead, H, scale=3.0), bf16(rng, *lead, H, scale=2.0),
                                          bf16(rng, *shape))
    inp, inp_f = np.concatenate([g, u], axis=-1), np.concatenate([g_f, u_f], axis=-1)
    out = dev.poisoned(shape, np.uint16)
    getattr(k, f"{kind}_forward")(out, dev.put(inp))
    ref = np.empty(shape, np.float32)
    getattr(cpu_swiglu, f"{kind}_forward")(ref, inp_f)
    assert_close(f"{kind} bf16 out", widened(dev.get(out)), ref, **bf16_tol(ref))
    dinp = dev.poisoned(inp.shape, np.uint16)
    getattr(k, f"{kind}_backward")(dinp, dev.put(dout), dev.put(inp))
    rdinp = np.empty(inp.shape, np.float32)
    getattr(cpu_swiglu, f"{kind}_backward")(rdinp, dout_f, inp_f)
    # geglu: the fp32 tail bound of test_glu (5e-5 absolute), then one rounding
    assert_close(f"{kind} bf16 dinp", widened(dev.get(dinp)), rdinp,
                 **bf16_tol(rdinp, atol=5e-5 if kind == "geglu" else 1e-5))


# --- argument checks -------------------------------------------------------

def test_wrappers_reject_bad_arguments():
    rmsnorm, rope, swiglu = kernels()
    f32 = np.float32
    x, w, r = np.ones((2, 3, 4), f32), np.ones(4, f32), np.ones((2, 3), f32)
    with pytest.raises(TypeError, match=r"rmsnorm_forward: out must have dtype float32, got float64"):
        rmsnorm.rmsnorm_forward(np.ones((2, 3, 4)), r, x, w)
    with pytest.raises(ValueError, match=r"rmsnorm_forward: weight must have shape \(4,\), got \(5,\)"):
        rmsnorm.rmsnorm_forward(np.empty_like(x), r, x, np.ones(5, f32))
    with pytest.raises(ValueError, match=r"rmsnorm_backward: rstd must have shape \(2, 3\), got \(6,\)"):
        rmsnorm.rmsnorm_backward(np.empty_like(x), np.zeros(4, f32), x, x, w, np.ones(6, f32))
    with pytest.raises(ValueError, match=r"rmsnorm_forward: inp must be C-contiguous"):
        rmsnorm.rmsnorm_forward(np.empty((2, 4, 3), f32), r[:, :], np.ones((2, 4, 3), f32).transpose(0, 2, 1), w)
    with pytest.raises(TypeError, match=r"rmsnorm_forward: weight must be a numpy.ndarray"):
        rmsnorm.rmsnorm_forward(np.empty_like(x), r, x, [1.0, 1.0, 1.0, 1.0])

    cos, sin = cpu_rope.rope_frequencies(8, 4)
    q = np.ones((1, 4, 32), f32)  # NH=2, NKV=1: (2+2)*8 = 32
    with pytest.raises(ValueError, match=r"rope_forward: inp last axis must be \(NH\+2\*NKV\)\*hs = 5\*hs"):
        rope.rope_forward(np.empty((1, 4, 33), f32), np.ones((1, 4, 33), f32), cos, sin, 3, 1)
    with pytest.raises(ValueError, match=r"rope_forward: cos must have shape \(>= T, hs/2\) = \(>= 4, 4\), got \(4, 3\)"):
        rope.rope_forward(np.empty_like(q), q, np.ones((4, 3), f32), sin, 2, 1)
    with pytest.raises(ValueError, match=r"rope_backward: sin must have shape \(>= T, hs/2\) = \(>= 5, 4\)"):
        rope.rope_backward(np.empty((1, 5, 32), f32), np.ones((1, 5, 32), f32), np.ones((9, 4), f32), sin, 2, 1)
    with pytest.raises(TypeError, match=r"rope_forward: cos must have dtype float32, got float64"):
        rope.rope_forward(np.empty_like(q), q, cos.astype(np.float64), sin, 2, 1)
    with pytest.raises(ValueError, match=r"rope_forward: num_heads and num_kv_heads must be >= 1"):
        rope.rope_forward(np.empty_like(q), q, cos, sin, 2, 0)
    with pytest.raises(ValueError, match=r"rope_backward: dout must be 3-D"):
        rope.rope_backward(np.empty((4, 32), f32), np.ones((4, 32), f32), cos, sin, 2, 1)
    with pytest.raises(ValueError, match=r"rope_backward: dinp must have shape \(1, 4, 32\)"):
        rope.rope_backward(np.empty((1, 4, 16), f32), q, cos, sin, 2, 1)

    g = np.ones((2, 6), f32)
    with pytest.raises(ValueError, match=r"swiglu_forward: out must have shape \(2, 3\), got \(2, 6\)"):
        swiglu.swiglu_forward(np.empty((2, 6), f32), g)
    with pytest.raises(ValueError, match=r"geglu_forward: inp must be \(\.\.\., 2\*H\)"):
        swiglu.geglu_forward(np.empty((2, 2), f32), np.ones((2, 5), f32))
    with pytest.raises(ValueError, match=r"geglu_backward: dinp must have shape \(2, 6\), got \(2, 3\)"):
        swiglu.geglu_backward(np.empty((2, 3), f32), np.ones((2, 3), f32), g)
    with pytest.raises(TypeError, match=r"swiglu_backward: dout must have dtype float32, got int32"):
        swiglu.swiglu_backward(np.empty_like(g), np.ones((2, 3), np.int32), g)

    # bf16 (uint16) activations: every floatX argument must match inp; stats/tables stay fp32
    xb, wb = np.ones((2, 3, 4), np.uint16), np.ones(4, np.uint16)
    with pytest.raises(TypeError, match=r"rmsnorm_forward: weight must have dtype uint16, got float32"):
        rmsnorm.rmsnorm_forward(np.empty_like(xb), r, xb, w)
    with pytest.raises(TypeError, match=r"rmsnorm_forward: rstd must have dtype float32, got uint16"):
        rmsnorm.rmsnorm_forward(np.empty_like(xb), np.ones((2, 3), np.uint16), xb, wb)
    with pytest.raises(TypeError, match=r"rope_forward: cos must have dtype float32, got uint16"):
        rope.rope_forward(np.empty(q.shape, np.uint16), q.astype(np.uint16), cos.astype(np.uint16), sin, 2, 1)
    with pytest.raises(TypeError, match=r"geglu_forward: inp must have dtype float32 \(fp32\) or uint16"):
        swiglu.geglu_forward(np.empty((2, 3)), np.ones((2, 6)))
