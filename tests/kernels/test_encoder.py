"""The encoder's product kernels (kernels/encoder.cu, llmcu/cuda/encoder.py) against the
NumPy oracle (llmcu/cpu/encoder.py), fp32 and bf16.

- encoder_forward: encoder_forward_kernel2 (16-byte loads and stores) where C is a
  multiple of the packet (4 fp32, 8 bf16) and the arrays are aligned, else kernel1 (one
  element per thread). The launched kernel is checked, so each case tests its path.
- encoder_backward: encoder_wpe_backward_kernel2 (dwpe: per (t, channel) the sum over b
  in order) and encoder_wte_backward_kernel2 (dwte: the positions sorted stably by token,
  each token's dout rows summed in position order), both with a 16-byte (`wide`) and a
  scalar path; token_runs= gives the sort ready-made, as the GPT-2 model does.

Every result here is exact: the forward is one fp32 add of two dtype values and one
rounding, as NumPy's; the backward adds in fp32 in an order the kernels fix (no atomics,
no tree), then rounds once into the gradient, so the tests model that order in NumPy and
compare bit for bit (atol = rtol = 0 for both dtypes). That also makes the two-pass
backward's determinism a consequence of the tests, not a separate check; an unstable sort
(numpy's default quicksort here), a missing or doubled row, or a rounding after each add
instead of one fails it. Inputs are random, outputs NaN-poisoned, gradients start random
(+= is checked), and the rows of tokens never seen and of positions past T must keep
their bits.
"""

import numpy as np
import pytest

from helpers import BF16, FP32, assert_close, assert_same_bits, out_tol, rand_x, to_dtype, value
from llmcu.cpu import encoder as cpu_encoder


def _kernels():
    from llmcu.cuda import encoder
    return encoder


def _case(rng, dtype, B, T, C, V, hot=None):
    """Tokens in [0, V) of a vocabulary Vp = V + 5 (the last five never seen; `hot` repeats
    one token at every other position), maxT = T + 3 (rows past T never touched)."""
    Vp, maxT = V + 5, T + 3
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    inp[0, :3] = inp[0, 0]  # a repeated token in every case: the backward must sum it
    if hot is not None:
        inp.reshape(-1)[::2] = hot
    (wte, wte_f), (wpe, wpe_f) = rand_x(rng, dtype, Vp, C), rand_x(rng, dtype, maxT, C)
    dout, dout_f = rand_x(rng, dtype, B, T, C)
    return dict(inp=inp, wte=wte, wte_f=wte_f, wpe=wpe, wpe_f=wpe_f, dout=dout, dout_f=dout_f)


# (dtype, B, T, C, V, wide): the 16-byte path needs C % 4 (fp32) or C % 8 (bf16) == 0.
# C = 1023 and C = 20 in bf16 (20 % 8 != 0) take the scalar path; T = 7 and B*T*C not a
# multiple of the block leave the last block partly idle. Tolerance: none, bit for bit
# (module doc) in both dtypes.
FORWARD_CASES = [
    pytest.param(FP32, 2, 7, 48, 101, True, id="fp32-wide"),
    pytest.param(FP32, 1, 7, 1023, 37, False, id="fp32-scalar-C1023"),
    pytest.param(BF16, 2, 7, 64, 101, True, id="bf16-wide"),
    pytest.param(BF16, 3, 5, 20, 11, False, id="bf16-scalar-C20"),
]


@pytest.mark.parametrize("dtype,B,T,C,V,wide", FORWARD_CASES)
def test_encoder_forward(dev, launch_args, dtype, B, T, C, V, wide):
    k = _kernels()
    c = _case(np.random.default_rng(C + V), dtype, B, T, C, V)
    out = dev.poisoned((B, T, C), dtype)
    k.encoder_forward(out, dev.put(c["inp"]), dev.put(c["wte"]), dev.put(c["wpe"]))
    assert [launch.kernel for launch in launch_args] == [f"encoder_forward_kernel{2 if wide else 1}"]
    ref = np.empty((B, T, C), np.float32)
    cpu_encoder.encoder_forward(ref, c["inp"], c["wte_f"], c["wpe_f"])
    # one fp32 add of two dtype values, one rounding to dtype, as NumPy's: bit for bit
    assert_same_bits("encoder_forward out", dev.get(out), to_dtype(ref, dtype))


def _position_order_model(c, dtype):
    """dwte and dwpe as the kernels compute them: per token, start + (its dout rows added
    in fp32 in position order from 0); per (t, c), start + (the B rows added in order);
    one rounding to dtype each. Checked against the oracle's values by the caller."""
    inp, rows = c["inp"].reshape(-1), c["dout_f"].reshape(-1, c["dout_f"].shape[-1])
    dwte, dwpe = c["wte_f"].copy(), c["wpe_f"].copy()
    for token in np.unique(inp):
        acc = np.zeros(rows.shape[1], np.float32)
        for pos in np.flatnonzero(inp == token):
            acc = acc + rows[pos]
        dwte[token] = c["wte_f"][token] + acc
    B, T = c["inp"].shape
    acc = np.zeros(c["dout_f"].shape[1:], np.float32)
    for b in range(B):
        acc = acc + c["dout_f"][b]
    dwpe[:T] = c["wpe_f"][:T] + acc
    return to_dtype(dwte, dtype), to_dtype(dwpe, dtype)


