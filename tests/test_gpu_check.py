"""scripts/gpu_check.sh runs rarely, on a borrowed GPU with minutes to spare, so what can be
checked without one is checked here, its stages run with a stand-in python3."""

import importlib.util
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["smoke", "tests", "step", "lab"]

# The stand-in python3: records its arguments (shell-quoted), writes the file after --json,
# fails the import probes (-c), and exits 3 when its arguments contain $FAIL_ON.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[ "$1" = -c ] && exit 1
printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"
echo "python $*"
args=("$@")
for i in "${!args[@]}"; do
  [ "${args[$i]}" = --json ] && echo '{}' > "${args[$((i + 1))]}"
done
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit 3; fi
exit 0
"""


def _run(tmp_path, stage, fail_on=""):
    """(completed process, OUTDIR, the stand-in's calls as argument lists)."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out, calls = tmp_path / "out", tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(fake), "FAIL_ON": fail_on, "GPU_CHECK_COMMIT": "abc1234",
           "CALLS": str(calls)}
    r = subprocess.run(["bash", str(SCRIPT), str(out), stage], capture_output=True, text=True, env=env,
                       timeout=120)
    return r, out, [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_fits_one_command_of_the_device_tool(tmp_path, stage):
    """Timeouts summing to at most 8 minutes of a 10-minute command (one reaching the limit
    returns no files), at most 8 files named in [A-Za-z0-9._-] (device README), each step's
    exit line and the commit in STAGE.log, every JSON a step names, every script it names."""
    r, out, calls = _run(tmp_path, stage)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / f"{stage}.log").read_text()
    steps = re.findall(r"^=== (\w+) \(timeout (\d+) s", log, re.M)
    assert steps and sum(int(t) for _, t in steps) <= 480, steps
    for name, _ in steps:
        assert f"=== {name}: exit 0 after" in log, name
    assert "commit: abc1234" in log and log.rstrip().endswith(f"gpu_check.sh {stage}: exit 0")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(p.name for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), [p.name for p in files]
    for call in calls:
        assert (ROOT / call[0]).is_file() or call[:2] == ["-m", "pytest"] or call[0] == "benchmarks/lab.py"
        assert "--json" not in call or Path(call[call.index("--json") + 1]).parent == out
        assert "--json" not in call or Path(call[call.index("--json") + 1]).is_file()


def test_tests_stage_runs_every_cuda_test(tmp_path):
    (call,) = _run(tmp_path, "tests")[2]  # no file list that a new test file could miss
    assert call[:5] == ["-m", "pytest", "-m", "cuda", "-q"] and not [a for a in call if a.startswith("tests")]


def test_step_stage_arguments_are_the_benchmarks(tmp_path):
    """bench_gpu_step.py's own parser takes every call: bf16 d12 at B=16 and 32, d24 at B=8."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu_step
    _, _, calls = _run(tmp_path, "step")
    got = [bench_gpu_step.parse_args(c[1:]) for c in calls]
    assert all(c[0] == "benchmarks/bench_gpu_step.py" for c in calls)
    assert [(a.model, a.batch_size, a.seq_len) for a in got] == [("d12", 16, 1024), ("d12", 32, 1024),
                                                                 ("d24", 8, 1024)]
    assert all(a.dtype == "bf16" and a.compile and a.cuda_graph and a.json for a in got)


def test_lab_stage_covers_the_layers_with_candidates(tmp_path, monkeypatch):
    """One lab.py run on the GPU per layer with candidates (attention also heavy-first), each
    with its lab file and its own JSON; the layers are the harness's where it is in the tree."""
    _, out, calls = _run(tmp_path, "lab")
    layers = [c[1] for c in calls]
    assert layers == ["attention", "attention", "layernorm", "classifier", "adamw", "global_norm"]
    jsons = [c[c.index("--json") + 1] for c in calls]
    assert len(set(jsons)) == len(calls) and all(Path(j).parent == out for j in jsons)
    assert calls[1][2:4] == ["--schedule", "heavy_first"]
    for call, layer in zip(calls, layers):
        assert call[0] == "benchmarks/lab.py" and (ROOT / "kernels" / "dev" / f"{layer}.cu").is_file()
        assert call[call.index("--device") + 1] == "cuda" and call[call.index("--dtype") + 1] == "bf16"
    if not (ROOT / "benchmarks" / "lab.py").is_file():
        pytest.skip("benchmarks/lab.py (the lab harness) is not in the tree yet")
    spec = importlib.util.spec_from_file_location("gpu_check_lab", ROOT / "benchmarks" / "lab.py")
    monkeypatch.setitem(sys.modules, spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules[spec.name])
    assert set(layers) <= set(sys.modules[spec.name].LAYERS)


def test_all_runs_every_stage_into_its_own_log_past_a_failing_step(tmp_path):
    r, out, calls = _run(tmp_path, "all", fail_on="lab.py attention --device")
    assert r.returncode == 1 and calls[0][0] == "scripts/gpu_smoke.py"
    for stage in STAGES:
        log = (out / f"{stage}.log").read_text()
        assert log.startswith(f"gpu_check.sh {stage}\n")
        assert log.rstrip().endswith(f"gpu_check.sh {stage}: exit {int(stage == 'lab')}")
    assert "=== lab_attention: exit 3 after" in log and "=== lab_global_norm: exit 0 after" in log


def test_unknown_stage_is_refused(tmp_path):
    r, out, _ = _run(tmp_path, "bench")
    assert r.returncode == 2
    assert "unknown stage 'bench': expected smoke, tests, step, lab or all" in r.stderr
    assert not out.exists()


def test_smoke_passes_on_the_emulator():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "emu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke: OK" in r.stdout
