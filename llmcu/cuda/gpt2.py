"""GPT-2 training step on the kernels: the orchestrator.

Parameters, gradients, AdamW moments and activations are allocated once as
flat buffers with named views (config.parameter_views) on the device; the
forward, backward and update call only the wrappers in this package, on one
stream. device="cuda" runs on the GPU through CuPy; device="emu" runs the
same kernels on the CPU (llmcu.emu) on NumPy arrays, for tests.

Differences from the NumPy oracle (llmcu/cpu/gpt2.py), all for speed or memory:
no probabilities buffer; backward() overwrites acts.logits with dlogits
(llm.c's fused classifier); the attention keeps lse, not the probabilities;
the first backward() after zero_grad() has the GEMMs overwrite (=) the weight
and bias gradients instead of adding onto zeros (matmul_backward's
accumulate_weight=False: in bf16 that skips an fp32 temporary and an add pass
per weight), later ones (gradient accumulation) add.

Kernels: one per op, the same on the GPU and the emulator (kernel_table() lists
them for a model; llmcu/ops.py GPT2_OPS names the ops). The attention runs the
fused kernels (kernels/attention.cu), which keep only each query row's
log-sum-exp "lse" (L,B,NH,T) for the backward, not the oracle's probabilities
(L,B,NH,T,T): 9 MiB instead of 9.0 GiB at d12, B=16, T=1024. The linear layers
run cuBLASLt with the bias and GELU epilogues (llmcu/cuda/matmul.py; the
emulator computes the same at the same call sites). Every other kernel version
is in the lab (kernels/dev/, benchmarks/lab.py), not here.

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
is llmcu/cuda/mixed_precision.py's, which also keeps ZeRO-1's shard of the master
copy and moments: keep_shard).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ..config import GPT2Config, parameter_views
from ..cpu.gpt2 import DECAYED, backward_layers, backward_scratch, forward_layers, init_parameters
from ..ops import GPT2_OPS, ops_table
from . import runtime
from .attention import flash_kernel_version
from .classifier import crossentropy_forward, fused_classifier_dlogits
from .encoder import token_runs
from .mixed_precision import (DTYPES, MixedPrecisionAdamW, allocate_views, check_dtype,
                              check_params_dtype)

# The kernel wrappers of GPT-2's layer sequence (llmcu/cpu/gpt2.py), by name.
KERNEL_OPS = ops_table("cuda", GPT2_OPS)

ACTIVATIONS = (  # name: shape in units of (L, B, T, NH, C, Vp); per-layer tensors lead with L
    ("encoded", "BTC"), ("ln1", "LBTC"), ("ln1_mean", "LBT"), ("ln1_rstd", "LBT"),
    ("qkv", "LBT3C"), ("lse", "LBNT"), ("atty", "LBTC"), ("attproj", "LBTC"),
    ("residual2", "LBTC"), ("ln2", "LBTC"), ("ln2_mean", "LBT"), ("ln2_rstd", "LBT"),
    ("fch", "LBT4C"), ("fch_gelu", "LBT4C"), ("fcproj", "LBTC"), ("residual3", "LBTC"),
    ("lnf", "BTC"), ("lnf_mean", "BT"), ("lnf_rstd", "BT"), ("logits", "BTV"), ("losses", "BT"),
)


# Activations that stay float32 whatever the dtype: statistics, losses, attention's lse.
FP32_ACTIVATIONS = frozenset({"ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean",
                              "lnf_rstd", "losses", "lse"})



def activation_shapes(config: GPT2Config, B: int, T: int) -> list[tuple[str, tuple[int, ...]]]:
    L, C, NH, Vp = config.num_layers, config.channels, config.num_heads, config.padded_vocab_size
    dims = {"L": (L,), "B": (B,), "T": (T,), "N": (NH,), "C": (C,), "3C": (3 * C,),
            "4C": (4 * C,), "V": (Vp,)}
    out = []
    for name, code in ACTIVATIONS:
        shape, i = (), 0
        while i < len(code):
            key = code[i:i + 2] if code[i] in "34" else code[i]
            shape += dims[key]
            i += len(key)
        out.append((name, shape))
    return out


def activation_bytes(config: GPT2Config, B: int, T: int, dtype: str = "fp32") -> int:
    """Bytes of the Activations buffers for a (B,T) step (floatX of `dtype`, the
    FP32_ACTIVATIONS float32): arithmetic on the shapes."""
    check_dtype("activation_bytes", dtype)
    return sum(math.prod(s) * (4 if name in FP32_ACTIVATIONS else DTYPES[dtype].itemsize)
               for name, s in activation_shapes(config, B, T))


class Activations:
    """One flat buffer per element type for every activation of a (B,T) step, with
    named views: `memory` (floatX: float32, or uint16 for bf16) and, in bf16,
    `stats` (float32: FP32_ACTIVATIONS); in fp32 everything is in `memory`.
    attention = "flash" tells the shared layer sequence (llmcu/cpu/gpt2.py) that these
    activations keep the fused attention's lse (L,B,NH,T), not the oracle's att."""
    attention = "flash"

    def __init__(self, xp, config: GPT2Config, B: int, T: int, floatx=np.float32):
        self.B, self.T = B, T
        self.memory, self.stats = allocate_views(self, xp, activation_shapes(config, B, T),
                                                 floatx, FP32_ACTIVATIONS)

    def nbytes(self) -> int:
        return self.memory.nbytes + (self.stats.nbytes if self.stats is not None else 0)


class GPT2(MixedPrecisionAdamW):
    """GPT-2 whose every layer runs a kernel from kernels/ (device "cuda" or "emu"), one per
    op (kernel_table). dtype "fp32" or "bf16" (module doc); params: float32 values (a bf16
    model rounds them to nearest for its bf16 copy and keeps them as the fp32 master copy),
    or, for dtype "bf16" only, a uint16 array of bf16 bits, which the model then shares."""

    OPS, DECAYED = KERNEL_OPS, DECAYED  # for FlatAdamW: the kernel AdamW and global norm

    def __init__(self, config: GPT2Config, params=None, seed: int = 42, device: str = "cuda",
                 dtype: str = "fp32", master_weights: bool = True):
        check_dtype("GPT2", dtype)
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

    def kernel_table(self) -> dict:
        """op -> the kernels (kernels/<stem>.cu) or library calls this model's step runs for
        it, for its dtype and shapes; the launch-spy test (tests/test_product_path.py) checks a
        step launches exactly these."""
        return step_kernels(self.config, self.dtype)

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
            self.acts = Activations(self.xp, self.config, B, T, self.floatx)
        a = self.acts
        forward_layers(KERNEL_OPS, self.config, self.p, a, inputs)
        if targets is not None:
            crossentropy_forward(a.losses, a.logits, targets, self.config.vocab_size)

    def _backward_scratch(self, B, T):
        C = self.config.channels
        if self._scratch is None or self._scratch["dres"].shape != (B, T, C):
            self._scratch = backward_scratch(lambda *shape: self.xp.zeros(shape, dtype=self.floatx),
                                             B, T, C)
        return self._scratch

    def backward(self, loss_scale=1.0, layer_done=None):
        """Accumulate loss_scale * d(mean loss)/d(params) into self.grads; acts.logits
        becomes dlogits. loss_scale = 1/grad_accum_steps for gradient accumulation;
        layer_done: llmcu/cpu/gpt2.backward_layers'."""
        if self._targets is None:
            raise RuntimeError("GPT2.backward: call forward(inputs, targets) with targets first")
        self._backward_device(self._inputs, self._targets, self._runs, loss_scale, layer_done)
        self._targets = None  # the logits are gone: a second backward needs a new forward

    def _backward_device(self, inputs, targets, runs, loss_scale=1.0, layer_done=None):
        """backward() on the device arrays of the last _forward_device: inputs, targets,
        runs = encoder.token_runs of the inputs (on the device). Device work only."""
        if self.grads is None:
            self.zero_grad()
        cfg, p, g, a = self.config, self.p, self.g, self.acts
        B, T = a.B, a.T
        fused_classifier_dlogits(a.logits, a.losses, targets, cfg.vocab_size, loss_scale / (B * T))
        ops = self._backward_ops(KERNEL_OPS)
        ops = SimpleNamespace(**{**vars(ops), "encoder_backward": functools.partial(
            ops.encoder_backward, token_runs=runs)})
        backward_layers(ops, cfg, p, g, a, a.logits, inputs, self._backward_scratch(B, T), layer_done)

    def sampler(self) -> "GPT2":
        """A model sharing these parameters with its own activations (for sampling).
        A bf16 model's sampler runs in bf16 (acts.logits holds bf16 bits) without a master copy."""
        return GPT2(self.config, self.params, device=self.device, dtype=self.dtype,
                    master_weights=False)


