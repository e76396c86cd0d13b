"""Shared test fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data directory (../shared from the repo, or $LLMCU_SHARED_DIR)."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    path = Path(os.environ.get("LLMCU_SHARED_DIR") or default)
    if not path.is_dir():
        if os.environ.get("CI"):  # in CI the data must be there: a skip would hide the tests
            pytest.fail(f"shared data directory {path} not found (CI is set); set LLMCU_SHARED_DIR")
        pytest.skip(f"shared data directory {path} not found; set LLMCU_SHARED_DIR to it")
    return path


@pytest.fixture
def launches(monkeypatch):
    """The names of the kernels launched during the test, in order (a spy on
    llmcu.cuda.runtime.Backend.launch, patched on the class so no instance keeps it)."""
    from llmcu.cuda import runtime
    names = []
    real = runtime.Backend.launch

    def spy(self, stem, kernel, *args, **kwargs):
        names.append(kernel)
        return real(self, stem, kernel, *args, **kwargs)
    monkeypatch.setattr(runtime.Backend, "launch", spy)
    return names
