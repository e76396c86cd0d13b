"""Checkpoint and resume (-n, -nk, -y): exact continuation, crash safety, clear errors."""

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from llmcu import checkpoint, formats
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import init_parameters
from llmcu.train import train

ROOT = Path(__file__).resolve().parents[1]
# the real vocabulary, so sampling during training decodes; tiny everywhere else
TINY = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, channels=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_data")
    rng = np.random.default_rng(0)
    # few distinct ids, so the tiny model learns something and losses move
    formats.write_shard(d / "train.bin", rng.integers(0, 300, size=3000))
    formats.write_shard(d / "val.bin", rng.integers(0, 300, size=600))
    formats.write_model(d / "tiny.bin", TINY, init_parameters(TINY, seed=7))
    other = replace(TINY, channels=32, padded_vocab_size=0)
    formats.write_model(d / "other.bin", other, init_parameters(other, seed=7))
    return d


def _cfg(files, out, **kw):
    base = dict(train_pattern=str(files / "train.bin"), val_pattern=str(files / "val.bin"),
                model=str(files / "tiny.bin"), output_dir=str(out), batch_size=2, seq_len=8,
                learning_rate=3e-3, max_steps=20, val_every=5, val_batches=2, sample_every=4,
                gen_tokens=6, lr_schedule="cosine", warmup_iters=2, final_lr_frac=0.1,
                weight_decay=0.1)
    base.update(kw)
    return TrainConfig(**base)


# Training runs go to a subprocess with one BLAS thread: with the 50257-row vocabulary the
# multi-threaded OpenBLAS matmuls crawl on a loaded machine (10 steps measured 18 s against
# 0.7 s single-threaded on 2 busy cores). JSON round-trips floats exactly (repr).
_RUNNER = """
import json, sys
from llmcu import train as t
from llmcu.config import TrainConfig
a = json.loads(sys.stdin.read())
if a["window"]:
    Detector = t.OutlierDetector
    t.OutlierDetector = lambda: Detector(window=a["window"])
lines = []
history = t.train(TrainConfig(**a["cfg"]), log=lines.append)
print("@@" + json.dumps({"history": history, "lines": lines}))
"""
_ENV = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1")


def _run(cfg, window=0):
    """train(cfg) in a subprocess: (history, sampled texts, log lines)."""
    r = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(
        {"cfg": asdict(cfg), "window": window}), env=_ENV, capture_output=True, text=True,
        timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.rsplit("@@", 1)[1])
    lines = out["lines"]
    samples = [lines[i + 1] for i, s in enumerate(lines) if s.startswith("generating")]
    return out["history"], samples, lines


def _params(path):
    return formats.read_model(path)[1]


def test_resume_is_bit_identical(files, tmp_path):
    """20 steps straight == 10 steps, stop, resume, 10 more: losses, samples, skips, params."""
    # constant lr: the first half's -x 10 would otherwise give it another schedule
    # (a cosine schedule resumed mid-run is covered by the kill test below)
    # outlier windows of 12 steps (llm.c's 128 would not fill in 20): at step 20 they still
    # reach back before the resume at 10, so the state-file comparison below sees them.
    # (The skip threshold is on, but this falling loss never trips it: no skip is asserted.)
    kw = dict(skip_loss_z=1.0, lr_schedule="constant", checkpoint_every=5)
    straight, s_samples, _ = _run(_cfg(files, tmp_path / "a", **kw), window=12)
    first, f_samples, _ = _run(_cfg(files, tmp_path / "b", max_steps=10, **kw), window=12)
    second, r_samples, lines = _run(_cfg(files, tmp_path / "b", resume=1, **kw), window=12)
    assert any("resuming from step 10" in s for s in lines)
    assert len(second["train"]) == 10
    assert first["train"] + second["train"] == straight["train"]  # exact float equality
    assert first["lr"] + second["lr"] == straight["lr"]
    assert sorted(set(first["skipped"] + second["skipped"])) == straight["skipped"]
    # val at 0, 5, 10 then 15, 20: the checkpoint at 10 is written after its eval, which the
    # resumed run does not redo
    assert [s for s, _ in first["val"]] == [0, 5, 10] and [s for s, _ in second["val"]] == [15, 20]
    assert first["val"] + second["val"] == straight["val"]
    # samples at 4, 8 and 10 (only because it is the first run's last step: the checkpoint
    # at 10 is written before it) then 12, 16, 20: the RNG continues as in the straight run
    assert len(f_samples) == 3 and f_samples[:2] + r_samples == s_samples
    assert len(set(s_samples)) > 1, s_samples
    assert np.array_equal(_params(tmp_path / "b" / "model_00000020.bin"),
                          _params(tmp_path / "a" / "model_00000020.bin"))
    # and the whole state at step 20 (AdamW moments, loader, outlier windows, RNG) is the same
    state = "state_00000020_00000.bin"
    assert (tmp_path / "b" / state).read_bytes() == (tmp_path / "a" / state).read_bytes()


