"""Causal self-attention: permutes and the masked softmax are kernels from
kernels/attention.cu; the batched GEMMs go through the array library (cuBLAS
via CuPy on the GPU, NumPy under emulation).

Same functions and signatures as llmcu/cpu/attention.py. Shapes: qkv (B,T,3C),
att (B,NH,T,T) caches the probabilities (masked entries 0), out (B,T,C).
Activation gradients overwrite (=).
"""

import math

import numpy as np

from . import runtime
from .runtime import (FLOATX_NAMES, backend_of, check_array, f32, floatx_dtype, i32, launch_config,
                      warp_per_row)
from .vectorized import address


def _check(fn, be, qkv, num_heads, **named):
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
    be.launch("attention", "attention_permute_kernel1", grid, block,
              (q, k, v, qkv, i32(B), i32(T), i32(NH), i32(hs)))
    return q, k, v


def attention_forward(out, att, qkv, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _check("attention_forward", be, qkv, num_heads, out=out, att=att)
    xp = be.xp
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    xp.matmul(q, k.transpose(0, 1, 3, 2), out=att)          # preatt, softmaxed in place
    grid, block = warp_per_row(B * NH * T)
    be.launch("attention", "attention_softmax_forward_kernel1", grid, block,
              (att, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    y = xp.matmul(att, v)                                   # (B,NH,T,hs)
    grid, block = launch_config(B * T * C)
    be.launch("attention", "attention_unpermute_kernel1", grid, block,
              (out, y, i32(B), i32(T), i32(NH), i32(hs)))


def attention_backward(dqkv, dout, qkv, att, num_heads):
    be = backend_of(qkv)
    B, T, C, NH, hs = _check("attention_backward", be, qkv, num_heads, dqkv=dqkv, dout=dout, att=att)
    xp = be.xp
    q, k, v = _split_heads(be, qkv, B, T, NH, hs)
    dy = xp.empty((B, NH, T, hs), dtype=qkv.dtype)
    grid, block = launch_config(B * T * C)
    be.launch("attention", "attention_unpermute_backward_kernel1", grid, block,
              (dy, dout, i32(B), i32(T), i32(NH), i32(hs)))
    datt = xp.matmul(dy, v.transpose(0, 1, 3, 2))            # (B,NH,T,T), dpreatt in place below
    dv = xp.matmul(att.transpose(0, 1, 3, 2), dy)
    grid, block = warp_per_row(B * NH * T)
    be.launch("attention", "attention_softmax_backward_kernel1", grid, block,
              (datt, datt, att, f32(1.0 / math.sqrt(hs)), i32(B * NH), i32(T)))
    dq = xp.matmul(datt, k)
    dk = xp.matmul(datt.transpose(0, 1, 3, 2), q)
    grid, block = launch_config(B * T * 3 * C)
    be.launch("attention", "attention_permute_backward_kernel1", grid, block,
              (dqkv, dq, dk, dv, i32(B), i32(T), i32(NH), i32(hs)))


# --- fused ("flash") attention: kernels attention_flash_*_kernelN -------------
#
# Same functions and signatures as llmcu/cpu/attention.py's flash_attention_*:
# qkv (B,T,(NH+2*NKV)*hs), out (B,T,NH*hs), lse (B,NH,T) float32. Nothing of
# size T*T is allocated; the backward allocates one (B,NH,T) float32 scratch.

FLASH_TILE = 32      # = FLASH_TILE in kernels/attention.cu: rows per tile = threads per block (version 1)
FLASH_HS_MAX = 128   # = FLASH_HS_MAX there: the per-thread row buffers' size
FLASH2_TILE, FLASH2_THREADS = 64, 128   # version 2: 64-row tiles, 4 warps
FLASH2_HEAD_SIZES = (64, 128)
FLASH3_TILE, FLASH3_THREADS, FLASH3_HS = 64, 128, 64   # version 3 (mma.sync): 64-row tiles, 4 warps, hs 64
FLASH_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
ONE_PASS = (5, 6, 7, 8, 9)    # the one-pass backward (dQ by atomics)
FORWARD_KERNEL = {5: 3, 6: 3, 7: 3, 8: 3, 9: 9}    # 9: 128 query rows (8 warps) per block
BACKWARD_KERNEL = {5: 5, 6: 6, 7: 7, 8: 8, 9: 7}
FORWARD_ROWS = {9: 128}  # query rows per forward block where not FLASH3_TILE
FLASH5_WARPS = {5: 4, 6: 8, 7: 4, 8: 8}   # 16 keys per warp: 64 or 128 per block
FLASH5_STAGES = {5: 1, 6: 1, 7: 2, 8: 2}  # query/dO tile buffers: 2 = the next step's loads in flight
# versions 3-9: the order their blocks go out in (flash3_block_coords in kernels/attention.cu):
# "grouped" (blockIdx as is: a (head, batch)'s tiles together, sharing L2) or "heavy_first"
# (the causal mask's heaviest tiles of every (head, batch) first: a shorter last wave)
SCHEDULES = ("grouped", "heavy_first")


def _flash5_smem(version: int) -> int:
    """Dynamic shared memory bytes of attention_flash_backward_kernel5..8: K and dS^T tiles of
    the block's keys, STAGES Q and dO tiles of 64 rows, 72 bf16 per row (kernels/attention.cu)."""
    return (2 * 16 * FLASH5_WARPS[version] + 2 * FLASH5_STAGES[version] * FLASH3_TILE) * (FLASH3_HS + 8) * 2


def _flash2_smem(kernel: str, hs: int) -> int:
    """Dynamic shared memory bytes of a version-2 kernel (FLASH2_*_SMEM in kernels/attention.cu)."""
    tile, f32b, bf16b = FLASH2_TILE, 4, 2
    if kernel == "forward":
        return 3 * tile * hs * bf16b + tile * tile * f32b + tile * tile * bf16b + tile * hs * f32b
    if kernel == "dq":
        return (4 * tile * hs * bf16b + 2 * tile * tile * f32b + tile * tile * bf16b + tile * hs * f32b
                + 2 * tile * f32b)
    return (4 * tile * hs * bf16b + 2 * tile * tile * f32b + 2 * tile * tile * bf16b + 2 * tile * hs * f32b
            + 2 * tile * f32b)


def _flash_launch(be, kernel, version, floatX, T, heads, B, args, smem_kind=None, hs=None):
    """Grid over (query or key tiles, heads, B); version 2 with its dynamic shared memory."""
    number = version
    if version in ONE_PASS:
        number = FORWARD_KERNEL[version] if kernel == "forward" else BACKWARD_KERNEL[version]
    name = f"attention_flash_{kernel}_kernel{number}"
    if version == 1:
        be.launch("attention", name, (math.ceil(T / FLASH_TILE), heads, B), (FLASH_TILE,), args,
                  floatX=floatX)
        return
    if version in ONE_PASS and kernel == "backward":  # the one-pass backward: dynamic shared memory
        smem, warps = _flash5_smem(number), FLASH5_WARPS[number]
        if smem > 48 * 1024:  # CUDA's limit without an opt-in
            be.module("attention", floatX).get_function(name).max_dynamic_shared_size_bytes = smem
        be.launch("attention", name, (math.ceil(T / (16 * warps)), heads, B), (32 * warps,), args,
                  shared_mem=smem, floatX=floatX)
        return
    if version in (3, 4) + ONE_PASS:  # static shared memory only
        rows = FORWARD_ROWS.get(version, FLASH3_TILE) if kernel == "forward" else FLASH3_TILE
        be.launch("attention", name, (math.ceil(T / rows), heads, B), (FLASH3_THREADS * rows // FLASH3_TILE,),
                  args, floatX=floatX)
        return
    smem = _flash2_smem(smem_kind, hs)
    fn = be.module("attention", floatX).get_function(name)
    if smem > 48 * 1024:  # CUDA's limit without an opt-in
        fn.max_dynamic_shared_size_bytes = smem
    be.launch("attention", name, (math.ceil(T / FLASH2_TILE), heads, B), (FLASH2_THREADS,), args,
              shared_mem=smem, floatX=floatX)


def _flash_check(fn, be, qkv, num_heads, num_kv_heads, version, **named):
    """Version 1: floatX arrays (float32, or uint16 holding bf16: qkv's dtype picks the
    build), hs <= 128. Version 2 (wmma tensor cores): bf16 only (uint16 bit patterns, see
    llmcu.formats.float32_to_bf16_bits), hs 64 or 128. Version 3 (mma.sync, scores in
    registers; docs/tensor_cores.md): bf16 only, hs 64. Version 4: version 3 with the next
    K/V (or Q/dO) tile's loads in flight while the current tile is computed (two shared
    buffers per tile: cp.async groups); the same arithmetic, so the same results; not
    measured on a GPU yet, so auto keeps 3. Version 5: version 3's forward; the backward in
    one kernel per key tile that also adds each tile's dQ terms into an fp32 accumulator with
    atomics (5 tile products per tile pair instead of 7; dq's bits vary between GPU runs);
    not measured on a GPU yet. Version 6: version 5 with 128 keys per backward block (8
    warps): half the atomics and Q/dO tile loads; not measured. Versions 7 and 8: 5 and 6
    with two Q/dO buffers, the next step's loads in flight during this step's products;
    not measured. Version 9: version 7's backward and a forward with 128 query rows (8
    warps) per block, each K/V tile loaded once per 128 queries; not measured. lse is
    float32 in all. Versions 3 to 9 move whole head rows in 16-byte pieces, so qkv, out,
    dout and dqkv must start 16-byte aligned (fresh arrays and GPT-2's activations do).
    Returns B, T, NH, NKV, hs and the floatX name of the module to launch."""
    if version not in FLASH_VERSIONS:
        raise ValueError(f"{fn}: version must be one of {FLASH_VERSIONS}, got {version!r}")
    dtype = floatx_dtype(fn, "qkv", qkv) if version == 1 else np.dtype(np.uint16)
    check_array(fn, "qkv", qkv, be, dtype=dtype)
    NH = int(num_heads)
    NKV = NH if num_kv_heads is None else int(num_kv_heads)
    if NH <= 0 or NKV <= 0 or NH % NKV:
        raise ValueError(f"{fn}: num_heads={NH} must be a positive multiple of num_kv_heads={NKV}")
    if qkv.ndim != 3 or qkv.shape[-1] % (NH + 2 * NKV):
        raise ValueError(f"{fn}: qkv must be (B,T,(NH+2*NKV)*hs) = (B,T,{NH + 2 * NKV}*hs) for "
                         f"NH={NH}, NKV={NKV}, got shape {qkv.shape}")
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    if version == 1 and not 0 < hs <= FLASH_HS_MAX:
        raise ValueError(f"{fn}: head size hs must be in 1..{FLASH_HS_MAX}, got {hs}")
    if version == 2 and hs not in FLASH2_HEAD_SIZES:
        raise ValueError(f"{fn}: version 2 needs head size hs in {FLASH2_HEAD_SIZES}, got {hs}")
    if version in (3, 4) + ONE_PASS and hs != FLASH3_HS:
        raise ValueError(f"{fn}: version {version} needs head size hs = {FLASH3_HS}, got {hs}")
    shapes = {"out": (B, T, NH * hs), "dout": (B, T, NH * hs), "dqkv": (B, T, W), "lse": (B, NH, T)}
    for name, a in named.items():
        check_array(fn, name, a, be, dtype=np.float32 if name == "lse" else dtype, shape=shapes[name])
    if version >= 3:  # cp.async and 16-byte loads and stores of whole 128-byte head rows
        for name, a in {"qkv": qkv, **named}.items():
            if name != "lse" and address(a) % 16:
                raise ValueError(f"{fn}: version {version} moves {name} in 16-byte pieces and needs it "
                                 f"16-byte aligned, got address {address(a):#x}; pass a fresh array "
                                 f"or use version=1")
    return B, T, NH, NKV, hs, FLOATX_NAMES[dtype]


def pick_flash_version(qkv, num_heads, num_kv_heads=None, version="auto"):
    """version "auto": 3 (mma.sync tensor cores) for bf16 on a GPU at head size 64, else 1.

    Measured on an H200 (2026-11-28, B=16 NH=12 T=1024 hs=64, benchmarks/RESULTS.md):
    forward+backward took 83.5 ms with version 1 (1.1 TFLOP/s), 6.8 ms with version 2
    (13.3 TFLOP/s) and 0.76 ms with version 3 (119 TFLOP/s; PyTorch's flash backend
    0.72 ms), after version 3's tests passed there. hs=128 stays on version 1: version 3
    is hs=64 only and version 2's backward needs 176.5 KiB of shared memory, more than an
    A100 has. Under emulation auto keeps version 1 (ask for 2 or 3 to emulate them)."""
    if version != "auto":
        return version
    NH = int(num_heads)
    NKV = NH if num_kv_heads is None else int(num_kv_heads)
    hs = qkv.shape[-1] // (NH + 2 * NKV) if qkv.ndim == 3 and NH > 0 and NKV > 0 else 0
    gpu = backend_of(qkv).name == "cuda"
    return 3 if gpu and qkv.dtype == np.uint16 and hs == 64 else 1


def _schedule_arg(fn, version, schedule):
    """The kernels' trailing `order` argument for versions 3 to 9 (an empty tuple for 1 and 2,
    which take none): SCHEDULES' index (flash3_block_coords in kernels/attention.cu)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if version < 3:
        if schedule != SCHEDULES[0]:
            raise ValueError(f"{fn}: schedule={schedule!r} needs version 3 to 9, got version {version}")
        return ()
    return (i32(SCHEDULES.index(schedule)),)


def flash_attention_forward(out, lse, qkv, num_heads, num_kv_heads=None, version="auto", schedule="grouped"):
    """schedule (versions 3 to 9): the order the blocks go out in (SCHEDULES); the results are
    the same bits either way."""
    be = backend_of(qkv)
    version = pick_flash_version(qkv, num_heads, num_kv_heads, version)
    B, T, NH, NKV, hs, floatX = _flash_check("flash_attention_forward", be, qkv, num_heads, num_kv_heads,
                                             version, out=out, lse=lse)
    order = _schedule_arg("flash_attention_forward", version, schedule)
    _flash_launch(be, "forward", version, floatX, T, NH, B,
                  (out, lse, qkv, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), f32(1.0 / math.sqrt(hs))) + order,
                  "forward", hs)


def flash_attention_backward(dqkv, dout, qkv, out, lse, num_heads, num_kv_heads=None, version="auto",
                             schedule="grouped"):
    """schedule: as flash_attention_forward's (versions 5 to 9 add dQ's atomics in another
    order with "heavy_first", so dq's fp32 rounding may differ; the rest is the same bits)."""
    be = backend_of(qkv)
    version = pick_flash_version(qkv, num_heads, num_kv_heads, version)
    B, T, NH, NKV, hs, floatX = _flash_check("flash_attention_backward", be, qkv, num_heads, num_kv_heads,
                                             version, dqkv=dqkv, dout=dout, out=out, lse=lse)
    order = _schedule_arg("flash_attention_backward", version, schedule)
    D = runtime.scratch(be, "flash_D", (B, NH, T), np.float32)  # rowsum(dout * out), per call
    scale = f32(1.0 / math.sqrt(hs))
    dq_accum = None
    if version >= 3:  # hs = 64: D with 16-byte loads, 8 threads a row (and dq_accum zeroed)
        if version in ONE_PASS:
            dq_accum = runtime.scratch(be, "flash_dq_accum", (B, NH, T, hs), np.float32)
        grid, block = launch_config(B * NH * T * 8)
        be.launch("attention", "attention_flash_backward_preprocess_kernel5", grid, block,
                  (D, dq_accum, dout, out, i32(B), i32(T), i32(NH)), floatX=floatX)
    else:
        grid, block = warp_per_row(B * NH * T)
        be.launch("attention", f"attention_flash_backward_preprocess_kernel{version}", grid, block,
                  (D, dout, out, i32(B), i32(T), i32(NH), i32(hs)), floatX=floatX)
    if version in ONE_PASS:  # one pass over the key tiles; dq through an fp32 accumulator (atomics)
        _flash_launch(be, "backward", version, floatX, T, NKV, B,
                      (dqkv, dq_accum, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale)
                      + order)
        grid, block = launch_config(B * NH * T * hs // 8)
        be.launch("attention", "attention_flash_backward_dq_convert_kernel5", grid, block,
                  (dqkv, dq_accum, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale), floatX=floatX)
        return
    args = (dqkv, dout, qkv, lse, D, i32(B), i32(T), i32(NH), i32(NKV), i32(hs), scale) + order
    _flash_launch(be, "backward_dq", version, floatX, T, NH, B, args, "dq", hs)
    _flash_launch(be, "backward_dkdv", version, floatX, T, NKV, B, args, "dkdv", hs)
