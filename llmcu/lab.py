"""The kernel lab's two shared pieces (kernels/README.md, "The lab"): the record that
describes a lab version, and the loader of a layer's lab module, kernels/dev/<layer>.py
(a source checkout's; the wheel ships no lab). benchmarks/lab.py and tests/lab/ use both.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

from .cuda.runtime import kernels_dir


@dataclass(frozen=True)
class Version:
    about: str                        # one line: what it is
    ops: dict                         # op name (the oracle's / product's function) -> callable
    dtypes: tuple = ("fp32", "bf16")  # the floatX it runs
    kernels: tuple = field(default=())  # the lab kernels it launches (kernels/dev/<layer>.cu)
    scheduled: bool = False           # takes schedule= ("grouped" / "heavy_first"; attention)


def load(layer: str):
    """kernels/dev/<layer>.py as a fresh module (kernels/dev/ is not a package; each call
    runs the file again, so a caller may change its VERSIONS without touching another's)."""
    path = kernels_dir() / "dev" / f"{layer}.py"
    if not path.is_file():
        raise FileNotFoundError(f"the {layer!r} lab: {path} not found (the lab lives in a source "
                                f"checkout's kernels/dev/; layers there: "
                                f"{', '.join(sorted(p.stem for p in path.parent.glob('*.py'))) or 'none'})")
    spec = importlib.util.spec_from_file_location(f"llmcu_lab_{layer}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a module up there
    spec.loader.exec_module(module)
    return module
