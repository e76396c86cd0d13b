"""The kernel lab's harness: any version of kernels/dev/<layer>.cu against the NumPy oracle,
then timed against the product kernel and PyTorch in the same run (llm.c's dev/cuda).

    python benchmarks/lab.py LAYER [VERSION ...] [--device emu|cuda] [--dtype fp32|bf16]
                             [--B 16 --T 1024] [--schedule heavy_first] [--json OUT]

LAYER is one of LAYERS; VERSION a key of kernels/dev/<layer>.py's VERSIONS (an int, or
"simple" for attention's permute/softmax path); none: every version of the layer.

1. Check: each op of each version runs on random inputs (never zeros) with its outputs
   NaN-poisoned first, and every output is compared with llmcu/cpu/<layer>.py's function
   of the same name on the same values (bf16 inputs rounded first, so both sides see
   the same numbers): max |diff| and PASS/FAIL, |diff| <= atol + rtol |want| with
   atol = a * max|want|. fp32: a = rtol = 1e-5 (kernels sum in other orders than
   NumPy's pairwise sums and use CUDA's libm; test_kernels.py's bound). bf16 outputs:
   one rounding to bf16 on top, rtol = 2^-8 + 1e-5; outputs that are float32 whatever
   floatX is (losses, mean/rstd, lse, AdamW moments) keep the fp32 bound. Layers
   widen it where their kernels round more than once (said where they do). The
   precise per-version bounds are tests/lab/'s; this is the same check at the
   timed shapes.
2. Time: each version's ops, the product's function of the same name
   (llmcu/cuda/<layer>.py) and PyTorch's equivalent (only with --device cuda and torch
   importable), one row per implementation and op: milliseconds per call (CUDA events
   over warm-up + repetitions on cuda; time.perf_counter on emu: emulator times, not
   GPU figures), GB/s from the napkin bytes (every input read once, every output written
   once) or TFLOP/s (attention: 4*B*NH*T*T*hs / 2 forward, 2.5x that backward, causal;
   GEMMs 2*M*N*K), and the lab/product and lab/torch time ratios (below 1: the lab
   version is faster).

Shapes: GPT-2 124M (d12: C=768, NH=12, hs=64, V=50257, Vp=50304, B=16, T=1024, AdamW and
the norm over its 124M parameters) on cuda; tiny ones on emu (B=2, T=64, C=64, NH=1,
V=1000, Vp=1024, n=B*T*C), the emulator being slow. --json OUT writes every row
(temporary file + rename). Exit status 1 if a check failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmcu import cuda as llmcu_cuda  # noqa: E402
from llmcu.config import gpt2_config  # noqa: E402
from llmcu.formats import atomic_write, bf16_bits_to_float32, float32_to_bf16_bits  # noqa: E402
from llmcu.lab import load as load_lab  # noqa: E402

LAYERS = ("attention", "layernorm", "encoder", "matmul", "classifier", "adamw", "global_norm", "gelu")
ORACLE = {"global_norm": "adamw"}                 # llmcu/cpu/<module> of a layer, where not the layer's
PRODUCT = {"global_norm": "adamw", "gelu": None}  # llmcu/cuda/<module>; None: the product has none
NO_PRODUCT = {"gelu": "the step's GELU is a cuBLASLt epilogue of the fc GEMM (no kernel)"}
U = 2.0 ** -8      # bf16 unit roundoff: one rounding moves a value by at most U relative
F32 = 1e-5         # the fp32 bound (module doc)




# --- shapes and inputs ---------------------------------------------------------

@dataclass
class Shape:
    B: int
    T: int
    C: int
    NH: int
    V: int
    Vp: int
    n: int   # elements of the flat parameter array (adamw, global_norm)

    def __str__(self):
        return (f"B={self.B} T={self.T} C={self.C} NH={self.NH} hs={self.C // self.NH} V={self.V} "
                f"Vp={self.Vp} n={self.n}")


def default_shape(device: str, B=None, T=None) -> Shape:
    if device == "cuda":
        d12 = gpt2_config("d12")
        B, T = B or 16, T or 1024
        return Shape(B, T, d12.channels, d12.num_heads, d12.vocab_size, d12.padded_vocab_size,
                     d12.num_parameters())
    B, T = B or 2, T or 64
    return Shape(B, T, 64, 1, 1000, 1024, B * T * 64)


@dataclass
class Array:
    """One array argument: its exact values (float32 for floatX arrays: bf16-rounded when
    the run is bf16), its role, and for outputs the tolerance: tol(want) -> (atol, rtol)."""
    name: str
    value: np.ndarray
    role: str = "in"         # "in"; "out": NaN-poisoned before the call; "inout": starts at value
    floatx: bool = True      # passed as floatX (uint16 bf16 bits in a bf16 run)
    tol: Callable | None = None


@dataclass
class Case:
    """One op's call: positional args (Array or scalar), keywords, the napkin work."""
    op: str
    args: list
    kwargs: dict = field(default_factory=dict)
    work: tuple = ("GB/s", 0.0)   # ("GB/s", bytes) or ("TFLOP/s", flops)
    oracle: Callable | None = None  # default: llmcu/cpu/<layer>.py's function named op
    product_op: str | None = None   # the product function timed beside it (default: op)
    torch: Callable | None = None   # torch(tt, case) -> a no-argument callable (cuda only)
    note: str = ""

    def arrays(self):
        return [a for a in list(self.args) + list(self.kwargs.values()) if isinstance(a, Array)]

    def get(self, name):
        return next(a for a in self.arrays() if a.name == name)


