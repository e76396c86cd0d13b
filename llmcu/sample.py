"""Autoregressive sampling from a GPT-2 or a Llama/Gemma, with and without a KV cache.

llm.c recomputes the whole sequence for every new token. Here the default is
incremental decoding: a prefill runs the prompt through the model once and
stores every layer's keys and values (KVCache); each later step feeds only the
newest token, appends its k and v, and lets its query attend over the cached
keys (the past only, so causality needs no mask). Only the last position's
logits are computed. The uncached path (use_cache=False) recomputes the full
prefix for every token on the model's own forward; both give the same logits
(to float32 rounding; tests/test_sample.py checks 1e-5).

Llama and Gemma (LlamaConfig) take forward_cached_llama, the same scheme on
llmcu/cpu/llama.py's layers: each new token's query and key are rotated at its
absolute position (rows pos.. of the model's RoPE tables), and the cache holds
the NKV key/value heads only; the NH query heads attend over them in groups of
NH/NKV (grouped-query attention; NKV = 1 is multi-query). tests/test_llama_sample.py.

Context: the prompt plus the new tokens must fit the model's max_seq_len.
A longer request is refused before anything runs (no silent truncation, no
sliding window), with a message naming the lengths.

The cached path runs on NumPy parameters. A CUDA/emu model is viewed through
its params_host() (on a GPU that copies the parameters to the host once per
generate call); the uncached path uses the model's own sampler() on its device.
"""

from __future__ import annotations

import numpy as np

from .cpu.gelu import gelu_forward
from .cpu.layernorm import layernorm_forward
from .cpu.llama import lm_head_name, rope_tables
from .cpu.matmul import matmul_forward
from .cpu.residual import residual_forward
from .cpu.rmsnorm import rmsnorm_forward
from .cpu.rope import rope_forward
from .cpu.swiglu import geglu_forward, swiglu_forward
from .formats import bf16_bits_to_float32
from .llama_config import LlamaConfig


class KVCache:
    """Keys and values of every layer for a batch of B sequences.

    k, v: (L, B, NKV, maxlen, hs) with NKV = NH for GPT-2 and a Llama config's
    num_kv_heads; positions [0, pos) are filled. A Llama config's cache also
    holds its RoPE tables (rope, from llmcu/cpu/llama.rope_tables).
    """

    def __init__(self, config, B: int = 1, maxlen: int | None = None):
        maxlen = config.max_seq_len if maxlen is None else maxlen
        if not 0 < maxlen <= config.max_seq_len:
            raise ValueError(f"KVCache: maxlen must be in 1..{config.max_seq_len}, got {maxlen}")
        kv_heads = getattr(config, "num_kv_heads", config.num_heads)
        shape = (config.num_layers, B, kv_heads, maxlen, config.head_size)
        self.config, self.B, self.maxlen = config, B, maxlen
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.pos = 0
        self.rope = rope_tables(config) if isinstance(config, LlamaConfig) else None


def _host_params(model) -> dict:
    """Named NumPy parameter views of a cpu model, or of any model's params_host()."""
    from .config import parameter_views
    p = getattr(model, "p", None)
    if p is not None and isinstance(p.get("wte"), np.ndarray) and p["wte"].dtype == np.float32:
        return p  # (a bf16 model's views hold bf16 bits: its params_host() widens them)
    return parameter_views(model.config, np.asarray(model.params_host(), dtype=np.float32))


def _check_tokens(config, tokens, where):
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"{where}: token ids must be in [0, {config.vocab_size}), "
                         f"found {tokens.min()}..{tokens.max()}")


