"""The CPU backend's threads: how many, and the one helper that spreads work over them.

NumPy's GEMMs run on BLAS's own threads, but its element-wise ufuncs run on the
calling thread. They release the GIL while they loop, though, so Python threads
that run ufuncs on separate slices of an array do run in parallel. parallel_for
is that: it splits a range of rows (or elements) into one contiguous part per
thread and runs fn(lo, hi) on each part, the first on the caller. The layers keep
their plain single-threaded code; the threaded ones call it around the same code.

One count governs both: OMP_NUM_THREADS when set (what llm.c's CPU trainer
reads), else the number of CPUs; set_threads(n) (`llmcu train --threads`)
changes the pool and, where NumPy's BLAS is OpenBLAS or MKL, BLAS's count too.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

# Below this many elements per part a thread costs more than it saves: handing a part
# to the pool and waiting for it took 43 us (2-core VM, under load), while one ufunc
# pass over 64K float32 in cache takes ~10 us and the layers make 5-15 passes.
MIN_PART = 1 << 16


def _env_threads() -> int:
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        n = 0
    return n if n > 0 else (os.cpu_count() or 1)


_threads = _env_threads()
_pool: ThreadPoolExecutor | None = None
_local = threading.local()   # .worker is True inside a pool thread (no nested fan-out)


def num_threads() -> int:
    """The thread count the CPU backend uses (element-wise pool and BLAS)."""
    return _threads


def set_threads(n: int) -> None:
    """Use n threads from now on, for the element-wise pool and for BLAS."""
    global _threads, _pool
    n = int(n)
    if n < 1:
        raise ValueError(f"set_threads: the thread count must be >= 1, got {n}")
    if n != _threads and _pool is not None:
        _pool.shutdown()
        _pool = None
    _threads = n
    set_blas_threads(n)


def set_blas_threads(n: int) -> bool:
    """Set the thread count of the BLAS NumPy loaded (OpenBLAS, NumPy's scipy-openblas or MKL),
    as threadpoolctl does, without the dependency. False if no known BLAS is loaded."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "blas" in line.lower() or "mkl_rt" in line.lower()}
    except OSError:
        return False
    names = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads", "MKL_Set_Num_Threads")
    done = False
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in names:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done = True
                break
    return done


def _run_part(fn, lo, hi):
    _local.worker = True
    try:
        fn(lo, hi)
    finally:
        _local.worker = False


def parallel_for(fn, n: int, min_part: int = MIN_PART, unit: int = 1) -> None:
    """fn(lo, hi) over [0, n) in at most num_threads() contiguous parts of at least
    min_part items, part boundaries multiples of `unit`; the first part on the caller.

    The parts together cover [0, n) once, so an element-wise fn gives the same
    result for every thread count. One part (small n, one thread, or a call from
    inside a part) is a plain fn(0, n). Exceptions in any part are raised here."""
    parts = min(_threads, n // max(min_part, 1))
    if parts <= 1 or getattr(_local, "worker", False):
        fn(0, n)
        return
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads - 1, thread_name_prefix="llmcu-cpu")
    step = -(-n // parts)
    step = -(-step // unit) * unit
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    futures = [_pool.submit(_run_part, fn, lo, hi) for lo, hi in bounds[1:]]
    try:
        fn(*bounds[0])
    finally:
        for f in futures:
            f.result()


def elementwise(fn, arrays, block: int = 1 << 14) -> None:
    """fn(*slices) over equal-sized arrays, element-wise: each array is viewed flat and
    cut into `block`-element pieces (in cache for the several passes fn makes), the
    pieces spread over the threads. fn sees slices of the same range of every array.
    Arrays that are not all C-contiguous (no flat view) go to one plain fn(*arrays)."""
    if not all(a.flags.c_contiguous for a in arrays):
        fn(*arrays)
        return
    views = [a.reshape(-1) for a in arrays]
    n = views[0].size

    def part(lo, hi):
        for s in range(lo, hi, block):
            e = min(s + block, hi)
            fn(*(v[s:e] for v in views))
    parallel_for(part, n, unit=block)


def rows(fn, row_arrays, *args, lead: int = 2, block: int = 1 << 20) -> None:
    """fn(*row_slices, *args) over blocks of rows spread over the threads, for layers
    whose rows are independent (softmax, layernorm, attention per sequence).

    Each of row_arrays is viewed as (R, ...) by merging its first `lead` axes (the same
    R for all), and every call gets the same rows of each, about `block` elements of
    the widest array at a time (smaller blocks did not pay for the classifier: 17 ms per
    d12 fused_classifier at 1M elements per call and whole, 24 ms at 256K, 45 ms at one
    50304-wide row, 1 thread). args (weights, scalars) go to every call whole. Arrays
    that are not all C-contiguous go to one plain fn(*row_arrays, *args)."""
    if not all(a.flags.c_contiguous for a in row_arrays):  # no row views: one plain call
        fn(*row_arrays, *args)
        return
    views = [a.reshape(-1, *a.shape[lead:]) for a in row_arrays]
    R = views[0].shape[0]
    per_row = max(1, max(v.size for v in views) // max(R, 1))
    step = max(1, block // per_row)

    def part(lo, hi):
        for s in range(lo, hi, step):
            e = min(s + step, hi)
            fn(*(v[s:e] for v in views), *args)
    parallel_for(part, R, min_part=max(1, MIN_PART // per_row))
