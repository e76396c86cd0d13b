"""The residual adds fused into the layernorm kernels (kernels/layernorm.cu):

  residual_layernorm_forward(residual_out, ln_out, mean, rstd, inp1, inp2, weight, bias)
      = residual_forward(residual_out, inp1, inp2) + layernorm_forward(ln_out, ..., residual_out, ...)
  layernorm_backward_add(dres, dweight, dbias, dout, inp, weight, mean, rstd)
      = layernorm_backward(dtmp, ...) + residual_forward(dres, dres, dtmp), one rounding

each against the NumPy oracle (llmcu/cpu/layernorm.py and residual.py) and against the
two separate kernel calls, fp32 and bf16, on the scalar path (C = 13; C = 100 in bf16,
100 % 8 != 0; a misaligned array) and the 16-byte path (C = 768, C = 100 in fp32); the
argument errors; and the GPT-2 step on the kernels with the fused ops against the same
step without them (llmcu/cpu/gpt2.py falls back to the separate calls when the ops
namespace lacks the two). "emu" always, "cuda" on a GPU (tests/helpers.py).
Rows: B*T = 2*7 = 14, so the last block of 8 warps is partly idle.

Tolerances (as tests/test_kernels_bf16.py, whose module doc derives them): fp32 outputs
within 1e-5 of their scale (the kernels sum rows in their own order, NumPy pairwise:
~1e-6 relative at C ~ 1000); a bf16 output computed in fp32 and rounded once within
rtol = U + 1e-5 (U = 2^-8, half a bf16 ulp), atol = 1e-5 * scale. Where the kernel's
arithmetic is the separate calls' exactly, the comparison is bit for bit.
"""

import functools

import numpy as np
import pytest

from helpers import BF16_NAN, KERNEL_BACKENDS, Device, assert_close
from test_kernels_bf16 import rand_x, value
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu import layernorm as cpu_layernorm
from llmcu.cpu.gpt2 import init_parameters
from llmcu.formats import bf16_bits_to_float32 as to_f32
from llmcu.formats import float32_to_bf16_bits as to_bits

U = 2.0 ** -8  # bf16 unit roundoff
F32 = 1e-5
B, T = 2, 7
FP32, BF16 = np.float32, np.uint16
# (dtype, C, version): version 1 scalar loads, 2 16-byte loads (C % (16 // itemsize) == 0)
FORWARD_CASES = [
    pytest.param(FP32, 13, 1, id="fp32-C13-v1"), pytest.param(FP32, 100, 1, id="fp32-C100-v1"),
    pytest.param(FP32, 100, 2, id="fp32-C100-v2"), pytest.param(FP32, 768, 2, id="fp32-C768-v2"),
    pytest.param(BF16, 13, 1, id="bf16-C13-v1"), pytest.param(BF16, 100, 1, id="bf16-C100-v1"),
    pytest.param(BF16, 768, 1, id="bf16-C768-v1"), pytest.param(BF16, 768, 2, id="bf16-C768-v2"),
]
# (dtype, C, aligned): the backward picks 16-byte loads itself when C and the addresses allow
BACKWARD_CASES = [
    pytest.param(FP32, 13, True, id="fp32-C13"), pytest.param(FP32, 100, True, id="fp32-C100-wide"),
    pytest.param(FP32, 768, True, id="fp32-C768-wide"), pytest.param(FP32, 768, False, id="fp32-C768-misaligned"),
    pytest.param(BF16, 13, True, id="bf16-C13"), pytest.param(BF16, 100, True, id="bf16-C100"),
    pytest.param(BF16, 768, True, id="bf16-C768-wide"), pytest.param(BF16, 768, False, id="bf16-C768-misaligned"),
]


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def rounded(x, dtype):
    """fp32 values as a floatX kernel output holds them (bf16: round to nearest even)."""
    return to_f32(to_bits(x)) if dtype == BF16 else x


def tol(dtype, ref):
    scale = float(np.abs(ref).max()) or 1.0
    return dict(atol=F32 * scale, rtol=(U + F32) if dtype == BF16 else F32)