# (dtype, B, T, C, V, hot, wide): as FORWARD_CASES, plus a token at 64 of 128 positions
# (one block sums 64+ rows) in a vocabulary of 9. Tolerance: none, bit for bit (module doc).
BACKWARD_CASES = [
    pytest.param(FP32, 2, 7, 48, 101, None, True, id="fp32-wide"),
    pytest.param(FP32, 1, 7, 1023, 37, None, False, id="fp32-scalar-C1023"),
    pytest.param(BF16, 2, 7, 64, 101, None, True, id="bf16-wide"),
    pytest.param(BF16, 3, 5, 20, 11, None, False, id="bf16-scalar-C20"),
    pytest.param(FP32, 4, 32, 40, 9, 3, True, id="fp32-hot-token"),
]


@pytest.mark.parametrize("dtype,B,T,C,V,hot,wide", BACKWARD_CASES)
def test_encoder_backward(dev, launch_args, dtype, B, T, C, V, hot, wide):
    k = _kernels()
    c = _case(np.random.default_rng(100 + C + V), dtype, B, T, C, V, hot)
    dwte, dwpe = dev.put(c["wte"]), dev.put(c["wpe"])  # random starts: the backward adds (+=)
    k.encoder_backward(dwte, dwpe, dev.put(c["dout"]), dev.put(c["inp"]))
    assert {launch.kernel: int(launch.args[-1]) for launch in launch_args} == {
        "encoder_wpe_backward_kernel2": int(wide), "encoder_wte_backward_kernel2": int(wide)}
    want_wte, want_wpe = _position_order_model(c, dtype)
    # The model above is the oracle's arithmetic in a fixed order; that it is the oracle's
    # result up to fp32 summation order and one rounding (helpers.out_tol) is checked here,
    # so a wrong model cannot pass the bit-for-bit comparisons below.
    rwte, rwpe = c["wte_f"].copy(), c["wpe_f"].copy()
    cpu_encoder.encoder_backward(rwte, rwpe, c["dout_f"], c["inp"])
    assert_close("the position-order model's dwte vs the oracle", value(want_wte), rwte, **out_tol(dtype, rwte))
    assert_close("the position-order model's dwpe vs the oracle", value(want_wpe), rwpe, **out_tol(dtype, rwpe))
    # start + the token's rows in position order, one rounding; unseen tokens and rows
    # past T keep their bits
    assert_same_bits("encoder_backward dwte", dev.get(dwte), want_wte)
    assert_same_bits("encoder_backward dwpe", dev.get(dwpe), want_wpe)


def test_encoder_backward_token_runs(dev, launch_args):
    """encoder_backward(..., token_runs=token_runs(host inp)), what the GPT-2 model passes:
    the same bits as the sort done inside, and the table is used (a reversed order, which
    the kernel would follow, gives other bits: the sum's order changes)."""
    k = _kernels()
    c = _case(np.random.default_rng(7), FP32, 4, 32, 24, 13, hot=5)
    results = []
    for runs in (None, k.token_runs(c["inp"])):
        dwte, dwpe = dev.put(c["wte"]), dev.put(c["wpe"])
        runs = None if runs is None else tuple(dev.put(a) for a in runs)
        k.encoder_backward(dwte, dwpe, dev.put(c["dout"]), dev.put(c["inp"]), token_runs=runs)
        results.append((dev.get(dwte), dev.get(dwpe)))
    assert_same_bits("dwte with token_runs", results[1][0], results[0][0])
    assert_same_bits("dwpe with token_runs", results[1][1], results[0][1])
    order, end = k.token_runs(c["inp"])
    assert order.dtype == end.dtype == np.int32 and order.shape == end.shape == (4 * 32,)
    flat = c["inp"].reshape(-1)
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    assert (flat[order][end - 1] == flat[order]).all() and (end[-1] == flat.size)
    # Each token's run backwards: the kernel follows the table, so the fp32 sums change.
    backwards = order.copy()
    tokens = flat[order]
    for start in np.r_[0, np.flatnonzero(tokens[1:] != tokens[:-1]) + 1]:
        backwards[start:end[start]] = order[start:end[start]][::-1]
    dwte = dev.put(c["wte"])
    k.encoder_backward(dwte, dev.put(c["wpe"]), dev.put(c["dout"]), dev.put(c["inp"]),
                       token_runs=(dev.put(backwards), dev.put(end)))
    assert not np.array_equal(dev.get(dwte), results[0][0]), "token_runs' order was not used"


def test_encoder_rejects_bad_arguments():
    k = _kernels()
    wte, wpe = np.zeros((11, 8), np.float32), np.zeros((4, 8), np.float32)
    inp = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"encoder_forward: T=5 exceeds maxT=4"):
        k.encoder_forward(np.zeros((2, 5, 8), np.float32), inp, wte, wpe)
    with pytest.raises(TypeError, match=r"encoder_forward: wpe must have dtype uint16, got float32"):
        k.encoder_forward(np.zeros((2, 3, 8), np.uint16), inp[:, :3].copy(), wte.astype(np.uint16), wpe)
    with pytest.raises(ValueError, match=r"encoder_backward: token_runs end must have shape \(6,\), got \(5,\)"):
        k.encoder_backward(wte, wpe, np.zeros((2, 3, 8), np.float32), inp[:, :3].copy(),
                           token_runs=(np.zeros(6, np.int32), np.zeros(5, np.int32)))
