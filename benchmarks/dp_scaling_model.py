"""Data-parallel scaling on paper: a MODEL, not a measurement (no machine here has two GPUs).

    python benchmarks/dp_scaling_model.py          # the tables in benchmarks/RESULTS.md

What is arithmetic: the bytes each GPU sends per optimizer step (bf16 gradients and, with
-z 1, bf16 parameters), from the parameter counts. What is assumed (stated, not measured):
the link bandwidths below and that a collective runs at the link's bandwidth (NCCL's "bus
bandwidth" convention; achieved bus bandwidth is lower and its latency is left out). What
is measured, on one NVIDIA H200 (benchmarks/gpu_runs/2026-11-28-h200-pass3/): the d12 step
and its per-op backward times at B=16, T=1024, from which the overlap is simulated.
"""

from __future__ import annotations

import math

from llmcu.buckets import LAYER_TENSORS
from llmcu.config import gpt2_config

# Assumed link bandwidths, bytes/s in one direction per GPU.
LINKS = {
    "NVLink 4 (8 GPUs, 1 node)": (8, 450e9),    # H100 SXM: 900 GB/s bidirectional per GPU
    "InfiniBand NDR (16 GPUs, 2 nodes)": (16, 50e9),  # one 400 Gb/s port per GPU; a flat ring
}
BF16 = 2  # bytes

# Measured, d12 bf16 B=16 T=1024, H200 (run 5 breakdown, eager; ms per step, all layers)
D12_LAYER_BACKWARD_MS = {  # ops inside the 12 layers' backward
    "flash_attention_backward": 6.835, "matmul_dgelu_backward[fcproj]": 3.589,
    "matmul_backward[fc]": 3.085, "matmul_backward[qkv]": 2.387,
    "matmul_backward[attproj]": 1.059, "layernorm_backward (24 of 25 calls)": 1.287 * 24 / 25,
}
D12_HEAD_BACKWARD_MS = 2.052 + 3.066 + 1.287 / 25  # dlogits, lm_head backward, lnf backward
D12_EMBED_BACKWARD_MS = 0.042                      # encoder backward
D12_STEP_MS = 38.33          # run 6 (219ad26), eager, B=16 (CUDA graphs are refused with DP)
D12_ONCE_PER_STEP_MS = 1.084 + 0.231 + 0.089       # AdamW, global norm, zero_grad (run 5)
LLMC_8XH100_TOK_S_PER_GPU = 468e3                  # llm.c's measured d12 figure (8x H100)
B, T, TOKENS_PER_STEP = 16, 1024, 524288


def bucket_bytes(config) -> tuple[list[int], int]:
    """bf16 bytes of each layer's bucket and of the last bucket (llmcu/buckets.py)."""
    per_layer = last = 0
    for name, shape in config.parameter_shapes():
        if name in LAYER_TENSORS:
            per_layer += math.prod(shape[1:])
        else:
            last += math.prod(shape)
    return [per_layer * BF16] * config.num_layers, last * BF16


def collective_s(nbytes: float, world: int, bw: float, kind: str) -> float:
    """Ring time at bus bandwidth bw: all-reduce 2(W-1)/W of the buffer per GPU, reduce-scatter
    and all-gather (W-1)/W."""
    factor = 2 if kind == "all-reduce" else 1
    return factor * (world - 1) / world * nbytes / bw


def exposed_ms(config, world, bw, zero, layer_ms, head_ms, embed_ms) -> tuple[float, float]:
    """(communication ms, ms of it not hidden by the last micro-step's backward): buckets start
    when their layer's backward ends and run one after another on the communication stream;
    -z 1 adds the all-gather of the parameters after AdamW, which nothing hides."""
    layers, last = bucket_bytes(config)
    kind = "all-reduce" if zero == 0 else "reduce-scatter"
    t, comm_free, total = head_ms, 0.0, 0.0
    for nbytes in layers:                      # layer L-1 first
        t += layer_ms
        c = collective_s(nbytes, world, bw, kind) * 1e3
        comm_free, total = max(comm_free, t) + c, total + c
    t += embed_ms                              # the backward ends here
    c = collective_s(last, world, bw, kind) * 1e3
    comm_free, total = max(comm_free, t) + c, total + c
    exposed = comm_free - t
    if zero == 1:
        gather = collective_s(config.num_parameters() * BF16, world, bw, "all-gather") * 1e3
        exposed, total = exposed + gather, total + gather
    return total, exposed


def main():
    print("Per-step bytes each GPU sends (bf16), and their time at the assumed bandwidths:")
    print("| model | params | -z | bytes/GPU (8 GPUs) | NVLink 4, 8 GPUs | IB NDR, 16 GPUs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for d in ("d12", "d24", "d48"):
        config = gpt2_config(d)
        nbytes = config.num_parameters() * BF16
        for zero in (0, 1):
            kinds = ["all-reduce"] if zero == 0 else ["reduce-scatter", "all-gather"]
            sent = sum((2 if k == "all-reduce" else 1) * 7 / 8 * nbytes for k in kinds)
            times = [sum(collective_s(nbytes, w, bw, k) for k in kinds) * 1e3 for w, bw in LINKS.values()]
            print(f"| {d} | {config.num_parameters() / 1e6:.1f}M | {zero} | {sent / 1e6:.0f} MB | "
                  f"{times[0]:.2f} ms | {times[1]:.2f} ms |")
    config = gpt2_config("d12")
    layer_ms = sum(D12_LAYER_BACKWARD_MS.values()) / config.num_layers
    accum = TOKENS_PER_STEP // (B * T * 8)
    compute = accum * (D12_STEP_MS - D12_ONCE_PER_STEP_MS) + D12_ONCE_PER_STEP_MS
    print(f"\nd12, measured per-layer backward {layer_ms:.3f} ms at B={B} (H200); 524,288 tokens a "
          f"step on 8 GPUs = {accum} micro-steps of B={B} per GPU, compute {compute:.1f} ms a step")
    print("| link | -z | communication | exposed after overlap | hidden | step | tok/s per GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (world, bw) in LINKS.items():
        acc = TOKENS_PER_STEP // (B * T * world)
        comp = acc * (D12_STEP_MS - D12_ONCE_PER_STEP_MS) + D12_ONCE_PER_STEP_MS
        for zero in (0, 1):
            total, exposed = exposed_ms(config, world, bw, zero, layer_ms, D12_HEAD_BACKWARD_MS,
                                        D12_EMBED_BACKWARD_MS)
            step = comp + exposed
            print(f"| {name} | {zero} | {total:.2f} ms | {exposed:.2f} ms | "
                  f"{100 * (1 - exposed / total):.0f}% | {step:.1f} ms | "
                  f"{TOKENS_PER_STEP / world / (step / 1e3) / 1e3:.0f}K |")
    print(f"\nllm.c, measured on 8x H100 (d12): {LLMC_8XH100_TOK_S_PER_GPU / 1e3:.0f}K tok/s per GPU. "
          f"One H200, llmcu eager, measured: {B * T / (D12_STEP_MS / 1e3) / 1e3:.0f}K tok/s.")


if __name__ == "__main__":
    main()
