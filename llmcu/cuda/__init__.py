"""The CUDA backend: hand-written kernels in kernels/*.cu, launched through CuPy.

Nothing here touches the GPU at import time; `is_available()` never raises.
The same wrappers run the kernels on the CPU through llmcu.emu when given
NumPy arrays (the "emu" device), which is how CI tests them without a GPU.
"""


def is_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
