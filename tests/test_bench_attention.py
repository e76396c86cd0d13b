"""benchmarks/bench_attention.py needs a GPU to time anything; its summary against PyTorch's
flash backend (the issue's target: at least as fast) is plain arithmetic on the timings and
is checked here on made-up times."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402


def test_ratio_lines_compare_every_llmcu_bf16_row_with_torch_flash():
    times = {"llmcu flash v1 fp32": (50.0, 80.0),
             "llmcu flash v3 bf16 (mma.sync)": (0.20, 0.80),
             "llmcu flash v7 bf16 heavy-first": (0.25, 0.60),
             "llmcu simple fp32": (3.0, 9.0),
             "torch sdpa flash bf16": (0.25, 0.75),
             "torch sdpa efficient fp32": (1.0, 3.0)}
    lines, ratios = bench_attention.ratio_lines(times)
    assert set(ratios["per_row"]) == {"llmcu flash v3 bf16 (mma.sync)", "llmcu flash v7 bf16 heavy-first"}
    assert ratios["per_row"]["llmcu flash v3 bf16 (mma.sync)"] == pytest.approx(dict(fwd=0.8, fwd_bwd=0.80 / 0.75))
    assert ratios["best"]["fwd"]["row"] == "llmcu flash v3 bf16 (mma.sync)"
    assert ratios["best"]["fwd_bwd"] == pytest.approx(dict(row="llmcu flash v7 bf16 heavy-first", ms=0.60,
                                                           torch_ms=0.75, ratio=0.8))
    assert lines[-1] == ("fastest llmcu fwd+bwd: llmcu flash v7 bf16 heavy-first, 0.600 ms against 0.750 ms "
                         "(0.800x the time)")
    assert any("llmcu flash v3 bf16 (mma.sync)" in line and "fwd  0.800" in line and "fwd+bwd  1.067" in line
               for line in lines)


def test_ratio_lines_without_the_torch_row_say_so():
    lines, ratios = bench_attention.ratio_lines({"llmcu flash v3 bf16 (mma.sync)": (0.2, 0.8)})
    assert lines == ["no torch sdpa flash bf16 row: no ratios"] and ratios == {}
