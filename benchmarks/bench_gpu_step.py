"""GPU benchmark (fp32 with TF32 off, or bf16): llmcu's kernel step against PyTorch, and per-kernel times.

    python benchmarks/bench_gpu_step.py [--model d12] [-b 4] [-t 1024] [--steps 20] [--json out.json]
                                        [--dtype fp32|bf16]

--dtype bf16: llmcu's mixed precision (GPT2(dtype="bf16"), fp32 master weights)
against PyTorch under bf16 autocast (fp32 parameters and AdamW), with MFU by
llm.c's formula (config.flops_per_token) against --peak-tflops (H100 SXM bf16:
989). Measured on an H200 (benchmarks/RESULTS.md, GPU pass 3).

Needs CuPy and a CUDA build of PyTorch on an NVIDIA GPU. Step times are
medians of CUDA-event timings after warm-up; per-kernel rows give time and the
achieved GB/s of the napkin-math bytes each kernel must move at least once.

Each llmcu row also runs one forward/backward from the same parameters before it is
timed, and its loss and gradients are compared with the first row's: a row whose
gradients differ by more than GRAD_TOLERANCE (relative L2, in any parameter tensor) is
printed SUSPECT, marked so in the JSON, and never chosen by scripts/best_variant.py. So
a variant with a kernel that computes wrong gradients at full size is seen in the same
run that times it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cuda_time(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events on the current stream."""
    import cupy
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def grads_fp32(model) -> np.ndarray:
    """The model's flat gradients as fp32 on the host (bf16 bit patterns widened there, so the
    check allocates nothing on the device and the rows' peak-memory figures stay the step's)."""
    from llmcu.formats import bf16_bits_to_float32
    g = model.grads.get()
    return bf16_bits_to_float32(g) if g.dtype == np.uint16 else g.astype(np.float32)


def bench_llmcu_step(config, params, x, y, steps, dtype="fp32", flash_version="auto", graph=False,
                     gemm="cublas", classifier_version="auto", fuse_residual=True, bias_epilogue=False,
                     flash_schedule="grouped"):
    """(median ms, peak bytes held by CuPy's memory pool, first loss, first gradients) of one
    llmcu step; graph=True runs it as CUDA graphs (llmcu/cuda/graphs.py: one replay for the
    forward/backward, one for the update) instead of ~500 launches from Python. The loss
    and the fp32 gradients (a host array) of one forward/backward from `params`, before any
    update, are for the cross-check of the rows against each other (check_against)."""
    import cupy
    from llmcu.cuda.gpt2 import GPT2
    from llmcu.cuda.graphs import GraphStep
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    model = GPT2(config, params, device="cuda", dtype=dtype, flash_version=flash_version, gemm=gemm,
                 classifier_version=classifier_version, fuse_residual=fuse_residual,
                 bias_epilogue=bias_epilogue, flash_schedule=flash_schedule)
    B, T = x.shape
    model.zero_grad()
    loss = model.forward(x, y)
    model.backward()
    grads = grads_fp32(model)

    if graph:
        graphed = GraphStep(model, B, T, grad_clip=1.0)

        def step():
            graphed.forward_backward([(x, y)])
            graphed.update(1e-4, 1)
    else:
        def step():
            model.zero_grad()
            model.forward(x, y)
            model.backward()
            model.update(1e-4, 1, grad_clip=1.0)
    ms = cuda_time(step, steps)
    return ms, pool.total_bytes(), loss, grads  # llmcu allocates once: what the pool holds is the peak


# A row whose first gradients differ from the reference row's by more than this in some
# parameter tensor (relative L2 norm of the difference, per tensor) is flagged SUSPECT and
# left out by scripts/best_variant.py. Rows that differ only in rounding sit well below it:
# on the emulator (2 layers, C=128, T=128, bf16) attention version 1 against 3, the
# unfused layernorms, the cuBLASLt route, and even the fp32 model against the bf16 one
# differ by at most 0.9% in any tensor. A kernel computing a wrong gradient shows in its
# own tensors and in every tensor upstream of it.
GRAD_TOLERANCE = 0.05


