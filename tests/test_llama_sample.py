"""KV-cached sampling for Llama and Gemma (llmcu/sample.forward_cached_llama)
against full recomputation on the model's own forward, the context limit, and
the Llama sampling paths of train.sample and `llmcu sample`.

The reference is the uncached path: the NumPy Llama's forward over the whole
prefix (llmcu/cpu/llama.py, itself checked against transformers in
tests/test_llama_hf.py), so RoPE positions, the grouped-query head mapping and
Gemma's options are checked against an independent implementation.

Tolerance: cached and uncached logits agree to atol 3e-5 (rtol 0). Both are
float32 with the same weights; they differ only in summation order (the fused
attention's softmax through the row's log-sum-exp against a max-subtracted
softmax, matmuls of different shapes): observed up to 6e-6 here on logits up to
~6, about a dozen float32 ulps (ulp(4) = 4.8e-7); 3e-5 leaves 5x for other BLAS
builds. A wrong RoPE position, head grouping, norm offset or embedding scale
moves logits by orders of magnitude more (each such mutation fails these tests).
"""

import math

import numpy as np
import pytest

from llmcu import formats
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu.llama import Llama, init_parameters
from llmcu.llama_config import LlamaConfig
from llmcu.sample import KVCache, forward_cached, forward_cached_llama, generate

ATOL = 3e-5  # see the module docstring

# Llama: grouped-query (4 query heads over 2 kv heads), an untied LM head, Llama 3 RoPE
# scaling with a short original context so the scaled frequencies matter here.
LLAMA_GQA = LlamaConfig(max_seq_len=24, vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2,
                        channels=32, hidden_dim=48, rope_theta=500.0, tie_embeddings=False,
                        rope_scaling=(4.0, 1.0, 4.0, 8))
# Gemma: multi-query (one kv head), head_dim 16 so NH*hs = 64 != C, GeGLU, (1 + weight)
# norms and the sqrt(C) embedding scale.
GEMMA_MQA = LlamaConfig(max_seq_len=24, vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=1,
                        channels=32, head_dim=16, hidden_dim=48, mlp="geglu", norm_weight_offset=1.0,
                        embed_scale=math.sqrt(32), norm_eps=1e-6)
CONFIGS = {"llama_gqa": LLAMA_GQA, "gemma_mqa": GEMMA_MQA}


def random_model(config, seed=3):
    """Weights far from init (std 0.02 gives near-uniform attention and flat logits):
    matrices x10 and random norm scales, so every part of the layer shows in the logits."""
    params = init_parameters(config, seed=seed)
    p = parameter_views(config, params)
    rng = np.random.default_rng(seed)
    for name in p:
        if name.endswith("w") and name.startswith("ln"):
            p[name] += rng.normal(0.0, 0.3, p[name].shape).astype(np.float32)
        else:
            p[name] *= 10.0
    return Llama(config, params)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return random_model(CONFIGS[request.param])


def full_logits(model, tokens):
    """Logits (B, T, V) of every position from one uncached forward over (B, T) tokens."""
    m = model.sampler()
    m.forward(np.atleast_2d(np.asarray(tokens, dtype=np.int32)))
    return m.acts.logits[..., :model.config.vocab_size].copy()


def test_cache_shape_follows_kv_heads(model):
    cfg = model.config
    cache = KVCache(cfg, B=2, maxlen=9)
    assert cache.k.shape == cache.v.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 9, cfg.head_dim)


@pytest.mark.parametrize("prompt_len", [1, 6])
def test_cached_and_uncached_logits_match_at_every_position(model, prompt_len):
    cfg = model.config
    prompt = list(np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, prompt_len))
    n = cfg.max_seq_len - prompt_len  # up to the last position of the context
    ids_c, logits_c = generate(model, prompt, n, seed=5, return_logits=True)
    ids_u, logits_u = generate(model, prompt, n, seed=5, use_cache=False, return_logits=True)
    assert logits_c.shape == logits_u.shape == (n, cfg.vocab_size)
    assert np.abs(logits_u).max() > 1.0  # not a flat, trivially equal distribution
    np.testing.assert_allclose(logits_c, logits_u, rtol=0, atol=ATOL)
    assert ids_c == ids_u and len(set(ids_c)) > 1
    # the uncached logits are those of one forward over the whole sequence
    np.testing.assert_allclose(logits_u, full_logits(model, prompt + ids_u)[0, prompt_len - 1:-1],
                               rtol=0, atol=ATOL)


def test_greedy_generation_identical(model):
    cfg = model.config
    prompt = [int(t) for t in np.random.default_rng(11).integers(0, cfg.vocab_size, 4)]
    ids_c, logits_c = generate(model, prompt, 12, temperature=0, return_logits=True)
    ids_u, logits_u = generate(model, prompt, 12, temperature=0, use_cache=False, return_logits=True)
    assert ids_c == ids_u
    assert ids_c == [int(np.argmax(row)) for row in logits_u]
    np.testing.assert_allclose(logits_c, logits_u, rtol=0, atol=ATOL)


