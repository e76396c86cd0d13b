"""The attention lab (kernels/dev/attention.cu through kernels/dev/attention.py) against the
NumPy oracle, on the emulator (and a GPU when there is one).

- "simple" (permute, softmax, unpermute kernels; GEMMs from the array library), fp32,
  against llmcu/cpu/attention.py's attention_forward/backward: atol = rtol = 1e-5 (fp32
  sums in other orders than NumPy's, a few ulp of expf; a missing term is O(1e-2)).
- versions 2-9 (bf16 tensor-core kernels; under the emulator the mma/ldmatrix/cp.async
  helpers are written out with shuffles and late-landing copies, so everything around the
  instructions runs here) against the fp32 flash oracle. Bound (the old tests'): no worse
  than twice the error of llmcu's simple attention path in bf16, modelled in NumPy
  (simple_bf16_reference), against the same fp32 oracle; and for 3-9 the tighter check
  of the backward against version 3's own arithmetic (backward_model).
- 4 and 9 (forward) reproduce version 3's bits; both schedules give the same bits
  (3, 4 and 9's forward, every version's dK/dV); 5-9's dQ (fp32 atomics) is within one
  bf16 rounding of version 3's; the one-pass backward zeroes its accumulator itself; the
  wrappers refuse misaligned arrays, wrong head sizes, dtypes and schedules by name.

Every output is NaN-poisoned before the call (bf16: the 0x7FC0 pattern); inputs are
N(0,1), rounded to bf16 for the bf16 versions so kernel and oracle see the same values.
"""

from functools import lru_cache

import numpy as np
import pytest

from helpers import BF16_NAN, KERNEL_BACKENDS, Device, assert_close, poisoned
from llmcu.lab import load as load_lab
from llmcu.cpu import attention as cpu
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits





lab = load_lab("attention")
FLASH = [2, 3, 4, 5, 6, 7, 8, 9]
ONE_PASS = [5, 6, 7, 8, 9]


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def bf16_round(a):
    return bf16_bits_to_float32(float32_to_bf16_bits(np.asarray(a, np.float32)))


def split_heads(dqkv, NH, NKV):
    hs = dqkv.shape[-1] // (NH + 2 * NKV)
    return {"dq": dqkv[..., :NH * hs], "dk": dqkv[..., NH * hs:(NH + NKV) * hs], "dv": dqkv[..., (NH + NKV) * hs:]}


def run_oracle(qkv, dout, NH, NKV):
    B, T, _ = qkv.shape
    out, lse, dqkv = poisoned(dout.shape), poisoned((B, NH, T)), poisoned(qkv.shape)
    cpu.flash_attention_forward(out, lse, qkv, NH, NKV)
    cpu.flash_attention_backward(dqkv, dout, qkv, out, lse, NH, NKV)
    return out, lse, dqkv


def run_lab(dev, version, qkv, dout, NH, NKV, schedule="grouped"):
    """Version `version`'s forward and backward on bf16 copies of qkv, dout (fp32 values
    holding bf16 numbers); returns out, lse, dqkv as fp32 host arrays."""
    ops = lab.VERSIONS[version].ops
    sched = {} if version == 2 else {"schedule": schedule}
    B, T, _ = qkv.shape
    out, lse, dqkv = (dev.put(np.full(dout.shape, BF16_NAN, np.uint16)), dev.poisoned((B, NH, T)),
                      dev.put(np.full(qkv.shape, BF16_NAN, np.uint16)))
    q, d = dev.put(float32_to_bf16_bits(qkv)), dev.put(float32_to_bf16_bits(dout))
    ops["flash_attention_forward"](out, lse, q, NH, NKV, **sched)
    ops["flash_attention_backward"](dqkv, d, q, out, lse, NH, NKV, **sched)
    return bf16_bits_to_float32(dev.get(out)), dev.get(lse), bf16_bits_to_float32(dev.get(dqkv))


