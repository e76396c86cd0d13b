"""The attention lab's launch code: every version of kernels/dev/attention.cu (and the
product's version 3 with a block order), behind the product wrappers' signatures.

Load it by path (benchmarks/lab.py, tests/lab/): kernels/dev/ is not a package.

    VERSIONS[v].ops["flash_attention_forward"](out, lse, qkv, num_heads, num_kv_heads=None,
                                              schedule="grouped")
    VERSIONS[v].ops["flash_attention_backward"](dqkv, dout, qkv, out, lse, num_heads,
                                               num_kv_heads=None, schedule="grouped")

take the arguments of llmcu/cpu/attention.py's (the oracle's) and llmcu/cuda/attention.py's
(the product's) functions of the same names, so the three swap; versions 3-9 add `schedule`
("grouped" or "heavy_first": the kernels' trailing `order` int, 0 or 1;
flash3_block_coords in kernels/attention.cu). VERSIONS["simple"] is the permute/softmax
path with the oracle's attention_forward(out, att, qkv, num_heads) and
attention_backward(dqkv, dout, qkv, att, num_heads): the (B,NH,T,T) probabilities kept.

Versions 2-9 are bf16 only (uint16 bit patterns); 2 needs hs 64 or 128, 3-9 hs = 64 and
16-byte aligned qkv, out, dout, dqkv (whole 128-byte head rows move in 16-byte pieces).
Version 3 is the product's kernel3 (stem "attention"); 3-9 share the lab's 16-byte
backward preprocess (kernel5), as the old wrapper did, so they compute the same D bit for
bit and versions 4 (and 9's forward, and 5-9's dK/dV) reproduce version 3's bits.
"""

import functools
import math
import numpy as np

from llmcu.cuda import runtime
from llmcu.cuda.attention import flash_arrays, flash_heads
from llmcu.cuda.runtime import (FLOATX_NAMES, backend_of, check_array, f32, i32, launch_config,
                                warp_per_row)
from llmcu.lab import Version

STEM, PRODUCT = "dev/attention", "attention"
BF16 = np.dtype(np.uint16)

FLASH2_TILE, FLASH2_THREADS, FLASH2_HEAD_SIZES = 64, 128, (64, 128)
FLASH3_TILE, FLASH3_THREADS, FLASH3_HS = 64, 128, 64
SCHEDULES = ("grouped", "heavy_first")   # the kernels' `order`: 0, 1
ONE_PASS = (5, 6, 7, 8, 9)               # the one-pass backward (dQ by fp32 atomics)
FORWARD_ROWS = {9: 128}                  # query rows per forward block (else FLASH3_TILE)
FLASH5_WARPS = {5: 4, 6: 8, 7: 4, 8: 8, 9: 4}   # 16 keys a warp: 64 or 128 keys a block
FLASH5_STAGES = {5: 1, 6: 1, 7: 2, 8: 2, 9: 2}  # Q/dO buffers: 2 = next step's loads in flight


# --- the simple path: permutes and the masked softmax as kernels, GEMMs from xp ----------

