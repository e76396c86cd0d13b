"""Run the project's CUDA kernel sources on the CPU ("emu" backend).

    from llmcu.emu import EmuModule, EmuError
    mod = EmuModule("kernels/layernorm.cu", options=("-DfloatX=float",), include_dirs=("kernels",))
    k = mod.get_function("layernorm_forward_kernel1")
    k(grid, block, (out, inp, np.int32(N), np.float32(eps)), shared_mem=0)

The call has the shape of a CuPy RawKernel call, with NumPy arrays in place of
device arrays, so a Python wrapper runs unchanged on either backend. Unlike
CuPy, every argument is checked against the kernel's real parameter types (as
g++ sees them after macro expansion): a pointer takes a C-contiguous ndarray
of the pointee's dtype (or None for NULL), a value parameter takes a NumPy
scalar of exactly its type (np.int32 for int, np.float32 for float, np.uint64
for size_t, ...). A Python int or a wrong NumPy type raises TypeError naming
the kernel, the parameter, the expected and the actual type.

How it works: the .cu file is compiled as C++ by g++ with shim.h
force-included (CUDA's device API) and runtime.cpp (the fiber scheduler)
linked in, together with a generated file that exports one entry point per
`extern "C" __global__` kernel. The library is cached under $LLMCU_EMU_CACHE
(default ~/.cache/llmcu/emu), keyed on the sources, headers, flags and
compiler, and loaded with ctypes. Each launch runs the blocks one after
another on the calling thread; each CUDA thread of a block is a fiber.

Environment:
  LLMCU_EMU_CACHE    cache directory for built libraries
  LLMCU_EMU_STACK    fiber stack size in bytes, e.g. 256K (default 64K); a
                     stack overflow hits a guard page and kills the process
  LLMCU_EMU_ORDER    reverse|random: run a block's fibers in another order,
                     which exposes missing barriers before shared-memory reuse;
                     warps|warps-reverse: run each warp alone up to its next
                     __syncthreads (first to last, or last to first), which
                     exposes missing barriers between warps (the other orders
                     keep warps in step at every shuffle)
  LLMCU_EMU_CP_ASYNC late|eager: when a cp.async copy (<cuda_pipeline.h>'s
                     __pipeline_memcpy_async) lands in shared memory. late (the
                     default): at the wait that covers it, its destination NaN
                     until then, so reads before the wait fail their tests;
                     eager: at issue
  LLMCU_EMU_ASAN=1   build with AddressSanitizer (out-of-bounds accesses are
                     reported with the .cu line); the Python process must
                     preload it: LD_PRELOAD=$(g++ -print-file-name=libasan.so)
  LLMCU_EMU_UCONTEXT=1  use ucontext instead of the x86-64 assembly switch
  CXX                the C++ compiler (default g++)

Errors in a kernel that the emulator detects (divergent __syncthreads,
deadlock, a shuffle that reads an exited lane, a failed device assert) raise
EmuError. A segfault in a kernel (bad pointer, stack overflow) kills the
process, as it would not on a GPU: run risky tests in a subprocess.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["EmuError", "EmuModule", "EmuKernel", "parse_kernels"]

_HERE = Path(__file__).resolve().parent
SHIM = _HERE / "shim.h"
RUNTIME = _HERE / "runtime.cpp"
# Gathers the statics of template and inline functions (their own .bss._ZZ* sections,
# where g++ puts them whatever their section attribute says) into emu_shared_t, which the
# runtime refills with 0xFF before every block as it does emu_shared (shim.h, __shared__).
SHARED_LD = _HERE / "emu_shared.ld"
STUB_INCLUDE = _HERE / "include"

# Bumped whenever the generated code or the entry-point ABI changes.
_ABI = "llmcu-emu-2"

# One launch at a time in this process: kernels share static __shared__
# storage and the scheduler's state, and ctypes releases the GIL.
_LAUNCH_LOCK = threading.RLock()

# CUDA's default limit on dynamic shared memory without an opt-in, and the
# largest opt-in (H100: 227 KiB).
_DEFAULT_DYN_SMEM = 48 * 1024
_MAX_DYN_SMEM = 227 * 1024

stats = {"compiles": 0, "cache_hits": 0}


class EmuError(RuntimeError):
    """A kernel failed to build, was not found, or failed while running on the CPU."""


# ---------------------------------------------------------------------------
# Parsing kernel signatures from the source


def _strip_comments(src: str) -> str:
    """Remove // and /* */ comments, keeping string/char literals and line count."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif c == "/" and i + 1 < n and src[i + 1] == "*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("\n" * src.count("\n", i, j) or " ")
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_PARENS = r"\((?:[^()]|\([^()]*\))*\)"
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+(?P<pre>(?:\w+(?:\s*' + _PARENS + r")?\s+)*?)void\s+"
    r"(?:__launch_bounds__\s*" + _PARENS + r"\s*)?(?P<name>\w+)\s*\("
)
_DROP_WORDS = re.compile(r"\b(?:__restrict__|__restrict|__grid_constant__)\b")


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "(<[":
            depth += 1
        elif c in ")>]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


_TYPE_WORDS = {"int", "char", "short", "long", "float", "double", "unsigned", "signed", "bool", "const", "volatile"}


def _parse_param(p: str) -> tuple[str, str]:
    p = " ".join(_DROP_WORDS.sub(" ", p).split())
    m = re.match(r"^(?P<type>.*?[\w*&>])\s*\b(?P<name>[A-Za-z_]\w*)$", p)
    if m and m.group("name") not in _TYPE_WORDS and m.group("type").split()[-1] not in ("struct", "enum"):
        typ, name = m.group("type"), m.group("name")
    else:
        typ, name = p, ""
    typ = re.sub(r"\s*([*&])\s*", r"\1", typ)
    typ = re.sub(r"([*&])(?=\w)", r"\1 ", typ)  # "float*const" -> "float* const"
    return typ.strip(), name


def parse_kernels(src: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Map each `extern "C" __global__` kernel in src to (param_types, param_names)."""
    text = _strip_comments(src)
    kernels = {}
    for m in _KERNEL_RE.finditer(text):
        if "__global__" not in m.group("pre").split():
            continue
        i, depth = m.end(), 1
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        inner = text[m.end() : i - 1].strip()
        params = [] if inner in ("", "void") else [_parse_param(p) for p in _split_params(inner)]
        kernels[m.group("name")] = (tuple(t for t, _ in params), tuple(n for _, n in params))
    return kernels


# ---------------------------------------------------------------------------
# Building and caching


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmuError(f"the emu backend needs a C++ compiler; `{cxx} --version` failed: {e}") from None
    return r.stdout.strip()


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)


def _included_files(path: Path, include_dirs: list[Path]) -> list[Path]:
    """The files path includes (recursively) that resolve to the source's
    directory, the include dirs or the stub headers; system headers are
    covered by the compiler id."""
    seen: dict[Path, None] = {}
    todo = [path]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen[f] = None
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for kind, name in _INCLUDE_RE.findall(text):
            dirs = ([f.parent] if kind == '"' else []) + include_dirs + [STUB_INCLUDE]
            for d in dirs:
                cand = (d / name).resolve()
                if cand.is_file():
                    todo.append(cand)
                    break
    return sorted(seen)


def _asan_preloaded() -> bool:
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return True  # cannot tell: let the loader decide


def _cache_dir() -> Path:
    d = os.environ.get("LLMCU_EMU_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "llmcu" / "emu"


def _normalize_options(options) -> list[str]:
    if options is None:
        return []
    if isinstance(options, str):
        options = shlex.split(options)
    opts, it = [], iter(options)
    for o in it:
        o = str(o)
        if o in ("-D", "-U", "-I"):  # separate argument form
            o += str(next(it, ""))
        if o.startswith(("-D", "-U", "-I")):
            opts.append(o)
        # Other nvcc/NVRTC options (-std=, -arch=, --use_fast_math, -lineinfo)
        # have no CPU meaning and are ignored.
    return opts


def _atomic_compile(cmd_without_output: list[str], dest: Path, what: str) -> None:
    """Run the compiler into a temporary name beside dest, then rename: parallel
    workers building the same file never see a partial one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    cmd = [*cmd_without_output, "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise EmuError(f"{what}: compiling for the CPU emulator failed:\n{r.stderr.strip()}\ncommand: {shlex.join(cmd)}")
    os.replace(tmp, dest)
    stats["compiles"] += 1


def _runtime_object(cxx: str, flags: tuple[str, ...]) -> Path:
    """runtime.cpp compiled once per (compiler, flags, runtime source): it takes
    about 1 s to build, a kernel file about 0.3 s."""
    h = hashlib.sha256()
    for part in (_ABI, _compiler_id(cxx), "\0".join(flags)):
        h.update(part.encode() + b"\0\1")
    for f in [SHIM, RUNTIME] + sorted(STUB_INCLUDE.rglob("*.h")):
        h.update(f.read_bytes() + b"\0\1")
    obj = _cache_dir() / f"runtime-{h.hexdigest()[:24]}.o"
    if not obj.is_file():
        compile_flags = [f for f in flags if f != "-shared"]
        _atomic_compile([cxx, *compile_flags, "-c", str(RUNTIME)], obj, "runtime.cpp")
    return obj


class EmuModule:
    """A .cu file compiled for the CPU; the counterpart of cupy.RawModule."""

    def __init__(self, path, options=(), include_dirs=(), *, cxx: str | None = None):
        self.path = Path(path).resolve()
        try:
            self.source = self.path.read_text()
        except OSError as e:
            raise EmuError(f"cannot read kernel source {path}: {e}") from None
        self.options = tuple(_normalize_options(options))
        self.include_dirs = tuple(Path(d).resolve() for d in include_dirs)
        self.kernels = parse_kernels(self.source)
        if not self.kernels:
            raise EmuError(f'{self.path}: no `extern "C" __global__ void` kernels found')
        self.cxx = cxx or os.environ.get("CXX") or "g++"
        asan = os.environ.get("LLMCU_EMU_ASAN", "") not in ("", "0")
        flags = ["-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden", "-fstack-clash-protection",
                 "-fno-strict-aliasing", "-fno-math-errno"]
        if asan:
            # ASan understands swapcontext, not the assembly switch.
            flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", "-DLLMCU_EMU_UCONTEXT"]
        else:
            # (not under ASan: its redzones around those statics would meet the 0xFF refill)
            flags += ["-O2", f"-Wl,-T,{SHARED_LD}"]
        # -fno-gnu-unique (g++): each library keeps its own template statics (a unique symbol
        # would bind every loaded library's copy to the first one, outside this library's
        # sections); clang emits no unique symbols and has no such flag
        compiler = _compiler_id(self.cxx)
        if "clang" not in compiler.lower():
            flags.append("-fno-gnu-unique")
        if os.environ.get("LLMCU_EMU_UCONTEXT", "") not in ("", "0"):
            flags.append("-DLLMCU_EMU_UCONTEXT")
        flags += ["-include", str(SHIM), "-I", str(STUB_INCLUDE)]
        self._runtime_flags = tuple(flags)
        flags += [f"-I{d}" for d in self.include_dirs] + list(self.options)
        self.flags = tuple(flags)

        h = hashlib.sha256()
        for part in (_ABI, compiler, "\0".join(self.flags), str(self.path), ",".join(self.kernels)):
            h.update(part.encode() + b"\0\1")
        deps = [SHIM, RUNTIME, SHARED_LD] + sorted(STUB_INCLUDE.rglob("*.h"))
        deps += _included_files(self.path, list(self.include_dirs))
        for f in deps:
            h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0\1")
        self.key = h.hexdigest()[:24]
        self.library_path = _cache_dir() / f"{self.path.stem}-{self.key}.so"
        self.compiled = False  # True when this instance had to build the library
        if self.library_path.is_file():
            stats["cache_hits"] += 1
        else:
            self._build()
        if asan and not _asan_preloaded():
            # Loading it anyway would make ASan print a warning and exit the process.
            raise EmuError(
                f"{self.path.name}: LLMCU_EMU_ASAN=1 needs AddressSanitizer loaded first; run Python as "
                "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ..."
            )
        try:
            self._lib = ctypes.CDLL(str(self.library_path))
        except OSError as e:
            hint = ""
            if asan and "asan" in str(e).lower():
                hint = " (an ASan build needs LD_PRELOAD=$(g++ -print-file-name=libasan.so) for the Python process)"
            raise EmuError(f"cannot load {self.library_path}: {e}{hint}") from None
        self._lib.emu_last_error.restype = ctypes.c_char_p
        self._lib.emu_switch_count.restype = ctypes.c_ulonglong
        self._functions: dict[str, EmuKernel] = {}

    def _build(self) -> None:
        runtime_obj = _runtime_object(self.cxx, self._runtime_flags)
        with tempfile.TemporaryDirectory(prefix="llmcu-emu-") as tmp:
            wrapper = Path(tmp) / f"{self.path.stem}_emu.cpp"
            lines = [f'#include "{self.path}"'] + [f"EMU_ENTRY({k})" for k in self.kernels]
            wrapper.write_text("\n".join(lines) + "\n")
            cmd = [self.cxx, *self.flags, str(wrapper), str(runtime_obj)]
            try:
                _atomic_compile(cmd, self.library_path, self.path.name)
            except EmuError as e:
                # shim.h puts static __shared__ variables in one section (to
                # poison them per block); g++ refuses to mix ones of inline
                # functions/templates with plain ones there. Build without.
                if "section type conflict" not in str(e):
                    raise
                _atomic_compile(cmd + ["-DLLMCU_EMU_PLAIN_SHARED"], self.library_path, self.path.name)
        self.compiled = True

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(self.kernels)

    def get_function(self, name: str) -> "EmuKernel":
        if name not in self._functions:
            if name not in self.kernels:
                raise EmuError(
                    f"{self.path.name} has no kernel {name!r}; available: {', '.join(self.kernels)}"
                )
            self._functions[name] = EmuKernel(self, name)
        return self._functions[name]

    @property
    def switch_count(self) -> int:
        """Fiber switches made by this library so far (for measuring)."""
        return int(self._lib.emu_switch_count())


# ---------------------------------------------------------------------------
# Launching

# The compiler reports each parameter as p:<pointee> or s:<type>:<bytes>.
_DTYPES = {
    "f32": np.dtype(np.float32), "f64": np.dtype(np.float64),
    "i8": np.dtype(np.int8), "u8": np.dtype(np.uint8), "i16": np.dtype(np.int16), "u16": np.dtype(np.uint16),
    "i32": np.dtype(np.int32), "u32": np.dtype(np.uint32), "i64": np.dtype(np.int64), "u64": np.dtype(np.uint64),
    "b8": np.dtype(np.bool_), "bf16": np.dtype(np.uint16),
}


def _dtype_ok(code: str, dt: np.dtype) -> bool:
    if code in ("void", "other"):
        return True
    if code == "ptr":
        return dt in (np.dtype(np.uint64), np.dtype(np.int64))
    if code == "bf16":
        return dt == np.uint16 or dt.name == "bfloat16"
    return dt == _DTYPES[code]


def _expected(code: str) -> str:
    if code == "bf16":
        return "uint16 (bf16 storage)"
    if code == "ptr":
        return "uint64 (addresses)"
    return _DTYPES[code].name if code in _DTYPES else "any"


def _dim3(v, what: str, kernel: str) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) for x in t):
        raise TypeError(f"{kernel}: {what} must be an int or a tuple of 1-3 ints, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    if min(t) < 1:
        raise EmuError(f"{kernel}: {what} dims must be >= 1, got {t}")
    return t


class EmuKernel:
    """One kernel of an EmuModule; call it like a cupy.RawKernel."""

    def __init__(self, module: EmuModule, name: str):
        self.module = module
        self.name = name
        self.param_types, self.param_names = module.kernels[name]
        self.max_dynamic_shared_size_bytes = _DEFAULT_DYN_SMEM
        lib = module._lib
        sig_fn = getattr(lib, f"emu_sig_{name}")
        sig_fn.restype = ctypes.c_char_p
        self._codes = tuple(sig_fn().decode().split())
        if len(self._codes) != len(self.param_types):
            raise EmuError(
                f"{name}: the source parser found {len(self.param_types)} parameters {self.param_types}, "
                f"the compiler {len(self._codes)} ({' '.join(self._codes)})"
            )
        self._spec = []  # (is_pointer, type code, value size)
        for c in self._codes:
            kind, _, rest = c.partition(":")
            code, _, size = rest.partition(":")
            self._spec.append((kind == "p", code, int(size or 8)))
        self._by_buffer = {i for i, (p, _, size) in enumerate(self._spec) if not p and size > 8}
        self._slots_t = ctypes.c_uint64 * max(len(self._spec), 1)
        self._argv_t = ctypes.c_void_p * max(len(self._spec), 1)
        self._entry = getattr(lib, f"emu_entry_{name}")
        self._entry.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._entry.restype = ctypes.c_int

    def _param(self, i: int) -> str:
        n = self.param_names[i]
        return f"parameter {i}" + (f" `{n}`" if n else "") + f" ({self.param_types[i]})"

    def _marshal(self, args) -> tuple[ctypes.Array, list]:
        """Check args against the compiled signature and lay them out as for
        cudaLaunchKernel: argv[i] points at parameter i's value."""
        n = len(self._spec)
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != n:
            raise TypeError(f"{self.name}: takes {n} arguments {self.param_types}, got {len(args)}")
        slots = self._slots_t()
        keep: list = [slots, args]
        for i, ((is_ptr, code, size), a) in enumerate(zip(self._spec, args)):
            if is_ptr:
                if a is None:
                    continue  # NULL
                if not isinstance(a, np.ndarray):
                    raise TypeError(
                        f"{self.name}: {self._param(i)} expects a numpy array (or None), got {type(a).__name__}"
                    )
                if not _dtype_ok(code, a.dtype):
                    raise TypeError(f"{self.name}: {self._param(i)} expects a {_expected(code)} array, got {a.dtype}")
                if not a.flags.c_contiguous:
                    raise TypeError(f"{self.name}: {self._param(i)} needs a C-contiguous array")
                slots[i] = a.__array_interface__["data"][0]
                continue
            if not isinstance(a, np.generic):
                want = f"np.{_expected(code)}" if code in _DTYPES else f"{size}-byte value"
                raise TypeError(
                    f"{self.name}: {self._param(i)} expects a numpy scalar {want}, got {type(a).__name__} {a!r} "
                    "(CuPy would pass it silently with the wrong type)"
                )
            if code in _DTYPES:
                if not _dtype_ok(code, a.dtype):
                    raise TypeError(f"{self.name}: {self._param(i)} expects np.{_expected(code)}, got np.{a.dtype}")
            elif a.dtype.itemsize != size:
                raise TypeError(
                    f"{self.name}: {self._param(i)} expects a {size}-byte value, got {a.dtype} "
                    f"({a.dtype.itemsize} bytes)"
                )
            if size <= 8:
                slots[i] = int.from_bytes(a.tobytes(), "little")
            else:  # a struct passed by value: its own buffer
                buf = ctypes.create_string_buffer(a.tobytes(), size)
                keep.append(buf)
                slots[i] = ctypes.addressof(buf)
        base = ctypes.addressof(slots)
        argv = self._argv_t(*[slots[i] if i in self._by_buffer else base + 8 * i for i in range(n)])
        keep.append(argv)
        return argv, keep

    def __call__(self, grid, block, args, shared_mem=0):
        g = _dim3(grid, "grid", self.name)
        b = _dim3(block, "block", self.name)
        if b[0] * b[1] * b[2] > 1024 or b[2] > 64:
            raise EmuError(f"{self.name}: block {b} has {b[0] * b[1] * b[2]} threads; CUDA allows at most 1024 "
                           "(and blockDim.z <= 64)")
        if g[1] > 65535 or g[2] > 65535 or g[0] > 2**31 - 1:
            raise EmuError(f"{self.name}: grid {g} exceeds CUDA's limits (2^31-1, 65535, 65535)")
        if not isinstance(shared_mem, (int, np.integer)) or shared_mem < 0:
            raise TypeError(f"{self.name}: shared_mem must be a non-negative int, got {shared_mem!r}")
        limit = min(int(self.max_dynamic_shared_size_bytes), _MAX_DYN_SMEM)
        if shared_mem > limit:
            raise EmuError(
                f"{self.name}: shared_mem={shared_mem} bytes exceeds the limit of {limit}; above 48 KiB CUDA "
                "needs an opt-in: set kernel.max_dynamic_shared_size_bytes (at most 227 KiB on H100)"
            )
        argv, keep = self._marshal(args)
        gd = (ctypes.c_uint * 3)(*g)
        bd = (ctypes.c_uint * 3)(*b)
        with _LAUNCH_LOCK:
            rc = self._entry(gd, bd, int(shared_mem), argv)
            err = self.module._lib.emu_last_error().decode(errors="replace") if rc else ""
        del keep
        if rc:
            raise EmuError(err)

    def __repr__(self):
        return f"<EmuKernel {self.name}({', '.join(self.param_types)}) from {self.module.path.name}>"
