"""GEMMs with cuBLASLt epilogues (llmcu/cuda/cublaslt.py) and the GPT-2 model on them.

On the emulator lt_matmul is NumPy arithmetic, so those cases check the plumbing
(which tensor is the bias, the aux, the transposes, the layer sequence's fused
calls) against the unfused kernels: matmul + bias kernel + gelu kernels. The
"cuda" cases run libcublasLt itself against the same references; they are the
tests of the ctypes binding and need a GPU.

Tolerances. fp32: sums of K <= 200 products of O(1) values in another order, and
tanhf against NumPy's tanh: 1e-5 absolute and relative (as tests/test_kernels.py).
bf16: the fused path rounds once where the unfused one rounds two or three times
(GEMM, + bias, GELU of the rounded input), so they may differ by a few bf16 ulps
(2^-8 relative each); 3 ulps relative plus 2^-8 absolute for values near zero.
"""

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.config import GPT2Config
from llmcu.cpu.gpt2 import init_parameters
from llmcu.cuda import cublaslt, gelu, matmul
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

BF16_TOL = dict(atol=2.0 ** -8, rtol=3 * 2.0 ** -8)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def _arrays(rng, dtype, *shapes):
    out = []
    for s in shapes:
        x = rng.standard_normal(s).astype(np.float32)
        out.append(float32_to_bf16_bits(x) if dtype == "bf16" else x)
    return out


def _f32(a):
    a = np.asarray(a)
    return bf16_bits_to_float32(a) if a.dtype == np.uint16 else a


def _poison(dev, shape, dtype):
    fill = np.full(shape, np.nan, np.float32)
    return dev.put(float32_to_bf16_bits(fill) if dtype == "bf16" else fill)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("N,C,OC", [(7, 48, 64), (33, 100, 24)])
