"""Llama-family model configurations (Llama 2/3, and Gemma as options of the same
model) and the numbers derived from them.

One formula, one place: the padded vocabulary, the MLP hidden size, the head
size, the parameter tensors (names, shapes, order), the parameter count and the
flops per token are computed here and nowhere else. parameter_views and
parameter_slices from llmcu.config work on a LlamaConfig as they do on a
GPT2Config (they only call parameter_shapes and num_parameters).

Letters as llm.c: V vocab, Vp padded vocab, C channels (dim), L layers, NH query
heads, NKV key/value heads (NKV < NH: grouped-query attention, NKV = 1:
multi-query), hs head size (C/NH unless given, Gemma 2B: 256), H the MLP hidden
size.

Parameter layout: one flat float32 buffer, in this order, no biases:
    wte (Vp,C); ln1w (L,C); qkvw (L,(NH+2*NKV)*hs,C) [q heads, k heads, v heads];
    attprojw (L,C,NH*hs); ln2w (L,C); fcw (L,2H,C) [gate rows, then up rows];
    fcprojw (L,C,H); lnfw (C,); lm_head (Vp,C) only with untied embeddings.
q and k rows are in Hugging Face's "rotate_half" order (element i of a head
pairs with element i + hs/2), which is what llmcu's RoPE computes.

Gemma is the same model with: GeGLU (tanh GELU) instead of SwiGLU
(mlp="geglu"), RMSNorm scaling by (1 + weight) (norm_weight_offset=1.0, its
stored weights are the offset from one), embeddings multiplied by sqrt(C)
(embed_scale), tied embeddings, multi-query attention and head size 256.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .config import GPT2_VOCAB_SIZE, padded_vocab_size

LLAMA_PARAMETER_NAMES = ("wte", "ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw", "lnfw", "lm_head")
MLP_KINDS = ("swiglu", "geglu")


def _f32(x: float) -> float:
    """x rounded to float32, as the model file stores it (so a config survives a round trip)."""
    return float(np.float32(x))


def llama_hidden_dim(channels: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's MLP hidden size: 2/3 of 4C, times ffn_dim_multiplier, rounded up to multiple_of.

    Llama 2 7B: C=4096, multiple_of=256 -> 11008; Llama 3.2 1B: C=2048,
    x1.5, multiple_of=256 -> 8192 (Meta's reference model.py, llm.c's train_llama3.py)."""
    hidden = int(2 * (4 * channels) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class LlamaConfig:
    max_seq_len: int = 1024          # maxT (RoPE tables are this long)
    vocab_size: int = GPT2_VOCAB_SIZE  # V
    num_layers: int = 6              # L
    num_heads: int = 6               # NH
    num_kv_heads: int = 2            # NKV
    channels: int = 384              # C
    hidden_dim: int = 0              # H; 0: derived from multiple_of and ffn_dim_multiplier
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    head_dim: int = 0                # hs; 0: C / NH
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3's RoPE frequency scaling (rope_type "llama3"): (factor, low_freq_factor,
    # high_freq_factor, original_max_seq_len), or None for plain RoPE
    rope_scaling: tuple | None = None
    tie_embeddings: bool = True
    mlp: str = "swiglu"              # "swiglu" (Llama) | "geglu" (Gemma)
    norm_weight_offset: float = 0.0  # 1.0 for Gemma: RMSNorm scales by (1 + weight)
    embed_scale: float = 1.0         # sqrt(C) for Gemma
    padded_vocab_size: int = field(default=0)  # Vp; 0 means "derive from V"

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "num_layers", "num_heads", "num_kv_heads",
                     "channels", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig: {name} must be a positive int, got {value!r}")
        for name in ("hidden_dim", "head_dim", "padded_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LlamaConfig: {name} must be an int >= 0 (0: derived), got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"LlamaConfig: mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.head_dim == 0:
            if self.channels % self.num_heads != 0:
                raise ValueError(f"LlamaConfig: channels ({self.channels}) must be divisible by "
                                 f"num_heads ({self.num_heads}), or give head_dim")
            object.__setattr__(self, "head_dim", self.channels // self.num_heads)
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("norm_eps", "rope_theta", "embed_scale", "norm_weight_offset"):
            object.__setattr__(self, name, _f32(getattr(self, name)))
        if self.ffn_dim_multiplier is not None:
            object.__setattr__(self, "ffn_dim_multiplier", _f32(self.ffn_dim_multiplier))
        if not (self.norm_eps > 0 and self.rope_theta > 0 and self.embed_scale > 0):
            raise ValueError(f"LlamaConfig: norm_eps, rope_theta and embed_scale must be > 0, got "
                             f"{self.norm_eps}, {self.rope_theta}, {self.embed_scale}")
        if self.rope_scaling is not None:
            rs = tuple(self.rope_scaling)
            if len(rs) != 4 or not (rs[0] > 0 and 0 < rs[1] < rs[2] and rs[3] > 0):
                raise ValueError(f"LlamaConfig: rope_scaling must be (factor > 0, 0 < low_freq_factor "
                                 f"< high_freq_factor, original_max_seq_len > 0), got {self.rope_scaling!r}")
            object.__setattr__(self, "rope_scaling", (_f32(rs[0]), _f32(rs[1]), _f32(rs[2]), int(rs[3])))
        object.__setattr__(self, "tie_embeddings", bool(self.tie_embeddings))
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", llama_hidden_dim(
                self.channels, self.multiple_of, self.ffn_dim_multiplier))
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", padded_vocab_size(self.vocab_size))
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"LlamaConfig: padded_vocab_size ({self.padded_vocab_size}) is smaller "
                             f"than vocab_size ({self.vocab_size})")

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def qkv_channels(self) -> int:
        """(NH + 2*NKV) * hs: the width of the fused qkv activation."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def attn_channels(self) -> int:
        """NH * hs: the width of the attention output (C unless head_dim is given)."""
        return self.num_heads * self.head_dim

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the parameter tensors in llmcu's Llama order (module docstring)."""
        Vp, C, L, H = self.padded_vocab_size, self.channels, self.num_layers, self.hidden_dim
        shapes = [("wte", (Vp, C)), ("ln1w", (L, C)), ("qkvw", (L, self.qkv_channels, C)),
                  ("attprojw", (L, C, self.attn_channels)), ("ln2w", (L, C)),
                  ("fcw", (L, 2 * H, C)), ("fcprojw", (L, C, H)), ("lnfw", (C,))]
        if not self.tie_embeddings:
            shapes.append(("lm_head", (Vp, C)))
        return shapes

    def num_parameters(self) -> int:
        """Number of stored parameters (padded vocabulary rows included, as llm.c counts)."""
        return sum(math.prod(shape) for _, shape in self.parameter_shapes())

    def flops_per_token(self, T: int | None = None) -> int:
        """Training flops per token: 6 per weight of a matmul (2 forward, 4 backward)
        plus llm.c's 6*L*(NH*hs)*T for the causal attention scores and mix.

        The matmul weights are all parameters except an untied wte (a lookup,
        no flops); the norm weights are counted too (a rounding error)."""
        T = self.max_seq_len if T is None else T
        matmul = self.num_parameters()
        if not self.tie_embeddings:
            matmul -= self.padded_vocab_size * self.channels
        return 6 * matmul + 6 * self.num_layers * self.attn_channels * T


