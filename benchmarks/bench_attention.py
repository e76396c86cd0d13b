"""Causal attention on the GPU: llmcu's fused kernels against PyTorch's flash backend
and against llmcu's simple path, at GPT-2 124M shapes.

    python benchmarks/bench_attention.py [-b 16] [--heads 12] [-t 1024] [--hs 64] [--reps 20] [--json out.json]

Needs CuPy and an NVIDIA GPU (and a CUDA PyTorch for the peer rows); without a
GPU it prints why and exits 0. Times are medians of CUDA-event timings after
warm-up, one row per implementation:

  llmcu flash v1 fp32    attention_flash_*_kernel1 (scalar fp32, the readable version)
  llmcu flash v2 bf16    attention_flash_*_kernel2 (wmma tensor cores, bf16 in, fp32 accumulate)
  llmcu flash v3 bf16    attention_flash_*_kernel3 (mma.sync, scores and output in registers)
  llmcu flash v4 bf16    attention_flash_*_kernel4 (version 3 with double-buffered tile loads)
  llmcu flash v5 bf16    version 3's forward; the backward in one pass over key tiles, dQ
                         added into an fp32 buffer with atomics (5 tile products, not 7)
  llmcu flash v6 bf16    version 5 with 128 keys (8 warps) per backward block
  llmcu flash v7, v8     versions 5 and 6 with two query/dO buffers (the next tile's loads in flight)
  llmcu flash v9 bf16    version 7's backward; a forward with 128 query rows (8 warps) per block
  ... heavy-first        versions 3 to 9 again with schedule="heavy_first": the blocks go out
                         heaviest causal tiles first over the whole grid (a shorter last wave)
                         instead of one (head, batch) at a time (which shares L2)
  llmcu simple fp32      permute + cuBLAS GEMMs (CuPy) + softmax kernels, (B,NH,T,T) stored
  torch sdpa flash bf16  F.scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION, is_causal
  torch sdpa efficient fp32  the same with SDPBackend.EFFICIENT_ATTENTION (flash has no fp32):
                         the fp32 peer of the v1 row

All rows start from a (B,T,3C) qkv tensor (PyTorch gets strided q, k, v views
of it, as nanoGPT does) and produce a (B,T,C)-equivalent output; "fwd+bwd" is
one forward and one backward returning d(qkv). Each row's output and d(qkv) are
compared with the simple fp32 path's (the largest absolute difference): a check
at full size that a fast row computes the right thing. Last, each llmcu bf16 row's
time over PyTorch's flash row's (below 1: llmcu is faster), and the fastest of them.

Napkin math (FlashAttention's convention): the causal forward does two
(T x T x hs) GEMMs per head, half of them masked: 4 * B * NH * T^2 * hs / 2
FLOPs; the backward does five, 2.5x the forward; fwd+bwd = 3.5x the forward.
TFLOP/s = those FLOPs / time, whatever work a row really does (the simple path
also computes the masked half).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def attention_flops(B, NH, T, hs) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of causal attention (see the docstring)."""
    fwd = 4.0 * B * NH * T * T * hs / 2
    return fwd, 3.5 * fwd


def _event_ms(fn) -> float:
    import cupy
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end)


