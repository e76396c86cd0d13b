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

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PARAMETER_NAMES, GPT2Config, parameter_views
from .cpu.gpt2 import DECAYED

# llm.c tensor -> parameter name in this model (and in Hugging Face's GPT-2).
# "{l}" marks a per-layer tensor: llm.c stacks those over a leading L axis.
PARAMETER_MAP = {
    "wte": "transformer.wte.weight",
    "wpe": "transformer.wpe.weight",
    "ln1w": "transformer.h.{l}.ln_1.weight",
    "ln1b": "transformer.h.{l}.ln_1.bias",
    "qkvw": "transformer.h.{l}.attn.c_attn.weight",
    "qkvb": "transformer.h.{l}.attn.c_attn.bias",
    "attprojw": "transformer.h.{l}.attn.c_proj.weight",
    "attprojb": "transformer.h.{l}.attn.c_proj.bias",
    "ln2w": "transformer.h.{l}.ln_2.weight",
    "ln2b": "transformer.h.{l}.ln_2.bias",
    "fcw": "transformer.h.{l}.mlp.c_fc.weight",
    "fcb": "transformer.h.{l}.mlp.c_fc.bias",
    "fcprojw": "transformer.h.{l}.mlp.c_proj.weight",
    "fcprojb": "transformer.h.{l}.mlp.c_proj.bias",
    "lnfw": "transformer.ln_f.weight",
    "lnfb": "transformer.ln_f.bias",
}
assert tuple(PARAMETER_MAP) == PARAMETER_NAMES

# Hugging Face stores these as Conv1D weights, (in, out); llm.c and nn.Linear use (out, in).
HF_CONV1D = frozenset({"qkvw", "attprojw", "fcw", "fcprojw"})
# Buffers (the causal mask) and the tied head in HF checkpoints: not parameters here.
HF_IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$|^lm_head\.weight$")

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

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# safetensors dtype -> (numpy dtype of the stored bytes)
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
                       "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors(path: Path) -> dict:
    """A .safetensors file as {name: float32-or-original torch tensor}.

    Uses the safetensors package when installed; otherwise reads the format
    directly (an 8-byte little-endian header length, a JSON header with dtype,
    shape and byte offsets per tensor, then the raw little-endian data).
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        pass
    else:
        return load_file(str(path), device="cpu")
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                            offset=base + begin)
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = torch.from_numpy(arr.reshape(info["shape"]).copy())
    return out


def load_hf_state_dict(path) -> dict:
    """The raw state dict of a Hugging Face checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(_read_safetensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
    raise FileNotFoundError(
        f"from_hf_checkpoint: no weights in {path}: expected one of {', '.join(HF_WEIGHT_FILES)}; "
        + (f"found {', '.join(found) or 'an empty directory'}" if found is not None
           else "the directory does not exist"))


def hf_config(path) -> GPT2Config:
    """GPT2Config from a Hugging Face GPT-2 config.json (n_layer, n_head, n_embd,
    n_positions, vocab_size); rejects variants llm.c's GPT-2 cannot express."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
        raise FileNotFoundError(
            f"from_hf_checkpoint: no config.json in {path} (a Hugging Face GPT-2 directory "
            f"holds config.json and model.safetensors or pytorch_model.bin); "
            + (f"found {', '.join(found) or 'an empty directory'}" if found is not None
               else "the directory does not exist"))
    hf = json.loads(cfg_path.read_text())
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"from_hf_checkpoint: {cfg_path} lacks {', '.join(missing)}")
    n_embd = hf["n_embd"]
    unsupported = []
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={hf['n_inner']} (llm.c uses 4*n_embd={4 * n_embd})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r} (need the tanh GELU)")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (llm.c uses 1e-5)")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        unsupported.append("non-standard attention scaling")
    if not hf.get("tie_word_embeddings", True):
        unsupported.append("untied word embeddings")
    if unsupported:
        raise ValueError(f"from_hf_checkpoint: {cfg_path} describes a GPT-2 variant llm.c does "
                         f"not support: {'; '.join(unsupported)}")
    return GPT2Config(max_seq_len=hf.get("n_positions", hf.get("n_ctx", 1024)),
                      vocab_size=hf["vocab_size"], num_layers=hf["n_layer"],
                      num_heads=hf["n_head"], channels=n_embd)


def hf_to_flat(config: GPT2Config, state: dict) -> np.ndarray:
    """llm.c's flat float32 parameters from a Hugging Face GPT-2 state dict."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    flat = np.zeros(config.num_parameters(), dtype=np.float32)
    views = parameter_views(config, flat)
    used = set()
    for name, shape in config.parameter_shapes():
        key = PARAMETER_MAP[name].removeprefix("transformer.")
        per_layer = "{l}" in key
        for l in range(config.num_layers if per_layer else 1):
            k = key.format(l=l)
            if k not in state:
                raise KeyError(f"from_hf_checkpoint: the checkpoint lacks {k!r} (llm.c {name})")
            t = state[k].detach().to(torch.float32)
            if name in HF_CONV1D:
                t = t.t()
            dst = views[name][l] if per_layer else views[name]
            if name == "wte":  # Vp >= V rows: the padding stays zero
                dst = dst[:config.vocab_size]
            if tuple(t.shape) != dst.shape:
                raise ValueError(f"from_hf_checkpoint: {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {dst.shape}" + (" transposed" if name in HF_CONV1D else ""))
            dst[...] = t.contiguous().numpy()
            used.add(k)
    head = state.get("lm_head.weight")
    if head is not None and not torch.equal(head.to(torch.float32), state["wte.weight"].to(torch.float32)):
        raise ValueError("from_hf_checkpoint: lm_head.weight differs from wte.weight; "
                         "llm.c's GPT-2 ties the two")
    extra = sorted(k for k in state if k not in used and not HF_IGNORED.search(k))
    if extra:
        raise ValueError(f"from_hf_checkpoint: unexpected tensors in the checkpoint: {', '.join(extra[:10])}")
    return flat


def from_hf_checkpoint(path, attention: str = DEFAULT_ATTENTION, device="cpu") -> GPT:
    """A GPT from a Hugging Face GPT-2 directory (config.json + model.safetensors
    or pytorch_model.bin); needs neither transformers nor safetensors."""
    config = hf_config(path)
    flat = hf_to_flat(config, load_hf_state_dict(path))
    return from_flat(config, flat, attention=attention, device=device)
