"""benchmarks/bench_attention.py needs a GPU to time anything; its summary against PyTorch's
SDPA (each llmcu row against the peer of its dtype) is plain arithmetic on the timings and
is checked here on made-up times, and without a GPU it says so and exits 0."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention  # noqa: E402


def test_ratio_lines_compare_each_llmcu_row_with_its_peer():
    times = {"llmcu bf16": (0.20, 0.80), "llmcu fp32": (6.0, 80.0),
             "torch sdpa flash bf16": (0.25, 0.75), "torch sdpa efficient fp32": (1.0, 4.0)}
    lines, ratios = bench_attention.ratio_lines(times)
    assert ratios["llmcu bf16"] == pytest.approx(dict(peer="torch sdpa flash bf16", fwd=0.8, fwd_bwd=0.80 / 0.75))
    assert ratios["llmcu fp32"] == pytest.approx(dict(peer="torch sdpa efficient fp32", fwd=6.0, fwd_bwd=20.0))
    assert "  llmcu bf16 / torch sdpa flash bf16: fwd  0.800   fwd+bwd  1.067" in lines


def test_ratio_lines_without_a_row_say_which():
    lines, ratios = bench_attention.ratio_lines({"llmcu bf16": (0.2, 0.8), "torch sdpa efficient fp32": (1, 3)})
    assert ratios == {}
    assert lines[1:] == ["  llmcu bf16: no ratio (no torch sdpa flash bf16 row)",
                         "  llmcu fp32: no ratio (no llmcu fp32 row)"]


def test_without_a_gpu_it_says_so(capsys):
    from llmcu import cuda
    if cuda.is_available():
        pytest.skip("a GPU is here")
    assert bench_attention.main([]) == 0
    assert "skipped: needs CuPy and an NVIDIA GPU" in capsys.readouterr().out
