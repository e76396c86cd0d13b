"""Llama (and Gemma) on NumPy: the CPU backend and the oracle for the kernels.

The same interface as llmcu/cpu/gpt2.GPT2, so the training loop, checkpoints
and sampling use either. Parameters, gradients and AdamW moments are each one
flat float32 array in the order of llmcu/llama_config.py, with named views.

One block, pre-norm as Llama (no biases anywhere):
    x = wte[tokens] * embed_scale
    for each layer:
        qkv = rope(rmsnorm(x) @ qkvw^T)         NH q heads, NKV k heads, NKV v heads
        x = x + attention(qkv) @ attprojw^T     causal, grouped-query
        h = rmsnorm(x) @ fcw^T                  [gate | up]
        x = x + (act(gate) * up) @ fcprojw^T    act: silu (SwiGLU) or tanh GELU (GeGLU)
    logits = rmsnorm(x) @ (lm_head or wte)^T

The layer functions come in a namespace (LLAMA_CPU_OPS here; llmcu/cuda/llama.py
passes its kernel wrappers of the same names), so forward_layers and
backward_layers are the one description of the step for both backends. The
embedding reuses the GPT-2 encoder with an all-zero position table.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..config import parameter_views
from ..formats import bf16_bits_to_float32, float32_to_bf16_bits
from ..llama_config import LlamaConfig
from ..ops import LLAMA_OPS, ops_table
from .classifier import crossentropy_softmax_backward, fused_classifier
from .flat_adamw import FlatAdamW
from .rope import rope_frequencies

LLAMA_CPU_OPS = ops_table("cpu", LLAMA_OPS)  # llmcu/ops.py

INIT_STD = 0.02

# Weight decay on the matrices and embeddings only (as llm.c's -c); not on the norms.
DECAYED = frozenset({"wte", "qkvw", "attprojw", "fcw", "fcprojw", "lm_head"})


def init_parameters(config: LlamaConfig, seed: int = 42) -> np.ndarray:
    """Random parameters: Normal(0, 0.02) for embeddings and matrices,
    0.02/sqrt(2L) for the two projections into the residual stream (as GPT-2),
    norm scales 1 (stored as 0 under Gemma's 1 + weight), padded vocab rows 0."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(config.num_parameters(), dtype=np.float32)
    p = parameter_views(config, flat)
    residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
    for name, _ in config.parameter_shapes():
        if name in ("ln1w", "ln2w", "lnfw"):
            p[name][...] = 1.0 - config.norm_weight_offset
            continue
        std = residual_std if name in ("attprojw", "fcprojw") else INIT_STD
        target = p[name][:config.vocab_size] if name in ("wte", "lm_head") else p[name]
        target[...] = rng.standard_normal(target.shape, dtype=np.float32)
        target *= np.float32(std)
    return flat


def rope_tables(config: LlamaConfig, xp=np):
    """Constants of the step: RoPE cos/sin (maxT, hs/2) and the zero position table
    (maxT, C) the GPT-2 encoder adds, as arrays of xp."""
    cos, sin = rope_frequencies(config.head_dim, config.max_seq_len, config.rope_theta,
                                config.rope_scaling)
    return SimpleNamespace(cos=xp.asarray(cos), sin=xp.asarray(sin),
                           no_wpe=xp.zeros((config.max_seq_len, config.channels), dtype=np.float32))


def lm_head_name(config: LlamaConfig) -> str:
    return "wte" if config.tie_embeddings else "lm_head"


def scale_(x, s):
    """x *= s in place: float32, or uint16 bf16 bits (the kernel model in bf16),
    rounded to nearest; NumPy or CuPy."""
    if x.dtype == np.uint16:
        x[...] = float32_to_bf16_bits(bf16_bits_to_float32(x) * np.float32(s))
    else:
        x *= np.float32(s)


def forward_layers(ops, config: LlamaConfig, p, a, inputs, tables):
    """The forward from token ids to a.logits through the layer functions in `ops`.

    a.qkv holds each layer's qkv after RoPE (what the attention and its backward
    read); the pre-RoPE projection goes through the scratch a.qkv_pre."""
    NH, NKV, eps, off = config.num_heads, config.num_kv_heads, config.norm_eps, config.norm_weight_offset
    act_forward = ops.swiglu_forward if config.mlp == "swiglu" else ops.geglu_forward
    ops.encoder_forward(a.encoded, inputs, p["wte"], tables.no_wpe)
    if config.embed_scale != 1.0:
        scale_(a.encoded, config.embed_scale)
    residual = a.encoded
    for l in range(config.num_layers):
        ops.rmsnorm_forward(a.ln1[l], a.ln1_rstd[l], residual, p["ln1w"][l], eps, off)
        ops.matmul_forward(a.qkv_pre, a.ln1[l], p["qkvw"][l])
        ops.rope_forward(a.qkv[l], a.qkv_pre, tables.cos, tables.sin, NH, NKV)
        ops.flash_attention_forward(a.atty[l], a.att_lse[l], a.qkv[l], NH, NKV)
        ops.matmul_forward(a.attproj[l], a.atty[l], p["attprojw"][l])
        ops.residual_forward(a.residual2[l], residual, a.attproj[l])
        ops.rmsnorm_forward(a.ln2[l], a.ln2_rstd[l], a.residual2[l], p["ln2w"][l], eps, off)
        ops.matmul_forward(a.fch[l], a.ln2[l], p["fcw"][l])
        act_forward(a.fch_act[l], a.fch[l])
        ops.matmul_forward(a.fcproj[l], a.fch_act[l], p["fcprojw"][l])
        ops.residual_forward(a.residual3[l], a.residual2[l], a.fcproj[l])
        residual = a.residual3[l]
    ops.rmsnorm_forward(a.lnf, a.lnf_rstd, residual, p["lnfw"], eps, off)
    ops.matmul_forward(a.logits, a.lnf, p[lm_head_name(config)])


def backward_scratch(zeros, config: LlamaConfig, B: int, T: int) -> dict:
    """The activation-gradient buffers backward_layers needs (zeros(*shape) allocates)."""
    C, H = config.channels, config.hidden_dim
    return {"dlnf": zeros(B, T, C), "dres": zeros(B, T, C), "dtmp": zeros(B, T, C),
            "dln": zeros(B, T, C), "datty": zeros(B, T, config.attn_channels),
            "dqkv": zeros(B, T, config.qkv_channels), "dqkv_pre": zeros(B, T, config.qkv_channels),
            "dfch": zeros(B, T, 2 * H), "dfch_act": zeros(B, T, H),
            "dwpe": zeros(T, C)}  # the encoder's position gradient, discarded


def backward_layers(ops, config: LlamaConfig, p, g, a, dlogits, inputs, s, tables, layer_done=None):
    """From dlogits back through every layer, accumulating into the gradients g.

    s: backward_scratch buffers. dres carries the residual stream's gradient;
    each norm's input gradient lands in dtmp and is added into it. layer_done(l),
    if given, is called once layer l's parameter gradients are final (llmcu/buckets.py)."""
    NH, NKV, off = config.num_heads, config.num_kv_heads, config.norm_weight_offset
    act_backward = ops.swiglu_backward if config.mlp == "swiglu" else ops.geglu_backward
    dres, dtmp, dln = s["dres"], s["dtmp"], s["dln"]
    head = lm_head_name(config)
    ops.matmul_backward(s["dlnf"], g[head], None, dlogits, a.lnf, p[head])
    last = a.residual3[-1] if config.num_layers else a.encoded
    ops.rmsnorm_backward(dres, g["lnfw"], s["dlnf"], last, p["lnfw"], a.lnf_rstd, off)
    for l in reversed(range(config.num_layers)):
        res_in = a.residual3[l - 1] if l > 0 else a.encoded
        # dres is d/d residual3[l]; the MLP branch:
        ops.matmul_backward(s["dfch_act"], g["fcprojw"][l], None, dres, a.fch_act[l], p["fcprojw"][l])
        act_backward(s["dfch"], s["dfch_act"], a.fch[l])
        ops.matmul_backward(dln, g["fcw"][l], None, s["dfch"], a.ln2[l], p["fcw"][l])
        ops.rmsnorm_backward(dtmp, g["ln2w"][l], dln, a.residual2[l], p["ln2w"][l], a.ln2_rstd[l], off)
        ops.residual_forward(dres, dres, dtmp)  # now d/d residual2[l]; the attention branch:
        ops.matmul_backward(s["datty"], g["attprojw"][l], None, dres, a.atty[l], p["attprojw"][l])
        ops.flash_attention_backward(s["dqkv"], s["datty"], a.qkv[l], a.atty[l], a.att_lse[l], NH, NKV)
        ops.rope_backward(s["dqkv_pre"], s["dqkv"], tables.cos, tables.sin, NH, NKV)
        ops.matmul_backward(dln, g["qkvw"][l], None, s["dqkv_pre"], a.ln1[l], p["qkvw"][l])
        ops.rmsnorm_backward(dtmp, g["ln1w"][l], dln, res_in, p["ln1w"][l], a.ln1_rstd[l], off)
        ops.residual_forward(dres, dres, dtmp)  # now d/d res_in
        if layer_done is not None:
            layer_done(l)
    if config.embed_scale != 1.0:
        scale_(dres, config.embed_scale)
    ops.encoder_backward(g["wte"], s["dwpe"], dres, inputs)


ACTIVATIONS = (  # name: shape in units of (L, B, T, C, NH, QKV, A = NH*hs, H, Vp)
    ("encoded", "BTC"), ("ln1", "LBTC"), ("ln1_rstd", "LBT"), ("qkv_pre", "BTQ"),
    ("qkv", "LBTQ"), ("att_lse", "LBNT"), ("atty", "LBTA"), ("attproj", "LBTC"),
    ("residual2", "LBTC"), ("ln2", "LBTC"), ("ln2_rstd", "LBT"), ("fch", "LBTF"),
    ("fch_act", "LBTH"), ("fcproj", "LBTC"), ("residual3", "LBTC"),
    ("lnf", "BTC"), ("lnf_rstd", "BT"), ("logits", "BTV"), ("losses", "BT"),
)


def activation_shapes(config: LlamaConfig, B: int, T: int) -> list[tuple[str, tuple[int, ...]]]:
    dims = {"L": config.num_layers, "B": B, "T": T, "C": config.channels, "N": config.num_heads,
            "Q": config.qkv_channels, "A": config.attn_channels, "H": config.hidden_dim,
            "F": 2 * config.hidden_dim, "V": config.padded_vocab_size}
    return [(name, tuple(dims[c] for c in code)) for name, code in ACTIVATIONS]


class Activations:
    """Everything the forward stores for the backward, for one (B,T): one flat
    buffer of xp with named views (the kernel orchestrator allocates it the same way)."""

    def __init__(self, xp, config: LlamaConfig, B: int, T: int, probs: bool = False):
        self.B, self.T = B, T
        shapes = activation_shapes(config, B, T)
        if probs:  # the NumPy oracle keeps the softmax for the classifier backward
            shapes.append(("probs", (B, T, config.padded_vocab_size)))
        total = sum(math.prod(s) for _, s in shapes)
        self.memory = xp.zeros(total, dtype=np.float32)
        offset = 0
        for name, shape in shapes:
            size = math.prod(shape)
            setattr(self, name, self.memory[offset:offset + size].reshape(shape))
            offset += size

    def nbytes(self) -> int:
        return self.memory.nbytes


def check_inputs(cls_name: str, config, inputs, targets):
    """(inputs, targets) as NumPy arrays after the checks both backends make."""
    inputs = np.asarray(inputs.get() if hasattr(inputs, "get") else inputs)
    if inputs.ndim != 2:
        raise ValueError(f"{cls_name}.forward: inputs must be (B,T), got shape {inputs.shape}")
    B, T = inputs.shape
    if T > config.max_seq_len:
        raise ValueError(f"{cls_name}.forward: T={T} exceeds the model's max_seq_len={config.max_seq_len}")
    if inputs.size and (inputs.min() < 0 or inputs.max() >= config.vocab_size):
        raise ValueError(f"{cls_name}.forward: token ids must be in [0, {config.vocab_size}), "
                         f"found {inputs.min()}..{inputs.max()}")
    if targets is not None:
        targets = np.asarray(targets.get() if hasattr(targets, "get") else targets)
        if targets.shape != inputs.shape:
            raise ValueError(f"{cls_name}.forward: targets shape {targets.shape} != inputs shape {inputs.shape}")
        if targets.size and (targets.min() < 0 or targets.max() >= config.vocab_size):
            raise ValueError(f"{cls_name}.forward: target ids must be in [0, {config.vocab_size}), "
                             f"found {targets.min()}..{targets.max()}")
    return inputs, targets


def check_params(cls_name: str, config, params):
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"{cls_name}: config must be a LlamaConfig, found {type(config).__name__}")
    n = config.num_parameters()
    if params.dtype != np.float32 or tuple(params.shape) != (n,):
        raise ValueError(f"{cls_name}: params must be float32 of shape ({n},), "
                         f"got {params.dtype} {tuple(params.shape)}")