def simple_bf16_reference(qkv, dout, NH, NKV):
    """llmcu's simple attention path in bf16, as a NumPy model: every tensor that path
    stores (q k^T, the probabilities, y, out, datt, dpreatt, dq, dk, dv) rounded to bf16,
    the GEMMs and reductions in fp32. Returns out, dqkv (fp32 holding bf16 values)."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    G = NH // NKV
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k, v = (qkv[..., a:a + NKV * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3).repeat(G, axis=1)
            for a in (NH * hs, (NH + NKV) * hs))
    scale = np.float32(1.0 / np.sqrt(hs))
    mask = np.triu(np.ones((T, T), bool), k=1)
    s = np.where(mask, -np.inf, bf16_round(q @ k.transpose(0, 1, 3, 2)) * scale)
    e = np.exp(s - s.max(-1, keepdims=True))
    att = bf16_round(e / e.sum(-1, keepdims=True))
    out = bf16_round(att @ v).transpose(0, 2, 1, 3).reshape(B, T, NH * hs)
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    datt = bf16_round(dy @ v.transpose(0, 1, 3, 2))
    dpre = bf16_round(scale * att * (datt - (datt * att).sum(-1, keepdims=True)))
    dq = bf16_round(dpre @ k)
    dk = bf16_round((dpre.transpose(0, 1, 3, 2) @ q).reshape(B, NKV, G, T, hs).sum(2))
    dv = bf16_round((att.transpose(0, 1, 3, 2) @ dy).reshape(B, NKV, G, T, hs).sum(2))
    dqkv = np.concatenate([g.transpose(0, 2, 1, 3).reshape(B, T, -1) for g in (dq, dk, dv)], axis=-1)
    return out, dqkv


def check_against_simple(name, dev, version, B, T, NH, NKV, hs, seed):
    rng = np.random.default_rng(seed)
    qkv = bf16_round(rand(rng, B, T, (NH + 2 * NKV) * hs))
    dout = bf16_round(rand(rng, B, T, NH * hs))
    out, lse, dqkv = run_lab(dev, version, qkv, dout, NH, NKV)
    rout, rlse, rdqkv = run_oracle(qkv, dout, NH, NKV)
    sout, sdqkv = simple_bf16_reference(qkv, dout, NH, NKV)
    assert_close(f"{name} lse", lse, rlse, 1e-4, 1e-4)  # fp32 scores of bf16 inputs: order noise only
    got, want = {"out": out, **split_heads(dqkv, NH, NKV)}, {"out": rout, **split_heads(rdqkv, NH, NKV)}
    simple = {"out": sout, **split_heads(sdqkv, NH, NKV)}
    for key in got:
        assert not np.isnan(got[key]).any(), f"{name} {key}: NaN (unwritten or overflow)"
        err = float(np.abs(got[key] - want[key]).max())
        simple_err = float(np.abs(simple[key] - want[key]).max())
        # Floors: one bf16 rounding of the largest value, for shapes where the simple path
        # happens to be exact (T = 1: its softmax is exactly 1); and fp32 summation noise
        # where the exact answer is 0 (T = 1: dq = dp - D summed in two orders).
        floor = max(2.0 ** -8 * float(np.abs(want[key]).max()),
                    2.0 ** -24 * hs * float(np.abs(dout).max()) * float(np.abs(qkv).max()) ** 2)
        print(f"{name} {key}: max err {err:.3e}, simple bf16 path {simple_err:.3e}")
        assert err <= max(2 * simple_err, floor), (name, key, err, simple_err, floor)


# --- simple (fp32) ---------------------------------------------------------------------

@pytest.mark.parametrize("B,T,NH,hs", [(2, 7, 4, 8), (1, 1, 2, 16), (2, 33, 3, 5)])
def test_simple_vs_oracle(dev, B, T, NH, hs):
    ops = lab.VERSIONS["simple"].ops
    rng = np.random.default_rng(3)
    C = NH * hs
    qkv, dout = rand(rng, B, T, 3 * C), rand(rng, B, T, C)
    out, att = dev.poisoned((B, T, C)), dev.poisoned((B, NH, T, T))
    ops["attention_forward"](out, att, dev.put(qkv), NH)
    rout, ratt = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    cpu.attention_forward(rout, ratt, qkv, NH)
    assert_close("simple att", dev.get(att), ratt, 1e-5, 1e-5)
    assert_close("simple out", dev.get(out), rout, 1e-5, 1e-5)
    dqkv = dev.poisoned((B, T, 3 * C))
    ops["attention_backward"](dqkv, dev.put(dout), dev.put(qkv), att, NH)
    rdqkv = np.empty((B, T, 3 * C), np.float32)
    cpu.attention_backward(rdqkv, dout, qkv, ratt, NH)
    assert_close("simple dqkv", dev.get(dqkv), rdqkv, 1e-5, 1e-5)


# --- versions 2-9 against the oracle ------------------------------------------------------

# T=7: inside one tile (rows >= T are padding); T=100 with NKV=2: two query heads per kv
# head and a partial second tile.
@pytest.mark.parametrize("B,T,NH,NKV", [(2, 7, 4, 4), (2, 100, 4, 2)])
@pytest.mark.parametrize("version", FLASH)
def test_flash_bf16_vs_oracle(dev, version, B, T, NH, NKV):
    check_against_simple(f"v{version} T={T}", dev, version, B, T, NH, NKV, 64, seed=T * 7 + NH)


# T=1: a single masked tile; T=255 with NKV=1 (multi-query): four tiles, the last partial.
@pytest.mark.slow
@pytest.mark.parametrize("B,T,NH,NKV", [(2, 1, 2, 2), (1, 255, 2, 1)])
@pytest.mark.parametrize("version", FLASH)
def test_flash_bf16_vs_oracle_more_shapes(dev, version, B, T, NH, NKV):
    check_against_simple(f"v{version} T={T}", dev, version, B, T, NH, NKV, 64, seed=T * 7 + NH)


def test_flash2_head_size_128(dev):
    """Version 2 also takes hs = 128 (its second template instantiation)."""
    check_against_simple("v2 hs=128", dev, 2, 1, 64, 2, 2, 128, seed=128)


@pytest.mark.slow
@pytest.mark.parametrize("version", [4, 8, 9])  # 5-7 are 8's code paths with fewer warps or stages
def test_flash_gpt2_length(dev, version):
    """GPT-2's T = 1024: 16 query tiles, 136 tile pairs, two query heads sharing a kv head:
    the double buffers refilled 15 times (4, 8), 128-key and 128-query blocks (8, 9)."""
    check_against_simple(f"v{version} T=1024", dev, version, 1, 1024, 2, 1, 64, seed=1024)


def backward_model(qkv, dout, out, lse, NH, NKV):
    """Version 3's backward arithmetic in NumPy, given the kernel's own forward (out, lse):
    fp32 scores and p = exp(s * scale - lse), p rounded to bf16 for dV = P^T dO, dS = p (dP - D)
    rounded to bf16 for dK = scale dS^T Q and dQ = scale dS K, fp32 sums, bf16 outputs."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    G = NH // NKV
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k, v = (qkv[..., a:a + NKV * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3).repeat(G, axis=1)
            for a in (NH * hs, (NH + NKV) * hs))
    do = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    o = out.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    scale = np.float32(1.0 / np.sqrt(hs))
    D = (do * o).sum(-1, keepdims=True)
    p = np.exp(scale * (q @ k.transpose(0, 1, 3, 2)) - lse[..., None])
    p = np.where(np.triu(np.ones((T, T), bool), k=1), np.float32(0), p)
    ds = bf16_round(p * (do @ v.transpose(0, 1, 3, 2) - D))
    dq = bf16_round(scale * (ds @ k))
    dk = bf16_round((scale * (ds.transpose(0, 1, 3, 2) @ q)).reshape(B, NKV, G, T, hs).sum(2))
    dv = bf16_round((bf16_round(p).transpose(0, 1, 3, 2) @ do).reshape(B, NKV, G, T, hs).sum(2))
    return {name: a.transpose(0, 2, 1, 3).reshape(B, T, -1) for name, a in (("dq", dq), ("dk", dk), ("dv", dv))}


