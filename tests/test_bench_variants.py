"""The knobs the GPU benchmark compares in one run: GPT2(classifier_version=) (which
fused-classifier kernel the model launches, checked from the launches, and that the
versions train alike), and benchmarks/bench_gpu_step.py's --variants parser (each spec
to the model's arguments; bad specs refused with what was expected)."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu.config import GPT2Config
from llmcu.cpu.gpt2 import init_parameters
from llmcu.cuda.gpt2 import GPT2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu_step  # noqa: E402


def _steps(model, batches, n=3):
    losses = []
    for s in range(n):
        x, y = batches[s % len(batches), :, :-1], batches[s % len(batches), :, 1:]
        losses.append(model.forward(x, y))
        model.zero_grad()
        model.backward()
        model.update(1e-3, s + 1)
    return np.array(losses)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpt2_classifier_version_is_the_kernel_launched(launches, dtype):
    """Each pinned version launches only its own fused_classifier kernel (forward loss and
    backward dlogits); the three versions' losses agree: the same softmax arithmetic in
    another order (fp32: 1e-5 relative; bf16: the bf16 dlogits' rounding feeds the next
    steps, 2e-3)."""
    cfg = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=1, num_heads=2, channels=32)
    p0 = init_parameters(cfg, seed=3)
    batches = np.random.default_rng(4).integers(0, 100, size=(2, 2, 9)).astype(np.int32)
    losses = {}
    for version in (1, 2, 3):
        launches.clear()
        model = GPT2(cfg, p0.copy(), device="emu", dtype=dtype, classifier_version=version)
        losses[version] = _steps(model, batches)
        ran = {k for k in launches if k.startswith("fused_classifier_kernel")}
        assert ran == {f"fused_classifier_kernel{version}"}, (version, ran)
        assert model.sampler().classifier_version == version
    tol = 1e-5 if dtype == "fp32" else 2e-3
    for version in (2, 3):
        np.testing.assert_allclose(losses[version], losses[1], rtol=tol)


def test_gpt2_classifier_version_rejects_bad_values():
    cfg = GPT2Config(max_seq_len=8, vocab_size=50, num_layers=1, num_heads=2, channels=16)
    with pytest.raises(ValueError, match=r"GPT2: classifier_version must be one of \(1, 2, 3\) or 'auto', got 4"):
        GPT2(cfg, device="emu", classifier_version=4)


def test_gpt2_fuse_residual_false_runs_the_separate_kernels(launches):
    """fuse_residual=False: no fused residual/layernorm kernel launches, residual_forward's do,
    and (fp32, the fused forward and the separate calls being the same arithmetic, the
    backward's add one rounding apart) the losses agree to 1e-6 relative."""
    cfg = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=2, num_heads=2, channels=32)
    p0 = init_parameters(cfg, seed=5)
    batches = np.random.default_rng(6).integers(0, 100, size=(2, 2, 9)).astype(np.int32)
    runs = {}
    for fuse in (True, False):
        launches.clear()
        model = GPT2(cfg, p0.copy(), device="emu", fuse_residual=fuse)
        runs[fuse] = (_steps(model, batches), set(launches))
        assert model.sampler().fuse_residual is fuse
    fused_kernels = {k for k in runs[True][1] if k.startswith("residual_layernorm_forward")}
    assert fused_kernels and not fused_kernels & runs[False][1]
    assert not any(k.startswith("residual_forward") for k in runs[True][1])
    assert any(k.startswith("residual_forward") for k in runs[False][1])
    np.testing.assert_allclose(runs[False][0], runs[True][0], rtol=1e-6)
    with pytest.raises(TypeError, match="GPT2: fuse_residual must be a bool, got int"):
        GPT2(cfg, device="emu", fuse_residual=0)


def test_parse_variants():
    got = bench_gpu_step.parse_variants("flash=3; flash=5,graph=1 ;gemm=cublaslt_tuned,classifier=3,graph=0;"
                                        "lnfuse=0,graph=1;gemm=cublaslt_all,bgrad=1;flash=7,sched=heavy_first")
    base = dict(flash="auto", gemm="auto", classifier="auto", lnfuse=True, bgrad=False, sched="grouped",
                graph=False)
    assert got == [
        dict(base, flash=3), dict(base, flash=5, graph=True), dict(base, gemm="cublaslt_tuned", classifier=3),
        dict(base, lnfuse=False, graph=True), dict(base, gemm="cublaslt_all", bgrad=True),
        dict(base, flash=7, sched="heavy_first")]
    assert [bench_gpu_step.variant_name(v) for v in got] == [
        "llmcu flash v3", "llmcu flash v5 graph", "llmcu cublaslt_tuned classifier v3", "llmcu unfused-ln graph",
        "llmcu cublaslt_all bgrad-epilogue", "llmcu flash v7 heavy-first"]
    assert all(bench_gpu_step.parse_variants(bench_gpu_step.variant_spec(v)) == [v] for v in got)


