"""scripts/train_gpt2.py end to end, on a tiny model: llm.c's test_gpt2 flow.

The script writes the model file and the debug state; the files read back with
llmcu.formats must hold the initial parameters, and the debug state's logits,
loss and gradients must be what llmcu's NumPy GPT-2 computes on the same batch
(the check test_gpt2.c makes against train_gpt2.py's files). The losses the
script prints must be those of the NumPy model overfitting the same batch.

Measured (L=2, NH=4, C=32, V=101, B=2, T=16, lr 1e-3): logits 1.2e-07, loss
1.2e-07, grads <= 6.4e-07 of each tensor's largest, 5-step losses <= 9.3e-07
(printed with 6 decimals, so 5e-07 of that is rounding); the tolerances below
are about 10x that.
"""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from llmcu.config import GPT2Config, parameter_views  # noqa: E402
from llmcu.cpu.gpt2 import GPT2, init_parameters  # noqa: E402
from llmcu.formats import read_debug_state, read_model, write_shard  # noqa: E402
from llmcu import torch_gpt2  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_gpt2.py"
CONFIG = GPT2Config(max_seq_len=32, vocab_size=101, num_layers=2, num_heads=4, channels=32)
B, T, STEPS, LR, SEED = 2, 16, 5, 1e-3, 42
NAME = "gpt2_L2_NH4_C32_V101"
TOL = {"logits": 2e-6, "loss": 2e-6, "grads": 6e-6, "losses": 1e-5}


def run_script(out_dir, input_bin):
    cmd = [sys.executable, str(SCRIPT), "--model", "d12", "--layers", "2", "--heads", "4",
           "--channels", "32", "--vocab-size", "101", "--max-seq-len", "32",
           "--batch-size", str(B), "--seq-len", str(T), "--steps", str(STEPS), "--lr", str(LR),
           "--seed", str(SEED), "--input-bin", str(input_bin), "--output-dir", str(out_dir),
           "--no-tokenizer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("source", ["shard", "random"])
def test_script_files_match_numpy_model(tmp_path, source, capsys):
    tokens = np.random.default_rng(5).integers(0, CONFIG.vocab_size, size=B * T + 40)
    shard = tmp_path / "tokens.bin"
    if source == "shard":
        write_shard(shard, tokens)
    stdout = run_script(tmp_path / "out", shard)
    if source == "random":
        assert "using random tokens" in stdout

    # the model file holds the initial parameters, exactly
    config, params = read_model(tmp_path / "out" / f"{NAME}.bin")
    assert config == CONFIG
    initial = init_parameters(CONFIG, SEED)
    np.testing.assert_array_equal(params, initial)
    np.testing.assert_array_equal(params, torch_gpt2.to_flat(torch_gpt2.from_flat(CONFIG, initial)))

    # the debug state: the batch, and what the NumPy model computes on it
    state = read_debug_state(tmp_path / "out" / f"{NAME}_debug_state.bin", config)
    if source == "shard":
        np.testing.assert_array_equal(state.x, tokens[:B * T].reshape(B, T))
        np.testing.assert_array_equal(state.y, tokens[1:B * T + 1].reshape(B, T))
    else:
        assert state.x.shape == (B, T) and 0 <= state.x.min() and state.x.max() < CONFIG.vocab_size
        np.testing.assert_array_equal(state.x[:, 1:], state.y[:, :-1])
    model = GPT2(config, params.copy())
    loss = model.forward(state.x, state.y)
    model.zero_grad()
    model.backward()
    V = config.vocab_size
    d_logits = float(np.abs(state.logits - model.acts.logits[..., :V]).max())
    d_loss = abs(state.loss - loss)
    g_ref, g_ours = parameter_views(config, state.grads), model.g
    d_grads = {n: float(np.abs(g_ref[n] - g_ours[n]).max() / np.abs(g_ours[n]).max()) for n in g_ours}
    assert not g_ref["wte"][V:].any(), "padded wte rows must get zero gradient"

    # the printed losses: the NumPy model overfitting the same batch
    printed = [float(v) for v in re.findall(r"^step \d+: loss ([-\d.]+) \(took [\d.]+ ms\)$",
                                            stdout, flags=re.M)]
    assert len(printed) == STEPS, stdout
    numpy_losses = []
    for step in range(STEPS):
        numpy_losses.append(model.forward(state.x, state.y))
        model.zero_grad()
        model.backward()
        model.update(LR, step + 1)
    d_losses = float(np.abs(np.array(printed) - numpy_losses).max())

    summary = (f"script ({source}) vs NumPy: logits {d_logits:.2e}, loss {d_loss:.2e}, "
               f"grads (max rel) {max(d_grads.values()):.2e}, {STEPS}-step losses {d_losses:.2e}")
    with capsys.disabled():
        print("\n" + summary)
    assert d_logits <= TOL["logits"], summary
    assert d_loss <= TOL["loss"], summary
    bad = {n: r for n, r in d_grads.items() if r > TOL["grads"]}
    assert not bad, f"gradients off: {bad}\n{summary}"
    assert d_losses <= TOL["losses"], summary


def test_script_loads_hf_checkpoint(tmp_path):
    from test_hf_checkpoint import hf_state_dict, write_checkpoint
    state = hf_state_dict(4)
    ckpt = write_checkpoint(tmp_path / "tiny-hf", state, "bin")
    cmd = [sys.executable, str(SCRIPT), "--hf-dir", str(ckpt), "--batch-size", "2", "--seq-len", "8",
           "--steps", "1", "--input-bin", str(tmp_path / "none.bin"), "--output-dir",
           str(tmp_path / "out"), "--no-tokenizer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config, params = read_model(tmp_path / "out" / "gpt2_tiny-hf.bin")
    np.testing.assert_array_equal(params, torch_gpt2.hf_to_flat(config, state))
    assert read_debug_state(tmp_path / "out" / "gpt2_tiny-hf_debug_state.bin", config).x.shape == (2, 8)


def test_script_rejects_too_long_sequences(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--layers", "1", "--heads", "1", "--channels", "8",
           "--vocab-size", "50", "--max-seq-len", "8", "--seq-len", "9", "--output-dir",
           str(tmp_path), "--no-tokenizer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "exceeds the model's max_seq_len" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_script_writes_into_out_reference_by_default(tmp_path):
    """Issue 22: without --output-dir the files (about 1 GB at d12) go to
    out/reference under the working directory, which .gitignore covers, not
    into the working directory itself; --help says so."""
    cmd = [sys.executable, str(SCRIPT), "--layers", "1", "--heads", "1", "--channels", "8",
           "--vocab-size", "50", "--max-seq-len", "8", "--batch-size", "1", "--seq-len", "4",
           "--steps", "1", "--input-bin", str(tmp_path / "none.bin"), "--no-tokenizer"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    written = sorted(p.name for p in (tmp_path / "out" / "reference").iterdir())
    assert written == ["gpt2_L1_NH1_C8_V50.bin", "gpt2_L1_NH1_C8_V50_debug_state.bin"]
    help_text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    assert "out/reference" in " ".join(help_text.split())
    # the default is git-ignored in the repository
    root = SCRIPT.parents[1]
    if (root / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "out/reference/gpt2_d12.bin"],
                                 cwd=root, timeout=60)
        assert ignored.returncode == 0, ".gitignore does not cover out/reference"
