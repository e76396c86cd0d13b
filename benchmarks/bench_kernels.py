"""The product kernels (what the training step runs, one per op) on the GPU at GPT-2 124M
shapes, fp32 and bf16, each beside two ceilings measured in the same run, and beside
PyTorch for the GEMMs.

    python -m pytest benchmarks/bench_kernels.py -s            # needs CuPy and an NVIDIA GPU
    python -m pytest benchmarks/bench_kernels.py -s --benchmark-json out.json

Shapes: B=8, T=1024 (N = B*T = 8192 rows), C=768, 4C=3072, V=50257, Vp=50304,
AdamW over the 124M parameters. Each round launches the wrapper (one or two
kernels, or a GEMM) and synchronizes, so a time includes one launch and one
sync (a few microseconds, which matters only for the smallest kernels).

Ceilings, measured first in the same process:
- copy: a device-to-device copy of 512 MiB (CuPy `dst[...] = src`), reading
  and writing every byte once: the DRAM bandwidth a memory-bound kernel can
  reach. Each memory-bound kernel reports bytes / time in GB/s and the
  fraction of this ceiling. Its bytes are the napkin minimum (every input read
  once, every output written once, per-row vectors and weights counted once),
  written beside each case; a kernel that reads a row twice shows it as a
  lower fraction.
- GEMM: an 8192 x 8192 x 8192 product (2 * 8192^3 flops) in fp32 (CuPy's
  matmul, cuBLAS, no TF32 unless CUPY_TF32=1) and in bf16 (llmcu.cuda.gemm:
  cublasGemmEx, bf16 in and out, fp32 accumulation). Each matmul case reports
  TFLOP/s and the fraction of the ceiling for its dtype.

The other kernel versions are the lab's (kernels/dev/): `python benchmarks/lab.py LAYER`
times them against these. GELU has no product kernel (it is the fc GEMM's cuBLASLt
epilogue: the matmul_gelu_forward and matmul_dgelu_backward rows).

This is a benchmark, not a test: nothing asserts a speed. Without CuPy and a
GPU everything skips. Results worth keeping go to benchmarks/RESULTS.md with
the card, date and commit.
"""

import numpy as np
import pytest

from llmcu import cuda as llmcu_cuda

pytestmark = pytest.mark.skipif(not llmcu_cuda.is_available(), reason="needs CuPy and an NVIDIA GPU")

B, T, C, V, Vp, NH = 8, 1024, 768, 50257, 50304, 12
N = B * T
NPARAMS = 124_475_904  # GPT-2 124M with the padded vocabulary (llmcu.config d12)
ROUNDS, WARMUP = 20, 3
COPY_BYTES = 512 * 2**20   # the copy ceiling's buffer
GEMM_SIZE = 8192           # the GEMM ceiling's M = N = K
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]
CEILINGS = {}


def _sync():
    import cupy
    cupy.cuda.get_current_stream().synchronize()


