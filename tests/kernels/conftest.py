"""Fixtures of the product-kernel tests (one file per layer, tests/kernels/test_<layer>.py).

dev: the kernel backend under test, "emu" (the .cu sources on the CPU; always, what CI
runs, also under LLMCU_EMU_ORDER=warps and warps-reverse) and "cuda" (a GPU through
CuPy; marked `cuda`, skipped without one): tests/helpers.py's Device.
launch_args: every launch of the test, in order, as Launch(kernel, args, grid, block), so
a test can check which path ran (a kernel name, a `wide` flag, a grid) as well as what it
computed.
emu_order: run what follows under another emulator fiber order (for determinism tests).
"""

from collections import namedtuple

import pytest

from helpers import KERNEL_BACKENDS, Device


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


Launch = namedtuple("Launch", "kernel args grid block")


@pytest.fixture
def launch_args(monkeypatch):
    from llmcu.cuda import runtime
    seen = []
    real = runtime.Backend.launch

    def spy(self, stem, kernel, grid, block, args, *rest, **kwargs):
        seen.append(Launch(kernel, tuple(args), tuple(grid), tuple(block)))
        return real(self, stem, kernel, grid, block, args, *rest, **kwargs)
    monkeypatch.setattr(runtime.Backend, "launch", spy)  # on the class: no instance keeps it
    return seen


@pytest.fixture
def emu_order(monkeypatch):
    """emu_order("random") runs the emulator's later launches with a block's fibers in a
    random order (LLMCU_EMU_ORDER, read at every launch); undone after the test."""
    return lambda order: monkeypatch.setenv("LLMCU_EMU_ORDER", order)
