"""cuBLASLt algorithm autotuning (llmcu/cuda/cublaslt.py: lt_matmul(tune=True), the GEMM
libraries "cublaslt_tuned" / "cublaslt_all_tuned" of llmcu/cuda/matmul.py).

The choice logic (choose_fastest, pick_algo: the cache keyed by the tuning flag, no
tuning during a graph capture, the report) is pure Python, tested here with fake
heuristics and a fake timer. The heuristic-result array is tested with a fake library
(and against libcublasLt itself where it loads). Under the emulator tune=True must change
nothing, so the tuned libraries are checked bit for bit against the untuned ones through
the matmul wrappers and a GPT-2 training step. The "cuda" cases run the real tuning.

Tolerances. emu: 0 (the same NumPy arithmetic runs). cuda: tuned and untuned may run
different algorithms, whose fp32 sums of K products differ in order; each output is
rounded once, so fp32 1e-5 and bf16 3 ulps (2^-8 relative) plus 2^-8 absolute, as
tests/kernels/test_cublaslt.py.
"""

import ctypes
import sys
import types

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu import cuda as llmcu_cuda
from llmcu.config import GPT2Config
from llmcu.cuda import cublaslt
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

BF16_TOL = dict(atol=2.0 ** -8, rtol=3 * 2.0 ** -8)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
TINY = GPT2Config(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=4, channels=64)


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty algorithm cache and tuning record for one test (the module's are restored)."""
    monkeypatch.setattr(cublaslt, "_algos", {})
    monkeypatch.setattr(cublaslt, "_tuning", [])


# -- the choice logic, with a fake timer ------------------------------------------

def _fake_timer(times):
    """run_and_time for candidates 0..n-1 with the given median ms (None = failing),
    recording which candidates ran."""
    ran = []

    def run_and_time(candidate):
        ran.append(candidate)
        return times[candidate]
    return run_and_time, ran


def test_choose_fastest_picks_the_fastest():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8):
        times = [float(t) for t in rng.uniform(0.1, 2.0, n)]
        run, ran = _fake_timer(times)
        index, got = cublaslt.choose_fastest(list(range(n)), run, key="k")
        assert index == int(np.argmin(times)), (times, index)
        assert got == times and ran == list(range(n))  # each candidate timed once, in order
    # a tie keeps the heuristic's earlier candidate
    assert cublaslt.choose_fastest([0, 1, 2], _fake_timer([0.5, 0.3, 0.3])[0])[0] == 1


def test_choose_fastest_skips_failing_candidates():
    # the failing ones would be the "fastest" if their None were taken as a number (0)
    times = [None, 0.9, None, 0.4, 0.7, None]
    index, got = cublaslt.choose_fastest(list(range(6)), _fake_timer(times)[0], key="k")
    assert index == 3 and got == times


def test_choose_fastest_raises_when_all_fail():
    with pytest.raises(RuntimeError, match=r"all 3 candidate algorithms failed for \('bf16', 7\)"):
        cublaslt.choose_fastest([0, 1, 2], _fake_timer([None] * 3)[0], key=("bf16", 7))
    with pytest.raises(RuntimeError, match="all 0 candidate"):
        cublaslt.choose_fastest([], _fake_timer([])[0], key="k")


def _fake_heuristics(n_available):
    """heuristics(n) -> the first min(n, n_available) candidate ids, recording each n asked."""
    asked = []

    def heuristics(n):
        asked.append(n)
        return list(range(min(n, n_available)))
    return heuristics, asked


