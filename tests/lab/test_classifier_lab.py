"""The classifier lab (kernels/dev/classifier.cu through kernels/dev/classifier.py): version 3,
the product's fused_classifier_kernel2 with the row kept in registers, against the NumPy
oracle llmcu/cpu/classifier.py, fp32 and bf16, on the emulator (and a GPU when there is
one); and against the product's kernel2 bit for bit (element for element the same
arithmetic in the same order, kernels/dev/classifier.cu).

Tolerances: losses are fp32 whatever floatX is: atol = rtol = 1e-5 (sums over V of exp in
another order, CUDA's expf); dlogits ~ dloss / V are compared with atol 1e-7 and rtol 1e-5
(fp32) or 2^-8 + 1e-5 (bf16, one rounding). The padded columns (set to 1e4: ignored
however large) get exactly 0. Shapes: V = 1000 / Vp = 1024, V = 101 / Vp = 128, and GPT-2's
Vp = 50304, which fits the registers in bf16 only (fp32 is refused).
"""


import numpy as np
import pytest

from helpers import Device, KERNEL_BACKENDS, assert_close, value
from llmcu.lab import load as load_lab
from llmcu.cpu import classifier as cpu
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

U, F32 = 2.0 ** -8, 1e-5
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


lab = load_lab("classifier")
ops = lab.VERSIONS[3].ops


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def case(dtype, B, T, V, Vp):
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((B, T, Vp)) * 3.0).astype(np.float32)
    logits[..., V:] = 1e4  # padded columns must be ignored however large
    if np.dtype(dtype) == np.uint16:
        bits = float32_to_bf16_bits(logits)
        return bits, bf16_bits_to_float32(bits), rng.integers(0, V, (B, T)).astype(np.int32)
    return logits, logits.copy(), rng.integers(0, V, (B, T)).astype(np.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,V,Vp", [(2, 7, 1000, 1024), (1, 3, 101, 128)])
def test_version3_vs_oracle(dev, dtype, B, T, V, Vp):
    logits, logits_f, targets = case(dtype, B, T, V, Vp)
    losses = dev.poisoned((B, T))
    ops["crossentropy_forward"](losses, dev.put(logits), dev.put(targets), V)
    rlosses = np.empty((B, T), np.float32)
    cpu.crossentropy_forward(rlosses, logits_f, targets, V)
    assert_close("fused_classifier_kernel3 losses", dev.get(losses), rlosses, F32, F32)

    dloss = 1.0 / (B * T)
    dlogits, losses2 = dev.put(logits), dev.poisoned((B, T))
    ops["fused_classifier_dlogits"](dlogits, losses2, dev.put(targets), V, dloss)
    rdlogits, rlosses2 = logits_f.copy(), np.empty((B, T), np.float32)
    cpu.fused_classifier_dlogits(rdlogits, rlosses2, targets, V, dloss)
    assert_close("fused_classifier_kernel3 losses (dlogits call)", dev.get(losses2), rlosses2, F32, F32)
    assert_close("fused_classifier_kernel3 dlogits", value(dev.get(dlogits)), rdlogits, atol=1e-7,
                 rtol=U + F32 if np.dtype(dtype) == np.uint16 else F32)
    assert not np.any(value(dev.get(dlogits))[..., V:]), "padded columns of dlogits must be exactly 0"


@pytest.mark.parametrize("dtype,B,T,V,Vp", [(np.float32, 2, 7, 1000, 1024), (np.uint16, 1, 2, 50257, 50304)],
                         ids=["fp32", "bf16-gpt2-vocab"])
def test_version3_is_the_products_kernel2_bit_for_bit(dev, dtype, B, T, V, Vp):
    from llmcu.cuda import classifier as product
    logits, _, targets = case(dtype, B, T, V, Vp)
    results = []
    for fn in (ops["fused_classifier_dlogits"], product.fused_classifier_dlogits):
        dlogits, losses = dev.put(logits), dev.poisoned((B, T))
        fn(dlogits, losses, dev.put(targets), V, 1.0 / (B * T))
        results.append((dev.get(dlogits), dev.get(losses)))
    (d3, l3), (d2, l2) = results
    assert np.array_equal(d3, d2), "dlogits: kernel3 differs from kernel2"
    assert np.array_equal(l3, l2), "losses: kernel3 differs from kernel2"
    assert not np.isnan(l3).any()


def test_version3_refuses_what_does_not_fit():
    logits = np.zeros((1, 2, 50304), np.float32)
    args = (np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int32), 50257)
    with pytest.raises(ValueError, match="version 3 keeps a row in registers: Vp must be at most 32768"):
        ops["crossentropy_forward"](args[0], logits, *args[1:])
    with pytest.raises(ValueError, match=r"the 16-byte-load version needs a multiple of 4 padded vocabulary "
                                         r"columns Vp \(float32\), got 1022"):
        ops["fused_classifier_dlogits"](np.zeros((1, 2, 1022), np.float32), args[0], args[1], 1000, 1.0)
