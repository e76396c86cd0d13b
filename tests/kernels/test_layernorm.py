"""LayerNorm's product kernels (kernels/layernorm.cu, llmcu/cuda/layernorm.py) against the
NumPy oracle (llmcu/cpu/layernorm.py), fp32 and bf16:

- layernorm_forward: layernorm_forward_kernel1 (one warp per row, scalar loads);
- residual_layernorm_forward: residual_layernorm_forward_kernel1, residual_forward +
  layernorm_forward in one kernel, with a 16-byte (`wide`) path where C is a multiple of
  the packet (4 fp32, 8 bf16) and the arrays are aligned, else the scalar path, which
  must equal the two separate product calls bit for bit;
- layernorm_backward: the two-pass deterministic backward (layernorm_backward_kernel2,
  dinp and per-block fp32 partial sums, then layernorm_param_backward_reduce_kernel2),
  wide or scalar by C and alignment; layernorm_backward_add: the same kernels adding the
  input gradient into dres (one rounding), against layernorm_backward + residual_forward.

The path a case takes (the kernels' `wide` argument) is read from the launches, so each
case tests the path it names. Inputs are random, outputs NaN-poisoned, parameter
gradients start random (+=), and under the emulator the wrappers NaN-fill their scratch
buffers, so a partial sum pass 1 forgets poisons the result. Rows: B*T = 14 leaves the
last block of 8 warps partly idle.

Tolerances (tests/helpers.py derives them): an fp32 output within F32 = 1e-5 of its
scale (the kernels sum a row in 32 strided partial sums and a butterfly, NumPy pairwise:
~1e-6 relative at C ~ 1000); a bf16 output computed in fp32 and rounded once within
rtol = 2^-8 + 1e-5 (out_tol); mean and rstd are fp32 statistics of exact inputs in both
dtypes (F32). A parameter gradient is start + a sum of N row terms added in a tree:
helpers.sum_tol's bound (Higham), + one bf16 rounding. Where the kernel's arithmetic is
another call's exactly, the comparison is bit for bit.
"""

import numpy as np
import pytest

from helpers import (BF16, F32, FP32, U, assert_close, assert_same_bits, misaligned, out_tol, rand_x,
                     rounded, sum_tol, value)
from llmcu.cpu import layernorm as cpu_layernorm


def _kernels():
    from llmcu.cuda import layernorm, residual
    return layernorm, residual


def _stat_tol(ref):
    return dict(atol=F32 * float(np.abs(ref).max()), rtol=F32)


def _oracle_forward(x_f, w_f, b_f):
    shape = x_f.shape
    out, mean, rstd = (np.empty(s, np.float32) for s in (shape, shape[:-1], shape[:-1]))
    cpu_layernorm.layernorm_forward(out, mean, rstd, x_f, w_f, b_f)
    return out, mean, rstd


# ----------------------------------------------------------------------------- forward

# (dtype, B, T, C): one path (scalar loads, any C); C = 1023 (not a multiple of 32 or 4),
# T = 1 (a single row per batch entry). Tolerances: out_tol of the dtype, F32 for mean/rstd.
@pytest.mark.parametrize("dtype,B,T,C", [pytest.param(FP32, 2, 7, 1023, id="fp32-C1023"),
                                         pytest.param(BF16, 3, 1, 768, id="bf16-T1")])
def test_layernorm_forward(dev, dtype, B, T, C):
    ln, _ = _kernels()
    rng = np.random.default_rng(C)
    (x, x_f), (w, w_f), (b, b_f) = (rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0),
                                    rand_x(rng, dtype, C), rand_x(rng, dtype, C))
    out, mean, rstd = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T)), dev.poisoned((B, T))
    ln.layernorm_forward(out, mean, rstd, dev.put(x), dev.put(w), dev.put(b))
    rout, rmean, rrstd = _oracle_forward(x_f, w_f, b_f)
    assert_close("layernorm mean", dev.get(mean), rmean, **_stat_tol(rmean))
    assert_close("layernorm rstd", dev.get(rstd), rrstd, **_stat_tol(rrstd))
    assert_close("layernorm out", value(dev.get(out)), rout, **out_tol(dtype, rout))


