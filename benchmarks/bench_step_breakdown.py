"""Per-kernel time breakdown of one llmcu GPT-2 training step, beside the card's ceilings.

    python benchmarks/bench_step_breakdown.py [-e d12] [--dtype bf16|fp32] [-b 16] [-t 1024]
                                              [--steps 10] [--profile-steps 3] [--json out.json]
    python benchmarks/bench_step_breakdown.py --device emu -e d12 --num-layers 2 --channels 64 \\
        --num-heads 4 --vocab-size 500 -b 2 -t 16          # the kernels on the CPU (tests)

One step is train_step's (llmcu/train.py) with accumulation 1: zero_grad,
forward, backward, grad norm, AdamW update (lr 1e-4, weight decay 0.1, clip 1.0).
After --warmup steps (the first compiles the kernels), it reports:

- the step WITHOUT instrumentation: the median of --steps steps, each timed by
  a pair of CUDA events around the whole step (as bench_gpu_step.py's
  step_time);
- --profile-steps steps WITH every op timed, of which the one with the median
  total is reported: a CUDA event pair recorded on the current stream around
  each call of a layer function (every function of llmcu.cuda.gpt2.KERNEL_OPS,
  the classifier's two calls, AdamW and the global norm of the bf16 update, and
  zero_grad), one synchronize at the end, none per op. The model's code is not
  changed: the functions are swapped for timing wrappers for the step and put
  back after it (instrument()). A wrapper called inside another one is not
  timed again, so the op times are disjoint intervals of the step.

The step is the product step, one kernel per op (the JSON's "kernels":
GPT2.kernel_table()); a lab version is timed by benchmarks/lab.py, and here
once it is the default.

gap = uninstrumented step - sum of the op times: what runs between the ops
(Python, launch latency, the host syncs of the loss and the grad norm, the
input copies). instrumented - uninstrumented step: what the events cost.

Each op carries a napkin figure from its arguments' shapes: bytes for the
memory-bound ops (every input read once, every output written once,
read-modify-write twice; per-row statistics and weights counted once) and
flops for the GEMMs (2*M*N*K, dinp and dweight for a backward; the GELU in the
fc GEMM's epilogue is not counted) and attention
(llm.c's causal count, the attention part of 6N + 6LCT: 2*B*T*T*C forward,
twice that backward). Achieved GB/s or TFLOP/s are set against the ceilings
measured first in the same run by benchmarks/bench_kernels.py's
measure_ceilings (device copy bandwidth; fp32 and bf16 GEMM rate), the GEMM
ceiling of the step's dtype.

--device emu runs the same kernels on the CPU (llmcu.emu) and times each op
with time.perf_counter: the code paths are exercised (tests/
test_step_breakdown.py), the times say nothing about a GPU, and no ceiling is
measured ("not measured").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LR, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 0.1, 1.0

# The GEMM role of a matmul, from the parameter its weight is.
MATMUL_ROLES = {"qkvw": "qkv", "attprojw": "attproj", "fcw": "fc", "fcprojw": "fcproj",
                "wte": "lm_head"}


# ----------------------------------------------------------------------------- clocks

class WallClock:
    """time.perf_counter marks (the emulator: everything runs synchronously)."""
    name = "time.perf_counter"

    def mark(self):
        return time.perf_counter()

    def sync(self):
        pass

    def ms(self, start, end) -> float:
        return (end - start) * 1e3


class CudaClock:
    """CUDA events recorded on the current stream; ms() after sync()."""
    name = "CUDA events"

    def __init__(self):
        import cupy
        self._cupy = cupy

    def mark(self):
        event = self._cupy.cuda.Event()
        event.record()
        return event

    def sync(self):
        self._cupy.cuda.get_current_stream().synchronize()

    def ms(self, start, end) -> float:
        return float(self._cupy.cuda.get_elapsed_time(start, end))


# ----------------------------------------------------------------------------- napkin math

def _nbytes(*arrays) -> int:
    return int(sum(a.nbytes for a in arrays if a is not None))


def napkin(op, args, kwargs):
    """("bytes", n) or ("flops", n) for one call of `op` with these arguments (module doc)."""
    arg = dict(kwargs)
    if op == "matmul_forward":
        out, inp, weight = args[:3]
        OC, C = weight.shape
        return "flops", 2 * (inp.size // C) * C * OC
    if op == "matmul_backward":
        dinp, _, _, _, inp, weight = args[:6]
        OC, C = weight.shape
        return "flops", 2 * (inp.size // C) * C * OC * (2 if dinp is not None else 1)
    if op == "matmul_gelu_forward":  # (out, pre, inp, weight, bias): the GEMM, GELU in its epilogue
        inp, weight = args[2:4]
        OC, C = weight.shape
        return "flops", 2 * (inp.size // C) * C * OC
    if op == "matmul_dgelu_backward":  # (dpre, dweight, dbias, dout, inp, weight, pre): two GEMMs
        inp, weight = args[4:6]
        OC, C = weight.shape
        return "flops", 4 * (inp.size // C) * C * OC
    if op in ("flash_attention_forward", "flash_attention_backward"):
        qkv = args[2]
        B, T, C3 = qkv.shape
        return "flops", 2 * B * T * T * (C3 // 3) * (2 if op.endswith("backward") else 1)
    if op == "encoder_forward":
        out, inp = args[:2]
        return "bytes", 3 * out.nbytes + inp.nbytes
    if op == "encoder_backward":
        dwte, dwpe, dout, inp = args[:4]
        T = inp.shape[1]
        return "bytes", dout.nbytes + inp.nbytes + 2 * dout.nbytes + 2 * dwpe[:T].nbytes
    if op == "layernorm_forward":
        return "bytes", _nbytes(*args[:6])
    if op == "layernorm_backward":
        dinp, dw, db, dout, inp, w, mean, rstd = args[:8]
        return "bytes", _nbytes(dinp, dout, inp, w, mean, rstd) + 2 * _nbytes(dw, db)
    if op == "residual_layernorm_forward":  # reads inp1, inp2, weight, bias; writes residual, out, stats
        return "bytes", _nbytes(*args[:8])
    if op == "layernorm_backward_add":  # dres read-modify-write, dweight/dbias accumulated
        dres, dw, db, dout, inp, w, mean, rstd = args[:8]
        return "bytes", 2 * _nbytes(dres, dw, db) + _nbytes(dout, inp, w, mean, rstd)
    if op == "crossentropy_forward":
        return "bytes", _nbytes(*args[:3])
    if op == "fused_classifier_dlogits":  # reads the logits, writes dlogits in their place
        logits, losses, targets = args[:3]
        return "bytes", 2 * logits.nbytes + _nbytes(losses, targets)
    if op == "adamw_update":
        params, grads, m, v = args[:4]
        master = arg.get("master_params", args[11] if len(args) > 11 else None)
        return "bytes", 2 * _nbytes(params, m, v, master) + grads.nbytes
    if op == "global_norm":
        return "bytes", args[0].nbytes
    if op == "zero_grad":
        return "bytes", args[0].nbytes  # the gradients, written once (the wrapper passes them)
    return None, None


# ----------------------------------------------------------------------------- instrumentation

def _address(a):
    if hasattr(a, "data") and hasattr(a.data, "ptr"):  # CuPy
        return a.data.ptr
    return a.__array_interface__["data"][0]


def tensor_map(model) -> dict:
    """{(address, shape): (kind, name, layer)} for the model's parameter and gradient
    (kind "param") and activation ("act") tensors: per-layer tensors (leading L axis)
    one entry per layer, the rest with layer None."""
    from llmcu.cuda.gpt2 import ACTIVATIONS
    L = model.config.num_layers
    found = {}

    def add(kind, name, a, per_layer):
        if per_layer:
            for layer in range(L):
                found[(_address(a[layer]), tuple(a[layer].shape))] = (kind, name, layer)
        else:
            found[(_address(a), tuple(a.shape))] = (kind, name, None)

    layered_params = {"ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b",
                      "fcw", "fcb", "fcprojw", "fcprojb"}
    for views in (model.p, model.g or {}):
        for name, a in views.items():
            add("param", name, a, name in layered_params)
    if model.acts is not None:
        for name, code in ACTIVATIONS:
            add("act", name, getattr(model.acts, name), code.startswith("L"))
    return found


@dataclass
class Call:
    phase: str
    op: str
    role: str | None
    layer: int | None
    start: object = field(repr=False)
    end: object = field(repr=False)
    kind: str | None
    amount: int | None
    ms: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.op}[{self.role}]" if self.role else self.op


class Recorder:
    """Collects one Call per outermost wrapped call while active."""

    def __init__(self, clock, tensors):
        self.clock, self.tensors = clock, tensors
        self.calls: list[Call] = []
        self.phase = "step"
        self.active = False
        self._depth = 0

    def locate(self, op, args):
        """(role, layer) of a call. A parameter or gradient among its arguments gives the
        layer (None for lnf's, wte's: not per layer), else the first per-layer activation.
        A matmul's role is its weight's (MATMUL_ROLES)."""
        hits = [self.tensors.get((_address(a), tuple(a.shape))) for a in args
                if hasattr(a, "shape") and hasattr(a, "dtype")]
        hits = [h for h in hits if h is not None]
        params = [h for h in hits if h[0] == "param"]
        layered = [h for h in hits if h[2] is not None]
        layer = params[0][2] if params else layered[0][2] if layered else None
        role = None
        if op.startswith("matmul_"):
            w = args[{"matmul_forward": 2, "matmul_gelu_forward": 3}.get(op, 5)]
            role = MATMUL_ROLES.get(self.tensors.get((_address(w), tuple(w.shape)), ("", "", None))[1])
        return role, layer

    def wrap(self, op, fn):
        def timed(*args, **kwargs):
            if not self.active or self._depth:
                return fn(*args, **kwargs)
            role, layer = self.locate(op, args)
            kind, amount = napkin(op, args, kwargs)
            self._depth += 1
            try:
                start = self.clock.mark()
                result = fn(*args, **kwargs)
                end = self.clock.mark()
            finally:
                self._depth -= 1
            self.calls.append(Call(self.phase, op, role, layer, start, end, kind, amount))
            return result
        timed.__wrapped__ = fn
        return timed

    def finish(self):
        """Synchronize once and turn every call's event pair into milliseconds."""
        self.clock.sync()
        for c in self.calls:
            c.ms = self.clock.ms(c.start, c.end)
            c.start = c.end = None


