"""Model flops utilisation (MFU) for the training log, as llm.c prints it: the flops a step
needs by llm.c's formula (6N + 6LCT per token: GPT2Config.flops_per_token) over the time
the step took, as a fraction of the card's dense bf16 tensor-core peak.

The peaks are NVIDIA's datasheet figures without sparsity, matched against the device name
CUDA reports (CuPy's getDeviceProperties): the first pattern that matches wins, so the NVL
and PCIe variants come before their SXM parts. A card not in the table gets no MFU column
(the log says so once) rather than a guessed peak.
"""

from __future__ import annotations

import re

BF16_DENSE_TFLOPS = (
    (r"H100.*NVL|H200.*NVL", 835.5),   # H100 NVL, H200 NVL
    (r"H100.*PCIe", 756.5),            # H100 PCIe
    (r"GH200|H200|H100", 989.4),       # H100 SXM5 ("NVIDIA H100 80GB HBM3"), H200 SXM, GH200
    (r"A100", 312.0),                  # A100 SXM4 and PCIe
    (r"L40S", 362.05),
    (r"\bL4\b", 121.0),
    (r"RTX 4090", 165.2),              # bf16 with fp32 accumulation
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a card by its CUDA device name; None if unknown."""
    for pattern, tflops in BF16_DENSE_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def mfu(flops_per_token: float, tokens: int, seconds: float, peak_tflops: float) -> float:
    """The fraction of peak_tflops that `tokens` tokens at flops_per_token in `seconds` reach."""
    if seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"mfu: seconds and peak_tflops must be > 0, got {seconds} and {peak_tflops}")
    return flops_per_token * tokens / seconds / (peak_tflops * 1e12)


def device_name() -> str:
    """The current CUDA device's name (CuPy)."""
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)
