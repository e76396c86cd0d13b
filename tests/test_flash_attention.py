"""Fused ("flash") causal attention: the NumPy oracle against PyTorch autograd,
and the kernels in kernels/attention.cu against the oracle.

Interface (llmcu/cpu/attention.py): flash_attention_forward(out, lse, qkv, NH,
NKV) and flash_attention_backward(dqkv, dout, qkv, out, lse, NH, NKV), qkv
(B,T,(NH+2*NKV)*hs) = [NH query heads | NKV key heads | NKV value heads],
query head h reads kv head h // (NH/NKV), lse (B,NH,T) the log-sum-exp of each
query row's scaled, causally masked scores.

Inputs are random N(0,1) (scores q.k/sqrt(hs) are then O(1), softmax rows
neither one-hot nor flat); every output is NaN-poisoned before the call.

Kernel tests run on "emu" (the .cu source on the CPU, always) and "cuda" (skipped
without a GPU). Version 1 is fp32 scalar code (also built with floatX = bf16);
version 2 uses tensor cores, which only the cuda runs exercise: under emu its one
wmma helper is replaced by scalar code (see kernels/attention.cu), so emu checks
everything around the tensor-core instructions and the cuda runs check those.
bf16 tolerance (the issue's): no worse than twice the error of llmcu's simple
attention path in bf16 (modelled in NumPy below) against the fp32 oracle.
"""

import numpy as np
import pytest
import torch

from helpers import assert_close, poisoned
from llmcu.cpu.attention import (attention_backward, attention_forward, flash_attention_backward,
                                 flash_attention_forward)

