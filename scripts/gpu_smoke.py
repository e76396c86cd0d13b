"""First thing the GPU check runs: can this machine compile and launch one
kernel file, in fp32 and in bf16? Then one small launch of each product kernel
the tests do not reach in seconds (the bf16 fused attention, the two-pass
reductions, the cuBLASLt epilogues, the step as CUDA graphs), each announced
before it runs and timed, so a kernel that hangs or faults is named by the last
line of the log. Prints the errors against NumPy and exits non-zero on a
mismatch, in seconds, before the long test run starts. The lab's versions
(kernels/dev/) are checked by tests/lab/ and benchmarks/lab.py, not here.

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
    failures += product_kernels(args.device, xp, host)
    print("smoke: OK" if not failures else f"smoke: {failures} check(s) FAILED")
    return 1 if failures else 0


def product_kernels(device, xp, host) -> int:
    """One small call of each product kernel above, against the NumPy oracle; returns the
    number of failed checks. Bounds are loose (a smoke test: the tests check tightly)."""
    import time

    from llmcu.cpu import attention as cpu_attention
    from llmcu.cpu import encoder as cpu_encoder
    from llmcu.cpu import layernorm as cpu_layernorm
    from llmcu.cuda import attention, encoder, layernorm, matmul

    def sync():
        if device == "cuda":
            xp.cuda.Device().synchronize()

    failures = 0
    rng = np.random.default_rng(1)

    def check(name, run, got_want, bound):
        nonlocal failures
        print(f"{device} {name}: launching ...", flush=True)
        t0 = time.perf_counter()
        run()
        sync()
        got, want = got_want()
        err = float(np.abs(got - want).max())
        ok = bool(err <= bound)  # NaN fails
        failures += not ok
        print(f"{device} {name}: {1e3 * (time.perf_counter() - t0):.1f} ms, max |err| {err:.3e} "
              f"(bound {bound:g}) {'ok' if ok else 'FAILED'}", flush=True)

    # the fused attention the bf16 step runs (hs = 64: version 3, mma.sync), forward and
    # backward, B=1 T=70 NH=2
    B, T, NH, hs = 1, 70, 2, 64
    qkv = float32_to_bf16_bits(rng.standard_normal((B, T, 3 * NH * hs), dtype=np.float32))
    dout = float32_to_bf16_bits(rng.standard_normal((B, T, NH * hs), dtype=np.float32))
    q32, d32 = bf16_bits_to_float32(qkv), bf16_bits_to_float32(dout)
    out_r, lse_r = np.empty((B, T, NH * hs), np.float32), np.empty((B, NH, T), np.float32)
    cpu_attention.flash_attention_forward(out_r, lse_r, q32, NH)
    dqkv_r = np.empty_like(q32)
    cpu_attention.flash_attention_backward(dqkv_r, d32, q32, out_r, lse_r, NH)
    out = xp.full(out_r.shape, 0x7FC0, dtype=np.uint16)
    lse = xp.full(lse_r.shape, np.nan, dtype=np.float32)
    dqkv = xp.full(qkv.shape, 0x7FC0, dtype=np.uint16)
    qkv_d, dout_d = xp.asarray(qkv), xp.asarray(dout)
    version = attention.flash_kernel_version(np.uint16, hs)
    # bf16 outputs of O(1) values: errors of a few bf16 ulps (2^-8 relative) are expected
    check(f"flash attention bf16 forward (kernel{version})",
          lambda: attention.flash_attention_forward(out, lse, qkv_d, NH),
          lambda: (bf16_bits_to_float32(host(out)), out_r), 0.05)
    check(f"flash attention bf16 backward (kernel{version})",
          lambda: attention.flash_attention_backward(dqkv, dout_d, qkv_d, out, lse, NH),
          lambda: (bf16_bits_to_float32(host(dqkv)), dqkv_r), 0.1)

    # the two-pass reductions, fp32: N = 300 rows, C = 96
    N, C = 300, 96
    x, d, w = (rng.standard_normal(s, dtype=np.float32) for s in ((N, C), (N, C), (C,)))
    mean, rstd = x.mean(-1), 1.0 / np.sqrt(x.var(-1) + 1e-5)
    mean, rstd = mean.astype(np.float32), rstd.astype(np.float32)
    refs = [np.empty_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)]
    cpu_layernorm.layernorm_backward(*refs, d, x, w, mean, rstd)
    got = [xp.full((N, C), np.nan, np.float32), xp.zeros(C, np.float32), xp.zeros(C, np.float32)]
    check("layernorm backward", lambda: layernorm.layernorm_backward(
        *got, xp.asarray(d), xp.asarray(x), xp.asarray(w), xp.asarray(mean), xp.asarray(rstd)),
        lambda: (np.concatenate([host(g).ravel() for g in got]), np.concatenate([r.ravel() for r in refs])), 1e-3)
    dbias = xp.zeros(C, np.float32)
    check("matmul bias backward", lambda: matmul.matmul_bias_backward(dbias, xp.asarray(d)),
          lambda: (host(dbias), d.sum(0)), 1e-3)
    Bt, Tt, V = 3, 100, 50
    tokens = rng.integers(0, V, (Bt, Tt)).astype(np.int32)
    dout_e = rng.standard_normal((Bt, Tt, C), dtype=np.float32)
    dwte_r, dwpe_r = np.zeros((V, C), np.float32), np.zeros((Tt, C), np.float32)
    cpu_encoder.encoder_backward(dwte_r, dwpe_r, dout_e, tokens)
    dwte, dwpe = xp.zeros((V, C), np.float32), xp.zeros((Tt, C), np.float32)
    check("encoder backward", lambda: encoder.encoder_backward(dwte, dwpe, xp.asarray(dout_e), xp.asarray(tokens)),
          lambda: (np.concatenate([host(dwte).ravel(), host(dwpe).ravel()]),
                   np.concatenate([dwte_r.ravel(), dwpe_r.ravel()])), 1e-3)

    # cuBLASLt through ctypes: the fc layer with its bias and GELU as epilogues, fp32, and the
    # DGELU epilogue; against NumPy (GEMM, + bias, llmcu/cpu/gelu.py)
    from llmcu.cpu.gelu import gelu_backward as np_gelu_backward
    from llmcu.cpu.gelu import gelu_forward as np_gelu_forward
    from llmcu.cuda.cublaslt import lt_matmul
    M, K, N = 24, 64, 32
    xa, wb, bias = (rng.standard_normal(s, dtype=np.float32) for s in ((M, K), (N, K), (N,)))
    pre_r = xa @ wb.T + bias
    out_r = np.empty_like(pre_r)
    np_gelu_forward(out_r, pre_r)
    lt_out, lt_pre = xp.full((M, N), np.nan, np.float32), xp.full((M, N), np.nan, np.float32)
    check("cuBLASLt GEMM + GELU_AUX_BIAS epilogue (fp32)",
          lambda: lt_matmul(lt_out, xp.asarray(xa), xp.asarray(wb), transpose_b=True,
                            bias=xp.asarray(bias), gelu_aux=lt_pre),
          lambda: (np.concatenate([host(lt_out).ravel(), host(lt_pre).ravel()]),
                   np.concatenate([out_r.ravel(), pre_r.ravel()])), 1e-3)
    dy = rng.standard_normal((M, K), dtype=np.float32)
    pre2 = rng.standard_normal((M, N), dtype=np.float32)
    dpre_r = np.empty_like(pre2)
    np_gelu_backward(dpre_r, dy @ wb.T, pre2)
    lt_d = xp.full((M, N), np.nan, np.float32)
    check("cuBLASLt GEMM + DGELU epilogue (fp32)",
          lambda: lt_matmul(lt_d, xp.asarray(dy), xp.asarray(wb), transpose_b=True,
                            dgelu_aux=xp.asarray(pre2)),
          lambda: (host(lt_d), dpre_r), 1e-3)

    # the step as CUDA graphs (capture, replay; one-launch AdamW, the norm and the loss on
    # the device) against the eager step: a tiny bf16 GPT-2, 2 steps, every parameter equal
    from llmcu.config import GPT2Config
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.cuda.gpt2 import GPT2
    from llmcu.cuda.graphs import GraphStep
    cfg = GPT2Config(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=4, channels=64)
    p0 = init_parameters(cfg, seed=1)
    eager, graphed = (GPT2(cfg, p0.copy(), device=device, dtype="bf16") for _ in range(2))
    graph = GraphStep(graphed, 2, 16, grad_clip=1.0)
    toks = rng.integers(0, cfg.vocab_size, (2, 2, 17)).astype(np.int32)
    losses = []

    def run_graph():
        for s in range(2):
            x, y = toks[s, :, :-1], toks[s, :, 1:]
            eager.zero_grad()
            loss_e = eager.forward(x, y)
            eager.backward()
            eager.update(1e-2 / (s + 1), s + 1, grad_clip=1.0)
            loss_g, _ = graph.forward_backward([(x, y)])
            graph.update(1e-2 / (s + 1), s + 1)
            losses.append(abs(loss_g - loss_e))
    check("CUDA graph step (bf16 GPT-2 2 layers, 2 steps) vs eager", run_graph,
          lambda: (np.concatenate([bf16_bits_to_float32(host(graphed.params)), host(graphed.master),
                                   losses]),
                   np.concatenate([bf16_bits_to_float32(host(eager.params)), host(eager.master),
                                   np.zeros(len(losses))])), 1e-6)
    return failures


if __name__ == "__main__":
    sys.exit(main())