def check_against(ref, loss, grads, slices) -> dict:
    """{loss, loss_diff, grad_rel_err, worst, suspect} of a row's first loss and gradients
    against the reference row's (ref = (loss, grads)): grad_rel_err is the largest, over the
    parameter tensors (slices: name -> slice of the flat gradients), of |g - g_ref| / |g_ref|
    (L2), worst the tensor where it is."""
    ref_loss, ref_grads = ref
    errs = {}
    for name, sl in slices.items():
        r = ref_grads[sl].astype(np.float64)
        d = grads[sl].astype(np.float64) - r
        errs[name] = float(np.sqrt(np.dot(d, d)) / max(np.sqrt(np.dot(r, r)), 1e-30))
    worst = max(errs, key=lambda k: (np.isnan(errs[k]), errs[k]))
    err = errs[worst]
    return {"loss": float(loss), "loss_diff": float(loss) - float(ref_loss), "grad_rel_err": err,
            "worst": worst, "suspect": not err <= GRAD_TOLERANCE}  # NaN is suspect too


def bench_torch_step(config, params, x, y, steps, dtype="fp32", compile=False):
    """(median ms, peak bytes allocated) of one PyTorch step, eager or torch.compile'd."""
    import contextlib

    import torch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from llmcu import torch_gpt2
    model = torch_gpt2.from_flat(config, params, device="cuda")
    opt = torch_gpt2.configure_optimizer(model, lr=1e-4)
    run = torch.compile(model) if compile else model
    xt = torch.from_numpy(x).long().cuda()
    yt = torch.from_numpy(y).long().cuda()

    def autocast():
        if dtype == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=False)
        with autocast():
            _, loss = run(xt, yt)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times), torch.cuda.max_memory_allocated()


def bench_kernels(config, B, T, reps):
    """(name, ms, GB/s) for the memory-bound kernels at this model's shapes."""
    import cupy
    from llmcu.cuda import adamw, attention, classifier, encoder, gelu, layernorm, residual
    C, NH, Vp, V = config.channels, config.num_heads, config.padded_vocab_size, config.vocab_size
    f = lambda *s: cupy.random.standard_normal(s, dtype=np.float32)  # noqa: E731
    inp = cupy.random.randint(0, V, (B, T)).astype(np.int32)
    x, out, w, b = f(B, T, C), f(B, T, C), f(C), f(C)
    mean, rstd = f(B, T), f(B, T)
    h, h2 = f(B, T, 4 * C), f(B, T, 4 * C)
    wte, wpe = f(Vp, C), f(config.max_seq_len, C)
    logits, losses, targets = f(B, T, Vp), f(B, T), cupy.random.randint(0, V, (B, T)).astype(np.int32)
    qkv, att = f(B, T, 3 * C), f(B, NH, T, T)
    n = config.num_parameters()
    P, G, M, Vv = f(n), f(n), f(n), cupy.abs(f(n))
    from llmcu.config import parameter_slices
    table = adamw.adamw_tensor_table(cupy, [sl for _, sl, _ in parameter_slices(config)],
                                     [0.0 for _ in parameter_slices(config)])
    hyper = cupy.asarray(adamw.adamw_hyper(1e-4, 1))
    seed = cupy.asarray(np.array([42, 1], dtype=np.uint32))
    fl = 4  # bytes per float
    rows = [
        ("encoder_forward", lambda: encoder.encoder_forward(out, inp, wte, wpe), 3 * B * T * C * fl),
        ("layernorm_forward", lambda: layernorm.layernorm_forward(out, mean, rstd, x, w, b), 2 * B * T * C * fl),
        ("layernorm_backward", lambda: layernorm.layernorm_backward(out, w, b, x, x, w, mean, rstd), 3 * B * T * C * fl),
        ("gelu_forward", lambda: gelu.gelu_forward(h2, h), 2 * B * T * 4 * C * fl),
        ("gelu_backward", lambda: gelu.gelu_backward(h2, h, h), 3 * B * T * 4 * C * fl),
        ("residual_forward", lambda: residual.residual_forward(out, x, x), 3 * B * T * C * fl),
        ("crossentropy_forward", lambda: classifier.crossentropy_forward(losses, logits, targets, V), B * T * Vp * fl),
        ("attention_forward (incl. GEMMs)", lambda: attention.attention_forward(out, att, qkv, NH),
         (B * T * 4 * C + 2 * B * NH * T * T) * fl),
        ("adamw_update", lambda: adamw.adamw_update(P, G, M, Vv, 1, 1e-4), 7 * n * fl),
        ("adamw_multi_tensor (every tensor, one launch)",
         lambda: adamw.adamw_multi_tensor(P, G, M, Vv, table, hyper, seed), 7 * n * fl),
        ("global_norm", lambda: adamw.global_norm(G), n * fl),
    ]
    out_rows = []
    for name, fn, nbytes in rows:
        ms = cuda_time(fn, reps)
        out_rows.append((name, ms, nbytes / (ms * 1e-3) / 1e9))
    return out_rows