@pytest.mark.parametrize("version", FLASH[1:])
def test_flash_backward_matches_its_model(dev, version):
    """Tighter than the bound above (which allows ~1% of a row's probability mass, e.g. a
    wrongly masked diagonal): the gradients against version 3's arithmetic modelled from the
    kernel's own out and lse. What may differ: fp32 summation order, and bf16 roundings that
    land on the other side of a tie because of it: per element at most 2 bf16 ulps (2^-7
    relative) plus 2^-9 of the tensor's largest value. T = 100, two query heads per kv head."""
    NH, NKV = 4, 2
    rng = np.random.default_rng(104)
    qkv, dout = bf16_round(rand(rng, 2, 100, (NH + 2 * NKV) * 64)), bf16_round(rand(rng, 2, 100, NH * 64))
    out, lse, dqkv = run_lab(dev, version, qkv, dout, NH, NKV)
    want = backward_model(qkv, dout, out, lse, NH, NKV)
    for name, got in split_heads(dqkv, NH, NKV).items():
        bound = 2.0 ** -7 * np.abs(want[name]) + 2.0 ** -9 * np.abs(want[name]).max()
        worst = float((np.abs(got - want[name]) / bound).max())
        print(f"v{version} model {name}: worst error {worst:.2f} of the bound")
        assert worst <= 1.0, (name, worst)


