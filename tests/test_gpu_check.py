"""The GPU check script (scripts/gpu_check.sh) is run rarely, on a borrowed GPU
with minutes to spare, so what can be checked without a GPU is checked here:
the script parses, every test file it names exists, every test file with
cuda-marked tests is named in it, each stage's timeouts fit a 10-minute
command, each stage leaves files the device tool brings back (run here with a
stand-in python), and its smoke test passes on the emulator."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _stage_text(stage):
    text = SCRIPT.read_text()
    marker = f'if [ "$stage" = {stage} ]'
    start = text.index(marker)
    return text[start:text.index("\nfi\n", start)]


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_named_test_files_exist_and_cover_every_cuda_test():
    text = SCRIPT.read_text()
    named = set(re.findall(r"tests/(test_\w+\.py)", text))
    for name in named:
        assert (ROOT / "tests" / name).is_file(), f"gpu_check.sh names tests/{name}, which does not exist"
    cuda_files = {p.name for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"mark\.cuda|KERNEL_BACKENDS|BACKENDS", p.read_text())
                  and p.name != "test_gpu_check.py"}
    missing = sorted(cuda_files - named)
    assert not missing, f"test files with cuda tests that gpu_check.sh does not run: {missing}"
    for name in re.findall(r"benchmarks/(\w+\.py)", text):
        assert (ROOT / "benchmarks" / name).is_file(), f"gpu_check.sh names benchmarks/{name}, missing"


@pytest.mark.parametrize("stage", ["quick", "tests", "bench", "bench2"])
def test_stage_timeouts_fit_one_command(stage):
    timeouts = [int(t) for t in re.findall(r"^\s*step \w+ (\d+) ", _stage_text(stage), re.M)]
    assert timeouts, f"no timeouts in the {stage} stage"
    # 8 minutes of a 10-minute command: the rest is process start-up and the copy back; a
    # command that reaches the limit returns none of its files (2026-11-28, 570 of 590 s)
    assert sum(timeouts) <= 480, f"{stage} stage timeouts sum to {sum(timeouts)} s, over 8 minutes"


# A stand-in for the device's python3: prints its arguments, writes the file after --json or
# --benchmark-json, answers best_variant.py as that script would, fails the import probes
# (no CuPy here), and exits 3 when its arguments contain $FAIL_ON.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[ -n "${CALLS:-}" ] && echo "$*" >> "$CALLS"
case "$1 $2 $*" in
  -c*) exit 1 ;;
  scripts/best_variant.py*--breakdown-flags*) echo "--flash-version 7 --gemm cublaslt_all_tuned"; exit 0 ;;
  scripts/best_variant.py*) echo "flash=7,gemm=cublaslt_all_tuned,graph=1"; exit 0 ;;
esac
echo "python $*"
args=("$@")
for i in "${!args[@]}"; do
  case "${args[$i]}" in --json|--benchmark-json) echo '{}' > "${args[$((i + 1))]}" ;; esac
done
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit 3; fi
exit 0
"""


def _run_stage(tmp_path, stage, *extra, fail_on=""):
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "FAIL_ON": fail_on, "GPU_CHECK_COMMIT": "abc1234",
           "CALLS": str(tmp_path / "calls.log")}
    r = subprocess.run(["bash", str(SCRIPT), str(out), stage, *extra], capture_output=True, text=True,
                       env=env, timeout=120)
    return r, out


@pytest.mark.parametrize("stage", ["quick", "tests", "bench", "bench2", "all"])
def test_stage_output_fits_what_the_device_tool_brings_back(tmp_path, stage):
    """The device tool brings back at most 8 files from $OUT, each named in letters, digits,
    '.', '_' and '-' (device README): every stage stays within that, with its whole output in
    STAGE.log, each step marked with its exit status, and the commit named."""
    r, out = _run_stage(tmp_path, stage, *([str(tmp_path / "q.json")] if stage == "bench" else []))
    assert r.returncode == 0, r.stdout + r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, f"{stage} leaves {len(files)} files: {sorted(p.name for p in files)}"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), [p.name for p in files]
    log = (out / f"{stage}.log").read_text()
    text = _stage_text(stage) if stage != "all" else "".join(_stage_text(s) for s in ("tests", "bench", "bench2"))
    for name in re.findall(r"^\s*step (\w+) \d+ ", text, re.M):
        assert f"=== {name}: exit 0 after" in log, f"no exit line for step {name} in {stage}.log"
    assert "commit: abc1234" in log
    for name in re.findall(r'--(?:benchmark-)?json "\$out/([\w.]+)"', text):
        assert (out / name).is_file(), f"{stage} did not write {name}"


def test_a_failing_step_is_reported_and_the_next_steps_still_run(tmp_path):
    r, out = _run_stage(tmp_path, "quick", fail_on="bench_attention.py")
    assert r.returncode == 1
    log = (out / "quick.log").read_text()
    assert "=== bench_attention: exit 3 after" in log
    assert "=== bench_step_variants: exit 0 after" in log  # the step after it ran
    assert log.rstrip().endswith("gpu_check.sh quick: exit 1")


def test_bench_times_the_quick_stage_fastest_variant(tmp_path):
    (tmp_path / "bench_attention.json").write_text("{}")  # the quick stage's, beside its step JSON
    r, out = _run_stage(tmp_path, "bench", str(tmp_path / "q.json"))
    log = (out / "bench.log").read_text()
    assert "best_variant.py " + str(tmp_path / "q.json") + " --graph 1 --attention " + \
        str(tmp_path / "bench_attention.json") in (tmp_path / "calls.log").read_text()
    assert "the quick stage's fastest variant: flash=7,gemm=cublaslt_all_tuned,graph=1" in log
    assert "--variants graph=0;graph=1;flash=7,gemm=cublaslt_all_tuned,graph=0;flash=7,gemm=cublaslt_all_tuned,graph=1" in log
    assert "bench_step_breakdown.py --dtype bf16 -b 16 -t 1024 --flash-version 7 --gemm cublaslt_all_tuned" in log


def test_unknown_stage_is_refused(tmp_path):
    r, out = _run_stage(tmp_path, "benchmark")
    assert r.returncode == 2
    assert "unknown stage 'benchmark': expected quick, tests, bench, bench2 or all" in r.stderr
    assert not out.exists()


def test_smoke_passes_on_the_emulator():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "emu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke: OK" in r.stdout