def misaligned(dev, a):
    """A copy of `a` whose first element sits 4 bytes past a 16-byte boundary (fp32: one
    element; bf16: two), so the kernels must take their scalar path."""
    skip = 4 // a.itemsize
    buf = dev.xp.zeros(a.size + skip, dtype=a.dtype)
    view = buf[skip:].reshape(a.shape)
    view[...] = dev.put(a)
    return view


def _wrappers():
    from llmcu.cuda import layernorm, residual
    return layernorm, residual


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype,C,version", FORWARD_CASES)
def test_residual_layernorm_forward(dev, dtype, C, version):
    ln, res = _wrappers()
    rng = np.random.default_rng(C + version)
    (a, a_f), (b, b_f) = rand_x(rng, dtype, B, T, C, scale=2.0, shift=0.5), rand_x(rng, dtype, B, T, C)
    (w, w_f), (bias, bias_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, C)
    args = [dev.put(x) for x in (a, b, w, bias)]
    r, out = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T, C), dtype)
    mean, rstd = dev.poisoned((B, T)), dev.poisoned((B, T))
    ln.residual_layernorm_forward(r, out, mean, rstd, *args, version=version)

    # The oracle: residual in fp32, rounded once to floatX; layernorm of the rounded values.
    r_ref = rounded(a_f + b_f, dtype)
    out_ref, mean_ref, rstd_ref = (np.empty(s, np.float32) for s in ((B, T, C), (B, T), (B, T)))
    cpu_layernorm.layernorm_forward(out_ref, mean_ref, rstd_ref, r_ref, w_f, bias_f)
    # one fp32 add of two floatX values and one rounding, as the oracle's: bit for bit
    np.testing.assert_array_equal(value(dev.get(r)), r_ref, err_msg="residual_out")
    assert_close("mean", dev.get(mean), mean_ref, atol=F32 * float(np.abs(mean_ref).max()), rtol=F32)
    assert_close("rstd", dev.get(rstd), rstd_ref, atol=F32 * float(np.abs(rstd_ref).max()), rtol=F32)
    assert_close("ln_out", value(dev.get(out)), out_ref, **tol(dtype, out_ref))

    # The two separate kernels (layernorm_forward of the same version): the same bits.
    r2, out2 = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T, C), dtype)
    mean2, rstd2 = dev.poisoned((B, T)), dev.poisoned((B, T))
    res.residual_forward(r2, args[0], args[1])
    ln.layernorm_forward(out2, mean2, rstd2, r2, args[2], args[3], version=version)
    for name, x, y in (("residual_out", r, r2), ("ln_out", out, out2), ("mean", mean, mean2),
                       ("rstd", rstd, rstd2)):
        np.testing.assert_array_equal(dev.get(x), dev.get(y),
                                      err_msg=f"{name}: fused != residual_forward + layernorm_forward")


def test_residual_layernorm_forward_auto_picks_the_16_byte_path(dev, monkeypatch):
    """version="auto" (what the GPT-2 model uses) launches the wide path exactly where
    C % (16 // itemsize) == 0 and the arrays are aligned."""
    ln, _ = _wrappers()
    from llmcu.cuda import runtime
    be = runtime.get_backend(dev.name)
    wide_flags = []
    launch = type(be).launch

    def spy(self, stem, kernel, grid, block, args, *rest, **kw):
        if kernel == "residual_layernorm_forward_kernel1":
            wide_flags.append(int(args[-1]))
        return launch(self, stem, kernel, grid, block, args, *rest, **kw)
    monkeypatch.setattr(type(be), "launch", spy)
    rng = np.random.default_rng(3)
    for C, misalign, want in ((768, False, 1), (13, False, 0), (768, True, 0)):
        inp = [rand_x(rng, FP32, B, T, C)[0] for _ in range(2)] + [rand_x(rng, FP32, C)[0] for _ in range(2)]
        inp = [dev.put(x) for x in inp]
        if misalign:
            inp[0] = misaligned(dev, dev.get(inp[0]))
        outs = [dev.poisoned((B, T, C)), dev.poisoned((B, T, C)), dev.poisoned((B, T)), dev.poisoned((B, T))]
        ln.residual_layernorm_forward(*outs, *inp)
        assert wide_flags[-1] == want, (C, misalign, wide_flags)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype,C,aligned", BACKWARD_CASES)
