"""The per-kernel step breakdown (benchmarks/bench_step_breakdown.py) on the emulator, and
matmul_backward(accumulate_weight=False), which the kernel GPT-2 uses on the first
backward after zero_grad.

The breakdown's op times on the emulator are CPU times and say nothing about a GPU;
what is checked is that every op the model runs is timed, once per call, at the right
layer, with napkin figures from the shapes, that the times add up, that the JSON has
what the GPU run will be read for, and that timing changes nothing in the step.
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu import matmul as cpu_matmul
from llmcu.cpu.gpt2 import init_parameters
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_step_breakdown as bench  # noqa: E402

L, C, NH, V, B, T = 2, 64, 4, 500, 2, 16
# max_seq_len 1024: the benchmark's (llm.c's) for every descriptor
TINY = GPT2Config(max_seq_len=1024, vocab_size=V, num_layers=L, num_heads=NH, channels=C)
DTYPES = ["fp32", "bf16"]

# GPT-2's layer, calls per layer and phase in the product step: the residual adds fused into
# the layernorms (residual_layernorm_forward: residual2 + ln2, residual3[l-1] + ln1 of layer l,
# counted at l by its ln1 parameters; layernorm_backward_add), the GELU into the fc GEMM and
# its gradient into the fc projection's backward GEMM (matmul_[d]gelu_*).
PER_LAYER = {
    "forward": {"layernorm_forward": 0, "residual_layernorm_forward": 2, "matmul_forward": 3,
                "matmul_gelu_forward": 1, "flash_attention_forward": 1},
    "backward": {"layernorm_backward": 0, "layernorm_backward_add": 2, "matmul_backward": 3,
                 "matmul_dgelu_backward": 1, "flash_attention_backward": 1},
}
# Layer 0's ln1 normalises the embeddings: a plain layernorm, no residual add before it.
LAYER0 = {("forward", "layernorm_forward"): 1, ("forward", "residual_layernorm_forward"): 1}
# Once per step, outside the layers: embeddings, final residual add + layernorm, LM head,
# loss; the final layernorm's backward overwrites the residual gradient (no add).
ONCE = {("forward", "encoder_forward"): 1, ("forward", "residual_layernorm_forward"): 1,
        ("forward", "matmul_forward"): 1, ("forward", "crossentropy_forward"): 1,
        ("backward", "fused_classifier_dlogits"): 1, ("backward", "matmul_backward"): 1,
        ("backward", "layernorm_backward"): 1, ("backward", "encoder_backward"): 1,
        ("update", "global_norm"): 1, ("zero_grad", "zero_grad"): 1}
ROLES = {("forward", "matmul_forward"): ("qkv", "attproj", "fcproj"), ("forward", "matmul_gelu_forward"): ("fc",),
         ("backward", "matmul_backward"): ("qkv", "attproj", "fc"), ("backward", "matmul_dgelu_backward"): ("fcproj",)}


def _count_calls(dtype):
    """What one step of the kernel model calls, counted by plain counters swapped in here
    (independently of the benchmark's wrappers): Counter of function names."""
    from llmcu.cuda import gpt2 as kgpt2
    from llmcu.cuda import mixed_precision
    counts = collections.Counter()
    saved = []

    def counting(name, fn):
        def f(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return f
    owners = [(kgpt2.KERNEL_OPS, n) for n in vars(kgpt2.KERNEL_OPS)]
    owners += [(kgpt2, "crossentropy_forward"), (kgpt2, "fused_classifier_dlogits"),
               (mixed_precision, "adamw_update")]
    model = kgpt2.GPT2(TINY, init_parameters(TINY, seed=3), device="emu", dtype=dtype)
    x, y = _batch()
    bench.train_step(model, x, y, 1)  # allocate everything first, as the benchmark's warm-up
    try:
        for owner, name in owners:
            saved.append((owner, name, getattr(owner, name)))
            # the fp32 update calls KERNEL_OPS' adamw_update, the bf16 one mixed_precision's:
            # the same function, counted once per call whichever way it is reached
            setattr(owner, name, counting(name, getattr(owner, name)))
        bench.train_step(model, x, y, 2)
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    counts["zero_grad"] = 1  # a method of the model, called once by train_step
    return counts


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, V, (B, T)).astype(np.int32), rng.integers(0, V, (B, T)).astype(np.int32))