# (dtype, C, how, wide): C = 13 and bf16 C = 100 (100 % 8 != 0) take the scalar path;
# fp32 C = 100 (100 % 4 == 0) and C = 768 the 16-byte path unless inp1 is misaligned.
# Tolerances: the residual bit for bit (one fp32 add, one rounding, as the oracle's, whose
# rounded residual feeds its layernorm); mean/rstd F32; ln_out out_tol of the dtype.
FUSED_FORWARD_CASES = [
    pytest.param(FP32, 13, "aligned", False, id="fp32-scalar-C13"),
    pytest.param(FP32, 100, "aligned", True, id="fp32-wide-C100"),
    pytest.param(FP32, 768, "misaligned", False, id="fp32-scalar-misaligned"),
    pytest.param(BF16, 100, "aligned", False, id="bf16-scalar-C100"),
    pytest.param(BF16, 768, "aligned", True, id="bf16-wide-C768"),
]


@pytest.mark.parametrize("dtype,C,how,wide", FUSED_FORWARD_CASES)
def test_residual_layernorm_forward(dev, launch_args, dtype, C, how, wide):
    ln, res = _kernels()
    B, T = 2, 7
    rng = np.random.default_rng(C + int(wide))
    (a, a_f), (b, b_f) = rand_x(rng, dtype, B, T, C, scale=2.0, shift=0.5), rand_x(rng, dtype, B, T, C)
    (w, w_f), (bias, bias_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, C)
    ins = [misaligned(dev, a) if how == "misaligned" else dev.put(a)] + [dev.put(x) for x in (b, w, bias)]
    r, out = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T, C), dtype)
    mean, rstd = dev.poisoned((B, T)), dev.poisoned((B, T))
    ln.residual_layernorm_forward(r, out, mean, rstd, *ins)
    assert [(launch.kernel, int(launch.args[-1])) for launch in launch_args] == [
        ("residual_layernorm_forward_kernel1", int(wide))]

    r_ref = rounded(a_f + b_f, dtype)  # the oracle's residual as dtype holds it
    rout, rmean, rrstd = _oracle_forward(r_ref, w_f, bias_f)
    assert_same_bits("residual_out", value(dev.get(r)), r_ref)
    assert_close("mean", dev.get(mean), rmean, **_stat_tol(rmean))
    assert_close("rstd", dev.get(rstd), rrstd, **_stat_tol(rrstd))
    assert_close("ln_out", value(dev.get(out)), rout, **out_tol(dtype, rout))
    if wide:  # the 16-byte path sums rows in another order than layernorm_forward_kernel1
        return
    # The scalar path is residual_forward + layernorm_forward (kernel1), bit for bit.
    r2, out2 = dev.poisoned((B, T, C), dtype), dev.poisoned((B, T, C), dtype)
    mean2, rstd2 = dev.poisoned((B, T)), dev.poisoned((B, T))
    res.residual_forward(r2, ins[0], ins[1])
    ln.layernorm_forward(out2, mean2, rstd2, r2, ins[2], ins[3])
    for name, x, y in (("residual_out", r, r2), ("ln_out", out, out2), ("mean", mean, mean2),
                       ("rstd", rstd, rstd2)):
        assert_same_bits(f"{name}: fused != residual_forward + layernorm_forward", dev.get(x), dev.get(y))


# ----------------------------------------------------------------------------- backward