def test_killed_mid_write_leaves_previous_checkpoint_usable(files, tmp_path):
    """SIGKILL while the state file of step 6 is half-written (LLMCU_TEST_CRASH_IN_CHECKPOINT):
    step 4 stays complete, step 6 is ignored, and resuming from 4 reproduces the straight run."""
    out = tmp_path / "run"
    args = ["train", "-i", files / "train.bin", "-j", files / "val.bin", "-e", files / "tiny.bin",
            "-o", out, "-b", 2, "-t", 8, "-l", 3e-3, "-x", 12, "-v", 5, "-m", 2, "-s", 4, "-g", 6,
            "-k", "cosine", "-u", 2, "-q", 0.1, "-c", 0.1, "-n", 2, "--device", "cpu"]
    env = dict(_ENV, **{checkpoint.CRASH_ENV: "6"})
    cmd = [sys.executable, "-m", "llmcu", *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if hasattr(signal, "SIGKILL"):
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr)
    else:
        assert r.returncode != 0
    names = sorted(os.listdir(out))
    assert checkpoint.complete_steps(str(out)) == [2, 4], names
    assert "model_00000006.bin" in names and "state_00000006_00000.bin" not in names
    assert any(re.fullmatch(r"state_00000006_00000\.bin\.tmp\..+", n) for n in names), names
    # the previous checkpoint reads back whole
    step, config, params, state = checkpoint.load_latest(str(out), str(files / "tiny.bin"))
    assert (step, config, state.step) == (4, TINY, 4)

    env.pop(checkpoint.CRASH_ENV)
    r = subprocess.run(cmd + ["-y", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from step 4" in r.stdout
    assert "removed incomplete checkpoint 6 (no DONE marker): model_00000006.bin" in r.stdout
    straight, _, lines = _run(_cfg(files, tmp_path / "straight", max_steps=12))
    resumed_losses = re.findall(r"step\s+\d+/12 \| train loss (\S+)", r.stdout)
    assert resumed_losses == [f"{x:.6f}" for x in straight["train"][4:]]
    assert np.array_equal(_params(out / "model_00000012.bin"),
                          _params(tmp_path / "straight" / "model_00000012.bin"))
    assert checkpoint.complete_steps(str(out)) == [2, 4, 6, 8, 10, 12]


def test_keep_last_k(files, tmp_path):
    out = tmp_path / "k"
    _run(_cfg(files, out, max_steps=10, checkpoint_every=2, checkpoint_keep=2, sample_every=0))
    assert checkpoint.complete_steps(str(out)) == [8, 10]
    left = sorted(n for n in os.listdir(out) if n not in ("main.log", "main.jsonl"))
    assert left == ["DONE_00000008", "DONE_00000010", "model_00000008.bin", "model_00000010.bin",
                    "state_00000008_00000.bin", "state_00000010_00000.bin"]


def test_resume_without_a_complete_checkpoint_is_a_clear_error(files, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "model_00000004.bin").write_bytes(b"partial")  # no DONE marker
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*empty: expected DONE_%08d"
                                         r".*found model_00000004\.bin"):
        train(_cfg(files, out, resume=1), log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "llmcu", "train", "-i", str(files / "train.bin"),
                        "-e", str(files / "tiny.bin"), "-o", str(tmp_path / "none"), "-y", "1"],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "no complete checkpoint in" in r.stderr, r.stderr


def test_checkpoint_from_another_model_size_is_a_clear_error(files, tmp_path):
    out = tmp_path / "o"
    _run(_cfg(files, out, max_steps=2, checkpoint_every=2, sample_every=0, val_every=0))
    with pytest.raises(ValueError, match=r"model_00000002\.bin is another model: it holds "
                                         r"GPT2Config\(.*channels=16.*-e .*other\.bin asks for "
                                         r"GPT2Config\(.*channels=32"):
        train(_cfg(files, out, model=str(files / "other.bin"), resume=1), log=lambda s: None)
    with pytest.raises(ValueError, match=r"another model: .*-e d6 asks for .*num_layers=6"):
        train(_cfg(files, out, model="d6", resume=1), log=lambda s: None)


def test_state_file_layout_and_errors(files, tmp_path):
    """llm.c's header fields where llm.c has them; truncation is caught."""
    out = tmp_path / "s"
    _run(_cfg(files, out, max_steps=3, checkpoint_every=3, sample_every=2, val_every=0))
    path = out / "state_00000003_00000.bin"
    h = np.fromfile(path, dtype="<i4", count=256)
    assert list(h[:6]) == [20240527, 1, 1, 0, 0, 0] and h[10] == 3
    assert h.view("<u8")[15:17].tolist() == [0, 2]  # shard 0, last batch served: index 2
    N = TINY.num_parameters()
    st = formats.read_train_state(path, N)
    assert st.rng_state["bit_generator"] == "PCG64" and (st.B, st.T) == (2, 8)
    assert len(st.loss_window) == 3 and np.any(st.m != 0) and np.all(st.v >= 0)
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-5])
    with pytest.raises(formats.FormatError, match="truncated"):
        formats.read_train_state(tmp_path / "cut.bin", N)
    with pytest.raises(formats.FormatError, match="state for .* parameters, expected"):
        formats.read_train_state(path, N + 1)