@pytest.mark.parametrize("text,message", [
    ("flash=10", r"flash=10 in 'flash=10': expected one of \('auto', 1, 2, 3, 4, 5, 6, 7, 8, 9\)"),
    ("colour=red", r"'colour=red' in 'colour=red': expected key=value with key one of"),
    ("graph", r"'graph' in 'graph': expected key=value"),
    ("graph=yes", r"graph='yes' in 'graph=yes': expected one of \(False, True\)"),
    ("lnfuse=2", r"lnfuse='2' in 'lnfuse=2': expected one of \(False, True\)"),
    ("gemm=cutlass", r"gemm='cutlass' in 'gemm=cutlass': expected one of"),
    (" ; ", r"no variant in"),
    ("gemm=cublaslt,bgrad=1", r"bgrad=1 in 'gemm=cublaslt,bgrad=1' needs gemm= one of \('cublaslt_all', "
                              r"'cublaslt_all_tuned'\).*got gemm=cublaslt"),
    ("sched=heavy_first", r"sched=heavy_first in 'sched=heavy_first' needs flash= 3 to 9, got flash=auto"),
    ("flash=7,sched=last", r"sched='last' in 'flash=7,sched=last': expected one of \('grouped', 'heavy_first'\)"),
])
def test_parse_variants_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        bench_gpu_step.parse_variants(text)


def test_variant_spec_round_trips():
    for text in ("flash=3", "flash=7,gemm=cublaslt_all_tuned,bgrad=1,classifier=3,graph=1", "lnfuse=0"):
        for v in bench_gpu_step.parse_variants(text):
            assert bench_gpu_step.parse_variants(bench_gpu_step.variant_spec(v)) == [v]


def _result(rows):
    """A bench_gpu_step --json result with these (spec, ms) llmcu rows and a PyTorch row."""
    variants = {}
    steps = {"pytorch+compile": {"ms": 1.0, "peak_bytes": 0}}  # faster, but not an llmcu row
    for text, ms in rows:
        v = bench_gpu_step.parse_variants(text)[0]
        name = bench_gpu_step.variant_name(v)
        variants[name] = {**v, "spec": bench_gpu_step.variant_spec(v)}
        steps[name] = {"ms": ms, "peak_bytes": 0}
    return {"steps": steps, "variants": variants}


def test_best_variant(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import best_variant
    result = _result([("graph=0", 30.0), ("graph=1", 37.0), ("flash=7,graph=1", 35.0),
                      ("flash=8,gemm=cublaslt_all_tuned,bgrad=1,classifier=3,lnfuse=0,graph=1", 33.0)])
    name, v, ms = best_variant.best(result)
    assert (name, ms) == ("llmcu", 30.0)  # the eager row is the fastest here
    name, v, ms = best_variant.best(result, graph=1)
    assert ms == 33.0 and v["flash"] == 8
    assert best_variant.breakdown_flags(v) == ("--flash-version 8 --gemm cublaslt_all_tuned --classifier-version 3 "
                                               "--no-fuse-residual --bias-epilogue")
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps(result))
    assert best_variant.main([str(path), "--graph", "1"]) == 0
    assert capsys.readouterr().out.strip() == v["spec"]
    path.write_text(__import__("json").dumps({"steps": {"pytorch": {"ms": 1.0}}}))
    assert best_variant.main([str(path)]) == 1
    assert "no llmcu row" in capsys.readouterr().err