def default_tol(dtype, floatx=True, roundings=1):
    """fp32: a = rtol = 1e-5; a bf16 output: rtol 2^-8 + 1e-5 for its one rounding, and
    each further rounding of an intermediate as large as the output adds 2^-8 to a."""
    def tol(want):
        scale = float(np.abs(want).max()) if want.size else 1.0
        scale = scale if np.isfinite(scale) and scale > 0 else 1.0
        if dtype == "bf16" and floatx:
            return (F32 + (roundings - 1) * U) * scale, U + F32
        return F32 * scale, F32
    return tol


class Inputs:
    """Random values of the run's dtype: bf16 runs round them to bf16 first."""

    def __init__(self, dtype, seed=0):
        self.dtype, self.rng = dtype, np.random.default_rng(seed)

    def round(self, x):
        x = np.asarray(x, np.float32)
        return bf16_bits_to_float32(float32_to_bf16_bits(x)) if self.dtype == "bf16" else x

    def normal(self, *shape, scale=1.0, shift=0.0):
        return self.round(self.rng.standard_normal(shape).astype(np.float32) * np.float32(scale) + np.float32(shift))

    def tol(self, floatx=True, roundings=1):
        return default_tol(self.dtype, floatx, roundings)


# --- the layers' ops: inputs, napkin work, PyTorch's equivalent ----------------------

def attention_cases(s: Shape, x: Inputs):
    from llmcu.cpu import attention as cpu
    B, T, C, NH = s.B, s.T, s.C, s.NH
    hs = C // NH
    qkv, dout = x.normal(B, T, 3 * C), x.normal(B, T, C)
    fwd_flops = 4.0 * B * NH * T * T * hs / 2
    # bf16 flash kernels round P (and dS) to bf16 before their products, and the outputs
    # once: against the fp32 oracle that measured (emu, T 64 to 1024, hs 64, two seeds) at
    # most 0.25% of max|out| and 0.4% of max|dqkv|, about one bf16 rounding (2^-8) of the
    # largest value. atol 2^-6 of it keeps a 4x margin, while a dropped key tile or a wrong
    # mask moves values by several %. lse: fp32 scores of bf16 inputs, 1e-4 (the old tests).
    flash_tol = (lambda want: (2.0 ** -6 * float(np.abs(want).max()), U)) if x.dtype == "bf16" else x.tol()
    lse_tol = (lambda want: (1e-4, 1e-4)) if x.dtype == "bf16" else x.tol(floatx=False)

    def forward_outputs():
        out, lse = np.empty((B, T, C), np.float32), np.empty((B, NH, T), np.float32)
        cpu.flash_attention_forward(out, lse, qkv, NH)
        return x.round(out), lse

    def torch_fwd(tt, case):
        import torch.nn.functional as F
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in tt(case.get("qkv")).split(C, dim=-1))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def torch_bwd(tt, case):
        import torch.nn.functional as F
        xq = tt(case.get("qkv")).requires_grad_(True)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in xq.split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        g = tt(case.get("dout"))
        return lambda: y.backward(g, retain_graph=True)

    def flash_forward():
        return Case("flash_attention_forward",
                    [Array("out", np.zeros((B, T, C), np.float32), "out", tol=flash_tol),
                     Array("lse", np.zeros((B, NH, T), np.float32), "out", floatx=False, tol=lse_tol),
                     Array("qkv", qkv), NH], work=("TFLOP/s", fwd_flops), torch=torch_fwd)

    def flash_backward():
        out, lse = forward_outputs()
        return Case("flash_attention_backward",
                    [Array("dqkv", np.zeros_like(qkv), "out", tol=flash_tol), Array("dout", dout),
                     Array("qkv", qkv), Array("out", out), Array("lse", lse, floatx=False), NH],
                    work=("TFLOP/s", 2.5 * fwd_flops), torch=torch_bwd)

    def simple_forward():  # timed beside the product's fused attention (it has no other)
        return Case("attention_forward", [Array("out", np.zeros((B, T, C), np.float32), "out", tol=x.tol()),
                                          Array("att", np.zeros((B, NH, T, T), np.float32), "out", tol=x.tol()),
                                          Array("qkv", qkv), NH],
                    work=("TFLOP/s", fwd_flops), product_op="flash_attention_forward", torch=torch_fwd)

    def simple_backward():
        att = np.empty((B, NH, T, T), np.float32)
        cpu.attention_forward(np.empty((B, T, C), np.float32), att, qkv, NH)
        return Case("attention_backward", [Array("dqkv", np.zeros_like(qkv), "out", tol=x.tol()),
                                           Array("dout", dout), Array("qkv", qkv), Array("att", att), NH],
                    work=("TFLOP/s", 2.5 * fwd_flops), product_op="flash_attention_backward", torch=torch_bwd)

    return {"flash_attention_forward": flash_forward, "flash_attention_backward": flash_backward,
            "attention_forward": simple_forward, "attention_backward": simple_backward}