def _check_cached_call(fn, config, cache: KVCache, tokens):
    """tokens as a (B,Tn) array and the positions [pos, end) they take, after the checks."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != cache.B or tokens.shape[1] == 0:
        raise ValueError(f"{fn}: tokens must be (B={cache.B}, Tn>0), got shape {tokens.shape}")
    _check_tokens(config, tokens, fn)
    pos, end = cache.pos, cache.pos + tokens.shape[1]
    if end > cache.maxlen:
        raise ValueError(f"{fn}: {pos} cached + {tokens.shape[1]} new positions exceed the cache "
                         f"length {cache.maxlen} (model max_seq_len {config.max_seq_len})")
    return tokens, pos, end


def _buf(*shape):
    return np.empty(shape, dtype=np.float32)


def _attend(q, keys, values, pos, hs):
    """Causal softmax(q k^T / sqrt(hs)) v of queries at positions pos.. over the cached
    keys/values 0..end: q (..., Tn, hs) against keys, values (..., end, hs), broadcast
    over the leading axes (GPT-2: (B,NH); Llama: (B,NKV,G) against (B,NKV,1))."""
    Tn, end = q.shape[-2], keys.shape[-2]
    # query i sits at position pos+i and sees keys 0..pos+i
    future = np.arange(end)[None, :] > (pos + np.arange(Tn))[:, None]  # (Tn, end)
    att = q @ np.swapaxes(keys, -1, -2)                          # (..., Tn, end)
    att *= np.float32(1.0 / np.sqrt(hs))
    att[..., future] = -np.inf
    att -= att.max(axis=-1, keepdims=True)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    return att @ values                                          # (..., Tn, hs)


def forward_cached(params: dict, config, cache: KVCache, tokens) -> np.ndarray:
    """Run tokens (B,Tn) at positions cache.pos.. through the model, appending
    their keys and values to the cache; returns the logits (B, V) of the last
    of them. The per-position math is the model's own layer functions.
    GPT-2 only: a Llama config goes to forward_cached_llama."""
    if isinstance(config, LlamaConfig):
        raise TypeError("forward_cached: config is a LlamaConfig; use forward_cached_llama")
    tokens, pos, end = _check_cached_call("forward_cached", config, cache, tokens)
    B, Tn = tokens.shape
    p, C, NH, hs = params, config.channels, config.num_heads, config.head_size

    # encoder, as encoder_forward but at positions pos..end
    x = _buf(B, Tn, C)
    np.take(p["wte"], tokens, axis=0, out=x)
    x += p["wpe"][pos:end]
    ln, mean, rstd = _buf(B, Tn, C), _buf(B, Tn), _buf(B, Tn)
    qkv, atty, proj = _buf(B, Tn, 3 * C), _buf(B, Tn, C), _buf(B, Tn, C)
    fch, fch_gelu = _buf(B, Tn, 4 * C), _buf(B, Tn, 4 * C)
    res2, res3 = _buf(B, Tn, C), _buf(B, Tn, C)
    for l in range(config.num_layers):
        layernorm_forward(ln, mean, rstd, x, p["ln1w"][l], p["ln1b"][l])
        matmul_forward(qkv, ln, p["qkvw"][l], p["qkvb"][l])
        split = qkv.reshape(B, Tn, 3, NH, hs)
        q = split[:, :, 0].transpose(0, 2, 1, 3)                  # (B,NH,Tn,hs)
        cache.k[l, :, :, pos:end] = split[:, :, 1].transpose(0, 2, 1, 3)
        cache.v[l, :, :, pos:end] = split[:, :, 2].transpose(0, 2, 1, 3)
        y = _attend(q, cache.k[l, :, :, :end], cache.v[l, :, :, :end], pos, hs)  # (B,NH,Tn,hs)
        atty.reshape(B, Tn, NH, hs)[...] = y.transpose(0, 2, 1, 3)
        matmul_forward(proj, atty, p["attprojw"][l], p["attprojb"][l])
        residual_forward(res2, x, proj)
        layernorm_forward(ln, mean, rstd, res2, p["ln2w"][l], p["ln2b"][l])
        matmul_forward(fch, ln, p["fcw"][l], p["fcb"][l])
        gelu_forward(fch_gelu, fch)
        matmul_forward(proj, fch_gelu, p["fcprojw"][l], p["fcprojb"][l])
        residual_forward(res3, res2, proj)
        x, res3 = res3, x  # x is the layer's output; the old x buffer is reused
    cache.pos = end
    last = np.ascontiguousarray(x[:, -1:])                         # (B,1,C)
    lnf = _buf(B, 1, C)
    layernorm_forward(lnf, _buf(B, 1), _buf(B, 1), last, p["lnfw"], p["lnfb"])
    logits = _buf(B, 1, config.padded_vocab_size)
    matmul_forward(logits, lnf, p["wte"])  # weight tying
    return logits[:, 0, :config.vocab_size]


def forward_cached_llama(params: dict, config: LlamaConfig, cache: KVCache, tokens) -> np.ndarray:
    """forward_cached for a Llama/Gemma config: the layers of llmcu/cpu/llama.py's
    forward_layers at positions cache.pos.. only. RoPE rotates the new queries and
    keys by the angles of their absolute positions; the cache keeps the NKV rotated
    key heads and the value heads; query head h attends over kv head h // (NH/NKV)
    (the fused attention's grouping). Gemma's options come from the config: the
    embedding scale, the norms' (1 + weight) and GeGLU. Returns the (B, V) logits of
    the last token."""
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"forward_cached_llama: config must be a LlamaConfig, found "
                        f"{type(config).__name__} (GPT-2 uses forward_cached)")
    tokens, pos, end = _check_cached_call("forward_cached_llama", config, cache, tokens)
    B, Tn = tokens.shape
    p, C, H = params, config.channels, config.hidden_dim
    NH, NKV, hs = config.num_heads, config.num_kv_heads, config.head_size
    G = NH // NKV
    eps, off = config.norm_eps, config.norm_weight_offset
    act_forward = swiglu_forward if config.mlp == "swiglu" else geglu_forward
    cos, sin = cache.rope.cos[pos:end], cache.rope.sin[pos:end]  # row i: position pos+i

    x = _buf(B, Tn, C)
    np.take(p["wte"], tokens, axis=0, out=x)
    if config.embed_scale != 1.0:
        x *= np.float32(config.embed_scale)
    ln, rstd = _buf(B, Tn, C), _buf(B, Tn)
    qkv, atty, proj = _buf(B, Tn, config.qkv_channels), _buf(B, Tn, config.attn_channels), _buf(B, Tn, C)
    fch, fch_act = _buf(B, Tn, 2 * H), _buf(B, Tn, H)
    res2, res3 = _buf(B, Tn, C), _buf(B, Tn, C)
    for l in range(config.num_layers):
        rmsnorm_forward(ln, rstd, x, p["ln1w"][l], eps, off)
        matmul_forward(qkv, ln, p["qkvw"][l])
        rope_forward(qkv, qkv, cos, sin, NH, NKV)  # in place (rope_forward allows out is inp)
        q = qkv[..., :NH * hs].reshape(B, Tn, NKV, G, hs).transpose(0, 2, 3, 1, 4)  # (B,NKV,G,Tn,hs)
        kv = qkv[..., NH * hs:].reshape(B, Tn, 2, NKV, hs)
        cache.k[l, :, :, pos:end] = kv[:, :, 0].transpose(0, 2, 1, 3)
        cache.v[l, :, :, pos:end] = kv[:, :, 1].transpose(0, 2, 1, 3)
        keys, values = cache.k[l, :, :, None, :end], cache.v[l, :, :, None, :end]  # (B,NKV,1,end,hs)
        y = _attend(q, keys, values, pos, hs)                      # (B,NKV,G,Tn,hs)
        atty.reshape(B, Tn, NKV, G, hs)[...] = y.transpose(0, 3, 1, 2, 4)
        matmul_forward(proj, atty, p["attprojw"][l])
        residual_forward(res2, x, proj)
        rmsnorm_forward(ln, rstd, res2, p["ln2w"][l], eps, off)
        matmul_forward(fch, ln, p["fcw"][l])
        act_forward(fch_act, fch)
        matmul_forward(proj, fch_act, p["fcprojw"][l])
        residual_forward(res3, res2, proj)
        x, res3 = res3, x  # x is the layer's output; the old x buffer is reused
    cache.pos = end
    last = np.ascontiguousarray(x[:, -1:])                         # (B,1,C)
    lnf = _buf(B, 1, C)
    rmsnorm_forward(lnf, _buf(B, 1), last, p["lnfw"], eps, off)
    logits = _buf(B, 1, config.padded_vocab_size)
    matmul_forward(logits, lnf, p[lm_head_name(config)])
    return logits[:, 0, :config.vocab_size]


def check_length(config, n_prompt: int, max_new_tokens: int) -> None:
    """Raise ValueError unless prompt + new tokens fit the model's context."""
    T = config.max_seq_len
    if n_prompt == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. <|endoftext|>)")
    if max_new_tokens < 0:
        raise ValueError(f"the number of new tokens must be >= 0, got {max_new_tokens}")
    if n_prompt > T:
        raise ValueError(f"the prompt is {n_prompt} tokens, longer than the model's context "
                         f"(max_seq_len) of {T} tokens; shorten the prompt")
    if n_prompt + max_new_tokens > T:
        raise ValueError(f"the prompt ({n_prompt} tokens) plus {max_new_tokens} new tokens is "
                         f"{n_prompt + max_new_tokens} tokens, more than the model's context "
                         f"(max_seq_len) of {T}; ask for at most {T - n_prompt} new tokens")