def test_untuned_and_tuned_choices_are_cached_apart(fresh_cache):
    times = [0.8, 0.5, None, 0.2, 0.6]   # candidate 3 fastest, candidate 2 fails
    heuristics, asked = _fake_heuristics(len(times))
    run, ran = _fake_timer(times)
    key = ("bf16", 64, 32, 48)
    # untuned: the heuristic's first, never timed, asked for one candidate
    assert cublaslt.pick_algo(key, False, False, heuristics, run) == 0
    assert asked == [1] and ran == []
    # tuned: all candidates timed once, the fastest kept, under its own cache entry
    label = dict(M=64, epilogue="DGELU")
    assert cublaslt.pick_algo(key, True, False, heuristics, run, label) == 3
    assert asked == [1, cublaslt.TUNE_CANDIDATES] and ran == list(range(len(times)))
    assert cublaslt._algos[(key, False)] == 0 and cublaslt._algos[(key, True)] == 3
    # both cached: no more heuristic calls nor timing, each flag keeps its own choice
    assert cublaslt.pick_algo(key, True, False, heuristics, run) == 3
    assert cublaslt.pick_algo(key, False, False, heuristics, run) == 0
    assert len(asked) == 2 and len(ran) == len(times)
    report = cublaslt.tuning_report()
    assert len(report) == 1
    entry = report[0]
    assert entry["key"] == key and entry["M"] == 64 and entry["epilogue"] == "DGELU"
    assert entry["candidates"] == len(times) and entry["ms"] == times and entry["chosen"] == 3
    assert entry["chosen_ms"] == 0.2 and entry["heuristic_first_ms"] == 0.8
    # another key is tuned on its own; the report grows
    assert cublaslt.pick_algo(("bf16", 1), True, False, *_fake_heuristics(3)[:1],
                              _fake_timer([0.3, 0.1, 0.2])[0]) == 1
    assert [e["key"] for e in cublaslt.tuning_report()] == [key, ("bf16", 1)]


def test_tuning_asks_for_at_most_tune_candidates(fresh_cache):
    heuristics, asked = _fake_heuristics(100)
    run, ran = _fake_timer([1.0] * 100)
    cublaslt.pick_algo("k", True, False, heuristics, run)
    assert asked == [cublaslt.TUNE_CANDIDATES] and len(ran) == cublaslt.TUNE_CANDIDATES


def test_no_tuning_while_capturing(fresh_cache):
    times = [0.8, 0.2]
    heuristics, asked = _fake_heuristics(2)
    run, ran = _fake_timer(times)
    # capturing, nothing tuned yet: the heuristic's first, not timed, not cached as tuned
    assert cublaslt.pick_algo("k", True, True, heuristics, run) == 0
    assert ran == [] and asked == [1]
    assert ("k", True) not in cublaslt._algos and cublaslt.tuning_report() == []
    # outside the capture the next call tunes
    assert cublaslt.pick_algo("k", True, False, heuristics, run) == 1
    assert ran == [0, 1]
    # a later capture uses the tuned choice, without timing again
    assert cublaslt.pick_algo("k", True, True, heuristics, run) == 1
    assert ran == [0, 1] and len(cublaslt.tuning_report()) == 1


def test_all_candidates_failing_raises_and_caches_nothing(fresh_cache):
    heuristics, _ = _fake_heuristics(3)
    with pytest.raises(RuntimeError, match="failed for my-key"):
        cublaslt.pick_algo("my-key", True, False, heuristics, _fake_timer([None] * 3)[0])
    assert ("my-key", True) not in cublaslt._algos and cublaslt.tuning_report() == []


def test_tuning_report_is_a_copy_and_formats(fresh_cache):
    label = dict(dtype="bf16", M=16384, K=768, N=3072, transpose_a=False, transpose_b=True,
                 epilogue="GELU_AUX_BIAS")
    cublaslt.pick_algo("k", True, False, _fake_heuristics(3)[0], _fake_timer([0.4, None, 0.3])[0],
                       label)
    report = cublaslt.tuning_report()
    report[0]["ms"].append(9.0)
    report[0]["chosen"] = 7
    assert cublaslt.tuning_report()[0]["ms"] == [0.4, None, 0.3]
    assert cublaslt.tuning_report()[0]["chosen"] == 2
    (line,) = cublaslt.tuning_lines()
    assert "M=16384 K=768 N=3072 ta=0 tb=1 GELU_AUX_BIAS" in line
    assert "3 candidates, chose #2 0.3000 ms (0.750x the heuristic's first)" in line
    assert "0.4000 fail 0.3000" in line
    assert cublaslt.tuning_lines([]) == []


# -- the heuristic-result array ---------------------------------------------------

class _FakeLt:
    """cublasLtMatmulAlgoGetHeuristic writing `count` results (algo[0] = 100 + i, state = i
    % 2) into the caller's array, returning `status`."""

    def __init__(self, count, status=0):
        self.count, self.status, self.seen = count, status, None

    def cublasLtMatmulAlgoGetHeuristic(self, handle, d, la, lb, lc, ld, pref, n, results, count):
        self.seen = (n, len(results), type(results)._type_, lc is ld)
        for i in range(min(self.count, len(results))):
            results[i].algo[0] = 100 + i
            results[i].state = i % 2
        count.contents.value = self.count
        return self.status