@contextlib.contextmanager
def instrument(model, recorder):
    """Swap the layer functions the model calls for recorder's timing wrappers, for the
    duration of the block: every function of KERNEL_OPS (the layer sequence, the fp32
    update's AdamW and global norm), the classifier calls of llmcu/cuda/gpt2.py, the bf16
    update's AdamW and global norm (llmcu/cuda/mixed_precision.py), and model.zero_grad."""
    from llmcu.cuda import gpt2 as kgpt2
    from llmcu.cuda import mixed_precision
    swapped = []

    def swap(owner, name):
        original = getattr(owner, name)
        swapped.append((owner, name, original))
        setattr(owner, name, recorder.wrap(name, original))

    for name in list(vars(kgpt2.KERNEL_OPS)):
        swap(kgpt2.KERNEL_OPS, name)
    for name in ("crossentropy_forward", "fused_classifier_dlogits"):
        swap(kgpt2, name)
    for name in ("adamw_update", "global_norm"):
        swap(mixed_precision, name)
    zero_grad = type(model).zero_grad

    def zero_grad_timed():  # the same method; the napkin's argument: the gradients (or, before
        # they exist, the parameters: the same size and dtype)
        target = model.grads if model.grads is not None else model.params
        return recorder.wrap("zero_grad", lambda grads: zero_grad(model))(target)
    model.zero_grad = zero_grad_timed
    try:
        yield recorder
    finally:
        del model.zero_grad
        for owner, name, original in reversed(swapped):
            setattr(owner, name, original)