def test_best_variant_takes_the_faster_attention_schedule(tmp_path, capsys):
    """--attention (bench_attention.py's JSON): the fastest step variant gets sched=heavy_first
    when its attention version's heavy-first row was faster (fwd+bwd) than its grouped row;
    otherwise, or for flash=auto, it stays as timed."""
    import json
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import best_variant
    steps = _result([("graph=1", 37.0), ("flash=7,gemm=cublaslt_all_tuned,bgrad=1,graph=1", 34.0)])

    def attention(v7_grouped, v7_heavy):
        return {"rows": [{"name": "llmcu flash v3 bf16 (mma.sync)", "fwd_bwd_ms": 0.70},
                         {"name": "llmcu flash v7 bf16 (as v5, double-buffered Q/dO)", "fwd_bwd_ms": v7_grouped},
                         {"name": "llmcu flash v7 bf16 heavy-first", "fwd_bwd_ms": v7_heavy},
                         {"name": "torch sdpa flash bf16", "fwd_bwd_ms": 0.60}]}
    step_path, att_path = tmp_path / "steps.json", tmp_path / "att.json"
    step_path.write_text(json.dumps(steps))
    att_path.write_text(json.dumps(attention(0.65, 0.62)))
    assert best_variant.main([str(step_path), "--graph", "1", "--attention", str(att_path)]) == 0
    spec = capsys.readouterr().out.strip()
    assert spec == "flash=7,gemm=cublaslt_all_tuned,classifier=auto,lnfuse=1,bgrad=1,sched=heavy_first,graph=1"
    assert bench_gpu_step.parse_variants(spec)[0]["sched"] == "heavy_first"
    assert best_variant.main([str(step_path), "--graph", "1", "--attention", str(att_path),
                              "--breakdown-flags"]) == 0
    assert capsys.readouterr().out.strip().endswith("--bias-epilogue --flash-schedule heavy_first")
    att_path.write_text(json.dumps(attention(0.62, 0.65)))  # grouped faster: unchanged
    assert best_variant.main([str(step_path), "--graph", "1", "--attention", str(att_path)]) == 0
    assert capsys.readouterr().out.strip() == steps["variants"]["llmcu flash v7 cublaslt_all_tuned bgrad-epilogue graph"]["spec"]
    auto = best_variant.best(_result([("graph=1", 30.0)]))[1]
    assert best_variant.with_attention_schedule(auto, attention(0.65, 0.62)) is auto  # flash=auto: unknown version
    assert best_variant.main([str(step_path), "--attention", str(tmp_path / "missing.json")]) == 0  # still a spec
    assert "the schedule stays grouped" in capsys.readouterr().err


def test_json_written_after_each_row_is_whole_and_readable(tmp_path, monkeypatch):
    """bench_gpu_step writes its JSON after every row (a timeout keeps the finished rows):
    each write replaces the file whole, and a partial run's file already names its fastest
    variant for best_variant.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import argparse
    import json
    import best_variant
    variants = bench_gpu_step.parse_variants("graph=1;flash=7,graph=1;flash=9,graph=1")
    args = argparse.Namespace(dtype="bf16", steps=20)
    path = tmp_path / "r.json"
    results = {}
    for v, ms in zip(variants[:2], (37.0, 35.5)):  # the third row never finished
        results[bench_gpu_step.variant_name(v)] = (ms, 123)
        bench_gpu_step.write_json(path, "card", args, results, variants, [])
        got = json.loads(path.read_text())
        assert set(got["steps"]) == set(results) and got["card"] == "card"
        assert set(got["variants"]) == {bench_gpu_step.variant_name(v) for v in variants}
    assert best_variant.best(got)[:3:2] == ("llmcu flash v7 graph", 35.5)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left beside it

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(bench_gpu_step.os, "replace", broken_replace)
    results["llmcu flash v9 graph"] = (30.0, 1)
    with pytest.raises(OSError):
        bench_gpu_step.write_json(path, "card", args, results, variants, [])
    assert json.loads(path.read_text())["steps"] == got["steps"]  # the previous file, whole


def _quick_stage_variants() -> str:
    """The --variants text of scripts/gpu_check.sh's quick stage (line continuations joined)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh").read_text()
    quick = text[text.index('if [ "$stage" = quick ]'):]
    return re.search(r'--variants "([^"]*)"', quick.replace("\\\n", "")).group(1)


