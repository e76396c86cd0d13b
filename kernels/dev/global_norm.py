"""The global_norm lab's launch code: the versions of kernels/dev/global_norm.cu behind the
product wrappers' signatures (llmcu/cuda/adamw.py; the oracle is llmcu/cpu/adamw.py's
global_norm(grads)):

    global_norm(grads) -> float
    global_norm_device(grads, norm, grad_scale, grad_clip=None)

grads floatX (float32, or uint16 bf16 bits), any shape; norm float64 (1,), grad_scale
float32 (1,). Per-block fp32 partial sums of squares, then the product's
global_norm_finish_kernel1 sums them in float64 and computes the clip factor.

  2: global_norm_squared_kernel2, one 16-byte packet per load (the n % x128::size tail
     by block 0); needs grads 16-byte aligned (any size). The same launch shape as the
     product's kernel1; the partial sums group the squares differently (last bits).
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

from dataclasses import dataclass, field

import numpy as np

from llmcu.cuda.adamw import NORM_BLOCK, NORM_GRID
from llmcu.cuda.runtime import (FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, i64,
                                launch_config, scratch)
from llmcu.cuda.vectorized import check_vectorized

STEM, PRODUCT = "dev/global_norm", "global_norm"


def global_norm_device2(grads, norm, grad_scale, grad_clip=None):
    fn = "global_norm_device"
    be = backend_of(grads)
    dt = floatx_dtype(fn, "grads", grads)
    check_array(fn, "grads", grads, be, dtype=dt)
    check_array(fn, "norm", norm, be, dtype=np.float64, shape=(1,))
    check_array(fn, "grad_scale", grad_scale, be, dtype=np.float32, shape=(1,))
    if grads.size == 0:
        raise ValueError(f"{fn}: grads must hold at least one element, got shape {grads.shape}")
    clip = 0.0 if grad_clip is None else float(grad_clip)
    if np.isnan(clip):
        raise ValueError(f"{fn}: grad_clip must be a number or None, got {grad_clip!r}")
    per_packet = 16 // grads.dtype.itemsize
    check_vectorized(fn, per_packet, dict(grads=grads))  # alignment only: the kernel adds the tail
    grid, block = launch_config(min(max(1, grads.size // per_packet), NORM_GRID * NORM_BLOCK), NORM_BLOCK)
    partial = scratch(be, "global_norm_partial", grid, np.float32)
    be.launch(STEM, "global_norm_squared_kernel2", grid, block, (partial, grads, i64(grads.size)),
              floatX=FLOATX_NAMES[dt])
    one_grid, one_block = launch_config(1, block=1)
    be.launch(PRODUCT, "global_norm_finish_kernel1", one_grid, one_block,
              (norm, grad_scale, partial, i32(grid[0]), np.float64(clip)))


def global_norm2(grads):
    """sqrt(sum g^2) as a Python float (global_norm_device2 into scratch buffers, one host read)."""
    be = backend_of(grads)
    norm = scratch(be, "global_norm_norm", (1,), np.float64)
    grad_scale = scratch(be, "global_norm_scale", (1,), np.float32)
    global_norm_device2(grads, norm, grad_scale)
    return float(norm.get()[0] if be.name == "cuda" else norm[0])


@dataclass(frozen=True)
class Version:
    about: str                        # one line: what it is
    ops: dict                         # op name (the oracle's / product's function) -> callable
    dtypes: tuple = ("fp32", "bf16")  # the floatX it runs
    kernels: tuple = field(default=())  # lab kernels it launches


VERSIONS = {
    2: Version("sum of squares with one 16-byte packet per load (tail by block 0), then the product's finish",
               {"global_norm": global_norm2, "global_norm_device": global_norm_device2},
               kernels=("global_norm_squared_kernel2",)),
}