def pick(logits, rng, temperature=1.0, top_k=None) -> int:
    """The next token from (V,) logits: argmax at temperature <= 0, else a draw
    from softmax(logits / temperature) restricted to the top_k largest."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size:
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=None, seed=None,
             rng=None, use_cache=True, return_logits=False):
    """Sample max_new_tokens after prompt_tokens; returns the new token ids (a list).

    temperature 0 is greedy; top_k keeps the k most likely tokens; rng (a
    np.random.Generator) wins over seed. use_cache=False recomputes the full
    prefix for every token. With return_logits, returns (ids, logits) with
    logits (max_new_tokens, V) float32: the distribution each id came from.
    """
    cfg = model.config
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be > 0, got {top_k}")
    tokens = [int(t) for t in prompt_tokens]
    check_length(cfg, len(tokens), max_new_tokens)
    _check_tokens(cfg, np.asarray(tokens), "generate")
    if rng is None:
        rng = np.random.default_rng(seed)
    out, all_logits = [], []
    if max_new_tokens == 0:
        return (out, np.zeros((0, cfg.vocab_size), np.float32)) if return_logits else out
    if use_cache:
        params = _host_params(model)
        cache = KVCache(cfg, B=1, maxlen=len(tokens) + max_new_tokens)
        forward = forward_cached_llama if isinstance(cfg, LlamaConfig) else forward_cached
    else:
        sampler = model.sampler()
    pending = tokens  # what the cache has not seen yet: the prompt, then the last new token
    for _ in range(max_new_tokens):
        if use_cache:
            logits = forward(params, cfg, cache, np.asarray([pending], dtype=np.int32))[0]
        else:
            sampler.forward(np.asarray(tokens, dtype=np.int32)[None, :])
            logits = sampler.acts.logits[0, -1, :cfg.vocab_size]
            logits = logits.get() if hasattr(logits, "get") else logits
            if logits.dtype == np.uint16:  # a bf16 model's logits: bf16 bits, widened exactly
                logits = bf16_bits_to_float32(logits)
        if return_logits:
            all_logits.append(np.array(logits, dtype=np.float32))
        nxt = pick(logits, rng, temperature, top_k)
        tokens.append(nxt)
        out.append(nxt)
        pending = [nxt]
    return (out, np.stack(all_logits)) if return_logits else out


def sample_text(model, prompt: str = "", max_new_tokens: int = 64, temperature=1.0, top_k=None,
                seed=None, rng=None, use_cache=True, include_prompt=True, tok=None) -> str:
    """Text in, text out with the tokenizer `tok` (default GPT-2). An empty prompt
    starts from <|endoftext|> (as llm.c does); with Llama 3 every prompt starts with
    <|begin_of_text|>, as its training documents do. Returns prompt + continuation
    (decoded together, so a character split across the boundary survives), or only
    the continuation with include_prompt=False."""
    from .tokenizer import LLAMA3, gpt2
    tok = tok or gpt2()
    prompt_ids = tok.encode(prompt) if prompt else []
    bos = [tok.eot] if tok.name == LLAMA3 or not prompt_ids else []
    new = generate(model, bos + prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, rng=rng, use_cache=use_cache)
    return tok.decode(prompt_ids + new) if include_prompt else tok.decode(new)
