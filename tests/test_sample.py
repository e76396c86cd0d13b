"""Sampling: the KV-cached path against full recomputation, the sampling rules,
the context limit, and the `llmcu sample` command."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import formats
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu.gpt2 import GPT2, init_parameters
from llmcu.sample import KVCache, forward_cached, generate, pick, sample_text
from llmcu.train import sample as train_sample

ROOT = Path(__file__).resolve().parents[1]
TINY = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=4, channels=32)


@pytest.fixture(scope="module")
def model():
    params = init_parameters(TINY, seed=7)
    p = parameter_views(TINY, params)
    # at init (std 0.02) attention is almost uniform and logits almost flat; larger
    # weights make attention peaked and the next-token distribution non-trivial
    for name in ("wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"):
        p[name] *= 10.0
    return GPT2(TINY, params)


def full_logits(model, tokens):
    """Logits (T, V) of every position from one uncached forward."""
    m = model.sampler()
    m.forward(np.asarray(tokens, dtype=np.int32)[None, :])
    return m.acts.logits[0, :, :TINY.vocab_size].copy()


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_cached_and_uncached_logits_match_at_every_position(model, prompt_len):
    prompt = list(np.random.default_rng(prompt_len).integers(0, TINY.vocab_size, prompt_len))
    n = TINY.max_seq_len - prompt_len  # fill the context to the last position
    ids_c, logits_c = generate(model, prompt, n, seed=3, return_logits=True)
    ids_u, logits_u = generate(model, prompt, n, seed=3, use_cache=False, return_logits=True)
    assert logits_c.shape == logits_u.shape == (n, TINY.vocab_size)
    assert np.abs(logits_u).max() > 1.0  # not a flat, trivially-equal distribution
    np.testing.assert_allclose(logits_c, logits_u, rtol=0, atol=1e-5)
    assert ids_c == ids_u
    assert len(set(ids_c)) > 1
    # and the uncached logits are those of one forward over the whole sequence
    np.testing.assert_allclose(logits_u, full_logits(model, prompt + ids_u)[prompt_len - 1:-1],
                               rtol=0, atol=1e-5)


def test_prefill_in_chunks_matches_full_forward(model):
    """Several positions per call at a non-zero cache offset (the causal mask inside a chunk)."""
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 20)
    expected = full_logits(model, tokens)
    cache = KVCache(TINY)
    for a, b in [(0, 3), (3, 10), (10, 11), (11, 20)]:
        got = forward_cached(model.p, TINY, cache, tokens[None, a:b])
        np.testing.assert_allclose(got[0], expected[b - 1], rtol=0, atol=1e-5)
    assert cache.pos == 20


def test_greedy_is_argmax_and_top_k_1_is_greedy(model):
    prompt = [5, 17, 3]
    greedy, logits = generate(model, prompt, 12, temperature=0, use_cache=False, return_logits=True)
    assert greedy == [int(i) for i in logits.argmax(axis=1)]
    assert generate(model, prompt, 12, temperature=0) == greedy
    for seed in range(3):
        assert generate(model, prompt, 12, temperature=1.5, top_k=1, seed=seed) == greedy


def test_seed_makes_sampling_reproducible(model):
    a = generate(model, [1, 2], 20, seed=11)
    assert generate(model, [1, 2], 20, seed=11) == a
    assert any(generate(model, [1, 2], 20, seed=s) != a for s in range(12, 16))


def test_top_k_only_picks_among_the_k_most_likely(model):
    logits = generate(model, [9, 4], 1, temperature=0, return_logits=True)[1][0]
    top5 = set(np.argsort(logits)[-5:].tolist())
    picked = {generate(model, [9, 4], 1, temperature=2.0, top_k=5, seed=s)[0] for s in range(60)}
    assert picked <= top5 and len(picked) > 1
    rng = np.random.default_rng(0)
    flat = np.zeros(50)
    flat[[3, 10, 40]] = 1.0  # three equally likely tokens above the rest
    draws = {pick(flat, rng, temperature=1.0, top_k=3) for _ in range(300)}
    assert draws == {3, 10, 40}
    draws = {pick(flat, rng, temperature=1.0) for _ in range(300)}
    assert len(draws) > 3  # without top-k the rest can be drawn too


def test_context_limits_give_clear_errors(model):
    with pytest.raises(ValueError, match=r"prompt is 33 tokens, longer than the model's context .* 32"):
        generate(model, [1] * 33, 1)
    with pytest.raises(ValueError, match=r"30 tokens\) plus 3 new tokens .* at most 2 new tokens"):
        generate(model, [1] * 30, 3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        generate(model, [1, 101], 3)
    assert len(generate(model, [1] * 30, 2)) == 2
    assert generate(model, [1] * 32, 0) == []


class HostOnlyModel:
    """A stand-in for the CUDA model: parameters only through params_host()."""

    def __init__(self, inner):
        self.config, self._inner = inner.config, inner

    def params_host(self):
        return self._inner.params.copy()

    def sampler(self):
        return self._inner.sampler()


def test_device_agnostic_and_training_sampler(model):
    expected = generate(model, [4], 10, seed=5)
    assert generate(HostOnlyModel(model), [4], 10, seed=5) == expected
    assert generate(HostOnlyModel(model), [4], 10, seed=5, use_cache=False) == expected
    assert train_sample(model, [4], 10, np.random.default_rng(5)) == expected


# -- the command --------------------------------------------------------------

def llmcu(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "llmcu", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, channels=32)
    path = tmp_path_factory.mktemp("sample") / "tiny.bin"
    formats.write_model(path, config, init_parameters(config, seed=1))
    return path


def test_cli_sample_prints_prompt_and_continuation_deterministically(tiny_bin):
    runs = [llmcu("sample", "-e", tiny_bin, "--prompt", "Hello", "-g", 5, "--seed", 1, *extra)
            for extra in ([], [], ["--no-cache"])]
    for r in runs:
        assert r.returncode == 0, r.stderr
    out = runs[0].stdout
    assert out.startswith("Hello") and len(out.rstrip("\n")) > len("Hello"), out
    assert runs[1].stdout == out and runs[2].stdout == out
    # the same text through the Python API
    config, params = formats.read_model(tiny_bin)
    assert sample_text(GPT2(config, params), "Hello", 5, seed=1) + "\n" == out


def test_cli_sample_too_long_prompt_is_a_clear_error(tiny_bin):
    from llmcu.tokenizer import encode
    prompt = "word " * 40
    r = llmcu("sample", "-e", tiny_bin, "--prompt", prompt, "-g", 1, "--seed", 1)
    assert r.returncode == 2
    assert f"llmcu sample: error: the prompt is {len(encode(prompt))} tokens, longer than the model's context " \
           "(max_seq_len) of 32 tokens" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = llmcu("sample", "-e", tiny_bin.parent / "missing.bin")
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr
