"""Every kernels/*.cu compiles with nvcc for sm_80 and sm_90, and follows the house rules.

The compile tests need only the CUDA toolkit (no GPU): they skip, saying why,
where nvcc is not found. They print each kernel's registers and spills as
ptxas reports them; run `pytest tests/test_kernels_compile.py -s` to see them.
The naming and CUDA-subset checks need nothing and always run.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
# the product files and the lab's (kernels/dev/, which include their product file)
SOURCES = sorted(KERNELS_DIR.glob("*.cu")) + sorted((KERNELS_DIR / "dev").glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
# The options CuPy's RawModule is given at run time, plus the include dir.
OPTIONS = ["-std=c++17", "-DfloatX=float", "-I", str(KERNELS_DIR)]

KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')
# Kernels whose name does not carry the file's stem, by file.
NAMING_EXCEPTIONS = {"classifier": {"softmax_forward_kernel1"},
                     "swiglu": {"geglu_forward_kernel1", "geglu_backward_kernel1"}}


def find_nvcc():
    """nvcc on PATH, else under $CUDA_HOME, $CUDA_PATH or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidate = Path(root) / "bin" / "nvcc"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def _source_id(source: Path) -> str:
    return f"dev-{source.stem}" if source.parent.name == "dev" else source.stem


def kernel_names(source: Path):
    return KERNEL_DECL.findall(source.read_text())


def parse_ptxas(output: str):
    """{kernel: {registers, stack, spill_stores, spill_loads}} from ptxas's
    resource usage lines, which come in this order for each entry function:
        ptxas info : Compiling entry function 'NAME' for 'sm_90'
        ptxas info : Function properties for NAME
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info : Used 32 registers, used 1 barriers, 128 bytes smem
    """
    usage, current = {}, None
    for line in output.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = usage.setdefault(m.group(1), {})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m.group(1))
            if sm := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(sm.group(1))
    return usage


def test_kernel_sources_exist():
    assert SOURCES, f"no .cu files in {KERNELS_DIR}"
    assert (KERNELS_DIR / "common.cuh").is_file()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=_source_id)
