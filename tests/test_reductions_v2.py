"""The two-pass, deterministic parameter-gradient reductions (version 2) against
the NumPy oracle, fp32 and bf16, on the emulator (and a GPU when present):

- layernorm_backward(version=2): kernels/layernorm.cu layernorm_backward_kernel2
  (dinp + per-block dweight/dbias partial sums) and
  layernorm_param_backward_reduce_kernel2;
- matmul_backward(version=2) and matmul_bias_backward(version=2):
  matmul_bias_backward_kernel2 + _reduce_kernel2 (also with accumulate_weight=False,
  which overwrites dbias);
- encoder_backward(version=2): encoder_wpe_backward_kernel2 and
  encoder_wte_backward_kernel2 over the positions sorted stably by token.

Version 1 runs through the same checks, so both stay selectable and equivalent.
Shapes cover the 16-byte path (C % 4 == 0 for fp32, % 8 for bf16), the scalar
fallback (C = 1023, C = 36 in bf16, a misaligned dout), rows that do not fill
the grid evenly, and a pass-1 grid capped at a few blocks (PARTIAL_SUM_BLOCKS
patched) so warps grid-stride over many rows. Inputs are random, dinp is
NaN-poisoned, the gradients start from random nonzero values (to check +=),
and under the emulator the wrappers NaN-fill their scratch buffers, so a
partial sum pass 1 forgets to write poisons the result.

Tolerances. dinp as in test_kernels.py / test_kernels_bf16.py (fp32:
atol = rtol = 1e-5; bf16: one rounding, rtol = 2^-8 + 1e-5). A parameter
gradient is start + a sum of n row terms, which the kernel adds in a tree
(per warp, per block, over blocks) and NumPy pairwise: in any order the fp32
error of a sum of n + 1 values is at most n * 2^-24 * sum|values| (Higham,
Accuracy and Stability of Numerical Algorithms, 4.2), the oracle's pairwise
sum adds at most log2(n) * 2^-24 * sum|values|, and the row terms themselves
(dout * n) are rounded once each. So per column
    atol = (n + log2(n) + 2) * 2^-24 * max_column(|start| + sum |terms|),
a bound, not a guess; bf16 adds one rounding of the result, rtol = 2^-8. A
missing or doubled row term (|term| ~ 0.1-1 against an atol ~ 1e-4) fails it.
"""

import math

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from test_kernels_bf16 import rand, rand_x
from llmcu.cpu import encoder as cpu_encoder
from llmcu.cpu import layernorm as cpu_layernorm
from llmcu.cpu import matmul as cpu_matmul
from llmcu.cuda import runtime
from llmcu.formats import bf16_bits_to_float32 as to_f32
from llmcu.formats import float32_to_bf16_bits as to_bits

U = 2.0 ** -8       # bf16 unit roundoff
F32 = 1e-5          # fp32 tolerance of test_kernels.py for row-wise results (dinp)
EPS32 = 2.0 ** -24  # fp32 unit roundoff
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]
VERSIONS = [pytest.param(1, id="v1"), pytest.param(2, id="v2")]


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def value(a):
    a = np.asarray(a)
    return to_f32(a) if a.dtype == np.uint16 else a


def row_tol(dtype, ref):
    """dinp: fp32 as test_kernels.py, bf16 one rounding (test_kernels_bf16.py)."""
    scale = float(np.abs(ref).max()) or 1.0
    if np.dtype(dtype) == np.uint16:
        return dict(atol=F32 * scale, rtol=U + F32)
    return dict(atol=F32, rtol=F32)


def sum_tol(dtype, start, terms, n):
    """start + the sum of n row terms per column (module doc): start (C,) or (R, C),
    terms (n, C) or (n, R, C) as absolute values are summed over axis 0."""
    colsum = np.abs(start).astype(np.float64) + np.abs(terms).astype(np.float64).sum(axis=0)
    atol = (n + math.log2(max(n, 1)) + 2) * EPS32 * float(colsum.max())
    return dict(atol=atol, rtol=U if np.dtype(dtype) == np.uint16 else 0.0)


def bits_of(a):
    """The raw bytes of a result, for bit-for-bit comparisons (NaN == NaN here)."""
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


# --------------------------------------------------------------------------- layernorm

