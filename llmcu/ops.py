"""The layer functions a model's step calls, by name, for both backends.

Each op is a function of the same name and signature in llmcu/cpu/<layer>.py (NumPy,
the oracle) and llmcu/cuda/<layer>.py (the kernels); LAYER says which layer module
holds it. A model's layer sequence (llmcu/cpu/gpt2.py, llmcu/cpu/llama.py) calls every
op of its list unconditionally, so ops_table("cpu", GPT2_OPS) and ops_table("cuda",
GPT2_OPS) run the same sequence of calls.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

LAYER = {  # op -> the layer module that defines it on both backends
    "encoder_forward": "encoder", "encoder_backward": "encoder",
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "residual_layernorm_forward": "layernorm", "layernorm_backward_add": "layernorm",
    "rmsnorm_forward": "rmsnorm", "rmsnorm_backward": "rmsnorm",
    "matmul_forward": "matmul", "matmul_backward": "matmul",
    "matmul_gelu_forward": "matmul", "matmul_dgelu_backward": "matmul",
    "attention_forward": "attention", "attention_backward": "attention",
    "flash_attention_forward": "attention", "flash_attention_backward": "attention",
    "rope_forward": "rope", "rope_backward": "rope",
    "swiglu_forward": "swiglu", "swiglu_backward": "swiglu",
    "geglu_forward": "swiglu", "geglu_backward": "swiglu",
    "residual_forward": "residual",
    "adamw_update": "adamw", "global_norm": "adamw",
}

# GPT-2's step: the residual adds fused into the layernorms, the GELU into the fc GEMMs.
GPT2_OPS = ("encoder_forward", "encoder_backward", "layernorm_forward", "layernorm_backward",
            "residual_layernorm_forward", "layernorm_backward_add", "matmul_forward", "matmul_backward",
            "matmul_gelu_forward", "matmul_dgelu_backward", "flash_attention_forward",
            "flash_attention_backward", "adamw_update", "global_norm")
# The NumPy GPT-2 (the oracle) keeps the attention probabilities, (B,NH,T,T), and runs the
# plain attention; the kernel model runs the fused one, keeping (B,NH,T) log-sum-exps.
ORACLE_ATTENTION_OPS = ("attention_forward", "attention_backward")
LLAMA_OPS = ("encoder_forward", "encoder_backward", "rmsnorm_forward", "rmsnorm_backward",
             "matmul_forward", "matmul_backward", "rope_forward", "rope_backward",
             "flash_attention_forward", "flash_attention_backward", "swiglu_forward", "swiglu_backward",
             "geglu_forward", "geglu_backward", "residual_forward", "adamw_update", "global_norm")


def ops_table(backend: str, names) -> SimpleNamespace:
    """The functions `names` of llmcu/<backend>/<layer>.py ("cpu" or "cuda"), as attributes."""
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"ops_table: backend must be 'cpu' or 'cuda', got {backend!r}")
    return SimpleNamespace(**{name: getattr(importlib.import_module(f"llmcu.{backend}.{LAYER[name]}"), name)
                              for name in names})
