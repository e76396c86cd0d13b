"""The GPU check script (scripts/gpu_check.sh) is run rarely, on a borrowed GPU
with minutes to spare, so what can be checked without a GPU is checked here:
the script parses, every test file it names exists, every test file with
cuda-marked tests is named in it, each stage's timeouts fit a 10-minute
command, and its smoke test passes on the emulator."""

import re
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
    timeouts = [int(t) for t in re.findall(r"(?<![-\w])timeout (\d+)", _stage_text(stage))]  # commands, not --timeout
    assert timeouts, f"no timeouts in the {stage} stage"
    # 8 minutes of a 10-minute command: the rest is process start-up and the copy back; a
    # command that reaches the limit returns none of its files (2026-11-28, 570 of 590 s)
    assert sum(timeouts) <= 480, f"{stage} stage timeouts sum to {sum(timeouts)} s, over 8 minutes"


def test_smoke_passes_on_the_emulator():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "emu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke: OK" in r.stdout