def _layernorm_case(rng, dtype, B, T, C):
    (x, x_f) = rand_x(rng, dtype, B, T, C, scale=3.0, shift=1.0)
    (w, w_f), (dout, dout_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, B, T, C)
    mean, rstd = np.empty((B, T), np.float32), np.empty((B, T), np.float32)
    cpu_layernorm.layernorm_forward(np.empty((B, T, C), np.float32), mean, rstd, x_f, w_f, w_f)
    (dw0, dw0_f), (db0, db0_f) = rand_x(rng, dtype, C), rand_x(rng, dtype, C)
    return dict(x=x, x_f=x_f, w=w, w_f=w_f, dout=dout, dout_f=dout_f, mean=mean, rstd=rstd,
                dw0=dw0, dw0_f=dw0_f, db0=db0, db0_f=db0_f)


def _run_layernorm(dev, case, dtype, version, dout=None):
    from llmcu.cuda.layernorm import layernorm_backward
    shape = case["x"].shape
    dinp, dw, db = dev.poisoned(shape, dtype), dev.put(case["dw0"]), dev.put(case["db0"])
    layernorm_backward(dinp, dw, db, dev.put(case["dout"]) if dout is None else dout, dev.put(case["x"]),
                       dev.put(case["w"]), dev.put(case["mean"]), dev.put(case["rstd"]), version=version)
    return dev.get(dinp), dev.get(dw), dev.get(db)


def _check_layernorm(name, dtype, case, dinp, dw, db):
    c = case
    rdinp, rdw, rdb = np.empty(c["x"].shape, np.float32), c["dw0_f"].copy(), c["db0_f"].copy()
    cpu_layernorm.layernorm_backward(rdinp, rdw, rdb, c["dout_f"], c["x_f"], c["w_f"], c["mean"], c["rstd"])
    C = c["x"].shape[-1]
    rows = c["dout_f"].reshape(-1, C)
    norm = ((c["x_f"] - c["mean"][..., None]) * c["rstd"][..., None]).reshape(-1, C)
    n = rows.shape[0]
    assert_close(f"{name} dinp", value(dinp), rdinp, **row_tol(dtype, rdinp))
    assert_close(f"{name} dweight", value(dw), rdw, **sum_tol(dtype, c["dw0_f"], rows * norm, n))
    assert_close(f"{name} dbias", value(db), rdb, **sum_tol(dtype, c["db0_f"], rows, n))


# (B, T, C, pass-1 block cap): C=768 GPT-2's width (16-byte path in fp32 and bf16);
# C=1023 scalar; C=36 16-byte in fp32 (36 % 4 == 0), scalar in bf16 (36 % 8 != 0);
# C=1 one column; (5, 67, 40) with 3 blocks: 24 warps grid-stride over 335 rows
# (not a multiple of 24), 14 rows for most warps.
LAYERNORM_SHAPES = [(2, 7, 768, None), (1, 3, 1023, None), (3, 5, 36, None), (2, 3, 1, None),
                    (5, 67, 40, 3)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,cap", LAYERNORM_SHAPES)
def test_layernorm_backward(dev, dtype, version, B, T, C, cap, monkeypatch):
    if cap is not None:
        monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", cap)
    case = _layernorm_case(np.random.default_rng(20), dtype, B, T, C)
    _check_layernorm(f"layernorm v{version}", dtype, case, *_run_layernorm(dev, case, dtype, version))


def test_layernorm_backward_misaligned_dout_falls_back(dev):
    """A C-contiguous dout starting 4 bytes into a buffer cannot take 16-byte loads:
    version 2 must take its scalar path (right answer), not read misaligned packets."""
    from llmcu.cuda.vectorized import address
    B, T, C = 2, 5, 64
    case = _layernorm_case(np.random.default_rng(21), np.float32, B, T, C)
    buf = dev.put(np.concatenate([np.zeros(4, np.float32), case["dout"].reshape(-1)]))
    start = next(i for i in range(1, 4) if (address(buf) + 4 * i) % 16 != 0)
    buf[start:start + B * T * C] = dev.put(case["dout"].reshape(-1))
    dout = buf[start:start + B * T * C].reshape(B, T, C)
    assert address(dout) % 16 != 0 and dout.flags.c_contiguous
    _check_layernorm("layernorm v2 misaligned dout", np.float32, case,
                     *_run_layernorm(dev, case, np.float32, 2, dout=dout))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_backward_v2_is_deterministic(dev, dtype, monkeypatch):
    monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", 5)  # several blocks, several rows per warp
    case = _layernorm_case(np.random.default_rng(22), dtype, 4, 33, 96)
    first = _run_layernorm(dev, case, dtype, 2)
    second = _run_layernorm(dev, case, dtype, 2)
    for name, a, b in zip(("dinp", "dweight", "dbias"), first, second):
        assert bits_of(a) == bits_of(b), f"layernorm v2 {name}: two runs differ"


def test_layernorm_backward_errors():
    from llmcu.cuda.layernorm import layernorm_backward
    C = 8
    x = np.ones((2, C), np.float32)
    args = lambda: (np.empty_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32), x, x,
                    np.ones(C, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32))
    for bad in (0, 3, "2", None):
        with pytest.raises(ValueError, match=r"layernorm_backward: version must be one of \(1, 2\)"):
            layernorm_backward(*args(), version=bad)
    # 2 * C floats per warp must fit the 48 KiB of shared memory: C = 6145 does not.
    C = 6145
    x = np.ones((1, C), np.float32)
    with pytest.raises(ValueError, match=r"layernorm_backward: version 2 .* C = 6145 .*use version=1"):
        layernorm_backward(np.empty_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32), x, x,
                           np.ones(C, np.float32), np.zeros(1, np.float32), np.ones(1, np.float32))


