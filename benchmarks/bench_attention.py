"""Causal attention on the GPU: llmcu's product attention against PyTorch's SDPA, at GPT-2
124M shapes.

    python benchmarks/bench_attention.py [-b 16] [--heads 12] [-t 1024] [--hs 64] [--reps 20] [--json out.json]

Needs CuPy and an NVIDIA GPU (and a CUDA PyTorch for the peer rows); without a GPU it
prints why and exits 0. Times are medians of CUDA-event timings after warm-up, one row per
implementation:

  llmcu bf16             flash_attention_forward/backward on bf16 arrays: the kernels the
                         step runs (llmcu.cuda.attention.flash_kernel_version: version 3,
                         mma.sync, at hs 64)
  llmcu fp32             the same wrappers on fp32 arrays (version 1, scalar)
  torch sdpa flash bf16  F.scaled_dot_product_attention, SDPBackend.FLASH_ATTENTION, is_causal
  torch sdpa efficient fp32  the same with SDPBackend.EFFICIENT_ATTENTION (flash has no fp32)

The other attention versions are the lab's: `python benchmarks/lab.py attention [VERSION ...]`
times them against this product kernel and PyTorch.

All rows start from a (B,T,3C) qkv tensor (PyTorch gets strided q, k, v views of it, as
nanoGPT does) and produce a (B,T,C) output; "fwd+bwd" is one forward and one backward
returning d(qkv). Each row's output and d(qkv) are compared with a reference (the largest
absolute difference): PyTorch's math backend in fp32 (TF32 off), or without a CUDA PyTorch
the llmcu fp32 row. Last, each llmcu row's time over its PyTorch peer's of the same dtype
(below 1: llmcu is faster).

Napkin math (FlashAttention's convention): the causal forward does two (T x T x hs) GEMMs
per head, half of them masked: 4 * B * NH * T^2 * hs / 2 FLOPs; the backward does five,
2.5x the forward; fwd+bwd = 3.5x the forward. TFLOP/s = those FLOPs / time.
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

# each llmcu row's PyTorch peer (the same dtype)
PEERS = {"llmcu bf16": "torch sdpa flash bf16", "llmcu fp32": "torch sdpa efficient fp32"}


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
    default stream is the same legacy default stream). Slow rows (fp32) get fewer
    repetitions, at least 3, so the run stays within budget_ms."""
    import cupy
    for _ in range(warmup):
        fn()
    cupy.cuda.Device().synchronize()
    first = _event_ms(fn)
    reps = max(3, min(reps, int(budget_ms / max(first, 1e-3))))
    return statistics.median([first] + [_event_ms(fn) for _ in range(reps - 1)])


