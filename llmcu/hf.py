"""Hugging Face GPT-2 interop: import a checkpoint into llm.c's layout, export one back.
(Llama and Gemma: the section at the end; import_hf and export_hf dispatch to it.)

    config, params = import_hf("path/to/gpt2")     # or a hub name: "gpt2", "openai-community/gpt2"
    export_hf("out/gpt2-hf", config, params)         # GPT2LMHeadModel.from_pretrained("out/gpt2-hf")

A Hugging Face GPT-2 directory holds config.json and model.safetensors (or a
sharded model.safetensors.index.json, or the older pytorch_model.bin). The
weights carry HF's names, with the four Conv1D weights stored (in, out) where
llm.c stores (out, in); the LM head is tied to wte. This module is NumPy-only at
import: safetensors files are read and written by the small built-in code below
(an 8-byte little-endian header length, a JSON header with dtype, shape and
byte offsets per tensor, then the raw little-endian data), torch is imported
only to read pytorch_model.bin, and huggingface_hub only to download by name.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from .config import PARAMETER_NAMES, GPT2Config, parameter_views
from .formats import atomic_write

# llm.c tensor -> Hugging Face GPT-2 parameter name.
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
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# safetensors dtype <-> NumPy dtype of the stored bytes (bfloat16 is read as its uint16 bits)
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
                       "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                       "U8": "u1", "BOOL": "?"}
_NUMPY_TO_SAFETENSORS = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                         np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
                         np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                         np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
                         np.dtype(np.bool_): "BOOL"}

# A hub repository id: "gpt2" or "owner/name".
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ----------------------------------------------------------------------------
# safetensors, NumPy only

def read_safetensors(path) -> dict[str, np.ndarray]:
    """A .safetensors file as {name: array}; BF16 tensors widen to float32 exactly."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise ValueError(f"{path}: safetensors header of {header_len} bytes runs past the "
                         f"end of the file ({len(data)} bytes)")
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
        count = (end - begin) // np.dtype(dtype).itemsize
        if base + end > len(data) or count != int(np.prod(info["shape"], dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name} (shape {info['shape']}, bytes "
                             f"{begin}..{end}) does not fit the file")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin)
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.reshape(info["shape"])
    return out


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: array} as a .safetensors file (atomically: temp name, then rename)."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, a in tensors.items():
        a = np.asarray(a)
        st = _NUMPY_TO_SAFETENSORS.get(a.dtype)
        if st is None:
            raise ValueError(f"write_safetensors: tensor {name} has unsupported dtype {a.dtype}")
        raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": st, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the package writes it
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


# ----------------------------------------------------------------------------
# reading a checkpoint directory

def _listing(path: Path) -> str:
    if not path.is_dir():
        return "the directory does not exist"
    found = sorted(p.name for p in path.iterdir())
    return f"found {', '.join(found) or 'an empty directory'}"