# ------------------------------------------------------------------------ matmul bias

def _matmul_case(rng, dtype, N, C, OC):
    (x, x_f), (w, w_f) = rand_x(rng, dtype, N, C), rand_x(rng, dtype, OC, C, scale=0.1)
    (dout, dout_f) = rand_x(rng, dtype, N, OC)
    (dw0, dw0_f), (db0, db0_f) = rand_x(rng, dtype, OC, C), rand_x(rng, dtype, OC)
    return dict(x=x, x_f=x_f, w=w, w_f=w_f, dout=dout, dout_f=dout_f, dw0=dw0, dw0_f=dw0_f,
                db0=db0, db0_f=db0_f)


def _run_matmul(dev, case, version, accumulate=True):
    from llmcu.cuda.matmul import matmul_backward
    dw, db = dev.put(case["dw0"]), dev.put(case["db0"])
    matmul_backward(None, dw, db, dev.put(case["dout"]), dev.put(case["x"]), dev.put(case["w"]),
                    accumulate_weight=accumulate, version=version)
    return dev.get(db)


# (N, OC, cap): OC=144 16-byte in fp32 and bf16 (several 32-packet tiles, the last
# partial in bf16); OC=37 scalar; OC=36 16-byte in fp32, scalar in bf16; N=333
# rows over a pass-1 grid capped at 2 blocks per column tile (16 warps, 21 rows each).
MATMUL_SHAPES = [(14, 144, None), (3, 37, None), (9, 36, None), (333, 72, 4)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,OC,cap", MATMUL_SHAPES)
def test_matmul_bias_backward(dev, dtype, version, N, OC, cap, monkeypatch):
    if cap is not None:
        monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", cap)
    case = _matmul_case(np.random.default_rng(23), dtype, N, 5, OC)
    db = _run_matmul(dev, case, version)
    rdb = case["db0_f"].copy()
    cpu_matmul.matmul_backward(None, np.zeros((OC, 5), np.float32), rdb, case["dout_f"], case["x_f"],
                               case["w_f"])
    assert_close(f"matmul v{version} dbias", value(db), rdb,
                 **sum_tol(dtype, case["db0_f"], case["dout_f"], N))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_bias_backward_overwrites_without_accumulate(dev, dtype):
    """accumulate_weight=False: dbias = column sums, the old (nonzero) dbias ignored."""
    N, OC = 21, 72
    case = _matmul_case(np.random.default_rng(24), dtype, N, 5, OC)
    db = _run_matmul(dev, case, 2, accumulate=False)
    ref = case["dout_f"].sum(axis=0)
    assert_close("matmul v2 dbias (overwrite)", value(db), ref,
                 **sum_tol(dtype, np.zeros(OC, np.float32), case["dout_f"], N))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_bias_backward_v2_is_deterministic(dev, dtype, monkeypatch):
    monkeypatch.setattr(runtime, "PARTIAL_SUM_BLOCKS", 6)
    case = _matmul_case(np.random.default_rng(25), dtype, 257, 5, 264)
    assert bits_of(_run_matmul(dev, case, 2)) == bits_of(_run_matmul(dev, case, 2)), \
        "matmul v2 dbias: two runs differ"


@pytest.mark.parametrize("version", VERSIONS)
def test_matmul_bias_backward_alone(dev, version):
    """matmul_bias_backward (what matmul_backward calls) on a 3-D dout of GPT-2 width."""
    from llmcu.cuda.matmul import matmul_bias_backward
    rng = np.random.default_rng(29)
    dout, db0 = rand(rng, 2, 9, 768), rand(rng, 768)
    db = dev.put(db0)
    matmul_bias_backward(db, dev.put(dout), version=version)
    ref = db0 + dout.reshape(-1, 768).sum(axis=0)
    assert_close(f"matmul_bias_backward v{version}", dev.get(db), ref,
                 **sum_tol(np.float32, db0, dout.reshape(-1, 768), 18))


def test_matmul_bias_backward_errors():
    from llmcu.cuda.matmul import matmul_bias_backward
    dout = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"matmul_bias_backward: dbias must have shape \(6,\), got \(5,\)"):
        matmul_bias_backward(np.zeros(5, np.float32), dout)
    with pytest.raises(TypeError, match="matmul_bias_backward: dbias must have dtype float32, got float64"):
        matmul_bias_backward(np.zeros(6), dout)
    with pytest.raises(TypeError, match="matmul_bias_backward: dout must have dtype float32 .*got int32"):
        matmul_bias_backward(np.zeros(6, np.float32), dout.astype(np.int32))


