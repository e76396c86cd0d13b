"""The CPU backend's threads (llmcu/cpu/threads.py) and what runs on them.

The blocked, threaded AdamW must equal the plain formula (adamw_reference) within
float32 rounding and torch.optim.AdamW at the parity tests' tolerance, on sizes that
are not a multiple of the block; and the thread count must not change any result:
AdamW and the global norm are compared bit for bit across 1, 2 and 3 threads.
"""

import math

import numpy as np
import pytest

from llmcu.cpu import adamw, threads


@pytest.fixture
def restore_threads():
    n = threads.num_threads()
    yield
    threads.set_threads(n)


# --- parallel_for ------------------------------------------------------------

@pytest.mark.parametrize("n,nthreads,min_part,unit", [(10, 3, 1, 1), (1000, 2, 100, 64), (7, 4, 1, 1),
                                                      (5, 2, 100, 1), (0, 2, 1, 1), (1 << 17, 3, 1 << 16, 1)])
def test_parallel_for_covers_the_range_once(restore_threads, n, nthreads, min_part, unit):
    threads.set_threads(nthreads)
    hits = np.zeros(n, dtype=np.int64)
    calls = []

    def fn(lo, hi):
        calls.append((lo, hi))
        hits[lo:hi] += 1
    threads.parallel_for(fn, n, min_part=min_part, unit=unit)
    assert (hits == 1).all(), calls
    assert len(calls) <= max(1, min(nthreads, n // min_part)), calls
    assert all(lo % unit == 0 for lo, _ in calls), calls


def test_parallel_for_uses_several_threads_and_raises_their_errors(restore_threads):
    import threading
    threads.set_threads(2)
    names = set()

    def fn(lo, hi):
        names.add(threading.current_thread().name)
    threads.parallel_for(fn, 100, min_part=10)
    assert len(names) == 2, names

    def boom(lo, hi):
        if lo > 0:
            raise RuntimeError("part failed")
    with pytest.raises(RuntimeError, match="part failed"):
        threads.parallel_for(boom, 100, min_part=10)


def test_set_threads_rejects_zero():
    with pytest.raises(ValueError, match="set_threads"):
        threads.set_threads(0)


def test_set_threads_sets_openblas(restore_threads):
    import ctypes
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
    getters = [getattr(ctypes.CDLL(path), name, None) for path in libs
               for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads")]
    getters = [g for g in getters if g is not None]
    if not getters:
        pytest.skip("NumPy's BLAS is not OpenBLAS here")
    for n in (1, 3):
        threads.set_threads(n)
        assert getters[0]() == n


def test_thread_count_follows_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads._env_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert threads._env_threads() >= 1


# --- AdamW -------------------------------------------------------------------

def _state(n, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float32)
    m = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
    v = rng.random(n, dtype=np.float32) * np.float32(1e-4)
    grads = [rng.standard_normal(n, dtype=np.float32) * np.float32(0.1) for _ in range(3)]
    return p, m, v, grads


HYPER = [dict(lr=1e-3, weight_decay=0.0, grad_scale=1.0), dict(lr=3e-3, weight_decay=0.1, grad_scale=0.37)]


@pytest.mark.parametrize("n", [1, 1000, 3 * 1024 + 17])
@pytest.mark.parametrize("hyper", HYPER)
def test_blocked_adamw_equals_the_plain_formula(restore_threads, monkeypatch, n, hyper):
    # blocks of 1024 elements: n = 3*1024+17 ends in a partial block, 1000 is one partial block
    monkeypatch.setattr(adamw, "CHUNK", 1024)
    threads.set_threads(2)
    p, m, v, grads = _state(n, seed=n)
    ref = [p.copy(), m.copy(), v.copy()]
    for step, g in enumerate(grads, start=1):
        adamw.adamw_update(p, g, m, v, step, **hyper)
        adamw.adamw_reference(*ref[:1], g, *ref[1:], step, **hyper)
    # float32 rounding of a dozen operations on values of size ~1: a few ulp
    for name, ours, theirs in zip("pmv", (p, m, v), ref):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.array_equal(p, _state(n, seed=n)[0])  # it did update


@pytest.mark.parametrize("n", [5 * 1024 + 3, 1 << 16])
def test_adamw_result_does_not_depend_on_the_thread_count(restore_threads, monkeypatch, n):
    monkeypatch.setattr(adamw, "CHUNK", 1024)
    results = []
    for nthreads in (1, 2, 3):
        threads.set_threads(nthreads)
        p, m, v, grads = _state(n, seed=1)
        for step, g in enumerate(grads, start=1):
            adamw.adamw_update(p, g, m, v, step, lr=1e-3, weight_decay=0.1, grad_scale=0.5)
        results.append((p, m, v))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_adamw_matches_torch(restore_threads, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(adamw, "CHUNK", 1024)
    threads.set_threads(2)
    n, lr, wd = 4 * 1024 + 5, 1e-3, 0.1
    p, _, _, grads = _state(n, seed=3)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.AdamW([tp], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for step, g in enumerate(grads, start=1):
        adamw.adamw_update(p, g, m, v, step, lr, weight_decay=wd)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_global_norm_is_exact_and_thread_independent(restore_threads, monkeypatch):
    monkeypatch.setattr(adamw, "NORM_BLOCK", 1000)
    g = np.random.default_rng(0).standard_normal(10 * 1000 + 7, dtype=np.float32)
    exact = math.sqrt(float(np.dot(g.astype(np.float64), g.astype(np.float64))))
    norms = []
    for nthreads in (1, 2, 3):
        threads.set_threads(nthreads)
        norms.append(adamw.global_norm(g))
    assert norms[0] == norms[1] == norms[2]
    assert abs(norms[0] - exact) <= 1e-6 * exact


def test_train_threads_flag_sets_the_pool(restore_threads, monkeypatch):
    from llmcu import cli
    seen = []
    monkeypatch.setattr("llmcu.train.train", lambda cfg, log=None: seen.append(cfg.threads))
    assert cli.main(["train", "--threads", "3"]) == 0
    assert seen == [3]
    with pytest.raises(SystemExit):
        cli.main(["train", "--threads", "-1"])


def test_setup_model_applies_threads(restore_threads, tmp_path):
    from llmcu.config import GPT2Config, TrainConfig
    from llmcu import formats, train
    from llmcu.cpu.gpt2 import init_parameters
    tiny = GPT2Config(max_seq_len=16, vocab_size=64, num_layers=1, num_heads=2, channels=16)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, tiny, init_parameters(tiny, seed=1))
    threads.set_threads(1)
    comm = type("Comm", (), {"world_size": 1, "rank": 0, "backend": "none"})()
    train.setup_model(TrainConfig(model=str(path), threads=3, device="cpu"), comm, log=lambda s: None)
    assert threads.num_threads() == 3


# --- the threaded layers -------------------------------------------------------

def _layer_runs():
    """(name, fn(arrays) -> outputs) for each threaded layer, on inputs big enough to split
    into several parts (threads.MIN_PART elements each)."""
    from llmcu.cpu import attention, classifier, gelu
    rng = np.random.default_rng(5)
    B, T, C, NH, V, Vp = 4, 64, 384, 6, 1000, 1024
    x = rng.standard_normal((B, T, 4 * C), dtype=np.float32)
    dy = rng.standard_normal((B, T, 4 * C), dtype=np.float32)
    logits = rng.standard_normal((B, T, Vp), dtype=np.float32) * np.float32(3)
    targets = rng.integers(0, V, (B, T))
    h = rng.standard_normal((B, T, C), dtype=np.float32)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)

    def gelu_fwd():
        out = np.full_like(x, np.nan)
        gelu.gelu_forward(out, x)
        return [out]

    def gelu_bwd():
        out = np.full_like(x, np.nan)
        gelu.gelu_backward(out, dy, x)
        inplace = dy.copy()
        gelu.gelu_backward(inplace, inplace, x)
        return [out, inplace]

    def classifier_fwd_bwd():
        losses, probs = np.full((B, T), np.nan, np.float32), np.full_like(logits, np.nan)
        classifier.fused_classifier(losses, probs, logits, targets, V)
        dlogits = np.full_like(logits, np.nan)
        dlosses = np.full((B, T), 1.0 / (B * T), np.float32)
        classifier.crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V)
        return [losses, probs, dlogits]

    def residual_layernorm_fwd():
        from llmcu.cpu import layernorm
        h2 = np.concatenate([h, h[::-1]])            # (2B,T,C): enough rows to split
        w, b = rng.standard_normal(C, dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
        res, out = np.full_like(h2, np.nan), np.full_like(h2, np.nan)
        mean, rstd = np.full((2 * B, T), np.nan, np.float32), np.full((2 * B, T), np.nan, np.float32)
        layernorm.residual_layernorm_forward(res, out, mean, rstd, h2, h2 * np.float32(0.5), w, b)
        return [res, out, mean, rstd]

    def attention_fwd_bwd():
        out, att = np.full_like(h, np.nan), np.full((B, NH, T, T), np.nan, np.float32)
        attention.attention_forward(out, att, qkv, NH)
        dqkv = np.full_like(qkv, np.nan)
        attention.attention_backward(dqkv, h, qkv, att, NH)
        return [out, att, dqkv]
    return {"gelu_forward": gelu_fwd, "gelu_backward": gelu_bwd, "classifier": classifier_fwd_bwd,
            "residual_layernorm_forward": residual_layernorm_fwd, "attention": attention_fwd_bwd}


@pytest.mark.parametrize("name", list(_layer_runs()))
def test_threaded_layers_do_not_depend_on_the_thread_count(restore_threads, monkeypatch, name):
    parts = []
    real = threads.parallel_for

    def spy(fn, n, *args, **kwargs):
        calls = []
        real(lambda lo, hi: (calls.append((lo, hi)), fn(lo, hi)), n, *args, **kwargs)
        parts.append(len(calls))
    monkeypatch.setattr(threads, "parallel_for", spy)
    results = []
    for nthreads in (1, 3):
        threads.set_threads(nthreads)
        parts.clear()
        results.append(_layer_runs()[name]())
        if nthreads == 3:
            assert max(parts) > 1, f"{name}: the inputs did not split into parts: {parts}"
    for a, b in zip(*results):
        assert not np.isnan(a).any()
        assert np.array_equal(a, b), name


def test_zero_grad_clears_every_gradient_on_several_threads(restore_threads):
    from llmcu.config import GPT2Config
    from llmcu.cpu.gpt2 import GPT2
    config = GPT2Config(max_seq_len=16, vocab_size=2000, num_layers=2, num_heads=2, channels=64)
    model = GPT2(config)
    assert model.params.size > 3 * threads.MIN_PART  # enough to split over 3 threads
    threads.set_threads(3)
    model.zero_grad()
    model.grads.fill(np.nan)
    model.zero_grad()
    assert not model.grads.any() and not np.isnan(model.grads).any()
