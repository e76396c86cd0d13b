"""The linear layer's product path (llmcu/cuda/matmul.py, kernels/matmul.cu, the GEMMs of
llmcu/cuda/gemm.py and llmcu/cuda/cublaslt.py) against the NumPy oracle
(llmcu/cpu/matmul.py), fp32 and bf16:

- matmul_forward: one cuBLASLt GEMM with the bias epilogue (DEFAULT without a bias);
- matmul_gelu_forward / matmul_dgelu_backward: GPT-2's fc layer with its GELU in one GEMM
  (GELU_AUX_BIAS; DGELU for the input gradient), against the oracle's composition;
- matmul_backward: cuBLAS GEMMs (dinp, dweight: accumulating or, with
  accumulate_weight=False, overwriting) and the two-pass deterministic bias gradient
  (matmul_bias_backward_kernel2 + _reduce_kernel2, 16-byte (`wide`) where OC is a
  multiple of the packet and dout is aligned, else scalar; the path is read from the
  launches);
- gemm: the row-major -> column-major mapping for every transpose pair, and bf16
  accumulation (an fp32 product + matmul_gemm_accumulate_kernel1 on the GPU, one rounding).

Under the emulator the GEMMs are NumPy with the GPU's arithmetic (fp32 products and sums,
the epilogue in fp32, one rounding), so those cases check the plumbing and the kernels;
the "cuda" cases run cuBLAS/cuBLASLt. Inputs are random, outputs NaN-poisoned, parameter
gradients start random (+=) or, with accumulate_weight=False, must be overwritten.

Tolerances (tests/helpers.py): fp32 outputs within F32 = 1e-5 of their scale (GEMM sums of
<= 1023 products in another order); bf16 outputs computed in fp32 and rounded once
(every output here: the epilogues add the bias and apply the GELU before the one
rounding; the accumulating GEMM adds the old value in fp32) within out_tol. dbias:
helpers.sum_tol (start + N rows summed in a tree; Higham's bound). The DGELU epilogue is
cuBLASLt's own GELU-gradient arithmetic on the GPU: 9.4e-5 from llmcu/cpu/gelu.py's
formula in fp32 on an H200 (2026-11-28), hence 2e-4 there.
"""

import numpy as np
import pytest

from helpers import (BF16, FP32, assert_close, assert_same_bits, misaligned, out_tol, rand_x, sum_tol, to_dtype,
                     value)
from llmcu.cpu import matmul as cpu_matmul


def _kernels():
    from llmcu.cuda import matmul
    return matmul


def _case(rng, dtype, B, T, C, OC):
    (x, x_f), (w, w_f), (b, b_f) = (rand_x(rng, dtype, B, T, C), rand_x(rng, dtype, OC, C, scale=0.1),
                                    rand_x(rng, dtype, OC))
    (dout, dout_f), (dw0, dw0_f), (db0, db0_f) = (rand_x(rng, dtype, B, T, OC), rand_x(rng, dtype, OC, C),
                                                  rand_x(rng, dtype, OC))
    return dict(x=x, x_f=x_f, w=w, w_f=w_f, b=b, b_f=b_f, dout=dout, dout_f=dout_f, dw0=dw0, dw0_f=dw0_f,
                db0=db0, db0_f=db0_f)


# (dtype, B, T, C, OC, bias): C = 1023 and OC = 37 odd; with and without a bias (the BIAS
# and DEFAULT epilogues). Tolerance: out_tol of the dtype (one rounding, the bias added in
# fp32 by the epilogue).
@pytest.mark.parametrize("dtype,B,T,C,OC,bias", [
    pytest.param(FP32, 2, 7, 48, 144, True, id="fp32-bias"),
    pytest.param(FP32, 1, 3, 1023, 37, False, id="fp32-no-bias-C1023"),
    pytest.param(BF16, 1, 3, 1023, 37, True, id="bf16-bias-C1023"),
    pytest.param(BF16, 2, 7, 48, 144, False, id="bf16-no-bias"),
])
def test_matmul_forward(dev, dtype, B, T, C, OC, bias):
    k = _kernels()
    c = _case(np.random.default_rng(C + OC), dtype, B, T, C, OC)
    out = dev.poisoned((B, T, OC), dtype)
    k.matmul_forward(out, dev.put(c["x"]), dev.put(c["w"]), dev.put(c["b"]) if bias else None)
    ref = np.empty((B, T, OC), np.float32)
    cpu_matmul.matmul_forward(ref, c["x_f"], c["w_f"], c["b_f"] if bias else None)
    assert_close("matmul_forward out", value(dev.get(out)), ref, **out_tol(dtype, ref))


