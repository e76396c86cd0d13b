"""GPT-2 training step on the kernels: the orchestrator.

Parameters, gradients, AdamW moments and activations are allocated once as
flat buffers with named views (config.parameter_views) on the device; the
forward, backward and update call only the wrappers in this package, on one
stream. device="cuda" runs on the GPU through CuPy; device="emu" runs the
same kernels on the CPU (llmcu.emu) on NumPy arrays, for tests.

Differences from the NumPy oracle (llmcu/cpu/gpt2.py), all for speed or memory:
no probabilities buffer; backward() overwrites acts.logits with dlogits
(llm.c's fused classifier); attention scratch comes from the array library;
the first backward() after zero_grad() has the GEMMs overwrite (=) the weight
and bias gradients instead of adding onto zeros (matmul_backward's
accumulate_weight=False: in bf16 that skips an fp32 temporary and an add pass
per weight), later ones (gradient accumulation) add.

Attention: GPT2(..., attention="flash") (the default) runs the fused kernels
(kernels/attention.cu, attention_flash_*), which keep only each query row's
log-sum-exp "lse" (L,B,NH,T) for the backward; attention="simple" runs the
permute / GEMM / softmax path and keeps the probabilities "att" (L,B,NH,T,T).
At d12, B=16, T=1024 att is 9.0 GiB and lse 9 MiB, so the activations
shrink from 22.29 GiB to 13.30 GiB (activation_bytes below: arithmetic on the
buffer shapes, not a GPU measurement).

Precision: GPT2(..., dtype="fp32") (the default) keeps everything float32, as
the oracle. dtype="bf16" is llm.c's mixed precision: parameters, gradients
and activations are bf16 (uint16 arrays of bf16 bit patterns, llmcu.formats;
the kernels' floatX = __nv_bfloat16), logits and dlogits included; the
layernorm statistics, the losses, attention's lse, the AdamW moments and
every reduction stay float32 (FP32_ACTIVATIONS). With master_weights=True (the
default, llm.c's -w 1) AdamW updates an fp32 master copy of the parameters and
writes the bf16 parameters as its stochastic rounding; master_weights=False
updates the bf16 parameters in place, stochastically rounded. The rounding's
random bits are a hash of (seed, step, tensor, element), so a resumed run
repeats them without any RNG state (the update, shared with llmcu/cuda/llama.py,
is llmcu/cuda/mixed_precision.py's). bf16 needs the fused
attention (the "simple" path's kernels are fp32 only) and no ZeRO-1 shard.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ..config import GPT2Config, parameter_views
from ..cpu.gpt2 import DECAYED, backward_layers, backward_scratch, forward_layers, init_parameters
from . import runtime
from .adamw import adamw_update, global_norm
from .attention import (SCHEDULES, attention_backward, attention_forward, flash_attention_backward,
                        flash_attention_forward)
from .classifier import VERSIONS as CLASSIFIER_VERSIONS
from .classifier import crossentropy_forward, fused_classifier_dlogits
from .encoder import encoder_backward, encoder_forward, token_runs
from .gelu import gelu_backward, gelu_forward
from .layernorm import (layernorm_backward, layernorm_backward_add, layernorm_forward,
                        residual_layernorm_forward)
from .matmul import (GEMM_LIBRARIES, LT_ALL, matmul_backward, matmul_dgelu_backward, matmul_forward,
                     matmul_gelu_forward)
from .mixed_precision import (DTYPES, MixedPrecisionAdamW, allocate_views, check_dtype,
                              check_params_dtype)
from .residual import residual_forward

# The same layer sequence as the oracle (llmcu/cpu/gpt2.py), on the kernel wrappers.
# Memory-bound layers with a 16-byte-load version run it where shapes and alignment
# allow (version="auto"; on an H200 it moved 1.3-1.6x the bytes per second of version 1
# for gelu in bf16, benchmarks/RESULTS.md); the others' defaults are their fastest.
KERNEL_OPS = SimpleNamespace(
    encoder_forward=functools.partial(encoder_forward, version="auto"), encoder_backward=encoder_backward,
    layernorm_forward=layernorm_forward, layernorm_backward=layernorm_backward,
    matmul_forward=matmul_forward, matmul_backward=matmul_backward,
    attention_forward=attention_forward, attention_backward=attention_backward,
    flash_attention_forward=flash_attention_forward, flash_attention_backward=flash_attention_backward,
    gelu_forward=functools.partial(gelu_forward, version="auto"),
    gelu_backward=functools.partial(gelu_backward, version="auto"),
    residual_forward=functools.partial(residual_forward, version="auto"),
    # the residual adds fused into the layernorms (llmcu/cpu/gpt2.py uses them when present):
    # the forward's add + the layernorm reading its sum, the backward's layernorm input
    # gradient added straight into the residual stream's gradient
    residual_layernorm_forward=functools.partial(residual_layernorm_forward, version="auto"),
    layernorm_backward_add=layernorm_backward_add,
    adamw_update=adamw_update, global_norm=global_norm)
FUSED_RESIDUAL_OPS = ("residual_layernorm_forward", "layernorm_backward_add")  # GPT2(fuse_residual=)
FLASH_VERSIONS = ("auto", 1, 2, 3, 4, 5, 6, 7, 8, 9)  # GPT2(flash_version=): llmcu/cuda/attention.py's versions

ACTIVATIONS = (  # name: shape in units of (L, B, T, NH, C, Vp); per-layer tensors lead with L
    ("encoded", "BTC"), ("ln1", "LBTC"), ("ln1_mean", "LBT"), ("ln1_rstd", "LBT"),
    ("qkv", "LBT3C"), ("att", "LBNTT"), ("atty", "LBTC"), ("attproj", "LBTC"),
    ("residual2", "LBTC"), ("ln2", "LBTC"), ("ln2_mean", "LBT"), ("ln2_rstd", "LBT"),
    ("fch", "LBT4C"), ("fch_gelu", "LBT4C"), ("fcproj", "LBTC"), ("residual3", "LBTC"),
    ("lnf", "BTC"), ("lnf_mean", "BT"), ("lnf_rstd", "BT"), ("logits", "BTV"), ("losses", "BT"),
)


# Activations that stay float32 whatever the dtype: statistics, losses, attention's lse.
FP32_ACTIVATIONS = frozenset({"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean",
                              "lnf_rstd", "losses", "lse"})

# What each attention implementation saves for its backward, in place of ACTIVATIONS' "att".
ATTENTION_STATE = {"simple": ("att", "LBNTT"), "flash": ("lse", "LBNT")}
DEFAULT_ATTENTION = "flash"


def _check_attention(fn, attention):
    if attention not in ATTENTION_STATE:
        raise ValueError(f"{fn}: attention must be one of {tuple(ATTENTION_STATE)}, got {attention!r}")


_check_dtype = check_dtype  # llmcu/cuda/mixed_precision.py


def activation_shapes(config: GPT2Config, B: int, T: int,
                      attention: str = DEFAULT_ATTENTION) -> list[tuple[str, tuple[int, ...]]]:
    _check_attention("activation_shapes", attention)
    L, C, NH, Vp = config.num_layers, config.channels, config.num_heads, config.padded_vocab_size
    dims = {"L": (L,), "B": (B,), "T": (T,), "N": (NH,), "C": (C,), "3C": (3 * C,),
            "4C": (4 * C,), "V": (Vp,)}
    out = []
    for name, code in ACTIVATIONS:
        if name == "att":
            name, code = ATTENTION_STATE[attention]
        shape, i = (), 0
        while i < len(code):
            key = code[i:i + 2] if code[i] in "34" else code[i]
            shape += dims[key]
            i += len(key)
        out.append((name, shape))
    return out


def activation_bytes(config: GPT2Config, B: int, T: int, attention: str = DEFAULT_ATTENTION,
                     dtype: str = "fp32") -> int:
    """Bytes of the Activations buffers for a (B,T) step (floatX of `dtype`, the
    FP32_ACTIVATIONS float32): arithmetic on the shapes."""
    _check_dtype("activation_bytes", dtype)
    return sum(math.prod(s) * (4 if name in FP32_ACTIVATIONS else DTYPES[dtype].itemsize)
               for name, s in activation_shapes(config, B, T, attention))


class Activations:
    """One flat buffer per element type for every activation of a (B,T) step, with
    named views: `memory` (floatX: float32, or uint16 for bf16) and, in bf16,
    `stats` (float32: FP32_ACTIVATIONS); in fp32 everything is in `memory`.
    `attention` ("flash" or "simple") picks lse (L,B,NH,T) or att (L,B,NH,T,T); the
    shared layer sequence (llmcu/cpu/gpt2.py) reads it to pick the attention calls."""

    def __init__(self, xp, config: GPT2Config, B: int, T: int, attention: str = DEFAULT_ATTENTION,
                 floatx=np.float32):
        self.B, self.T = B, T
        self.attention = attention
        self.memory, self.stats = allocate_views(self, xp, activation_shapes(config, B, T, attention),
                                                 floatx, FP32_ACTIVATIONS)

    def nbytes(self) -> int:
        return self.memory.nbytes + (self.stats.nbytes if self.stats is not None else 0)


class GPT2(MixedPrecisionAdamW):
    """GPT-2 whose every layer runs a kernel from kernels/ (device "cuda" or "emu").

    flash_version: the fused attention's kernels (llmcu/cuda/attention.py, "auto" picks);
    gemm: the linear layers' GEMM route (GEMM_LIBRARIES, "auto" picks); classifier_version:
    the fused classifier's kernel (llmcu/cuda/classifier.py VERSIONS, "auto" picks);
    fuse_residual: the residual adds fused into the layernorms (FUSED_RESIDUAL_OPS; False
    runs them as separate kernels, for comparison); bias_epilogue: with gemm "cublaslt_all"
    or "cublaslt_all_tuned", the bias gradients from the weight-gradient GEMMs (cuBLASLt's
    BGRADB epilogue) instead of the bias kernels, when those GEMMs overwrite (the first
    micro-step); not measured on a GPU yet, so off by default. flash_schedule: the order the
    fused attention's blocks go out in (llmcu/cuda/attention.py SCHEDULES; "heavy_first"
    needs flash_version 3 to 9 named; not measured on a GPU yet).
    dtype "fp32" or "bf16" (module doc); params: float32 values (a bf16 model rounds
    them to nearest for its bf16 copy and keeps them as the fp32 master copy), or, for
    dtype "bf16" only, a uint16 array of bf16 bits, which the model then shares."""

    OPS, DECAYED = KERNEL_OPS, DECAYED  # for FlatAdamW: the kernel AdamW and global norm

    def __init__(self, config: GPT2Config, params=None, seed: int = 42, device: str = "cuda",
                 attention: str = DEFAULT_ATTENTION, dtype: str = "fp32", master_weights: bool = True,
                 flash_version="auto", gemm="auto", classifier_version="auto", fuse_residual=True,
                 bias_epilogue=False, flash_schedule="grouped"):
        _check_attention("GPT2", attention)
        if not isinstance(fuse_residual, bool):
            raise TypeError(f"GPT2: fuse_residual must be a bool, got {type(fuse_residual).__name__}")
        self.fuse_residual = fuse_residual
        if not isinstance(bias_epilogue, bool):
            raise TypeError(f"GPT2: bias_epilogue must be a bool, got {type(bias_epilogue).__name__}")
        self.bias_epilogue = bias_epilogue
        if classifier_version not in CLASSIFIER_VERSIONS + ("auto",):
            raise ValueError(f"GPT2: classifier_version must be one of {CLASSIFIER_VERSIONS} or 'auto', "
                             f"got {classifier_version!r}")
        self.classifier_version = classifier_version  # the fused classifier's kernel (classifier.py)
        if gemm not in GEMM_LIBRARIES + ("auto",):
            raise ValueError(f"GPT2: gemm must be one of {GEMM_LIBRARIES} or 'auto', got {gemm!r}")
        # auto: cuBLASLt with the bias and GELU epilogues on a GPU (bf16 d12 B=16 T=1024 on an
        # H200, 2026-11-28: 37.8 ms/step against 42.0 ms with cuBLAS + llmcu's bias and GELU
        # kernels); under emulation cuBLAS's path, so the tests run llmcu's own kernels
        self.gemm = gemm if gemm != "auto" else ("cublaslt" if device == "cuda" else "cublas")
        if bias_epilogue and self.gemm not in LT_ALL:
            raise ValueError(f"GPT2: bias_epilogue=True takes the bias gradients from the weight-gradient "
                             f"GEMMs' cuBLASLt epilogue, which only gemm={LT_ALL[0]!r} or {LT_ALL[1]!r} "
                             f"runs; got gemm={gemm!r}" + (f" (here {self.gemm!r})" if gemm == "auto" else ""))
        if flash_version not in FLASH_VERSIONS:
            raise ValueError(f"GPT2: flash_version must be one of {FLASH_VERSIONS}, got {flash_version!r}")
        self.flash_version = flash_version
        if flash_schedule not in SCHEDULES:
            raise ValueError(f"GPT2: flash_schedule must be one of {SCHEDULES}, got {flash_schedule!r}")
        if flash_schedule != SCHEDULES[0] and flash_version in ("auto", 1, 2):
            raise ValueError(f"GPT2: flash_schedule={flash_schedule!r} needs flash_version 3 to 9 "
                             f"(the tensor-core kernels), got flash_version={flash_version!r}")
        self.flash_schedule = flash_schedule
        _check_dtype("GPT2", dtype)
        if dtype == "bf16" and attention != "flash":
            raise ValueError(f"GPT2: dtype 'bf16' needs attention='flash' (the 'simple' attention "
                             f"kernels are fp32 only), got attention={attention!r}")
        self.attention = attention
        self.seed = seed
        self.backend = runtime.get_backend("cuda" if device == "cuda" else "emu")
        self.device = self.backend.name
        self.xp = self.backend.xp
        if params is None:
            params = init_parameters(config, seed)
        check_params_dtype("GPT2", params, config.num_parameters(), dtype)
        self.config = config
        self.set_parameters(params, dtype, master_weights)  # self.params, self.master
        self.p = parameter_views(config, self.params)
        self.grads = self.g = None
        self.m = self.v = None
        self.acts: Activations | None = None
        self._scratch = None
        self._inputs = self._targets = self._runs = None

    def _to_device(self, a, name):
        a = np.asarray(a.get() if hasattr(a, "get") else a)
        if a.ndim != 2:
            raise ValueError(f"GPT2.forward: {name} must be (B,T), got shape {a.shape}")
        return self.xp.asarray(np.ascontiguousarray(a, dtype=np.int32))

    def forward(self, inputs, targets=None):
        cfg = self.config
        host_inputs = np.asarray(inputs)
        B, T = host_inputs.shape if host_inputs.ndim == 2 else (0, 0)
        if T > cfg.max_seq_len:
            raise ValueError(f"GPT2.forward: T={T} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if host_inputs.size and (host_inputs.min() < 0 or host_inputs.max() >= cfg.vocab_size):
            raise ValueError(f"GPT2.forward: token ids must be in [0, {cfg.vocab_size}), "
                             f"found {host_inputs.min()}..{host_inputs.max()}")
        inputs = self._to_device(host_inputs, "inputs")
        runs = None
        if targets is not None:
            targets = self._to_device(targets, "targets")
            if targets.shape != inputs.shape:
                raise ValueError(f"GPT2.forward: targets shape {targets.shape} != inputs shape {inputs.shape}")
            # encoder_backward's sort of the token ids, done here on the host (no device sort)
            runs = tuple(self.xp.asarray(r) for r in token_runs(host_inputs))
        self._forward_device(inputs, targets)
        self._inputs, self._targets, self._runs = inputs, targets, runs
        if targets is None:
            return None
        return float(self.acts.losses.mean(dtype=np.float64))

    def _forward_device(self, inputs, targets=None):
        """The forward on device token ids (B,T) int32, checked by the caller: device work
        only (no host reads, no allocation once the activations exist), so a CUDA graph
        can capture it (llmcu/cuda/graphs.py). With targets, acts.losses gets the losses."""
        B, T = inputs.shape
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = Activations(self.xp, self.config, B, T, self.attention, self.floatx)
        a = self.acts
        forward_layers(self._ops(), self.config, self.p, a, inputs)
        if targets is not None:
            crossentropy_forward(a.losses, a.logits, targets, self.config.vocab_size,
                                 version=self.classifier_version)

    def _ops(self):
        """KERNEL_OPS, with the fused attention pinned to flash_version unless "auto", and,
        for gemm="cublaslt", the linear layers on cuBLASLt with the bias and the GELU as
        GEMM epilogues (matmul_gelu_forward / matmul_dgelu_backward fuse fc + GELU);
        "cublaslt_all" also moves the other backward GEMMs there; "cublaslt_tuned" and
        "cublaslt_all_tuned" route as those two with the cuBLASLt algorithms autotuned.
        fuse_residual=False drops the residual + layernorm fusions (the separate kernels run).
        Looked up on KERNEL_OPS at each call, so a wrapper put there (a profiler) runs."""
        if self.flash_version == "auto" and self.gemm == "cublas" and self.fuse_residual:
            return KERNEL_OPS  # (flash_schedule is "grouped": another needs a named version)
        ops = dict(vars(KERNEL_OPS))
        if not self.fuse_residual:
            for name in FUSED_RESIDUAL_OPS:
                ops.pop(name, None)
        if self.flash_version != "auto":
            for name in ("flash_attention_forward", "flash_attention_backward"):
                ops[name] = functools.partial(ops[name], version=self.flash_version,
                                              **({} if self.flash_schedule == SCHEDULES[0]
                                                 else {"schedule": self.flash_schedule}))
        if self.gemm != "cublas":  # cublaslt[_all][_tuned] (llmcu/cuda/matmul.py GEMM_LIBRARIES)
            lib = self.gemm
            ops["matmul_forward"] = functools.partial(ops["matmul_forward"], gemm_library=lib)
            ops["matmul_gelu_forward"] = functools.partial(matmul_gelu_forward, gemm_library=lib)
            ops["matmul_dgelu_backward"] = functools.partial(matmul_dgelu_backward, gemm_library=lib)
            if lib in LT_ALL:
                ops["matmul_backward"] = functools.partial(ops["matmul_backward"], gemm_library=lib,
                                                           bias_epilogue=self.bias_epilogue)
                ops["matmul_dgelu_backward"] = functools.partial(matmul_dgelu_backward, gemm_library=lib,
                                                                 bias_epilogue=self.bias_epilogue)
        return SimpleNamespace(**ops)

    def _backward_scratch(self, B, T):
        C = self.config.channels
        if self._scratch is None or self._scratch["dres"].shape != (B, T, C):
            self._scratch = backward_scratch(lambda *shape: self.xp.zeros(shape, dtype=self.floatx),
                                             B, T, C)
        return self._scratch

    def backward(self, loss_scale=1.0):
        """Accumulate loss_scale * d(mean loss)/d(params) into self.grads; acts.logits
        becomes dlogits. loss_scale = 1/grad_accum_steps for gradient accumulation."""
        if self._targets is None:
            raise RuntimeError("GPT2.backward: call forward(inputs, targets) with targets first")
        self._backward_device(self._inputs, self._targets, self._runs, loss_scale)
        self._targets = None  # the logits are gone: a second backward needs a new forward

    def _backward_device(self, inputs, targets, runs, loss_scale=1.0):
        """backward() on the device arrays of the last _forward_device: inputs, targets,
        runs = encoder.token_runs of the inputs (on the device). Device work only."""
        if self.grads is None:
            self.zero_grad()
        cfg, p, g, a = self.config, self.p, self.g, self.acts
        B, T = a.B, a.T
        fused_classifier_dlogits(a.logits, a.losses, targets, cfg.vocab_size, loss_scale / (B * T),
                                 version=self.classifier_version)
        ops = self._backward_ops(self._ops())
        ops = SimpleNamespace(**{**vars(ops), "encoder_backward": functools.partial(
            ops.encoder_backward, token_runs=runs)})
        backward_layers(ops, cfg, p, g, a, a.logits, inputs, self._backward_scratch(B, T))

    def sampler(self) -> "GPT2":
        """A model sharing these parameters with its own activations (for sampling).
        A bf16 model's sampler runs in bf16 (acts.logits holds bf16 bits) without a master copy."""
        return GPT2(self.config, self.params, device=self.device, attention=self.attention,
                    dtype=self.dtype, master_weights=False, flash_version=self.flash_version,
                    gemm=self.gemm, classifier_version=self.classifier_version,
                    fuse_residual=self.fuse_residual, bias_epilogue=self.bias_epilogue,
                    flash_schedule=self.flash_schedule)