def test_layernorm_backward_add(dev, dtype, C, aligned):
    ln, res = _wrappers()
    rng = np.random.default_rng(100 + C)
    x, x_f = rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0)
    (w, w_f), (dout, dout_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, B, T, C)
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    cpu_layernorm.layernorm_forward(np.empty((B, T, C), np.float32), mean, rstd, x_f, w_f, w_f)
    # dres and the parameter gradients start non-zero: the op adds into all three
    (dres0, dres0_f), (dw0, dw0_f), (db0, db0_f) = (rand_x(rng, dtype, *s) for s in ((B, T, C), (C,), (C,)))
    put = (lambda a: dev.put(a)) if aligned else (lambda a: misaligned(dev, a))
    dres, dw, db = put(dres0), dev.put(dw0), dev.put(db0)
    ins = dict(dout=put(dout), inp=put(x), weight=dev.put(w), mean=dev.put(mean), rstd=dev.put(rstd))
    ln.layernorm_backward_add(dres, dw, db, *ins.values())

    dinp_ref, dw_ref, db_ref = np.empty((B, T, C), np.float32), dw0_f.copy(), db0_f.copy()
    cpu_layernorm.layernorm_backward(dinp_ref, dw_ref, db_ref, dout_f, x_f, w_f, mean, rstd)
    dres_ref = dres0_f + dinp_ref
    # dres: fp32 reductions, dres0 + dinp in fp32, one rounding. Rounding dinp first (the
    # separate calls in bf16) errs by up to U |dinp|, which exceeds this bound wherever
    # |dres0 + dinp| << |dinp| (random signs: such elements occur at these sizes).
    assert_close("dres", value(dev.get(dres)), dres_ref, **tol(dtype, dres_ref))
    assert_close("dweight", value(dev.get(dw)), dw_ref, **tol(dtype, dw_ref))
    assert_close("dbias", value(dev.get(db)), db_ref, **tol(dtype, db_ref))

    # The separate calls: dweight/dbias the same kernel's sums, bit for bit; dres too in
    # fp32 (from_float is exact there, and dres0 + dinp is the same fp32 add).
    dtmp, dres2, dw2, db2 = dev.poisoned((B, T, C), dtype), put(dres0), dev.put(dw0), dev.put(db0)
    ln.layernorm_backward(dtmp, dw2, db2, *ins.values())
    res.residual_forward(dres2, dres2, dtmp)
    np.testing.assert_array_equal(dev.get(dw), dev.get(dw2), err_msg="dweight: fused != separate")
    np.testing.assert_array_equal(dev.get(db), dev.get(db2), err_msg="dbias: fused != separate")
    if dtype == FP32:
        np.testing.assert_array_equal(dev.get(dres), dev.get(dres2), err_msg="dres: fused != separate")
    else:  # one rounding fewer: within the separate path's extra rounding of dtmp (U |dtmp|)
        extra = U * np.abs(value(dev.get(dtmp)))
        gap = np.abs(value(dev.get(dres)) - value(dev.get(dres2)))
        # both results are bf16 and each is within half an ulp (U |.|) of its own exact sum
        limit = extra + U * (np.abs(value(dev.get(dres))) + np.abs(value(dev.get(dres2))))
        assert np.all(gap <= limit), float((gap - limit).max())


# ----------------------------------------------------------------------------- errors

def _forward_args(C=8, dtype=FP32):
    rng = np.random.default_rng(0)
    nan = np.nan if dtype == FP32 else BF16_NAN
    return dict(residual_out=np.full((B, T, C), nan, dtype), ln_out=np.full((B, T, C), nan, dtype),
                mean=np.zeros((B, T), np.float32), rstd=np.zeros((B, T), np.float32),
                inp1=rand_x(rng, dtype, B, T, C)[0], inp2=rand_x(rng, dtype, B, T, C)[0],
                weight=rand_x(rng, dtype, C)[0], bias=rand_x(rng, dtype, C)[0])


