"""GPT-2 in PyTorch: the reference the NumPy oracle is checked against.

A plain nanoGPT-style model whose parameters map one to one onto llm.c's flat
layout (config.parameter_shapes): wte keeps all Vp rows (the padded rows are
zero and, since the loss only looks at the first V logits, get zero
gradient), and the LM head is wte itself, as in llm.c. The module names are
Hugging Face's GPT-2 names, so a HF checkpoint loads with nothing renamed,
only the Conv1D weights transposed.

    model = from_flat(config, init_parameters(config, seed))
    logits, loss = model(x, y)          # logits (B,T,Vp), loss over [:V]
    loss.backward(); grads = grads_to_flat(model)
    opt = configure_optimizer(model, lr, weight_decay)   # llm.c's decay groups

This module imports torch; `import llmcu` never imports it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPT2Config, parameter_views
from .cpu.gpt2 import DECAYED

# The llm.c <-> Hugging Face name map and the checkpoint reading live in llmcu.hf
# (NumPy only); the module names here are HF's, so the same map names this model's
# parameters. Re-exported for the callers that know them from here.
from .hf import (HF_CONV1D, HF_IGNORED, HF_WEIGHT_FILES, PARAMETER_MAP,  # noqa: E402,F401
                 hf_config, hf_to_flat, load_hf_state_dict)

# Attention implementations. "math" writes softmax(q k^T / sqrt(hs), masked) v out
# in the same order of operations as llmcu/cpu/attention.py; it agrees with the
# NumPy oracle more tightly than F.scaled_dot_product_attention (which on the CPU
# runs a blocked flash kernel with an online softmax), so it is the default for
# parity tests. "sdpa" is there for speed and as a second opinion.
ATTENTION_IMPLS = ("math", "sdpa")
DEFAULT_ATTENTION = "math"


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPT2Config, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"CausalSelfAttention: attention must be one of {ATTENTION_IMPLS}, "
                             f"got {attention!r}")
        C = config.channels
        self.n_head = config.num_heads
        self.attention = attention
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)
            att = att.masked_fill(future, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config: GPT2Config):
        super().__init__()
        C = config.channels
        self.c_fc = nn.Linear(C, 4 * C)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config: GPT2Config, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.channels)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.channels)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 with llm.c's padded vocabulary. Parameters start uninitialised in
    spirit: build it with from_flat() or from_hf_checkpoint()."""

    def __init__(self, config: GPT2Config, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.channels),
            wpe=nn.Embedding(config.max_seq_len, config.channels),
            h=nn.ModuleList([Block(config, attention) for _ in range(config.num_layers)]),
            ln_f=nn.LayerNorm(config.channels),
        ))

    def forward(self, idx, targets=None):
        """logits (B,T,Vp) and the mean cross-entropy over the first V columns
        (None without targets)."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"GPT.forward: T={T} exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = F.linear(x, self.transformer.wte.weight)  # weight tying: wte is the LM head
        loss = None
        if targets is not None:
            V = self.config.vocab_size
            loss = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1))
        return logits, loss


def _llmc_tensors(model: GPT, name: str, attr: str = "data") -> list:
    """The tensors (or their .grad) behind llm.c tensor `name`: L of them for a
    per-layer tensor, one otherwise."""
    key = PARAMETER_MAP[name]
    keys = ([key.format(l=l) for l in range(model.config.num_layers)] if "{l}" in key else [key])
    params = [model.get_parameter(k) for k in keys]
    if attr == "grad":
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return [p.detach() for p in params]


def _flatten(model: GPT, attr: str) -> np.ndarray:
    flat = np.empty(model.config.num_parameters(), dtype=np.float32)
    views = parameter_views(model.config, flat)
    for name, _ in model.config.parameter_shapes():
        tensors = _llmc_tensors(model, name, attr)
        dsts = views[name] if "{l}" in PARAMETER_MAP[name] else [views[name]]
        for t, dst in zip(tensors, dsts):
            if tuple(t.shape) != dst.shape:
                raise ValueError(f"to_flat: {name} has shape {tuple(t.shape)}, expected {dst.shape}")
            dst[...] = t.detach().to(device="cpu", dtype=torch.float32).numpy()
    return flat


def to_flat(model: GPT) -> np.ndarray:
    """The parameters as one float32 array in llm.c's order and layout."""
    return _flatten(model, "data")


def grads_to_flat(model: GPT) -> np.ndarray:
    """The gradients in llm.c's flat layout (zeros where a parameter has none)."""
    return _flatten(model, "grad")


def from_flat(config: GPT2Config, flat_params, attention: str = DEFAULT_ATTENTION,
              device="cpu") -> GPT:
    """A GPT whose parameters are a copy of llm.c-layout flat_params."""
    flat = np.asarray(flat_params, dtype=np.float32)
    views = parameter_views(config, flat)  # checks the size
    with torch.device("meta"):  # skip PyTorch's own init: every parameter is overwritten
        model = GPT(config, attention)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, _ in config.parameter_shapes():
            sources = views[name] if "{l}" in PARAMETER_MAP[name] else [views[name]]
            for t, src in zip(_llmc_tensors(model, name), sources):
                t.copy_(torch.from_numpy(np.ascontiguousarray(src)))
    return model


def configure_optimizer(model: GPT, lr: float, weight_decay: float = 0.0,
                        betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with llm.c's groups: decay on matrices and embeddings
    (llmcu.cpu.gpt2.DECAYED), none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        llmc = next(n for n, key in PARAMETER_MAP.items()
                    if re.fullmatch(re.escape(key).replace(r"\{l\}", r"\d+"), pname))
        (decay if llmc in DECAYED else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False, fused=False)


# -- Hugging Face checkpoints -------------------------------------------------

def from_hf_checkpoint(path, attention: str = DEFAULT_ATTENTION, device="cpu") -> GPT:
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors
    or pytorch_model.bin); needs neither transformers nor safetensors."""
    config = hf_config(path)
    flat = hf_to_flat(config, load_hf_state_dict(path))
    return from_flat(config, flat, attention=attention, device=device)