def _autograd(forward, grad_name=None):
    """torch builder: run forward(tt, case) once with requires_grad inputs, time its backward."""
    def build(tt, case):
        y = forward(tt, case)
        g = tt(case.get(grad_name)) if grad_name else None
        return lambda: y.backward(g, retain_graph=True)
    return build


def layernorm_cases(s: Shape, x: Inputs):
    from llmcu.cpu import layernorm as cpu
    B, T, C = s.B, s.T, s.C
    N, b = B * T, 2 if x.dtype == "bf16" else 4
    inp, w, bias, dout = x.normal(B, T, C, scale=3.0, shift=1.0), x.normal(C), x.normal(C), x.normal(B, T, C)
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    cpu.layernorm_forward(np.empty((B, T, C), np.float32), mean, rstd, inp, w, bias)

    def torch_fwd(tt, case):
        import torch.nn.functional as F
        a, wt, bt = (tt(case.get(n)) for n in ("inp", "weight", "bias"))
        return lambda: F.layer_norm(a, (C,), wt, bt, 1e-5)

    def torch_graph(tt, case):
        import torch
        a, wt = (tt(case.get(n)).requires_grad_(True) for n in ("inp", "weight"))
        return torch.nn.functional.layer_norm(a, (C,), wt, torch.zeros_like(wt, requires_grad=True), 1e-5)

    def forward():
        return Case("layernorm_forward",
                    [Array("out", np.zeros((B, T, C), np.float32), "out", tol=x.tol()),
                     Array("mean", mean, "out", floatx=False, tol=x.tol(floatx=False)),
                     Array("rstd", rstd, "out", floatx=False, tol=x.tol(floatx=False)),
                     Array("inp", inp), Array("weight", w), Array("bias", bias)],
                    work=("GB/s", 2 * N * C * b + 2 * N * 4 + 2 * C * b), torch=torch_fwd)

    def backward():
        # dout, inp read, dinp written, mean/rstd and weight read, dweight/dbias read + written
        return Case("layernorm_backward",
                    [Array("dinp", np.zeros((B, T, C), np.float32), "out", tol=x.tol()),
                     Array("dweight", x.normal(C), "inout", tol=x.tol()),
                     Array("dbias", x.normal(C), "inout", tol=x.tol()),
                     Array("dout", dout), Array("inp", inp), Array("weight", w),
                     Array("mean", mean, floatx=False), Array("rstd", rstd, floatx=False)],
                    work=("GB/s", 3 * N * C * b + 2 * N * 4 + 5 * C * b),
                    torch=_autograd(torch_graph, "dout"))

    return {"layernorm_forward": forward, "layernorm_backward": backward}


def encoder_cases(s: Shape, x: Inputs):
    B, T, C, Vp = s.B, s.T, s.C, s.Vp
    N, b = B * T, 2 if x.dtype == "bf16" else 4
    inp = x.rng.integers(0, s.V, (B, T)).astype(np.int32)
    inp.reshape(-1)[: min(N, 3)] = 1  # a repeated token: its rows must be summed
    dout, w0, p0 = x.normal(B, T, C), x.normal(Vp, C), x.normal(T, C)
    # bf16 dwte: kernel1 rounds after each of a token's n additions, partial sums at most
    # (n + 1) max|value| (the bf16 bound of tests/kernels/)
    n = int(np.bincount(inp.reshape(-1)).max())
    big = float(max(np.abs(w0).max(), np.abs(dout).max()))

    def dwte_tol(want):
        atol, rtol = x.tol()(want)
        return (atol + (n - 1) * U * (n + 1) * big if x.dtype == "bf16" else atol), rtol

    def torch_graph(tt, case):
        import torch
        wte, wpe = (tt(case.get(k)).requires_grad_(True) for k in ("dwte", "dwpe"))
        ids = torch.as_tensor(case.get("inp").value, device=wte.device).long()
        return torch.nn.functional.embedding(ids, wte) + wpe[:T]

    def backward():
        # dout and inp read; a dwte row read and written per position; dwpe read and written
        return Case("encoder_backward",
                    [Array("dwte", w0, "inout", tol=dwte_tol), Array("dwpe", p0, "inout", tol=x.tol()),
                     Array("dout", dout), Array("inp", inp, floatx=False)],
                    work=("GB/s", N * C * b + N * 4 + 2 * N * C * b + 2 * T * C * b),
                    torch=_autograd(torch_graph, "dout"))

    return {"encoder_backward": backward}


