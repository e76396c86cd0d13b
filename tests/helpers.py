"""Shared test helpers: one comparison that explains itself when it fails.

assert_close prints what a kernel author needs to find the bug: how many
elements are off, where the first ones are, the largest difference, and any
NaN/inf that appears on one side only (an unwritten, NaN-poisoned output shows
up there).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import cuda as llmcu_cuda

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(one_thread: bool = True, launcher: bool = True) -> dict:
    """The environment for an `llmcu` subprocess: this checkout's llmcu; one BLAS thread
    (the 50257-row classifier's multi-threaded GEMMs crawl on a loaded 2-core machine);
    launcher=False drops torchrun/MPI/SLURM's variables, for tests that start their own
    process groups."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if one_thread:
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if not launcher:
        from llmcu import distributed
        for _, *names in distributed.LAUNCHER_VARS:
            for name in names:
                env.pop(name, None)
        for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
    return env


def run_llmcu(*args, env=None, cwd=None, check=True, timeout=300):
    """`python -m llmcu ARGS` as a user runs it; with check, a failure shows its output."""
    r = subprocess.run([sys.executable, "-m", "llmcu", *map(str, args)], cwd=cwd,
                       env=env if env is not None else subprocess_env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"llmcu {' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r

# The two kernel backends every kernel test runs on: "emu" (the .cu sources on
# the CPU; always) and "cuda" (a real GPU; skipped without one).
KERNEL_BACKENDS = [
    pytest.param("emu", id="emu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not llmcu_cuda.is_available(), reason="no CUDA GPU with CuPy here")]),
]


def _as_numpy(x):
    """NumPy view of an ndarray, a scalar, or a torch tensor (no torch import needed)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    elif hasattr(x, "__cuda_array_interface__"):  # a CuPy array
        x = x.get()
    return np.asarray(x)


def assert_close(name, actual, expected, atol, rtol, max_report=8):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise.

    NaN matches only NaN and inf only an inf of the same sign. Returns the
    largest absolute difference over the elements finite on both sides, so a
    test can report the error it measured.
    """
    a = _as_numpy(actual)
    e = _as_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    a = a.astype(np.float64)
    e = e.astype(np.float64)

    a_nan, e_nan = np.isnan(a), np.isnan(e)
    a_inf, e_inf = np.isinf(a), np.isinf(e)
    nonfinite_bad = (a_nan != e_nan) | (a_inf != e_inf) | (a_inf & e_inf & (np.sign(a) != np.sign(e)))
    finite = np.isfinite(a) & np.isfinite(e)
    diff = np.where(finite, np.abs(a - e), 0.0)
    limit = atol + rtol * np.abs(np.where(finite, e, 0.0))
    bad = (finite & (diff > limit)) | nonfinite_bad
    max_diff = float(diff.max()) if diff.size else 0.0

    if bad.any():
        idx = np.argwhere(bad)[:max_report]
        lines = [
            f"{name}: {int(bad.sum())} of {bad.size} elements mismatch "
            f"(atol={atol:g}, rtol={rtol:g}, shape {a.shape})",
            f"  max |diff| over finite elements: {max_diff:.3e}"
            + (f" at {tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))}"
               if diff.size else ""),
            f"  NaN mismatches: {int((a_nan != e_nan).sum())} "
            f"(actual NaN {int(a_nan.sum())}, expected NaN {int(e_nan.sum())}); "
            f"inf mismatches: {int(((a_inf != e_inf) | (a_inf & e_inf & (np.sign(a) != np.sign(e)))).sum())}",
            "  first mismatches (index: actual vs expected):",
        ]
        for i in idx:
            t = tuple(int(j) for j in i)
            lines.append(f"    {t}: {a[t]!r} vs {e[t]!r}")
        raise AssertionError("\n".join(lines))
    # Shown with `pytest -s` (or when a later assertion of the same test fails):
    # the measured error and how much of the tolerance it used.
    used = float((diff / np.maximum(limit, 1e-300)).max()) if diff.size else 0.0
    print(f"{name}: max |diff| {max_diff:.3e}, {used:.0%} of the tolerance")
    return max_diff


BF16_NAN = 0x7FC0  # a quiet-NaN bf16 bit pattern: the poison for bf16 (uint16) outputs


class Device:
    """Moves NumPy arrays to the kernel backend under test ("emu" or "cuda") and back."""

    def __init__(self, name):
        self.name = name
        if name == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np

    def put(self, a):
        return self.xp.array(a, dtype=a.dtype, copy=True, order="C")  # never alias the reference input

    def poisoned(self, shape, dtype=np.float32):
        """An output buffer the kernel must overwrite: NaN (float), bf16 NaN (uint16), -1 (ints)."""
        dtype = np.dtype(dtype)
        fill = np.nan if dtype.kind == "f" else BF16_NAN if dtype == np.uint16 else -1
        return self.xp.full(shape, fill, dtype=dtype)

    def get(self, a):
        return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)


def poisoned(shape, dtype=np.float32):
    """An output buffer filled with NaN, so an element the code never writes fails."""
    return np.full(shape, np.nan, dtype=dtype)


def assert_same_bits(name, actual, expected, max_report=8):
    """Assert two arrays hold the same bits (dtype, shape and every byte; NaN == NaN of the
    same pattern). A failure reports the mismatch count, the first indices with both values
    (bf16 bit patterns also widened to fp32) and the largest difference of the values."""
    a, e = _as_numpy(actual), _as_numpy(expected)
    if a.shape != e.shape or a.dtype != e.dtype:
        raise AssertionError(f"{name}: {a.dtype}{a.shape} != expected {e.dtype}{e.shape}")
    bits = np.dtype(f"u{a.dtype.itemsize}")
    bad = np.ascontiguousarray(a).view(bits) != np.ascontiguousarray(e).view(bits)
    if not bad.any():
        return
    fa, fe = value(a).astype(np.float64), value(e).astype(np.float64)
    both = bad & np.isfinite(fa) & np.isfinite(fe)
    diff = float(np.abs(fa - fe)[both].max()) if both.any() else float("nan")
    lines = [f"{name}: {int(bad.sum())} of {bad.size} elements differ in their bits "
             f"(bit-for-bit comparison, {a.dtype}, shape {a.shape})",
             f"  max |diff| of the values over finite elements: {diff:.3e}",
             "  first mismatches (index: actual vs expected):"]
    for i in np.argwhere(bad)[:max_report]:
        t = tuple(int(j) for j in i)
        lines.append(f"    {t}: {a[t]!r} ({fa[t]!r}) vs {e[t]!r} ({fe[t]!r})")
    raise AssertionError("\n".join(lines))


# ------------------------------------------------------------------------------------------
# fp32 and bf16 inputs, outputs and tolerances for the kernel tests (tests/kernels/).
#
# bf16 arrays are uint16 arrays of bf16 bit patterns (llmcu.formats, round to nearest even).
# A test draws random fp32 values, rounds them to the kernel's dtype (rand_x) and gives
# the kernel those bits and the fp32 oracle (llmcu/cpu/) the same values widened exactly,
# so what is left to compare is the kernel's own arithmetic and roundings.
#
# Tolerances. fp32 (F32): the kernels sum in another order than NumPy's pairwise sums and
# use CUDA's/glibc's expf/tanhf, a few ulp from NumPy's; sums of up to ~1000 O(1) terms
# then differ by ~1e-6 relative, so 1e-5 of the values' scale has a 10x margin while a
# missing term or a wrong index is O(1e-2) or larger. bf16 (U): bf16 keeps 8 significant
# bits, so one round-to-nearest of y moves it by at most U |y|, U = 2^-8 (half an ulp of
# [1, 2)); an output computed in fp32 and rounded once is within
#     rtol = U + F32,   atol = F32 * scale
# of the oracle, and each further rounding of an intermediate of magnitude <= M adds
# U * M to atol (out_tol). Truncating instead of rounding (2U) or a wrong index fails.

U = 2.0 ** -8          # bf16 unit roundoff
F32 = 1e-5             # the fp32 tolerance, relative to the values' scale
EPS32 = 2.0 ** -24     # fp32 unit roundoff
FP32, BF16 = np.dtype(np.float32), np.dtype(np.uint16)
DTYPES = [pytest.param(FP32, id="fp32"), pytest.param(BF16, id="bf16")]


def rand(rng, *shape, scale=1.0, shift=0.0):
    """Random N(shift, scale^2) float32 values: never zeros, never a constant."""
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def to_dtype(x, dtype):
    """fp32 values as a kernel array of dtype: float32 as is, uint16 rounded to bf16 bits."""
    from llmcu.formats import float32_to_bf16_bits
    x = np.asarray(x, np.float32)
    return float32_to_bf16_bits(x) if np.dtype(dtype) == BF16 else x.copy()


def value(a):
    """The fp32 values of a kernel array (bf16 bit patterns widened exactly)."""
    from llmcu.formats import bf16_bits_to_float32
    a = np.asarray(a)
    return bf16_bits_to_float32(a) if a.dtype == BF16 else a


def rand_x(rng, dtype, *shape, scale=1.0, shift=0.0):
    """(kernel input of dtype, its exact fp32 values for the oracle)."""
    x = to_dtype(rand(rng, *shape, scale=scale, shift=shift), dtype)
    return x, value(x).astype(np.float32, copy=True)


def rounded(x, dtype):
    """fp32 values as a dtype output holds them (bf16: rounded to nearest even)."""
    return value(to_dtype(x, dtype))


def out_tol(dtype, ref, roundings=1, intermediate=None):
    """assert_close tolerances for an output computed in fp32 and rounded to dtype
    `roundings` times, the extra roundings of intermediates of magnitude <= intermediate
    (default: the output's scale). See the note above."""
    scale = float(np.abs(ref).max()) or 1.0
    if np.dtype(dtype) != BF16:
        return dict(atol=F32 * scale, rtol=F32)
    extra = (roundings - 1) * U * (intermediate if intermediate is not None else scale)
    return dict(atol=F32 * scale + extra, rtol=U + F32)


def sum_tol(dtype, start, terms, n):
    """Tolerances for start + a sum of n terms per element (a parameter gradient), added by
    a kernel in a tree and by NumPy pairwise. In any order the fp32 error of a sum of n + 1
    values is at most n * 2^-24 * sum|values| (Higham, Accuracy and Stability of Numerical
    Algorithms, 4.2); the oracle's pairwise sum adds at most log2(n) * 2^-24 * sum|values|,
    the terms themselves are rounded once each: per element
        atol = (n + log2(n) + 2) * 2^-24 * max(|start| + sum |terms|),
    a bound, not a guess; bf16 adds one rounding of the result (rtol = U). A missing or
    doubled term (|term| ~ 0.1-1 against an atol ~ 1e-4) fails it.
    start: (...) and terms: (n, ...) as fp32 values; the sum is over terms' axis 0."""
    colsum = np.abs(start).astype(np.float64) + np.abs(terms).astype(np.float64).sum(axis=0)
    atol = (n + math.log2(max(n, 1)) + 2) * EPS32 * float(colsum.max())
    return dict(atol=atol, rtol=U if np.dtype(dtype) == BF16 else 0.0)


def misaligned(dev, a):
    """A copy of `a` on dev's backend whose first element sits 4 bytes past a 16-byte
    boundary (C-contiguous, same shape): the 16-byte-load paths must refuse it or fall
    back to their scalar path."""
    skip = 4 // a.itemsize
    buf = dev.xp.zeros(a.size + 16 // a.itemsize, dtype=a.dtype)
    from llmcu.cuda.vectorized import address
    start = (-address(buf) % 16) // a.itemsize + skip  # 16-byte boundary, then 4 bytes on
    view = buf[start:start + a.size].reshape(a.shape)
    view[...] = dev.put(a)
    assert address(view) % 16 == 4 and view.flags.c_contiguous
    return view


def write_tiny_run(directory, config, model_seed, data_seed, vocab=None, train=4000, val=1000):
    """A small training run's inputs in `directory`: tiny.bin (config, random init with
    model_seed), train.bin and, with val > 0, val.bin (ids below vocab, default the
    model's vocabulary, drawn with data_seed). Returns the directory."""
    from llmcu import formats
    from llmcu.cpu.gpt2 import init_parameters
    formats.write_model(directory / "tiny.bin", config, init_parameters(config, seed=model_seed))
    rng = np.random.default_rng(data_seed)
    vocab = vocab or config.vocab_size
    formats.write_shard(directory / "train.bin", rng.integers(0, vocab, size=train))
    if val:
        formats.write_shard(directory / "val.bin", rng.integers(0, vocab, size=val))
    return directory
