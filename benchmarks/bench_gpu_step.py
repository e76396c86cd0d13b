"""GPU benchmark of one training step: llmcu's product step, eager and as CUDA graphs, against
PyTorch eager and torch.compile, in the same process.

    python benchmarks/bench_gpu_step.py [--model d12] [-b 4] [-t 1024] [--dtype fp32|bf16]
                                        [--steps 20] [--cuda-graph] [--compile] [--json out.json]

--dtype bf16: llmcu's mixed precision (GPT2(dtype="bf16"), fp32 master weights) against
PyTorch under bf16 autocast (fp32 parameters and AdamW); fp32 has TF32 off on both sides.
Rows: "llmcu" (the step from Python, about 500 launches), "llmcu graph" (--cuda-graph: the
same step as two CUDA graph replays, llmcu/cuda/graphs.py), "pytorch" and "pytorch+compile"
(--compile). Each row: the median of --steps CUDA-event timings after warm-up, tokens/s, MFU
by llm.c's formula (config.flops_per_token, llmcu.mfu) against --peak-tflops, and peak
memory (CuPy's pool for llmcu, which allocates once; torch.cuda.max_memory_allocated).

The step has no kernel choices (one kernel per op, GPT2.kernel_table()): a lab version is
measured by benchmarks/lab.py, then, once promoted, here as the new default.

The graph row's first forward/backward is a graph replay: its loss and gradients are compared
with the eager row's (relative L2 per parameter tensor); a row over GRAD_TOLERANCE is printed
SUSPECT and marked so in the JSON. The JSON (--json) is rewritten whole after every row, so a
run stopped by a timeout keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Relative L2 norm of (graph - eager) gradients in any parameter tensor above which a row is
# SUSPECT. The graph replays the eager step's kernels on the same buffers, so the two agree to
# the last bit unless a replay reads something stale; 0.05 also leaves room for rounding.
GRAD_TOLERANCE = 0.05


def step_time(fn, reps: int, device: str = "cuda", warmup: int = 3) -> float:
    """Median milliseconds of fn(): CUDA events on the current stream, or (device "emu", the
    kernels on the CPU, for tests) time.perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            import cupy
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def grads_fp32(model) -> np.ndarray:
    """The model's flat gradients as fp32 on the host (bf16 widened there: nothing allocated
    on the device, so the peak-memory figures stay the step's)."""
    from llmcu.formats import bf16_bits_to_float32
    g = model.grads.get() if hasattr(model.grads, "get") else np.asarray(model.grads)
    return bf16_bits_to_float32(g) if g.dtype == np.uint16 else g.astype(np.float32)


def bench_llmcu_step(config, params, x, y, steps, dtype="fp32", graph=False, device="cuda"):
    """(median ms, peak bytes, first loss, first gradients (fp32, host)) of one llmcu step,
    eager or (graph=True) as CUDA graphs. The first loss and gradients come from the first
    forward/backward from `params`, before any update: the eager model's, or the graph's
    first replay. Peak bytes: what CuPy's pool holds (0 on the emulator)."""
    from llmcu.cuda.gpt2 import GPT2
    from llmcu.cuda.graphs import GraphStep
    pool = None
    if device == "cuda":
        import cupy
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
    model = GPT2(config, params, device=device, dtype=dtype)
    B, T = x.shape
    if graph:
        graphed = GraphStep(model, B, T, grad_clip=1.0)
        loss, _ = graphed.forward_backward([(x, y)])

        def step():
            graphed.forward_backward([(x, y)])
            graphed.update(1e-4, 1)
    else:
        model.zero_grad()
        loss = model.forward(x, y)
        model.backward()

        def step():
            model.zero_grad()
            model.forward(x, y)
            model.backward()
            model.update(1e-4, 1, grad_clip=1.0)
    grads = grads_fp32(model)
    ms = step_time(step, steps, device)
    return ms, pool.total_bytes() if pool is not None else 0, loss, grads


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
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=False)
        with autocast():
            _, loss = run(xt, yt)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return step_time(step, steps), torch.cuda.max_memory_allocated()


