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
