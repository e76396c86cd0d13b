"""Optimisation controls of the training loop: gradient accumulation, the
learning-rate schedule in the log, and llm.c's outlier skip."""

import math
import re

import numpy as np
import pytest

from llmcu import formats
from llmcu import train as train_mod
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import GPT2, init_parameters
from llmcu.data import DataLoader
from llmcu.schedule import learning_rate
from llmcu.train import OutlierDetector, train, train_step

TINY = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=2, channels=16)
B, T = 2, 8


@pytest.fixture
def shard(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.bin"
    formats.write_shard(path, rng.integers(0, TINY.vocab_size, size=2000))
    return path


@pytest.fixture
def tiny_model_file(tmp_path):
    path = tmp_path / "tiny.bin"
    formats.write_model(path, TINY, init_parameters(TINY, seed=7))
    return path


def _make_model(device):
    params = init_parameters(TINY, seed=7)
    if device == "cpu":
        return GPT2(TINY, params)
    from llmcu.cuda.gpt2 import GPT2 as KernelGPT2
    return KernelGPT2(TINY, params, device=device)


def _host(a):
    return np.array(a.get() if hasattr(a, "get") else a)


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_accumulation_matches_one_big_batch(shard, device):
    """d = 2*B*T: two micro-batches of B rows give the step that one batch of 2B rows gives
    (the loader's 2B batch is exactly the two consecutive B batches stacked)."""
    cfg = TrainConfig(batch_size=B, seq_len=T, learning_rate=1e-3, max_steps=1,
                      weight_decay=0.1, total_batch_size=2 * B * T)
    accumulated = _make_model(device)
    r_acc = train_step(accumulated, DataLoader(shard, B, T), 0, cfg, accum_steps=2)
    big = _make_model(device)
    r_big = train_step(big, DataLoader(shard, 2 * B, T), 0, cfg, accum_steps=1)
    assert r_acc.skipped is None and r_big.skipped is None
    assert r_acc.loss == pytest.approx(r_big.loss, abs=1e-6)
    assert r_acc.norm == pytest.approx(r_big.norm, rel=1e-5)
    np.testing.assert_allclose(_host(accumulated.grads), _host(big.grads), atol=1e-7, rtol=1e-4)
    start = init_parameters(TINY, seed=7)
    moved = _host(big.params)
    assert np.abs(moved - start).max() > 1e-4  # the step did move the parameters
    np.testing.assert_allclose(_host(accumulated.params), moved, atol=1e-6, rtol=0)


def test_accumulation_without_loss_scale_would_differ(shard):
    """The test above can fail: summing unscaled micro-batch gradients doubles them."""
    model = _make_model("cpu")
    loader = DataLoader(shard, B, T)
    model.zero_grad()
    for _ in range(2):
        model.forward(*loader.next_batch())
        model.backward()
    big = _make_model("cpu")
    big.zero_grad()
    big.forward(*DataLoader(shard, 2 * B, T).next_batch())
    big.backward()
    np.testing.assert_allclose(model.grads, 2 * big.grads, atol=1e-7, rtol=1e-4)


def test_train_loop_with_accumulation(shard, tiny_model_file):
    logs = []
    cfg = TrainConfig(train_pattern=str(shard), val_pattern="", model=str(tiny_model_file),
                      batch_size=B, seq_len=T, max_steps=2, sample_every=0,
                      total_batch_size=3 * B * T)
    history = train(cfg, log=logs.append)
    text = "\n".join(logs)
    assert "grad accumulation steps: 3" in text, text
    assert len(history["train"]) == 2
    # one step consumed 3 micro-batches: the loss of step 1 is their mean
    model = GPT2(TINY, init_parameters(TINY, seed=7))
    loader = DataLoader(shard, B, T, shuffle=cfg.shuffle)  # the train loader's order (shuffled)
    expected = np.mean([model.forward(*loader.next_batch()) for _ in range(3)])
    assert history["train"][0] == pytest.approx(expected, abs=1e-6)


def test_total_batch_size_must_be_a_multiple(shard, tiny_model_file):
    cfg = TrainConfig(train_pattern=str(shard), val_pattern="", model=str(tiny_model_file),
                      batch_size=B, seq_len=T, max_steps=1, total_batch_size=40)
    with pytest.raises(ValueError, match=r"total batch size 40 .* multiple of B\*T = 2\*8 = 16"):
        train(cfg, log=lambda s: None)


def test_unknown_schedule_in_config(shard, tiny_model_file):
    cfg = TrainConfig(train_pattern=str(shard), val_pattern="", model=str(tiny_model_file),
                      batch_size=B, seq_len=T, max_steps=1, lr_schedule="cosin")
    with pytest.raises(ValueError, match="cosin.*cosine, linear, constant, wsd"):
        train(cfg, log=lambda s: None)


def test_logged_lr_follows_the_schedule(shard, tiny_model_file, monkeypatch):
    used = []
    real_update = GPT2.update

    def spy(self, lr, *args, **kwargs):
        used.append(lr)
        return real_update(self, lr, *args, **kwargs)

    monkeypatch.setattr(GPT2, "update", spy)
    logs = []
    cfg = TrainConfig(train_pattern=str(shard), val_pattern="", model=str(tiny_model_file),
                      batch_size=B, seq_len=T, learning_rate=1e-3, max_steps=6, sample_every=0,
                      lr_schedule="linear", warmup_iters=2, final_lr_frac=0.0)
    history = train(cfg, log=logs.append)
    logged = [float(v) for v in re.findall(r"^step +\d+/6 \| .* \| lr ([\d.e+-]+) \|", "\n".join(logs), re.M)]
    # warmup 5e-4, 1e-3; then linear over 4 steps to 0: 1e-3, 7.5e-4, 5e-4, 2.5e-4
    expected = [5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert used == pytest.approx(expected, rel=1e-12)
    assert history["lr"] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx([learning_rate("linear", s, 6, 1e-3, 2, 0.0) for s in range(6)])


def test_outlier_detector_zscore_over_window():
    det = OutlierDetector(window=4)
    assert all(math.isnan(det.update(v)) for v in (1.0, 2.0, 3.0, 4.0))  # filling the window
    # window now [2, 3, 4, 10]: mean 4.75, population std sqrt(((2.75)^2+(1.75)^2+(0.75)^2+(5.25)^2)/4)
    z = det.update(10.0)
    std = math.sqrt((2.75 ** 2 + 1.75 ** 2 + 0.75 ** 2 + 5.25 ** 2) / 4)
    assert z == pytest.approx((10.0 - 4.75) / std, rel=1e-12)
    # window [3, 4, 10, 4]
    assert det.update(4.0) == pytest.approx((4.0 - 5.25) / np.std([3, 4, 10, 4]), rel=1e-12)
    const = OutlierDetector(window=3)
    for _ in range(3):
        const.update(5.0)
    assert const.update(5.0) == 0.0
    assert OutlierDetector().window == 128


def test_outlier_loss_skips_the_update(shard, tiny_model_file, monkeypatch):
    """After a full window of 128 steps, a loss spike at step 129 is skipped: the
    parameters across that step stay exactly the same, and the log says why."""
    spike_step = 128  # 0-based: the 129th value is the first with a z-score
    snapshots = []

    class Spiky:
        def __init__(self, inner):
            self.inner, self.step = inner, -1

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def zero_grad(self):  # once per optimizer step
            self.step += 1
            snapshots.append(self.inner.params.copy())
            self.inner.zero_grad()

        def forward(self, x, y=None):
            loss = self.inner.forward(x, y)
            return loss + 100.0 if (y is not None and self.step == spike_step) else loss

    real_build = train_mod.build_model
    monkeypatch.setattr(train_mod, "build_model", lambda *a, **k: Spiky(real_build(*a, **k)))
    logs = []
    cfg = TrainConfig(train_pattern=str(shard), val_pattern="", model=str(tiny_model_file),
                      batch_size=1, seq_len=4, learning_rate=1e-3, max_steps=spike_step + 2,
                      sample_every=0, skip_loss_z=5.0)
    history = train(cfg, log=logs.append)
    assert history["skipped"] == [spike_step]
    skip_lines = [line for line in logs if line.startswith("skipping")]
    assert len(skip_lines) == 1 and f"step {spike_step + 1} " in skip_lines[0] \
        and "loss z-score" in skip_lines[0], skip_lines
    assert np.array_equal(snapshots[spike_step], snapshots[spike_step + 1])  # skipped: unchanged
    assert not np.array_equal(snapshots[spike_step - 1], snapshots[spike_step])  # others update
    # with the threshold off the same spike is applied
    snapshots.clear()
    history = train(TrainConfig(**{**cfg.__dict__, "skip_loss_z": 0.0}), log=lambda s: None)
    assert history["skipped"] == []
    assert not np.array_equal(snapshots[spike_step], snapshots[spike_step + 1])


def test_grad_norm_outlier_skips_the_update(shard):
    """The grad-norm detector: a step whose norm is far out of the window is skipped."""
    # with the new value in a window of n, z <= sqrt(n-1): 2.65 for n=8
    cfg = TrainConfig(batch_size=B, seq_len=T, max_steps=10, skip_norm_z=2.5)
    model = _make_model("cpu")
    norm_det = OutlierDetector(window=8)
    for v in (0.1, 0.11, 0.09, 0.1, 0.1, 0.11, 0.09, 0.1):
        norm_det.update(v)
    before = model.params.copy()
    r = train_step(model, DataLoader(shard, B, T), 0, cfg, 1, None, norm_det)
    assert r.norm > 1.0  # a fresh model's norm (about 2) is far above the window's 0.1
    assert r.skipped and "grad norm z-score" in r.skipped
    assert np.array_equal(model.params, before)
    # the same step with the detector off updates the parameters
    r = train_step(model, DataLoader(shard, B, T), 0, cfg, 1, None, None)
    assert r.skipped is None and not np.array_equal(model.params, before)