def test_chunked_prefill_at_offsets_matches_full_forward(model):
    """Several positions per call at non-zero cache offsets, two sequences at once: RoPE
    at absolute positions and the causal mask inside a chunk."""
    cfg = model.config
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 20))
    expected = full_logits(model, tokens)
    cache = KVCache(cfg, B=2)
    for lo, hi in ((0, 5), (5, 6), (6, 13), (13, 20)):
        got = forward_cached_llama(model.p, cfg, cache, tokens[:, lo:hi])
        assert cache.pos == hi
        np.testing.assert_allclose(got, expected[:, hi - 1], rtol=0, atol=ATOL)


def test_context_limit_errors(model):
    cfg = model.config
    T = cfg.max_seq_len
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=f"prompt is {T + 1} tokens, longer than the model's context"):
            generate(model, [1] * (T + 1), 1, use_cache=use_cache)
        with pytest.raises(ValueError, match=f"ask for at most {T - 5} new tokens"):
            generate(model, [1] * 5, T, use_cache=use_cache)
    cache = KVCache(cfg, maxlen=4)
    forward_cached_llama(model.p, cfg, cache, [[1, 2, 3]])
    with pytest.raises(ValueError, match="forward_cached_llama: 3 cached \\+ 2 new positions exceed"):
        forward_cached_llama(model.p, cfg, cache, [[4, 5]])
    with pytest.raises(ValueError, match="forward_cached_llama: token ids must be in"):
        forward_cached_llama(model.p, cfg, KVCache(cfg), [[cfg.vocab_size]])


def test_wrong_config_kind_is_refused():
    gpt2 = GPT2Config(max_seq_len=8, vocab_size=11, num_layers=1, num_heads=2, channels=8)
    with pytest.raises(TypeError, match="forward_cached: config is a LlamaConfig"):
        forward_cached({}, LLAMA_GQA, KVCache(LLAMA_GQA), [[1]])
    with pytest.raises(TypeError, match="forward_cached_llama: config must be a LlamaConfig, found GPT2"):
        forward_cached_llama({}, gpt2, KVCache(gpt2), [[1]])


def test_kernel_model_samples_through_the_cache():
    """A model on the kernels (emu) samples from its host parameters: the cached ids and
    logits equal the NumPy model's, and its own uncached forward agrees (ATOL)."""
    from llmcu.cuda.llama import Llama as KernelLlama
    cpu = random_model(LLAMA_GQA)
    emu = KernelLlama(LLAMA_GQA, cpu.params.copy(), device="emu")
    prompt = [3, 1, 4]
    ids, logits = generate(cpu, prompt, 3, seed=1, return_logits=True)
    ids_e, logits_e = generate(emu, prompt, 3, seed=1, return_logits=True)
    assert ids_e == ids
    np.testing.assert_array_equal(logits_e, logits)
    ids_k, logits_k = generate(emu, prompt, 3, seed=1, use_cache=False, return_logits=True)
    assert ids_k == ids
    np.testing.assert_allclose(logits_k, logits, rtol=0, atol=ATOL)


def counting(monkeypatch):
    """Count the calls of llmcu.sample.forward_cached_llama (generate looks it up per call)."""
    import llmcu.sample as sample
    calls = []
    real = sample.forward_cached_llama

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(sample, "forward_cached_llama", wrapped)
    return calls


def test_train_sample_uses_the_cache_for_llama(monkeypatch):
    from llmcu.train import sample as train_sample
    model = random_model(GEMMA_MQA)
    calls = counting(monkeypatch)
    ids = train_sample(model, [5, 6], 7, np.random.default_rng(4))
    assert len(calls) == 7
    assert ids == generate(model, [5, 6], 7, rng=np.random.default_rng(4), use_cache=False)


def test_sample_command_uses_the_cache_for_llama(monkeypatch, capsys, tmp_path):
    """`llmcu sample` on a Llama file: cached by default, the same text as --no-cache."""
    from llmcu.cli import main
    cfg = LlamaConfig(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, num_kv_heads=1,
                      channels=16, hidden_dim=24)
    formats.write_model(tmp_path / "llama.bin", cfg, init_parameters(cfg, seed=7))
    args = ["sample", "-e", str(tmp_path / "llama.bin"), "--prompt", "Hello", "-g", "4", "--seed", "1"]
    calls = counting(monkeypatch)
    assert main(args) == 0
    cached = capsys.readouterr().out
    assert len(calls) == 4
    assert main(args + ["--no-cache"]) == 0
    assert len(calls) == 4
    assert capsys.readouterr().out == cached and cached.startswith("Hello")