def step_kernels(config: GPT2Config, dtype: str = "fp32") -> dict:
    """The product table: op -> what one training step of this model runs for it, as
    "<stem>:<kernel>" for a kernel of kernels/<stem>.cu and "cublaslt:<epilogue>" or
    "cublas:gemm" for a library GEMM (the emulator runs the same calls in NumPy). The
    16-byte kernels run where the shapes allow; GPT-2's always do (C, 3C, 4C and Vp are
    multiples of 8 and the activations one aligned buffer), so the scalar fallbacks
    (encoder_forward_kernel1, fused_classifier_kernel1) are not in the table."""
    check_dtype("step_kernels", dtype)
    attention = flash_kernel_version(DTYPES[dtype], config.channels // config.num_heads)
    wide = config.channels % (16 // DTYPES[dtype].itemsize) == 0
    table = {
        "encoder_forward": (f"encoder:encoder_forward_kernel{2 if wide else 1}",),
        "encoder_backward": ("encoder:encoder_wpe_backward_kernel2", "encoder:encoder_wte_backward_kernel2"),
        "layernorm_forward": ("layernorm:layernorm_forward_kernel1",),
        "residual_layernorm_forward": ("layernorm:residual_layernorm_forward_kernel1",),
        "layernorm_backward": ("layernorm:layernorm_backward_kernel2",
                               "layernorm:layernorm_param_backward_reduce_kernel2"),
        "layernorm_backward_add": ("layernorm:layernorm_backward_kernel2",
                                   "layernorm:layernorm_param_backward_reduce_kernel2"),
        "matmul_forward": ("cublaslt:BIAS", "cublaslt:DEFAULT"),  # the LM head has no bias
        "matmul_gelu_forward": ("cublaslt:GELU_AUX_BIAS",),
        "matmul_backward": ("cublas:gemm", "matmul:matmul_bias_backward_kernel2",
                            "matmul:matmul_bias_backward_reduce_kernel2"),
        "matmul_dgelu_backward": ("cublaslt:DGELU", "cublas:gemm", "matmul:matmul_bias_backward_kernel2",
                                  "matmul:matmul_bias_backward_reduce_kernel2"),
        "flash_attention_forward": (f"attention:attention_flash_forward_kernel{attention}",),
        "flash_attention_backward": ("attention:attention_flash_backward_preprocess_kernel1",
                                     f"attention:attention_flash_backward_dq_kernel{attention}",
                                     f"attention:attention_flash_backward_dkdv_kernel{attention}"),
        "crossentropy_forward": ("classifier:fused_classifier_kernel2",),
        "fused_classifier_dlogits": ("classifier:fused_classifier_kernel2",),
        "global_norm": ("global_norm:global_norm_squared_kernel1", "global_norm:global_norm_finish_kernel1"),
        "adamw_update": ("adamw:adamw_kernel1" if dtype == "fp32" else "adamw:adamw_kernel2",),
    }
    return table