# Small presets that train here from scratch, named like llm.c's GPT-2 depths:
# llama-dN has GPT-2 dN's depth, width and query heads, NKV key/value heads,
# and an MLP of H = llama_hidden_dim(C, 256, 1.25) (1280 at C=384), which
# brings llama-d6 (30.5M parameters, tied embeddings) within 1% of GPT-2 d6
# (30.4M): the two train side by side in docs/llama_vs_gpt2.png.
# gemma-dN is the same shape with Gemma's options and multi-query attention.
_DEPTHS = {6: (6, 2, 384), 12: (12, 4, 768), 24: (16, 4, 1024), 36: (20, 4, 1280), 48: (25, 5, 1600)}
_SMALL_FFN = dict(multiple_of=256, ffn_dim_multiplier=1.25)

# Reference shapes (Hugging Face config.json of each model; their vocabularies,
# not GPT-2's). Parameter counts: tests/test_llama.py checks num_parameters
# against transformers models built on the meta device.
REFERENCE = {
    # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters
    "llama2-7b": dict(max_seq_len=4096, vocab_size=32000, num_layers=32, num_heads=32,
                      num_kv_heads=32, channels=4096, multiple_of=256, norm_eps=1e-5,
                      rope_theta=10000.0, tie_embeddings=False),
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters, RoPE scaled as rope_type "llama3"
    "llama3.2-1b": dict(max_seq_len=131072, vocab_size=128256, num_layers=16, num_heads=32,
                        num_kv_heads=8, channels=2048, multiple_of=256, ffn_dim_multiplier=1.5,
                        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
                        tie_embeddings=True),
    # google/gemma-2b: 2,506,172,416 parameters
    "gemma-2b": dict(max_seq_len=8192, vocab_size=256000, num_layers=18, num_heads=8,
                     num_kv_heads=1, channels=2048, hidden_dim=16384, head_dim=256, norm_eps=1e-6,
                     rope_theta=10000.0, tie_embeddings=True, mlp="geglu", norm_weight_offset=1.0,
                     embed_scale=math.sqrt(2048)),
}


