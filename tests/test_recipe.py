"""The GPT-2 pretraining recipe scripts (scripts/run_gpt2_124M.sh, run_gpt2_350M.sh and
their shared scripts/run_gpt2.sh): the smoke mode end to end on CPUs (d6, 2 processes,
gloo, ZeRO-1, val + HellaSwag + checkpoints + sampling, 2 steps), and the launch commands
the real settings make (DRY_RUN=1) for torchrun, two nodes, SLURM and a resumed run.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import subprocess_env
from llmcu import formats

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(subprocess_env(launcher=False), PYTHON=sys.executable)  # the scripts start their own
for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST"):                 # process groups
    ENV.pop(name, None)


def script(name, env, cwd, timeout=300):
    r = subprocess.run(["bash", str(ROOT / "scripts" / name)], env=env, cwd=cwd, text=True,
                       capture_output=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    for name, n in (("train_000.bin", 2000), ("train_001.bin", 2000), ("val_000.bin", 1000)):
        formats.write_shard(d / name, rng.integers(0, 50257, n))
    formats.write_evalfile(d / "hellaswag.bin", [
        {"label": int(rng.integers(4)), "ctx_tokens": rng.integers(0, 50257, 5).tolist(),
         "ending_tokens": [rng.integers(0, 50257, 3).tolist() for _ in range(4)]} for _ in range(2)])
    return d


def test_recipe_smoke_runs_end_to_end(data):
    env = dict(ENV, SMOKE="1", TRAIN=str(data / "train_*.bin"), VAL=str(data / "val_*.bin"),
               HELLASWAG=str(data / "hellaswag.bin"), OUT=str(data / "out"))
    r = script("run_gpt2_124M.sh", env, data)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "data parallel: 2 process(es), gloo, -z 1" in out
    assert "num_layers: 6" in out and "num_parameters: 30357504" in out  # d6
    assert out.count("val loss") == 3 and out.count("HellaSwag: ") == 3  # steps 0, 1, 2
    assert "step    2/2" in out and "generating:" in out
    for name in ("DONE_00000001", "DONE_00000002", "state_00000002_00000.bin", "state_00000002_00001.bin"):
        assert (data / "out" / name).exists(), name
    assert f"run_gpt2.sh: done, {data / 'out'}/DONE_00000002" in out
    # run again: the last checkpoint is there, so nothing is launched
    r = script("run_gpt2_124M.sh", env, data, timeout=30)
    assert r.returncode == 0 and "data parallel" not in r.stdout and "done" in r.stdout


def _dry(name, tmp_path, **env):
    r = script(name, dict(ENV, DRY_RUN="1", HELLASWAG=str(tmp_path / "none.bin"),
                          OUT=str(tmp_path / "out"), **env), tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1].split()


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def test_recipe_commands(tmp_path, monkeypatch):
    cmd = _dry("run_gpt2_124M.sh", tmp_path)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "8"]
    want = {"-e": "d12", "-b": "64", "-t": "1024", "-d": "524288", "-x": "19560", "-l": "6e-4",
            "-u": "700", "-k": "cosine", "-q": "0.0", "-c": "0.1", "-z": "1", "-v": "250",
            "-n": "5000", "--device": "cuda", "--dtype": "bf16"}
    assert {k: _arg(cmd, k) for k in want} == want
    assert "-y" not in cmd and "--hellaswag" not in cmd  # no checkpoint yet; no eval file here
    # 16 GPUs: B halves so that the step stays 524,288 tokens
    assert _arg(_dry("run_gpt2_124M.sh", tmp_path, NPROC="16"), "-b") == "32"
    cmd = _dry("run_gpt2_350M.sh", tmp_path)
    assert (_arg(cmd, "-e"), _arg(cmd, "-l"), _arg(cmd, "-b"), _arg(cmd, "-d")) == \
        ("d24", "3e-4", "16", "524288")
    # a checkpoint in the output dir: the launch resumes from it
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "DONE_00005000").touch()
    assert _dry("run_gpt2_124M.sh", tmp_path)[-2:] == ["-y", "1"]
    # inside sbatch: srun, one task per GPU, the master from scontrol (a stand-in here)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node7\necho node8\n")
    (fake / "scontrol").chmod(0o755)
    cmd = _dry("run_gpt2_124M.sh", tmp_path, SLURM_JOB_ID="1", SLURM_NTASKS="16",
               SLURM_JOB_NODELIST="node[7-8]", PATH=f"{fake}:{ENV['PATH']}")
    assert cmd[:4] == ["srun", sys.executable, "-m", "llmcu"] and _arg(cmd, "-b") == "32"


def test_scaling_model_runs_and_is_labelled_a_model():
    """benchmarks/dp_scaling_model.py prints the tables of benchmarks/RESULTS.md's
    data-parallel section; the section says it is a model."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dp_scaling_model.py")], env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # 2 * 7/8 * 124,475,904 bf16 values: the ring all-reduce's bytes per GPU at d12
    assert "| d12 | 124.5M | 0 | 436 MB | 0.97 ms | 9.34 ms |" in r.stdout
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    section = results[results.index("## Data parallel on paper"):]
    assert "a model, not a measurement" in section.split("\n\n")[1]
    assert "| d12 | 124.5M | 0 | 436 MB | 0.97 ms | 9.34 ms |" in section