# ----------------------------------------------------------------------------- the step

def train_step(model, x, y, step, recorder=None):
    """train_step's work with accumulation 1 (llmcu/train.py); returns the loss. With a
    recorder, each part sets its phase (zero_grad, forward, backward, update)."""
    def phase(name):
        if recorder is not None:
            recorder.phase = name
    phase("zero_grad")
    model.zero_grad()
    phase("forward")
    loss = model.forward(x, y)
    phase("backward")
    model.backward()
    phase("update")
    norm = model.grad_norm()
    model.update(LR, step, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, grad_norm=norm)
    return loss


def timed_step(model, x, y, step, clock):
    """(loss, ms) of one uninstrumented step, marks around the whole step."""
    start = clock.mark()
    loss = train_step(model, x, y, step)
    end = clock.mark()
    clock.sync()
    return loss, clock.ms(start, end)


def profiled_step(model, x, y, step, clock):
    """(loss, ms of the whole step, [Call]) of one step with every op timed."""
    recorder = Recorder(clock, tensor_map(model))
    with instrument(model, recorder):
        recorder.active = True
        start = clock.mark()
        loss = train_step(model, x, y, step, recorder)
        end = clock.mark()
        recorder.active = False
    recorder.finish()
    return loss, clock.ms(start, end), recorder.calls