# (dtype, B, T, C, OC, bias, accumulate_weight, wide): OC = 144 takes the bias gradient's
# 16-byte path in both dtypes (several 32-packet tiles, the last partial in bf16); OC = 37
# and bf16 OC = 36 (36 % 8 != 0) the scalar one. Tolerances: dinp and dweight out_tol of the
# dtype (one rounding each: dweight's old value is added in fp32); dbias helpers.sum_tol.
BACKWARD_CASES = [
    pytest.param(FP32, 2, 7, 48, 144, True, True, True, id="fp32-wide-accumulate"),
    pytest.param(FP32, 1, 3, 1023, 37, True, False, False, id="fp32-scalar-overwrite-C1023"),
    pytest.param(FP32, 1, 7, 32, 16, False, True, None, id="fp32-no-bias"),
    pytest.param(BF16, 2, 7, 48, 144, True, False, True, id="bf16-wide-overwrite"),
    pytest.param(BF16, 1, 5, 100, 36, True, True, False, id="bf16-scalar-accumulate"),
]


@pytest.mark.parametrize("dtype,B,T,C,OC,bias,accumulate,wide", BACKWARD_CASES)
def test_matmul_backward(dev, launch_args, dtype, B, T, C, OC, bias, accumulate, wide):
    k = _kernels()
    c = _case(np.random.default_rng(10 + C + OC), dtype, B, T, C, OC)
    dinp = dev.poisoned((B, T, C), dtype)
    if accumulate:  # random starts: += is checked
        dw, db = dev.put(c["dw0"]), dev.put(c["db0"])
    else:  # poisoned: every element must be overwritten
        dw, db = dev.poisoned((OC, C), dtype), dev.poisoned((OC,), dtype)
    db = db if bias else None
    k.matmul_backward(dinp, dw, db, dev.put(c["dout"]), dev.put(c["x"]), dev.put(c["w"]),
                      accumulate_weight=accumulate)
    bias_launches = [(launch.kernel, int(launch.args[-1])) for launch in launch_args
                     if launch.kernel.startswith("matmul_bias")]
    if bias:  # (pass 1, its wide flag), (pass 2, its accumulate flag)
        assert bias_launches == [("matmul_bias_backward_kernel2", int(wide)),
                                 ("matmul_bias_backward_reduce_kernel2", int(accumulate))]
    else:
        assert bias_launches == []
    rdinp = np.empty((B, T, C), np.float32)
    rdw = c["dw0_f"].copy() if accumulate else np.full((OC, C), np.nan, np.float32)
    rdb = (c["db0_f"].copy() if accumulate else np.full(OC, np.nan, np.float32)) if bias else None
    cpu_matmul.matmul_backward(rdinp, rdw, rdb, c["dout_f"], c["x_f"], c["w_f"], accumulate_weight=accumulate)
    assert_close("matmul dinp", value(dev.get(dinp)), rdinp, **out_tol(dtype, rdinp))
    assert_close("matmul dweight", value(dev.get(dw)), rdw, **out_tol(dtype, rdw))
    if bias:
        start = c["db0_f"] if accumulate else np.zeros(OC, np.float32)
        assert_close("matmul dbias", value(dev.get(db)), rdb,
                     **sum_tol(dtype, start, c["dout_f"].reshape(-1, OC), B * T))


# (dtype, N, OC, how, blocks, wide): N = 333 rows over a pass-1 grid capped at 4 blocks
# (one column tile x 4 row slices: 32 warps, ~10 rows each); a misaligned bf16 dout of whole packets
# falls back to the scalar path. Tolerance: helpers.sum_tol.
@pytest.mark.parametrize("dtype,N,OC,how,blocks,wide", [
    pytest.param(FP32, 333, 72, "aligned", 4, True, id="fp32-wide-4-blocks"),
    pytest.param(BF16, 9, 144, "misaligned", None, False, id="bf16-scalar-misaligned"),
])
def test_matmul_bias_backward(dev, launch_args, monkeypatch, dtype, N, OC, how, blocks, wide):
    """matmul_bias_backward (what matmul_backward calls) on its own, a 3-D dout."""
    from llmcu.cuda import runtime
    k = _kernels()
    if blocks is not None:
        monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", blocks)
    rng = np.random.default_rng(N + OC)
    (dout, dout_f), (db0, db0_f) = rand_x(rng, dtype, 1, N, OC), rand_x(rng, dtype, OC)
    db = dev.put(db0)
    k.matmul_bias_backward(db, misaligned(dev, dout) if how == "misaligned" else dev.put(dout))
    assert [launch.kernel for launch in launch_args] == ["matmul_bias_backward_kernel2",
                                                         "matmul_bias_backward_reduce_kernel2"]
    assert int(launch_args[0].args[-1]) == int(wide)
    if blocks is not None:  # one column tile (72 <= 32 * 4 columns) x 4 row slices
        assert launch_args[0].grid == (1, 4)
    ref = db0_f + dout_f.reshape(-1, OC).sum(axis=0)
    assert_close("matmul_bias_backward dbias", value(dev.get(db)), ref,
                 **sum_tol(dtype, db0_f, dout_f.reshape(-1, OC), N))