def test_bias_and_gelu_epilogues_match_the_unfused_kernels(dev, dtype, N, C, OC):
    """matmul_forward(gemm_library="cublaslt") and matmul_gelu_forward against cuBLAS/NumPy
    GEMM + bias kernel + GELU kernel."""
    rng = np.random.default_rng(N + C)
    inp, w, b = _arrays(rng, dtype, (N, C), (OC, C), (OC,))
    tol = BF16_TOL if dtype == "bf16" else FP32_TOL
    ref_pre, ref_out = _poison(dev, (N, OC), dtype), _poison(dev, (N, OC), dtype)
    matmul.matmul_forward(ref_pre, dev.put(inp), dev.put(w), dev.put(b))
    gelu.gelu_forward(ref_out, ref_pre)

    out = _poison(dev, (N, OC), dtype)
    matmul.matmul_forward(out, dev.put(inp), dev.put(w), dev.put(b), gemm_library="cublaslt")
    assert_close("bias epilogue", _f32(dev.get(out)), _f32(dev.get(ref_pre)), **tol)

    pre, out = _poison(dev, (N, OC), dtype), _poison(dev, (N, OC), dtype)
    matmul.matmul_gelu_forward(out, pre, dev.put(inp), dev.put(w), dev.put(b))
    assert_close("GELU_AUX_BIAS aux (pre-activation)", _f32(dev.get(pre)), _f32(dev.get(ref_pre)), **tol)
    assert_close("GELU_AUX_BIAS out", _f32(dev.get(out)), _f32(dev.get(ref_out)), **tol)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dgelu_epilogue_matches_the_unfused_kernels(dev, dtype):
    """matmul_dgelu_backward: dpre = (dout @ W) * gelu'(pre), and the weight and bias
    gradients, against matmul_backward + gelu_backward."""
    N, C, OC = 20, 64, 40   # C (dpre's row length) a multiple of 8, as cuBLASLt's aux needs
    rng = np.random.default_rng(3)
    dout, inp, w, pre = _arrays(rng, dtype, (N, OC), (N, C), (OC, C), (N, C))
    # fp32: cuBLASLt's DGELU epilogue has its own GELU-gradient arithmetic: 9.4e-5 from
    # llmcu/cpu/gelu.py's formula on an H200 (2026-11-28), so 2e-4 there
    tol = BF16_TOL if dtype == "bf16" else dict(atol=2e-4, rtol=2e-4)
    z = lambda *s: dev.put(np.zeros(s, np.uint16 if dtype == "bf16" else np.float32))  # noqa: E731
    dact, ref = _poison(dev, (N, C), dtype), _poison(dev, (N, C), dtype)
    dw_ref, db_ref = z(OC, C), z(OC)
    matmul.matmul_backward(dact, dw_ref, db_ref, dev.put(dout), dev.put(inp), dev.put(w))
    gelu.gelu_backward(ref, dact, dev.put(pre))
    for library in ("cublaslt", "cublas"):
        got, dw, db = _poison(dev, (N, C), dtype), z(OC, C), z(OC)
        matmul.matmul_dgelu_backward(got, dw, db, dev.put(dout), dev.put(inp), dev.put(w), dev.put(pre),
                                     gemm_library=library)
        assert_close(f"{library} dpre", _f32(dev.get(got)), _f32(dev.get(ref)), **tol)
        assert_close(f"{library} dweight", _f32(dev.get(dw)), _f32(dev.get(dw_ref)), atol=0, rtol=0)
        assert_close(f"{library} dbias", _f32(dev.get(db)), _f32(dev.get(db_ref)), atol=0, rtol=0)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_lt_matmul_transposes(dev, transpose_a, transpose_b):
    """The column-major mapping for every transpose combination, fp32, no epilogue and bias."""
    M, K, N = 9, 13, 16
    rng = np.random.default_rng(4)
    a = rng.standard_normal((K, M) if transpose_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if transpose_b else (K, N)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = dev.put(np.full((M, N), np.nan, np.float32))
    cublaslt.lt_matmul(out, dev.put(a), dev.put(b), transpose_a, transpose_b, bias=dev.put(bias))
    want = (a.T if transpose_a else a) @ (b.T if transpose_b else b) + bias
    assert_close("lt_matmul", dev.get(out), want, **FP32_TOL)


def test_bad_input_is_refused():
    a, b = np.zeros((4, 8), np.float32), np.zeros((8, 16), np.float32)
    out, aux = np.zeros((4, 16), np.float32), np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match="not both"):
        cublaslt.lt_matmul(out, a, b, gelu_aux=aux, dgelu_aux=aux)
    with pytest.raises(ValueError, match="dgelu_aux takes no bias"):
        cublaslt.lt_matmul(out, a, b, bias=np.zeros(16, np.float32), dgelu_aux=aux)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\), got \(8,\)"):
        cublaslt.lt_matmul(out, a, b, bias=np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="gelu_aux must have dtype float32, got uint16"):
        cublaslt.lt_matmul(out, a, b, gelu_aux=aux.astype(np.uint16))
    b12, out12 = np.zeros((8, 12), np.float32), np.zeros((4, 12), np.float32)
    with pytest.raises(ValueError, match="multiple of 8.*N=12"):
        cublaslt.lt_matmul(out12, a, b12, gelu_aux=np.zeros((4, 12), np.float32))
    with pytest.raises(ValueError, match="gemm must be one of"):
        matmul.matmul_forward(out, a, b.T.copy(), gemm_library="cutlass")


def test_descriptors_on_the_host():
    """The ctypes side that needs no GPU: the library loads, and a matmul descriptor takes
    every attribute lt_matmul sets (cuBLASLt rejects an unknown attribute number or a
    wrong size). Skipped where libcublasLt is not installed (CI's machine has none)."""
    try:
        cublaslt.library()
    except RuntimeError as e:
        pytest.skip(str(e))
    desc = cublaslt._Desc()
    try:
        for epilogue in (cublaslt.EPILOGUE_BIAS, cublaslt.EPILOGUE_GELU_AUX_BIAS, cublaslt.EPILOGUE_DGELU,
                         cublaslt.EPILOGUE_BGRADB):
            desc.matmul(epilogue, 1, 0, bias_ptr=256, bias_type=cublaslt.CUDA_R_16BF, aux_ptr=512,
                        aux_ld=64)
        desc.layout(cublaslt.CUDA_R_16BF, 64, 32, 64)
        desc.preference(cublaslt.WORKSPACE_BYTES)
        with pytest.raises(RuntimeError, match="cublasLtMatmulDescSetAttribute"):
            desc._set(desc.made[0][1], 9999, cublaslt.ctypes.c_int32(0))
    finally:
        desc.close()