def aggregate(calls, step_ms, ceilings, dtype):
    """Per op (key: op, with a matmul's role): calls, total ms, % of the step, napkin
    amount, achieved rate and % of its ceiling; sorted by total time, largest first."""
    rows = {}
    for c in calls:
        r = rows.setdefault(c.key, {"op": c.key, "calls": 0, "ms": 0.0, "kind": c.kind, "amount": 0})
        r["calls"] += 1
        r["ms"] += c.ms
        r["amount"] += c.amount or 0
    out = []
    for r in rows.values():
        r["pct_of_step"] = 100.0 * r["ms"] / step_ms if step_ms > 0 else None
        seconds = r["ms"] * 1e-3
        r["gb_s"] = r["tflop_s"] = r["pct_of_ceiling"] = None
        if r["kind"] == "bytes" and seconds > 0:
            r["gb_s"] = r["amount"] / seconds / 1e9
            if ceilings:
                r["pct_of_ceiling"] = 100.0 * r["gb_s"] / ceilings["copy_gb_s"]
        elif r["kind"] == "flops" and seconds > 0:
            r["tflop_s"] = r["amount"] / seconds / 1e12
            if ceilings:
                r["pct_of_ceiling"] = 100.0 * r["tflop_s"] / ceilings[f"gemm_{dtype}_tflops"]
        out.append(r)
    return sorted(out, key=lambda r: -r["ms"])


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_report(result, log=print):
    r = result
    ceil = r["ceilings"]
    log(f"device: {r['card']}; GPT-2 {r['model']} (L={r['config']['num_layers']}, "
        f"C={r['config']['channels']}, NH={r['config']['num_heads']}, "
        f"V={r['config']['vocab_size']}), B={r['B']}, T={r['T']}, {r['dtype']}; op clock: {r['clock']}")
    if ceil:
        log(f"ceilings (this card, this run): copy {ceil['copy_gb_s']:.0f} GB/s, GEMM fp32 "
            f"{ceil['gemm_fp32_tflops']:.1f} TFLOP/s, GEMM bf16 {ceil['gemm_bf16_tflops']:.1f} TFLOP/s")
    else:
        log("ceilings: not measured (no GPU)")
    log(f"step, uninstrumented: median {r['step_ms']:.3f} ms of {len(r['step_ms_all'])} steps; "
        f"instrumented: {r['step_ms_instrumented']:.3f} ms (instrumentation cost "
        f"{r['instrumentation_ms']:+.3f} ms)")
    log(f"sum of op times {r['ops_ms']:.3f} ms; gap (uninstrumented step - ops: Python, launches, "
        f"host syncs) {r['gap_ms']:.3f} ms = {r['gap_pct']:.1f}% of the step")
    log("%step: of the instrumented step; %ceil: of the copy ceiling (bytes) or the "
        f"{r['dtype']} GEMM ceiling (flops)")
    log(f"{'op':34s} {'calls':>5s} {'ms':>9s} {'%step':>6s} {'napkin':>10s} {'achieved':>14s} "
        f"{'%ceil':>6s}")
    for o in r["ops"]:
        amount = (f"{o['amount'] / 1e6:.1f} MB" if o["kind"] == "bytes"
                  else f"{o['amount'] / 1e9:.3g} GF" if o["kind"] == "flops" else "-")
        rate = (f"{o['gb_s']:.1f} GB/s" if o["gb_s"] is not None
                else f"{o['tflop_s']:.2f} TFLOP/s" if o["tflop_s"] is not None else "-")
        log(f"{o['op']:34s} {o['calls']:5d} {o['ms']:9.3f} {_fmt(o['pct_of_step'], '6.1f'):>6s} "
            f"{amount:>10s} {rate:>14s} {_fmt(o['pct_of_ceiling'], '6.1f'):>6s}")
    log("top 5 by time: " + "; ".join(f"{o['op']} {o['ms']:.3f} ms" for o in r["ops"][:5])
        + f"; gap {r['gap_ms']:.3f} ms")


