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

import numpy as np

from llmcu.cuda.adamw import NORM_BLOCK, NORM_GRID, check_norm, finish_norm
from llmcu.cuda.runtime import (FLOATX_NAMES, backend_of, i64,
                                launch_config, scratch)
from llmcu.cuda.vectorized import check_vectorized
from llmcu.lab import Version

STEM = "dev/global_norm"


def global_norm_device2(grads, norm, grad_scale, grad_clip=None):
    fn = "global_norm_device"
    be, dt, clip = check_norm(fn, grads, norm, grad_scale, grad_clip)  # the product's
    per_packet = 16 // grads.dtype.itemsize
    check_vectorized(fn, per_packet, dict(grads=grads))  # alignment only: the kernel adds the tail
    grid, block = launch_config(min(max(1, grads.size // per_packet), NORM_GRID * NORM_BLOCK), NORM_BLOCK)
    partial = scratch(be, "global_norm_partial", grid, np.float32)
    be.launch(STEM, "global_norm_squared_kernel2", grid, block, (partial, grads, i64(grads.size)),
              floatX=FLOATX_NAMES[dt])
    finish_norm(be, norm, grad_scale, partial, clip)  # the product's finish kernel


def global_norm2(grads):
    """sqrt(sum g^2) as a Python float (global_norm_device2 into scratch buffers, one host read)."""
    be = backend_of(grads)
    norm = scratch(be, "global_norm_norm", (1,), np.float64)
    grad_scale = scratch(be, "global_norm_scale", (1,), np.float32)
    global_norm_device2(grads, norm, grad_scale)
    return float(norm.get()[0] if be.name == "cuda" else norm[0])


VERSIONS = {
    2: Version("sum of squares with one 16-byte packet per load (tail by block 0), then the product's finish",
               {"global_norm": global_norm2, "global_norm_device": global_norm_device2},
               kernels=("global_norm_squared_kernel2",)),
}