def test_main_runs_the_quick_stage_variants_with_stand_in_timings(tmp_path, monkeypatch, capsys):
    """bench_gpu_step.main() from the argument parsing to the summary, the ratio lines and the
    JSON, with the quick stage's own --variants text, and stand-ins for the two timing
    functions (which need a GPU) and for CuPy's device query: what runs between the timings
    is checked here, not first on a borrowed GPU. Every variant's keywords must be ones
    the GPU model accepts, and a variant that fails is reported and left out, the others kept."""
    import inspect
    import json
    import types
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import best_variant
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Stand-in GPU"}),
        Device=lambda: types.SimpleNamespace(id=0)))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    model_args = inspect.signature(GPT2).parameters
    calls = []
    from llmcu.config import gpt2_config, parameter_slices
    d6 = gpt2_config("d6")
    base_grads = np.random.default_rng(0).standard_normal(d6.num_parameters(), dtype=np.float32)
    wte = next(sl for name, sl, _ in parameter_slices(d6) if name == "wte")

    def fake_llmcu(config, params, x, y, steps, dtype="fp32", **kw):
        unknown = {"graph"} ^ (set(kw) - set(model_args))
        assert not unknown, f"keywords GPT2 does not take: {unknown}"
        calls.append(kw)
        if kw["flash_version"] == 8:
            raise RuntimeError("an untested kernel failed")
        ms = 40.0 - 2.0 * kw["graph"] - (kw["flash_version"] == 7) - 1.5 * (kw["classifier_version"] == 3)
        # gradients: the reference's plus rounding-sized noise, or (classifier 3 here) wrong ones
        wrong = kw["classifier_version"] == 3
        grads = base_grads * np.float32(1.001)
        if wrong:  # one tensor's gradient 30% off (the tied embedding, say)
            grads[wte] *= np.float32(1.3)
        return ms, 8 << 30, 10.9 + (0.2 if wrong else 0.0), grads

    monkeypatch.setattr(bench_gpu_step, "bench_llmcu_step", fake_llmcu)
    monkeypatch.setattr(bench_gpu_step, "bench_torch_step",
                        lambda config, params, x, y, steps, dtype="fp32", compile=False:
                        (53.8 if compile else 123.0, 20 << 30))
    text = _quick_stage_variants()
    out = tmp_path / "variants.json"
    assert bench_gpu_step.main(["--model", "d6", "-t", "64", "--dtype", "bf16", "-b", "2", "--compile",
                                "--no-kernels", "--steps", "2", "--variants", text, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    specs = bench_gpu_step.parse_variants(text)
    assert len(calls) == len(specs)
    failed = [bench_gpu_step.variant_name(v) for v in specs if v["flash"] == 8]
    assert failed and all(f"{name}: FAILED: RuntimeError: an untested kernel failed" in printed for name in failed)
    got = json.loads(out.read_text())
    assert got["card"] == "Stand-in GPU"
    assert set(got["steps"]) == ({bench_gpu_step.variant_name(v) for v in specs} - set(failed)
                                 | {"pytorch", "pytorch+compile"})
    assert "ratio llmcu flash v7 graph / llmcu graph (time; attention version against version 3): 0.974" in printed
    assert "ratio llmcu classifier v3 graph / llmcu graph" in printed
    assert "ratio llmcu graph / pytorch+compile (time): 0.706" in printed
    assert "MFU" in printed
    # the gradient cross-check: every llmcu row against the first (the defaults, eager)
    assert re.search(r"^llmcu: 40\.00 ms/step; first loss 10\.900000 \(\+0\.00e\+00\), gradients vs llmcu: "
                     r"relative L2 at most 0\.00e\+00 \(\w+\)$", printed, re.M), printed
    assert re.search(r"^llmcu classifier v3 graph: 36\.50 ms/step; first loss 11\.100000 \(\+2\.00e-01\), "
                     r"gradients vs llmcu: relative L2 at most 3\.00e-01 \(wte\) SUSPECT \(over 0\.05\)$",
                     printed, re.M), printed
    steps = got["steps"]
    for name, step in steps.items():
        if name.startswith("pytorch"):
            assert "grad_rel_err" not in step
            continue
        wrong = " classifier v3" in name
        assert step["suspect"] == wrong and (step["grad_rel_err"] > 0.05) == wrong, (name, step)
        assert (f"{name}: " in printed and "SUSPECT (over 0.05)" in printed.split(f"{name}: ")[1].splitlines()[0]) == wrong
    # the fastest graph row (flash 7 + classifier 3, 35.5 ms) has wrong gradients: passed over
    name, variant, ms = best_variant.best(got, graph=1)
    assert (name, ms) == ("llmcu flash v7 graph", 37.0), (name, ms)