def test_heuristic_results_array_and_count():
    n = cublaslt.TUNE_CANDIDATES
    lib = _FakeLt(count=3)
    found = cublaslt._heuristics(lib, None, "d", "la", "lb", "ld", "pref", n, key="k")
    # one array of n _Heuristic passed with n; C and D share the layout
    assert lib.seen == (n, n, cublaslt._Heuristic, True)
    assert [r.algo[0] for r in found] == [100, 101, 102] and [r.state for r in found] == [0, 1, 0]
    assert all(isinstance(r, cublaslt._Heuristic) for r in found)
    assert len({ctypes.addressof(r) for r in found}) == 3  # copies, not views of one array
    found[0].algo[0] = 7
    assert found[1].algo[0] == 101
    with pytest.raises(RuntimeError, match=r"no algorithm for \('bf16', 3\).*returned 0 of at most 8"):
        cublaslt._heuristics(_FakeLt(count=0), None, 0, 0, 0, 0, 0, 8, key=("bf16", 3))
    with pytest.raises(RuntimeError, match="returned 9 of at most 8"):
        cublaslt._heuristics(_FakeLt(count=9), None, 0, 0, 0, 0, 0, 8, key="k")
    with pytest.raises(RuntimeError, match="cublasLtMatmulAlgoGetHeuristic failed with cublasStatus_t 15"):
        cublaslt._heuristics(_FakeLt(count=1, status=15), None, 0, 0, 0, 0, 0, 8, key="k")


def test_heuristic_call_through_the_real_library():
    """The array and count pointer pass libcublasLt's ctypes signature; without a GPU there is
    no handle, so the call answers a nonzero status, raised naming the function. Skipped
    where libcublasLt is not installed."""
    try:
        cublaslt.library()
    except RuntimeError as e:
        pytest.skip(str(e))
    desc = cublaslt._Desc()
    try:
        d = desc.matmul(cublaslt.EPILOGUE_DEFAULT, 0, 0)
        lay = desc.layout(cublaslt.CUDA_R_16BF, 64, 64, 64)
        pref = desc.preference(cublaslt.WORKSPACE_BYTES)
        with pytest.raises(RuntimeError, match="cublasLtMatmulAlgoGetHeuristic failed"):
            cublaslt._heuristics(cublaslt.library(), None, d, lay, lay, lay, pref,
                                 cublaslt.TUNE_CANDIDATES, key="k")
    finally:
        desc.close()


# -- lt_matmul's GPU branch with a fake libcublasLt and a fake CuPy ---------------

class _Clock:
    now = 0.0


class _FakeLtLibrary:
    """Every descriptor call succeeds; the heuristic offers algorithms 0..n-1 (algo[0] = id,
    state from `states`); cublasLtMatmul of algorithm i advances the clock by costs[i] ms,
    or returns statuses[i] when that is nonzero. Records the id of every launch."""

    def __init__(self, costs, states, statuses):
        self.costs, self.states, self.statuses = costs, states, statuses
        self.launched, self.asked = [], []

    def __getattr__(self, name):  # descriptor create / set / destroy, cublasLtCreate
        return lambda *args: 0

    def cublasLtMatmulAlgoGetHeuristic(self, handle, d, la, lb, lc, ld, pref, n, results, count):
        self.asked.append(n)
        k = min(n, len(self.costs))
        for i in range(k):
            results[i].algo[0], results[i].state = i, self.states[i]
        count.contents.value = k
        return 0

    def cublasLtMatmul(self, handle, d, alpha, A, la, B, lb, beta, C, lc, D, ld, algo, ws, ws_size,
                       stream):
        i = ctypes.c_uint64.from_address(algo).value
        self.launched.append(i)
        if self.statuses[i]:
            return self.statuses[i]
        _Clock.now += self.costs[i]
        return 0


class _FakeEvent:
    def record(self, stream=None):
        self.t = _Clock.now

    def synchronize(self):
        pass


class _FakeDeviceArray:
    def __init__(self, ptr, shape):
        self.data, self.shape = types.SimpleNamespace(ptr=ptr), shape


