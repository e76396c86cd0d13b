"""First thing the GPU check runs: can this machine compile and launch one
kernel file, in fp32 and in bf16? Prints the error against NumPy and exits
non-zero on a mismatch, in seconds, before the long test run starts.

    python scripts/gpu_smoke.py [--device cuda|emu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmcu.cuda.residual import residual_forward  # noqa: E402
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "emu"])
    args = ap.parse_args(argv)
    if args.device == "cuda":
        import cupy as xp
        host = lambda a: a.get()  # noqa: E731
    else:
        xp, host = np, (lambda a: a)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(1000, dtype=np.float32) for _ in range(2))
    failures = 0
    out = xp.full(a.shape, np.nan, dtype=np.float32)
    residual_forward(out, xp.asarray(a), xp.asarray(b))
    err = float(np.abs(host(out) - (a + b)).max())
    print(f"{args.device} fp32 residual_forward: max |err| {err:.3e}")
    failures += not err <= 1e-6
    ab, bb = float32_to_bf16_bits(a), float32_to_bf16_bits(b)
    outb = xp.full(a.shape, 0x7FC0, dtype=np.uint16)  # bf16 NaN
    residual_forward(outb, xp.asarray(ab), xp.asarray(bb))
    want = bf16_bits_to_float32(float32_to_bf16_bits(bf16_bits_to_float32(ab) + bf16_bits_to_float32(bb)))
    err = float(np.abs(bf16_bits_to_float32(host(outb)) - want).max())
    print(f"{args.device} bf16 residual_forward: max |err| {err:.3e} (against one rounding of the fp32 sum)")
    failures += not err <= 0.0
    print("smoke: OK" if not failures else f"smoke: {failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
