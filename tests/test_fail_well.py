"""Runs that fail well: bad numbers and unwritable outputs are one line and exit code 2
before any work, a NaN stops training before it reaches a file, and the directories a
command was pointed at are left as they were."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import write_tiny_run
from llmcu import checkpoint, formats
from llmcu.cli import main
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import GPT2, init_parameters
from llmcu.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
TINY = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=16)


def run_main(args, capsys):
    """main(args) in this process: (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles, want=2):
    assert code == want, (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, (n, err)


@pytest.mark.parametrize("args, flag, given", [
    (["train", "-l", "nan"], "-l/--learning-rate", "nan"),
    (["train", "-l", "inf"], "-l/--learning-rate", "inf"),
    (["train", "-l", "-0.001"], "-l/--learning-rate", "-0.001"),
    (["train", "-c", "nan"], "-c/--weight-decay", "nan"),
    (["train", "-b", "0"], "-b/--batch-size", "0"),
    (["train", "-t", "-64"], "-t/--seq-len", "-64"),
    (["train", "-x", "0"], "-x/--max-steps", "0"),
    (["train", "-x", "1.5"], "-x/--max-steps", "'1.5'"),
    (["train", "-d", "0"], "-d/--total-batch-size", "0"),
    (["train", "-q", "1.5"], "-q/--final-lr-frac", "1.5"),
    (["train", "--grad-clip", "-1"], "--grad-clip", "-1"),
    (["train", "-sl", "nan"], "-sl/--skip-loss-z", "nan"),
    (["train", "-m", "0"], "-m/--val-batches", "0"),
    (["train", "--seed", "-1"], "--seed", "-1"),
    (["sample", "-e", "d6", "--temperature", "nan"], "--temperature", "nan"),
    (["sample", "-e", "d6", "--temperature", "-1"], "--temperature", "-1"),
    (["sample", "-e", "d6", "--top-k", "0"], "--top-k", "0"),
])
def test_bad_numbers_are_one_line_at_parse_time(args, flag, given, capsys):
    code, out, err = run_main(args, capsys)
    one_line_error(code, err, flag, f"got {given}")
    assert out == ""


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"llmcu {__import__('llmcu').__version__}"


@pytest.fixture
def place(tmp_path):
    """A directory holding a regular file, for paths that run into it."""
    (tmp_path / "afile").write_text("not a directory")
    return tmp_path


@pytest.mark.parametrize("make_args, needles", [
    # train -o: checked before the model is built or the data read (the data here is missing)
    (lambda p: ["train", "-i", p / "none.bin", "-e", "d6", "-o", p / "afile"],
     ["-o", "afile", "is a file"]),
    (lambda p: ["train", "-i", p / "none.bin", "-e", "d6", "-o", p / "afile" / "run"],
     ["-o", "afile/run", "cannot write there", "Not a directory"]),
    (lambda p: ["tokenizer", "--out", p], ["--out", "is a directory"]),
    (lambda p: ["tokenizer", "--out", p / "afile" / "tok.bin"], ["--out", "afile/tok.bin"]),
    (lambda p: ["plot", p, "--out", p / "afile" / "loss.png"], ["--out", "afile/loss.png"]),
    (lambda p: ["convert", "--from-hf", p / "no-such-checkpoint", "--out", p / "afile" / "m.bin"],
     ["--out", "afile/m.bin"]),
    (lambda p: ["convert", "--to-hf", p / "afile", "--model", p / "m.bin"], ["--to-hf", "is a file"]),
    (lambda p: ["prepare", "tinyshakespeare", "--input", p / "in.txt", "--out-dir", p / "afile"],
     ["--out-dir", "is a file"]),
])
def test_unwritable_outputs_fail_first_naming_the_path(place, make_args, needles, capsys):
    before = sorted(os.listdir(place))
    code, out, err = run_main(make_args(place), capsys)
    one_line_error(code, err, *needles)
    assert ".tmp." not in err and "[GPT-2]" not in out
    assert sorted(os.listdir(place)) == before  # no probe, no temporary file, no new directory


def test_a_missing_output_dir_is_created_by_the_run_not_by_a_failed_check(place, capsys):
    # the data is missing: the run fails after the -o check, which leaves no directory behind
    code, _, err = run_main(["train", "-i", place / "none.bin", "-e", "d6", "-o",
                             place / "new" / "run"], capsys)
    one_line_error(code, err, "none.bin")
    assert not (place / "new").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_output_dir(place, capsys):
    ro = place / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_main(["tokenizer", "--out", ro / "tok.bin"], capsys)
        one_line_error(code, err, "ro/tok.bin", "cannot write there")
    finally:
        ro.chmod(0o700)


def test_input_that_is_a_directory(place, capsys):
    formats.write_model(place / "tiny.bin", TINY, init_parameters(TINY, seed=1))
    code, _, err = run_main(["train", "-i", place, "-e", place / "tiny.bin", "-t", 8, "-x", 1], capsys)
    one_line_error(code, err, str(place))


def test_emu_without_a_compiler(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    code, _, err = run_main(["train", "--device", "emu"], capsys)
    one_line_error(code, err, "--device emu", "no-such-c++-compiler", "--device cpu")


# ---- the NaN guard

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("nan_data"), TINY, model_seed=7, data_seed=0,
                          vocab=300, train=2000, val=0)


def _nan_at(monkeypatch, bad_call: int):
    """Poison one gradient element in the `bad_call`-th backward (1-based)."""
    real, calls = GPT2.backward, []

    def backward(self, loss_scale=1.0):
        real(self, loss_scale)
        calls.append(1)
        if len(calls) == bad_call:
            self.grads[123] = np.nan
    monkeypatch.setattr(GPT2, "backward", backward)


def _cfg(data, out, **kw):
    base = dict(train_pattern=str(data / "train.bin"), val_pattern="", model=str(data / "tiny.bin"),
                output_dir=str(out), batch_size=2, seq_len=8, learning_rate=1e-3, max_steps=8,
                val_every=0, sample_every=0, checkpoint_every=2, lr_schedule="constant")
    base.update(kw)
    return TrainConfig(**base)


def test_nan_gradient_stops_the_run_before_the_update(data, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 5)  # the 5th step (index 4): its norm is NaN
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 5: non-finite loss .* gradient norm nan.*-l.*-u.*-sl"):
        train(_cfg(data, out), log=lambda s: None)
    # the newest complete checkpoint is from before the NaN, and every file written is finite
    assert checkpoint.complete_steps(str(out)) == [2, 4]
    for name in os.listdir(out):
        if name.startswith("model_"):
            assert np.isfinite(formats.read_model(out / name)[1]).all(), name
    assert not (out / "model_00000008.bin").exists()


def test_nan_gradient_is_skipped_with_the_outlier_skip_on(data, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 5)
    out = tmp_path / "run"
    lines = []
    history = train(_cfg(data, out, skip_loss_z=3.0), log=lines.append)
    assert history["skipped"] == [4]
    assert any("skipping update of step 5 due to a non-finite loss" in s for s in lines), lines
    assert np.isfinite(formats.read_model(out / "model_00000008.bin")[1]).all()
    assert checkpoint.complete_steps(str(out)) == [2, 4, 6, 8]


def test_diverged_run_exits_1_with_one_line(data, tmp_path):
    """Through the command: the monkeypatched backward goes in through a sitecustomize."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import numpy as np\n"
        "from llmcu.cpu.gpt2 import GPT2\n"
        "real = GPT2.backward\n"
        "def backward(self, loss_scale=1.0):\n"
        "    real(self, loss_scale)\n"
        "    self.grads[0] = np.inf\n"
        "GPT2.backward = backward\n")
    env = dict(os.environ, PYTHONPATH=f"{hook}{os.pathsep}{ROOT}", OPENBLAS_NUM_THREADS="1")
    args = ["train", "-i", data / "train.bin", "-j", "", "-e", data / "tiny.bin", "-b", 2, "-t", 8,
            "-x", 3, "-v", 0, "-s", 0, "-o", tmp_path / "out"]
    r = subprocess.run([sys.executable, "-m", "llmcu", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    one_line_error(r.returncode, r.stderr, "step 1: non-finite", want=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["main.jsonl", "main.log"]  # no model file