def _backward_case(rng, dtype, B, T, C):
    x, x_f = rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0)
    (w, w_f), (dout, dout_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, B, T, C)
    _, mean, rstd = _oracle_forward(x_f, w_f, w_f)
    (dw0, dw0_f), (db0, db0_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, C)
    return dict(x=x, x_f=x_f, w=w, w_f=w_f, dout=dout, dout_f=dout_f, mean=mean, rstd=rstd,
                dw0=dw0, dw0_f=dw0_f, db0=db0, db0_f=db0_f)


def _oracle_backward(c):
    rdinp, rdw, rdb = np.empty(c["x"].shape, np.float32), c["dw0_f"].copy(), c["db0_f"].copy()
    cpu_layernorm.layernorm_backward(rdinp, rdw, rdb, c["dout_f"], c["x_f"], c["w_f"], c["mean"], c["rstd"])
    return rdinp, rdw, rdb


def _param_tols(dtype, c):
    """helpers.sum_tol for dweight (terms dout * n) and dbias (terms dout), per column."""
    C = c["x"].shape[-1]
    rows = c["dout_f"].reshape(-1, C)
    norm = ((c["x_f"] - c["mean"][..., None]) * c["rstd"][..., None]).reshape(-1, C)
    return (sum_tol(dtype, c["dw0_f"], rows * norm, rows.shape[0]),
            sum_tol(dtype, c["db0_f"], rows, rows.shape[0]))


def _run_backward(dev, c, dtype, put=None):
    ln, _ = _kernels()
    put = put or dev.put
    dinp, dw, db = dev.poisoned(c["x"].shape, dtype), dev.put(c["dw0"]), dev.put(c["db0"])
    ln.layernorm_backward(dinp, dw, db, put(c["dout"]), dev.put(c["x"]), dev.put(c["w"]),
                          dev.put(c["mean"]), dev.put(c["rstd"]))
    return dev.get(dinp), dev.get(dw), dev.get(db)


# (dtype, B, T, C, how, blocks, wide): C = 768 (GPT-2's width) 16-byte in both dtypes unless
# dout is misaligned; C = 1023, bf16 C = 36 (36 % 8 != 0) and C = 1 scalar; (5, 67, 40) with the
# pass-1 grid capped at 3 blocks: 24 warps grid-stride over 335 rows. Tolerances: dinp
# out_tol of the dtype; dweight/dbias helpers.sum_tol (+ one bf16 rounding).
BACKWARD_CASES = [
    pytest.param(FP32, 2, 7, 768, "aligned", None, True, id="fp32-wide-C768"),
    pytest.param(FP32, 2, 7, 1023, "aligned", None, False, id="fp32-scalar-C1023"),
    pytest.param(FP32, 2, 5, 64, "misaligned", None, False, id="fp32-scalar-misaligned"),
    pytest.param(FP32, 5, 67, 40, "aligned", 3, True, id="fp32-wide-3-blocks"),
    pytest.param(BF16, 2, 7, 768, "aligned", None, True, id="bf16-wide-C768"),
    pytest.param(BF16, 1, 3, 36, "aligned", None, False, id="bf16-scalar-C36"),
    pytest.param(FP32, 2, 3, 1, "aligned", None, False, id="fp32-scalar-C1"),
]


@pytest.mark.parametrize("dtype,B,T,C,how,blocks,wide", BACKWARD_CASES)
def test_layernorm_backward(dev, launch_args, monkeypatch, dtype, B, T, C, how, blocks, wide):
    from llmcu.cuda import runtime
    if blocks is not None:
        monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", blocks)
    c = _backward_case(np.random.default_rng(20 + C), dtype, B, T, C)
    put = (lambda a: misaligned(dev, a)) if how == "misaligned" else None
    dinp, dw, db = _run_backward(dev, c, dtype, put)
    assert [launch.kernel for launch in launch_args] == ["layernorm_backward_kernel2",
                                                         "layernorm_param_backward_reduce_kernel2"]
    assert (int(launch_args[0].args[-2]), int(launch_args[0].args[-1])) == (int(wide), 0)  # (wide, add)
    if blocks is not None:
        assert launch_args[0].grid == (blocks,)
    rdinp, rdw, rdb = _oracle_backward(c)
    dw_tol, db_tol = _param_tols(dtype, c)
    assert_close("layernorm dinp", value(dinp), rdinp, **out_tol(dtype, rdinp))
    assert_close("layernorm dweight", value(dw), rdw, **dw_tol)
    assert_close("layernorm dbias", value(db), rdb, **db_tol)


