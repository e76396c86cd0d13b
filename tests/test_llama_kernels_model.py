"""The Llama orchestrator on the kernels (llmcu/cuda/llama.py) against the NumPy
Llama (llmcu/cpu/llama.py), step by step: logits, loss, every gradient, and
the parameters after three AdamW steps with weight decay and clipping.

Runs on the emulator always (the exact .cu sources on the CPU) and on a real
GPU when one is there. Tiny shapes keep the emulation quick: B=2, T=7 (not a
multiple of any tile), a Llama with grouped-query attention and an untied
head, and a Gemma (GeGLU, 1 + weight norms, scaled embeddings, multi-query
attention, head_dim != C/NH).

Tolerances: both sides are float32; the kernels sum in other orders (warp
reductions, tiled attention with an online softmax), which moves results by
a few float32 ulps of the largest terms. Measured max |diff| (emu): logits
4e-6 (the random weights of std 0.3 give logits up to ~5), gradients 1e-7 of
a tensor's largest element, parameters after three steps 2e-6. Asserted:
2e-5 absolute on the logits, 1e-6 relative on the loss, 1e-5 of each
tensor's largest gradient element, and 1e-5 absolute on parameters after
AdamW at lr 1e-3 (each step moves an element by up to ~lr, so a wrong update
is off by ~1e-3).
"""

import numpy as np
import pytest

from llmcu.config import parameter_views
from llmcu.llama_config import LlamaConfig, gemma_options

from helpers import KERNEL_BACKENDS, assert_close

CONFIGS = {
    "llama": LlamaConfig(max_seq_len=16, vocab_size=60, num_layers=2, num_heads=4, num_kv_heads=2,
                         channels=16, hidden_dim=24, tie_embeddings=False),
    "gemma": LlamaConfig(max_seq_len=16, vocab_size=60, num_layers=1, num_heads=2, num_kv_heads=1,
                         channels=16, head_dim=12, hidden_dim=20, norm_eps=1e-6, **gemma_options(16)),
}
B, T = 2, 7


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _params(config):
    """Random parameters, norm weights too (an offset or swapped norm shows)."""
    from llmcu.cpu.llama import init_parameters
    flat = init_parameters(config, seed=1)
    p = parameter_views(config, flat)
    rng = np.random.default_rng(2)
    for name, _ in config.parameter_shapes():
        rows = p[name][:config.vocab_size] if name in ("wte", "lm_head") else p[name]
        rows[...] = (0.3 * rng.standard_normal(rows.shape)).astype(np.float32)
    return flat


@pytest.mark.parametrize("device", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_llama_steps_match_numpy(name, device):
    from llmcu.cpu.llama import Llama
    from llmcu.cuda.llama import Llama as KernelLlama
    config = CONFIGS[name]
    params = _params(config)
    ref = Llama(config, params.copy())
    ker = KernelLlama(config, params.copy(), device=device)
    rng = np.random.default_rng(3)
    for step in range(1, 4):
        x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
        y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
        ref.zero_grad()
        ker.zero_grad()
        if ker.acts is not None:  # poison the activations: anything the step does not write shows
            ker.acts.memory.fill(np.nan)
        loss_ref = ref.forward(x, y)
        loss = ker.forward(x, y)
        assert_close(f"step {step} logits", _host(ker.acts.logits)[..., :config.vocab_size],
                     ref.acts.logits[..., :config.vocab_size], atol=2e-5, rtol=0)
        assert abs(loss - loss_ref) <= 1e-6 * abs(loss_ref), (step, loss, loss_ref)
        ref.backward()
        ker.backward()
        if step == 1:
            got, want = parameter_views(config, _host(ker.grads)), ref.g
            for tensor, _ in config.parameter_shapes():
                scale = float(np.abs(want[tensor]).max())
                assert scale > 0, tensor
                assert_close(f"grad {tensor}", got[tensor], want[tensor], atol=1e-5 * scale, rtol=0)
        norm_ref = ref.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        norm = ker.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        assert abs(norm - norm_ref) <= 1e-5 * norm_ref, (step, norm, norm_ref)
    assert norm_ref > 1.0  # the clip was active
    got = parameter_views(config, _host(ker.params))
    moved = max(float(np.abs(ref.p[t] - parameter_views(config, params)[t]).max())
                for t, _ in config.parameter_shapes())
    assert moved > 1e-3
    for tensor, _ in config.parameter_shapes():
        assert_close(f"param {tensor} after 3 steps", got[tensor], ref.p[tensor], atol=1e-5, rtol=0)


def test_kernel_llama_sampler_shares_parameters():
    from llmcu.cuda.llama import Llama as KernelLlama
    config = CONFIGS["gemma"]
    ker = KernelLlama(config, _params(config), device="emu")
    s = ker.sampler()
    assert s.params is ker.params and s.acts is None
    with pytest.raises(ValueError, match="device"):
        KernelLlama(config, device="cpu")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernel_llama_first_backward_after_zero_grad_overwrites(name):
    """As the kernel GPT-2's: the first backward after zero_grad overwrites the GEMM weight
    gradients (NaN put there after zero_grad is gone) and equals, bit for bit, the same
    backward adding onto zeros; a second micro-step adds, equal to the all-adding run.
    Covers tied (gemma: the head's gradient is wte's, which encoder_backward then adds to)
    and untied (llama: lm_head) embeddings."""
    from llmcu.cuda.llama import Llama as KernelLlama
    config = CONFIGS[name]
    params = _params(config)
    rng = np.random.default_rng(7)
    batches = [rng.integers(0, config.vocab_size, (B, T + 1)).astype(np.int32) for _ in range(2)]
    fast = KernelLlama(config, params.copy(), device="emu")
    slow = KernelLlama(config, params.copy(), device="emu")
    gemm_grads = ["qkvw", "attprojw", "fcw", "fcprojw", "lm_head" if not config.tie_embeddings else "wte"]
    for model in (fast, slow):
        model.forward(batches[0][:, :-1], batches[0][:, 1:])
        model.zero_grad()
    for g in gemm_grads:
        fast.g[g][...] = np.nan
    slow._grads_zeroed = False  # the adding path
    for model in (fast, slow):
        model.backward(loss_scale=0.5)
    assert np.isfinite(_host(fast.grads)).all()
    np.testing.assert_array_equal(_host(fast.grads), _host(slow.grads))
    for model in (fast, slow):
        model.forward(batches[1][:, :-1], batches[1][:, 1:])
        model.backward(loss_scale=0.5)
    np.testing.assert_array_equal(_host(fast.grads), _host(slow.grads))
