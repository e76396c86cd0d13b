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


from llmcu.cuda.encoder import _check
from llmcu.cuda.runtime import backend_of, i32, launch_config
from llmcu.lab import Version

STEM = "dev/encoder"


def encoder_backward1(dwte, dwpe, dout, inp):
    fn = "encoder_backward"
    be = backend_of(dout)
    B, T, C, floatX = _check(fn, be, dout, inp, dwte, dwpe)  # the product wrapper's checks
    grid, block = launch_config(C, grid_y=2)  # blockIdx.y: 0 -> dwte, 1 -> dwpe
    be.launch(STEM, "encoder_backward_kernel1", grid, block,
              (dwte, dwpe, dout, inp, i32(B), i32(T), i32(C)), floatX=floatX)


VERSIONS = {
    1: Version("backward: a thread per channel walks every position in order (2*C threads, no atomics)",
               {"encoder_backward": encoder_backward1}, kernels=("encoder_backward_kernel1",)),
}