def _backward_args(C=8, dtype=FP32):
    rng = np.random.default_rng(0)
    return dict(dres=rand_x(rng, dtype, B, T, C)[0], dweight=np.zeros(C, dtype), dbias=np.zeros(C, dtype),
                dout=rand_x(rng, dtype, B, T, C)[0], inp=rand_x(rng, dtype, B, T, C)[0],
                weight=rand_x(rng, dtype, C)[0], mean=np.zeros((B, T), np.float32),
                rstd=np.ones((B, T), np.float32))


@pytest.mark.parametrize("change,exc,message", [
    (dict(weight=np.ones(7, np.float32)), ValueError,
     r"residual_layernorm_forward: weight must have shape \(8,\), got \(7,\)"),
    (dict(inp2=np.ones((B, T, 8), np.float64)), TypeError,
     r"residual_layernorm_forward: inp2 must have dtype float32, got float64"),
    (dict(mean=np.zeros((B, T), np.uint16)), TypeError,
     r"residual_layernorm_forward: mean must have dtype float32, got uint16"),
    (dict(ln_out=np.zeros((B, T, 8), np.float32)[:, :, ::-1]), ValueError,
     r"residual_layernorm_forward: ln_out must be C-contiguous"),
    (dict(inp1=[[1.0]]), TypeError, r"expected a numpy.ndarray \(emu\) or cupy.ndarray"),
])
def test_residual_layernorm_forward_rejects_bad_arguments(change, exc, message):
    ln, _ = _wrappers()
    args = {**_forward_args(), **change}
    with pytest.raises(exc, match=message):
        ln.residual_layernorm_forward(**args)


def test_residual_layernorm_forward_rejects_aliasing_and_bad_versions():
    ln, _ = _wrappers()
    args = _forward_args()
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: residual_out must not overlap ln_out"):
        ln.residual_layernorm_forward(**{**args, "ln_out": args["residual_out"]})
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: residual_out must not overlap inp1"):
        ln.residual_layernorm_forward(**{**args, "residual_out": args["inp1"]})
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: ln_out must not overlap inp2"):
        ln.residual_layernorm_forward(**{**args, "ln_out": args["inp2"]})
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: version must be one of \(1, 2\) "
                                         r"or 'auto', got 0"):
        ln.residual_layernorm_forward(**args, version=0)
    odd = _forward_args(C=13)
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: the 16-byte-load version needs "
                                         r"a multiple of 4 channels \(C\) \(float32\), got 13"):
        ln.residual_layernorm_forward(**odd, version=2)
    assert np.isnan(odd["residual_out"]).all() and np.isnan(args["ln_out"]).all()  # nothing launched


@pytest.mark.parametrize("change,exc,message", [
    (dict(dres=np.zeros((B, T, 9), np.float32)), ValueError,
     r"layernorm_backward_add: dres must have shape \(2, 7, 8\), got \(2, 7, 9\)"),
    (dict(dweight=np.zeros(8, np.uint16)), TypeError,
     r"layernorm_backward_add: dweight must have dtype float32, got uint16"),
    (dict(rstd=np.ones((B, T + 1), np.float32)), ValueError,
     r"layernorm_backward_add: rstd must have shape \(2, 7\), got \(2, 8\)"),
])
def test_layernorm_backward_add_rejects_bad_arguments(change, exc, message):
    ln, _ = _wrappers()
    with pytest.raises(exc, match=message):
        ln.layernorm_backward_add(**{**_backward_args(), **change})


