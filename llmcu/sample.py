"""Autoregressive sampling from a GPT-2, with and without a KV cache.

llm.c recomputes the whole sequence for every new token. Here the default is
incremental decoding: a prefill runs the prompt through the model once and
stores every layer's keys and values (KVCache); each later step feeds only the
newest token, appends its k and v, and lets its query attend over the cached
keys (the past only, so causality needs no mask). Only the last position's
logits are computed. The uncached path (use_cache=False) recomputes the full
prefix for every token on the model's own forward; both give the same logits
(to float32 rounding; tests/test_sample.py checks 1e-5).

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
from .cpu.matmul import matmul_forward
from .cpu.residual import residual_forward


class KVCache:
    """Keys and values of every layer for a batch of B sequences.

    k, v: (L, B, NH, maxlen, hs); positions [0, pos) are filled.
    """

    def __init__(self, config, B: int = 1, maxlen: int | None = None):
        maxlen = config.max_seq_len if maxlen is None else maxlen
        if not 0 < maxlen <= config.max_seq_len:
            raise ValueError(f"KVCache: maxlen must be in 1..{config.max_seq_len}, got {maxlen}")
        shape = (config.num_layers, B, config.num_heads, maxlen, config.head_size)
        self.config, self.B, self.maxlen = config, B, maxlen
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.pos = 0


def _host_params(model) -> dict:
    """Named NumPy parameter views of a cpu model, or of any model's params_host()."""
    from .config import parameter_views
    p = getattr(model, "p", None)
    if p is not None and isinstance(p.get("wte"), np.ndarray):
        return p
    return parameter_views(model.config, np.asarray(model.params_host(), dtype=np.float32))


def _check_tokens(config, tokens, where):
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"{where}: token ids must be in [0, {config.vocab_size}), "
                         f"found {tokens.min()}..{tokens.max()}")


def forward_cached(params: dict, config, cache: KVCache, tokens) -> np.ndarray:
    """Run tokens (B,Tn) at positions cache.pos.. through the model, appending
    their keys and values to the cache; returns the logits (B, V) of the last
    of them. The per-position math is the model's own layer functions."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] != cache.B or tokens.shape[1] == 0:
        raise ValueError(f"forward_cached: tokens must be (B={cache.B}, Tn>0), got shape {tokens.shape}")
    _check_tokens(config, tokens, "forward_cached")
    B, Tn = tokens.shape
    pos, end = cache.pos, cache.pos + Tn
    if end > cache.maxlen:
        raise ValueError(f"forward_cached: {pos} cached + {Tn} new positions exceed the cache "
                         f"length {cache.maxlen} (model max_seq_len {config.max_seq_len})")
    p, C, NH, hs = params, config.channels, config.num_heads, config.head_size

    def buf(*shape):
        return np.empty(shape, dtype=np.float32)

    # encoder, as encoder_forward but at positions pos..end
    x = buf(B, Tn, C)
    np.take(p["wte"], tokens, axis=0, out=x)
    x += p["wpe"][pos:end]
    ln, mean, rstd = buf(B, Tn, C), buf(B, Tn), buf(B, Tn)
    qkv, atty, proj = buf(B, Tn, 3 * C), buf(B, Tn, C), buf(B, Tn, C)
    fch, fch_gelu = buf(B, Tn, 4 * C), buf(B, Tn, 4 * C)
    res2, res3 = buf(B, Tn, C), buf(B, Tn, C)
    # query i sits at position pos+i and sees keys 0..pos+i
    future = np.arange(end)[None, :] > (pos + np.arange(Tn))[:, None]  # (Tn, end)
    scale = np.float32(1.0 / np.sqrt(hs))
    for l in range(config.num_layers):
        layernorm_forward(ln, mean, rstd, x, p["ln1w"][l], p["ln1b"][l])
        matmul_forward(qkv, ln, p["qkvw"][l], p["qkvb"][l])
        split = qkv.reshape(B, Tn, 3, NH, hs)
        q = split[:, :, 0].transpose(0, 2, 1, 3)                  # (B,NH,Tn,hs)
        cache.k[l, :, :, pos:end] = split[:, :, 1].transpose(0, 2, 1, 3)
        cache.v[l, :, :, pos:end] = split[:, :, 2].transpose(0, 2, 1, 3)
        keys, values = cache.k[l, :, :, :end], cache.v[l, :, :, :end]
        att = q @ keys.transpose(0, 1, 3, 2)                       # (B,NH,Tn,end)
        att *= scale
        att[..., future] = -np.inf
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        y = att @ values                                           # (B,NH,Tn,hs)
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
    lnf = buf(B, 1, C)
    layernorm_forward(lnf, buf(B, 1), buf(B, 1), last, p["lnfw"], p["lnfb"])
    logits = buf(B, 1, config.padded_vocab_size)
    matmul_forward(logits, lnf, p["wte"])  # weight tying
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
    else:
        sampler = model.sampler()
    pending = tokens  # what the cache has not seen yet: the prompt, then the last new token
    for _ in range(max_new_tokens):
        if use_cache:
            logits = forward_cached(params, cfg, cache, np.asarray([pending], dtype=np.int32))[0]
        else:
            sampler.forward(np.asarray(tokens, dtype=np.int32)[None, :])
            logits = sampler.acts.logits[0, -1, :cfg.vocab_size]
            logits = logits.get() if hasattr(logits, "get") else logits
        if return_logits:
            all_logits.append(np.array(logits, dtype=np.float32))
        nxt = pick(logits, rng, temperature, top_k)
        tokens.append(nxt)
        out.append(nxt)
        pending = [nxt]
    return (out, np.stack(all_logits)) if return_logits else out


def sample_text(model, prompt: str = "", max_new_tokens: int = 64, temperature=1.0, top_k=None,
                seed=None, rng=None, use_cache=True, include_prompt=True) -> str:
    """Text in, text out with the GPT-2 tokenizer. An empty prompt starts from
    <|endoftext|> (as llm.c does). Returns prompt + continuation (decoded
    together, so a character split across the boundary survives), or only
    the continuation with include_prompt=False."""
    from .tokenizer import EOT, decode, encode
    prompt_ids = encode(prompt) if prompt else []
    start = prompt_ids or [EOT]
    new = generate(model, start, max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, rng=rng, use_cache=use_cache)
    return decode(prompt_ids + new) if include_prompt else decode(new)