def llmcu_rows(qkv32, dout32, NH, reps):
    """{row: (fwd ms, fwd+bwd ms, out, dqkv)} of the product wrappers in bf16 and fp32."""
    import cupy
    from llmcu.cuda import attention as k
    from llmcu.formats import float32_to_bf16_bits
    B, T, C3 = qkv32.shape
    rows = {}
    for name, dtype in (("llmcu bf16", np.uint16), ("llmcu fp32", np.float32)):
        qkv, dout = cupy.asarray(qkv32), cupy.asarray(dout32)
        if dtype == np.uint16:
            qkv, dout = float32_to_bf16_bits(qkv), float32_to_bf16_bits(dout)
        out, dqkv = cupy.empty((B, T, C3 // 3), dtype), cupy.empty_like(qkv)
        lse = cupy.empty((B, NH, T), np.float32)

        def fwd(out=out, lse=lse, qkv=qkv):
            k.flash_attention_forward(out, lse, qkv, NH)

        def both(out=out, lse=lse, qkv=qkv, dout=dout, dqkv=dqkv):
            k.flash_attention_forward(out, lse, qkv, NH)
            k.flash_attention_backward(dqkv, dout, qkv, out, lse, NH)
        version = k.flash_kernel_version(dtype, C3 // 3 // NH)
        label = f"{name} (kernel{version})"
        try:
            rows[name] = (cuda_time(fwd, reps), cuda_time(both, reps), out, dqkv)
            print(f"{label}: fwd {rows[name][0]:.3f} ms, fwd+bwd {rows[name][1]:.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001  (report it, keep the other rows)
            print(f"{label}: FAILED: {type(e).__name__}: {e}", flush=True)
    return rows


def torch_rows(qkv32, dout32, NH, reps):
    """The PyTorch peers' rows, and the reference (out, dqkv) from the math backend in fp32."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.backends.cuda.matmul.allow_tf32 = False
    B, T, C3 = qkv32.shape
    C, hs = C3 // 3, C3 // 3 // NH
    rows, ref = {}, None
    for name, dtype, backend in (("torch sdpa flash bf16", torch.bfloat16, SDPBackend.FLASH_ATTENTION),
                                 ("torch sdpa efficient fp32", torch.float32, SDPBackend.EFFICIENT_ATTENTION),
                                 ("reference", torch.float32, SDPBackend.MATH)):
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
            out = forward()
            dq = torch.autograd.grad(out, qkv, dout)[0]
            host = (out.detach().float().cpu().numpy(), dq.float().cpu().numpy())
            if name == "reference":
                ref = host
            else:
                rows[name] = (cuda_time(fwd, reps), cuda_time(both, reps)) + host
        except Exception as e:  # noqa: BLE001  (a backend this card or build lacks)
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
    return rows, ref


def ratio_lines(times: dict) -> tuple[list[str], dict]:
    """Each llmcu row's forward and forward+backward time over its PyTorch peer's (PEERS):
    (printable lines, the same as a dict for the JSON). times: {row: (fwd ms, fwd+bwd ms)}."""
    lines = ["against PyTorch (llmcu ms / torch ms; below 1: llmcu is faster):"]
    ratios = {}
    for ours, peer in PEERS.items():
        if ours not in times or peer not in times:
            lines.append(f"  {ours}: no ratio (no {ours if ours not in times else peer} row)")
            continue
        (f, b), (tf, tb) = times[ours], times[peer]
        ratios[ours] = dict(peer=peer, fwd=f / tf, fwd_bwd=b / tb)
        lines.append(f"  {ours} / {peer}: fwd {f / tf:6.3f}   fwd+bwd {b / tb:6.3f}")
    return lines, ratios


def _commit() -> str:
    # --dirty: a tree that differs from its HEAD says so (the device machine's copy of a
    # working tree once carried a stale .git and printed an old commit, 2026-11-28)
    try:
        return os.environ.get("GPU_CHECK_COMMIT") or subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
            text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


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
    from llmcu.formats import bf16_bits_to_float32
    from llmcu.mfu import device_name
    B, NH, T, hs = args.batch, args.heads, args.seq, args.hs
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * NH * hs)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH * hs)).astype(np.float32)

    def host32(a):  # bf16 bits on the device, or a float array
        a = a.get() if hasattr(a, "get") else a
        return bf16_bits_to_float32(a) if a.dtype == np.uint16 else a

    rows, ref = llmcu_rows(qkv, dout, NH, args.reps), None
    try:
        import torch
        if torch.cuda.is_available():
            peer_rows, ref = torch_rows(qkv, dout, NH, args.reps)
            rows.update(peer_rows)
        else:
            print("PyTorch has no CUDA here: no PyTorch rows")
    except ImportError:
        print("PyTorch not installed: no PyTorch rows")
    ref_name = "torch sdpa math fp32"
    if ref is None and "llmcu fp32" in rows:
        ref_name, ref = "llmcu fp32", tuple(host32(a) for a in rows["llmcu fp32"][2:])

    fwd_flops, both_flops = attention_flops(B, NH, T, hs)
    card, commit = device_name(), _commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\ncausal attention B={B} NH={NH} T={T} hs={hs} on {card}, {date}, commit {commit}")
    print(f"FLOPs: forward {fwd_flops / 1e9:.1f} G, forward+backward {both_flops / 1e9:.1f} G; "
          f"errors against {ref_name}")
    print(f"{'implementation':<26} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}  "
          f"max|out - ref|  max|dqkv - ref|")
    results = []
    for name, (t_fwd, t_both, out, dqkv) in rows.items():
        err = float(np.abs(host32(out) - ref[0]).max()) if ref is not None else None
        derr = float(np.abs(host32(dqkv) - ref[1]).max()) if ref is not None else None
        print(f"{name:<26} {t_fwd:>8.3f} {fwd_flops / t_fwd / 1e9:>8.1f} {t_both:>11.3f} "
              f"{both_flops / t_both / 1e9:>8.1f}  {err if err is None else f'{err:.2e}':<14}  "
              f"{derr if derr is None else f'{derr:.2e}'}")
        results.append(dict(name=name, fwd_ms=t_fwd, fwd_tflops=fwd_flops / t_fwd / 1e9, fwd_bwd_ms=t_both,
                            fwd_bwd_tflops=both_flops / t_both / 1e9, max_abs_diff_out=err,
                            max_abs_diff_dqkv=derr))
    lines, ratios = ratio_lines({name: row[:2] for name, row in rows.items()})
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(dict(card=card, date=date, commit=commit, B=B, NH=NH, T=T, hs=hs,
                                             reps=args.reps, reference=ref_name, fwd_flops=fwd_flops,
                                             fwd_bwd_flops=both_flops, rows=results, against_torch=ratios),
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