TINY = GPT2Config(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=4, channels=64)


@pytest.mark.parametrize("device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpt2_on_cublaslt_trains_like_cublas(device, dtype):
    """GPT2(gemm="cublaslt") and "cublaslt_all" (every overwriting GEMM on cuBLASLt): 5 AdamW
    steps with the bias and GELU epilogues; losses within
    1e-5 (fp32) or llm.c's bf16 tolerance 0.05 of the cuBLAS model's; the fc layer's GELU
    kernels and the bias kernel no longer run."""
    from llmcu.cuda import runtime
    from llmcu.cuda.gpt2 import GPT2
    p0 = init_parameters(TINY, seed=2)
    toks = np.random.default_rng(1).integers(0, 40, size=(3, 2, 17)).astype(np.int32)
    losses = {}
    launched = []
    for library in ("cublas", "cublaslt", "cublaslt_all"):
        model = GPT2(TINY, p0.copy(), device=device, dtype=dtype, gemm=library)
        be = runtime.get_backend(model.device)
        original = be.launch

        def spy(stem, kernel, *args, **kw):
            launched.append((library, kernel))
            return original(stem, kernel, *args, **kw)
        be.launch = spy
        try:
            losses[library] = []
            for s in range(5):
                x, y = toks[s % 3, :, :-1], toks[s % 3, :, 1:]
                model.zero_grad()
                losses[library].append(model.forward(x, y))
                model.backward()
                model.update(1e-2, s + 1, grad_clip=1.0)
        finally:
            del be.launch
    tol = 1e-5 if dtype == "fp32" else 0.05
    for library in ("cublaslt", "cublaslt_all"):
        diff = np.abs(np.array(losses[library]) - np.array(losses["cublas"]))
        assert diff.max() <= tol, (library, losses, diff)
        assert losses[library][-1] < losses[library][0] - 0.5  # it trains
    kernels = {lib: {k for l2, k in launched if l2 == lib} for lib in losses}
    assert any(k.startswith("gelu_forward") for k in kernels["cublas"])
    for library in ("cublaslt", "cublaslt_all"):
        assert not any(k.startswith(("gelu_forward", "gelu_backward", "matmul_bias_forward"))
                       for k in kernels[library]), kernels[library]


def test_which_gemms_go_to_cublaslt(monkeypatch):
    """One training step's cuBLASLt calls: "cublaslt" runs the 4 forward GEMMs of each layer
    and the lm_head's there, plus fcproj's DGELU backward (5L + 1); "cublaslt_all" also each
    backward GEMM that overwrites its output (dinp and dweight of qkv, attproj, fc, lm_head,
    fcproj's dweight: 8L + 2 more on top of the 4L + 1 forward ones)."""
    from llmcu.cuda.gpt2 import GPT2
    calls = []
    original = matmul.lt_matmul
    monkeypatch.setattr(matmul, "lt_matmul", lambda *a, **k: (calls.append(1), original(*a, **k)))
    toks = np.random.default_rng(0).integers(0, 40, size=(2, 17)).astype(np.int32)
    L = TINY.num_layers
    for library, want in (("cublas", 0), ("cublaslt", 5 * L + 1), ("cublaslt_all", 12 * L + 3)):
        calls.clear()
        model = GPT2(TINY, init_parameters(TINY, seed=1), device="emu", gemm=library)
        model.zero_grad()
        model.forward(toks[:, :-1], toks[:, 1:])
        model.backward()
        assert len(calls) == want, (library, len(calls), want)
