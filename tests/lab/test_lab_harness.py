"""The lab as a whole: every kernel of kernels/dev/*.cu is launched by some version of its
layer's kernels/dev/<layer>.py (and each version launches exactly the lab kernels it
declares), every version passes benchmarks/lab.py's oracle check at tiny shapes, and the
harness runs end to end (exit status, PASS lines, ratios, --json), fails with status 1
when a version is wrong, and builds its PyTorch rows (run here on the CPU).
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_DEF = re.compile(r'^\s*extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', re.M)


def load_harness():
    spec = importlib.util.spec_from_file_location("llmcu_lab_harness", ROOT / "benchmarks" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = load_harness()
# the smallest shapes every version accepts: hs = 64 for attention 2-9 (NH = C / 64), whole
# 16-byte packets everywhere; T = 70: two 64-row tiles, the second partial
TINY = harness.Shape(B=1, T=70, C=64, NH=1, V=100, Vp=128, n=1024)


def defined_kernels(layer):
    """The extern "C" __global__ kernels defined in kernels/dev/<layer>.cu itself."""
    return set(KERNEL_DEF.findall((ROOT / "kernels" / "dev" / f"{layer}.cu").read_text()))


def unlaunched(defined, launched):
    return sorted(set(defined) - set(launched))


@pytest.fixture
def stems_and_kernels(monkeypatch):
    """(stem, kernel) of every launch during the test (a spy on Backend.launch)."""
    from llmcu.cuda import runtime
    seen = []
    real = runtime.Backend.launch

    def spy(self, stem, kernel, *args, **kwargs):
        seen.append((stem, kernel))
        return real(self, stem, kernel, *args, **kwargs)
    monkeypatch.setattr(runtime.Backend, "launch", spy)
    return seen


def test_the_lab_files_match_the_layers():
    assert sorted(p.stem for p in (ROOT / "kernels" / "dev").glob("*.cu")) == sorted(harness.LAYERS)
    assert sorted(p.stem for p in (ROOT / "kernels" / "dev").glob("*.py")) == sorted(harness.LAYERS)


@pytest.mark.parametrize("layer", harness.LAYERS)
def test_every_lab_kernel_is_launched_and_checked(layer, stems_and_kernels):
    """Each version of the layer, in each dtype it runs, through the harness's oracle check
    at TINY shapes: every output PASSes, the version launches exactly the lab kernels its
    record declares, and together the versions launch every kernel kernels/dev/<layer>.cu
    defines (a kernel no version runs is dead code the lab cannot measure)."""
    lab = harness.load_lab(layer)
    oracle_mod = __import__(f"llmcu.cpu.{harness.ORACLE.get(layer, layer)}", fromlist=["_"])
    launched = set()
    for v, ver in lab.VERSIONS.items():
        for dtype in ver.dtypes:
            builders = harness.CASES[layer](TINY, harness.Inputs(dtype, seed=5))
            device = harness.Device("emu", dtype)
            extra = {"schedule": "heavy_first"} if ver.scheduled else {}
            stems_and_kernels.clear()
            for op, fn in ver.ops.items():
                case = builders[op]()
                rows = harness.check_op(fn, case, device, case.oracle or getattr(oracle_mod, op), extra)
                assert rows, f"{layer} v{v} {op}: nothing compared"
                bad = [r for r in rows if not r["passed"]]
                assert not bad, f"{layer} v{v} {dtype} {op}: {bad}"
            mine = {k for stem, k in stems_and_kernels if stem == f"dev/{layer}"}
            assert mine == set(ver.kernels), (f"{layer} v{v} {dtype} launched {sorted(mine)} from the lab file, "
                                              f"declares {sorted(ver.kernels)}")
            # only its own layer's kernels (and gemm's fp32-product accumulate, kernels/matmul.cu)
            assert {stem for stem, _ in stems_and_kernels} <= {f"dev/{layer}", layer, "matmul"}, stems_and_kernels
            launched |= mine
    defined = defined_kernels(layer)
    assert defined, f"kernels/dev/{layer}.cu defines no kernel (the pattern missed them?)"
    assert unlaunched(defined, launched) == [], f"kernels/dev/{layer}.cu: no version launches these"
    assert unlaunched(defined | {"attention_flash_forward_kernel99"}, launched) == ["attention_flash_forward_kernel99"]


def test_harness_end_to_end(tmp_path):
    """One small version from the command line on the emulator: exit status 0, the check's
    PASS lines, a timing row with its lab/product ratio, the JSON rows."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lab.py"), "layernorm", "2", "--device", "emu",
                        "--dtype", "fp32", "--warmup", "0", "--reps", "1", "--json", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"v2\s+layernorm_forward\s+out\s+max\|diff\| \S+ \(\d+% of tol\)\s+PASS", r.stdout), r.stdout
    assert re.search(r"lab v2\s+layernorm_forward\s+[\d.e+-]+\s+[\d.e+-]+ GB/s\s+\d+\.\d\dx", r.stdout), r.stdout
    assert "emulator times, not GPU figures" in r.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["layer"] == "layernorm" and data["meta"]["emulator"] is True
    kinds = {(row["kind"], row.get("impl")) for row in data["rows"]}
    assert ("time", "lab v2") in kinds and ("time", "product") in kinds
    assert all(row["passed"] for row in data["rows"] if row["kind"] == "check")


def test_harness_fails_a_wrong_version(monkeypatch, capsys):
    """A version whose output is off by one bf16 ulp somewhere fails its check: status 1."""
    real = harness.load_lab

    def broken(layer):
        lab = real(layer)
        good = lab.VERSIONS[1].ops["gelu_forward"]

        def off(out, inp):
            good(out, inp)
            out.reshape(-1)[5] += np.float32(0.01)
        lab.VERSIONS[1].ops["gelu_forward"] = off
        return lab
    monkeypatch.setattr(harness, "load_lab", broken)
    status = harness.main(["gelu", "1", "--device", "emu", "--dtype", "fp32", "--warmup", "0", "--reps", "1"])
    text = capsys.readouterr().out
    assert status == 1, text
    assert re.search(r"v1\s+gelu_forward\s+out\s+.*FAIL", text) and "FAIL: a check failed" in text


def test_harness_refuses_unknown_versions_and_devices(capsys):
    assert harness.main(["encoder", "7", "--device", "emu"]) == 2
    assert "encoder has no version 7; its versions: 1" in capsys.readouterr().err
    if not __import__("llmcu.cuda", fromlist=["_"]).is_available():
        assert harness.main(["encoder", "--device", "cuda"]) == 2
        assert "--device cuda needs CuPy and an NVIDIA GPU" in capsys.readouterr().err


def test_torch_rows_build_and_run_on_the_cpu():
    """The PyTorch equivalents the harness times on a GPU, built and run once on the CPU
    (fp32), so a typo in one shows here and not only on a GPU machine."""
    pytest.importorskip("torch")
    tt = harness.torch_tensor_maker("cpu", "fp32")
    for layer in harness.LAYERS:
        for build in harness.CASES[layer](TINY, harness.Inputs("fp32")).values():
            case = build()
            if case.torch is not None:
                case.torch(tt, case)()