# --- versions against each other, schedules ------------------------------------------------

@lru_cache(maxsize=None)
def _runs(version, schedule):
    """Versions 3-9 on one input (emu): T = 150, three 64-row tiles, the last partial; two
    query heads per kv head. Cached: several tests compare the same runs."""
    rng = np.random.default_rng(11)
    NH, NKV = 4, 2
    qkv, dout = bf16_round(rand(rng, 1, 150, (NH + 2 * NKV) * 64)), bf16_round(rand(rng, 1, 150, NH * 64))
    return run_lab(Device("emu"), version, qkv, dout, NH, NKV, schedule)


def _dq_bound(dq):
    """dQ summed in another order (fp32 partials added by atomics): within one bf16 rounding
    (2^-8 relative) plus 2^-10 of the largest |dq| for fp32 order effects."""
    return 2.0 ** -8 * np.abs(dq) + 2.0 ** -10 * np.abs(dq).max()


@pytest.mark.parametrize("version", FLASH[1:])
def test_schedules_compute_the_same(version):
    """schedule="heavy_first" only changes which tile each block takes, and when: every tile
    is still computed once by the same arithmetic, so out, lse and dK/dV are the same bits as
    "grouped"'s (and dQ too for 3 and 4); 5-9's dQ, added by atomics in another order, within
    the one-pass bound."""
    (out0, lse0, g0), (out1, lse1, g1) = _runs(version, "grouped"), _runs(version, "heavy_first")
    assert np.array_equal(out0, out1) and np.array_equal(lse0, lse1), "forward bits differ between schedules"
    g0, g1 = split_heads(g0, 4, 2), split_heads(g1, 4, 2)
    assert np.array_equal(g0["dk"], g1["dk"]) and np.array_equal(g0["dv"], g1["dv"])
    assert not np.isnan(g1["dq"]).any()
    if version in ONE_PASS:
        assert (np.abs(g1["dq"] - g0["dq"]) <= _dq_bound(g0["dq"])).all()
    else:
        assert np.array_equal(g0["dq"], g1["dq"])


@pytest.mark.parametrize("version", [4] + ONE_PASS)
def test_versions_match_version_3(version):
    """4 (the same arithmetic, pipelined loads) gives version 3's bits everywhere; 5-9 run
    version 3's forward (9: 128-row blocks, the same arithmetic per row) and its dK/dV
    arithmetic in the same order (same bits); only dQ is summed differently."""
    out3, lse3, g3 = _runs(3, "grouped")
    out, lse, g = _runs(version, "grouped")
    assert np.array_equal(out3, out) and np.array_equal(lse3, lse), f"v{version} forward bits differ from v3's"
    g3, g = split_heads(g3, 4, 2), split_heads(g, 4, 2)
    assert np.array_equal(g3["dk"], g["dk"]) and np.array_equal(g3["dv"], g["dv"])
    if version == 4:
        assert np.array_equal(g3["dq"], g["dq"])
    else:
        worst = float((np.abs(g["dq"] - g3["dq"]) / _dq_bound(g3["dq"])).max())
        print(f"v{version} dq vs v3 dq: worst {worst:.2f} of the bound")
        assert worst <= 1.0
    assert np.abs(g3["dq"]).max() > 0