def run_breakdown(config, B, T, dtype="bf16", device="cuda", steps=10, profile_steps=3,
                  warmup=2, ceilings=None, seed=42, model_name="custom"):
    """Build the kernel GPT-2, warm up, time the uninstrumented and the instrumented
    steps; returns the result dict (the JSON). ceilings: a dict as measure_ceilings's,
    or None (not measured)."""
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.cuda.gpt2 import GPT2
    if steps < 1 or profile_steps < 1 or warmup < 0:
        raise ValueError(f"run_breakdown: steps and profile_steps must be >= 1 and warmup >= 0, "
                         f"got {steps}, {profile_steps}, {warmup}")
    clock = CudaClock() if device == "cuda" else WallClock()
    params = init_parameters(config, seed=seed)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    model = GPT2(config, params, device=device, dtype=dtype)
    step = 0
    for _ in range(warmup):
        step += 1
        train_step(model, x, y, step)
    plain = []
    for _ in range(steps):
        step += 1
        plain.append(timed_step(model, x, y, step, clock)[1])
    profiled = []
    for _ in range(profile_steps):
        step += 1
        profiled.append(profiled_step(model, x, y, step, clock))
    loss, step_instr, calls = sorted(profiled, key=lambda p: p[1])[len(profiled) // 2]
    step_ms = statistics.median(plain)
    ops_ms = sum(c.ms for c in calls)
    card = "CPU (llmcu.emu)"
    if device == "cuda":
        from llmcu.mfu import device_name
        card = device_name()
    ops = aggregate(calls, step_instr, ceilings, dtype)
    return {
        "card": card, "device": device, "model": model_name, "dtype": dtype, "B": B, "T": T,
        "kernels": {op: list(k) for op, k in model.kernel_table().items()},
        "config": {"num_layers": config.num_layers, "channels": config.channels,
                   "num_heads": config.num_heads, "vocab_size": config.vocab_size,
                   "padded_vocab_size": config.padded_vocab_size},
        "clock": clock.name, "ceilings": ceilings or None,
        "step_ms": step_ms, "step_ms_all": plain, "step_ms_instrumented": step_instr,
        "instrumentation_ms": step_instr - step_ms, "ops_ms": ops_ms,
        "gap_ms": step_ms - ops_ms, "gap_pct": 100.0 * (step_ms - ops_ms) / step_ms,
        "loss": loss, "ops": ops, "top5": [o["op"] for o in ops[:5]],
        "calls": [{"phase": c.phase, "op": c.op, "role": c.role, "layer": c.layer, "ms": c.ms,
                   "kind": c.kind, "amount": c.amount} for c in calls],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-e", "--model", default="d12", help="llm.c depth descriptor (d6, d12, d24, ...)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("-b", "--batch-size", type=int, default=16)
    ap.add_argument("-t", "--seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cuda", choices=["cuda", "emu"])
    ap.add_argument("--steps", type=int, default=10, help="uninstrumented steps (median)")
    ap.add_argument("--profile-steps", type=int, default=3,
                    help="instrumented steps; the one with the median total is reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-ceilings", action="store_true", help="skip the ceiling measurements")
    for flag in ("num-layers", "channels", "num-heads", "vocab-size"):
        ap.add_argument(f"--{flag}", type=int, default=None,
                        help="override the descriptor's value (a tiny model for tests)")
    a = ap.parse_args(argv)
    from dataclasses import replace

    from llmcu.config import gpt2_config
    vocab = {"vocab_size": a.vocab_size} if a.vocab_size is not None else {}
    config = gpt2_config(a.model, max_seq_len=max(1024, a.seq_len), **vocab)  # Vp from V
    overrides = {k: getattr(a, k) for k in ("num_layers", "channels", "num_heads")
                 if getattr(a, k) is not None}
    config = replace(config, **overrides)
    ceilings = None
    if a.device == "cuda" and not a.no_ceilings:
        from bench_kernels import measure_ceilings  # measured before the model takes memory
        ceilings = dict(measure_ceilings())
    name = a.model + (" with " + ", ".join(f"{k}={v}" for k, v in {**vocab, **overrides}.items())
                      if overrides or vocab else "")
    result = run_breakdown(config, a.batch_size, a.seq_len, a.dtype, a.device, a.steps,
                           a.profile_steps, a.warmup, ceilings, model_name=name)
    result["args"] = vars(a)
    print_report(result)
    if a.json:
        path = Path(a.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