def gemma_options(channels: int) -> dict:
    """The LlamaConfig fields that make a Gemma (besides shape, MQA and head_dim)."""
    return dict(mlp="geglu", norm_weight_offset=1.0, embed_scale=math.sqrt(channels),
                tie_embeddings=True)


def is_llama_spec(spec: str) -> bool:
    """Whether a model descriptor names a Llama-family preset ('llama', 'llama-d6', 'gemma-2b', ...)."""
    return spec.strip().lower().startswith(("llama", "gemma"))


def llama_descriptors() -> list[str]:
    """Every Llama/Gemma descriptor llama_config takes."""
    return (["llama"] + [f"{k}-d{d}" for k in ("llama", "gemma") for d in _DEPTHS]
            + sorted(REFERENCE))


def llama_config(descriptor: str, max_seq_len: int = 1024,
                 vocab_size: int = GPT2_VOCAB_SIZE) -> LlamaConfig:
    """A config from a descriptor: 'llama' (= llama-d6), 'llama-dN', 'gemma-dN'
    (N in 6, 12, 24, 36, 48; the GPT-2 tokenizer's vocabulary and max_seq_len
    given here), or a reference shape 'llama2-7b', 'llama3.2-1b', 'gemma-2b'
    (its own vocabulary and context length)."""
    key = descriptor.strip().lower()
    if key in REFERENCE:
        return LlamaConfig(**REFERENCE[key])
    if key == "llama":
        key = "llama-d6"
    match = re.fullmatch(r"(llama|gemma)-d(\d+)", key)
    depth = int(match.group(2)) if match else None
    if depth not in _DEPTHS:
        raise ValueError(f"unknown Llama model descriptor {descriptor!r}; expected one of: "
                         f"{', '.join(llama_descriptors())}")
    num_heads, num_kv_heads, channels = _DEPTHS[depth]
    common = dict(max_seq_len=max_seq_len, vocab_size=vocab_size, num_layers=depth,
                  num_heads=num_heads, channels=channels, **_SMALL_FFN)
    if match.group(1) == "gemma":
        return LlamaConfig(num_kv_heads=1, **common, **gemma_options(channels))
    return LlamaConfig(num_kv_heads=num_kv_heads, tie_embeddings=True, **common)


def model_config(spec: str, max_seq_len: int = 1024, vocab_size: int = GPT2_VOCAB_SIZE):
    """GPT2Config or LlamaConfig from a descriptor (not a file): the one place that
    tells the two families apart by name. vocab_size: the tokenizer's (reference
    shapes keep their own)."""
    from .config import gpt2_config, gpt2_descriptors
    try:
        if is_llama_spec(spec):
            return llama_config(spec, max_seq_len=max_seq_len, vocab_size=vocab_size)
        return gpt2_config(spec, max_seq_len=max_seq_len, vocab_size=vocab_size)
    except ValueError as e:
        if not str(e).startswith("unknown "):
            raise
    raise ValueError(
        f"unknown model descriptor {spec!r}; expected a GPT-2 one ({', '.join(gpt2_descriptors())}), "
        f"a Llama/Gemma one ({', '.join(llama_descriptors())}), an llm.c model file (.bin) or "
        f"hf:DIR_OR_NAME for a Hugging Face checkpoint")


def print_llama_summary(config: LlamaConfig, log=print) -> None:
    """The model block of the training log (llm.c style), for a Llama-family model."""
    gemma = config.mlp == "geglu" and config.norm_weight_offset == 1.0
    log("[Gemma]" if gemma else "[Llama]")
    for name in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers", "num_heads",
                 "num_kv_heads", "channels", "head_dim", "hidden_dim", "mlp", "norm_eps",
                 "rope_theta", "rope_scaling", "tie_embeddings", "norm_weight_offset", "embed_scale"):
        log(f"{name}: {getattr(config, name)}")
    log(f"num_parameters: {config.num_parameters()}")
