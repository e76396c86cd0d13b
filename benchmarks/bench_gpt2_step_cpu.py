"""One GPT-2 training step on the CPU: llmcu's NumPy path against PyTorch.

    python benchmarks/bench_gpt2_step_cpu.py [--model d12] [-b 4] [-t 64] [--steps 5]

Each backend runs in its own process (so each peak RSS is its own), with the
same thread count, the same model (llmcu's init from the same seed), the same
batch and the same step: zero grads, forward, backward, AdamW. Prints the
median step time of each, the ratio llmcu / PyTorch and the peak memory.
This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def gemm_ceiling(config, B: int, T: int, repeats: int = 3) -> dict:
    """Time only the step's Linear-layer GEMMs (forward, dinp, dweight) in NumPy.

    The attention's small batched GEMMs are left out (under 1% of the flops at
    T=64). This is the floor any CPU implementation of the step sits on.
    """
    import numpy as np
    BT, C, L, Vp = B * T, config.channels, config.num_layers, config.padded_vocab_size
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * L + [(C, Vp)]
    rng = np.random.default_rng(0)
    bufs = [(rng.standard_normal((BT, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32),
             rng.standard_normal((BT, n), dtype=np.float32)) for k, n in shapes]

    def once():
        for x, w, dy in bufs:
            x @ w.T          # forward
            dy @ w           # dinp
            dy.T @ x         # dweight
    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    flops = sum(3 * 2 * BT * k * n for k, n in shapes)
    return {"median_s": statistics.median(times), "gflop": flops / 1e9}


def worker(backend: str, model: str, B: int, T: int, steps: int, warmup: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from llmcu.config import gpt2_config
    from llmcu.cpu.gpt2 import init_parameters

    config = gpt2_config(model)
    params = init_parameters(config, seed=42)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    lr = 1e-4

    if backend == "gemm":
        del params
        return {"backend": backend, **gemm_ceiling(config, B, T),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if backend == "llmcu":
        from llmcu.cpu.gpt2 import GPT2
        m = GPT2(config, params)
        rss_before = _rss_mib()

        def step(i):
            m.zero_grad()
            loss = m.forward(x, y)
            m.backward()
            m.update(lr, i + 1)
            return loss
    else:
        import torch
        torch.set_num_threads(threads)
        from llmcu import torch_gpt2
        m = torch_gpt2.from_flat(config, params)
        del params
        opt = torch_gpt2.configure_optimizer(m, lr=lr, weight_decay=0.0)
        xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        rss_before = _rss_mib()

        def step(i):
            opt.zero_grad(set_to_none=False)
            _, loss = m(xt, yt)
            loss.backward()
            opt.step()
            return float(loss)

    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(i))
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"backend": backend, "median_s": statistics.median(times), "times_s": times,
            "losses": losses, "peak_rss_mib": peak, "rss_before_steps_mib": rss_before}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch-size", type=int, default=4)
    ap.add_argument("-t", "--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["llmcu", "torch", "gemm"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.batch_size, a.seq_len, a.steps, a.warmup, a.threads)))
        return 0

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    results = {}
    for backend in ("llmcu", "torch", "gemm"):
        cmd = [sys.executable, __file__, "--worker", backend, "--model", a.model,
               "-b", str(a.batch_size), "-t", str(a.seq_len), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--threads", str(a.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        results[backend] = json.loads(out.strip().splitlines()[-1])

    print(f"GPT-2 {a.model} training step on the CPU, B={a.batch_size} T={a.seq_len}, "
          f"{a.threads} threads, median of {a.steps} steps after {a.warmup} warm-up")
    print(f"{'backend':<8} {'ms/step':>10} {'tok/s':>8} {'peak RSS MiB':>13} {'RSS before steps':>17}")
    for name in ("llmcu", "torch"):
        r = results[name]
        print(f"{name:<8} {r['median_s'] * 1000:10.1f} {a.batch_size * a.seq_len / r['median_s']:8.1f} "
              f"{r['peak_rss_mib']:13.0f} {r['rss_before_steps_mib']:17.0f}")
    g = results["gemm"]
    print(f"GEMM floor (the step's {g['gflop']:.0f} GFLOP of Linear GEMMs alone, NumPy BLAS): "
          f"{g['median_s'] * 1000:.1f} ms = {g['gflop'] / g['median_s']:.1f} GFLOP/s")
    ratio = results["llmcu"]["median_s"] / results["torch"]["median_s"]
    print(f"ratio llmcu / torch (time): {ratio:.3f}")
    first = [results[k]["losses"][0] for k in ("llmcu", "torch")]
    print(f"first-step loss llmcu {first[0]:.6f} torch {first[1]:.6f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
