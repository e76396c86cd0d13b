"""Shared test helpers: one comparison that explains itself when it fails.

assert_close prints what a kernel author needs to find the bug: how many
elements are off, where the first ones are, the largest difference, and any
NaN/inf that appears on one side only (an unwritten, NaN-poisoned output shows
up there).
"""

import numpy as np
import pytest

from llmcu import cuda as llmcu_cuda

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
