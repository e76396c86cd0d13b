"""Run the three layernorm forward kernels on the CPU (the emulator) against the oracle.

    python docs/layernorm_emu.py

Version 1 is the training step's kernel (kernels/layernorm.cu), launched by the product
wrapper llmcu/cuda/layernorm.py; versions 0 and 2 are the lab's (kernels/dev/layernorm.cu),
launched by kernels/dev/layernorm.py, whose functions take the same arguments. The .cu
files are compiled as C++ (llmcu/emu: each CUDA thread a fiber) the first time, cached,
and launched through the same code the GPU uses: NumPy arrays select the emulator, CuPy
arrays the GPU. The times printed are the emulator's, which say nothing about the GPU
(benchmarks/lab.py --device cuda measures that).
"""

import importlib.util
import time
from pathlib import Path

import numpy as np

from llmcu.cpu import layernorm as oracle
from llmcu.cuda import layernorm as product

LAB_PATH = Path(__file__).resolve().parents[1] / "kernels" / "dev" / "layernorm.py"


def load_lab():
    """kernels/dev/layernorm.py as a module (kernels/dev/ is not a package)."""
    spec = importlib.util.spec_from_file_location("llmcu_lab_layernorm", LAB_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forward_of(version, lab):
    """layernorm_forward(out, mean, rstd, inp, weight, bias) for a version number."""
    if version == 1:
        return product.layernorm_forward
    return lab.VERSIONS[version].ops["layernorm_forward"]


def run_on_emulator(forward, B=2, T=16, C=768):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, C)).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    out = np.full((B, T, C), np.nan, np.float32)  # poisoned: an unwritten element stays NaN
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    forward(out, mean, rstd, x, w, b)

    ref = np.empty_like(out)
    oracle.layernorm_forward(ref, np.empty_like(mean), np.empty_like(rstd), x, w, b)
    return float(np.abs(out - ref).max())  # NaN if any element was not written


if __name__ == "__main__":
    lab = load_lab()
    for version in (0, 1, 2):
        start = time.perf_counter()
        err = run_on_emulator(forward_of(version, lab))
        ms = (time.perf_counter() - start) * 1e3
        where = "kernels/layernorm.cu" if version == 1 else "kernels/dev/layernorm.cu"
        print(f"layernorm_forward_kernel{version} ({where}): max |kernel - oracle| = {err:.1e} "
              f"({ms:.0f} ms on the emulator, build included the first time)")
        assert err < 1e-5, err