def _to_numpy(t) -> np.ndarray:
    """An array from a NumPy array or a torch tensor (bfloat16 widened to float32)."""
    if hasattr(t, "detach"):  # torch, without importing it
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def load_hf_state_dict(path) -> dict[str, np.ndarray]:
    """The raw state dict of a Hugging Face checkpoint directory, as NumPy arrays."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: {"weight_map": {tensor name: shard file}}
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_safetensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"{path / 'pytorch_model.bin'} is a PyTorch pickle and reading it needs torch "
                f"(pip install torch), or convert it to model.safetensors") from None
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: _to_numpy(v) for k, v in state.items()}
    raise FileNotFoundError(
        f"Hugging Face checkpoint: no weights in {path}: expected one of "
        f"{', '.join(HF_WEIGHT_FILES)}; {_listing(path)}")


def hf_config(path) -> GPT2Config:
    """GPT2Config from a Hugging Face GPT-2 config.json (n_layer, n_head, n_embd,
    n_positions, vocab_size); rejects variants llm.c's GPT-2 cannot express."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"Hugging Face checkpoint: no config.json in {path} (a Hugging Face GPT-2 directory "
            f"holds config.json and model.safetensors or pytorch_model.bin); {_listing(path)}")
    hf = json.loads(cfg_path.read_text())
    missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face checkpoint: {cfg_path} lacks {', '.join(missing)}")
    n_embd = hf["n_embd"]
    unsupported = []
    if hf.get("model_type", "gpt2") != "gpt2":
        unsupported.append(f"model_type={hf['model_type']!r} (need 'gpt2')")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={hf['n_inner']} (llm.c uses 4*n_embd={4 * n_embd})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        unsupported.append(f"activation_function={hf['activation_function']!r} (need the tanh GELU)")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (llm.c uses 1e-5)")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        unsupported.append("non-standard attention scaling")
    if hf.get("reorder_and_upcast_attn", False):
        unsupported.append("reorder_and_upcast_attn")
    if not hf.get("tie_word_embeddings", True):
        unsupported.append("untied word embeddings")
    if unsupported:
        raise ValueError(f"Hugging Face checkpoint: {cfg_path} describes a GPT-2 variant llm.c "
                         f"does not support: {'; '.join(unsupported)}")
    return GPT2Config(max_seq_len=hf.get("n_positions", hf.get("n_ctx", 1024)),
                      vocab_size=hf["vocab_size"], num_layers=hf["n_layer"],
                      num_heads=hf["n_head"], channels=n_embd)