def matmul_cases(s: Shape, x: Inputs):
    B, T, C = s.B, s.T, s.C
    OC, N, b = 4 * C, B * T, 2 if x.dtype == "bf16" else 4   # the fc layer: C -> 4C
    inp, w, bias, dout = x.normal(B, T, C), x.normal(OC, C, scale=0.1), x.normal(OC), x.normal(B, T, OC)

    def torch_graph(tt, case):
        import torch.nn.functional as F
        a, wt, bt = (tt(case.get(n)).requires_grad_(True) for n in ("inp", "weight", "dbias"))
        return F.linear(a, wt, bt)

    def torch_fwd(tt, case):
        import torch.nn.functional as F
        a, wt, bt = (tt(case.get(n)) for n in ("inp", "weight", "bias"))
        return lambda: F.linear(a, wt, bt)

    def torch_bias(tt, case):
        d, db = tt(case.get("dout")), tt(case.get("dbias"))
        return lambda: db.add_(d.reshape(-1, OC).sum(dim=0))

    def forward():
        # bf16: the GEMM rounded, then the bias added and rounded again: two roundings
        return Case("matmul_forward", [Array("out", np.zeros((B, T, OC), np.float32), "out", tol=x.tol(roundings=2)),
                                       Array("inp", inp), Array("weight", w), Array("bias", bias)],
                    work=("TFLOP/s", 2.0 * N * C * OC), torch=torch_fwd)

    def backward():
        return Case("matmul_backward",
                    [Array("dinp", np.zeros((B, T, C), np.float32), "out", tol=x.tol()),
                     Array("dweight", x.normal(OC, C), "inout", tol=x.tol()),
                     Array("dbias", x.normal(OC), "inout", tol=x.tol()),
                     Array("dout", dout), Array("inp", inp), Array("weight", w)],
                    work=("TFLOP/s", 4.0 * N * C * OC), torch=_autograd(torch_graph, "dout"))

    def bias_backward():
        def oracle(dbias, d, accumulate=True):
            dbias[...] = (dbias if accumulate else 0) + d.reshape(-1, OC).sum(axis=0)
        return Case("matmul_bias_backward", [Array("dbias", x.normal(OC), "inout", tol=x.tol()), Array("dout", dout)],
                    work=("GB/s", N * OC * b + 2 * OC * b), oracle=oracle, torch=torch_bias)

    return {"matmul_forward": forward, "matmul_backward": backward, "matmul_bias_backward": bias_backward}


def classifier_cases(s: Shape, x: Inputs):
    B, T, V, Vp = s.B, s.T, s.V, s.Vp
    N, b = B * T, 2 if x.dtype == "bf16" else 4
    logits = x.normal(B, T, Vp, scale=3.0)
    logits[..., V:] = 1e4  # padded columns must be ignored however large
    targets = x.rng.integers(0, V, (B, T)).astype(np.int32)
    dloss = 1.0 / N

    def torch_loss(tt, case, reduction):
        import torch
        import torch.nn.functional as F
        lg = tt(case.get("logits"))
        t = torch.as_tensor(case.get("targets").value, device=lg.device).long().reshape(-1)
        return lg, lambda z: F.cross_entropy(z[..., :V].reshape(-1, V), t, reduction=reduction)

    def torch_ce(tt, case):
        lg, loss = torch_loss(tt, case, "none")
        return lambda: loss(lg)

    def torch_dlogits(tt, case):
        lg, loss = torch_loss(tt, case, "mean")
        y = loss(lg.requires_grad_(True))
        return lambda: y.backward(retain_graph=True)

    def crossentropy():
        return Case("crossentropy_forward", [Array("losses", np.zeros((B, T), np.float32), "out", floatx=False,
                                                   tol=x.tol(floatx=False)),
                                             Array("logits", logits), Array("targets", targets, floatx=False), V],
                    work=("GB/s", N * Vp * b + N * 8), torch=torch_ce)

    def dlogits():
        # logits read once, dlogits written over them once (at the minimum)
        return Case("fused_classifier_dlogits",
                    [Array("logits", logits, "inout", tol=x.tol()),
                     Array("losses", np.zeros((B, T), np.float32), "out", floatx=False, tol=x.tol(floatx=False)),
                     Array("targets", targets, floatx=False), V, dloss],
                    work=("GB/s", 2 * N * Vp * b + N * 8), torch=torch_dlogits)

    return {"crossentropy_forward": crossentropy, "fused_classifier_dlogits": dlogits}


