"""The GPT-2 step on the product kernels (llmcu/cuda/gpt2.py) against the NumPy model
(llmcu/cpu/gpt2.py), the end-to-end check of the layers' kernels together: logits, loss,
every gradient and the parameters after AdamW steps. The kernel model runs the fused
attention (version 1 in fp32), the cuBLASLt epilogues and the fused residual + layernorm
ops; the NumPy model composes the same ops from its plain functions and keeps the simple
attention (tests/kernels/test_attention.py checks the two attentions agree). bf16 training
against the fp32 oracle at head size 16 is tests/test_bf16_training.py's; here bf16 at head
size 64, where the step runs the tensor-core attention (version 3).
"""

import numpy as np
import pytest

from helpers import assert_close
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu.gpt2 import GPT2 as Oracle
from llmcu.cpu.gpt2 import init_parameters


def test_gpt2_fp32_steps_match_the_numpy_model(dev, launch_args):
    """3 AdamW steps (weight decay, clipping) of a tiny fp32 GPT-2 with T = 40 (two 32-row
    attention tiles). Tolerance: fp32 throughout, each layer's kernels within 1e-5 of the
    oracle (tests/helpers.py F32), so the logits and the loss within 1e-5, each gradient
    tensor within 1e-5 of its own max |g|, the parameters after 3 steps within 1e-5."""
    from llmcu.cuda.gpt2 import GPT2
    config = GPT2Config(max_seq_len=48, vocab_size=101, num_layers=2, num_heads=4, channels=64)
    params = init_parameters(config, seed=3)
    rng = np.random.default_rng(11)
    x, y = (rng.integers(0, config.vocab_size, (2, 40)) for _ in range(2))
    ours, ref = GPT2(config, params.copy(), device=dev.name), Oracle(config, params.copy())
    for step in range(1, 4):
        loss, rloss = ours.forward(x, y), ref.forward(x, y)
        if step == 1:
            assert_close("logits", dev.get(ours.acts.logits), ref.acts.logits, atol=1e-5, rtol=1e-5)
        assert abs(loss - rloss) < 1e-5, (step, loss, rloss)
        ours.zero_grad()
        ref.zero_grad()
        ours.backward()
        ref.backward()
        if step == 1:
            got = parameter_views(config, dev.get(ours.grads))
            for name, want in ref.g.items():
                scale = float(np.abs(want).max()) or 1.0
                assert_close(f"grad {name}", got[name] / scale, want / scale, atol=1e-5, rtol=0)
        n1 = ours.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        n2 = ref.update(1e-3, step, weight_decay=0.1, grad_clip=1.0)
        assert abs(n1 - n2) <= 1e-5 * n2, (step, n1, n2)
    assert_close("params after 3 steps", ours.params_host(), ref.params, atol=1e-5, rtol=1e-5)
    assert "attention_flash_forward_kernel1" in {launch.kernel for launch in launch_args}


@pytest.mark.slow
def test_gpt2_bf16_with_tensor_core_attention_trains_like_the_oracle(dev, launch_args):
    """A tiny bf16 GPT-2 with head size 64 (C = 128, NH = 2), T = 70 (two 64-row tiles, the
    second partial): its attention runs version 3, and its 10 AdamW steps' losses stay
    within llm.c's bf16 tolerance 0.05 of the fp32 NumPy model's from the same init, and
    fall (it learns)."""
    from llmcu.cuda.gpt2 import GPT2
    cfg = GPT2Config(max_seq_len=80, vocab_size=300, num_layers=2, num_heads=2, channels=128)
    B, T = 2, 70
    p0 = init_parameters(cfg, seed=1)
    batches = np.random.default_rng(2).integers(0, 40, size=(3, B, T + 1)).astype(np.int32)

    def run(model, steps=10):
        losses = []
        for s in range(steps):
            x, y = batches[s % 3, :, :-1], batches[s % 3, :, 1:]
            losses.append(model.forward(x, y))
            model.zero_grad()
            model.backward()
            model.update(1e-2, s + 1, weight_decay=0.1, grad_clip=1.0)
        return np.array(losses)

    ref = run(Oracle(cfg, p0.copy()))
    losses = run(GPT2(cfg, p0.copy(), device=dev.name, dtype="bf16"))
    kernels = {launch.kernel for launch in launch_args if launch.kernel.startswith("attention_flash")}
    assert kernels == {"attention_flash_forward_kernel3", "attention_flash_backward_preprocess_kernel1",
                       "attention_flash_backward_dq_kernel3", "attention_flash_backward_dkdv_kernel3"}, kernels
    diff = np.abs(losses - ref).max()
    print(f"bf16 GPT-2 (attention version 3) vs fp32 oracle: max loss difference {diff:.4f}; "
          f"fp32 {ref[0]:.3f} -> {ref[-1]:.3f}")
    assert np.all(np.isfinite(losses)) and diff < 0.05, (losses, ref)
    assert losses[-1] < losses[0] - 1.0, losses
