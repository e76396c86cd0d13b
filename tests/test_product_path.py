"""The product path (kernels/README.md): the training step runs one kernel per op, the
same on the GPU and the emulator, and that set is the product table (GPT2.kernel_table,
llmcu/cuda/gpt2.py step_kernels). These tests spy on every kernel launch and every GEMM
library call of one emulated step and compare them with the table both ways: a kernel
the step launches that the table does not list fails, and so does a listed one it
never launches."""

import re
from pathlib import Path

import numpy as np
import pytest

from llmcu.config import GPT2Config
from llmcu.cuda import gpt2 as kgpt2
from llmcu.cuda import matmul as kmatmul
from llmcu.cuda import runtime

KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# bf16 at head size 64: the tensor-core attention (version 3), as GPT-2 124M on a GPU.
HS64 = GPT2Config(max_seq_len=32, vocab_size=300, num_layers=2, num_heads=2, channels=128)
# fp32 with GPT-2's head size: attention version 1 (fp32 has no tensor-core version).
FP32 = GPT2Config(max_seq_len=32, vocab_size=300, num_layers=2, num_heads=2, channels=128)


def _epilogue(kwargs):
    if kwargs.get("gelu_aux") is not None:
        return "GELU_AUX_BIAS"
    if kwargs.get("dgelu_aux") is not None:
        return "DGELU"
    if kwargs.get("a_row_sums") is not None:
        return "BGRADB"
    return "BIAS" if kwargs.get("bias") is not None else "DEFAULT"


def _spied_step(monkeypatch, config, dtype):
    """The set of "<stem>:<kernel>" launches and "cublaslt:<epilogue>" / "cublas:gemm" calls
    of one forward, backward and clipped AdamW update of a kernel model on the emulator."""
    seen = set()
    launch = runtime.Backend.launch

    def spy_launch(self, stem, kernel, *args, **kwargs):
        seen.add(f"{stem}:{kernel}")
        return launch(self, stem, kernel, *args, **kwargs)

    lt, gemm = kmatmul.lt_matmul, kmatmul.gemm

    def spy_lt(*args, **kwargs):
        seen.add(f"cublaslt:{_epilogue(kwargs)}")
        return lt(*args, **kwargs)

    def spy_gemm(*args, **kwargs):
        seen.add("cublas:gemm")
        return gemm(*args, **kwargs)

    monkeypatch.setattr(runtime.Backend, "launch", spy_launch)
    monkeypatch.setattr(kmatmul, "lt_matmul", spy_lt)
    monkeypatch.setattr(kmatmul, "gemm", spy_gemm)
    model = kgpt2.GPT2(config, device="emu", dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(2, 17))
    model.zero_grad()
    model.forward(tokens[:, :-1], tokens[:, 1:])
    model.backward()
    model.update(1e-3, 1, weight_decay=0.1, grad_clip=1.0)
    return seen, model


@pytest.mark.parametrize("config,dtype", [(HS64, "bf16"), (FP32, "fp32")], ids=["bf16-hs64", "fp32"])
def test_step_launches_exactly_the_product_table(monkeypatch, config, dtype):
    seen, model = _spied_step(monkeypatch, config, dtype)
    table = model.kernel_table()
    listed = {entry for entries in table.values() for entry in entries}
    assert seen - listed == set(), f"the step ran what its table does not list: {sorted(seen - listed)}"
    assert listed - seen == set(), f"the table lists what the step never ran: {sorted(listed - seen)}"
    attention = 3 if dtype == "bf16" else 1
    assert f"attention:attention_flash_forward_kernel{attention}" in seen
    assert not any(k.startswith("dev/") for k in seen), "the step launched a lab kernel"


def test_every_table_kernel_is_a_product_kernel():
    """Each kernel of the table is defined in its product file (not only in the lab)."""
    for config, dtype in ((HS64, "bf16"), (FP32, "fp32")):
        for entries in kgpt2.step_kernels(config, dtype).values():
            for entry in entries:
                stem, name = entry.split(":")
                if stem in ("cublaslt", "cublas"):
                    continue
                source = (KERNELS / f"{stem}.cu").read_text()
                assert re.search(rf'extern\s+"C"\s+__global__\s+void\s+{name}\s*\(', source), entry


def test_product_files_stay_small():
    """The issue's limits: at most 40 kernels in kernels/*.cu (the lab's kernels/dev/ not
    counted) and attention.cu at most 900 lines."""
    count = sum(len(re.findall(r'extern\s+"C"\s+__global__', f.read_text())) for f in KERNELS.glob("*.cu"))
    assert count <= 40, f"kernels/*.cu define {count} kernels; the product path holds at most 40"
    lines = len((KERNELS / "attention.cu").read_text().splitlines())
    assert lines <= 900, f"kernels/attention.cu has {lines} lines, at most 900"