def adamw_cases(s: Shape, x: Inputs):
    from llmcu.cpu import adamw as cpu
    n, bf16 = s.n, x.dtype == "bf16"
    b = 2 if bf16 else 4
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
    master = x.rng.standard_normal(n).astype(np.float32)
    m, v = x.rng.standard_normal(n).astype(np.float32) * 0.1, np.abs(x.rng.standard_normal(n)).astype(np.float32) * 0.1

    def oracle(params, grads, m_, v_, step, lr, master_params=None, seed=None, **kw):
        """The fp32 update of the master copy where there is one; params its new values."""
        target = params if master_params is None else master_params
        cpu.adamw_update(target, grads, m_, v_, step, lr, **kw)
        params[...] = target

    # bf16 params: the master value stochastically rounded, one of its two bf16 neighbours,
    # within one bf16 ulp (2^-7 relative); the master copy and the moments are fp32.
    params_tol = (lambda want: (F32 * float(np.abs(want).max()), 2 * U)) if bf16 else x.tol(floatx=False)

    def torch_step(tt, case):
        import torch
        p = tt(case.get("params"))
        p.grad = tt(case.get("grads"))
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                                weight_decay=hyper["weight_decay"], fused=p.is_cuda)
        return opt.step

    def update():
        kw = dict(hyper)
        if bf16:
            kw["master_params"] = Array("master_params", master.copy(), "inout", floatx=False, tol=x.tol(floatx=False))
        # per parameter: grads, m, v read; params, m, v written; params read (no master) or
        # the fp32 master read and written
        nbytes = n * ((2 if bf16 else 3) * b + 16 + (8 if bf16 else 0))
        return Case("adamw_update",
                    [Array("params", x.round(master), "inout", tol=params_tol), Array("grads", x.normal(n)),
                     Array("m", m, "inout", floatx=False, tol=x.tol(floatx=False)),
                     Array("v", v, "inout", floatx=False, tol=x.tol(floatx=False)), 3, 1e-3],
                    kwargs=kw, work=("GB/s", nbytes), oracle=oracle, torch=torch_step,
                    note="bf16: with fp32 master weights (torch: bf16 params, none)" if bf16 else "")

    return {"adamw_update": update}


def global_norm_cases(s: Shape, x: Inputs):
    from llmcu.cpu import adamw as cpu
    n, b = s.n, 2 if x.dtype == "bf16" else 4
    grads = x.normal(n)
    # fp32 squares of exact inputs summed in fp32 partials, then float64: relative 1e-5
    rel = lambda want: (F32 * float(np.abs(want).max()), F32)  # noqa: E731

    def oracle_device(g, norm, grad_scale, grad_clip=None):
        norm[0] = cpu.global_norm(g)
        grad_scale[0] = cpu.clip_scale(norm[0], grad_clip)

    def torch_norm(tt, case):
        import torch
        g = tt(case.get("grads"))
        return lambda: torch.linalg.vector_norm(g, dtype=torch.float32).item()

    def norm():
        return Case("global_norm", [Array("grads", grads)], work=("GB/s", n * b), torch=torch_norm,
                    oracle=lambda g: cpu.global_norm(g.astype(np.float32)))

    def norm_device():
        return Case("global_norm_device",
                    [Array("grads", grads), Array("norm", np.zeros(1, np.float64), "out", floatx=False, tol=rel),
                     Array("grad_scale", np.zeros(1, np.float32), "out", floatx=False, tol=rel)],
                    kwargs={"grad_clip": 1.0}, work=("GB/s", n * b), oracle=oracle_device, torch=torch_norm)

    return {"global_norm": norm, "global_norm_device": norm_device}


def gelu_cases(s: Shape, x: Inputs):
    shape, b = (s.B, s.T, 4 * s.C), 2 if x.dtype == "bf16" else 4
    inp, dout = x.normal(*shape, scale=2.0), x.normal(*shape)
    size = int(np.prod(shape))

    def torch_fwd(tt, case):
        import torch.nn.functional as F
        a = tt(case.get("inp"))
        return lambda: F.gelu(a, approximate="tanh")

    def torch_graph(tt, case):
        import torch.nn.functional as F
        return F.gelu(tt(case.get("inp")).requires_grad_(True), approximate="tanh")

    return {"gelu_forward": lambda: Case("gelu_forward", [Array("out", np.zeros(shape, np.float32), "out", tol=x.tol()),
                                                          Array("inp", inp)],
                                         work=("GB/s", 2 * size * b), torch=torch_fwd),
            "gelu_backward": lambda: Case("gelu_backward", [Array("dinp", np.zeros(shape, np.float32), "out",
                                                                  tol=x.tol()), Array("dout", dout), Array("inp", inp)],
                                          work=("GB/s", 3 * size * b), torch=_autograd(torch_graph, "dout"))}


