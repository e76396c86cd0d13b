"""Llama (and Gemma) training step on the kernels: the orchestrator.

The same layer sequence as the NumPy oracle (forward_layers / backward_layers
of llmcu/cpu/llama.py), called with the kernel wrappers of this package:
kernels/rmsnorm.cu, rope.cu, swiglu.cu (SwiGLU and GeGLU), the fused
grouped-query attention of attention.cu (attention_flash_*), and the GPT-2
kernels for the embedding (encoder, with an all-zero position table),
matmuls, residual adds, the fused classifier and AdamW. Parameters,
gradients, AdamW moments and activations are flat buffers with named views
on the device. device="cuda" runs on the GPU through CuPy; device="emu" runs
the same kernels on the CPU (llmcu.emu) on NumPy arrays, for tests.

Differences from the oracle, as llmcu/cuda/gpt2.py: no probabilities buffer;
backward() overwrites acts.logits with dlogits (llm.c's fused classifier).

Precision: Llama(..., dtype="fp32") (the default) keeps everything float32, as
the oracle. dtype="bf16" is GPT-2's mixed precision (llmcu/cuda/gpt2.py,
llmcu/cuda/mixed_precision.py): parameters, gradients, activations, logits
in bf16 (uint16 bits); the RMSNorm rstd, attention's lse, the losses
(FP32_ACTIVATIONS), the RoPE tables, the AdamW moments and, with
master_weights=True, an fp32 master copy of the parameters (stochastically
rounded to bf16 after each update) in float32. ZeRO-1 in bf16 keeps the master copy
and the moments of the rank's shard only (MixedPrecisionAdamW.keep_shard).
"""

from __future__ import annotations

import numpy as np

from ..config import parameter_views
from ..cpu.llama import (DECAYED, activation_shapes, backward_layers, backward_scratch,
                         check_inputs, check_params, forward_layers, init_parameters, rope_tables)
from ..llama_config import LlamaConfig
from ..ops import LLAMA_OPS, ops_table
from . import runtime
from .classifier import crossentropy_forward, fused_classifier_dlogits
from .mixed_precision import MixedPrecisionAdamW, allocate_views, check_dtype, check_params_dtype

LLAMA_KERNEL_OPS = ops_table("cuda", LLAMA_OPS)  # llmcu/ops.py

# Activations that stay float32 whatever the dtype: norm statistics, attention's lse, losses.
FP32_ACTIVATIONS = frozenset({"ln1_rstd", "ln2_rstd", "lnf_rstd", "att_lse", "losses"})


class Activations:
    """The activations of a (B,T) step (llmcu/cpu/llama.activation_shapes) as named
    views of one floatX buffer `memory` (float32, or uint16 bf16 bits) and, in bf16,
    one float32 buffer `stats` for FP32_ACTIVATIONS."""

    def __init__(self, xp, config: LlamaConfig, B: int, T: int, floatx=np.float32):
        self.B, self.T = B, T
        self.memory, self.stats = allocate_views(self, xp, activation_shapes(config, B, T),
                                                 floatx, FP32_ACTIVATIONS)

    def nbytes(self) -> int:
        return self.memory.nbytes + (self.stats.nbytes if self.stats is not None else 0)


class Llama(MixedPrecisionAdamW):
    """Llama/Gemma whose every layer runs a kernel from kernels/ (device "cuda" or "emu").

    dtype "fp32" or "bf16" (module doc); params: float32 values (a bf16 model rounds
    them to nearest for its bf16 copy and keeps them as the fp32 master copy), or, for
    dtype "bf16" only, a uint16 array of bf16 bits, which the model then shares.
    The gradient and optimizer bookkeeping (zero_grad, grad_norm, update with
    ZeRO-1 shards, optimizer_state, ...) is FlatAdamW's, on the device
    arrays, with the bf16 update of llmcu/cuda/mixed_precision.py."""

    OPS = LLAMA_KERNEL_OPS
    DECAYED = DECAYED

    def __init__(self, config: LlamaConfig, params=None, seed: int = 42, device: str = "cuda",
                 dtype: str = "fp32", master_weights: bool = True):
        if device not in ("cuda", "emu"):
            raise ValueError(f"Llama: device must be 'cuda' or 'emu', got {device!r}")
        check_dtype("Llama", dtype)
        self.seed = seed
        self.backend = runtime.get_backend(device)
        self.device = self.backend.name
        xp = self.xp = self.backend.xp
        if params is None and isinstance(config, LlamaConfig):
            params = init_parameters(config, seed)
        if dtype == "bf16" and getattr(params, "dtype", None) == np.uint16 and isinstance(config, LlamaConfig):
            check_params_dtype("Llama", params, config.num_parameters(), dtype)  # shared bf16 bits
        else:
            check_params("Llama", config, params)
        self.config = config
        self.set_parameters(params, dtype, master_weights)  # self.params, self.master
        self.p = parameter_views(config, self.params)
        self.tables = rope_tables(config, xp)
        if dtype == "bf16":  # the encoder's zero position table in floatX (bf16 zero: bits 0)
            self.tables.no_wpe = xp.zeros(self.tables.no_wpe.shape, dtype=self.floatx)
        self.grads = self.g = None
        self.m = self.v = None
        self.acts: Activations | None = None
        self._scratch = None
        self._inputs = self._targets = None

    def forward(self, inputs, targets=None):
        cfg, xp = self.config, self.xp
        inputs, targets = check_inputs("Llama", cfg, inputs, targets)
        B, T = inputs.shape
        inputs = xp.asarray(np.ascontiguousarray(inputs, dtype=np.int32))
        if targets is not None:
            targets = xp.asarray(np.ascontiguousarray(targets, dtype=np.int32))
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = Activations(xp, cfg, B, T, self.floatx)
        a = self.acts
        forward_layers(LLAMA_KERNEL_OPS, cfg, self.p, a, inputs, self.tables)
        self._inputs, self._targets = inputs, targets
        if targets is None:
            return None
        crossentropy_forward(a.losses, a.logits, targets, cfg.vocab_size)
        return float(a.losses.mean(dtype=np.float64))

    def _backward_scratch(self, B, T):
        if self._scratch is None or self._scratch["dres"].shape[:2] != (B, T):
            self._scratch = backward_scratch(lambda *shape: self.xp.zeros(shape, dtype=self.floatx),
                                             self.config, B, T)
        return self._scratch

    def backward(self, loss_scale=1.0, layer_done=None):
        """Accumulate loss_scale * d(mean loss)/d(params) into self.grads; acts.logits
        becomes dlogits. loss_scale = 1/grad_accum_steps for gradient accumulation;
        layer_done: llmcu/cpu/llama.backward_layers'."""
        if self._targets is None:
            raise RuntimeError("Llama.backward: call forward(inputs, targets) with targets first")
        if self.grads is None:
            self.zero_grad()
        cfg, a = self.config, self.acts
        B, T = a.B, a.T
        fused_classifier_dlogits(a.logits, a.losses, self._targets, cfg.vocab_size, loss_scale / (B * T))
        backward_layers(self._backward_ops(LLAMA_KERNEL_OPS), cfg, self.p, self.g, a, a.logits, self._inputs,
                        self._backward_scratch(B, T), self.tables, layer_done)
        self._targets = None  # the logits are gone: a second backward needs a new forward

    def sampler(self) -> "Llama":
        """A model sharing these parameters with its own activations (for sampling).
        A bf16 model's sampler runs in bf16 without a master copy."""
        return Llama(self.config, self.params, device=self.device, dtype=self.dtype,
                     master_weights=False)