def test_kernel_compiles(source, arch, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        if os.environ.get("CI"):  # CI machines carry nvcc: a kernel that does not compile must fail CI
            pytest.fail("nvcc not found under CI; the compile check cannot run")
        pytest.skip("nvcc not found on PATH, nor in $CUDA_HOME/bin, $CUDA_PATH/bin or "
                    "/usr/local/cuda/bin: install the CUDA toolkit to compile-check the kernels")
    # -cubin compiles the device code only: 0.5 s a file instead of 2.5 s with
    # -c, which also runs the host compiler over an empty host side.
    cmd = [nvcc, f"-arch={arch}", *OPTIONS, "-I", str(source.parent), "--resource-usage", "-cubin",
           "-o", str(tmp_path / f"{source.stem}.cubin"), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}"
    ours = [line for line in output.splitlines()
            if "warning" in line.lower() and source.name in line]
    assert not ours, f"{source.name} compiles with warnings for {arch}:\n" + "\n".join(ours)

    usage = parse_ptxas(output)
    names = kernel_names(source)
    missing = [name for name in names if name not in usage]
    assert not missing, f"ptxas reported no resource usage for {missing} in {source.name}:\n{output}"
    print(f"\n{source.name} {arch}")
    print(f"  {'kernel':<40} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>6}")
    for name in names:
        u = usage[name]
        print(f"  {name:<40} {u.get('registers', '?'):>5} {u.get('stack', '?'):>6} "
              f"{u.get('spill_stores', '?'):>9} {u.get('spill_loads', '?'):>9} {u.get('smem', 0):>6}")


@pytest.mark.parametrize("source", SOURCES, ids=_source_id)
def test_kernel_naming(source):
    """extern "C" __global__ kernels named <stem>_..._kernelN (the stem's words
    may come after a prefix, as in fused_classifier_kernel1)."""
    stem = source.stem
    names = kernel_names(source)
    assert names, f'{source.name} defines no extern "C" __global__ kernel'
    allowed = NAMING_EXCEPTIONS.get(stem, set())
    bad = []
    for name in names:
        m = re.fullmatch(r"(\w+?)_kernel\d+", name)
        words = m.group(1).split("_") if m else []
        stem_words = stem.split("_")
        has_stem = any(words[i:i + len(stem_words)] == stem_words for i in range(len(words)))
        if name not in allowed and not (m and has_stem):
            bad.append(name)
    assert not bad, (f"{source.name}: kernels {bad} are not named <{stem}>_<what>_kernelN "
                     f"(see DESIGN.md, Kernels)")
    assert len(set(names)) == len(names), f"{source.name} defines a kernel twice: {names}"


# Constructs outside the CUDA subset the CPU emulator (llmcu/emu) runs, or that
# NVRTC cannot compile; see kernels/README.md.
FORBIDDEN = [
    (r"cooperative_groups|\bcg::", "cooperative groups"),
    (r"\basm\b", "inline PTX"),
    (r"\b(float|int|half|bfloat16)[24]\b|__nv_bfloat162\b", "vector types (version-1 kernels use scalar loads)"),
    (r"extern\s+__shared__", "extern __shared__ (use DYNAMIC_SHARED from common.cuh)"),
    (r"#\s*include\s*<", "system headers (NVRTC has none)"),
    (r"__shfl_up_sync\b|__syncwarp|__ballot_sync|__any_sync|__all_sync", "warp primitives "
     "other than __shfl_sync/__shfl_xor_sync/__shfl_down_sync"),
]


def _drop_gpu_only_branches(code):
    """The code without the lines of `#ifndef LLMCU_EMU` branches that have an `#else`
    (the emulator's version of the same helper): GPU-only code such as tensor-core
    instructions may live there, as kernels/README.md says. The #else branch stays and
    is linted like everything else; an `#ifndef LLMCU_EMU` without an #else stays too
    (GPU-only code with no emulated counterpart is not allowed)."""
    lines = code.splitlines()
    keep = [True] * len(lines)
    stack = []  # per open #if: [is "#ifndef LLMCU_EMU", line of the #if, line of its #else or None]
    for i, line in enumerate(lines):
        d = line.strip()
        if d.startswith("#if"):
            stack.append([d.split()[:2] == ["#ifndef", "LLMCU_EMU"], i, None])
        elif d.startswith("#else") and stack:
            stack[-1][2] = i
        elif d.startswith("#endif") and stack:
            emu_guard, start, other = stack.pop()
            if emu_guard and other is not None:
                keep[start:other] = [False] * (other - start)
    return "\n".join(line for line, k in zip(lines, keep) if k)


def test_gpu_only_branches_need_an_emulated_counterpart():
    gpu = 'asm volatile("mma.sync ...");'
    with_else = f"#ifndef LLMCU_EMU\n{gpu}\n#else\nemulated();\n#endif\n"
    assert "asm" not in _drop_gpu_only_branches(with_else) and "emulated" in _drop_gpu_only_branches(with_else)
    assert "asm" in _drop_gpu_only_branches(f"#ifndef LLMCU_EMU\n{gpu}\n#endif\n")  # no emulated version
    assert "asm" in _drop_gpu_only_branches(f"#ifdef LLMCU_EMU\nx();\n#else\n{gpu}\n#endif\n")
    assert "asm" in _drop_gpu_only_branches(gpu)


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


@pytest.mark.parametrize("source", SOURCES, ids=_source_id)
def test_kernel_cuda_subset(source):
    code = _drop_gpu_only_branches(_strip_comments(source.read_text()))
    found = [why for pattern, why in FORBIDDEN if re.search(pattern, code)]
    assert not found, f"{source.name} uses {found}, outside the CUDA subset in kernels/README.md"
    if source.parent.name == "dev":  # a lab file includes its product file (or common.cuh)
        assert re.search(rf'#include "(\.\./{source.stem}\.cu|common\.cuh)"', code), (
            f'{source.name} must #include "../{source.stem}.cu" or "common.cuh"')
    else:
        assert '#include "common.cuh"' in code, f'{source.name} must #include "common.cuh"'
    for m in re.finditer(r"__shfl_(xor_|down_)?sync\s*\(\s*([^,]+),", code):
        assert m.group(2).strip() == "0xffffffff", (
            f"{source.name}: shuffles must use the full-warp mask 0xffffffff, found {m.group(2)}")


@pytest.mark.parametrize("source", SOURCES, ids=_source_id)
def test_kernel_header_comment(source):
    """Each product file opens with a comment block: what it computes, shapes, launch,
    versions; each lab file with one naming itself the layer's lab and its versions."""
    text = source.read_text()
    header = text[:text.find("#include")]
    if source.parent.name == "dev":
        assert header.lstrip().startswith(f"// The {source.stem} lab"), (
            f"{source.name} must open with '// The {source.stem} lab: ...'")
        assert "kernels/README.md" in header, f"{source.name}: the header must point to the promotion rule"
        return
    assert header.lstrip().startswith(f"// {source.stem}:"), (
        f"{source.name} must open with '// {source.stem}: <what the layer computes>'")
    for word in ("Shapes", "Launch", "Versions"):
        assert word in header, f"{source.name}: the header comment has no '{word}' section"