CASES = {"attention": attention_cases, "layernorm": layernorm_cases, "encoder": encoder_cases,
         "matmul": matmul_cases, "classifier": classifier_cases, "adamw": adamw_cases,
         "global_norm": global_norm_cases, "gelu": gelu_cases}


# --- running a case on a backend --------------------------------------------------

class Device:
    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype
        if name == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np

    def array(self, a: Array, poisoned=True):
        bits = a.floatx and self.dtype == "bf16"
        host = float32_to_bf16_bits(a.value) if bits else np.ascontiguousarray(a.value)
        if a.role == "out" and poisoned:
            fill = 0x7FC0 if bits else (np.nan if host.dtype.kind == "f" else -1)  # 0x7FC0: a bf16 NaN
            return self.xp.full(host.shape, fill, dtype=host.dtype)
        return self.xp.array(host, copy=True)

    def value(self, a: Array, arr):
        host = arr.get() if self.name == "cuda" else np.asarray(arr)
        return bf16_bits_to_float32(host) if a.floatx and self.dtype == "bf16" else host

    def synchronize(self):
        if self.name == "cuda":
            self.xp.cuda.get_current_stream().synchronize()


def bind(case: Case, device: Device, poisoned=True):
    """The case's arguments on the device: (args, kwargs, {name: device array}); outputs
    NaN-poisoned unless poisoned=False (timing)."""
    made = {}

    def conv(a):
        if isinstance(a, Array):
            made[a.name] = device.array(a, poisoned)
            return made[a.name]
        return a
    return [conv(a) for a in case.args], {k: conv(a) for k, a in case.kwargs.items()}, made


def run_oracle(fn, case: Case):
    """The oracle on fp32 copies: returns its result and {name: array}."""
    made = {}

    def conv(a):
        if isinstance(a, Array):
            made[a.name] = np.full(a.value.shape, np.nan, a.value.dtype) if a.role == "out" else a.value.copy()
            return made[a.name]
        return a
    result = fn(*[conv(a) for a in case.args], **{k: conv(a) for k, a in case.kwargs.items()})
    return result, made


def compare(got, want, tol):
    """(max |diff| over finite elements, fraction of the tolerance used, passed): passed when
    |diff| <= atol + rtol |want| everywhere and NaN/inf sit where the oracle's do (an
    unwritten, NaN-poisoned element fails). In chunks: GPT-2's logits are 824M elements."""
    got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    atol, rtol = tol(want)
    max_diff, used, ok = 0.0, 0.0, True
    for s in range(0, want.size, 1 << 24):
        g, w = got[s:s + (1 << 24)].astype(np.float64), want[s:s + (1 << 24)].astype(np.float64)
        finite = np.isfinite(g) & np.isfinite(w)
        ok &= not ((np.isnan(g) != np.isnan(w)) | (np.isinf(g) != np.isinf(w))).any()
        diff = np.where(finite, np.abs(g - w), 0.0)
        limit = atol + rtol * np.abs(np.where(finite, w, 0.0))
        max_diff = max(max_diff, float(diff.max()))
        used = max(used, float((diff / np.maximum(limit, 1e-300)).max()))
    return max_diff, used, bool(ok and used <= 1.0)


def check_op(fn, case: Case, device: Device, oracle, extra=None) -> list[dict]:
    """Run the lab's fn and the oracle on the same values; one row per output."""
    args, kwargs, got = bind(case, device)
    result = fn(*args, **kwargs, **(extra or {}))
    device.synchronize()
    want_result, want = run_oracle(oracle, case)
    rows = []
    for a in case.arrays():
        if a.role == "in":
            continue
        max_diff, used, ok = compare(device.value(a, got[a.name]), want[a.name], a.tol)
        rows.append(dict(output=a.name, max_diff=max_diff, tol_used=used, passed=ok))
    if want_result is not None:
        w = np.asarray(want_result, np.float64)
        max_diff, used, ok = compare(np.asarray(result, np.float64), w,
                                     lambda want: (F32 * float(np.abs(want).max()), F32))
        rows.append(dict(output="result", max_diff=max_diff, tol_used=used, passed=ok))
    return rows