VARIANT_KEYS = {"flash": "auto", "gemm": "auto", "classifier": "auto", "lnfuse": True, "bgrad": False,
                "sched": "grouped", "graph": False}


def parse_variants(text: str) -> list[dict]:
    """--variants: 'flash=5,graph=1;gemm=cublaslt_tuned' -> [{flash: 5, gemm: auto, classifier:
    auto, graph: True}, ...]; ValueError naming the spec and what was expected."""
    from llmcu.cuda.classifier import VERSIONS as CLASSIFIER_VERSIONS
    from llmcu.cuda.gpt2 import FLASH_VERSIONS
    from llmcu.cuda.attention import SCHEDULES
    from llmcu.cuda.matmul import GEMM_LIBRARIES, LT_ALL
    out = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        v = dict(VARIANT_KEYS)
        for item in filter(None, (i.strip() for i in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in VARIANT_KEYS:
                raise ValueError(f"--variants: '{item}' in '{spec}': expected key=value with key one of "
                                 f"{sorted(VARIANT_KEYS)}")
            if key in ("flash", "classifier"):
                value = value if value == "auto" else int(value)
                allowed = FLASH_VERSIONS if key == "flash" else CLASSIFIER_VERSIONS + ("auto",)
            elif key == "gemm":
                allowed = GEMM_LIBRARIES + ("auto",)
            elif key == "sched":
                allowed = SCHEDULES
            else:  # graph, lnfuse, bgrad
                value, allowed = {"0": False, "1": True}.get(value, value), (False, True)
            if value not in allowed:
                raise ValueError(f"--variants: {key}={value!r} in '{spec}': expected one of {allowed}")
            v[key] = value
        if v["bgrad"] and v["gemm"] not in LT_ALL:  # GPT2 refuses it too, but on the GPU, later
            raise ValueError(f"--variants: bgrad=1 in '{spec}' needs gemm= one of {LT_ALL} (the bias "
                             f"gradients come from their cuBLASLt epilogue), got gemm={v['gemm']}")
        if v["sched"] != "grouped" and v["flash"] in ("auto", 1, 2):
            raise ValueError(f"--variants: sched={v['sched']} in '{spec}' needs flash= 3 to 9, got "
                             f"flash={v['flash']}")
        out.append(v)
    if not out:
        raise ValueError(f"--variants: no variant in {text!r}")
    return out


def variant_spec(spec: dict) -> str:
    """The --variants text of one variant (parse_variants(variant_spec(v)) == [v])."""
    def text(value):
        return str(int(value)) if isinstance(value, bool) else str(value)
    return ",".join(f"{key}={text(spec[key])}" for key in VARIANT_KEYS)


def write_json(path, card: str, args, results: dict, variants: list, kernels: list,
               checks: dict | None = None) -> None:
    """The run's JSON (card, arguments, each finished row's ms and peak bytes, and for llmcu
    rows its gradient cross-check, every variant's spec, the kernel rows), replaced whole:
    written to a temporary file beside it and renamed, so a run stopped mid-write leaves the
    previous complete file, never half of one."""
    path = Path(path)
    checks = checks or {}
    text = json.dumps({"card": card, "args": vars(args), "dtype": args.dtype,
                       "steps": {k: {"ms": ms, "peak_bytes": peak, **checks.get(k, {})}
                                 for k, (ms, peak) in results.items()},
                       "variants": {variant_name(v): {**v, "spec": variant_spec(v)} for v in variants},
                       "kernels": kernels}, indent=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def variant_name(spec: dict) -> str:
    """The row name: 'llmcu' plus what differs from the defaults (same names as the grid's)."""
    name = "llmcu" if spec["flash"] == "auto" else f"llmcu flash v{spec['flash']}"
    name += "" if spec["gemm"] == "auto" else f" {spec['gemm']}"
    name += "" if spec["classifier"] == "auto" else f" classifier v{spec['classifier']}"
    name += "" if spec["lnfuse"] else " unfused-ln"
    name += " bgrad-epilogue" if spec["bgrad"] else ""
    name += "" if spec.get("sched", "grouped") == "grouped" else f" {spec['sched'].replace('_', '-')}"
    return name + (" graph" if spec["graph"] else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch-size", type=int, default=4)
    ap.add_argument("-t", "--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time PyTorch with torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--flash-versions", default="auto",
                    help="comma-separated fused-attention versions to time llmcu with, each its own "
                         "row (auto, 1, 2, 3; e.g. 2,3), in the same run")
    ap.add_argument("--no-kernels", action="store_true", help="skip the per-kernel rows")
    ap.add_argument("--gemm", default="auto",
                    help="comma-separated GEMM libraries for llmcu's linear layers, each its own row: "
                         "cublas (cuBLAS + llmcu's bias and GELU kernels), cublaslt (bias and GELU "
                         "as cuBLASLt epilogues), cublaslt_all (every overwriting GEMM on cuBLASLt), "
                         "cublaslt_tuned / cublaslt_all_tuned (the same with cuBLASLt's algorithms "
                         "autotuned per shape; the decisions are printed), auto (the model's default)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time each llmcu row as CUDA graphs (the same step, launched from "
                         "two graph replays), in the same run")
    ap.add_argument("--variants", default=None,
                    help="instead of the flash x gemm x graph grid, these llmcu rows only: "
                         "';'-separated specs of comma-separated key=value (flash=auto|1..9, "
                         "gemm=<a --gemm name>, classifier=auto|1|2|3, lnfuse=0|1 (the residual + "
                         "layernorm fusions), bgrad=0|1 (bias gradients from cuBLASLt's BGRADB "
                         "epilogue; with gemm=cublaslt_all[_tuned]), sched=grouped|heavy_first (the "
                         "attention blocks' order; with flash=3..9), graph=0|1), e.g. "
                         "'flash=3;flash=5,graph=1;flash=5,gemm=cublaslt_tuned,classifier=3,graph=1'")
    a = ap.parse_args(argv)
    versions = [v if v == "auto" else int(v) for v in a.flash_versions.split(",")]
    variants = parse_variants(a.variants) if a.variants else None
    import cupy
    from llmcu.config import gpt2_config
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.cuda import cublaslt
    from llmcu.mfu import device_name, mfu
    config = gpt2_config(a.model)
    B, T = a.batch_size, a.seq_len
    params = init_parameters(config, seed=42)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    card = device_name()
    precision = "fp32 (TF32 off)" if a.dtype == "fp32" else "bf16 (llmcu mixed precision; PyTorch autocast)"
    print(f"card: {card}; GPT-2 {a.model}, B={B}, T={T}, {precision}, median of {a.steps} steps")
    if variants is None:
        variants = [dict(VARIANT_KEYS, flash=v, gemm=gemm, graph=graph)
                    for v in versions for gemm in a.gemm.split(",")
                    for graph in ((False, True) if a.cuda_graph else (False,))]
    from llmcu.config import parameter_slices
    slices = {name: sl for name, sl, _ in parameter_slices(config)}
    results, checks, ref = {}, {}, None
    for spec in variants:
        row = variant_name(spec)
        tuned_before = len(cublaslt.tuning_report())
        try:  # one failing variant (an untested kernel) must not lose the other rows
            ms, peak, loss, grads = bench_llmcu_step(
                config, params.copy(), x, y, a.steps, a.dtype, flash_version=spec["flash"],
                graph=spec["graph"], gemm=spec["gemm"], classifier_version=spec["classifier"],
                fuse_residual=spec["lnfuse"], bias_epilogue=spec["bgrad"], flash_schedule=spec["sched"])
            results[row] = (ms, peak)
            if ref is None:  # the first row that ran is the reference of the cross-check
                ref_row, ref = row, (loss, grads)
            checks[row] = check_against(ref, loss, grads, slices)
            del grads
            c = checks[row]
            print(f"{row}: {ms:.2f} ms/step; first loss {c['loss']:.6f} ({c['loss_diff']:+.2e}), gradients "
                  f"vs {ref_row}: relative L2 at most {c['grad_rel_err']:.2e} ({c['worst']})"
                  + (f" SUSPECT (over {GRAD_TOLERANCE})" if c["suspect"] else ""), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{row}: FAILED: {type(e).__name__}: {e}", flush=True)
        if a.json:  # after every row: a run cut by a timeout keeps the rows it finished
            write_json(a.json, card, a, results, variants, [], checks)
        for line in cublaslt.tuning_lines(cublaslt.tuning_report()[tuned_before:]):
            print(f"{row}: {line}", flush=True)  # the autotune decisions this row made
    for name, compiled in (("pytorch", False),) + ((("pytorch+compile", True),) if a.compile else ()):
        try:  # PyTorch eager may not fit a batch llmcu fits: report it, keep the other rows
            results[name] = bench_torch_step(config, params.copy(), x, y, a.steps, a.dtype,
                                             compile=compiled)
            print(f"{name}: {results[name][0]:.2f} ms/step", flush=True)  # kept if a timeout cuts the run
            if a.json:
                write_json(a.json, card, a, results, variants, [], checks)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  flush=True)
            import torch
            torch.cuda.empty_cache()
    tok = B * T
    for name, (ms, peak) in results.items():
        util = mfu(config.flops_per_token(T), tok, ms * 1e-3, a.peak_tflops)  # llm.c's 6N + 6LCT per token
        print(f"{name:34s} {ms:9.2f} ms/step {tok / ms * 1e3:10.0f} tok/s  MFU {100 * util:5.1f}% "
              f"of {a.peak_tflops:g} TFLOP/s  peak memory {peak / 2**30:6.2f} GiB")
    for ours in [k for k in results if k.startswith("llmcu") and "_tuned" in k]:
        base = ours.replace("_tuned", "")
        if base in results:
            print(f"ratio {ours} / {base} (time; autotuned cuBLASLt algorithms against the "
                  f"heuristic's first): {results[ours][0] / results[base][0]:.3f}")
    for ours in [k for k in results if k.startswith("llmcu") and " cublaslt" in k and "_tuned" not in k]:
        base = ours.replace(" cublaslt_all", " cublaslt") if "cublaslt_all" in ours else \
            ours.replace(" cublaslt", " cublas")
        if base not in results:
            continue
        what = ("every GEMM on cuBLASLt against the epilogue GEMMs only" if "cublaslt_all" in ours
                else "cuBLASLt epilogues against cuBLAS + kernels")
        print(f"ratio {ours} / {base} (time; {what}): {results[ours][0] / results[base][0]:.3f}")
    for ours in [k for k in results if re.search(r"flash v([4-9]|\d\d)", k)]:
        base = re.sub(r"flash v\d+", "flash v3", ours)
        if base not in results:
            base = base.replace("llmcu flash v3", "llmcu")  # auto = version 3 on a GPU (bf16, hs 64)
        if base in results:
            print(f"ratio {ours} / {base} (time; attention version against version 3): "
                  f"{results[ours][0] / results[base][0]:.3f}")
    for ours in [k for k in results if " classifier v" in k or " unfused-ln" in k or " bgrad-epilogue" in k]:
        base = re.sub(r" classifier v\d| unfused-ln| bgrad-epilogue", "", ours)
        if base in results:
            print(f"ratio {ours} / {base} (time; the classifier version / the unfused layernorms "
                  f"against the defaults): "
                  f"{results[ours][0] / results[base][0]:.3f}")
    for ours in [k for k in results if k.startswith("llmcu") and k.endswith(" graph")]:
        eager = ours[:-len(" graph")]
        if eager not in results:
            continue
        print(f"ratio {ours} / {eager} (time; launch overhead removed by the graphs): "
              f"{results[ours][0] / results[eager][0]:.3f}")
    for ours in [k for k in results if k.startswith("llmcu")]:
        for peer in [k for k in results if k.startswith("pytorch")]:
            print(f"ratio {ours} / {peer} (time): {results[ours][0] / results[peer][0]:.3f}")
    kernels = [] if a.no_kernels else bench_kernels(config, B, T, reps=20)
    if kernels:
        print(f"{'kernel':34s} {'ms':>9s} {'GB/s':>8s}")
    for name, ms, gbs in kernels:
        print(f"{name:34s} {ms:9.3f} {gbs:8.1f}")
    if a.json:
        write_json(a.json, card, a, results, variants, kernels, checks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