def test_matmul_bias_backward_is_deterministic(dev, monkeypatch, emu_order):
    """Fixed order: two runs give the same bits, the second (on the emulator) with each
    block's threads in a random order. fp32, where a change of summation order shows."""
    from llmcu.cuda import runtime
    k = _kernels()
    monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", 6)
    rng = np.random.default_rng(25)
    (dout, _), (db0, _) = rand_x(rng, FP32, 257, 264), rand_x(rng, FP32, 264)
    results = []
    for order in (None, "random"):
        if order:
            emu_order(order)
        db = dev.put(db0)
        k.matmul_bias_backward(db, dev.put(dout))
        results.append(dev.get(db))
    assert_same_bits("matmul_bias_backward dbias, second run", results[1], results[0])


def test_partial_sums_grid():
    """Pass 1's grid of the two-pass reductions (matmul_bias_backward, layernorm_backward):
    enough blocks for the work, capped at PARTIAL_SUM_BLOCKS (or max_blocks)."""
    from llmcu.cuda import runtime
    assert runtime.partial_sums_grid(10, 8) == 2 and runtime.partial_sums_grid(16, 8) == 2
    assert runtime.partial_sums_grid(10**6, 8) == runtime.PARTIAL_SUM_BLOCKS
    assert runtime.partial_sums_grid(10**6, 8, max_blocks=3) == 3
    with pytest.raises(ValueError, match="partial_sums_grid: work and per_block must be > 0"):
        runtime.partial_sums_grid(0, 8)


# (dtype, B, T, C, OC): OC (the GELU's width, cuBLASLt's aux leading dimension) a multiple
# of 8. Tolerances: pre and out one rounding each (the GELU of the fp32 pre-activation):
# out_tol of the dtype.
@pytest.mark.parametrize("dtype,B,T,C,OC", [pytest.param(FP32, 2, 7, 48, 64, id="fp32"),
                                            pytest.param(BF16, 1, 33, 100, 24, id="bf16")])
def test_matmul_gelu_forward(dev, dtype, B, T, C, OC):
    k = _kernels()
    c = _case(np.random.default_rng(C + OC + 1), dtype, B, T, C, OC)
    out, pre = dev.poisoned((B, T, OC), dtype), dev.poisoned((B, T, OC), dtype)
    k.matmul_gelu_forward(out, pre, dev.put(c["x"]), dev.put(c["w"]), dev.put(c["b"]))
    rout, rpre = np.empty((B, T, OC), np.float32), np.empty((B, T, OC), np.float32)
    cpu_matmul.matmul_gelu_forward(rout, rpre, c["x_f"], c["w_f"], c["b_f"])
    assert_close("matmul_gelu_forward pre", value(dev.get(pre)), rpre, **out_tol(dtype, rpre))
    assert_close("matmul_gelu_forward out", value(dev.get(out)), rout, **out_tol(dtype, rout))


# (dtype, accumulate_weight, dpre tolerance): dpre = (dout @ W) * gelu'(pre), one rounding;
# fp32 2e-4 and bf16 2^-8 + 2e-4 relative (the DGELU arithmetic of cuBLASLt on the GPU, module
# doc); dweight/dbias as test_matmul_backward.
@pytest.mark.parametrize("dtype,accumulate,dpre_tol", [
    pytest.param(FP32, True, dict(atol=2e-4, rtol=2e-4), id="fp32-accumulate"),
    pytest.param(BF16, False, dict(atol=2e-4, rtol=2.0 ** -8 + 2e-4), id="bf16-overwrite"),
])
def test_matmul_dgelu_backward(dev, dtype, accumulate, dpre_tol):
    k = _kernels()
    B, T, C, OC = 2, 10, 64, 40  # C (dpre's row length) a multiple of 8, as cuBLASLt's aux needs
    rng = np.random.default_rng(3)
    c = _case(rng, dtype, B, T, C, OC)
    pre, pre_f = rand_x(rng, dtype, B, T, C, scale=2.0)
    dpre = dev.poisoned((B, T, C), dtype)
    dw, db = ((dev.put(c["dw0"]), dev.put(c["db0"])) if accumulate else
              (dev.poisoned((OC, C), dtype), dev.poisoned((OC,), dtype)))
    k.matmul_dgelu_backward(dpre, dw, db, dev.put(c["dout"]), dev.put(c["x"]), dev.put(c["w"]), dev.put(pre),
                            accumulate_weight=accumulate)
    rdpre = np.empty((B, T, C), np.float32)
    rdw = c["dw0_f"].copy() if accumulate else np.full((OC, C), np.nan, np.float32)
    rdb = c["db0_f"].copy() if accumulate else np.full(OC, np.nan, np.float32)
    cpu_matmul.matmul_dgelu_backward(rdpre, rdw, rdb, c["dout_f"], c["x_f"], c["w_f"], pre_f,
                                     accumulate_weight=accumulate)
    scale = float(np.abs(rdpre).max())
    assert_close("matmul_dgelu_backward dpre", value(dev.get(dpre)), rdpre,
                 atol=dpre_tol["atol"] * scale, rtol=dpre_tol["rtol"])
    assert_close("matmul_dgelu_backward dweight", value(dev.get(dw)), rdw, **out_tol(dtype, rdw))
    start = c["db0_f"] if accumulate else np.zeros(OC, np.float32)
    assert_close("matmul_dgelu_backward dbias", value(dev.get(db)), rdb,
                 **sum_tol(dtype, start, c["dout_f"].reshape(-1, OC), B * T))


