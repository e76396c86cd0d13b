"""llmcu: GPT-2 training from Python, every layer written out by hand.

Importing llmcu touches no GPU and needs neither CuPy nor PyTorch.
"""

import os

__version__ = "0.1.0"

# OpenBLAS's idle worker threads spin for 2^28 cycles (~0.1 s) after each GEMM, on the cores the
# CPU backend's element-wise threads (llmcu/cpu/threads.py) run on next: a d12 AdamW took 174-182
# ms right after a GEMM against 136-140 ms after a pause. 2^4 cycles puts them to sleep at once
# (AdamW 139-146 ms after a GEMM; d12 step 1432 against 1549 ms, interleaved, 2 threads). OpenBLAS
# reads this when it loads, so it is set before anything here imports NumPy; a user's value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
