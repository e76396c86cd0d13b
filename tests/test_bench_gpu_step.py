"""benchmarks/bench_gpu_step.py without a GPU: the llmcu rows' step (eager and as CUDA
graphs) on the emulator with the cross-check of the graph's first gradients against the
eager step's, the check's arithmetic, the JSON written whole after every row, and main()
from the arguments to the summary with stand-ins for the timings that need a GPU."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu.config import GPT2Config, gpt2_config, parameter_slices
from llmcu.cpu.gpt2 import init_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu_step  # noqa: E402

TINY = GPT2Config(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=4, channels=64)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llmcu_rows_on_the_emulator_and_the_graph_cross_check(dtype):
    """The eager and the graph row run the real code path (GPT2, GraphStep) on the emulator:
    the graph's first replay gives the eager step's loss and gradients (the same kernels on
    the same buffers: bit for bit), so the cross-check passes it."""
    params = init_parameters(TINY, seed=1)
    rng = np.random.default_rng(2)
    x, y = (rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32) for _ in range(2))
    eager = bench_gpu_step.bench_llmcu_step(TINY, params.copy(), x, y, 1, dtype, graph=False, device="emu")
    graph = bench_gpu_step.bench_llmcu_step(TINY, params.copy(), x, y, 1, dtype, graph=True, device="emu")
    for ms, peak, loss, grads in (eager, graph):
        assert ms > 0 and peak == 0 and np.isfinite(loss)
        assert grads.dtype == np.float32 and grads.shape == (TINY.num_parameters(),)
        assert np.abs(grads).max() > 0
    slices = {name: sl for name, sl, _ in parameter_slices(TINY)}
    c = bench_gpu_step.check_against(eager[2:], graph[2], graph[3], slices)
    assert c["loss_diff"] == pytest.approx(0.0, abs=1e-6)
    assert c["grad_rel_err"] == 0.0 and not c["suspect"]


def test_check_against_flags_a_wrong_tensor():
    slices = {"a": slice(0, 4), "b": slice(4, 8)}
    ref = np.arange(1, 9, dtype=np.float32)
    ok = bench_gpu_step.check_against((2.0, ref), 2.0, ref * np.float32(1.001), slices)
    assert ok["grad_rel_err"] == pytest.approx(1e-3, rel=1e-3) and not ok["suspect"]
    wrong = ref.copy()
    wrong[4:] *= np.float32(1.3)
    c = bench_gpu_step.check_against((2.0, ref), 2.5, wrong, slices)
    assert c["worst"] == "b" and c["grad_rel_err"] == pytest.approx(0.3) and c["suspect"]
    assert c["loss_diff"] == pytest.approx(0.5)
    wrong[0] = np.nan
    c = bench_gpu_step.check_against((2.0, ref), 2.0, wrong, slices)
    assert c["worst"] == "a" and c["suspect"]  # NaN is suspect, and named first


def test_json_written_after_each_row_is_whole(tmp_path, monkeypatch):
    """Each write replaces the file whole (a timeout keeps the finished rows); a write that
    fails leaves the previous file, and no temporary beside it."""
    args = argparse.Namespace(dtype="bf16", steps=20)
    path = tmp_path / "r.json"
    results, checks = {}, {}
    for name, ms in (("llmcu", 37.0), ("llmcu graph", 35.5)):
        results[name] = {"ms": ms, "peak_bytes": 123}
        bench_gpu_step.write_json(path, "card", args, results, checks)
        got = json.loads(path.read_text())
        assert set(got["steps"]) == set(results) and got["card"] == "card" and got["dtype"] == "bf16"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(bench_gpu_step.os, "replace", broken_replace)
    results["pytorch"] = {"ms": 30.0, "peak_bytes": 1}
    with pytest.raises(OSError):
        bench_gpu_step.write_json(path, "card", args, results, checks)
    assert json.loads(path.read_text())["steps"] == got["steps"]


def test_main_with_stand_in_timings(tmp_path, monkeypatch, capsys):
    """main() from the arguments gpu_check.sh's step stage passes to the summary, the ratio
    lines and the JSON, with stand-ins for the two timing functions and the device name: a
    graph row whose gradients differ is SUSPECT, and a PyTorch row that fails is reported
    while the others are kept."""
    import llmcu.mfu
    monkeypatch.setattr(llmcu.mfu, "device_name", lambda: "Stand-in GPU")
    d6 = gpt2_config("d6")
    base = np.random.default_rng(0).standard_normal(d6.num_parameters(), dtype=np.float32)
    wte = next(sl for name, sl, _ in parameter_slices(d6) if name == "wte")
    calls = []

    def fake_llmcu(config, params, x, y, steps, dtype="fp32", graph=False):
        calls.append((x.shape, steps, dtype, graph))
        grads = base.copy()
        if graph:
            grads[wte] *= np.float32(1.3)  # a replay that read something stale, say
        return (30.0 if graph else 40.0), 8 << 30, 10.9, grads

    def fake_torch(config, params, x, y, steps, dtype="fp32", compile=False):
        if not compile:
            raise RuntimeError("CUDA out of memory\nmore lines")
        return 50.0, 20 << 30

    monkeypatch.setattr(bench_gpu_step, "bench_llmcu_step", fake_llmcu)
    monkeypatch.setattr(bench_gpu_step, "bench_torch_step", fake_torch)
    monkeypatch.setitem(sys.modules, "torch", argparse.Namespace(
        cuda=argparse.Namespace(empty_cache=lambda: None)))
    out = tmp_path / "step.json"
    assert bench_gpu_step.main(["--model", "d6", "-t", "64", "--dtype", "bf16", "-b", "2", "--compile",
                                "--cuda-graph", "--steps", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert calls == [((2, 64), 3, "bf16", False), ((2, 64), 3, "bf16", True)]
    assert "card: Stand-in GPU; GPT-2 d6, B=2, T=64" in printed
    assert "pytorch: FAILED: RuntimeError: CUDA out of memory" in printed and "more lines" not in printed
    assert "llmcu: 40.00 ms/step; first loss 10.900000\n" in printed
    assert ("llmcu graph: 30.00 ms/step; first loss 10.900000 (+0.00e+00), gradients vs llmcu: relative L2 "
            "at most 3.00e-01 (wte) SUSPECT (over 0.05)") in printed
    assert "ratio llmcu graph / llmcu (time; launch overhead removed by the graphs): 0.750" in printed
    assert "ratio llmcu graph / pytorch+compile (time): 0.600" in printed
    got = json.loads(out.read_text())
    assert got["card"] == "Stand-in GPU" and set(got["steps"]) == {"llmcu", "llmcu graph", "pytorch+compile"}
    g = got["steps"]["llmcu graph"]
    assert g["suspect"] and g["worst"] == "wte" and "suspect" not in got["steps"]["llmcu"]
    flops = d6.flops_per_token(64) * 2 * 64 / 30e-3
    assert g["mfu"] == pytest.approx(flops / 989e12) and g["tok_s"] == pytest.approx(128 / 30e-3)
    assert f"MFU {100 * g['mfu']:5.1f}%" in printed