# Every transpose pair in bf16 (the mapping is one code path for both dtypes; fp32 runs
# through test_matmul_backward), M, K, N = 7, 33, 5. Tolerance: out_tol(bf16), one rounding,
# also when accumulating (the old value added in fp32, cuBLAS's beta = 1 done right).
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (False, True), (True, False), (True, True)])
def test_gemm(dev, transpose_a, transpose_b):
    from llmcu.cuda import gemm
    rng = np.random.default_rng(13)
    M, K, N = 7, 33, 5
    a, a_f = rand_x(rng, BF16, *((K, M) if transpose_a else (M, K)))
    b, b_f = rand_x(rng, BF16, *((N, K) if transpose_b else (K, N)))
    ref = (a_f.T if transpose_a else a_f) @ (b_f.T if transpose_b else b_f)
    out = dev.poisoned((M, N), BF16)
    gemm.gemm(out, dev.put(a), dev.put(b), transpose_a=transpose_a, transpose_b=transpose_b)
    assert_close("gemm out", value(dev.get(out)), ref, **out_tol(BF16, ref))
    c0, c0_f = rand_x(rng, BF16, M, N)
    acc = dev.put(c0)
    gemm.gemm(acc, dev.put(a), dev.put(b), transpose_a=transpose_a, transpose_b=transpose_b, accumulate=True)
    assert_close("gemm accumulate", value(dev.get(acc)), c0_f + ref, **out_tol(BF16, c0_f + ref))


def test_gemm_accumulate_kernel(dev):
    """matmul_gemm_accumulate_kernel1, the bf16 out += fp32 product of gemm(accumulate=True)
    on the GPU (the emulator's gemm adds in NumPy instead, so it is launched directly here):
    out = bf16(out + product), one rounding, bit for bit. n = 1023: a partial last block."""
    from llmcu.cuda import runtime
    rng = np.random.default_rng(14)
    n = 1023
    (out0, out0_f), product = rand_x(rng, BF16, n), rand_x(rng, FP32, n)[0]
    be = runtime.get_backend(dev.name)
    out = dev.put(out0)
    grid, block = runtime.launch_config(n)
    be.launch("matmul", "matmul_gemm_accumulate_kernel1", grid, block, (out, dev.put(product), runtime.i64(n)),
              floatX="__nv_bfloat16")
    assert_same_bits("out + product", dev.get(out), to_dtype(out0_f + product, BF16))


def test_matmul_rejects_bad_arguments():
    k = _kernels()
    x, w = np.ones((2, 3, 8), np.float32), np.ones((16, 8), np.float32)
    with pytest.raises(ValueError, match=r"matmul_forward: weight must be \(OC,8\), got \(16, 7\)"):
        k.matmul_forward(np.empty((2, 3, 16), np.float32), x, np.ones((16, 7), np.float32))
    with pytest.raises(TypeError, match=r"matmul_forward: weight must have dtype uint16, got float32"):
        k.matmul_forward(np.empty((2, 3, 16), np.uint16), x.astype(np.uint16), w)
    with pytest.raises(TypeError, match=r"matmul_gelu_forward: pre must have dtype float32, got uint16"):
        k.matmul_gelu_forward(np.empty((2, 3, 16), np.float32), np.empty((2, 3, 16), np.uint16), x, w)
    with pytest.raises(ValueError, match=r"matmul_bias_backward: dbias must have shape \(6,\), got \(5,\)"):
        k.matmul_bias_backward(np.zeros(5, np.float32), np.ones((4, 6), np.float32))