def test_lt_matmul_gpu_branch_tunes_with_a_fake_library(monkeypatch, fresh_cache):
    """The ctypes side of tuning without a GPU: candidates the heuristic marks unusable are
    never launched, one whose launch fails is dropped, each other one runs TUNE_WARMUP +
    TUNE_REPS times, the fastest then runs the call itself and later calls directly; the
    untuned call asks for one algorithm; under a capture nothing is timed."""
    costs, states, statuses = [5.0, 3.0, 1.0, 0.5, 4.0], [0, 0, 1, 0, 0], [0, 0, 0, 13, 0]
    lib = _FakeLtLibrary(costs, states, statuses)
    stream = types.SimpleNamespace(ptr=0, is_capturing=lambda: False)
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: stream,
                                           Device=lambda: types.SimpleNamespace(id=0), Event=_FakeEvent,
                                           get_elapsed_time=lambda start, end: end.t - start.t)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(cublaslt, "library", lambda: lib)
    monkeypatch.setattr(cublaslt, "_handles", {})
    be = types.SimpleNamespace(name="cuda", capturing=False)
    M, K, N = 64, 32, 48
    monkeypatch.setattr(cublaslt, "_check",
                        lambda fn, out, a, b, *rest: (be, cublaslt.BF16, out.shape[0], K, N))
    monkeypatch.setattr(cublaslt.runtime, "scratch", lambda *args: _FakeDeviceArray(4096, None))
    a, b = _FakeDeviceArray(1 << 20, (M, K)), _FakeDeviceArray(2 << 20, (N, K))
    out = _FakeDeviceArray(3 << 20, (M, N))
    runs = cublaslt.TUNE_WARMUP + cublaslt.TUNE_REPS

    cublaslt.lt_matmul(out, a, b, transpose_b=True, tune=True)
    assert lib.asked == [cublaslt.TUNE_CANDIDATES]
    # 0 and 1 timed; 2 unusable (state); 3 fails on its first launch; 4 timed; then the call
    assert lib.launched == [0] * runs + [1] * runs + [3] + [4] * runs + [1], lib.launched
    (entry,) = cublaslt.tuning_report()
    assert entry["ms"] == [5.0, 3.0, None, None, 4.0] and entry["chosen"] == 1
    assert (entry["M"], entry["K"], entry["N"], entry["epilogue"]) == (M, K, N, "DEFAULT")
    assert entry["transpose_b"] and not entry["transpose_a"] and entry["dtype"] == "bf16"

    lib.launched.clear()
    cublaslt.lt_matmul(out, a, b, transpose_b=True, tune=True)   # cached: the chosen one only
    cublaslt.lt_matmul(out, a, b, transpose_b=True)              # untuned: the heuristic's first
    assert lib.launched == [1, 0] and lib.asked == [cublaslt.TUNE_CANDIDATES, 1]

    lib.launched.clear()
    out2 = _FakeDeviceArray(5 << 20, (2 * M, N))                 # a new key, first met in a capture
    def query_refused():
        raise RuntimeError("cudaErrorStreamCaptureImplicit")
    for capture in ("llmcu", "stream", "query refused"):   # graphs.py's flag, the stream's state
        be.capturing = capture == "llmcu"
        stream.is_capturing = query_refused if capture == "query refused" else lambda: capture == "stream"
        cublaslt.lt_matmul(out2, _FakeDeviceArray(6 << 20, (2 * M, K)), b, transpose_b=True, tune=True)
    assert lib.launched == [0, 0, 0] and len(cublaslt.tuning_report()) == 1

    lib.statuses = [13] * len(costs)                             # every launch fails: named
    with pytest.raises(RuntimeError, match=r"all 5 candidate algorithms failed for \('<u2', 32, 32"):
        be.capturing, stream.is_capturing = False, lambda: False
        cublaslt.lt_matmul(_FakeDeviceArray(7 << 20, (32, N)), _FakeDeviceArray(8 << 20, (32, K)), b,
                           transpose_b=True, tune=True)


# -- lt_matmul(tune=) arguments ---------------------------------------------------