# --- the one-pass backward ----------------------------------------------------------------

@pytest.mark.parametrize("version", ONE_PASS)
def test_one_pass_backward_zeroes_its_accumulator(monkeypatch, launches, version):
    """The fp32 dQ accumulator is a reused scratch buffer: the preprocess kernel (launched
    first) zeroes it, so whatever it held before (here 1e3 everywhere) never reaches dq.
    The backward is exactly: preprocess_kernel5, backward_kernelN, dq_convert_kernel5."""
    from llmcu.cuda import runtime
    rng = np.random.default_rng(1)
    qkv, dout = bf16_round(rand(rng, 1, 70, 3 * 2 * 64)), bf16_round(rand(rng, 1, 70, 2 * 64))
    clean = run_lab(Device("emu"), version, qkv, dout, 2, 2)
    real = runtime.scratch

    def dirty(be, name, shape, dtype=np.float32):
        buf = real(be, name, shape, dtype)
        if name == "flash_dq_accum":
            buf.fill(1e3)
        return buf
    monkeypatch.setattr(runtime, "scratch", dirty)
    launches.clear()
    _, _, dqkv = run_lab(Device("emu"), version, qkv, dout, 2, 2)
    assert np.array_equal(dqkv, clean[2]), "dq depends on the accumulator's old contents"
    assert launches[1:] == ["attention_flash_backward_preprocess_kernel5", f"attention_flash_backward_kernel{version}",
                            "attention_flash_backward_dq_convert_kernel5"], launches


