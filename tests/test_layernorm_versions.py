"""Every forward version in kernels/layernorm.cu against the NumPy oracle.

layernorm_forward(version=0|1|2) runs layernorm_forward_kernel0 (one thread per
row), kernel1 (one warp per row, the default, also covered by test_kernels.py)
and kernel2 (one warp per row, 16-byte loads and stores). Same style as
tests/test_kernels.py: the "emu" backend always (the .cu file run on the CPU),
"cuda" when a GPU with CuPy is present; random inputs, NaN-poisoned outputs.

Shapes: C=1023 (odd, not a multiple of 32 or 4) for the scalar versions; the
vectorised version needs C % 4 == 0, so it runs on C=768 (GPT-2's width: the
warp steps 768 / (32 * 4) = 6 times), C=1024 (8 steps) and C=4 (one packet, 31
idle lanes). T=7 leaves the last block's warps partly idle.

Tolerance atol = rtol = 1e-5, as in test_kernels.py: each version sums a row in
its own order (sequential for 0, 32 strided partial sums and a butterfly for
1 and 2), differing from NumPy's pairwise sum by ~1e-6 relative at C ~ 1000.
"""

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, assert_close
from llmcu.cpu import layernorm as cpu_layernorm

TOL = dict(atol=1e-5, rtol=1e-5)

BACKENDS = KERNEL_BACKENDS


@pytest.fixture(params=BACKENDS)
def xp(request):
    if request.param == "cuda":
        import cupy
        return cupy
    return np


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def get(a):
    return a if isinstance(a, np.ndarray) else a.get()


def run_version(xp, version, B, T, C, seed=0):
    from llmcu.cuda.layernorm import layernorm_forward
    rng = np.random.default_rng(seed)
    x, w, b = rand(rng, B, T, C, scale=3.0) + 1.0, rand(rng, C), rand(rng, C)
    out = xp.full((B, T, C), np.nan, np.float32)
    mean, rstd = xp.full((B, T), np.nan, np.float32), xp.full((B, T), np.nan, np.float32)
    layernorm_forward(out, mean, rstd, xp.asarray(x), xp.asarray(w), xp.asarray(b), version=version)
    rout, rmean, rrstd = (np.empty(s, np.float32) for s in ((B, T, C), (B, T), (B, T)))
    cpu_layernorm.layernorm_forward(rout, rmean, rrstd, x, w, b)
    name = f"layernorm_forward_kernel{version}"
    assert_close(f"{name} out", get(out), rout, **TOL)
    assert_close(f"{name} mean", get(mean), rmean, **TOL)
    assert_close(f"{name} rstd", get(rstd), rrstd, **TOL)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("B,T,C", [(2, 7, 1023), (1, 3, 48)])
def test_scalar_versions(xp, version, B, T, C):
    run_version(xp, version, B, T, C)


@pytest.mark.parametrize("B,T,C", [(2, 7, 768), (1, 3, 1024), (1, 5, 4)])
def test_vectorised_version(xp, B, T, C):
    run_version(xp, 2, B, T, C)


def test_versions_agree_with_each_other(xp):
    """All three versions on the same GPT-2-width input: within the tolerance of each other."""
    from llmcu.cuda.layernorm import layernorm_forward
    rng = np.random.default_rng(7)
    B, T, C = 2, 9, 768
    x, w, b = (xp.asarray(a) for a in (rand(rng, B, T, C), rand(rng, C), rand(rng, C)))
    outs = []
    for version in (0, 1, 2):
        out = xp.full((B, T, C), np.nan, np.float32)
        layernorm_forward(out, xp.empty((B, T), np.float32), xp.empty((B, T), np.float32),
                          x, w, b, version=version)
        outs.append(get(out))
    assert_close("kernel0 vs kernel1", outs[0], outs[1], **TOL)
    assert_close("kernel2 vs kernel1", outs[2], outs[1], **TOL)


@pytest.mark.parametrize("version", [3, -1, "2", None])
def test_unknown_version_raises(version):
    from llmcu.cuda.layernorm import layernorm_forward
    a = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="layernorm_forward: version must be one of"):
        layernorm_forward(a, np.zeros(2, np.float32), np.zeros(2, np.float32), a.copy(),
                          np.ones(8, np.float32), np.zeros(8, np.float32), version=version)


def test_vectorised_needs_c_multiple_of_4(xp):
    from llmcu.cuda.layernorm import layernorm_forward
    B, T, C = 1, 2, 1023
    z = xp.zeros((B, T, C), np.float32)
    with pytest.raises(ValueError, match=r"version 2 .*needs C % 4 == 0, got C = 1023"):
        layernorm_forward(xp.empty_like(z), xp.empty((B, T), np.float32), xp.empty((B, T), np.float32),
                          z, xp.ones(C, np.float32), xp.zeros(C, np.float32), version=2)


def test_vectorised_needs_aligned_pointers(xp):
    """A contiguous slice starting one float in is misaligned: refused, not read wrongly."""
    from llmcu.cuda.layernorm import layernorm_forward
    C = 8
    buf = xp.zeros(2 * C + 1, np.float32)
    from llmcu.cuda.vectorized import address as _address
    start = 1 if _address(buf) % 16 == 0 else 0
    inp = buf[start:start + 2 * C].reshape(2, C)  # C-contiguous, not 16-byte aligned
    assert _address(inp) % 16 != 0
    assert inp.flags.c_contiguous
    with pytest.raises(ValueError, match="version 2 needs inp 16-byte aligned"):
        layernorm_forward(xp.empty((2, C), np.float32), xp.empty(2, np.float32), xp.empty(2, np.float32),
                          inp, xp.ones(C, np.float32), xp.zeros(C, np.float32), version=2)