def test_resume_on_emu_matches(files, tmp_path):
    """The kernel model's optimizer state round-trips too: 3 steps vs 2 + resume + 1 on emu."""
    kw = dict(device="emu", max_steps=3, sample_every=0, val_every=0, lr_schedule="constant")
    straight, _, _ = _run(_cfg(files, tmp_path / "a", **kw))
    first, _, _ = _run(_cfg(files, tmp_path / "b", checkpoint_every=2, **{**kw, "max_steps": 2}))
    second, _, _ = _run(_cfg(files, tmp_path / "b", checkpoint_every=2, resume=1, **kw))
    assert first["train"] + second["train"] == straight["train"]
    assert np.array_equal(_params(tmp_path / "b" / "model_00000003.bin"),
                          _params(tmp_path / "a" / "model_00000003.bin"))


def test_train_help_lists_checkpoint_flags():
    r = subprocess.run([sys.executable, "-m", "llmcu", "train", "--help"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    for flag in ("-n", "-nk", "-y"):
        assert re.search(rf"^\s+{flag} ", r.stdout, re.M), r.stdout


def _train_records(out):
    """main.jsonl's train records without the timings: what a resumed run must reproduce."""
    rows = [json.loads(ln) for ln in (out / "main.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "train_loss", "lr", "grad_norm", "skipped")}
            for r in rows if "train_loss" in r], [r for r in rows if "val_loss" in r]


def test_resume_falls_back_past_a_damaged_checkpoint(files, tmp_path):
    """The newest state file truncated: -y 1 says so, resumes from the one before, and the
    run ends where an uninterrupted one does, with main.jsonl holding each step once."""
    kw = dict(lr_schedule="constant", checkpoint_every=2, sample_every=0)
    _run(_cfg(files, tmp_path / "a", max_steps=10, **kw))
    b = tmp_path / "b"
    _run(_cfg(files, b, max_steps=8, **kw))
    state = b / "state_00000008_00000.bin"
    state.write_bytes(state.read_bytes()[:-100])
    _, _, lines = _run(_cfg(files, b, max_steps=10, resume=1, **kw))
    assert any(s.startswith("-y 1: skipping checkpoint 8: ") and "truncated" in s for s in lines), lines
    assert any("resuming from step 6" in s for s in lines), lines
    assert np.array_equal(_params(b / "model_00000010.bin"), _params(tmp_path / "a" / "model_00000010.bin"))
    assert _train_records(b) == _train_records(tmp_path / "a")
    assert [r["step"] for r in _train_records(b)[1]] == [0, 5, 10]
    assert (tmp_path / "a" / "main.log").read_text().split("\n")[:-1] == \
        (b / "main.log").read_text().split("\n")[:-1]


def test_resume_error_when_no_checkpoint_is_usable_names_each_cause(files, tmp_path):
    out = tmp_path / "o"
    _run(_cfg(files, out, max_steps=4, checkpoint_every=2, sample_every=0, val_every=0))
    for step in (2, 4):
        path = out / f"state_{step:08d}_00000.bin"
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError) as e:
        train(_cfg(files, out, resume=1), log=lambda s: None)
    msg = str(e.value)
    assert "step 4: " in msg and "step 2: " in msg and "truncated" in msg, msg
    assert "cannot be repaired" in msg and "number of processes" not in msg, msg


_SIGNAL_ARGS = ["-b", 2, "-t", 8, "-l", 3e-3, "-v", 5, "-m", 2, "-s", 4, "-g", 6, "-k", "constant",
                "-c", 0.1, "-n", 3, "--device", "cpu"]


def _cmd(files, out, steps, *extra):
    args = ["train", "-i", files / "train.bin", "-j", files / "val.bin", "-e", files / "tiny.bin",
            "-o", out, "-x", steps, *_SIGNAL_ARGS, *extra]
    return [sys.executable, "-m", "llmcu", *map(str, args)]


def _no_orphans(out):
    names = os.listdir(out)
    done = set(checkpoint.complete_steps(str(out)))
    for n in names:
        m = re.fullmatch(r"(?:model_(\d{8})\.bin|state_(\d{8})_\d{5}\.bin)", n)
        assert ".tmp." not in n, names
        assert not m or int(m.group(1) or m.group(2)) in done, names


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
def test_sigint_during_a_step_stops_cleanly_and_resumes(files, tmp_path):
    """Ctrl-C mid-run: exit 130, one line saying where it stopped, no orphan; -y 1 then ends
    with the model of an uninterrupted run."""
    steps, sparse = 80, ("-n", 25, "-v", 20, "-s", 0)  # few checkpoints: each is ~20 MB
    straight = tmp_path / "straight"
    r = subprocess.run(_cmd(files, straight, steps, *sparse), env=_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    p = subprocess.Popen(_cmd(files, out, steps, *sparse), env=_ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step   30/"):
            p.send_signal(signal.SIGINT)
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    m = re.search(r"interrupted \(SIGINT\) at step (\d+)/80; wrote a checkpoint at step (\d+)", err)
    assert m and 30 <= int(m.group(1)) < steps and m.group(1) == m.group(2), err
    _no_orphans(out)
    r = subprocess.run(_cmd(files, out, steps, *sparse, "-y", 1), env=_ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_params(out / f"model_{steps:08d}.bin"), _params(straight / f"model_{steps:08d}.bin"))
    assert _train_records(out) == _train_records(straight)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("times", [1, 2])
def test_sigint_during_a_checkpoint_write(files, tmp_path, times):
    """One Ctrl-C half-way through the checkpoint at 6: it completes, and the run stops at the
    top of the next step with that checkpoint the newest. Two: the second stops the write at
    once, the half-written checkpoint is taken back, and 3 is the newest. Either way -y 1
    ends with the uninterrupted run's model."""
    straight = tmp_path / "straight"
    r = subprocess.run(_cmd(files, straight, 9), env=_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    env = dict(_ENV, **{checkpoint.SIGINT_ENV: f"6:{times}"})
    r = subprocess.run(_cmd(files, out, 9), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    _no_orphans(out)
    if times == 1:
        assert checkpoint.complete_steps(str(out)) == [3, 6]
        assert "interrupted (SIGINT) at step 6/9" in r.stderr and "model_00000006.bin" in r.stderr
    else:
        assert checkpoint.complete_steps(str(out)) == [3]
        assert r.stderr.strip() == "llmcu train: interrupted"
    r = subprocess.run(_cmd(files, out, 9, "-y", 1), env=_ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(_params(out / "model_00000009.bin"), _params(straight / "model_00000009.bin"))
    assert _train_records(out) == _train_records(straight)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_exits_143_with_one_line(files, tmp_path):
    """SIGTERM (a scheduler's stop) goes the same way as Ctrl-C, with 128 + 15."""
    out = tmp_path / "run"
    p = subprocess.Popen(_cmd(files, out, 80, "-n", 25, "-v", 0, "-s", 0), env=_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step    5/"):
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, (p.returncode, err)
    assert re.fullmatch(r"llmcu train: interrupted \(SIGTERM\) at step \d+/80; wrote a checkpoint at "
                        r"step \d+; last complete checkpoint: \S+; resume with -y 1\n", err), err
    _no_orphans(out)