def test_matmul_backward_unknown_version():
    from llmcu.cuda.matmul import matmul_backward
    x, w = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"matmul_backward: version must be one of \(1, 2\)"):
        matmul_backward(None, np.zeros((3, 4), np.float32), np.zeros(3, np.float32),
                        np.ones((2, 3), np.float32), x, w, version=3)


# ---------------------------------------------------------------------------- encoder

def _encoder_case(rng, dtype, B, T, C, V, hot=None):
    """Random tokens in [0, V) of a vocabulary Vp = V + 5 (the last five never seen);
    `hot` repeats one token at every other position."""
    Vp, maxT = V + 5, T + 3
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    if hot is not None:
        inp.reshape(-1)[::2] = hot
    (dout, dout_f) = rand_x(rng, dtype, B, T, C)
    (w0, w0_f), (p0, p0_f) = rand_x(rng, dtype, Vp, C), rand_x(rng, dtype, maxT, C)
    return dict(inp=inp, dout=dout, dout_f=dout_f, w0=w0, w0_f=w0_f, p0=p0, p0_f=p0_f)


def _run_encoder(dev, case, version):
    from llmcu.cuda.encoder import encoder_backward
    dwte, dwpe = dev.put(case["w0"]), dev.put(case["p0"])
    encoder_backward(dwte, dwpe, dev.put(case["dout"]), dev.put(case["inp"]), version=version)
    return dev.get(dwte), dev.get(dwpe)


