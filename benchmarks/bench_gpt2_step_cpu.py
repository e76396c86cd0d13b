"""One GPT-2 training step on the CPU: llmcu's NumPy path against PyTorch.

    python benchmarks/bench_gpt2_step_cpu.py [--model d12] [-b 4] [-t 64] [--steps 5] [--threads 2 1]

Each backend runs in its own process (so each peak RSS is its own), with the
same thread count (OMP_NUM_THREADS, which llmcu/cpu/threads.py and both BLAS
libraries read), the same model (llmcu's init from the same seed), the same
batch and the same step: zero grads, forward, backward, AdamW. The two
processes take turns, one step at a time (the other waits), so both see the
same load from anything else on the machine. For each thread count it prints the median step time of each, the split into zero_grad +
forward, backward and update, the ratio llmcu / PyTorch and the peak memory;
then, for the first thread count, llmcu's time per layer function (each op of
llmcu/ops.py, timed over --profile-steps extra steps). This is a benchmark,
not a test: nothing here asserts a time.
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


def profile_llmcu(m, step, first: int, steps: int) -> dict:
    """ms per step spent in each layer function the NumPy GPT-2 calls (CPU_OPS, the
    classifier, zero_grad), timed by wrapping each one for `steps` more steps: the fastest
    of those steps for each function (the least disturbed by other jobs), and the rest of
    the step (Python, the loss mean) likewise."""
    import llmcu.cpu.gpt2 as cpu_gpt2
    per_step = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            per_step[name] = per_step.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper
    for name, fn in list(vars(cpu_gpt2.CPU_OPS).items()):
        setattr(cpu_gpt2.CPU_OPS, name, timed(name, fn))
    for name in ("fused_classifier", "crossentropy_softmax_backward"):
        setattr(cpu_gpt2, name, timed(name, getattr(cpu_gpt2, name)))
    m.zero_grad = timed("zero_grad", m.zero_grad)
    samples = {}
    for i in range(steps):
        per_step.clear()
        t0 = time.perf_counter()
        step(first + i)
        total = time.perf_counter() - t0
        per_step["(rest: Python, loss mean, ...)"] = total - sum(per_step.values())
        per_step["step (total)"] = total
        for k, v in per_step.items():
            samples.setdefault(k, []).append(v)
    return {k: min(v) * 1000 for k, v in samples.items()}


def setup(backend: str, model: str, B: int, T: int, threads: int):
    """The model of `backend` ("llmcu" or "torch") from llmcu's init, and its step(i, phases)
    (zero grads, forward, backward, AdamW at step i + 1; appends the three phase times)."""
    sys.path.insert(0, str(ROOT))
    import llmcu  # noqa: F401  (first: it sets OpenBLAS's thread timeout before NumPy loads it)
    import numpy as np
    from llmcu.config import gpt2_config
    from llmcu.cpu.gpt2 import init_parameters

    config = gpt2_config(model)
    t0 = time.perf_counter()
    params = init_parameters(config, seed=42)
    init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    lr = 1e-4
    if backend == "llmcu":
        from llmcu.cpu.gpt2 import GPT2
        m = GPT2(config, params)

        def step(i, phases):
            t = [time.perf_counter()]
            m.zero_grad()
            loss = m.forward(x, y)
            t.append(time.perf_counter())
            m.backward()
            t.append(time.perf_counter())
            m.update(lr, i + 1)
            t.append(time.perf_counter())
            phases.append([b - a for a, b in zip(t, t[1:])])
            return loss
    else:
        import torch
        torch.set_num_threads(threads)
        from llmcu import torch_gpt2
        m = torch_gpt2.from_flat(config, params)
        del params
        opt = torch_gpt2.configure_optimizer(m, lr=lr, weight_decay=0.0)
        xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()

        def step(i, phases):
            t = [time.perf_counter()]
            opt.zero_grad(set_to_none=False)
            _, loss = m(xt, yt)
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            phases.append([b - a for a, b in zip(t, t[1:])])
            return loss.item()
    return m, step, init_s


def serve(backend: str, model: str, B: int, T: int, threads: int) -> None:
    """A worker process: set up, print one JSON line, then for each line on stdin run one
    step ("step I"), the per-layer profile ("profile I N", llmcu) or finish ("done"),
    answering each with one JSON line. The parent alternates the two backends' steps, so
    both see the same load from whatever else runs on the machine."""
    if backend == "gemm":  # NumPy's BLAS as llmcu runs it (llmcu imported first, as in setup)
        sys.path.insert(0, str(ROOT))
        from llmcu.config import gpt2_config
        print(json.dumps({**gemm_ceiling(gpt2_config(model), B, T),
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
        return
    m, step, init_s = setup(backend, model, B, T, threads)
    print(json.dumps({"init_s": init_s, "rss_before_steps_mib": _rss_mib()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "step":
            phases = []
            t0 = time.perf_counter()
            loss = step(int(cmd[1]), phases)
            out = {"s": time.perf_counter() - t0, "loss": loss, "phases": phases[0]}
        elif cmd[0] == "profile":
            out = profile_llmcu(m, lambda i: step(i, []), int(cmd[1]), int(cmd[2]))
        else:
            print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
            return
        print(json.dumps(out), flush=True)


def machine() -> str:
    import numpy as np
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, NumPy {np.__version__}"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def run_backends(a, threads: int) -> dict:
    """Both backends' steps, alternating (llmcu first on even rounds, PyTorch on odd), then
    the GEMM floor; each backend in its own process with OMP_NUM_THREADS=threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))

    def start(backend):
        cmd = [sys.executable, __file__, "--worker", backend, "--model", a.model, "-b", str(a.batch_size),
               "-t", str(a.seq_len), "--threads", str(threads)]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return proc, ask(proc, None)

    def ask(proc, line):
        if line is not None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        out = proc.stdout.readline()
        if not out:
            raise RuntimeError(f"worker {proc.args} exited with {proc.wait()}")
        return json.loads(out)

    names = ("llmcu", "torch")
    procs, results = {}, {}
    for name in names:  # one after the other: their start-up times are part of the report
        procs[name], results[name] = start(name)
        results[name].update(times_s=[], losses=[], phases=[])
    for i in range(a.warmup + a.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            r = ask(procs[name], f"step {i}")
            results[name]["losses"].append(r["loss"])
            if i >= a.warmup:
                results[name]["times_s"].append(r["s"])
                results[name]["phases"].append(r["phases"])
    if a.profile_steps and threads == a.threads[0]:
        results["llmcu"]["layers_ms"] = ask(procs["llmcu"], f"profile {a.warmup + a.steps} {a.profile_steps}")
    for name in names:
        results[name].update(ask(procs[name], "done"))
        procs[name].wait()
        r = results[name]
        r["median_s"] = statistics.median(r["times_s"])
        r["phases_ms"] = [statistics.median(col) * 1000 for col in zip(*r.pop("phases"))]
    gemm, results["gemm"] = start("gemm")
    gemm.wait()
    return results


def report(a, threads: int, results: dict) -> float:
    print(f"GPT-2 {a.model} training step on the CPU, B={a.batch_size} T={a.seq_len}, "
          f"{threads} threads, median of {a.steps} steps after {a.warmup} warm-up")
    print(f"{'backend':<8} {'ms/step':>9} {'fwd':>7} {'bwd':>7} {'update':>7} {'tok/s':>7} "
          f"{'init s':>7} {'peak RSS MiB':>13}")
    for name in ("llmcu", "torch"):
        r = results[name]
        fwd, bwd, upd = r["phases_ms"]
        print(f"{name:<8} {r['median_s'] * 1000:9.1f} {fwd:7.1f} {bwd:7.1f} {upd:7.1f} "
              f"{a.batch_size * a.seq_len / r['median_s']:7.1f} {r['init_s']:7.2f} {r['peak_rss_mib']:13.0f}")
    g = results["gemm"]
    print(f"GEMM floor (the step's {g['gflop']:.0f} GFLOP of Linear GEMMs alone, NumPy BLAS): "
          f"{g['median_s'] * 1000:.1f} ms = {g['gflop'] / g['median_s']:.1f} GFLOP/s")
    ratio = results["llmcu"]["median_s"] / results["torch"]["median_s"]
    print(f"ratio llmcu / torch (time) at {threads} threads: {ratio:.3f}")
    first = [results[k]["losses"][0] for k in ("llmcu", "torch")]
    print(f"first-step loss llmcu {first[0]:.6f} torch {first[1]:.6f}")
    layers = results["llmcu"].get("layers_ms")
    if layers:
        total = layers.pop("step (total)")
        print(f"llmcu per layer function, ms per step, the fastest of {a.profile_steps} profiled "
              f"steps (fastest step {total:.1f} ms):")
        for name, ms in sorted(layers.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<32} {ms:8.1f}  {100 * ms / total:5.1f}%")
    print()
    return ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12")
    ap.add_argument("-b", "--batch-size", type=int, default=4)
    ap.add_argument("-t", "--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    cpus = os.cpu_count() or 1
    ap.add_argument("--threads", type=int, nargs="+", default=[cpus, 1] if cpus > 1 else [1],
                    help="thread counts to run, each a full comparison")
    ap.add_argument("--profile-steps", type=int, default=3,
                    help="extra llmcu steps timed per layer function (first thread count; 0: none)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["llmcu", "torch", "gemm"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        serve(a.worker, a.model, a.batch_size, a.seq_len, a.threads[0])
        return 0

    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit()}\n")
    runs = {}
    for threads in a.threads:
        runs[threads] = run_backends(a, threads)
        runs[threads]["ratio"] = report(a, threads, runs[threads])
    print("summary: " + ", ".join(f"{t} threads llmcu/torch {r['ratio']:.3f}" for t, r in runs.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
