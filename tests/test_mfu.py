"""The training log's MFU column (llmcu/mfu.py): llm.c's formula against the card's dense
bf16 peak, looked up by the CUDA device name; and its place in the step line."""

import re

import numpy as np
import pytest

from llmcu import formats, mfu
from llmcu.config import GPT2Config, TrainConfig, gpt2_config


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.05), ("NVIDIA GeForce RTX 4090", 165.2),
    ("Tesla V100-SXM2-16GB", None), ("NVIDIA GeForce RTX 3090", None),
])
def test_bf16_peaks_by_device_name(name, peak):
    assert mfu.bf16_peak_tflops(name) == peak


def test_mfu_is_llmc_formula_over_the_peak():
    """d12 at B=16, T=1024 in 36.52 ms on a 989 TFLOP/s card: GPU pass 3's graph row in
    benchmarks/RESULTS.md reports 36.4% from the same formula (its bench script's arithmetic)."""
    cfg = gpt2_config("d12")
    tokens = 16 * 1024
    flops = 6 * cfg.num_parameters() + 6 * 12 * 768 * 1024
    assert cfg.flops_per_token(1024) == flops
    got = mfu.mfu(flops, tokens, 36.52e-3, 989.0)
    assert got == pytest.approx(flops * tokens / 36.52e-3 / 989e12)
    assert round(100 * got, 1) == 36.4
    with pytest.raises(ValueError, match="must be > 0"):
        mfu.mfu(flops, tokens, 0.0, 989.0)


def test_step_lines_carry_mfu_where_a_peak_is_known(shared_dir, tmp_path, monkeypatch):
    """The step line gets llm.c's 'N% bf16 MFU' column, computed from that line's own time
    and tokens, when mfu_peak gives a peak (bf16 on a known GPU; a stand-in peak here on
    the emulator), and none without one (the CPU log is unchanged)."""
    from llmcu import train as train_mod
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.data import prepare_tinyshakespeare
    data = tmp_path / "data"
    prepare_tinyshakespeare(str(data), input_path=str(shared_dir / "datasets/tinyshakespeare/input.txt"))
    cfg = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=32)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, cfg, init_parameters(cfg, seed=3))
    run = dict(model=str(path), train_pattern=str(data / "tiny_shakespeare_train.bin"), val_pattern="",
               batch_size=2, seq_len=8, max_steps=2, sample_every=0, val_every=0, device="emu",
               dtype="bf16")
    step_re = re.compile(r"^step +\d+/2 \| .* \| ([\d.]+) ms \| (?:([\d.]+)% bf16 MFU \| )?(\d+) tok/s$")
    lines = []
    train_mod.train(TrainConfig(**run), log=lines.append)
    steps = [m for m in map(step_re.match, lines) if m]
    assert len(steps) == 2 and all(m.group(2) is None for m in steps), lines
    assert not any(line.startswith("MFU:") for line in lines)

    peak = 1e-4  # TFLOP/s: a stand-in so the tiny model's MFU is a readable number
    monkeypatch.setattr(train_mod, "mfu_peak", lambda device, dtype, log: peak)
    lines = []
    train_mod.train(TrainConfig(**run), log=lines.append)
    steps = [m for m in map(step_re.match, lines) if m]
    assert len(steps) == 2, lines
    for m in steps:
        ms, util = float(m.group(1)), float(m.group(2))
        want = 100 * cfg.flops_per_token(8) * 2 * 8 / (ms / 1000) / (peak * 1e12)
        np.testing.assert_allclose(util, want, rtol=0.01, atol=0.06)  # both rounded in the line


def test_mfu_peak_only_for_bf16_on_a_gpu(monkeypatch):
    from llmcu import train as train_mod
    lines = []
    assert train_mod.mfu_peak("emu", "bf16", lines.append) is None
    assert train_mod.mfu_peak("cuda", "fp32", lines.append) is None
    assert lines == []
    monkeypatch.setattr(train_mod, "device_name", lambda: "NVIDIA H200")
    assert train_mod.mfu_peak("cuda", "bf16", lines.append) == 989.4
    monkeypatch.setattr(train_mod, "device_name", lambda: "Tesla V100-SXM2-16GB")
    assert train_mod.mfu_peak("cuda", "bf16", lines.append) is None
    assert lines == ["MFU: llm.c's formula (6N + 6LCT flops per token) against NVIDIA H200's dense bf16 "
                     "peak, 989.4 TFLOP/s",
                     "MFU: no dense bf16 peak known for Tesla V100-SXM2-16GB (llmcu/mfu.py); the step "
                     "lines leave it out"]
