"""The encoder lab's launch code: the versions of kernels/dev/encoder.cu behind the product
wrapper's signature (llmcu/cuda/encoder.py, and the oracle llmcu/cpu/encoder.py):

    encoder_backward(dwte, dwpe, dout, inp)

Shapes: inp (B,T) int32, dwte (Vp,C), dwpe (maxT,C), dout (B,T,C), all floatX (float32, or
uint16 bf16 bits: dwte's dtype picks the build). Parameter gradients accumulate (+=).

  1: encoder_backward_kernel1, one thread per channel walking all B*T positions in order
     (blockIdx.y 0: dwte, 1: dwpe; 2*C threads in all): deterministic without atomics, the
     oracle's np.add.at order; with bf16 dwte a token seen n times is rounded n times.
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

from dataclasses import dataclass, field

import numpy as np

from llmcu.cuda.runtime import FLOATX_NAMES, backend_of, check_array, floatx_dtype, i32, launch_config

STEM = "dev/encoder"


def encoder_backward1(dwte, dwpe, dout, inp):
    fn = "encoder_backward"
    be = backend_of(dout)
    check_array(fn, "inp", inp, be, dtype=np.int32)
    if inp.ndim != 2:
        raise ValueError(f"{fn}: inp must be (B,T), got shape {inp.shape}")
    B, T = inp.shape
    dt = floatx_dtype(fn, "dwte", dwte)
    check_array(fn, "dwte", dwte, be, dtype=dt)
    check_array(fn, "dwpe", dwpe, be, dtype=dt)
    if dwte.ndim != 2 or dwpe.ndim != 2 or dwte.shape[1] != dwpe.shape[1]:
        raise ValueError(f"{fn}: dwte (Vp,C) and dwpe (maxT,C) must share C, got {dwte.shape} and {dwpe.shape}")
    C = dwte.shape[1]
    if T > dwpe.shape[0]:
        raise ValueError(f"{fn}: T={T} exceeds maxT={dwpe.shape[0]}")
    check_array(fn, "dout", dout, be, dtype=dt, shape=(B, T, C))
    grid, block = launch_config(C, grid_y=2)  # blockIdx.y: 0 -> dwte, 1 -> dwpe
    be.launch(STEM, "encoder_backward_kernel1", grid, block,
              (dwte, dwpe, dout, inp, i32(B), i32(T), i32(C)), floatX=FLOATX_NAMES[dt])


@dataclass(frozen=True)
class Version:
    about: str                        # one line: what it is
    ops: dict                         # op name (the oracle's / product's function) -> callable
    dtypes: tuple = ("fp32", "bf16")  # the floatX it runs
    kernels: tuple = field(default=())  # lab kernels it launches


VERSIONS = {
    1: Version("backward: a thread per channel walks every position in order (2*C threads, no atomics)",
               {"encoder_backward": encoder_backward1}, kernels=("encoder_backward_kernel1",)),
}
