"""End-to-end tests of the `llmcu` command (run as a subprocess, as a user would)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import formats
from llmcu.config import GPT2Config, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def llmcu(*args, cwd=None, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "llmcu", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"llmcu {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def shakespeare(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyshakespeare")
    r = llmcu("prepare", "tinyshakespeare", "--input",
              shared_dir / "datasets/tinyshakespeare/input.txt", "--out-dir", out)
    assert "32,768" in r.stdout and "305,260" in r.stdout, r.stdout
    return out


def test_train_help_lists_every_default():
    out = llmcu("train", "--help").stdout
    flat = " ".join(out.split())  # argparse wraps long lines
    d = TrainConfig()
    for flag, value in [("-i", d.train_pattern), ("-j", d.val_pattern), ("-e", d.model),
                        ("-b", d.batch_size), ("-t", d.seq_len), ("-l", d.learning_rate),
                        ("-x", d.max_steps), ("-v", d.val_every), ("-m", d.val_batches),
                        ("-s", d.sample_every), ("-g", d.gen_tokens), ("-o", d.output_dir),
                        ("-d", d.total_batch_size), ("-k", d.lr_schedule), ("-u", d.warmup_iters),
                        ("-q", d.final_lr_frac), ("-c", d.weight_decay), ("-sl", d.skip_loss_z),
                        ("-sg", d.skip_norm_z)]:
        assert re.search(rf"^\s+{flag} ", out, re.M), f"{flag} missing from --help:\n{out}"
        assert f"(default: {value})" in flat, f"default {value} of {flag} missing from --help"


def test_prepare_writes_the_known_token_counts(shakespeare):
    val = formats.read_shard(shakespeare / "tiny_shakespeare_val.bin")
    train = formats.read_shard(shakespeare / "tiny_shakespeare_train.bin")
    assert (val.size, train.size) == (32768, 305260)


def test_train_end_to_end_val_loss_falls(shakespeare, tmp_path):
    """A short d6 run through the CLI: logs in llm.c's shape, val loss falls, files written."""
    out_dir = tmp_path / "run"
    r = llmcu("train", "--device", "cpu", "-e", "d6", "-i", shakespeare / "tiny_shakespeare_train.bin",
              "-j", shakespeare / "tiny_shakespeare_val.bin", "-b", 4, "-t", 32, "-l", 2e-3,
              "-x", 24, "-v", 8, "-m", 4, "-s", 12, "-g", 8, "-o", out_dir)
    log = r.stdout
    assert "[GPT-2]" in log and "num_parameters:" in log and "train dataset num_batches:" in log
    steps = re.findall(r"^step +(\d+)/24 \| train loss ([\d.]+) \| norm [\d.]+ \| lr [\d.e+-]+ \| "
                       r"[\d.]+ ms \| \d+ tok/s$", log, re.M)
    assert [int(s) for s, _ in steps] == list(range(1, 25)), log
    vals = [float(v) for v in re.findall(r"^val loss ([\d.]+)$", log, re.M)]
    assert len(vals) == 4, log  # steps 0, 8, 16 and the last
    assert vals[0] > 10.0          # about ln(50257) = 10.8 at init
    assert vals[-1] < vals[0] - 2.0, f"val loss did not fall: {vals}"
    assert log.count("generating:") == 2
    sample_text = log.split("generating:\n---\n")[1].split("\n---")[0]
    assert sample_text and not re.fullmatch(r"[\d\s,\[\]]+", sample_text)  # text, not ids
    mainlog = (out_dir / "main.log").read_text().splitlines()
    assert sum(1 for line in mainlog if line.startswith("s:") and " trl:" in line) == 24
    assert sum(1 for line in mainlog if " tel:" in line) == 4
    config, params = formats.read_model(out_dir / "model_00000024.bin")
    assert (config.num_layers, config.channels) == (6, 384)
    assert np.isfinite(params).all()


