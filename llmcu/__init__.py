"""llmcu: GPT-2 training from Python, every layer written out by hand.

Importing llmcu touches no GPU and needs neither CuPy nor PyTorch.
"""

__version__ = "0.1.0"