class Llama(FlatAdamW):
    """Llama/Gemma with a hand-written forward, backward and AdamW update (NumPy).

    model.forward(inputs, targets) -> mean loss (or None without targets; the
    logits are in model.acts.logits); model.zero_grad(); model.backward();
    model.update(lr, step=...). The gradient and optimizer bookkeeping
    (zero_grad, grad_norm, update, optimizer_state, ...) is FlatAdamW's.
    """

    OPS = LLAMA_CPU_OPS
    DECAYED = DECAYED

    def __init__(self, config: LlamaConfig, params: np.ndarray | None = None, seed: int = 42):
        if params is None and isinstance(config, LlamaConfig):
            params = init_parameters(config, seed)
        check_params("Llama", config, params)
        self.config = config
        self.params = params
        self.p = parameter_views(config, params)
        self.tables = rope_tables(config)
        self.grads = self.g = None      # allocated by the first zero_grad/backward
        self.m = self.v = None          # AdamW moments, allocated by the first update
        self.acts: Activations | None = None
        self._inputs = self._targets = None

    def sampler(self) -> "Llama":
        """A model sharing these parameters with its own activations (for sampling)."""
        return Llama(self.config, self.params)

    # -- forward ------------------------------------------------------------
    def forward(self, inputs, targets=None):
        cfg = self.config
        inputs, targets = check_inputs("Llama", cfg, inputs, targets)
        B, T = inputs.shape
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = Activations(np, cfg, B, T, probs=True)
        a = self.acts
        forward_layers(LLAMA_CPU_OPS, cfg, self.p, a, inputs, self.tables)
        self._inputs, self._targets = inputs, targets
        if targets is None:
            return None
        fused_classifier(a.losses, a.probs, a.logits, targets, cfg.vocab_size)
        return float(a.losses.mean(dtype=np.float64))

    # -- backward -----------------------------------------------------------
    def backward(self, loss_scale=1.0, layer_done=None):
        """Accumulate loss_scale * d(mean loss)/d(params) into self.grads
        (loss_scale = 1/grad_accum_steps for gradient accumulation; layer_done:
        backward_layers')."""
        if self._targets is None:
            raise RuntimeError("Llama.backward: call forward(inputs, targets) with targets first")
        if self.grads is None:
            self.zero_grad()
        cfg, a = self.config, self.acts
        B, T = a.B, a.T
        dlosses = np.full((B, T), loss_scale / (B * T), dtype=np.float32)
        dlogits = np.empty_like(a.logits)
        crossentropy_softmax_backward(dlogits, dlosses, a.probs, self._targets, cfg.vocab_size)
        scratch = backward_scratch(lambda *shape: np.zeros(shape, np.float32), cfg, B, T)
        backward_layers(LLAMA_CPU_OPS, cfg, self.p, self.g, a, dlogits, self._inputs, scratch, self.tables,
                        layer_done)
