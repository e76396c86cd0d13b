"""Run the three layernorm forward kernels on the CPU (the emulator) against the oracle.

    python docs/layernorm_emu.py

kernels/layernorm.cu is compiled as C++ (llmcu/emu: each CUDA thread a fiber)
the first time, cached, and launched through the same wrapper the GPU uses:
NumPy arrays select the emulator, CuPy arrays the GPU. The times printed are
the emulator's, which say nothing about the GPU (see the benchmark for that).
"""

import time

import numpy as np

from llmcu.cpu import layernorm as oracle
from llmcu.cuda import layernorm as kernels


def run_on_emulator(version, B=2, T=16, C=768):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    out = np.full((B, T, C), np.nan, np.float32)  # poisoned: an unwritten element stays NaN
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    kernels.layernorm_forward(out, mean, rstd, x, w, b, version=version)

    ref = np.empty_like(out)
    oracle.layernorm_forward(ref, np.empty_like(mean), np.empty_like(rstd), x, w, b)
    return float(np.abs(out - ref).max())  # NaN if any element was not written


if __name__ == "__main__":
    for version in (0, 1, 2):
        start = time.perf_counter()
        err = run_on_emulator(version)
        ms = (time.perf_counter() - start) * 1e3
        print(f"layernorm_forward_kernel{version}: max |kernel - oracle| = {err:.1e} "
              f"({ms:.0f} ms on the emulator, build included the first time)")
        assert err < 1e-5, err