@pytest.mark.slow
@pytest.mark.parametrize("order", ["warps", "warps-reverse"])
@pytest.mark.parametrize("version", FLASH[1:])
def test_barriers_under_warp_serial_orders(monkeypatch, order, version):
    """LLMCU_EMU_ORDER=warps|warps-reverse runs each warp alone up to its next __syncthreads,
    so a missing barrier between warps (a shared tile read before the other warps wrote it,
    or overwritten before they read it) shows. T = 255: four tiles, so version 4's and 7's
    double buffers are each refilled; a grouped-query head pair."""
    monkeypatch.setenv("LLMCU_EMU_ORDER", order)
    check_against_simple(f"v{version} T=255 {order}", Device("emu"), version, 1, 255, 2, 1, 64, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("version", [4, 7])
def test_missing_cp_async_wait_fails_under_the_emulator(tmp_path, monkeypatch, version):
    """The emulator lands a cp.async copy only at the wait that covers it (its destination
    NaN until then), so a pipeline that reads a tile before waiting for it fails: here the
    double-buffered versions (4: K/V tiles, 7: Q/dO tiles) run from a copy of kernels/ whose
    "wait until one group is left in flight" does nothing. They fail with late copies and
    pass with eager ones (copies at issue)."""
    import shutil

    from llmcu.cuda import runtime
    kdir = tmp_path / "kernels"
    shutil.copytree(runtime.kernels_dir(), kdir)
    src = (kdir / "attention.cu").read_text()
    real = "__device__ __forceinline__ void flash3_cp_wait_prev() { __pipeline_wait_prior(1); }"
    assert src.count(real) == 1, "the emulator's flash3_cp_wait_prev changed: update this test"
    (kdir / "attention.cu").write_text(src.replace(real, "__device__ __forceinline__ void flash3_cp_wait_prev() {}"))
    monkeypatch.setattr(runtime, "kernels_dir", lambda: kdir)
    runtime.get_backend.cache_clear()  # a backend whose modules come from the copy
    try:
        monkeypatch.setenv("LLMCU_EMU_CP_ASYNC", "late")
        with pytest.raises(AssertionError, match="NaN"):
            check_against_simple(f"v{version} no wait, late", Device("emu"), version, 1, 255, 2, 1, 64, seed=11)
        monkeypatch.setenv("LLMCU_EMU_CP_ASYNC", "eager")
        check_against_simple(f"v{version} no wait, eager", Device("emu"), version, 1, 255, 2, 1, 64, seed=11)
    finally:
        runtime.get_backend.cache_clear()  # later tests get the real kernels again


# --- argument checks (no launch) ------------------------------------------------------------

@pytest.mark.parametrize("version", [3, 5])
@pytest.mark.parametrize("name", ["qkv", "out", "dout", "dqkv"])
def test_refuses_misaligned_arrays(version, name):
    """Versions 3-9 copy whole head rows in 16-byte pieces: an array starting off a 16-byte
    boundary is refused by name before any launch (a misaligned-address fault on a GPU)."""
    ops = lab.VERSIONS[version].ops
    B, T, NH = 1, 4, 2
    shapes = {"qkv": (B, T, 3 * NH * 64), "out": (B, T, NH * 64), "dout": (B, T, NH * 64), "dqkv": (B, T, 3 * NH * 64)}
    got = {}
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        buf = np.zeros(n + 16, np.uint16)
        start = (-buf.ctypes.data % 16) // 2  # the first 16-byte boundary
        got[key] = buf[start + (1 if key == name else 0):][:n].reshape(shape)  # 2 bytes past it
    lse = np.zeros((B, NH, T), np.float32)
    with pytest.raises(ValueError, match=rf"flash_attention_backward: version {version} moves {name} in "
                                         rf"16-byte pieces and needs it 16-byte aligned, got address 0x"):
        ops["flash_attention_backward"](got["dqkv"], got["dout"], got["qkv"], got["out"], lse, NH)
    if name in ("qkv", "out"):
        with pytest.raises(ValueError, match=rf"version {version} moves {name} in 16-byte pieces"):
            ops["flash_attention_forward"](got["out"], lse, got["qkv"], NH)


def test_refuses_bad_arguments():
    fwd = {v: lab.VERSIONS[v].ops["flash_attention_forward"] for v in (2, 3)}
    lse = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"flash_attention_forward: version 3 needs head size hs = 64, got 128"):
        fwd[3](np.zeros((1, 4, 256), np.uint16), lse, np.zeros((1, 4, 3 * 256), np.uint16), 2)
    with pytest.raises(ValueError, match=r"flash_attention_forward: version 2 needs head size hs in \(64, 128\), "
                                         r"got 32"):
        fwd[2](np.zeros((1, 4, 64), np.uint16), lse, np.zeros((1, 4, 3 * 64), np.uint16), 2)
    with pytest.raises(TypeError, match="flash_attention_forward: qkv must have dtype uint16, got float32"):
        fwd[3](np.zeros((1, 4, 128), np.uint16), lse, np.zeros((1, 4, 3 * 128), np.float32), 2)
    qkv, out = np.zeros((1, 4, 3 * 128), np.uint16), np.zeros((1, 4, 128), np.uint16)
    with pytest.raises(ValueError, match=r"flash_attention_forward: schedule must be one of \('grouped', "
                                         r"'heavy_first'\), got 'fastest'"):
        fwd[3](out, lse, qkv, 2, schedule="fastest")
    bwd2 = lab.VERSIONS[2].ops["flash_attention_backward"]
    with pytest.raises(ValueError, match=r"flash_attention_backward: schedule='heavy_first' needs version 3 to 9"):
        bwd2(qkv.copy(), out.copy(), qkv, out, lse, 2, schedule="heavy_first")
    with pytest.raises(ValueError, match=r"attention_forward: qkv must be \(B,T,3C\) with C divisible by num_heads=5"):
        lab.VERSIONS["simple"].ops["attention_forward"](np.zeros((1, 4, 8), np.float32),
                                                        np.zeros((1, 5, 4, 4), np.float32),
                                                        np.zeros((1, 4, 24), np.float32), 5)