def write_json(path, card: str, args, results: dict, checks: dict) -> None:
    """The run's JSON (card, arguments, each finished row's ms, tokens/s, MFU, peak bytes and,
    for the graph row, its cross-check), replaced whole: written to a temporary file beside it
    and renamed, so a run stopped mid-write leaves the previous complete file."""
    path = Path(path)
    text = json.dumps({"card": card, "args": vars(args), "dtype": args.dtype,
                       "steps": {k: {**row, **checks.get(k, {})} for k, row in results.items()}}, indent=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch-size", type=int, default=4)
    ap.add_argument("-t", "--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cuda-graph", action="store_true", help="also time llmcu's step as CUDA graphs")
    ap.add_argument("--compile", action="store_true", help="also time PyTorch with torch.compile")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak for MFU (H100 SXM: 989)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from llmcu.config import gpt2_config, parameter_slices
    from llmcu.cpu.gpt2 import init_parameters
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
    slices = {name: sl for name, sl, _ in parameter_slices(config)}
    results, checks, ref = {}, {}, None

    def record(name, ms, peak):
        util = mfu(config.flops_per_token(T), B * T, ms * 1e-3, a.peak_tflops)  # llm.c's 6N + 6LCT
        results[name] = {"ms": ms, "tok_s": B * T / ms * 1e3, "mfu": util, "peak_bytes": peak}
        if a.json:  # after every row: a run cut by a timeout keeps the rows it finished
            write_json(a.json, card, a, results, checks)

    for graph in (False, True) if a.cuda_graph else (False,):
        name = "llmcu graph" if graph else "llmcu"
        try:
            ms, peak, loss, grads = bench_llmcu_step(config, params.copy(), x, y, a.steps, a.dtype, graph)
        except Exception as e:  # noqa: BLE001  (one failing row must not lose the others)
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            continue
        line = f"{name}: {ms:.2f} ms/step; first loss {loss:.6f}"
        if ref is None:  # the first row that ran is the reference of the cross-check
            ref_name, ref = name, (loss, grads)
        else:
            c = checks[name] = check_against(ref, loss, grads, slices)
            line += (f" ({c['loss_diff']:+.2e}), gradients vs {ref_name}: relative L2 at most "
                     f"{c['grad_rel_err']:.2e} ({c['worst']})"
                     + (f" SUSPECT (over {GRAD_TOLERANCE})" if c["suspect"] else ""))
        del grads
        print(line, flush=True)
        record(name, ms, peak)
    for name, compiled in (("pytorch", False),) + ((("pytorch+compile", True),) if a.compile else ()):
        try:  # PyTorch eager may not fit a batch llmcu fits: report it, keep the other rows
            ms, peak = bench_torch_step(config, params.copy(), x, y, a.steps, a.dtype, compile=compiled)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  flush=True)
            import torch
            torch.cuda.empty_cache()
            continue
        print(f"{name}: {ms:.2f} ms/step", flush=True)
        record(name, ms, peak)
    for name, r in results.items():
        print(f"{name:16s} {r['ms']:9.2f} ms/step {r['tok_s']:10.0f} tok/s  MFU {100 * r['mfu']:5.1f}% "
              f"of {a.peak_tflops:g} TFLOP/s  peak memory {r['peak_bytes'] / 2**30:6.2f} GiB")
    if "llmcu" in results and "llmcu graph" in results:
        print(f"ratio llmcu graph / llmcu (time; launch overhead removed by the graphs): "
              f"{results['llmcu graph']['ms'] / results['llmcu']['ms']:.3f}")
    for ours in [k for k in results if k.startswith("llmcu")]:
        for peer in [k for k in results if k.startswith("pytorch")]:
            print(f"ratio {ours} / {peer} (time): {results[ours]['ms'] / results[peer]['ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
