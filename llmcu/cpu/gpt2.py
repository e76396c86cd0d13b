"""GPT-2 on NumPy: the CPU backend and the oracle for the CUDA kernels.

Parameters, gradients and AdamW moments are each one flat float32 array in
llm.c's order, with named views (config.parameter_views). Activations for a
(B,T) shape are allocated once and reused while the shape stays the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace

import numpy as np

from ..config import GPT2Config, parameter_views
from ..ops import GPT2_OPS, ORACLE_ATTENTION_OPS, ops_table
from .classifier import crossentropy_softmax_backward, fused_classifier
from .flat_adamw import FlatAdamW

# The layer functions the step below calls (llmcu/ops.py); llmcu/cuda/gpt2.py passes the
# kernel wrappers of the same names and signatures.
CPU_OPS = ops_table("cpu", GPT2_OPS + ORACLE_ATTENTION_OPS)

INIT_STD = 0.02

# Parameters that get weight decay: the matrices and embeddings (llm.c's -c);
# biases and layernorm parameters do not.
DECAYED = frozenset({"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"})


def init_parameters(config: GPT2Config, seed: int = 42) -> np.ndarray:
    """Random GPT-2 parameters as llm.c and nanoGPT initialise them.

    Normal(0, 0.02) for embeddings and Linear weights, 0.02/sqrt(2L) for the
    two projections that write into the residual stream, LayerNorm weights 1,
    all biases 0, and the padded rows of wte 0.
    """
    rng = np.random.default_rng(seed)
    flat = np.zeros(config.num_parameters(), dtype=np.float32)
    p = parameter_views(config, flat)
    residual_std = INIT_STD / math.sqrt(2 * config.num_layers)
    for name, std in (("wte", INIT_STD), ("wpe", INIT_STD), ("qkvw", INIT_STD),
                      ("attprojw", residual_std), ("fcw", INIT_STD), ("fcprojw", residual_std)):
        rows = config.vocab_size if name == "wte" else p[name].shape[0]
        target = p[name][:rows]  # contiguous: leading rows of wte, or all L layers' matrices
        # drawn straight into the parameters: the same values as standard_normal(shape)
        # without a full-size temporary (wte's is 154 MB, fresh pages to fault in)
        rng.standard_normal(out=target, dtype=np.float32)
        target *= np.float32(std)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = 1.0
    return flat


def forward_layers(ops, config: GPT2Config, p, a, inputs):
    """GPT-2's forward from token ids to a.logits, through the layer functions in `ops`
    (llmcu/ops.py GPT2_OPS). The fc layer and its GELU are one call (matmul_gelu_forward:
    one cuBLASLt GEMM on the kernels); each residual add and the layernorm that reads its
    sum are one call (residual_layernorm_forward): residual2 with ln2, residual3[l] with
    ln1 of layer l + 1 (lnf after the last layer). The attention runs the fused kernels
    when the activations keep lse (a.attention == "flash"), else the plain one (att)."""
    NH, L = config.num_heads, config.num_layers
    ops.encoder_forward(a.encoded, inputs, p["wte"], p["wpe"])
    if L > 0:
        ops.layernorm_forward(a.ln1[0], a.ln1_mean[0], a.ln1_rstd[0], a.encoded, p["ln1w"][0], p["ln1b"][0])
    else:
        ops.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, a.encoded, p["lnfw"], p["lnfb"])
    residual = a.encoded
    for l in range(L):
        # a.ln1[l] is layernorm(residual), written before the loop or by the previous layer
        ops.matmul_forward(a.qkv[l], a.ln1[l], p["qkvw"][l], p["qkvb"][l])
        if getattr(a, "attention", "simple") == "flash":  # fused: saves lse (L,B,NH,T), not att
            ops.flash_attention_forward(a.atty[l], a.lse[l], a.qkv[l], NH)
        else:
            ops.attention_forward(a.atty[l], a.att[l], a.qkv[l], NH)
        ops.matmul_forward(a.attproj[l], a.atty[l], p["attprojw"][l], p["attprojb"][l])
        ops.residual_layernorm_forward(a.residual2[l], a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], residual,
                                       a.attproj[l], p["ln2w"][l], p["ln2b"][l])
        ops.matmul_gelu_forward(a.fch_gelu[l], a.fch[l], a.ln2[l], p["fcw"][l], p["fcb"][l])
        ops.matmul_forward(a.fcproj[l], a.fch_gelu[l], p["fcprojw"][l], p["fcprojb"][l])
        if l + 1 < L:  # the next layer's ln1
            ln = (a.ln1[l + 1], a.ln1_mean[l + 1], a.ln1_rstd[l + 1], p["ln1w"][l + 1], p["ln1b"][l + 1])
        else:  # the final layernorm
            ln = (a.lnf, a.lnf_mean, a.lnf_rstd, p["lnfw"], p["lnfb"])
        ops.residual_layernorm_forward(a.residual3[l], ln[0], ln[1], ln[2], a.residual2[l], a.fcproj[l],
                                       ln[3], ln[4])
        residual = a.residual3[l]
    ops.matmul_forward(a.logits, a.lnf, p["wte"])  # weight tying: wte is the LM head


def backward_scratch(zeros, B: int, T: int, C: int) -> dict:
    """The activation-gradient buffers backward_layers needs (zeros(*shape) allocates)."""
    return {"dlnf": zeros(B, T, C), "dres": zeros(B, T, C), "dln": zeros(B, T, C),
            "datty": zeros(B, T, C), "dqkv": zeros(B, T, 3 * C), "dfch": zeros(B, T, 4 * C)}


def backward_layers(ops, config: GPT2Config, p, g, a, dlogits, inputs, s, layer_done=None):
    """From dlogits back through every layer, accumulating into the gradients g.

    s: backward_scratch buffers. dres carries the residual stream's gradient; each
    layernorm's backward adds its input gradient into it (layernorm_backward_add), and
    fcproj's backward takes the GELU's backward along (matmul_dgelu_backward).
    layer_done(l), if given, is called once layer l's parameter gradients are final
    (data parallel starts reducing them then: llmcu/buckets.py).
    """
    NH = config.num_heads
    dres, dln = s["dres"], s["dln"]
    ops.matmul_backward(s["dlnf"], g["wte"], None, dlogits, a.lnf, p["wte"])
    last = a.residual3[-1] if config.num_layers else a.encoded
    ops.layernorm_backward(dres, g["lnfw"], g["lnfb"], s["dlnf"], last, p["lnfw"], a.lnf_mean, a.lnf_rstd)
    for l in reversed(range(config.num_layers)):
        res_in = a.residual3[l - 1] if l > 0 else a.encoded
        # dres is d/d residual3[l]; the MLP branch:
        ops.matmul_dgelu_backward(s["dfch"], g["fcprojw"][l], g["fcprojb"][l], dres, a.fch_gelu[l],
                                  p["fcprojw"][l], a.fch[l])
        ops.matmul_backward(dln, g["fcw"][l], g["fcb"][l], s["dfch"], a.ln2[l], p["fcw"][l])
        ops.layernorm_backward_add(dres, g["ln2w"][l], g["ln2b"][l], dln, a.residual2[l], p["ln2w"][l],
                                   a.ln2_mean[l], a.ln2_rstd[l])
        # dres is now d/d residual2[l]; the attention branch:
        ops.matmul_backward(s["datty"], g["attprojw"][l], g["attprojb"][l], dres, a.atty[l], p["attprojw"][l])
        if getattr(a, "attention", "simple") == "flash":
            ops.flash_attention_backward(s["dqkv"], s["datty"], a.qkv[l], a.atty[l], a.lse[l], NH)
        else:
            ops.attention_backward(s["dqkv"], s["datty"], a.qkv[l], a.att[l], NH)
        ops.matmul_backward(dln, g["qkvw"][l], g["qkvb"][l], s["dqkv"], a.ln1[l], p["qkvw"][l])
        ops.layernorm_backward_add(dres, g["ln1w"][l], g["ln1b"][l], dln, res_in, p["ln1w"][l],
                                   a.ln1_mean[l], a.ln1_rstd[l])  # dres is now d/d res_in
        if layer_done is not None:
            layer_done(l)
    ops.encoder_backward(g["wte"], g["wpe"], dres, inputs)


def _zeros(*shape):
    return np.zeros(shape, dtype=np.float32)


@dataclass
class Activations:
    """Everything the forward pass stores for the backward, for one (B,T)."""
    B: int
    T: int
    encoded: np.ndarray = field(repr=False)
    ln1: np.ndarray = field(repr=False)
    ln1_mean: np.ndarray = field(repr=False)
    ln1_rstd: np.ndarray = field(repr=False)
    qkv: np.ndarray = field(repr=False)
    att: np.ndarray = field(repr=False)
    atty: np.ndarray = field(repr=False)
    attproj: np.ndarray = field(repr=False)
    residual2: np.ndarray = field(repr=False)
    ln2: np.ndarray = field(repr=False)
    ln2_mean: np.ndarray = field(repr=False)
    ln2_rstd: np.ndarray = field(repr=False)
    fch: np.ndarray = field(repr=False)
    fch_gelu: np.ndarray = field(repr=False)
    fcproj: np.ndarray = field(repr=False)
    residual3: np.ndarray = field(repr=False)
    lnf: np.ndarray = field(repr=False)
    lnf_mean: np.ndarray = field(repr=False)
    lnf_rstd: np.ndarray = field(repr=False)
    logits: np.ndarray = field(repr=False)
    probs: np.ndarray = field(repr=False)
    losses: np.ndarray = field(repr=False)

    @classmethod
    def allocate(cls, config: GPT2Config, B: int, T: int) -> "Activations":
        L, C, NH, Vp = config.num_layers, config.channels, config.num_heads, config.padded_vocab_size
        return cls(
            B=B, T=T, encoded=_zeros(B, T, C),
            ln1=_zeros(L, B, T, C), ln1_mean=_zeros(L, B, T), ln1_rstd=_zeros(L, B, T),
            qkv=_zeros(L, B, T, 3 * C), att=_zeros(L, B, NH, T, T), atty=_zeros(L, B, T, C),
            attproj=_zeros(L, B, T, C), residual2=_zeros(L, B, T, C),
            ln2=_zeros(L, B, T, C), ln2_mean=_zeros(L, B, T), ln2_rstd=_zeros(L, B, T),
            fch=_zeros(L, B, T, 4 * C), fch_gelu=_zeros(L, B, T, 4 * C),
            fcproj=_zeros(L, B, T, C), residual3=_zeros(L, B, T, C),
            lnf=_zeros(B, T, C), lnf_mean=_zeros(B, T), lnf_rstd=_zeros(B, T),
            logits=_zeros(B, T, Vp), probs=_zeros(B, T, Vp), losses=_zeros(B, T),
        )

    def nbytes(self) -> int:
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))


class GPT2(FlatAdamW):
    """GPT-2 with a hand-written forward, backward and AdamW update.

    model.forward(inputs, targets) -> mean loss (or None without targets; the
    logits are in model.acts.logits); model.zero_grad(); model.backward();
    model.update(lr, step=...). The gradient and optimizer bookkeeping
    (zero_grad, grad_norm, update, optimizer_state, ...) is FlatAdamW's.
    """

    OPS = CPU_OPS
    DECAYED = DECAYED

    def __init__(self, config: GPT2Config, params: np.ndarray | None = None, seed: int = 42):
        self.config = config
        if params is None:
            params = init_parameters(config, seed)
        if params.dtype != np.float32 or params.shape != (config.num_parameters(),):
            raise ValueError(f"GPT2: params must be float32 of shape ({config.num_parameters()},), "
                             f"got {params.dtype} {params.shape}")
        self.params = params
        self.p = parameter_views(config, params)
        self.grads = self.g = None      # allocated by the first zero_grad/backward
        self.m = self.v = None          # AdamW moments, allocated by the first update
        self.acts: Activations | None = None
        self._inputs = self._targets = None
        self._dlogits = None
        self._grads_zeroed = False      # set by zero_grad, cleared by backward

    def sampler(self) -> "GPT2":
        """A model sharing these parameters with its own activations (for sampling)."""
        return GPT2(self.config, self.params)

    # -- forward ------------------------------------------------------------
    def forward(self, inputs, targets=None):
        cfg, p = self.config, self.p
        inputs = np.asarray(inputs)
        if inputs.ndim != 2:
            raise ValueError(f"GPT2.forward: inputs must be (B,T), got shape {inputs.shape}")
        B, T = inputs.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"GPT2.forward: T={T} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if inputs.size and (inputs.min() < 0 or inputs.max() >= cfg.vocab_size):
            raise ValueError(f"GPT2.forward: token ids must be in [0, {cfg.vocab_size}), "
                             f"found {inputs.min()}..{inputs.max()}")
        if targets is not None:
            targets = np.asarray(targets)
            if targets.shape != inputs.shape:
                raise ValueError(f"GPT2.forward: targets shape {targets.shape} != inputs shape {inputs.shape}")
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = Activations.allocate(cfg, B, T)
        a = self.acts
        forward_layers(CPU_OPS, cfg, p, a, inputs)

        self._inputs, self._targets = inputs, targets
        if targets is None:
            return None
        fused_classifier(a.losses, a.probs, a.logits, targets, cfg.vocab_size)
        return float(a.losses.mean(dtype=np.float64))

    # -- backward -----------------------------------------------------------
    def backward(self, loss_scale=1.0, layer_done=None):
        """Accumulate loss_scale * d(mean loss)/d(params) into self.grads.

        loss_scale = 1/grad_accum_steps makes the accumulated gradient that of
        the mean loss over the micro-batches (llm.c's dloss_mean). layer_done:
        backward_layers'."""
        if self._targets is None:
            raise RuntimeError("GPT2.backward: call forward(inputs, targets) with targets first")
        if self.grads is None:
            self.zero_grad()
        cfg, p, g, a = self.config, self.p, self.g, self.acts
        B, T, C = a.B, a.T, cfg.channels

        dlosses = np.full((B, T), loss_scale / (B * T), dtype=np.float32)
        if self._dlogits is None or self._dlogits.shape != a.logits.shape:
            self._dlogits = np.empty_like(a.logits)  # kept: a fresh (B,T,Vp) buffer faults its pages in every step
        dlogits = self._dlogits
        crossentropy_softmax_backward(dlogits, dlosses, a.probs, self._targets, cfg.vocab_size)

        scratch = backward_scratch(_zeros, B, T, C)
        ops = CPU_OPS
        if self._grads_zeroed:
            # Every Linear weight and bias gradient is written by exactly one matmul backward
            # (wte's by the LM head's, before encoder_backward adds into it), so onto freshly
            # zeroed gradients they overwrite instead of accumulating: no += pass over 85M
            # floats a d12 step (~20 ms on the 2-core VM).
            ops = SimpleNamespace(**{**vars(CPU_OPS),
                                     "matmul_backward": partial(CPU_OPS.matmul_backward, accumulate_weight=False),
                                     "matmul_dgelu_backward": partial(CPU_OPS.matmul_dgelu_backward,
                                                                      accumulate_weight=False)})
        backward_layers(ops, cfg, p, g, a, dlogits, self._inputs, scratch, layer_done)
        self._grads_zeroed = False

    def zero_grad(self):
        super().zero_grad()
        self._grads_zeroed = True  # the next backward may overwrite the Linear gradients