def time_ms(fn, device_name, warmup, reps, torch_events=False) -> float:
    """Milliseconds per call: CUDA events around `reps` calls after `warmup` on cuda
    (torch's events for PyTorch rows), time.perf_counter on emu."""
    for _ in range(warmup):
        fn()
    if device_name != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    if torch_events:
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    import cupy
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / reps


def torch_tensor_maker(device_name, dtype):
    """tt(Array) -> a torch tensor of its values on the device (bf16 for floatX arrays of a bf16 run)."""
    import torch

    def tt(a: Array):
        t = torch.as_tensor(np.ascontiguousarray(a.value)).to(device_name)
        return t.to(torch.bfloat16) if a.floatx and dtype == "bf16" else t
    return tt


# --- the command -------------------------------------------------------------------

def label(version) -> str:
    return f"v{version}" if isinstance(version, int) else str(version)


def check_versions(lab, versions, dtype, device, builders, cases, oracle_mod, schedule, rows) -> bool:
    """The oracle check of every op of every version (rows appended); True if all passed."""
    passed = True
    for v in versions:
        ver = lab.VERSIONS[v]
        if dtype not in ver.dtypes:
            print(f"  {label(v):<8} skipped: runs {'/'.join(ver.dtypes)} only")
            rows.append(dict(kind="check", version=str(v), skipped=f"runs {'/'.join(ver.dtypes)} only"))
            continue
        extra = {"schedule": schedule} if ver.scheduled else {}
        for op, fn in ver.ops.items():
            if op not in cases:
                cases[op] = builders[op]()
            case = cases[op]
            try:
                results = check_op(fn, case, device, case.oracle or getattr(oracle_mod, op), extra)
            except ValueError as e:  # the wrapper refused these shapes (a version's limits)
                print(f"  {label(v):<8} {op:<26} skipped: {e}")
                rows.append(dict(kind="check", version=str(v), op=op, skipped=str(e)))
                continue
            for r in results:
                passed &= r["passed"]
                print(f"  {label(v):<8} {op:<26} {r['output']:<13} max|diff| {r['max_diff']:.2e} "
                      f"({r['tol_used']:.0%} of tol)  {'PASS' if r['passed'] else 'FAIL'}")
                rows.append(dict(kind="check", version=str(v), op=op, **r))
    return passed


def timed(fn, case: Case, device: Device, warmup, reps, extra=None) -> float:
    """fn on the case's arguments: one call (compiles, allocates), then time_ms."""
    args, kwargs, _ = bind(case, device, poisoned=False)
    kwargs.update(extra or {})
    fn(*args, **kwargs)
    return time_ms(lambda: fn(*args, **kwargs), device.name, warmup, reps)


def time_row(rows, op, work, impl, ms=None, note="", vs_product=None, vs_torch=None, ratios=False):
    """Print and keep one timing row: ms, the rate from the napkin work, the ratios."""
    unit, amount = work
    rate = amount / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12) if ms else None
    text = f"  {impl:<24} {op:<26} " + (f"{ms:>10.4g} {f'{rate:.3g} {unit}':>16}" if ms else f"{'':>27}")
    if ratios:
        text += "".join(f" {f'{r:.2f}x' if r else '-':>{w}}" for r, w in ((vs_product, 12), (vs_torch, 10)))
    print(text + (f"  {note}" if note else ""))
    rows.append(dict(kind="time", impl=impl, op=op, ms=ms, unit=unit, rate=rate, vs_product=vs_product,
                     vs_torch=vs_torch, note=note))


def time_versions(lab, layer, versions, dtype, device, builders, cases, product_mod, schedule, warmup, reps, rows):
    """Per op: the product's row, PyTorch's, then each version's with its time ratios."""
    ops = dict.fromkeys(op for v in versions if dtype in lab.VERSIONS[v].dtypes for op in lab.VERSIONS[v].ops)
    for op in ops:
        case = cases[op]
        row = functools.partial(time_row, rows, op, case.work)
        product_ms = torch_ms = None
        pop = case.product_op or op
        if product_mod is None or not hasattr(product_mod, pop):
            row("product", note=f"skipped: {NO_PRODUCT.get(layer, 'no product function ' + pop)}")
        else:
            try:
                product_ms = timed(getattr(product_mod, pop), cases.get(pop) or builders[pop](), device, warmup, reps)
                row("product", product_ms, note="" if pop == op else f"(runs {pop})")
            except ValueError as e:
                row("product", note=f"skipped: {e}")
        if device.name != "cuda" or case.torch is None:
            row("torch", note="skipped: PyTorch rows need --device cuda" if case.torch else "skipped: no torch op")
        else:
            try:
                import torch
                torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs as cuBLAS's (no TF32)
                torch_ms = time_ms(case.torch(torch_tensor_maker("cuda", dtype), case), "cuda", warmup, reps,
                                   torch_events=True)
                row("torch", torch_ms, note=case.note)
            except ImportError:
                row("torch", note="skipped: torch is not importable")
        for v in versions:
            ver = lab.VERSIONS[v]
            if op not in ver.ops or dtype not in ver.dtypes:
                continue
            extra = {"schedule": schedule} if ver.scheduled else {}
            try:
                ms = timed(ver.ops[op], case, device, warmup, reps, extra)
            except ValueError as e:
                row(f"lab {label(v)}", note=f"skipped: {e}")
                continue
            row(f"lab {label(v)}" + (f" ({schedule})" if extra else ""), ms, ratios=True,
                vs_product=ms / product_ms if product_ms else None, vs_torch=ms / torch_ms if torch_ms else None)