# (B, T, C, V, hot): C=48 16-byte in fp32 and bf16; C=1023 scalar; C=20 16-byte in
# fp32, scalar in bf16; (4, 32, 40, 9, 3): token 3 at 64 of the 128 positions
# (one block sums 64+ rows), a vocabulary of 9 (+5 never seen).
ENCODER_SHAPES = [(2, 7, 48, 101, None), (1, 5, 1023, 37, None), (3, 6, 20, 11, None),
                  (4, 32, 40, 9, 3)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V,hot", ENCODER_SHAPES)
def test_encoder_backward(dev, dtype, version, B, T, C, V, hot):
    case = _encoder_case(np.random.default_rng(26), dtype, B, T, C, V, hot)
    dwte, dwpe = _run_encoder(dev, case, version)
    inp, dout_f = case["inp"], case["dout_f"]
    rwte, rwpe = case["w0_f"].copy(), case["p0_f"].copy()
    cpu_encoder.encoder_backward(rwte, rwpe, dout_f, inp)
    # dwpe: start + B terms per (t, c), one rounding (both versions).
    terms = np.zeros((B,) + rwpe.shape, np.float32)
    terms[:, :T] = dout_f
    assert_close(f"encoder v{version} dwpe", value(dwpe), rwpe, **sum_tol(dtype, case["p0_f"], terms, B))
    # dwte: start + count(token) terms. Version 2 rounds once; version 1 rounds bf16
    # after each add (test_kernels_bf16.py's bound: n roundings of partials <= (n+1) max).
    counts = np.bincount(inp.reshape(-1), minlength=rwte.shape[0])
    n = int(counts.max())
    gathered = np.zeros((n,) + rwte.shape, np.float32)  # gathered[k, token] = its k-th dout row
    seen = np.zeros(rwte.shape[0], np.int64)
    for pos, token in enumerate(inp.reshape(-1)):
        gathered[seen[token], token] = dout_f.reshape(-1, C)[pos]
        seen[token] += 1
    tol = sum_tol(dtype, case["w0_f"], gathered, n)
    if version == 1 and np.dtype(dtype) == np.uint16:
        big = float(max(np.abs(case["w0_f"]).max(), np.abs(dout_f).max()))
        tol["atol"] += (n - 1) * U * (n + 1) * big
    assert_close(f"encoder v{version} dwte", value(dwte), rwte, **tol)
    # Rows of tokens never seen and positions past T: untouched, bit for bit.
    unseen = counts == 0
    assert unseen[-5:].all()
    assert bits_of(dwte[unseen]) == bits_of(case["w0"][unseen]), "dwte rows of unseen tokens changed"
    assert bits_of(dwpe[T:]) == bits_of(case["p0"][T:]), "dwpe rows past T changed"


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_backward_v2_sums_each_token_in_position_order(dev, dtype):
    """Four tokens over 256 positions (~64 each): every row of dwte must be start + that
    token's dout rows added in position order in fp32, rounded once -- bit for bit. An
    unstable sort (numpy's default quicksort here) scrambles the order and fails this."""
    B, T, C, V = 4, 64, 16, 4
    case = _encoder_case(np.random.default_rng(27), dtype, B, T, C, V)
    dwte, _ = _run_encoder(dev, case, 2)
    rows = case["dout_f"].reshape(-1, C)
    for token in range(V):
        acc = np.zeros(C, np.float32)
        for pos in np.flatnonzero(case["inp"].reshape(-1) == token):  # fp32 adds in position order
            acc = acc + rows[pos]
        expected = case["w0_f"][token] + acc
        expected = to_bits(expected) if np.dtype(dtype) == np.uint16 else expected
        assert bits_of(dwte[token]) == bits_of(expected), \
            f"dwte[{token}] is not start + its rows summed in position order"


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_backward_v2_is_deterministic(dev, dtype):
    case = _encoder_case(np.random.default_rng(28), dtype, 4, 32, 24, 13, hot=5)
    first, second = _run_encoder(dev, case, 2), _run_encoder(dev, case, 2)
    assert bits_of(first[0]) == bits_of(second[0]), "encoder v2 dwte: two runs differ"
    assert bits_of(first[1]) == bits_of(second[1]), "encoder v2 dwpe: two runs differ"


def test_encoder_backward_unknown_version():
    from llmcu.cuda.encoder import encoder_backward
    with pytest.raises(ValueError, match=r"encoder_backward: version must be one of \(1, 2\)"):
        encoder_backward(np.zeros((5, 4), np.float32), np.zeros((3, 4), np.float32),
                         np.ones((1, 2, 4), np.float32), np.zeros((1, 2), np.int32), version=0)


# ------------------------------------------------------------------------------ grid

def test_partial_sums_grid():
    assert runtime.partial_sums_grid(10, 8) == 2
    assert runtime.partial_sums_grid(16, 8) == 2
    assert runtime.partial_sums_grid(10**6, 8) == runtime.PARTIAL_SUM_BLOCKS
    assert runtime.partial_sums_grid(10**6, 8, max_blocks=3) == 3
    with pytest.raises(ValueError, match="partial_sums_grid: work and per_block must be > 0"):
        runtime.partial_sums_grid(0, 8)