def cuda_time(fn, reps: int, warmup: int = 2, budget_ms: float = 3000.0) -> float:
    """Median milliseconds of fn() by CUDA events (CuPy's current stream; PyTorch's
    default stream is the same legacy default stream). Slow rows (the scalar
    version 1) get fewer repetitions, at least 3, so the run stays within budget_ms."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    first = _event_ms(fn)
    reps = max(3, min(reps, int(budget_ms / max(first, 1e-3))))
    times = [first]
    for _ in range(reps - 1):
        times.append(_event_ms(fn))
    return statistics.median(times)


def llmcu_rows(qkv32, dout32, NH, reps):
    import cupy
    from llmcu.cuda import attention as k
    from llmcu.formats import float32_to_bf16_bits
    B, T, C3 = qkv32.shape
    C = C3 // 3
    rows = {}

    qkv, dout = cupy.asarray(qkv32), cupy.asarray(dout32)
    out, lse, dqkv = cupy.empty((B, T, C), np.float32), cupy.empty((B, NH, T), np.float32), cupy.empty_like(qkv)

    def v1_fwd():
        k.flash_attention_forward(out, lse, qkv, NH, version=1)

    def v1_both():
        v1_fwd()
        k.flash_attention_backward(dqkv, dout, qkv, out, lse, NH, version=1)
    rows["llmcu flash v1 fp32"] = (cuda_time(v1_fwd, reps), cuda_time(v1_both, reps), out.get(), dqkv.get())

    qkv16, dout16 = float32_to_bf16_bits(qkv), float32_to_bf16_bits(dout)
    versions = ((2, "wmma"), (3, "mma.sync"), (4, "mma.sync, pipelined loads"),
                (5, "mma.sync, one-pass backward, atomic dQ"), (6, "as v5, 128-key backward blocks"),
                (7, "as v5, double-buffered Q/dO"), (8, "as v6, double-buffered Q/dO"),
                (9, "v7's backward, 128-row forward blocks"))
    # each version in the default block order, then versions 3 to 9 again heaviest blocks first
    runs = [(v, f"({how})", "grouped") for v, how in versions]
    runs += [(v, "heavy-first", "heavy_first") for v, _ in versions if v >= 3]
    for version, label, schedule in runs:
        out16, dqkv16 = cupy.empty((B, T, C), np.uint16), cupy.empty_like(qkv16)

        def fwd(version=version, out16=out16, schedule=schedule):
            k.flash_attention_forward(out16, lse, qkv16, NH, version=version, schedule=schedule)

        def both(version=version, out16=out16, dqkv16=dqkv16, schedule=schedule):
            fwd()
            k.flash_attention_backward(dqkv16, dout16, qkv16, out16, lse, NH, version=version,
                                       schedule=schedule)
        name = f"llmcu flash v{version} bf16 {label}"
        try:
            rows[name] = (cuda_time(fwd, reps), cuda_time(both, reps), out16, dqkv16)
        except Exception as e:  # e.g. the module was built without the tensor-core kernels
            print(f"{name}: failed: {type(e).__name__}: {e}")

    att = cupy.empty((B, NH, T, T), np.float32)

    def simple_fwd():
        k.attention_forward(out, att, qkv, NH)

    def simple_both():
        simple_fwd()
        k.attention_backward(dqkv, dout, qkv, att, NH)
    rows["llmcu simple fp32"] = (cuda_time(simple_fwd, reps), cuda_time(simple_both, reps), out.get(), dqkv.get())
    return rows


TORCH_FLASH = "torch sdpa flash bf16"


def ratio_lines(times: dict) -> tuple[list[str], dict]:
    """Each llmcu bf16 row's forward and forward+backward time over PyTorch's flash row's, and
    the fastest llmcu bf16 row of each: (printable lines, the same as a dict for the JSON).
    times: {row name: (fwd ms, fwd+bwd ms)}. No lines without the PyTorch row."""
    if TORCH_FLASH not in times:
        return [f"no {TORCH_FLASH} row: no ratios"], {}
    tf, tb = times[TORCH_FLASH]
    ours = {name: t for name, t in times.items() if name.startswith("llmcu flash") and "bf16" in name}
    lines = [f"against {TORCH_FLASH} (llmcu ms / torch ms; below 1: llmcu is faster):"]
    ratios = {}
    for name, (t_fwd, t_both) in ours.items():
        ratios[name] = dict(fwd=t_fwd / tf, fwd_bwd=t_both / tb)
        lines.append(f"  {name:<62} fwd {t_fwd / tf:6.3f}   fwd+bwd {t_both / tb:6.3f}")
    best = {}
    for key, column, torch_ms in (("fwd", 0, tf), ("fwd_bwd", 1, tb)):
        if ours:
            name = min(ours, key=lambda n: ours[n][column])
            best[key] = dict(row=name, ms=ours[name][column], torch_ms=torch_ms,
                             ratio=ours[name][column] / torch_ms)
            lines.append(f"fastest llmcu {key.replace('_', '+')}: {name}, {ours[name][column]:.3f} ms against "
                         f"{torch_ms:.3f} ms ({ours[name][column] / torch_ms:.3f}x the time)")
    return lines, dict(per_row=ratios, best=best)


def torch_rows(qkv32, dout32, NH, reps):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.backends.cuda.matmul.allow_tf32 = False
    B, T, C3 = qkv32.shape
    C, hs = C3 // 3, C3 // 3 // NH
    rows = {}
    for name, dtype, backend in (("torch sdpa flash bf16", torch.bfloat16, SDPBackend.FLASH_ATTENTION),
                                 ("torch sdpa efficient fp32", torch.float32, SDPBackend.EFFICIENT_ATTENTION)):
        qkv = torch.from_numpy(qkv32).cuda().to(dtype).requires_grad_(True)
        dout = torch.from_numpy(dout32).cuda().to(dtype)

        def forward():
            q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in qkv.split(C, dim=-1))
            with sdpa_kernel(backend):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(B, T, C)

        def fwd():
            with torch.no_grad():
                forward()

        def both():
            torch.autograd.grad(forward(), qkv, dout)
        try:
            dq = torch.autograd.grad(forward(), qkv, dout)[0]
            rows[name] = (cuda_time(fwd, reps), cuda_time(both, reps), forward().detach().float().cpu().numpy(),
                          dq.float().cpu().numpy())
        except Exception as e:  # a backend this card or build lacks
            print(f"{name}: failed: {type(e).__name__}: {e}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", "--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("-t", "--seq", type=int, default=1024)
    ap.add_argument("--hs", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from llmcu import cuda as llmcu_cuda
    if not llmcu_cuda.is_available():
        print("bench_attention: skipped: needs CuPy and an NVIDIA GPU (none found); nothing measured")
        return 0
    import cupy
    B, NH, T, hs = args.batch, args.heads, args.seq, args.hs
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * NH * hs)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * hs)).astype(np.float32)

    rows = llmcu_rows(qkv, dout, NH, args.reps)
    try:
        import torch
        if torch.cuda.is_available():
            rows.update(torch_rows(qkv, dout, NH, args.reps))
        else:
            print("PyTorch has no CUDA here: no PyTorch rows")
    except ImportError:
        print("PyTorch not installed: no PyTorch rows")

    fwd_flops, both_flops = attention_flops(B, NH, T, hs)
    card = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    try:
        # --dirty: a tree that differs from its HEAD says so (the device machine's copy of a
        # working tree once carried a stale .git and printed an old commit, 2026-11-28)
        commit = os.environ.get("GPU_CHECK_COMMIT") or subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip() \
            or "unknown"
    except OSError:
        commit = "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\ncausal attention B={B} NH={NH} T={T} hs={hs} on {card}, {date}, commit {commit}")
    print(f"FLOPs: forward {fwd_flops / 1e9:.1f} G, forward+backward {both_flops / 1e9:.1f} G")
    print(f"{'implementation':<34} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}  "
          f"max|out - fp32 ref|  max|dqkv - fp32 ref|")
    ref, dref = rows["llmcu simple fp32"][2], rows["llmcu simple fp32"][3]
    results = []
    from llmcu.formats import bf16_bits_to_float32

    def host32(a):  # bf16 bits on the device, or a float array
        a = a.get() if hasattr(a, "get") else a
        return bf16_bits_to_float32(a) if a.dtype == np.uint16 else a
    for name, (t_fwd, t_both, out, dqkv) in rows.items():
        err = float(np.abs(host32(out) - ref).max())
        derr = float(np.abs(host32(dqkv) - dref).max())  # the last backward's gradients
        print(f"{name:<34} {t_fwd:>8.3f} {fwd_flops / t_fwd / 1e9:>8.1f} {t_both:>11.3f} "
              f"{both_flops / t_both / 1e9:>8.1f}  {err:.2e}             {derr:.2e}")
        results.append(dict(name=name, fwd_ms=t_fwd, fwd_tflops=fwd_flops / t_fwd / 1e9, fwd_bwd_ms=t_both,
                            fwd_bwd_tflops=both_flops / t_both / 1e9, max_abs_diff_vs_simple_fp32=err,
                            dqkv_max_abs_diff_vs_simple_fp32=derr))
    lines, ratios = ratio_lines({name: row[:2] for name, row in rows.items()})
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(dict(card=card, date=date, commit=commit, B=B, NH=NH, T=T, hs=hs,
                                             reps=args.reps, fwd_flops=fwd_flops, fwd_bwd_flops=both_flops,
                                             rows=results, against_torch_flash=ratios), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
