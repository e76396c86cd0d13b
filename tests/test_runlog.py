"""main.jsonl (llmcu.runlog), the progress indicator and `llmcu plot`."""

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import formats, runlog
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import init_parameters
from llmcu.progress import Progress
from llmcu.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=1, num_heads=2, channels=16)
TRAIN_KEYS = {"step", "train_loss", "lr", "grad_norm", "ms", "tokens_per_s", "mfu", "skipped"}


def llmcu(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llmcu", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"llmcu {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def tiny(tmp_path):
    """(model .bin, token shard) small enough for a training run in a second."""
    rng = np.random.default_rng(0)
    shard = tmp_path / "tokens.bin"
    formats.write_shard(shard, rng.integers(0, TINY.vocab_size, size=2000))
    model = tmp_path / "tiny.bin"
    formats.write_model(model, TINY, init_parameters(TINY, seed=7))
    return model, shard


def _cfg(tiny, out_dir, **kw):
    model, shard = tiny
    base = dict(train_pattern=str(shard), val_pattern=str(shard), model=str(model),
                output_dir=str(out_dir), batch_size=2, seq_len=8, learning_rate=1e-2,
                max_steps=6, val_every=2, val_batches=2, sample_every=0, gen_tokens=0,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "main.jsonl").read_text().splitlines()]


def test_jsonl_has_one_record_per_step_and_eval(tiny, tmp_path):
    out = tmp_path / "run"
    history = train(_cfg(tiny, out), log=lambda s: None)
    recs = _records(out)
    steps = [r for r in recs if "train_loss" in r]
    vals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(6))
    assert all(set(r) == TRAIN_KEYS for r in steps), steps[0]
    assert [r["train_loss"] for r in steps] == pytest.approx(history["train"])
    assert [r["lr"] for r in steps] == pytest.approx(history["lr"])
    assert all(r["grad_norm"] > 0 and r["ms"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert all(r["mfu"] is None and r["skipped"] is None for r in steps)  # CPU: no known peak
    assert [(r["step"], r["val_loss"]) for r in vals] == [(s, pytest.approx(v))
                                                          for s, v in history["val"]]
    assert [r["step"] for r in vals] == [0, 2, 4, 6]
    assert all(set(r) == {"step", "val_loss"} for r in vals)
    # the reader used by plot gives the same series
    assert runlog.series(runlog.read_runlog(out), "val_loss")[0] == [0, 2, 4, 6]


def test_jsonl_is_truncated_on_a_fresh_run_and_appended_on_resume(tiny, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny, out, max_steps=4, checkpoint_every=2), log=lambda s: None)
    assert len([r for r in _records(out) if "train_loss" in r]) == 4
    train(_cfg(tiny, out, max_steps=6, checkpoint_every=2, resume=1), log=lambda s: None)
    recs = _records(out)
    assert [r["step"] for r in recs if "train_loss" in r] == [0, 1, 2, 3, 4, 5]
    train(_cfg(tiny, out, max_steps=2), log=lambda s: None)  # a fresh run starts the file anew
    assert [r["step"] for r in _records(out) if "train_loss" in r] == [0, 1]


def test_series_keeps_the_later_record_of_a_repeated_step():
    recs = [{"step": 0, "val_loss": 5.0}, {"step": 1, "train_loss": 4.0},
            {"step": 1, "train_loss": 3.0}, {"step": 2, "val_loss": None}]
    assert runlog.series(recs, "train_loss") == ([1], [3.0])
    assert runlog.series(recs, "val_loss") == ([0], [5.0])


def test_runlog_writes_nan_as_null(tmp_path):
    log = runlog.RunLog(str(tmp_path))
    log.train_step(0, float("nan"), 1e-3, float("inf"), 1.0, 2.0)
    log.close()
    rec = runlog.read_runlog(tmp_path)[0]
    assert rec["train_loss"] is None and rec["grad_norm"] is None


def test_progress_degrades_to_plain_lines_when_not_a_terminal():
    buf = io.StringIO()  # isatty() is False
    bar = Progress(1000, "tokenizing", unit="docs", stream=buf, every_s=0.0)
    for _ in range(4):
        bar.update(250)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 5 and all(line.startswith("tokenizing: ") for line in lines)
    assert "1,000/1,000 docs" in lines[-1] and "100.0%" in lines[-1]


def test_progress_is_quiet_between_plain_lines_and_goes_through_log():
    lines = []
    with Progress(10, "work", log=lines.append, every_s=3600) as bar:
        for _ in range(10):
            bar.update()
    assert len(lines) == 1 and "10/10" in lines[0]  # only the final line


def test_progress_redraws_one_line_on_a_terminal():
    buf = io.StringIO()
    bar = Progress(100, "work", stream=buf, tty=True)
    bar._last = -1e9
    bar.update(50)
    bar.update(50)
    bar.close()
    text = buf.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 3
    assert "50/100" in text and "100/100" in text.rsplit("\r", 1)[-1]


def test_prepare_logs_tokenizing_progress_through_its_log(tmp_path):
    from llmcu import data
    text = "\n\n".join(f"Section {i}:\nSome words here." for i in range(20000))
    (tmp_path / "input.txt").write_text(text)
    lines = []
    data.prepare_tinyshakespeare(tmp_path / "out", input_path=tmp_path / "input.txt",
                                 log=lines.append)
    prog = [line for line in lines if line.startswith("tokenizing tinyshakespeare: ")]
    assert prog and "20,000/20,000 docs" in prog[-1], lines


def _png_size(path):
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_plot_cli_writes_a_png_of_two_runs(tiny, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    train(_cfg(tiny, a), log=lambda s: None)
    train(_cfg(tiny, b, learning_rate=3e-3, lr_schedule="cosine", warmup_iters=2),
          log=lambda s: None)
    png = tmp_path / "plots" / "loss.png"
    r = llmcu("plot", a, b, "--out", png)
    assert f"wrote {png}" in r.stdout
    width, height = _png_size(png)
    assert width >= 400 and height >= 300
    assert png.stat().st_size > 10_000


def test_plot_without_jsonl_names_the_dir_and_the_command(tmp_path):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    r = llmcu("plot", empty, "--out", tmp_path / "x.png", check=False)
    assert r.returncode == 2
    assert str(empty) in r.stderr and "main.jsonl" in r.stderr and "llmcu train -o" in r.stderr
    assert not (tmp_path / "x.png").exists()