def _simple_check(fn, be, qkv, num_heads, **named):
    check_array(fn, "qkv", qkv, be)
    if qkv.ndim != 3 or qkv.shape[-1] % 3 or (qkv.shape[-1] // 3) % num_heads:
        raise ValueError(f"{fn}: qkv must be (B,T,3C) with C divisible by num_heads={num_heads}, "
                         f"got shape {qkv.shape}")
    B, T, C3 = qkv.shape
    C = C3 // 3
    shapes = {"out": (B, T, C), "dout": (B, T, C), "dqkv": (B, T, C3), "att": (B, num_heads, T, T)}
    for name, a in named.items():
        check_array(fn, name, a, be, shape=shapes[name])
    return B, T, C, num_heads, C // num_heads


def _split_heads(be, qkv, B, T, NH, hs):
    """q, k, v as (B,NH,T,hs) copies of qkv's three thirds."""
    q, k, v = (be.xp.empty((B, NH, T, hs), dtype=qkv.dtype) for _ in range(3))
    grid, block = launch_config(B * T * NH * hs)
    be.launch(STEM, "attention_permute_kernel1", grid, block, (q, k, v, qkv, i32(B), i32(T), i32(NH), i32(hs)))
    return q, k, v


def attention_forward(out, att, qkv, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _simple_check("attention_forward", be, qkv, num_heads, out=out, att=att)
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    be.xp.matmul(q, k.transpose(0, 1, 3, 2), out=att)          # preatt, softmaxed in place
    grid, block = warp_per_row(B * NH * T)
    be.launch(STEM, "attention_softmax_forward_kernel1", grid, block,
              (att, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    y = be.xp.matmul(att, v)                                   # (B,NH,T,hs)
    grid, block = launch_config(B * T * C)
    be.launch(STEM, "attention_unpermute_kernel1", grid, block, (out, y, i32(B), i32(T), i32(NH), i32(hs)))


def attention_backward(dqkv, dout, qkv, att, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _simple_check("attention_backward", be, qkv, num_heads, dqkv=dqkv, dout=dout, att=att)
    xp = be.xp
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    dy = xp.empty((B, NH, T, hs), dtype=qkv.dtype)
    grid, block = launch_config(B * T * C)
    be.launch(STEM, "attention_unpermute_backward_kernel1", grid, block, (dy, dout, i32(B), i32(T), i32(NH), i32(hs)))
    datt = xp.matmul(dy, v.transpose(0, 1, 3, 2))             # (B,NH,T,T), dpreatt in place below
    dv = xp.matmul(att.transpose(0, 1, 3, 2), dy)
    grid, block = warp_per_row(B * NH * T)
    be.launch(STEM, "attention_softmax_backward_kernel1", grid, block,
              (datt, datt, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    dq = xp.matmul(datt, k)
    dk = xp.matmul(datt.transpose(0, 1, 3, 2), q)
    grid, block = launch_config(B * T * 3 * C)
    be.launch(STEM, "attention_permute_backward_kernel1", grid, block,
              (dqkv, dq, dk, dv, i32(B), i32(T), i32(NH), i32(hs)))


# --- fused versions 2-9 ------------------------------------------------------------

def _flash2_smem(kind: str, hs: int) -> int:
    """Dynamic shared memory bytes of a version-2 kernel (FLASH2_*_SMEM in the .cu file)."""
    tile, f32b, bf16b = FLASH2_TILE, 4, 2
    if kind == "forward":
        return 3 * tile * hs * bf16b + tile * tile * f32b + tile * tile * bf16b + tile * hs * f32b
    if kind == "backward_dq":
        return (4 * tile * hs * bf16b + 2 * tile * tile * f32b + tile * tile * bf16b + tile * hs * f32b
                + 2 * tile * f32b)
    return (4 * tile * hs * bf16b + 2 * tile * tile * f32b + 2 * tile * tile * bf16b + 2 * tile * hs * f32b
            + 2 * tile * f32b)


def _flash5_smem(version: int) -> int:
    """Dynamic shared memory bytes of the one-pass backward: K and dS^T tiles of the block's
    keys, STAGES Q and dO tiles of 64 rows, 72 bf16 a row (36, 54, 54, 72 KiB for 5-8)."""
    return (2 * 16 * FLASH5_WARPS[version] + 2 * FLASH5_STAGES[version] * FLASH3_TILE) * (FLASH3_HS + 8) * 2


def _launch_dynamic(be, stem, name, grid, block, args, smem):
    if smem > 48 * 1024:  # CUDA's limit without an opt-in
        be.module(stem, FLOATX_NAMES[BF16]).get_function(name).max_dynamic_shared_size_bytes = smem
    be.launch(stem, name, grid, block, args, shared_mem=smem, floatX=FLOATX_NAMES[BF16])


def _flash_check(fn, be, version, qkv, num_heads, num_kv_heads, **named):
    """bf16 arrays (uint16 bit patterns), lse float32; hs 64/128 (version 2) or 64 (3-9);
    versions 3-9 need qkv, out, dout, dqkv 16-byte aligned. Returns B, T, NH, NKV, hs."""
    B, T, NH, NKV, hs = flash_heads(fn, be, qkv, num_heads, num_kv_heads, BF16)  # the product's
    if version == 2 and hs not in FLASH2_HEAD_SIZES:
        raise ValueError(f"{fn}: version 2 needs head size hs in {FLASH2_HEAD_SIZES}, got {hs}")
    if version >= 3 and hs != FLASH3_HS:
        raise ValueError(f"{fn}: version {version} needs head size hs = {FLASH3_HS}, got {hs}")
    flash_arrays(fn, be, BF16, B, T, NH, NKV, hs, {"qkv": qkv, **named},
                 f"version {version} moves {{name}} in 16-byte pieces and needs it" if version >= 3 else None)
    return B, T, NH, NKV, hs


def _order(fn, version, schedule):
    """The trailing `order` argument of versions 3-9 (none for version 2)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if version == 2:
        if schedule != SCHEDULES[0]:
            raise ValueError(f"{fn}: schedule={schedule!r} needs version 3 to 9, got version 2")
        return ()
    return (i32(SCHEDULES.index(schedule)),)


def flash_forward(version, out, lse, qkv, num_heads, num_kv_heads=None, schedule="grouped"):
    """Version 2: forward_kernel2 (dynamic shared memory); 3, 5-8: the product's forward_kernel3;
    4: forward_kernel4 (double-buffered K/V); 9: forward_kernel9 (128 query rows, 8 warps)."""
    fn = "flash_attention_forward"
    be = backend_of(qkv)
    B, T, NH, NKV, hs = _flash_check(fn, be, version, qkv, num_heads, num_kv_heads, out=out, lse=lse)
    args = (out, lse, qkv, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), f32(1.0 / math.sqrt(hs)))
    args += _order(fn, version, schedule)
    if version == 2:
        _launch_dynamic(be, STEM, "attention_flash_forward_kernel2", (math.ceil(T / FLASH2_TILE), NH, B),
                        (FLASH2_THREADS,), args, _flash2_smem("forward", hs))
        return
    number = {4: 4, 9: 9}.get(version, 3)
    rows = FORWARD_ROWS.get(version, FLASH3_TILE)
    be.launch(PRODUCT if number == 3 else STEM, f"attention_flash_forward_kernel{number}",
              (math.ceil(T / rows), NH, B), (FLASH3_THREADS * rows // FLASH3_TILE,), args,
              floatX=FLOATX_NAMES[BF16])


def flash_backward(version, dqkv, dout, qkv, out, lse, num_heads, num_kv_heads=None, schedule="grouped"):
    """Version 2: preprocess_kernel2 + dq_kernel2 + dkdv_kernel2; 3, 4: preprocess_kernel5 +
    dq/dkdv kernel3 (product) or kernel4; 5-9: preprocess_kernel5 (also zeroing the fp32 dQ
    accumulator), the one-pass backward_kernelN, dq_convert_kernel5."""
    fn = "flash_attention_backward"
    be = backend_of(qkv)
    B, T, NH, NKV, hs = _flash_check(fn, be, version, qkv, num_heads, num_kv_heads,
                                     dqkv=dqkv, dout=dout, out=out, lse=lse)
    order = _order(fn, version, schedule)
    bf16 = FLOATX_NAMES[BF16]
    scale = f32(1.0 / math.sqrt(hs))
    D = runtime.scratch(be, "flash_D", (B, NH, T), np.float32)  # rowsum(dout * out)
    if version == 2:
        grid, block = warp_per_row(B * NH * T)
        be.launch(STEM, "attention_flash_backward_preprocess_kernel2", grid, block,
                  (D, dout, out, i32(B), i32(T), i32(NH), i32(hs)), floatX=bf16)
        args = (dqkv, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale)
        for kind, heads in (("backward_dq", NH), ("backward_dkdv", NKV)):
            _launch_dynamic(be, STEM, f"attention_flash_{kind}_kernel2", (math.ceil(T / FLASH2_TILE), heads, B),
                            (FLASH2_THREADS,), args, _flash2_smem(kind, hs))
        return
    dq_accum = runtime.scratch(be, "flash_dq_accum", (B, NH, T, hs), np.float32) if version in ONE_PASS else None
    grid, block = launch_config(B * NH * T * 8)  # 8 threads a row, 16-byte loads
    be.launch(STEM, "attention_flash_backward_preprocess_kernel5", grid, block,
              (D, dq_accum, dout, out, i32(B), i32(T), i32(NH)), floatX=bf16)
    if version in (3, 4):
        stem = PRODUCT if version == 3 else STEM
        args = (dqkv, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale) + order
        for kind, heads in (("backward_dq", NH), ("backward_dkdv", NKV)):
            be.launch(stem, f"attention_flash_{kind}_kernel{version}", (math.ceil(T / FLASH3_TILE), heads, B),
                      (FLASH3_THREADS,), args, floatX=bf16)
        return
    warps = FLASH5_WARPS[version]
    args = (dqkv, dq_accum, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale) + order
    _launch_dynamic(be, STEM, f"attention_flash_backward_kernel{version}", (math.ceil(T / (16 * warps)), NKV, B),
                    (32 * warps,), args, _flash5_smem(version))
    grid, block = launch_config(B * NH * T * hs // 8)
    be.launch(STEM, "attention_flash_backward_dq_convert_kernel5", grid, block,
              (dqkv, dq_accum, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale), floatX=bf16)


# --- the versions ------------------------------------------------------------------


def _flash(version, about, kernels, **kw):
    return Version(about, {"flash_attention_forward": functools.partial(flash_forward, version),
                           "flash_attention_backward": functools.partial(flash_backward, version)},
                   kernels=kernels, **{"dtypes": ("bf16",), "scheduled": True, **kw})


_PRE5 = ("attention_flash_backward_preprocess_kernel5",)
_ONE_PASS_TAIL = ("attention_flash_backward_dq_convert_kernel5",)

VERSIONS = {
    "simple": Version("permute + GEMMs + masked softmax kernels, (B,NH,T,T) probabilities kept; fp32",
                      {"attention_forward": attention_forward, "attention_backward": attention_backward},
                      dtypes=("fp32",),
                      kernels=("attention_permute_kernel1", "attention_softmax_forward_kernel1",
                               "attention_unpermute_kernel1", "attention_unpermute_backward_kernel1",
                               "attention_softmax_backward_kernel1", "attention_permute_backward_kernel1")),
    2: _flash(2, "wmma tensor cores, scores in shared memory, hs 64 or 128",
              tuple(f"attention_flash_{k}_kernel2" for k in ("forward", "backward_preprocess", "backward_dq",
                                                             "backward_dkdv")),
              scheduled=False),
    3: _flash(3, "the product's mma.sync kernel3 with a block order and the 16-byte preprocess", _PRE5),
    4: _flash(4, "version 3 with double-buffered tile loads (cp.async groups)",
              _PRE5 + tuple(f"attention_flash_{k}_kernel4" for k in ("forward", "backward_dq", "backward_dkdv"))),
    5: _flash(5, "3's forward; one-pass backward, 64 keys a block, dQ by fp32 atomics",
              _PRE5 + ("attention_flash_backward_kernel5",) + _ONE_PASS_TAIL),
    6: _flash(6, "5 with 128 keys (8 warps) a backward block",
              _PRE5 + ("attention_flash_backward_kernel6",) + _ONE_PASS_TAIL),
    7: _flash(7, "5 with double-buffered Q/dO tiles", _PRE5 + ("attention_flash_backward_kernel7",) + _ONE_PASS_TAIL),
    8: _flash(8, "6 with double-buffered Q/dO tiles", _PRE5 + ("attention_flash_backward_kernel8",) + _ONE_PASS_TAIL),
    9: _flash(9, "forward with 128 query rows (8 warps) a block; 7's backward",
              _PRE5 + ("attention_flash_forward_kernel9", "attention_flash_backward_kernel9") + _ONE_PASS_TAIL),
}