def test_train_resumes_from_a_written_model(shakespeare, tmp_path):
    """-e accepts an llm.c model file, and a tiny custom model trains from it."""
    from llmcu.cpu.gpt2 import init_parameters
    cfg = GPT2Config(max_seq_len=64, vocab_size=50257, num_layers=1, num_heads=2, channels=32)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, cfg, init_parameters(cfg, seed=3))
    r = llmcu("train", "-e", path, "-i", shakespeare / "tiny_shakespeare_train.bin",
              "-j", shakespeare / "tiny_shakespeare_val.bin", "-x", 2, "-v", 1, "-s", 0)
    assert "num_layers: 1" in r.stdout and "channels: 32" in r.stdout
    assert len(re.findall(r"^step ", r.stdout, re.M)) == 2


def test_train_without_data_says_what_to_run(tmp_path):
    r = llmcu("train", "-e", "d6", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "llmcu prepare tinyshakespeare" in r.stderr, r.stderr


def test_train_unknown_model_descriptor(shakespeare):
    r = llmcu("train", "-e", "d7", "-i", shakespeare / "tiny_shakespeare_train.bin",
              "-j", shakespeare / "tiny_shakespeare_val.bin", check=False)
    assert r.returncode != 0 and "d7" in r.stderr and "d12" in r.stderr, r.stderr


def _main_error(capsys, *argv):
    """Run llmcu.cli.main in-process: exit code 2 and one line on stderr, no traceback."""
    from llmcu.cli import main
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("spec", ["d7", "llama-d7", "gpt3"])
def test_unknown_descriptor_lists_every_family(capsys, tmp_path, spec):
    """Issue 22: the error names GPT-2's, Llama's and Gemma's presets, and the other
    things -e takes, whichever family the typo looked like."""
    err = _main_error(capsys, "train", "--device", "cpu", "-e", spec, "-o", tmp_path / "run")
    assert repr(spec) in err
    for preset in ("d12", "gpt2-xl", "llama-d6", "gemma-d12", "llama3.2-1b", "gemma-2b", "hf:"):
        assert preset in err, err
    assert ".bin" in err, err


@pytest.mark.parametrize("argv", [
    ["train", "--device", "cpu", "-e", "{f}", "-o", "{tmp}/run"],
    ["sample", "-e", "{f}"],
    ["convert", "--to-hf", "{tmp}/hf", "--model", "{f}"],
])
def test_a_text_file_as_the_model_is_not_an_llmc_model(capsys, tmp_path, argv):
    """Issue 22: a text file given as the model was reported as truncated."""
    notes = tmp_path / "notes.bin"
    notes.write_text("my notes on the run\n")
    err = _main_error(capsys, *[a.format(f=notes, tmp=tmp_path) for a in argv])
    assert "not an llm.c model checkpoint" in err and "truncated" not in err, err
    assert "20240326" in err and "20240803" in err and "b'my notes" in err, err
    assert "llmcu convert --from-hf" in err, err
    assert not (tmp_path / "hf").exists()


def test_failed_prepare_leaves_no_empty_directory(capsys, tmp_path):
    out = tmp_path / "data" / "tinyshakespeare"
    err = _main_error(capsys, "prepare", "tinyshakespeare", "--input", tmp_path / "nope.txt",
                      "--out-dir", out)
    assert "nope.txt" in err and "does not exist" in err, err
    assert not (tmp_path / "data").exists()


def test_train_missing_model_file(tmp_path):
    r = llmcu("train", "-e", tmp_path / "nope.bin", check=False)
    assert r.returncode != 0 and "nope.bin" in r.stderr and "not found" in r.stderr, r.stderr


def test_train_total_batch_size_must_be_a_multiple_of_bt():
    r = llmcu("train", "-b", 4, "-t", 64, "-d", 1000, check=False)
    assert r.returncode == 2 and "1000" in r.stderr and "256" in r.stderr, r.stderr


def test_train_unknown_lr_schedule():
    r = llmcu("train", "-k", "cosin", check=False)
    assert r.returncode == 2 and "cosine" in r.stderr and "wsd" in r.stderr, r.stderr


def test_train_optimisation_flags_reach_the_loop(shakespeare, tmp_path):
    """-d/-k/-u/-q/-sl/-sg parse (two-letter single-dash flags included) and drive the run."""
    from llmcu.cpu.gpt2 import init_parameters
    cfg = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=16)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, cfg, init_parameters(cfg, seed=5))
    r = llmcu("train", "-e", path, "-i", shakespeare / "tiny_shakespeare_train.bin", "-j", "",
              "-b", 2, "-t", 8, "-d", 32, "-x", 4, "-s", 0, "-l", 1e-3, "-k", "linear", "-u", 1,
              "-q", 0.0, "-sl", 3.0, "-sg", 3.0)
    assert "grad accumulation steps: 2" in r.stdout, r.stdout
    lrs = re.findall(r"^step +\d+/4 \| .* \| lr ([\d.e+-]+) \|", r.stdout, re.M)
    assert lrs == ["1.00e-03", "1.00e-03", "6.67e-04", "3.33e-04"], r.stdout