@pytest.fixture(scope="module", params=DTYPES)
def breakdown(request, tmp_path_factory):
    """main() run as the GPU check runs it, on the emulator, for a tiny model: (dtype, JSON)."""
    path = tmp_path_factory.mktemp("breakdown") / "out.json"
    rc = bench.main(["--device", "emu", "--dtype", request.param, "--num-layers", str(L),
                     "--channels", str(C), "--num-heads", str(NH), "--vocab-size", str(V),
                     "-b", str(B), "-t", str(T), "--steps", "2", "--profile-steps", "1",
                     "--warmup", "1", "--json", str(path)])
    assert rc == 0
    return request.param, json.loads(path.read_text())


def test_json_has_the_expected_keys(breakdown):
    dtype, r = breakdown
    for key in ("card", "device", "dtype", "B", "T", "config", "ceilings", "step_ms", "step_ms_all",
                "step_ms_instrumented", "instrumentation_ms", "ops_ms", "gap_ms", "gap_pct", "loss",
                "ops", "top5", "calls", "args"):
        assert key in r, key
    assert (r["device"], r["dtype"], r["B"], r["T"]) == ("emu", dtype, B, T)
    assert r["config"]["num_layers"] == L and r["config"]["vocab_size"] == V
    assert r["ceilings"] is None  # no GPU: not measured, never estimated
    from llmcu.cuda.gpt2 import step_kernels
    assert r["kernels"] == {op: list(k) for op, k in step_kernels(TINY, dtype).items()}
    assert len(r["step_ms_all"]) == 2
    for row in r["ops"]:
        for key in ("op", "calls", "ms", "pct_of_step", "kind", "amount", "gb_s", "tflop_s",
                    "pct_of_ceiling"):
            assert key in row, (row["op"], key)
        assert row["pct_of_ceiling"] is None
    assert np.isfinite(r["loss"]) and r["loss"] > 0


def test_every_op_the_model_runs_is_timed_once_per_call(breakdown):
    dtype, r = breakdown
    recorded = collections.Counter(c["op"] for c in r["calls"])
    assert recorded == _count_calls(dtype)
    # ... and each one is in the ops namespace the model runs on (or one of the three
    # calls outside it: the classifier's two, zero_grad)
    from llmcu.cuda.gpt2 import KERNEL_OPS
    outside = {"crossentropy_forward", "fused_classifier_dlogits", "zero_grad"}
    assert set(recorded) <= set(vars(KERNEL_OPS)) | outside
    assert sum(row["calls"] for row in r["ops"]) == len(r["calls"])


def test_per_layer_counts_equal_the_architecture(breakdown):
    _, r = breakdown
    per = collections.Counter((c["phase"], c["op"], c["layer"]) for c in r["calls"])
    for phase, ops in PER_LAYER.items():
        for op, n in ops.items():
            for layer in range(L):
                want = LAYER0.get((phase, op), n) if layer == 0 else n
                assert per[(phase, op, layer)] == want, (phase, op, layer, per[(phase, op, layer)])
    for (phase, op), n in ONCE.items():
        assert per[(phase, op, None)] == n, (phase, op)
    # one AdamW call per parameter tensor (16 in GPT-2), none tied to a layer
    assert per[("update", "adamw_update", None)] == len(TINY.parameter_shapes())
    assert {c["layer"] for c in r["calls"]} == set(range(L)) | {None}
    # the four Linear layers of each layer by role, the LM head once
    roles = collections.Counter((c["phase"], c["op"], c["role"]) for c in r["calls"]
                                if c["op"].startswith("matmul_"))
    assert roles == {**{(phase, op, role): L for (phase, op), names in ROLES.items() for role in names},
                     ("forward", "matmul_forward", "lm_head"): 1, ("backward", "matmul_backward", "lm_head"): 1}


def test_times_are_consistent(breakdown):
    _, r = breakdown
    times = [c["ms"] for c in r["calls"]]
    assert min(times) >= 0
    # the op intervals are disjoint pieces of the instrumented step (one clock); 1e-9
    # relative allows only the float rounding of the sum
    assert sum(times) <= r["step_ms_instrumented"] * (1 + 1e-9)
    assert r["ops_ms"] == pytest.approx(sum(times), rel=1e-12)
    assert r["gap_ms"] == pytest.approx(r["step_ms"] - r["ops_ms"], rel=1e-12, abs=1e-12)
    assert r["step_ms"] == pytest.approx(float(np.median(r["step_ms_all"])), rel=1e-12)
    ms = [row["ms"] for row in r["ops"]]
    assert ms == sorted(ms, reverse=True)
    assert r["top5"] == [row["op"] for row in r["ops"][:5]]
    for row in r["ops"]:
        assert row["pct_of_step"] == pytest.approx(100 * row["ms"] / r["step_ms_instrumented"])


