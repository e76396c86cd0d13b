"""Every kernels/*.cu compiles with NVRTC, the compiler CuPy uses on a GPU machine, with
the options llmcu.cuda.runtime gives it there: compile_options(floatX), the kernels'
include path and, for bf16, the CUDA include directory it finds (cuda_include_dir), for
sm_90 (H100/H200), fp32 and bf16, without a warning from our files.

nvcc's checks (tests/test_kernels_compile.py) cannot see what differs under NVRTC: its
built-in headers (is a device function such as atomicAdd on float2 declared there?) and
the include directory found at run time (on an H200 machine, 2026-11-28, the pip
headers lacked crt/mma.h and the attention module did not build until runtime.py looked
elsewhere). No GPU is needed: NVRTC compiles to PTX/cubin on the CPU. Needs libnvrtc
(the dev extra installs nvidia-cuda-nvrtc); skips, saying why, without it.
"""

import ctypes
from pathlib import Path

import pytest

from llmcu.cuda.runtime import load_library
from llmcu.cuda.runtime import compile_options, cuda_include_dir, kernels_dir

SOURCES = sorted(kernels_dir().glob("*.cu"))
_P, _PP = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
_STRS = ctypes.POINTER(ctypes.c_char_p)
SIGNATURES = {  # nvrtc.h: every function returns nvrtcResult (int)
    "nvrtcCreateProgram": [_PP, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, _STRS, _STRS],
    "nvrtcCompileProgram": [_P, ctypes.c_int, _STRS],
    "nvrtcGetProgramLogSize": [_P, ctypes.POINTER(ctypes.c_size_t)],
    "nvrtcGetProgramLog": [_P, ctypes.c_char_p],
    "nvrtcDestroyProgram": [_PP],
}


@pytest.fixture(scope="module")
def nvrtc():
    try:
        return load_library("libnvrtc", SIGNATURES)
    except RuntimeError as e:
        pytest.skip(f"NVRTC not installed (pip install nvidia-cuda-nvrtc): {e}")


def nvrtc_compile(lib, source: Path, options: list[str]) -> tuple[int, str]:
    """(nvrtcResult, the compile log) of one source with these options."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0,
                                  None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        result = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(size.value, 1))
        lib.nvrtcGetProgramLog(prog, log)
        return result, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def runtime_options(floatX: str, arch: str = "sm_90") -> list[str]:
    """The options llmcu.cuda.runtime gives CuPy's RawModule, and the target."""
    options = [*compile_options(floatX), f"--include-path={kernels_dir()}", f"--gpu-architecture={arch}"]
    if floatX == "__nv_bfloat16":
        include = cuda_include_dir()
        if include is None:
            pytest.skip("no CUDA include directory with cuda_bf16.h (toolkit or nvidia pip headers)")
        options.append(f"--include-path={include}")
    return options


@pytest.mark.parametrize("floatX", ["float", "__nv_bfloat16"], ids=["fp32", "bf16"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_kernel_compiles_with_nvrtc(nvrtc, source, floatX):
    result, log = nvrtc_compile(nvrtc, source, runtime_options(floatX))
    assert result == 0, f"NVRTC could not compile {source.name} ({floatX}):\n{log[:4000]}"
    ours = [line for line in log.splitlines() if "warning" in line.lower() and source.name in line]
    assert not ours, f"{source.name} compiles with NVRTC warnings ({floatX}):\n" + "\n".join(ours)


def test_nvrtc_reports_errors(nvrtc, tmp_path):
    """The check can fail: a source calling an undeclared function is refused with its name."""
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void bad_kernel1(float* x) { x[0] = no_such_function(1.0f); }\n')
    result, log = nvrtc_compile(nvrtc, bad, runtime_options("float"))
    assert result != 0 and "no_such_function" in log, (result, log)