def test_tune_argument_checks():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    out = np.full((8, 8), np.nan, np.float32)
    with pytest.raises(TypeError, match="lt_matmul: tune must be a bool, got int"):
        cublaslt.lt_matmul(out, a, b, tune=1)
    square = rng.standard_normal((8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"lt_matmul: with tune=True, out \(written\) must not overlap a"):
        cublaslt.lt_matmul(square, square, square.copy(), tune=True)
    with pytest.raises(ValueError, match=r"out \(written\) must not overlap b"):
        cublaslt.lt_matmul(square, square.copy(), square, tune=True)
    with pytest.raises(ValueError, match=r"out \(written\) must not overlap dgelu_aux"):
        cublaslt.lt_matmul(square, a[:, :8].copy(), b[:8].copy(), dgelu_aux=square, tune=True)
    both = np.full((2, 8, 8), np.nan, np.float32)  # two disjoint halves of one buffer
    with pytest.raises(ValueError, match=r"gelu_aux \(written\) must not overlap a"):
        cublaslt.lt_matmul(both[0], both[1], square, gelu_aux=both[1], tune=True)
    # adjacent, disjoint halves of one buffer are fine (the byte ranges touch, not overlap)
    both[1] = square
    cublaslt.lt_matmul(both[0], both[1], square, tune=True)
    assert_close("disjoint out", both[0], square @ square, **FP32_TOL)
    # the check is tune=True's only: an untuned call keeps its behaviour (emulator: reads, then writes)
    want = square @ square
    cublaslt.lt_matmul(square, square, square.copy())
    assert_close("untuned in place", square, want, **FP32_TOL)


# -- the tuned libraries change nothing under the emulator ------------------------

def _arrays(rng, dtype, *shapes):
    out = []
    for s in shapes:
        x = rng.standard_normal(s).astype(np.float32)
        out.append(float32_to_bf16_bits(x) if dtype == "bf16" else x)
    return out


def _poison(dev, shape, dtype):
    fill = np.full(shape, np.nan, np.float32)
    return dev.put(float32_to_bf16_bits(fill) if dtype == "bf16" else fill)


def _f32(a):
    a = np.asarray(a)
    return bf16_bits_to_float32(a) if a.dtype == np.uint16 else a


def _same(dev, dtype, what, got, want):
    if dev.name == "emu":  # the same NumPy arithmetic: bit for bit
        np.testing.assert_array_equal(np.asarray(dev.get(got)), np.asarray(dev.get(want)), err_msg=what)
    else:
        assert_close(what, _f32(dev.get(got)), _f32(dev.get(want)),
                     **(BF16_TOL if dtype == "bf16" else FP32_TOL))


@pytest.mark.cuda
@pytest.mark.skipif(not llmcu_cuda.is_available(), reason="no CUDA GPU with CuPy here")
def test_tuning_on_the_gpu_records_and_skips_captures(fresh_cache):
    """On a GPU: a tuned call times its candidates and records the decision (the chosen
    median no slower than the heuristic's first, by construction), its result matches the
    untuned call's; a tuned call of an untuned key inside a graph capture times nothing and
    the replayed graph computes the GEMM."""
    import cupy

    from llmcu.cuda import graphs, runtime
    be, cuda = runtime.get_backend("cuda"), Device("cuda")
    rng = np.random.default_rng(5)
    M, K, N = 256, 192, 128
    a, b, bias = (cupy.asarray(float32_to_bf16_bits(rng.standard_normal(s).astype(np.float32)))
                  for s in ((M, K), (N, K), (N,)))
    ref, out = _poison(cuda, (M, N), "bf16"), _poison(cuda, (M, N), "bf16")
    cublaslt.lt_matmul(ref, a, b, transpose_b=True, bias=bias)
    cublaslt.lt_matmul(out, a, b, transpose_b=True, bias=bias, tune=True)
    assert_close("tuned lt_matmul", _f32(out.get()), _f32(ref.get()), **BF16_TOL)
    (entry,) = cublaslt.tuning_report()
    assert (entry["M"], entry["K"], entry["N"], entry["epilogue"]) == (M, K, N, "BIAS")
    assert 1 <= entry["candidates"] == len(entry["ms"]) <= cublaslt.TUNE_CANDIDATES
    assert entry["chosen_ms"] > 0
    if entry["heuristic_first_ms"] is not None:
        assert entry["chosen_ms"] <= entry["heuristic_first_ms"]
    print("\n".join(cublaslt.tuning_lines()))
    # no bias: a key untuned so far, met with tune=True only inside the capture
    plain, captured = _poison(cuda, (M, N), "bf16"), _poison(cuda, (M, N), "bf16")
    cublaslt.lt_matmul(plain, a, b, transpose_b=True)
    graph = graphs.capture(be, lambda: cublaslt.lt_matmul(captured, a, b, transpose_b=True, tune=True))
    assert len(cublaslt.tuning_report()) == 1
    graph.launch()
    be.synchronize()
    # the same (untuned) algorithm on the same inputs: bit for bit
    np.testing.assert_array_equal(captured.get(), plain.get())