def test_napkin_figures_follow_the_shapes(breakdown):
    dtype, r = breakdown
    ops = {row["op"]: row for row in r["ops"]}
    N = B * T
    # a Linear layer's forward: 2*N*C*OC flops per layer; its backward twice (dinp and dweight)
    for role, (OC, IC) in {"qkv": (3 * C, C), "attproj": (C, C), "fc": (4 * C, C),
                           "fcproj": (C, 4 * C)}.items():
        fwd = "matmul_gelu_forward" if role == "fc" else "matmul_forward"
        bwd = "matmul_dgelu_backward" if role == "fcproj" else "matmul_backward"
        assert (ops[f"{fwd}[{role}]"]["amount"], ops[f"{bwd}[{role}]"]["amount"]) == (L * 2 * N * IC * OC,
                                                                                   L * 4 * N * IC * OC)
    Vp = r["config"]["padded_vocab_size"]
    assert ops["matmul_forward[lm_head]"]["amount"] == 2 * N * C * Vp
    # attention: llm.c's 6LCT per token, split 1:2 between forward and backward
    assert ops["flash_attention_forward"]["amount"] == L * 2 * B * T * T * C
    assert ops["flash_attention_backward"]["amount"] == L * 4 * B * T * T * C
    # memory-bound: the classifier reads the logits, writes dlogits over them, the targets, the losses
    item = 4 if dtype == "fp32" else 2
    assert ops["fused_classifier_dlogits"]["amount"] == 2 * N * Vp * item + 2 * N * 4
    assert ops["global_norm"]["amount"] == TINY.num_parameters() * item
    for row in r["ops"]:
        rate = row["gb_s"] if row["kind"] == "bytes" else row["tflop_s"]
        if row["ms"] > 0:
            scale = 1e9 if row["kind"] == "bytes" else 1e12
            assert rate == pytest.approx(row["amount"] / (row["ms"] * 1e-3) / scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_instrumentation_does_not_change_the_step(dtype):
    """One step with every op timed against the same step untimed, from the same init:
    the same loss, parameters and gradients, bit for bit; the functions are put back."""
    from llmcu.cuda import gpt2 as kgpt2
    from llmcu.cuda import mixed_precision
    before = dict(vars(kgpt2.KERNEL_OPS))
    params = init_parameters(TINY, seed=11)
    x, y = _batch(1)
    plain = kgpt2.GPT2(TINY, params.copy(), device="emu", dtype=dtype)
    timed = kgpt2.GPT2(TINY, params.copy(), device="emu", dtype=dtype)
    loss_plain = bench.train_step(plain, x, y, 1)
    loss_timed, step_ms, calls = bench.profiled_step(timed, x, y, 1, bench.WallClock())
    assert len(calls) > 0 and step_ms > 0
    assert loss_timed == loss_plain
    np.testing.assert_array_equal(timed.params, plain.params)
    np.testing.assert_array_equal(timed.grads, plain.grads)
    assert vars(kgpt2.KERNEL_OPS) == before
    assert mixed_precision.adamw_update is kgpt2.KERNEL_OPS.adamw_update
    assert "zero_grad" not in vars(timed)


def test_rates_against_given_ceilings():
    """With ceilings (on a GPU: measured in the same run; here made-up numbers, only the
    arithmetic is checked) each op's rate is set against its own: bytes against the copy
    bandwidth, flops against the GEMM rate of the step's dtype, not the other one."""
    ceilings = {"copy_gb_s": 3.0, "gemm_fp32_tflops": 5.0, "gemm_bf16_tflops": 7.0}
    r = bench.run_breakdown(TINY, B, T, "bf16", "emu", steps=1, profile_steps=1, warmup=0,
                            ceilings=ceilings)
    kinds = set()
    for row in r["ops"]:
        if row["ms"] <= 0:
            continue
        kinds.add(row["kind"])
        if row["kind"] == "bytes":
            assert row["pct_of_ceiling"] == pytest.approx(100 * row["gb_s"] / 3.0)
        else:
            assert row["pct_of_ceiling"] == pytest.approx(100 * row["tflop_s"] / 7.0)
    assert kinds == {"bytes", "flops"}
    lines = []
    bench.print_report(r, log=lines.append)
    text = "\n".join(lines)
    assert "copy 3 GB/s" in text and "GEMM bf16 7.0 TFLOP/s" in text and "top 5 by time" in text


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="run_breakdown: steps"):
        bench.run_breakdown(TINY, B, T, "fp32", "emu", steps=0)


# ------------------------------------------------ matmul_backward(accumulate_weight=False)