def test_layernorm_backward_is_deterministic(dev, monkeypatch, emu_order):
    """The two-pass reduction has a fixed order: two runs give the same bits, the second
    (on the emulator) with each block's threads in a random order, so a result that
    depended on which warp got somewhere first would differ. fp32, where any change of
    summation order shows; the pass-1 grid capped at 5 blocks (several rows per warp)."""
    from llmcu.cuda import runtime
    monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", 5)
    c = _backward_case(np.random.default_rng(22), FP32, 4, 33, 96)
    first = _run_backward(dev, c, FP32)
    emu_order("random")
    second = _run_backward(dev, c, FP32)
    for name, a, b in zip(("dinp", "dweight", "dbias"), first, second):
        assert_same_bits(f"layernorm_backward {name}, second run", b, a)


# (dtype, C, how, wide): the scalar path (C = 13; fp32 C = 768 with misaligned arrays) and
# the 16-byte one (bf16 C = 768). Tolerances: against the oracle as test_layernorm_backward
# (dres: dres0 + dinp in fp32, one rounding: out_tol); against the separate calls bit for
# bit where the arithmetic is theirs (below).
BACKWARD_ADD_CASES = [
    pytest.param(FP32, 13, "aligned", False, id="fp32-scalar-C13"),
    pytest.param(FP32, 768, "misaligned", False, id="fp32-scalar-misaligned"),
    pytest.param(BF16, 768, "aligned", True, id="bf16-wide-C768"),
]


@pytest.mark.parametrize("dtype,C,how,wide", BACKWARD_ADD_CASES)
def test_layernorm_backward_add(dev, launch_args, dtype, C, how, wide):
    ln, res = _kernels()
    B, T = 2, 7
    rng = np.random.default_rng(100 + C)
    c = _backward_case(rng, dtype, B, T, C)
    dres0, dres0_f = rand_x(rng, dtype, B, T, C)  # dres starts non-zero: the op adds into it
    put = (lambda a: misaligned(dev, a)) if how == "misaligned" else dev.put
    dres, dw, db = put(dres0), dev.put(c["dw0"]), dev.put(c["db0"])
    ins = (put(c["dout"]), put(c["x"]), dev.put(c["w"]), dev.put(c["mean"]), dev.put(c["rstd"]))
    ln.layernorm_backward_add(dres, dw, db, *ins)
    assert [launch.kernel for launch in launch_args] == ["layernorm_backward_kernel2",
                                                         "layernorm_param_backward_reduce_kernel2"]
    assert (int(launch_args[0].args[-2]), int(launch_args[0].args[-1])) == (int(wide), 1)  # (wide, add)

    rdres, rdw, rdb = dres0_f.copy(), c["dw0_f"].copy(), c["db0_f"].copy()
    cpu_layernorm.layernorm_backward_add(rdres, rdw, rdb, c["dout_f"], c["x_f"], c["w_f"], c["mean"],
                                         c["rstd"])
    dw_tol, db_tol = _param_tols(dtype, c)
    # dres: fp32 reductions, dres0 + dinp in fp32, one rounding. Rounding dinp first (the
    # separate calls in bf16) errs by up to U |dinp|, which exceeds this bound wherever
    # |dres0 + dinp| << |dinp| (random signs: such elements occur at these sizes).
    assert_close("dres", value(dev.get(dres)), rdres, **out_tol(dtype, rdres))
    assert_close("dweight", value(dev.get(dw)), rdw, **dw_tol)
    assert_close("dbias", value(dev.get(db)), rdb, **db_tol)

    # The separate calls: dweight/dbias are the same kernels' sums, bit for bit; dres too in
    # fp32 (dres0 + dinp is residual_forward's fp32 add of the stored dinp).
    dtmp, dres2, dw2, db2 = dev.poisoned((B, T, C), dtype), put(dres0), dev.put(c["dw0"]), dev.put(c["db0"])
    ln.layernorm_backward(dtmp, dw2, db2, *ins)
    res.residual_forward(dres2, dres2, dtmp)
    assert_same_bits("dweight: fused != separate", dev.get(dw), dev.get(dw2))
    assert_same_bits("dbias: fused != separate", dev.get(db), dev.get(db2))
    if dtype == FP32:
        assert_same_bits("dres: fused != separate", dev.get(dres), dev.get(dres2))
    else:  # one rounding fewer: apart by at most the separate path's rounding of dtmp (U |dtmp|)
        # plus each result's own rounding (U |.|)
        got, sep = value(dev.get(dres)), value(dev.get(dres2))
        limit = U * (np.abs(value(dev.get(dtmp))) + np.abs(got) + np.abs(sep))
        assert_close("dres: fused vs separate", np.maximum(np.abs(got - sep) - limit, 0), np.zeros_like(got),
                     atol=0, rtol=0)