F32 = np.float32


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def torch_flash_reference(qkv, dout, NH, NKV):
    """Causal GQA attention written out in float64 torch (k/v heads repeated for the
    query heads that share them); returns out, lse, dqkv as float64 NumPy arrays."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    x = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = x.split([NH * hs, NKV * hs, NKV * hs], dim=-1)
    q = q.reshape(B, T, NH, hs).transpose(1, 2)
    k, v = (t.reshape(B, T, NKV, hs).transpose(1, 2).repeat_interleave(NH // NKV, dim=1) for t in (k, v))
    s = q @ k.transpose(-2, -1) / hs ** 0.5
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(B, T, NH * hs)
    out.backward(torch.tensor(dout, dtype=torch.float64))
    return out.detach().numpy(), lse.detach().numpy(), x.grad.numpy()


def run_oracle(qkv, dout, NH, NKV):
    B, T, _ = qkv.shape
    out, lse = poisoned(dout.shape), poisoned((B, NH, T))
    flash_attention_forward(out, lse, qkv, NH, NKV)
    dqkv = poisoned(qkv.shape)
    flash_attention_backward(dqkv, dout, qkv, out, lse, NH, NKV)
    return out, lse, dqkv


# --- the oracle ---------------------------------------------------------------

ORACLE_SHAPES = [  # B, T, NH, NKV, hs
    (2, 7, 4, 4, 16), (1, 1, 2, 2, 8), (2, 64, 4, 2, 64), (1, 33, 6, 1, 128), (1, 255, 2, 2, 64),
]


@pytest.mark.parametrize("B,T,NH,NKV,hs", ORACLE_SHAPES)
def test_flash_oracle_vs_torch(B, T, NH, NKV, hs):
    rng = np.random.default_rng(T * 1000 + NH * 10 + NKV)
    qkv = rand(rng, B, T, (NH + 2 * NKV) * hs)
    dout = rand(rng, B, T, NH * hs)
    out, lse, dqkv = run_oracle(qkv, dout, NH, NKV)
    rout, rlse, rdqkv = torch_flash_reference(qkv, dout, NH, NKV)
    # float32 oracle vs float64 reference: the only error is float32 rounding in
    # hs-term dots and T-term softmax sums of O(1) values, ~u*sqrt(n) ~ 1e-6
    # relative; dk/dv also sum over the G query heads of a group. Measured (pytest -s)
    # out <= 1e-6, lse <= 1e-6, dqkv <= 4e-6 over these shapes; atol = rtol = 2e-5
    # keeps a 5x margin while a dropped key, a wrong kv-head mapping or a mask
    # off by one changes values by O(1e-2) or more.
    assert_close(f"oracle out T={T}", out, rout, 2e-5, 2e-5)
    assert_close(f"oracle lse T={T}", lse, rlse, 2e-5, 2e-5)
    assert_close(f"oracle dqkv T={T}", dqkv, rdqkv, 2e-5, 2e-5)


@pytest.mark.parametrize("T", [1, 7, 64])
def test_flash_oracle_matches_simple_attention(T):
    """For NKV = NH the flash interface is the existing (B,T,3C) attention."""
    rng = np.random.default_rng(T)
    B, NH, hs = 2, 3, 16
    C = NH * hs
    qkv, dout = rand(rng, B, T, 3 * C), rand(rng, B, T, C)
    out, lse, dqkv = run_oracle(qkv, dout, NH, None)
    sout, att = poisoned((B, T, C)), poisoned((B, NH, T, T))
    attention_forward(sout, att, qkv, NH)
    sdqkv = poisoned(qkv.shape)
    attention_backward(sdqkv, dout, qkv, att, NH)
    # two float32 implementations of the same formulas in different orders
    # (probabilities normalised by the sum vs exp(s - lse)): ~1e-6 measured.
    assert_close("flash vs simple out", out, sout, 1e-5, 1e-5)
    assert_close("flash vs simple dqkv", dqkv, sdqkv, 1e-5, 1e-5)
    # and the saved lse reproduces the simple path's probabilities
    q = qkv[..., :C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3).astype(np.float64)
    k = qkv[..., C:2 * C].reshape(B, T, NH, hs).transpose(0, 2, 1, 3).astype(np.float64)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs)
    p = np.where(np.tril(np.ones((T, T), bool)), np.exp(s - lse[..., None]), 0.0)
    assert_close("exp(s - lse) vs att", p, att, 1e-6, 1e-5)


def test_flash_oracle_rejects_bad_input():
    qkv = np.ones((2, 5, 6 * 8), F32)     # NH=4, NKV=1, hs=8
    out, lse = np.empty((2, 5, 32), F32), np.empty((2, 4, 5), F32)
    flash_attention_forward(out, lse, qkv, 4, 1)  # well-formed: no error
    with pytest.raises(ValueError, match="flash_attention_forward.*num_kv_heads=3"):
        flash_attention_forward(out, lse, qkv, 4, 3)
    with pytest.raises(ValueError, match=r"flash_attention_forward.*\(NH\+2\*NKV\)\*hs"):
        flash_attention_forward(out, lse, qkv[..., :47], 4, 1)
    with pytest.raises(ValueError, match=r"flash_attention_forward: lse must have shape \(2, 4, 5\)"):
        flash_attention_forward(out, lse[:, :3], qkv, 4, 1)
    with pytest.raises(ValueError, match=r"flash_attention_backward: dout must have shape \(2, 5, 32\)"):
        flash_attention_backward(np.empty_like(qkv), out[..., :16], qkv, out, lse, 4, 1)


# --- the kernels (version 1: fp32, runs under the emulator) -----------------------

from helpers import KERNEL_BACKENDS, Device  # noqa: E402


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def run_kernels(dev, qkv, dout, NH, NKV, version=1):
    from llmcu.cuda import attention as k
    B, T, _ = qkv.shape
    out, lse = dev.poisoned(dout.shape), dev.poisoned((B, NH, T))
    dqkv_in = dev.put(qkv)
    k.flash_attention_forward(out, lse, dqkv_in, NH, NKV, version=version)
    dqkv = dev.poisoned(qkv.shape)
    k.flash_attention_backward(dqkv, dev.put(dout), dqkv_in, out, lse, NH, NKV, version=version)
    return dev.get(out), dev.get(lse), dev.get(dqkv)


# T crosses tile boundaries (FLASH_TILE = 32): 1, 7 (inside one tile), 64 (exactly two),
# 33/255 (a partial last tile); hs 64 and 128 (FLASH_HS_MAX) and odd 5; GQA NKV < NH.
KERNEL_SHAPES = [  # B, T, NH, NKV, hs
    (2, 1, 2, 2, 64), (2, 7, 4, 4, 64), (1, 64, 2, 2, 128), (3, 33, 4, 2, 5),
    (2, 255, 2, 2, 64), (1, 255, 4, 1, 128), (1, 100, 6, 3, 64),
]


@pytest.mark.parametrize("B,T,NH,NKV,hs", KERNEL_SHAPES)
def test_flash_kernel1_vs_oracle(dev, B, T, NH, NKV, hs):
    rng = np.random.default_rng(B * 7919 + T * 31 + NH * 7 + NKV + hs)
    qkv = rand(rng, B, T, (NH + 2 * NKV) * hs)
    dout = rand(rng, B, T, NH * hs)
    out, lse, dqkv = run_kernels(dev, qkv, dout, NH, NKV)
    rout, rlse, rdqkv = run_oracle(qkv, dout, NH, NKV)
    # fp32 on both sides, summed in different orders (the kernel's online softmax
    # rescales partial sums tile by tile; NumPy uses pairwise sums) with glibc/CUDA
    # expf vs NumPy's exp: rounding noise ~u*sqrt(n) relative on sums of up to T*G
    # O(1) terms (G = NH/NKV query heads per kv head in dk/dv). Measured (emu):
    # out <= 1.2e-6, lse <= 1e-6, dqkv <= 1.1e-5 (G=4, hs=128: 11% of the bound);
    # atol = rtol = 3e-5 keeps a 3x margin there, while a dropped key tile, a mask off by one or a wrong kv head is O(1e-2).
    assert_close(f"flash out T={T}", out, rout, 3e-5, 3e-5)
    assert_close(f"flash lse T={T}", lse, rlse, 3e-5, 3e-5)
    assert_close(f"flash dqkv T={T}", dqkv, rdqkv, 3e-5, 3e-5)


def test_flash_kernel1_long_sequence(dev):
    """T = 1024 (GPT-2's context), one batch row and two heads: 32 query and key
    tiles, so the causal tile skipping and the online softmax's rescaling across
    many tiles are exercised at full length."""
    rng = np.random.default_rng(1024)
    B, T, NH, hs = 1, 1024, 2, 64
    qkv = rand(rng, B, T, 3 * NH * hs)
    dout = rand(rng, B, T, NH * hs)
    out, lse, dqkv = run_kernels(dev, qkv, dout, NH, NH)
    rout, rlse, rdqkv = run_oracle(qkv, dout, NH, NH)
    # as above, sums of up to 1024 terms: measured out 7e-7, lse 1.9e-6, dqkv 4e-6 (emu)
    assert_close("flash out T=1024", out, rout, 3e-5, 3e-5)
    assert_close("flash lse T=1024", lse, rlse, 3e-5, 3e-5)
    assert_close("flash dqkv T=1024", dqkv, rdqkv, 5e-5, 5e-5)


def test_flash_kernel_rejects_bad_input():
    from llmcu.cuda import attention as k
    qkv = np.ones((2, 5, 6 * 8), np.float32)   # NH=4, NKV=1, hs=8
    out, lse = np.empty((2, 5, 32), np.float32), np.empty((2, 4, 5), np.float32)
    with pytest.raises(ValueError, match="flash_attention_forward.*num_kv_heads=3"):
        k.flash_attention_forward(out, lse, qkv, 4, 3)
    with pytest.raises(ValueError, match=r"flash_attention_forward: lse must have shape \(2, 4, 5\)"):
        k.flash_attention_forward(out, lse[:, :3].copy(), qkv, 4, 1)
    with pytest.raises(TypeError, match=r"flash_attention_forward: qkv must have dtype float32 \(fp32\) or "
                                        r"uint16 \(bf16 bit patterns\), got float64"):
        k.flash_attention_forward(out, lse, qkv.astype(np.float64), 4, 1)
    with pytest.raises(ValueError, match=r"flash_attention_forward: head size hs must be in 1\.\.128, got 129"):
        k.flash_attention_forward(np.empty((1, 2, 129), np.float32), np.empty((1, 1, 2), np.float32),
                                  np.ones((1, 2, 3 * 129), np.float32), 1)
    unknown = max(k.FLASH_VERSIONS) + 1     # stays unknown as versions are added
    with pytest.raises(ValueError, match=rf"flash_attention_backward: version must be one of .*, got {unknown}"):
        k.flash_attention_backward(np.empty_like(qkv), out, qkv, out, lse, 4, 1, version=unknown)


# --- GPT-2 uses the fused attention by default ------------------------------------

@pytest.mark.parametrize("attention", ["flash", "simple"])
def test_gpt2_step_with_either_attention_matches_numpy_model(dev, attention):
    """One forward/backward of a tiny GPT-2 on the kernels with each attention against
    the NumPy model (which keeps the simple attention): loss, logits, every gradient."""
    from llmcu.config import GPT2Config, parameter_views
    from llmcu.cpu.gpt2 import GPT2 as CPUGPT2
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.cuda.gpt2 import GPT2
    config = GPT2Config(max_seq_len=48, vocab_size=101, num_layers=2, num_heads=4, channels=64)
    params = init_parameters(config, seed=3)
    rng = np.random.default_rng(11)
    x, y = (rng.integers(0, config.vocab_size, (2, 40)) for _ in range(2))  # T=40: two key tiles
    ours = GPT2(config, params.copy(), device=dev.name, attention=attention)
    ref = CPUGPT2(config, params.copy())
    assert ours.attention == attention
    loss, rloss = ours.forward(x, y), ref.forward(x, y)
    names = {n for n in vars(ours.acts)}
    assert ("lse" in names, "att" in names) == ((True, False) if attention == "flash" else (False, True))
    # fp32 throughout; same bound as tests/test_kernels.py's end-to-end test (1e-5)
    assert_close(f"{attention} logits", dev.get(ours.acts.logits), ref.acts.logits, 1e-5, 1e-5)
    assert abs(loss - rloss) < 1e-5, (loss, rloss)
    ours.zero_grad()
    ref.zero_grad()
    ours.backward()
    ref.backward()
    got = parameter_views(config, dev.get(ours.grads))
    for name, want in ref.g.items():
        scale = float(np.abs(want).max()) or 1.0
        assert_close(f"{attention} grad {name}", got[name] / scale, want / scale, atol=1e-5, rtol=0)


def test_gpt2_rejects_unknown_attention():
    from llmcu.config import GPT2Config
    from llmcu.cuda.gpt2 import GPT2
    config = GPT2Config(max_seq_len=8, vocab_size=11, num_layers=1, num_heads=2, channels=8)
    with pytest.raises(ValueError, match=r"GPT2: attention must be one of \('simple', 'flash'\), got 'fast'"):
        GPT2(config, device="emu", attention="fast")


def test_activation_memory_d12():
    """The flash model's activations lack the (L,B,NH,T,T) probabilities and carry a
    (L,B,NH,T) lse instead: arithmetic on the buffer shapes (not a GPU measurement)."""
    from llmcu.config import gpt2_config
    from llmcu.cuda.gpt2 import activation_bytes, activation_shapes
    config = gpt2_config("d12")
    L, NH, B, T = config.num_layers, config.num_heads, 16, 1024
    simple, flash = activation_bytes(config, B, T, "simple"), activation_bytes(config, B, T, "flash")
    assert simple - flash == 4 * L * B * NH * (T * T - T)
    assert dict(activation_shapes(config, B, T, "flash"))["lse"] == (L, B, NH, T)
    print(f"d12 B=16 T=1024 activations: simple {simple / 2**30:.2f} GiB, flash {flash / 2**30:.2f} GiB "
          f"(arithmetic, not measured)")


# --- version 2: tensor cores, bf16 ------------------------------------------------
#
# On the GPU (cuda) the four tile products run on tensor cores (wmma m16n16k16,
# bf16 in, fp32 accumulate); under the emulator (emu) that one function
# (flash2_warp_mma) is scalar fp32 code, everything else in the kernels is the
# same source. So the emu runs check the tiling, masking, online softmax and
# bf16 rounding; only the cuda runs check the tensor-core instructions: they are
# GPU-only and skip without a GPU.

from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits  # noqa: E402


def bf16_round(a):
    return bf16_bits_to_float32(float32_to_bf16_bits(np.asarray(a, np.float32)))


def simple_bf16_reference(qkv, dout, NH, NKV):
    """llmcu's simple attention path in bf16, as a NumPy model: every tensor that path
    stores (q k^T, the probabilities, y, out, datt, dpreatt, dq, dk, dv) rounded to bf16,
    the GEMMs and reductions in fp32 (cuBLAS's bf16 GEMMs accumulate in fp32).
    qkv, dout: float32 holding bf16 values. Returns out, dqkv (float32, bf16 values)."""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    G = NH // NKV
    q = qkv[..., :NH * hs].reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    k, v = (qkv[..., a:a + NKV * hs].reshape(B, T, NKV, hs).transpose(0, 2, 1, 3).repeat(G, axis=1)
            for a in (NH * hs, (NH + NKV) * hs))
    scale = np.float32(1.0 / np.sqrt(hs))
    mask = np.triu(np.ones((T, T), bool), k=1)
    pre = bf16_round(q @ k.transpose(0, 1, 3, 2))
    s = np.where(mask, -np.inf, pre * scale)
    e = np.exp(s - s.max(-1, keepdims=True))
    att = bf16_round(e / e.sum(-1, keepdims=True))
    y = bf16_round(att @ v)
    out = y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    datt = bf16_round(dy @ v.transpose(0, 1, 3, 2))
    dpre = bf16_round(scale * att * (datt - (datt * att).sum(-1, keepdims=True)))
    dq = bf16_round(dpre @ k)
    dk = bf16_round((dpre.transpose(0, 1, 3, 2) @ q).reshape(B, NKV, G, T, hs).sum(2))
    dv = bf16_round((att.transpose(0, 1, 3, 2) @ dy).reshape(B, NKV, G, T, hs).sum(2))
    dqkv = np.concatenate([dq.transpose(0, 2, 1, 3).reshape(B, T, -1), dk.transpose(0, 2, 1, 3).reshape(B, T, -1),
                           dv.transpose(0, 2, 1, 3).reshape(B, T, -1)], axis=-1)
    return out, dqkv


def run_kernels_bf16(dev, qkv, dout, NH, NKV, version=2, schedule="grouped"):
    from llmcu.cuda import attention as k
    B, T, _ = qkv.shape
    qkv_bits, dout_bits = float32_to_bf16_bits(qkv), float32_to_bf16_bits(dout)
    out = dev.put(np.full(dout.shape, 0x7FC0, np.uint16))      # bf16 NaN: poisoned
    lse = dev.poisoned((B, NH, T))
    dqkv = dev.put(np.full(qkv.shape, 0x7FC0, np.uint16))
    dqkv_in, dout_in = dev.put(qkv_bits), dev.put(dout_bits)
    k.flash_attention_forward(out, lse, dqkv_in, NH, NKV, version=version, schedule=schedule)
    k.flash_attention_backward(dqkv, dout_in, dqkv_in, out, lse, NH, NKV, version=version, schedule=schedule)
    return (bf16_bits_to_float32(dev.get(out)), dev.get(lse), bf16_bits_to_float32(dev.get(dqkv)))


def split_heads(dqkv, NH, NKV):
    hs = dqkv.shape[-1] // (NH + 2 * NKV)
    return {"dq": dqkv[..., :NH * hs], "dk": dqkv[..., NH * hs:(NH + NKV) * hs],
            "dv": dqkv[..., (NH + NKV) * hs:]}


def check_bf16_against_simple(name, dev, B, T, NH, NKV, hs, seed, version=2):
    rng = np.random.default_rng(seed)
    qkv = bf16_round(rand(rng, B, T, (NH + 2 * NKV) * hs))   # bf16 inputs, exactly representable
    dout = bf16_round(rand(rng, B, T, NH * hs))
    out, lse, dqkv = run_kernels_bf16(dev, qkv, dout, NH, NKV, version)
    rout, rlse, rdqkv = run_oracle(qkv, dout, NH, NKV)        # the fp32 oracle on the same inputs
    sout, sdqkv = simple_bf16_reference(qkv, dout, NH, NKV)
    # lse is fp32 from fp32 scores of bf16 inputs: only summation-order noise
    assert_close(f"{name} lse", lse, rlse, 1e-4, 1e-4)
    got = {"out": out, **split_heads(dqkv, NH, NKV)}
    want = {"out": rout, **split_heads(rdqkv, NH, NKV)}
    simple = {"out": sout, **split_heads(sdqkv, NH, NKV)}
    for key in got:
        assert not np.isnan(got[key]).any(), f"{name} {key}: NaN (unwritten or overflow)"
        err = float(np.abs(got[key] - want[key]).max())
        simple_err = float(np.abs(simple[key] - want[key]).max())
        # The bound: no worse than twice the simple bf16 path's error against
        # the fp32 oracle. One bf16 rounding of the largest value (2^-8 relative) is
        # allowed as a floor, for shapes where the simple path happens to be exact
        # (T = 1: its softmax is exactly 1).
        floor = 2.0 ** -8 * float(np.abs(want[key]).max())
        # ... and fp32 summation noise where the exact answer is 0 (T = 1: dq = 0 exactly,
        # from dp - D with dp = dout . v and D = dout . out summed in different orders):
        # hs terms of size |dout| |v|, each rounded at 2^-24, times |k| in dq.
        floor = max(floor, 2.0 ** -24 * hs * float(np.abs(dout).max()) * float(np.abs(qkv).max()) ** 2)
        print(f"{name} {key}: max err {err:.3e}, simple bf16 path {simple_err:.3e}")
        assert err <= max(2 * simple_err, floor), (name, key, err, simple_err, floor)


@pytest.mark.parametrize("B,T,NH,NKV,hs", [
    (2, 1, 2, 2, 64), (2, 7, 4, 4, 64), (1, 64, 2, 2, 128), (2, 100, 4, 2, 64), (1, 255, 2, 1, 128),
    (1, 1024, 2, 2, 64),  # GPT-2's T: 16 tiles of 64 (about 3 s under emu)
])
def test_flash_kernel2_bf16_vs_oracle(dev, B, T, NH, NKV, hs):
    check_bf16_against_simple(f"flash2 T={T} hs={hs}", dev, B, T, NH, NKV, hs, seed=T * 10 + hs)


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("llmcu.cuda", fromlist=["is_available"]).is_available(),
                    reason="no CUDA GPU with CuPy here")
@pytest.mark.parametrize("hs", [64, 128])
def test_flash_kernel2_bf16_gpt2_length_cuda(hs):
    """T = 1024 at several heads on the GPU only (the emulator would take minutes)."""
    check_bf16_against_simple(f"flash2 T=1024 hs={hs}", Device("cuda"), 2, 1024, 4, 4 if hs == 64 else 2,
                              hs, seed=hs)


def test_flash_kernel2_rejects_bad_input():
    from llmcu.cuda import attention as k
    qkv = np.zeros((1, 4, 3 * 2 * 32), np.uint16)  # hs = 32: not a version-2 head size
    with pytest.raises(ValueError, match=r"flash_attention_forward: version 2 needs head size hs in \(64, 128\), got 32"):
        k.flash_attention_forward(np.zeros((1, 4, 64), np.uint16), np.zeros((1, 2, 4), np.float32), qkv, 2,
                                  version=2)
    with pytest.raises(TypeError, match="flash_attention_forward: qkv must have dtype uint16, got float32"):
        k.flash_attention_forward(np.zeros((1, 4, 128), np.uint16), np.zeros((1, 2, 4), np.float32),
                                  np.zeros((1, 4, 3 * 128), np.float32), 2, version=2)


@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 7, 4, 4, 64), (1, 100, 4, 2, 128)])
def test_flash_kernel1_bf16_vs_oracle(dev, B, T, NH, NKV, hs):
    """Version 1 built with floatX = bf16 (what a bf16 GPT-2 runs when version 2 does not
    apply): bf16 loads and stores, fp32 arithmetic; same bound as version 2."""
    check_bf16_against_simple(f"flash1 bf16 T={T} hs={hs}", dev, B, T, NH, NKV, hs, seed=T + hs, version=1)


@pytest.mark.parametrize("version", [1, 2])
def test_flash_kernels_deterministic(dev, version):
    """No atomics: two runs give bit-identical outputs and gradients."""
    rng = np.random.default_rng(5)
    qkv, dout = rand(rng, 2, 70, 8 * 64), rand(rng, 2, 70, 4 * 64)
    run = run_kernels if version == 1 else run_kernels_bf16
    first = run(dev, qkv, dout, 4, 2)
    second = run(dev, qkv, dout, 4, 2)
    for a, b in zip(first, second):
        assert np.array_equal(a, b, equal_nan=False)


def test_auto_version_picks_tensor_cores_only_for_bf16_hs64_on_a_gpu():
    """version="auto" (the default): version 2 where it is faster and fits (bf16, hs=64,
    a GPU); version 1 everywhere else, including every emulated call."""
    from llmcu import cuda as llmcu_cuda
    from llmcu.cuda.attention import pick_flash_version
    bf16 = np.zeros((1, 4, 3 * 2 * 64), np.uint16)
    fp32 = np.zeros((1, 4, 3 * 2 * 64), np.float32)
    assert pick_flash_version(bf16, 2) == 1 and pick_flash_version(fp32, 2) == 1  # emu arrays
    assert pick_flash_version(bf16, 2, version=2) == 2  # explicit wins
    if llmcu_cuda.is_available():
        import cupy
        assert pick_flash_version(cupy.asarray(bf16), 2) == 2
        assert pick_flash_version(cupy.asarray(fp32), 2) == 1
        assert pick_flash_version(cupy.zeros((1, 4, 3 * 2 * 128), np.uint16), 2) == 1