BACKENDS_CPU_FIRST = [pytest.param("cpu", id="cpu")] + KERNEL_BACKENDS
U = 2.0 ** -8  # bf16 unit roundoff (tests/helpers.py): one rounding moves y by <= U*|y|
F32 = 1e-5     # fp32: summation order (tests/kernels/)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS_CPU_FIRST)
def test_matmul_backward_overwrites_without_accumulate(backend, dtype, bias):
    """accumulate_weight=False: dweight and dbias are overwritten (=), NaN-poisoned first
    so an add would leave NaN; dinp as always. Reference in float64."""
    if backend == "cpu" and dtype == np.uint16:
        pytest.skip("the NumPy oracle is float32 only")
    if backend == "cpu":
        mod, dev = cpu_matmul, Device("emu")  # NumPy arrays
    else:
        from llmcu.cuda import matmul as mod
        dev = Device(backend)
    rng = np.random.default_rng(21)
    N0, N1, IC, OC = 3, 5, 48, 40
    x, w, dout = (rng.standard_normal(s).astype(np.float32) for s in
                  ((N0, N1, IC), (OC, IC), (N0, N1, OC)))
    if dtype == np.uint16:  # the bf16 values the kernels see, widened exactly for the reference
        x, w, dout = (bf16_bits_to_float32(float32_to_bf16_bits(a)) for a in (x, w, dout))
        put = lambda a: dev.put(float32_to_bf16_bits(a))  # noqa: E731
        value = bf16_bits_to_float32
    else:
        put, value = dev.put, np.asarray
    dinp = dev.poisoned((N0, N1, IC), dtype)
    dw = dev.poisoned((OC, IC), dtype)
    db = dev.poisoned((OC,), dtype) if bias else None
    mod.matmul_backward(dinp, dw, db, put(dout), put(x), put(w), accumulate_weight=False)
    d2, x2 = dout.reshape(-1, OC).astype(np.float64), x.reshape(-1, IC).astype(np.float64)
    want = {"dinp": d2 @ w.astype(np.float64), "dweight": d2.T @ x2, "dbias": d2.sum(axis=0)}
    got = {"dinp": dinp, "dweight": dw, "dbias": db}
    for name, ref in want.items():
        if name == "dbias" and not bias:
            continue
        # fp32: summation order only; bf16: one rounding of the fp32 result (rtol U)
        scale = float(np.abs(ref).max())
        tol = dict(atol=F32 * scale, rtol=F32 + (U if dtype == np.uint16 else 0.0))
        assert_close(f"matmul {name}", value(dev.get(got[name])).reshape(ref.shape),
                     ref.reshape(ref.shape), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_backward_after_zero_grad_overwrites(dtype):
    """The kernel GPT-2's first backward after zero_grad overwrites the GEMM weight and
    bias gradients: NaN put there after zero_grad is gone, and the gradients equal, bit for
    bit, those of the same backward adding onto the zeros; a second micro-step (gradient
    accumulation) adds, again equal to the all-adding run."""
    from llmcu.cuda.gpt2 import GPT2
    params = init_parameters(TINY, seed=13)
    (x1, y1), (x2, y2) = _batch(2), _batch(3)
    fast = GPT2(TINY, params.copy(), device="emu", dtype=dtype)
    slow = GPT2(TINY, params.copy(), device="emu", dtype=dtype)
    nan = np.float32("nan") if dtype == "fp32" else np.uint16(0x7FC0)
    written_by_gemms = ("wte", "qkvw", "qkvb", "attprojw", "attprojb", "fcw", "fcb",
                        "fcprojw", "fcprojb")
    for model in (fast, slow):
        model.forward(x1, y1)
        model.zero_grad()
    for name in written_by_gemms:
        fast.g[name][...] = nan
    slow._grads_zeroed = False  # the old path: every GEMM gradient added onto the zeros
    fast.backward(loss_scale=0.5)
    slow.backward(loss_scale=0.5)
    assert not fast._grads_zeroed
    for name in written_by_gemms:
        assert np.isfinite(_float(fast.g[name], dtype)).all(), name
    np.testing.assert_array_equal(fast.grads, slow.grads)
    once = _float(fast.grads, dtype).copy()
    for model in (fast, slow):  # the second micro-step accumulates
        model.forward(x2, y2)
        model.backward(loss_scale=0.5)
    np.testing.assert_array_equal(fast.grads, slow.grads)
    moved = parameter_views(TINY, _float(fast.grads, dtype) - once)
    assert all(np.abs(moved[n]).max() > 0 for n in written_by_gemms if n != "wte")


def _float(a, dtype):
    a = np.asarray(a)
    return bf16_bits_to_float32(a) if dtype == "bf16" else a
