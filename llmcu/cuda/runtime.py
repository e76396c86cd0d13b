"""Find, compile, load and launch the kernels in kernels/*.cu.

One call shape, two backends, picked by the type of the arrays a wrapper gets:

- "cuda": CuPy RawModule (NVRTC) on an NVIDIA GPU; arrays are cupy.ndarray.
- "emu":  the same .cu sources compiled as C++ and run on the CPU, one fiber
          per CUDA thread (llmcu.emu); arrays are numpy.ndarray.

Every launch goes through `launch`, which checks nothing about the kernel's
arguments itself: the wrappers check every argument first (check_array) and
pass scalars as explicit NumPy types (np.int32, np.float32). The emu backend
also checks the types against the kernel's signature; CuPy does not.
Set LLMCU_CUDA_DEBUG=1 (or set_debug(True)) to synchronize after every
launch, so an error names the kernel that caused it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

DEFAULT_BLOCK = 256
WARP = 32
_debug = os.environ.get("LLMCU_CUDA_DEBUG", "") not in ("", "0")


def set_debug(on: bool) -> None:
    """Synchronize after every launch (slow; for finding the failing kernel)."""
    global _debug
    _debug = bool(on)


def kernels_dir() -> Path:
    """kernels/ in a source checkout, or llmcu/kernels/ in an installed wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"llmcu: kernels/ not found next to {package} (looked for common.cuh in "
        f"{package / 'kernels'} and {package.parent / 'kernels'}); reinstall llmcu")


# The element type of activations, parameters and gradients (the kernels'
# floatX) follows the dtype of the arrays a wrapper gets: float32 arrays run the
# module compiled with floatX = float, uint16 arrays (bf16 bit patterns: NumPy
# has no bfloat16; llmcu.formats converts with round-to-nearest-even) run the
# one compiled with floatX = __nv_bfloat16. Statistics, losses, reductions,
# AdamW moments and master weights stay float32 whatever floatX is.
FLOAT32 = np.dtype(np.float32)
BF16 = np.dtype(np.uint16)
FLOATX_NAMES = {FLOAT32: "float", BF16: "__nv_bfloat16"}


def compile_options(floatX: str = "float") -> tuple[str, ...]:
    """Compiler options in one place: both backends compile with exactly these.
    LLMCU_BF16 tells common.cuh to include cuda_bf16.h and to use the bf16
    stochastic rounding."""
    if floatX not in FLOATX_NAMES.values():
        raise ValueError(f"compile_options: floatX must be one of {sorted(FLOATX_NAMES.values())}, "
                         f"got {floatX!r}")
    bf16 = ("-DLLMCU_BF16",) if floatX == "__nv_bfloat16" else ()
    return ("-std=c++17", f"-DfloatX={floatX}", *bf16)


def floatx_dtype(fn: str, name: str, a) -> np.dtype:
    """The floatX dtype of array `a` (float32 or uint16 = bf16 bits), checked:
    the wrapper then demands it of every other floatX argument (check_array)
    and launches the module compiled for it (FLOATX_NAMES[dtype])."""
    dtype = getattr(a, "dtype", None)
    if dtype not in FLOATX_NAMES:
        raise TypeError(f"{fn}: {name} must have dtype float32 (fp32) or uint16 (bf16 bit "
                        f"patterns), got {dtype if dtype is not None else type(a).__name__}")
    return np.dtype(dtype)


# -- launch geometry: the one helper every wrapper uses ---------------------------