def test_layernorm_backward_add_refuses_dres_aliasing_its_inputs():
    """dres += dinp while dout/inp are still being read (and __restrict__ in the kernel)."""
    ln, _ = _wrappers()
    args = _backward_args()
    before = args["dres"].copy()
    with pytest.raises(ValueError, match=r"layernorm_backward_add: dres must not overlap dout"):
        ln.layernorm_backward_add(**{**args, "dout": args["dres"]})
    with pytest.raises(ValueError, match=r"layernorm_backward_add: dres must not overlap inp"):
        ln.layernorm_backward_add(**{**args, "inp": args["dres"]})
    buf = np.zeros(2 * B * T * 8, np.float32)  # overlapping by half, not the same array
    n = B * T * 8
    with pytest.raises(ValueError, match=r"dres must not overlap dout"):
        ln.layernorm_backward_add(**{**args, "dres": buf[:n].reshape(B, T, 8),
                                     "dout": buf[n // 2:n // 2 + n].reshape(B, T, 8)})
    np.testing.assert_array_equal(args["dres"], before)


# ----------------------------------------------------------------------------- GPT-2

TINY = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=32)
FUSED = ("residual_layernorm_forward", "layernorm_backward_add")


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _step(device, dtype, monkeypatch, ops_change):
    """One training step (forward, backward, AdamW) of the kernel GPT-2 with KERNEL_OPS
    changed by ops_change(KERNEL_OPS, monkeypatch); everything changed is put back."""
    from llmcu.cuda import gpt2 as kgpt2
    rng = np.random.default_rng(9)
    x, y = (rng.integers(0, TINY.vocab_size, (2, 8)) for _ in range(2))
    with monkeypatch.context() as m:
        ops_change(kgpt2.KERNEL_OPS, m)
        model = kgpt2.GPT2(TINY, init_parameters(TINY, seed=5), device=device, dtype=dtype)
        loss = model.forward(x, y)
        acts = {n: value(_host(getattr(model.acts, n))).copy()
                for n in ("residual2", "residual3", "ln1", "ln2", "lnf", "ln1_rstd", "lnf_rstd")}
        model.zero_grad()
        model.backward()
        grads = parameter_views(TINY, value(_host(model.grads)).copy())
        model.update(1e-3, 1, weight_decay=0.1, grad_clip=1.0)
        params = value(_host(model.params)).copy()
    return loss, acts, grads, params


def _unfused(ops, m):
    for name in FUSED:
        m.delattr(ops, name)


def _counting(calls):
    def change(ops, m):
        for name in FUSED + ("residual_forward", "layernorm_forward", "layernorm_backward"):
            fn = getattr(ops, name, None)
            if fn is None:  # removed by _unfused
                continue
            m.setattr(ops, name, functools.partial(lambda fn, name, *a, **k: (calls.append(name), fn(*a, **k))[1],
                                                   fn, name))
    return change


@pytest.mark.parametrize("device", KERNEL_BACKENDS)
def test_gpt2_uses_the_fused_ops(device, monkeypatch):
    """The kernel model's step calls the fused ops and no residual_forward at all: per
    layer two fused forwards and two fused backwards; one layernorm_forward (layer 0's ln1,
    of the embeddings) and one layernorm_backward (lnf's, which overwrites dres)."""
    calls = []
    _step(device, "fp32", monkeypatch, _counting(calls))
    L = TINY.num_layers
    assert {n: calls.count(n) for n in set(calls)} == {
        "residual_layernorm_forward": 2 * L, "layernorm_backward_add": 2 * L,
        "layernorm_forward": 1, "layernorm_backward": 1}
    unfused = []
    _step(device, "fp32", monkeypatch, lambda ops, m: (_unfused(ops, m), _counting(unfused)(ops, m)))
    assert {n: unfused.count(n) for n in set(unfused)} == {
        "residual_forward": 4 * L, "layernorm_forward": 2 * L + 1, "layernorm_backward": 2 * L + 1}


@pytest.mark.parametrize("device", KERNEL_BACKENDS)
def test_gpt2_fp32_step_fused_is_bit_identical_with_version_1(device, monkeypatch):
    """With the fused forward pinned to version 1 (layernorm_forward's default, which the
    unfused model runs) the fp32 step is the unfused step bit for bit: same activations,
    gradients, parameters. This checks the restructured layer sequence (each residual add
    followed by its layernorm, ln1 of layer l+1 at the end of layer l) as well."""
    from llmcu.cuda.layernorm import residual_layernorm_forward
    pinned = functools.partial(residual_layernorm_forward, version=1)
    fused = _step(device, "fp32", monkeypatch,
                  lambda ops, m: m.setattr(ops, "residual_layernorm_forward", pinned))
    plain = _step(device, "fp32", monkeypatch, _unfused)
    assert fused[0] == plain[0]
    for name in fused[1]:
        np.testing.assert_array_equal(fused[1][name], plain[1][name], err_msg=name)
    for name in fused[2]:
        np.testing.assert_array_equal(fused[2][name], plain[2][name], err_msg=f"grad {name}")
    np.testing.assert_array_equal(fused[3], plain[3], err_msg="params after the update")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("device", KERNEL_BACKENDS)
def test_gpt2_step_fused_matches_unfused(device, dtype, monkeypatch):
    """The model as it runs (fused forward version "auto": 16-byte loads at C = 32) against
    the step without the two fused ops.

    fp32: the only difference is the forward's row-sum order (layernorm_forward_kernel2's
    against kernel1's), ~1e-7 relative in mean/rstd, carried through two layers: activations
    and each gradient tensor within 1e-5 of its max |value| (test_kernels.py's fp32 bound
    against the oracle), loss within 1e-6 relative.
    bf16: the backward also drops one rounding per add: the separate path rounds the
    layernorm input gradient to bf16 (<= U of its size) before adding it. Those differences
    (4 adds here), and bf16 output flips from the forward's fp32-ulp differences (one bf16
    ulp, 2U relative, where a value sits at a rounding boundary), pass through the rest of
    the backward with gains ~1 at init (the residual stream carries the gradient); each
    gradient is then rounded once more. Bound: 8U of each tensor's max (the bound
    test_bf16_training.py allows bf16 against fp32, where every stage is rounded); a
    missing or doubled add is an error of order 1."""
    fused = _step(device, dtype, monkeypatch, lambda ops, m: None)
    plain = _step(device, dtype, monkeypatch, _unfused)
    rel = 1e-5 if dtype == "fp32" else 8 * U
    assert abs(fused[0] - plain[0]) <= (1e-6 if dtype == "fp32" else 2 * U) * abs(plain[0]), (fused[0], plain[0])
    worst = {}
    for kind, got, want in (("act", fused[1], plain[1]), ("grad", fused[2], plain[2])):
        for name in want:
            scale = float(np.abs(want[name]).max())
            assert scale > 0, name
            worst[f"{kind} {name}"] = float(np.abs(got[name] - want[name]).max()) / scale
    print(f"{dtype}: max |fused - unfused| / max |unfused| per tensor:",
          {k: f"{v:.2e}" for k, v in worst.items()})
    bad = {k: v for k, v in worst.items() if not v <= rel}
    assert not bad, f"off by more than {rel:.2e} of their max: {bad}"
    assert_close("params after the update", fused[3], plain[3], atol=rel * float(np.abs(plain[3]).max()), rtol=0)


def test_step_breakdown_napkin_bytes_for_the_fused_ops():
    """benchmarks/bench_step_breakdown.py's napkin(): each floatX (B,T,C) array the op
    reads or writes once (dres read and written: twice), weight/bias/mean/rstd once,
    dweight/dbias read and written; counted here from the shapes, not from napkin()."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_step_breakdown as bench
    C = 24
    for dtype, item in ((FP32, 4), (BF16, 2)):
        fwd = _forward_args(C, dtype)
        assert bench.napkin("residual_layernorm_forward", list(fwd.values()), {}) == (
            "bytes", 4 * B * T * C * item + 2 * C * item + 2 * B * T * 4)
        bwd = _backward_args(C, dtype)
        assert bench.napkin("layernorm_backward_add", list(bwd.values()), {}) == (
            "bytes", 4 * B * T * C * item + 5 * C * item + 2 * B * T * 4)