def hf_to_flat(config: GPT2Config, state: dict) -> np.ndarray:
    """llm.c's flat float32 parameters from a Hugging Face GPT-2 state dict
    (NumPy arrays or torch tensors; keys with or without the 'transformer.' prefix)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    flat = np.zeros(config.num_parameters(), dtype=np.float32)
    views = parameter_views(config, flat)
    used = set()
    for name, _ in config.parameter_shapes():
        key = PARAMETER_MAP[name].removeprefix("transformer.")
        per_layer = "{l}" in key
        for l in range(config.num_layers if per_layer else 1):
            k = key.format(l=l)
            if k not in state:
                raise KeyError(f"Hugging Face checkpoint: the checkpoint lacks {k!r} (llm.c {name})")
            t = _to_numpy(state[k]).astype(np.float32, copy=False)
            if name in HF_CONV1D:
                t = t.T
            dst = views[name][l] if per_layer else views[name]
            if name == "wte":  # Vp >= V rows: the padding stays zero
                dst = dst[:config.vocab_size]
            if tuple(t.shape) != dst.shape:
                raise ValueError(f"Hugging Face checkpoint: {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {dst.shape}" + (" transposed" if name in HF_CONV1D else ""))
            dst[...] = t
            used.add(k)
    head = state.get("lm_head.weight")
    if head is not None and not np.array_equal(_to_numpy(head).astype(np.float32),
                                               _to_numpy(state["wte.weight"]).astype(np.float32)):
        raise ValueError("Hugging Face checkpoint: lm_head.weight differs from wte.weight; "
                         "llm.c's GPT-2 ties the two")
    extra = sorted(k for k in state if k not in used and not HF_IGNORED.search(k))
    if extra:
        raise ValueError(f"Hugging Face checkpoint: unexpected tensors: {', '.join(extra[:10])}")
    return flat


def _download(name: str) -> Path:
    """A hub repository's config and weights via huggingface_hub (cached); clear errors otherwise."""
    hint = (f"download the checkpoint directory (config.json and model.safetensors, e.g. from "
            f"https://huggingface.co/{name}) on a machine with network access and pass its path")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and fetching it from the Hugging Face hub "
            f"needs huggingface_hub (pip install huggingface_hub); or {hint}") from None
    try:
        local = Path(snapshot_download(repo_id=name, allow_patterns=[
            "config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]))
        if not any((local / f).is_file() for f in HF_WEIGHT_FILES):  # an older repo: .bin only
            local = Path(snapshot_download(repo_id=name, allow_patterns=["config.json", "pytorch_model.bin"]))
    except Exception as e:  # offline, no such repository, gated, ...
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {e}); {hint}") from None
    return local


def resolve_hf(path_or_name) -> Path:
    """A local checkpoint directory: the path itself, or a hub name downloaded to the cache."""
    s = os.fspath(path_or_name)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"Hugging Face checkpoint: {p} is a file; pass the directory "
                                    f"holding config.json and model.safetensors")
        return p
    if _HUB_NAME.fullmatch(s) and not s.startswith((".", "~")):
        return _download(s)
    raise FileNotFoundError(f"Hugging Face checkpoint: {p}: the directory does not exist")


def import_hf(path_or_name) -> tuple[GPT2Config, np.ndarray]:
    """(config, flat float32 params in llm.c's layout) from a Hugging Face GPT-2
    checkpoint: a local directory or a hub name ("gpt2", "openai-community/gpt2").
    A Llama or Gemma checkpoint (config.json model_type) gives a LlamaConfig."""
    path = resolve_hf(path_or_name)
    cfg_path = path / "config.json"
    model_type = json.loads(cfg_path.read_text()).get("model_type") if cfg_path.is_file() else None
    if model_type in LLAMA_MODEL_TYPES:
        return import_hf_llama(path)
    if model_type not in (None, "gpt2"):
        raise ValueError(f"Hugging Face checkpoint: {cfg_path} has model_type={model_type!r}; "
                         f"llmcu imports gpt2, {', '.join(LLAMA_MODEL_TYPES)}")
    config = hf_config(path)
    return config, hf_to_flat(config, load_hf_state_dict(path))


# ----------------------------------------------------------------------------
# export

def hf_config_dict(config: GPT2Config) -> dict:
    """config.json for transformers' GPT2LMHeadModel (dropout off, the tanh GELU, tied head)."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size, "n_positions": config.max_seq_len,
        "n_ctx": config.max_seq_len, "n_embd": config.channels, "n_layer": config.num_layers,
        "n_head": config.num_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "use_cache": True,
        "tie_word_embeddings": True, "bos_token_id": config.vocab_size - 1,
        "eos_token_id": config.vocab_size - 1, "torch_dtype": "float32",
    }


def flat_to_hf(config: GPT2Config, flat) -> dict[str, np.ndarray]:
    """HF GPT-2 state dict (float32, 'transformer.' names, Conv1D (in, out), wte
    unpadded to V rows, no lm_head: transformers ties it to wte)."""
    flat = np.asarray(flat)
    if flat.dtype != np.float32:
        raise ValueError(f"flat_to_hf: params must be float32, found {flat.dtype}")
    views = parameter_views(config, flat)
    state = {}
    for name, _ in config.parameter_shapes():
        key = PARAMETER_MAP[name]
        per_layer = "{l}" in key
        for l in range(config.num_layers if per_layer else 1):
            t = views[name][l] if per_layer else views[name]
            if name == "wte":
                t = t[:config.vocab_size]
            if name in HF_CONV1D:
                t = t.T
            state[key.format(l=l)] = np.ascontiguousarray(t)
    return state


def export_hf(out_dir, config: GPT2Config, flat_params) -> Path:
    """Write config.json and model.safetensors into out_dir (created if needed) so
    that transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads the model
    (a LlamaConfig goes to export_hf_llama)."""
    if not isinstance(config, GPT2Config):
        return export_hf_llama(out_dir, config, flat_params)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export_hf: {out} exists and is not a directory")
    state = flat_to_hf(config, flat_params)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    with atomic_write(out / "config.json") as f:
        f.write((json.dumps(hf_config_dict(config), indent=2) + "\n").encode())
    return out


# ----------------------------------------------------------------------------
# Llama and Gemma (LlamaForCausalLM, GemmaForCausalLM)
#
# Hugging Face keeps q, k, v and gate, up as separate Linear weights (out, in);
# llmcu stacks them: qkvw = [q_proj; k_proj; v_proj], fcw = [gate_proj; up_proj].
# Hugging Face's q/k rows are already in the "rotate_half" order that llmcu's
# RoPE computes, so no permutation is needed (unlike Meta's original
# checkpoints, which pair adjacent elements and which HF's conversion script
# permutes). The tied LM head is wte; an untied one is lm_head.

LLAMA_MODEL_TYPES = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}
# A state-dict key that is neither a parameter nor a buffer to skip is an error.
_HF_LLAMA_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hf_llama_keys(config, l=None):
    """(llmcu name, HF key(s)) per tensor; per-layer keys for layer l."""
    if l is None:
        keys = [("wte", "model.embed_tokens.weight"), ("lnfw", "model.norm.weight")]
        if not config.tie_embeddings:
            keys.append(("lm_head", "lm_head.weight"))
        return keys
    pre = f"model.layers.{l}."
    return [("ln1w", pre + "input_layernorm.weight"),
            ("qkvw", (pre + "self_attn.q_proj.weight", pre + "self_attn.k_proj.weight",
                      pre + "self_attn.v_proj.weight")),
            ("attprojw", pre + "self_attn.o_proj.weight"),
            ("ln2w", pre + "post_attention_layernorm.weight"),
            ("fcw", (pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight")),
            ("fcprojw", pre + "mlp.down_proj.weight")]


def _llama_splits(config, name):
    """Row counts of the HF tensors stacked into one llmcu tensor."""
    hs = config.head_dim
    if name == "qkvw":
        return (config.num_heads * hs, config.num_kv_heads * hs, config.num_kv_heads * hs)
    return (config.hidden_dim, config.hidden_dim)  # fcw: gate, up


def hf_llama_config(hf: dict, where: str = "config.json"):
    """LlamaConfig from a Hugging Face Llama or Gemma config.json dict; rejects
    variants llmcu's Llama cannot express (biases, RoPE scaling, other activations)."""
    from .llama_config import LlamaConfig, gemma_options
    model_type = hf.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise ValueError(f"Hugging Face checkpoint: {where} has model_type={model_type!r}; "
                         f"expected one of {sorted(LLAMA_MODEL_TYPES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"Hugging Face checkpoint: {where} lacks {', '.join(missing)}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    gemma = model_type == "gemma"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    unsupported = []
    rope_scaling = None
    if rope_type == "llama3":  # Llama 3.1+: factor, low/high frequency factors, original context
        spec = {**scaling, **rope}
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        lacking = [k for k in keys if k not in spec]
        if lacking:
            unsupported.append(f"rope_type='llama3' without {', '.join(lacking)}")
        else:
            rope_scaling = tuple(spec[k] for k in keys)
    elif rope_type not in (None, "default"):
        unsupported.append(f"rope_type={rope_type!r} (only the default RoPE and Llama 3's 'llama3' "
                           f"scaling are implemented)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("attention or MLP biases")
    if hf.get("pretraining_tp", 1) not in (1, None):
        unsupported.append(f"pretraining_tp={hf['pretraining_tp']}")
    if gemma and act not in ("gelu_pytorch_tanh", "gelu_new"):
        unsupported.append(f"activation {act!r} (Gemma: need the tanh GELU, gelu_pytorch_tanh)")
    if not gemma and act != "silu":
        unsupported.append(f"hidden_act={act!r} (Llama: need silu)")
    if gemma and not hf.get("tie_word_embeddings", True):
        unsupported.append("untied embeddings in a Gemma")
    if hf.get("use_bidirectional_attention"):
        unsupported.append("bidirectional attention")
    if unsupported:
        raise ValueError(f"Hugging Face checkpoint: {where} describes a {model_type} variant llmcu "
                         f"does not support: {'; '.join(unsupported)}")
    C, NH = hf["hidden_size"], hf["num_attention_heads"]
    # absent keys take transformers' defaults (GemmaConfig: head_dim 256, 8192 positions)
    fields = dict(max_seq_len=hf.get("max_position_embeddings", 8192 if gemma else 2048),
                  vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], num_heads=NH,
                  num_kv_heads=hf.get("num_key_value_heads") or NH, channels=C,
                  hidden_dim=hf["intermediate_size"],
                  head_dim=hf.get("head_dim") or (256 if gemma else C // NH),
                  norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=rope_scaling)
    fields.update(_ffn_sizing(hf, C))
    if gemma:
        return LlamaConfig(**fields, **gemma_options(C))
    return LlamaConfig(**fields, tie_embeddings=hf.get("tie_word_embeddings", False))


def _ffn_sizing(hf: dict, channels: int) -> dict:
    """multiple_of and ffn_dim_multiplier (the names of Meta's params.json) from a
    config.json that carries them, as export_hf writes them: llm.c's Llama header
    stores these two, not the hidden size, so a round trip needs them. Kept only
    when they give intermediate_size; otherwise intermediate_size alone rules."""
    from .llama_config import llama_hidden_dim
    multiple_of, multiplier = hf.get("multiple_of"), hf.get("ffn_dim_multiplier")
    if not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of <= 0:
        return {}
    if multiplier is not None and not (isinstance(multiplier, (int, float)) and multiplier > 0):
        return {}
    if llama_hidden_dim(channels, multiple_of, multiplier) != hf["intermediate_size"]:
        return {}
    return dict(multiple_of=multiple_of,
                ffn_dim_multiplier=None if multiplier is None else float(multiplier))


def hf_llama_to_flat(config, state: dict) -> np.ndarray:
    """llmcu's flat float32 Llama parameters from a Hugging Face Llama/Gemma state
    dict (NumPy arrays or torch tensors)."""
    flat = np.zeros(config.num_parameters(), dtype=np.float32)
    views = parameter_views(config, flat)
    used = set()

    def take(key, shape):
        if key not in state:
            raise KeyError(f"Hugging Face checkpoint: the checkpoint lacks {key!r}")
        t = _to_numpy(state[key]).astype(np.float32, copy=False)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"Hugging Face checkpoint: {key} has shape {tuple(t.shape)}, "
                             f"expected {tuple(shape)}")
        used.add(key)
        return t

    for name, key in _hf_llama_keys(config):
        dst = views[name][:config.vocab_size] if name in ("wte", "lm_head") else views[name]
        dst[...] = take(key, dst.shape)
    for l in range(config.num_layers):
        for name, key in _hf_llama_keys(config, l):
            dst = views[name][l]
            if isinstance(key, tuple):
                row = 0
                for k, rows in zip(key, _llama_splits(config, name)):
                    dst[row:row + rows] = take(k, (rows, dst.shape[1]))
                    row += rows
            else:
                dst[...] = take(key, dst.shape)
    head = state.get("lm_head.weight")
    if config.tie_embeddings and head is not None:
        if not np.array_equal(_to_numpy(head).astype(np.float32), views["wte"][:config.vocab_size]):
            raise ValueError("Hugging Face checkpoint: lm_head.weight differs from "
                             "model.embed_tokens.weight, but the config ties them")
        used.add("lm_head.weight")
    extra = sorted(k for k in state if k not in used and not _HF_LLAMA_IGNORED.search(k))
    if extra:
        raise ValueError(f"Hugging Face checkpoint: unexpected tensors: {', '.join(extra[:10])}")
    return flat


def import_hf_llama(path_or_name):
    """(LlamaConfig, flat float32 params) from a Hugging Face Llama or Gemma
    checkpoint directory (config.json + model.safetensors, or a sharded index)."""
    path = resolve_hf(path_or_name)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"Hugging Face checkpoint: no config.json in {path}; {_listing(path)}")
    config = hf_llama_config(json.loads(cfg_path.read_text()), str(cfg_path))
    return config, hf_llama_to_flat(config, load_hf_state_dict(path))


def hf_llama_config_dict(config) -> dict:
    """config.json for transformers' LlamaForCausalLM or GemmaForCausalLM."""
    from .llama_config import gemma_options, llama_hidden_dim
    gemma = gemma_options(config.channels)
    is_gemma = (config.mlp, config.norm_weight_offset) == (gemma["mlp"], gemma["norm_weight_offset"])
    is_llama = (config.mlp, config.norm_weight_offset, config.embed_scale) == ("swiglu", 0.0, 1.0)
    if is_gemma and (np.float32(config.embed_scale) != np.float32(gemma["embed_scale"])
                     or not config.tie_embeddings):
        is_gemma = False
    if not (is_gemma or is_llama):
        raise ValueError(f"export_hf: {config} is neither a Llama (swiglu, no norm offset, no "
                         f"embedding scale) nor a Gemma (geglu, norm offset 1, embeddings scaled by "
                         f"sqrt(C), tied); transformers has no model for it")
    model_type = "gemma" if is_gemma else "llama"
    d = {"model_type": model_type, "architectures": [LLAMA_MODEL_TYPES[model_type]],
         "vocab_size": config.vocab_size, "hidden_size": config.channels,
         "intermediate_size": config.hidden_dim, "num_hidden_layers": config.num_layers,
         "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
         "head_dim": config.head_dim, "max_position_embeddings": config.max_seq_len,
         "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
         "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
         "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
         "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
         "torch_dtype": "float32"}
    if config.hidden_dim == llama_hidden_dim(config.channels, config.multiple_of,
                                             config.ffn_dim_multiplier):
        # extra keys for transformers (kept as attributes); import_hf reads them back
        d["multiple_of"] = config.multiple_of
        if config.ffn_dim_multiplier is not None:  # float32 in the config, shortest decimal here
            d["ffn_dim_multiplier"] = float(str(np.float32(config.ffn_dim_multiplier)))
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        d["rope_parameters"] = d["rope_scaling"] = {
            "rope_type": "llama3", "rope_theta": config.rope_theta, "factor": factor,
            "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}
    if is_gemma:
        d["hidden_act"] = d["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        d.update(hidden_act="silu", mlp_bias=False, pretraining_tp=1)
    return d


def flat_to_hf_llama(config, flat) -> dict[str, np.ndarray]:
    """HF Llama/Gemma state dict (float32, V rows, no lm_head when tied)."""
    flat = np.asarray(flat)
    if flat.dtype != np.float32:
        raise ValueError(f"flat_to_hf_llama: params must be float32, found {flat.dtype}")
    views = parameter_views(config, flat)
    state = {}
    for name, key in _hf_llama_keys(config):
        t = views[name][:config.vocab_size] if name in ("wte", "lm_head") else views[name]
        state[key] = np.ascontiguousarray(t)
    for l in range(config.num_layers):
        for name, key in _hf_llama_keys(config, l):
            t = views[name][l]
            if isinstance(key, tuple):
                row = 0
                for k, rows in zip(key, _llama_splits(config, name)):
                    state[k] = np.ascontiguousarray(t[row:row + rows])
                    row += rows
            else:
                state[key] = np.ascontiguousarray(t)
    return state


def export_hf_llama(out_dir, config, flat_params) -> Path:
    """Write config.json and model.safetensors so that transformers'
    AutoModelForCausalLM (LlamaForCausalLM / GemmaForCausalLM).from_pretrained(out_dir) loads it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export_hf: {out} exists and is not a directory")
    config_json = hf_llama_config_dict(config)
    state = flat_to_hf_llama(config, flat_params)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", state, metadata={"format": "pt"})
    with atomic_write(out / "config.json") as f:
        f.write((json.dumps(config_json, indent=2) + "\n").encode())
    return out