@pytest.mark.skipif(__import__("llmcu.cuda").cuda.is_available(), reason="a GPU is usable here")
def test_train_device_cuda_is_a_clear_error():
    r = llmcu("train", "--device", "cuda", check=False)
    assert r.returncode == 2 and "--device cpu" in r.stderr, r.stderr


def test_tokenizer_command_writes_llmc_file(tmp_path):
    out = tmp_path / "gpt2_tokenizer.bin"
    llmcu("tokenizer", "--out", out)
    tokens, eot = formats.read_tokenizer_bin(out)
    assert (len(tokens), eot) == (50257, 50256)
    assert tokens[15496] == b"Hello"


def test_train_on_emulated_kernels_matches_cpu(shakespeare, tmp_path):
    """--device emu runs the CUDA kernels on the CPU: same losses as the NumPy model."""
    from llmcu.cpu.gpt2 import init_parameters
    cfg = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=32)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, cfg, init_parameters(cfg, seed=4))
    common = ["-e", path, "-i", shakespeare / "tiny_shakespeare_train.bin",
              "-j", shakespeare / "tiny_shakespeare_val.bin", "-b", 2, "-t", 16, "-x", 3,
              "-v", 3, "-m", 2, "-s", 0]
    losses = {}
    for device in ("cpu", "emu"):
        out = llmcu("train", "--device", device, *common).stdout
        losses[device] = [float(v) for v in re.findall(r"loss ([\d.]+)", out)]
    assert len(losses["cpu"]) == 5  # 2 val + 3 train
    np.testing.assert_allclose(losses["emu"], losses["cpu"], atol=2e-6)


def test_train_has_no_kernel_flags_and_logs_the_kernels(shakespeare, tmp_path):
    """The step runs one kernel per op (kernels/README.md): `llmcu train` offers no kernel
    choices, and its log names the kernels each op ran, the ones the model's product table
    lists for its dtype (here fp32, head size 16: attention version 1)."""
    flat = " ".join(llmcu("train", "--help").stdout.split())
    for flag in ("--flash-version", "--gemm", "--classifier-version", "--fuse-residual",
                 "--bias-epilogue", "--flash-schedule"):
        assert flag not in flat, f"{flag} is still in llmcu train --help"
    r = llmcu("train", "--flash-version", "7", check=False)
    assert r.returncode == 2 and "unrecognized arguments: --flash-version" in r.stderr, r.stderr
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.train import train
    cfg = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=32)
    path = tmp_path / "tiny.bin"
    formats.write_model(path, cfg, init_parameters(cfg, seed=3))
    lines = []
    train(TrainConfig(model=str(path), train_pattern=str(shakespeare / "tiny_shakespeare_train.bin"),
                      val_pattern="", batch_size=2, seq_len=8, max_steps=1, sample_every=0,
                      val_every=0, device="emu", dtype="fp32"), log=lines.append)
    kernel_lines = [line for line in lines if line.startswith("kernels: ")]
    assert len(kernel_lines) == 1, lines
    assert "flash_attention_forward attention:attention_flash_forward_kernel1" in kernel_lines[0]
    assert "matmul_gelu_forward cublaslt:GELU_AUX_BIAS" in kernel_lines[0]
