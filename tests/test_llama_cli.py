"""`llmcu train|sample|convert` with Llama-family models, end to end as a user runs them.

Tiny Llama and Gemma model files (the GPT-2 vocabulary, so sampling decodes)
on random token shards; each run is a subprocess with one BLAS thread (see
tests/test_checkpoint.py for why). Every training feature of the GPT-2 path
is exercised: gradient accumulation, lr schedule with warmup, weight decay,
val, sampling, logs, the final model file, checkpoints and an exactly
continuing resume.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from llmcu import checkpoint, formats
from llmcu.llama_config import LlamaConfig, gemma_options
from helpers import run_llmcu, subprocess_env

_ENV = subprocess_env()

TINY_LLAMA = LlamaConfig(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=4, num_kv_heads=2,
                         channels=16, hidden_dim=24)
TINY_GEMMA = LlamaConfig(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, num_kv_heads=1,
                         channels=16, head_dim=16, hidden_dim=24, norm_eps=1e-6, **gemma_options(16))


def llmcu(*args, check=True):
    return run_llmcu(*args, env=_ENV, check=check)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from llmcu.cpu.llama import init_parameters
    d = tmp_path_factory.mktemp("llama_cli")
    rng = np.random.default_rng(0)
    formats.write_shard(d / "train.bin", rng.integers(0, 300, size=3000))  # few ids: learnable
    formats.write_shard(d / "val.bin", rng.integers(0, 300, size=600))
    formats.write_model(d / "llama.bin", TINY_LLAMA, init_parameters(TINY_LLAMA, seed=7))
    formats.write_model(d / "gemma.bin", TINY_GEMMA, init_parameters(TINY_GEMMA, seed=7))
    return d


def _train_args(files, model, out, steps, *extra):
    return ["train", "-i", files / "train.bin", "-j", files / "val.bin", "-e", files / model,
            "-o", out, "-b", 2, "-t", 8, "-l", 3e-2, "-x", steps, "-v", 4, "-m", 2,
            "-k", "cosine", "-u", 2, "-q", 0.1, "-c", 0.1, *extra]


@pytest.mark.parametrize("model, header", [("llama.bin", "[Llama]"), ("gemma.bin", "[Gemma]")])
def test_train_with_every_feature(files, tmp_path, model, header):
    out = tmp_path / "run"
    r = llmcu(*_train_args(files, model, out, 12, "-d", 32, "-s", 6, "-g", 5))
    log = r.stdout
    assert header in log and "num_kv_heads:" in log
    assert "grad accumulation steps: 2" in log
    vals = [float(v) for v in re.findall(r"val loss (\S+)", log)]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.3, vals  # at steps 0, 4, 8, 12
    lrs = [float(v) for v in re.findall(r"\| lr (\S+) \|", log)]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then cosine decay
    assert log.count("generating:") == 2  # steps 6 and 12
    assert (out / "main.log").is_file()
    rows = [json.loads(s) for s in (out / "main.jsonl").read_text().splitlines()]
    assert len(rows) >= 12
    config, params = formats.read_model(out / "model_00000012.bin")
    want = TINY_LLAMA if model == "llama.bin" else TINY_GEMMA
    assert config == want
    assert not np.array_equal(params, formats.read_model(files / model)[1])


def test_checkpoint_resume_continues_exactly(files, tmp_path):
    """12 steps straight == 6 steps with checkpoints, then resume (-y 1) to 12.
    (Constant lr: with -x 6 a cosine schedule would differ from the -x 12 run's.)"""
    kw = ("-n", 3, "-s", 0, "-k", "constant")
    straight = llmcu(*_train_args(files, "llama.bin", tmp_path / "a", 12, *kw)).stdout
    llmcu(*_train_args(files, "llama.bin", tmp_path / "b", 6, *kw))
    assert checkpoint.complete_steps(str(tmp_path / "b")) == [3, 6]
    resumed = llmcu(*_train_args(files, "llama.bin", tmp_path / "b", 12, *kw, "-y", 1)).stdout
    assert "resuming from step 6" in resumed
    losses = re.findall(r"step\s+(\d+)/12 \| train loss (\S+)", straight)
    again = re.findall(r"step\s+(\d+)/12 \| train loss (\S+)", resumed)
    assert again == losses[6:] and len(again) == 6
    for name in ("model_00000012.bin", "state_00000012_00000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_resume_refuses_another_model(files, tmp_path):
    llmcu(*_train_args(files, "llama.bin", tmp_path, 3, "-n", 3, "-s", 0))
    r = llmcu(*_train_args(files, "gemma.bin", tmp_path, 6, "-n", 3, "-s", 0, "-y", 1), check=False)
    assert r.returncode == 2 and "another model" in r.stderr, r.stderr


def test_sample_command(files):
    r = llmcu("sample", "-e", files / "llama.bin", "--prompt", "Hello", "-g", 4, "--seed", 1)
    again = llmcu("sample", "-e", files / "llama.bin", "--prompt", "Hello", "-g", 4, "--seed", 1)
    assert r.stdout.startswith("Hello") and r.stdout == again.stdout


def test_descriptors():
    from llmcu.checkpoint import requested_config
    from llmcu.llama_config import llama_config
    from llmcu.train import make_model
    assert requested_config("llama") == llama_config("llama-d6")
    assert requested_config("gemma-d6") == llama_config("gemma-d6")
    m = make_model(TINY_GEMMA, None, "cpu")
    assert type(m).__name__ == "Llama" and m.config == TINY_GEMMA
    r = llmcu("train", "-e", "llama-d5", check=False)
    assert r.returncode == 2 and "llama-d6" in r.stderr, r.stderr


def test_convert_hf_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(tmp_path / "hf")
    llmcu("convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "m.bin")
    config, _ = formats.read_model(tmp_path / "m.bin")
    assert (config.num_kv_heads, config.vocab_size, config.tie_embeddings) == (2, 300, False)
    llmcu("convert", "--to-hf", tmp_path / "back", "--model", tmp_path / "m.bin")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    for name, t in model.state_dict().items():  # float32 file: every tensor comes back exactly
        assert torch.equal(back.state_dict()[name], t), name


def test_train_on_emulated_kernels_matches_cpu(files, tmp_path):
    """--device emu (the .cu kernels on the CPU) logs the losses --device cpu does
    (to 1e-5: float32 sums in another order move the 6-digit loss by ~1e-6)."""
    logs = {}
    for device in ("cpu", "emu"):
        args = _train_args(files, "gemma.bin", tmp_path / device, 3, "-s", 3, "-g", 3, "-v", 3, "-m", 1)
        logs[device] = llmcu(*args, "--device", device).stdout
    found = {d: [float(v) for v in re.findall(r"(?:train|val) loss (\S+)", s)] for d, s in logs.items()}
    assert len(found["cpu"]) == 5, logs["cpu"]  # val at 0 and 3, three train steps
    np.testing.assert_allclose(found["emu"], found["cpu"], rtol=0, atol=1e-5)
    assert "generating:" in logs["emu"]


@pytest.mark.slow
def test_data_parallel_zero1_matches_one_process(files, tmp_path):
    """2 processes (torchrun, gloo) with ZeRO-1 train the same Llama as one process:
    the train losses agree to float32 rounding of the all-reduced gradients (2e-6
    on losses printed to 6 decimals; the two sum their halves in another order)."""
    pytest.importorskip("torch.distributed")
    args = ["train", "-e", files / "llama.bin", "-i", files / "train.bin", "-j", files / "val.bin",
            "-b", 2, "-t", 8, "-x", 4, "-l", 3e-2, "-c", 0.1, "-s", 0, "-v", 0, "-d", 32]
    one = llmcu(*args, "-o", tmp_path / "one").stdout
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "llmcu", *map(str, args), "-z", "1",
                        "-o", str(tmp_path / "two")], env=_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data parallel: 2 process(es)" in r.stdout
    losses = {k: [float(v) for v in re.findall(r"train loss (\S+)", s)] for k, s in
              (("one", one), ("two", r.stdout))}
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=0, atol=2e-6)
    assert formats.read_model(tmp_path / "two" / "model_00000004.bin")[0] == TINY_LLAMA