def _median_seconds(fn, rounds=ROUNDS, warmup=WARMUP):
    """Median wall time of fn() + sync (for the ceilings, outside pytest-benchmark)."""
    import time
    for _ in range(warmup):
        fn()
        _sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _rand(shape, dtype, scale=1.0, seed=0):
    """Random device array: float32, or bf16 bit patterns (uint16)."""
    import cupy
    from llmcu.formats import float32_to_bf16_bits
    x = cupy.random.RandomState(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return float32_to_bf16_bits(x) if np.dtype(dtype) == np.uint16 else x


def _empty(shape, dtype):
    import cupy
    return cupy.empty(shape, dtype)


def measure_ceilings():
    """Copy bandwidth and GEMM rates of this card, measured once per process (a dict:
    copy_gb_s, gemm_fp32_tflops, gemm_bf16_tflops; benchmarks/bench_step_breakdown.py too)."""
    if CEILINGS:
        return CEILINGS
    import cupy
    from llmcu.cuda.gemm import gemm
    S = GEMM_SIZE

    def copy_seconds():  # the buffers are freed when it returns
        src = cupy.ones(COPY_BYTES // 4, np.float32)
        dst = cupy.empty_like(src)

        def copy():
            dst[...] = src
        return _median_seconds(copy)

    def gemm_seconds(dtype):
        a, b, out = _rand((S, S), dtype, seed=1), _rand((S, S), dtype, seed=2), _empty((S, S), dtype)
        return _median_seconds(lambda: gemm(out, a, b), rounds=5, warmup=2)
    CEILINGS["copy_gb_s"] = 2 * COPY_BYTES / copy_seconds() / 1e9
    for name, dtype in (("fp32", np.float32), ("bf16", np.uint16)):
        CEILINGS[f"gemm_{name}_tflops"] = 2 * S**3 / gemm_seconds(dtype) / 1e12
    cupy.get_default_memory_pool().free_all_blocks()
    print("\nceilings (this card, this run): copy {copy_gb_s:.0f} GB/s, GEMM fp32 "
          "{gemm_fp32_tflops:.1f} TFLOP/s, GEMM bf16 {gemm_bf16_tflops:.1f} TFLOP/s".format(**CEILINGS))
    return CEILINGS


@pytest.fixture(scope="module")
def ceilings():
    """Copy bandwidth and GEMM rates of this card, measured once per run."""
    return measure_ceilings()


def _run(benchmark, fn):
    def once():
        fn()
        _sync()
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    return benchmark.stats.stats.median


def report_bytes(benchmark, ceilings, name, fn, nbytes):
    seconds = _run(benchmark, fn)
    gbs = nbytes / seconds / 1e9
    frac = gbs / ceilings["copy_gb_s"]
    benchmark.extra_info.update(bytes=nbytes, gb_per_s=round(gbs, 1), copy_ceiling_gb_per_s=round(
        ceilings["copy_gb_s"], 1), fraction_of_copy=round(frac, 3))
    print(f"\n{name}: median {seconds * 1e6:.1f} us, {gbs:.0f} GB/s = {frac:.0%} of copy "
          f"({nbytes / 1e6:.1f} MB napkin)")


def report_flops(benchmark, ceilings, name, fn, flops, dtype_name):
    seconds = _run(benchmark, fn)
    tflops = flops / seconds / 1e12
    ceiling = ceilings[f"gemm_{dtype_name}_tflops"]
    benchmark.extra_info.update(flops=flops, tflop_per_s=round(tflops, 2),
                                gemm_ceiling_tflop_per_s=round(ceiling, 2),
                                fraction_of_gemm=round(tflops / ceiling, 3))
    print(f"\n{name}: median {seconds * 1e6:.1f} us, {tflops:.1f} TFLOP/s = "
          f"{tflops / ceiling:.0%} of the {dtype_name} GEMM ceiling")


def _name(dtype):
    return "bf16" if np.dtype(dtype) == np.uint16 else "fp32"


# ------------------------------------------------------------------------- kernels

@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_forward(benchmark, ceilings, dtype):
    import cupy
    from llmcu.cuda.encoder import encoder_forward
    s = np.dtype(dtype).itemsize
    inp = cupy.asarray(np.random.default_rng(0).integers(0, V, (B, T)), dtype=np.int32)
    wte, wpe, out = _rand((Vp, C), dtype), _rand((1024, C), dtype), _empty((B, T, C), dtype)
    # inp read, a wte row gathered and out written per position; wpe (T,C) once
    report_bytes(benchmark, ceilings, f"encoder_forward {_name(dtype)}",
                 lambda: encoder_forward(out, inp, wte, wpe), N * 4 + 2 * N * C * s + T * C * s)


# encoder_w{pe,te}_backward_kernel2 after a stable sort of the token ids (the sort, a gather
# and a searchsorted are CuPy calls inside the time).
@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_backward(benchmark, ceilings, dtype):
    import cupy
    from llmcu.cuda.encoder import encoder_backward
    s = np.dtype(dtype).itemsize
    inp = cupy.asarray(np.random.default_rng(0).integers(0, V, (B, T)), dtype=np.int32)
    dwte, dwpe, dout = _rand((Vp, C), dtype, 0.0), _rand((1024, C), dtype, 0.0), _rand((B, T, C), dtype)
    # dout and inp read; a dwte row read and written per position; dwpe (T,C) read+written
    report_bytes(benchmark, ceilings, f"encoder_backward (+ sort) {_name(dtype)}",
                 lambda: encoder_backward(dwte, dwpe, dout, inp),
                 N * C * s + N * 4 + 2 * N * C * s + 2 * T * C * s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_forward(benchmark, ceilings, dtype):
    from llmcu.cuda.layernorm import layernorm_forward
    s = np.dtype(dtype).itemsize
    x, w, b, out = _rand((B, T, C), dtype), _rand((C,), dtype), _rand((C,), dtype), _empty((B, T, C), dtype)
    mean, rstd = _empty((B, T), np.float32), _empty((B, T), np.float32)
    report_bytes(benchmark, ceilings, f"layernorm_forward {_name(dtype)}",
                 lambda: layernorm_forward(out, mean, rstd, x, w, b), 2 * N * C * s + 2 * N * 4 + 2 * C * s)


# The residual adds fused into the layernorms (what GPT-2's step runs): the forward reads
# inp1, inp2 and writes the residual, the normalised row and the stats; the backward reads
# dout, inp and dres and writes dres. The backward's partial sums (3 MB) are not counted.
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_layernorm_forward(benchmark, ceilings, dtype):
    from llmcu.cuda.layernorm import residual_layernorm_forward
    s = np.dtype(dtype).itemsize
    a, b2, w, bias = _rand((B, T, C), dtype), _rand((B, T, C), dtype), _rand((C,), dtype), _rand((C,), dtype)
    res, out = _empty((B, T, C), dtype), _empty((B, T, C), dtype)
    mean, rstd = _empty((B, T), np.float32), _empty((B, T), np.float32)
    report_bytes(benchmark, ceilings, f"residual_layernorm_forward {_name(dtype)}",
                 lambda: residual_layernorm_forward(res, out, mean, rstd, a, b2, w, bias),
                 4 * N * C * s + 2 * N * 4 + 2 * C * s)


@pytest.mark.parametrize("add", [False, True], ids=["layernorm_backward", "layernorm_backward_add"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_backward(benchmark, ceilings, dtype, add):
    import cupy
    from llmcu.cuda.layernorm import layernorm_backward, layernorm_backward_add
    s = np.dtype(dtype).itemsize
    x, w, dout = _rand((B, T, C), dtype), _rand((C,), dtype), _rand((B, T, C), dtype)
    dinp, dw, db = _rand((B, T, C), dtype), _rand((C,), dtype, 0.0), _rand((C,), dtype, 0.0)
    mean, rstd = cupy.zeros((B, T), np.float32), cupy.ones((B, T), np.float32)
    fn = layernorm_backward_add if add else layernorm_backward
    # dout, inp read and dinp written (dres also read with add), mean/rstd, weights once
    report_bytes(benchmark, ceilings, f"{fn.__name__} (row + param kernels) {_name(dtype)}",
                 lambda: fn(dinp, dw, db, dout, x, w, mean, rstd), (3 + add) * N * C * s + 2 * N * 4 + 5 * C * s)


MATMULS = [pytest.param(3 * C, C, id="qkv"), pytest.param(C, C, id="attproj"),
           pytest.param(4 * C, C, id="fc"), pytest.param(C, 4 * C, id="fcproj")]


# cuBLASLt with the bias epilogue; for fc (gelu) the GELU_AUX_BIAS epilogue, as the step runs it
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("OC,IC", MATMULS)
def test_matmul_forward(benchmark, ceilings, dtype, OC, IC):
    from llmcu.cuda.matmul import matmul_forward, matmul_gelu_forward
    x, w, bias, out = (_rand((B, T, IC), dtype), _rand((OC, IC), dtype, 0.02), _rand((OC,), dtype),
                       _empty((B, T, OC), dtype))
    if OC == 4 * C:
        pre = _empty((B, T, OC), dtype)
        name, run = "matmul_gelu_forward", lambda: matmul_gelu_forward(out, pre, x, w, bias)
    else:
        name, run = "matmul_forward", lambda: matmul_forward(out, x, w, bias)
    report_flops(benchmark, ceilings, f"{name} {IC}->{OC} + bias {_name(dtype)}", run, 2 * N * IC * OC,
                 _name(dtype))


# The peer for the GEMM rows: the same product (no bias) through PyTorch (cuBLASLt with its
# own heuristics and workspace) in the same run, to tell llmcu's calls from the shape.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("OC,IC", MATMULS)
def test_torch_matmul_forward(benchmark, ceilings, dtype, OC, IC):
    torch = pytest.importorskip("torch")
    tdt = torch.bfloat16 if _name(dtype) == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randn(N, IC, device="cuda", dtype=tdt)
    w = torch.randn(OC, IC, device="cuda", dtype=tdt) * 0.02
    out = torch.empty(N, OC, device="cuda", dtype=tdt)
    report_flops(benchmark, ceilings, f"torch.matmul {IC}->{OC} (peer, no bias) {_name(dtype)}",
                 lambda: torch.matmul(x, w.t(), out=out), 2 * N * IC * OC, _name(dtype))


# dinp, dweight (cuBLAS) and dbias (the bias kernels); for fcproj the DGELU epilogue's dinp
# through GELU's derivative, as the step runs it
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("OC,IC", MATMULS)
def test_matmul_backward(benchmark, ceilings, dtype, OC, IC):
    from llmcu.cuda.matmul import matmul_backward, matmul_dgelu_backward
    x, w, dout = _rand((B, T, IC), dtype), _rand((OC, IC), dtype, 0.02), _rand((B, T, OC), dtype)
    dinp, dw, db = _empty((B, T, IC), dtype), _rand((OC, IC), dtype, 0.0), _rand((OC,), dtype, 0.0)
    if IC == 4 * C:
        pre = _rand((B, T, IC), dtype)
        name, run = "matmul_dgelu_backward", lambda: matmul_dgelu_backward(dinp, dw, db, dout, x, w, pre)
    else:
        name, run = "matmul_backward", lambda: matmul_backward(dinp, dw, db, dout, x, w)
    report_flops(benchmark, ceilings, f"{name} {IC}->{OC} (dinp, dweight, dbias) {_name(dtype)}", run,
                 4 * N * IC * OC, _name(dtype))


# The bias gradient alone: matmul_bias_backward_kernel2 + _reduce_kernel2 (the fp32
# partials, under 1 MB, not counted).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("OC", [pytest.param(C, id="768"), pytest.param(3 * C, id="2304"),
                                pytest.param(4 * C, id="3072")])
def test_matmul_bias_backward(benchmark, ceilings, dtype, OC):
    from llmcu.cuda.matmul import matmul_bias_backward
    s = np.dtype(dtype).itemsize
    dout, db = _rand((B, T, OC), dtype), _rand((OC,), dtype, 0.0)
    # dout read once, dbias read and written
    report_bytes(benchmark, ceilings, f"matmul_bias_backward OC={OC} {_name(dtype)}",
                 lambda: matmul_bias_backward(db, dout), N * OC * s + 2 * OC * s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_forward(benchmark, ceilings, dtype):  # the Llama step's residual adds
    from llmcu.cuda.residual import residual_forward
    s = np.dtype(dtype).itemsize
    a, b, out = _rand((B, T, C), dtype), _rand((B, T, C), dtype), _empty((B, T, C), dtype)
    report_bytes(benchmark, ceilings, f"residual_forward {_name(dtype)}",
                 lambda: residual_forward(out, a, b), 3 * a.size * s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_classifier(benchmark, ceilings, dtype):
    import cupy
    from llmcu.cuda.classifier import fused_classifier_dlogits
    s = np.dtype(dtype).itemsize
    logits0 = _rand((B, T, Vp), dtype, 3.0)
    logits = cupy.empty_like(logits0)
    targets = cupy.asarray(np.random.default_rng(0).integers(0, V, (B, T)), dtype=np.int32)
    losses = _empty((B, T), np.float32)

    def run():  # the kernel overwrites logits with dlogits: start each round from the same logits
        fused_classifier_dlogits(logits, losses, targets, V, 1.0 / N)
    logits[...] = logits0
    # logits read once and dlogits written once at the minimum (the kernel reads the row twice)
    report_bytes(benchmark, ceilings, f"fused_classifier (dlogits in place) {_name(dtype)}",
                 run, 2 * N * Vp * s + N * 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_forward(benchmark, ceilings, dtype):
    from llmcu.cuda.classifier import softmax_forward
    s = np.dtype(dtype).itemsize
    logits, probs = _rand((B, T, Vp), dtype, 3.0), _empty((B, T, Vp), np.float32)
    report_bytes(benchmark, ceilings, f"softmax_forward {_name(dtype)}",
                 lambda: softmax_forward(probs, logits, V), N * Vp * (s + 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_norm(benchmark, ceilings, dtype):
    from llmcu.cuda.adamw import global_norm
    s = np.dtype(dtype).itemsize
    g = _rand((NPARAMS,), dtype)
    report_bytes(benchmark, ceilings, f"global_norm {_name(dtype)} (+ finish, host read)",
                 lambda: global_norm(g), NPARAMS * s)


# per parameter: grads, m, v read; params, m, v written; params read without master
# weights, the fp32 master read and written with them. adamw_update: the eager step's
# (a launch per tensor; one over everything here), adamw_multi_tensor: the graph step's.
@pytest.mark.parametrize("multi", [False, True], ids=["adamw_update", "adamw_multi_tensor"])
@pytest.mark.parametrize("mode", ["fp32", "bf16+master", "bf16"])
def test_adamw(benchmark, ceilings, mode, multi):
    import cupy
    from llmcu.cuda.adamw import adamw_hyper, adamw_multi_tensor, adamw_tensor_table, adamw_update
    dtype = np.float32 if mode == "fp32" else np.uint16
    s = np.dtype(dtype).itemsize
    p, g = _rand((NPARAMS,), dtype), _rand((NPARAMS,), dtype)
    m, v = _rand((NPARAMS,), np.float32, 0.0), _rand((NPARAMS,), np.float32, 0.0)
    master = _rand((NPARAMS,), np.float32) if mode == "bf16+master" else None
    nbytes = NPARAMS * ((2 if master is not None else 3) * s + 16 + (8 if master is not None else 0))
    if multi:
        table = adamw_tensor_table(cupy, [slice(0, NPARAMS)], [0.0])
        hyper = cupy.asarray(adamw_hyper(1e-4, 1))
        seed = cupy.asarray(np.array([42, 1], dtype=np.uint32))
        run = lambda: adamw_multi_tensor(p, g, m, v, table, hyper, seed, master_params=master)  # noqa: E731
    else:
        steps = iter(range(1, 10**6))
        run = lambda: adamw_update(p, g, m, v, next(steps), 1e-4, master_params=master)  # noqa: E731
    report_bytes(benchmark, ceilings, f"{'adamw_multi_tensor' if multi else 'adamw_update'} ({mode}) "
                 f"over {NPARAMS / 1e6:.0f}M params", run, nbytes)
