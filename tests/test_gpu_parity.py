"""End to end on a real GPU: 10 steps of d12 at B=4, T=64 (fp32, TF32 off) on
the CUDA kernels against the NumPy model from the same init and batch.

Tolerances are llm.c's FP32 CUDA test (test_gpt2.cu): logits 1e-3, loss 1e-5,
losses 1e-2;
gradients are compared relative to each tensor's largest entry.
The same test at a tiny size runs in CI through the emulation
(tests/kernels/test_gpt2.py).
"""

import numpy as np
import pytest

from helpers import assert_close
from llmcu import cuda as llmcu_cuda
from llmcu.config import gpt2_config, parameter_views
from llmcu.cpu.gpt2 import GPT2 as CPUGPT2
from llmcu.cpu.gpt2 import init_parameters

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not llmcu_cuda.is_available(), reason="no CUDA GPU with CuPy here")]


def test_d12_ten_steps_match_numpy():
    import cupy
    from llmcu.cuda.gpt2 import GPT2
    config = gpt2_config("d12")
    params = init_parameters(config, seed=42)
    rng = np.random.default_rng(1234)
    x = rng.integers(0, config.vocab_size, (4, 64))
    y = rng.integers(0, config.vocab_size, (4, 64))
    gpu, ref = GPT2(config, params.copy(), device="cuda"), CPUGPT2(config, params.copy())
    losses, rlosses = [], []
    for step in range(1, 11):
        losses.append(gpu.forward(x, y))
        rlosses.append(ref.forward(x, y))
        if step == 1:
            d = assert_close("logits", gpu.acts.logits, ref.acts.logits, atol=1e-3, rtol=0)
            print(f"logits max|diff| {d:.3e}; loss {losses[0]:.6f} vs {rlosses[0]:.6f}")
            assert abs(losses[0] - rlosses[0]) < 1e-5
        gpu.zero_grad()
        ref.zero_grad()
        gpu.backward()
        ref.backward()
        if step == 1:
            got = parameter_views(config, cupy.asnumpy(gpu.grads))
            for name, want in ref.g.items():
                scale = float(np.abs(want).max()) or 1.0
                d = assert_close(f"grad {name}", got[name] / scale, want / scale, atol=1e-3, rtol=0)
                print(f"grad {name:9s} max|diff|/max|g| {d:.3e}")
        gpu.update(1e-4, step)
        ref.update(1e-4, step)
    print("losses gpu  ", " ".join(f"{v:.6f}" for v in losses))
    print("losses numpy", " ".join(f"{v:.6f}" for v in rlosses))
    assert np.max(np.abs(np.array(losses) - np.array(rlosses))) < 1e-2