# ----------------------------------------------------------------------------- errors

def test_layernorm_rejects_bad_arguments():
    ln, _ = _kernels()
    B, T, C = 2, 7, 8
    x, w = np.ones((B, T, C), np.float32), np.ones(C, np.float32)
    stat = lambda dtype=np.float32: np.zeros((B, T), dtype)  # noqa: E731
    with pytest.raises(ValueError, match=r"layernorm_forward: weight must have shape \(8,\), got \(7,\)"):
        ln.layernorm_forward(np.empty_like(x), stat(), stat(), x, np.ones(7, np.float32), w)
    xb = np.ones((B, T, C), np.uint16)
    with pytest.raises(TypeError, match=r"layernorm_forward: mean must have dtype float32, got uint16"):
        ln.layernorm_forward(np.empty_like(xb), stat(np.uint16), stat(), xb, w.astype(np.uint16),
                             w.astype(np.uint16))
    r = np.full((B, T, C), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"residual_layernorm_forward: residual_out must not overlap inp1"):
        ln.residual_layernorm_forward(r, np.empty_like(x), stat(), stat(), r, x, w, w)
    with pytest.raises(TypeError, match=r"residual_layernorm_forward: inp2 must have dtype float32, got float64"):
        ln.residual_layernorm_forward(r, np.empty_like(x), stat(), stat(), x, x.astype(np.float64), w, w)
    dres = np.zeros((B, T, C), np.float32)
    with pytest.raises(ValueError, match=r"layernorm_backward_add: dres must not overlap dout"):
        ln.layernorm_backward_add(dres, w.copy(), w.copy(), dres, x, w, stat(), stat())
    with pytest.raises(ValueError, match=r"layernorm_backward_add: rstd must have shape \(2, 7\), got \(2, 8\)"):
        ln.layernorm_backward_add(dres, w.copy(), w.copy(), x, x, w, stat(), np.ones((B, T + 1), np.float32))
    assert not dres.any()  # nothing launched
    # 2 * C floats per warp must fit the 48 KiB of shared memory: C = 6145 does not
    big = np.ones((1, 6145), np.float32)
    with pytest.raises(ValueError, match=r"layernorm_backward: the backward keeps 2 \* C floats per warp in "
                                         r"shared memory, at most 49152 bytes; C = 6145 needs"):
        ln.layernorm_backward(np.empty_like(big), big[0].copy(), big[0].copy(), big, big, big[0].copy(),
                              np.zeros(1, np.float32), np.ones(1, np.float32))