def parse_version(text):
    return int(text) if text.lstrip("-").isdigit() else text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("layer", choices=LAYERS)
    p.add_argument("versions", nargs="*", type=parse_version, help="keys of VERSIONS (default: all)")
    p.add_argument("--device", choices=("emu", "cuda"), default=None,
                   help="default: cuda when CuPy sees a GPU, else emu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="default: bf16, or fp32 when no requested version runs bf16")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--T", type=int, default=None)
    p.add_argument("--schedule", choices=("grouped", "heavy_first"), default="grouped",
                   help="attention versions 3-9: the block order")
    p.add_argument("--warmup", type=int, default=None, help="default 5 (cuda), 1 (emu)")
    p.add_argument("--reps", type=int, default=None, help="default 20 (cuda), 3 (emu)")
    p.add_argument("--json", default=None, help="write every row here (temporary file + rename)")
    args = p.parse_args(argv)

    device_name = args.device or ("cuda" if llmcu_cuda.is_available() else "emu")
    if device_name == "cuda" and not llmcu_cuda.is_available():
        print("lab.py: --device cuda needs CuPy and an NVIDIA GPU, found none; run with --device emu "
              "(the kernels on the CPU emulator)", file=sys.stderr)
        return 2
    lab = load_lab(args.layer)
    versions = args.versions or list(lab.VERSIONS)
    unknown = [v for v in versions if v not in lab.VERSIONS]
    if unknown:
        print(f"lab.py: {args.layer} has no version {', '.join(map(repr, unknown))}; its versions: "
              f"{', '.join(map(str, lab.VERSIONS))}", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if any("bf16" in lab.VERSIONS[v].dtypes for v in versions) else "fp32")
    shape = default_shape(device_name, args.B, args.T)
    warmup = args.warmup if args.warmup is not None else (5 if device_name == "cuda" else 1)
    reps = args.reps if args.reps is not None else (20 if device_name == "cuda" else 3)
    device = Device(device_name, dtype)
    oracle_name = ORACLE.get(args.layer, args.layer)
    product_name = PRODUCT.get(args.layer, args.layer)
    product_mod = importlib.import_module(f"llmcu.cuda.{product_name}") if product_name else None
    builders, cases, rows = CASES[args.layer](shape, Inputs(dtype)), {}, []
    where = ("the CPU emulator: emulator times, not GPU figures" if device_name == "emu"
             else f"{_gpu_name()}: CUDA events")
    print(f"lab {args.layer} {dtype} on {device_name} ({where})\n  {shape}"
          + (f"; schedule {args.schedule}" if args.layer == "attention" else ""))

    print(f"\ncheck against the oracle (llmcu/cpu/{oracle_name}.py), outputs NaN-poisoned")
    passed = check_versions(lab, versions, dtype, device, builders, cases,
                            importlib.import_module(f"llmcu.cpu.{oracle_name}"), args.schedule, rows)
    print(f"\ntime per call, {warmup} warm-up + {reps} reps"
          + (" (emulator times, not GPU figures)" if device_name == "emu" else ""))
    print(f"  {'implementation':<24} {'op':<26} {'ms':>10} {'rate':>16} {'lab/product':>12} {'lab/torch':>10}")
    time_versions(lab, args.layer, versions, dtype, device, builders, cases, product_mod, args.schedule, warmup,
                  reps, rows)
    print(f"\n{'all checks passed' if passed else 'FAIL: a check failed'}")
    if args.json:
        meta = dict(layer=args.layer, device=device_name, dtype=dtype, shape=vars(shape), schedule=args.schedule,
                    warmup=warmup, reps=reps, emulator=device_name == "emu", versions=[str(v) for v in versions])
        with atomic_write(args.json) as f:
            f.write(json.dumps(dict(meta=meta, rows=rows), indent=1).encode())
    return 0 if passed else 1


def _gpu_name() -> str:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # the name is decoration
        return "GPU"


if __name__ == "__main__":
    sys.exit(main())
