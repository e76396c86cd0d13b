"""The matmul lab's launch code: the versions of kernels/dev/matmul.cu behind the product
wrappers' signatures (llmcu/cuda/matmul.py, and the oracle llmcu/cpu/matmul.py):

    matmul_forward(out, inp, weight, bias=None)
    matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate_weight=True)
    matmul_bias_backward(dbias, dout, accumulate=True)     (the product's; no oracle function)

Shapes: inp (...,C), weight (OC,C), bias (OC,) or None, out (...,OC); floatX arrays
(float32, or uint16 bf16 bits: inp's dtype picks the build). Parameter gradients
accumulate (+=; = with accumulate_weight=False), activation gradients overwrite (=).

  1: the GEMMs on cuBLAS (llmcu.cuda.gemm; NumPy under the emulator), then the bias as
     separate kernels: matmul_bias_forward_kernel1 (out += bias, a thread per element: in
     bf16 a second rounding after the GEMM's) and matmul_bias_backward_kernel1 (a thread
     per column walking all N rows, the oracle's order; OC threads). The product adds the
     bias in the cuBLASLt epilogue and sums dbias in two deterministic passes.
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

from llmcu.cuda.gemm import gemm
from llmcu.cuda.matmul import _check, _check_bias_backward  # the product wrapper's argument checks
from llmcu.cuda.runtime import backend_of, i32, launch_config
from llmcu.lab import Version

STEM = "dev/matmul"


def matmul_forward1(out, inp, weight, bias=None):
    be = backend_of(inp)
    N, C, OC, floatX = _check("matmul_forward", be, inp, weight, out=out, bias=bias)
    gemm(out.reshape(N, OC), inp.reshape(N, C), weight, transpose_b=True)
    if bias is not None:
        grid, block = launch_config(N * OC)
        be.launch(STEM, "matmul_bias_forward_kernel1", grid, block, (out, bias, i32(N), i32(OC)), floatX=floatX)


def matmul_bias_backward1(dbias, dout, accumulate=True):
    """dbias += the column sums of dout (..., OC) (dbias = them with accumulate=False)."""
    be, N, OC, floatX = _check_bias_backward(dbias, dout)
    if not accumulate:
        be.fill(dbias, 0)  # the kernel adds (+=) its column sums
    grid, block = launch_config(OC)
    be.launch(STEM, "matmul_bias_backward_kernel1", grid, block, (dbias, dout, i32(N), i32(OC)),
              floatX=floatX)


def matmul_backward1(dinp, dweight, dbias, dout, inp, weight, accumulate_weight=True):
    be = backend_of(inp)
    N, C, OC, _ = _check("matmul_backward", be, inp, weight, dinp=dinp, dweight=dweight, dbias=dbias, dout=dout)
    if dinp is not None:
        gemm(dinp.reshape(N, C), dout.reshape(N, OC), weight)
    gemm(dweight, dout.reshape(N, OC), inp.reshape(N, C), transpose_a=True, accumulate=accumulate_weight)
    if dbias is not None:
        matmul_bias_backward1(dbias, dout, accumulate=accumulate_weight)


VERSIONS = {
    1: Version("cuBLAS GEMMs + separate bias kernels (forward a thread per element, backward a thread per column)",
               {"matmul_forward": matmul_forward1, "matmul_backward": matmul_backward1,
                "matmul_bias_backward": matmul_bias_backward1},
               kernels=("matmul_bias_forward_kernel1", "matmul_bias_backward_kernel1")),
}