def launch_config(num_threads: int, block: int = DEFAULT_BLOCK, grid_y: int = 1):
    """(grid, block) covering num_threads threads with 1-D blocks of `block`
    (rounded down to whole warps for small problems); grid_y > 1 adds a
    second grid dimension for kernels that split work by blockIdx.y."""
    if num_threads <= 0:
        raise ValueError(f"launch_config: num_threads must be > 0, got {num_threads}")
    block = min(block, ((num_threads + WARP - 1) // WARP) * WARP)
    grid_x = (num_threads + block - 1) // block
    return ((grid_x, grid_y) if grid_y > 1 else (grid_x,)), (block,)


def warp_per_row(rows: int, block: int = DEFAULT_BLOCK):
    """(grid, block) giving each of `rows` rows its own warp."""
    return launch_config(rows * WARP, block)


def block_per_row(rows: int, block: int = DEFAULT_BLOCK):
    """(grid, block) giving each of `rows` rows its own block."""
    return (rows,), (block,)


# Two-pass deterministic reductions over rows (layernorm, matmul bias backward):
# pass 1 runs at most this many blocks, each writing one row of fp32 partial
# sums, pass 2 sums those rows in a fixed order. 4 blocks on each of the 132
# SMs of an H100/H200: one wave. A constant, not the device's SM count, so the
# summation order is the same on every card and under the emulator (bits may
# still differ where the GPU compiler fuses a multiply and an add).
PARTIAL_SUM_BLOCKS = 4 * 132


def partial_sums_grid(work: int, per_block: int, max_blocks: int | None = None) -> int:
    """Blocks of pass 1 of a two-pass reduction: enough for `work` items at
    `per_block` per block, capped at max_blocks (default PARTIAL_SUM_BLOCKS);
    the kernels grid-stride over what remains."""
    if work <= 0 or per_block <= 0:
        raise ValueError(f"partial_sums_grid: work and per_block must be > 0, got {work}, {per_block}")
    cap = PARTIAL_SUM_BLOCKS if max_blocks is None else max_blocks
    return max(1, min(cap, (work + per_block - 1) // per_block))


def scratch(be, name: str, shape, dtype=np.float32):
    """A work buffer a wrapper needs for one call (partial sums, attention's D), kept
    per backend, name, shape and dtype and handed out again on the next call with the
    same key: nothing is allocated after the first step, which a captured CUDA graph
    needs (its kernels keep the buffers' addresses; llmcu/cuda/graphs.py). Calls on one
    stream run in order, so two uses of one buffer never overlap. Contents are
    undefined: uninitialised on the GPU, NaN-filled on every call under the emulator
    (outside a capture), so a kernel that forgets to write an element poisons the tests.
    Raises if a new buffer would be allocated while a graph is being captured."""
    key = (name, tuple(int(n) for n in shape), np.dtype(dtype).str)
    buf = be.scratch_buffers.get(key)
    if buf is None:
        if be.capturing:
            raise RuntimeError(f"scratch: a new {name} buffer {key[1]} {key[2]} is needed while a "
                               f"CUDA graph is being captured; run the step once before capturing")
        buf = be.scratch_buffers[key] = be.xp.empty(key[1], dtype=dtype)
    if be.name == "emu" and not be.capturing and buf.dtype.kind == "f":
        buf.fill(np.nan)
    return buf


def partial_sums_scratch(be, shape):
    """The fp32 partial sums of pass 1 of a two-pass reduction (scratch(): reused,
    NaN-filled under the emulator so a partial that pass 1 forgot to write poisons
    the tests)."""
    return scratch(be, "partial_sums", shape, np.float32)


def column_tiles(columns: int, width: int = WARP, block: int = DEFAULT_BLOCK):
    """(grid, block) for kernels whose block owns `width` columns (lane = column or
    packet of columns) and whose warps split the rows: grid.x = CEIL_DIV(columns, width)."""
    if columns <= 0 or width <= 0:
        raise ValueError(f"column_tiles: columns and width must be > 0, got {columns}, {width}")
    return ((columns + width - 1) // width,), (block,)


# -- backends ----------------------------------------------------------------

class Backend:
    """Compiles each kernels/<stem>.cu once per process and launches its kernels (stem
    "dev/<layer>": the lab file kernels/dev/<layer>.cu)."""

    def __init__(self, name: str):
        if name not in ("cuda", "emu"):
            raise ValueError(f"unknown kernel backend {name!r}; expected 'cuda' or 'emu'")
        self.name = name
        if name == "cuda":
            import cupy
            self.xp = cupy
        else:
            self.xp = np
        self._modules: dict = {}
        self.scratch_buffers: dict = {}  # scratch()
        self.capturing = False           # set by llmcu/cuda/graphs.py while it captures
        self.recording = None            # emu only: the list a capture appends launches to

    def module(self, stem: str, floatX: str = "float"):
        key = (stem, floatX)
        if key not in self._modules:
            kdir = kernels_dir()
            path = kdir / f"{stem}.cu"
            if not path.is_file():
                raise FileNotFoundError(f"kernel source {path} not found")
            options = compile_options(floatX)
            # a lab file (stem "dev/<layer>") includes its product file as "../<layer>.cu":
            # NVRTC gets the code as a string, so its own folder goes on the include path
            dirs = tuple(dict.fromkeys((path.parent, kdir)))
            if self.name == "cuda":
                import cupy
                self._modules[key] = cupy.RawModule(
                    code=path.read_text(),
                    options=options + tuple(f"--include-path={d}" for d in dirs) + _cuda_header_options(floatX))
            else:
                from ..emu import EmuModule
                self._modules[key] = EmuModule(path, options=options, include_dirs=(kdir,))
        return self._modules[key]

    def launch(self, stem: str, kernel: str, grid, block, args, shared_mem: int = 0,
               floatX: str = "float") -> None:
        fn = self.module(stem, floatX).get_function(kernel)
        if self.recording is not None:  # the emulator's capture: replayed by graphs.Graph
            self.recording.append((functools.partial(fn, shared_mem=shared_mem), (grid, block, args)))
            return
        fn(grid, block, args, shared_mem=shared_mem)
        if _debug and not self.capturing:
            try:
                self.synchronize()
            except Exception as e:  # the error belongs to this launch
                raise RuntimeError(f"kernel {kernel} (kernels/{stem}.cu) failed: {e}") from e

    def run(self, fn, *args) -> None:
        """Host code that does a kernel's job under the emulator (NumPy GEMMs, fills):
        run now, or recorded while the emulator captures a graph (as a GPU capture
        records kernels instead of running them), so a replay repeats it."""
        if self.recording is not None:
            self.recording.append((fn, args))
            return
        fn(*args)

    def fill(self, a, value) -> None:
        """a[...] = value on the device: a CuPy kernel on the GPU (captured like any
        launch), Backend.run under the emulator."""
        if self.name == "cuda":
            a.fill(value)
        else:
            self.run(np.ndarray.fill, a, value)

    def synchronize(self) -> None:
        if self.name == "cuda":
            self.xp.cuda.get_current_stream().synchronize()

    def is_array(self, a) -> bool:
        return isinstance(a, self.xp.ndarray)


def cuda_include_dir():
    """The CUDA include directory NVRTC needs for cuda_bf16.h (common.cuh includes it for
    bf16) and, for the tensor-core attention, mma.h with its crt/mma.h, or None. CuPy
    cannot bundle these, so they come from the CUDA toolkit CuPy finds (when CuPy is
    installed), $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, or NVIDIA's pip packages
    (nvidia/*/include); a directory holding both headers wins over one with cuda_bf16.h
    alone (on an H200 machine, 2026-11-28, the CUDA 13 pip headers lacked crt/ and the
    toolkit's had it)."""
    candidates = []
    try:
        import cupy
        root = cupy.cuda.get_cuda_path()
        if root:
            candidates.append(Path(root) / "include")
    except Exception:  # no CuPy, or an old one without get_cuda_path
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import nvidia  # namespace package of the nvidia-*-cu12/cu13 wheels
        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("*/include"))
    except ImportError:
        pass
    with_bf16 = [c for c in candidates if (c / "cuda_bf16.h").is_file()]
    for include in with_bf16:
        if (include / "crt" / "mma.h").is_file():
            return include
    return with_bf16[0] if with_bf16 else None


def _cuda_header_options(floatX: str) -> tuple[str, ...]:
    """NVRTC's include option for a bf16 build (cuda_include_dir); none found or fp32:
    rely on CuPy's own include paths."""
    if floatX != "__nv_bfloat16":
        return ()
    include = cuda_include_dir()
    return (f"--include-path={include}",) if include is not None else ()


@functools.lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    return Backend(name)


def backend_of(a) -> Backend:
    """The backend that owns array `a`: numpy -> emu, cupy -> cuda."""
    if isinstance(a, np.ndarray):
        return get_backend("emu")
    if type(a).__module__.startswith("cupy"):
        return get_backend("cuda")
    raise TypeError(f"expected a numpy.ndarray (emu) or cupy.ndarray (cuda), got {type(a).__name__}")


# -- argument checks -----------------------------------------------------------

def check_array(fn: str, name: str, a, backend: Backend, dtype=np.float32, shape=None) -> None:
    """Raise TypeError/ValueError naming fn, the argument, expected and actual."""
    if not backend.is_array(a):
        raise TypeError(f"{fn}: {name} must be a {backend.xp.__name__}.ndarray for the {backend.name} "
                        f"backend, got {type(a).__module__}.{type(a).__name__}")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise TypeError(f"{fn}: {name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{fn}: {name} must be C-contiguous (got strides {a.strides})")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def i32(value: int) -> np.int32:
    """An int kernel argument, checked to fit."""
    if not -2**31 <= int(value) < 2**31:
        raise OverflowError(f"kernel int argument {value} does not fit in int32")
    return np.int32(value)


def i64(value: int) -> np.int64:
    return np.int64(value)


def f32(value: float) -> np.float32:
    return np.float32(value)


# -- CUDA libraries through ctypes (cuBLAS in gemm.py, cuBLASLt in cublaslt.py) -----------

def library_candidates(stem: str = "libcublasLt") -> list[str]:
    """Where libcublasLt (or another CUDA library: stem, e.g. libcublas, libnvrtc) may be:
    the soname (already loaded by CuPy, or on the loader path), NVIDIA's pip wheels
    (nvidia/*/lib: cu13/lib, cublas/lib, cuda_nvrtc/lib), the toolkit."""
    names = [f"{stem}.so.13", f"{stem}.so.12", f"{stem}.so"]
    dirs = []
    try:
        import nvidia
        for base in nvidia.__path__:
            dirs += sorted(Path(base).glob("*/lib"))
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]) / "lib64")
    dirs.append(Path("/usr/local/cuda/lib64"))
    return names + [str(d / n) for d in dirs for n in names if (d / n).is_file()]




def load_library(stem: str, signatures: dict):
    """The first of library_candidates(stem) that loads (ctypes.CDLL), with each function in
    signatures given its argument types and an int (status) result; RuntimeError naming
    every place it looked."""
    tried = []
    for cand in library_candidates(stem):
        try:
            lib = ctypes.CDLL(cand)
            break
        except OSError as e:
            tried.append(f"{cand}: {e}")
    else:
        raise RuntimeError(f"{stem} not found (install NVIDIA's pip wheel for it, e.g. nvidia-cublas, "
                           f"or the CUDA toolkit); tried "
                           + "; ".join(tried))
    for name, args in signatures.items():  # every argument typed: no int truncation
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    return lib
