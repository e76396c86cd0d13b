"""The layernorm lab's launch code: the versions of kernels/dev/layernorm.cu behind the
product wrappers' signatures (llmcu/cuda/layernorm.py, and the oracle llmcu/cpu/layernorm.py):

    layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS)
    layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)

Shapes: inp/out (...,C) seen as N rows, weight/bias (C,), mean/rstd (...) float32; floatX
arrays are float32 or uint16 (bf16 bits; inp's dtype picks the build). Parameter
gradients accumulate (+=), activation gradients overwrite (=).

  0 (forward): layernorm_forward_kernel0, one thread per row (the teaching version);
  1 (backward): layernorm_backward_kernel1 (warp per row) + layernorm_param_backward_kernel1
     (a thread per column walking every row, the oracle's order; C threads);
  2 (forward): layernorm_forward_kernel2, a warp per row with 16-byte loads and stores
     (C % (16 // itemsize) == 0, 16-byte aligned out, inp, weight, bias).
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

from llmcu.cuda.layernorm import _rows  # the product wrappers' argument checks
from llmcu.cuda.runtime import backend_of, f32, i32, launch_config, warp_per_row
from llmcu.cuda.vectorized import address
from llmcu.lab import Version

STEM = "dev/layernorm"
EPS = 1e-5


def _forward(version, out, mean, rstd, inp, weight, bias, eps):
    fn = "layernorm_forward"
    be = backend_of(inp)
    N, C, floatX = _rows(fn, be, inp, out=(out, "row"), mean=(mean, "stat"), rstd=(rstd, "stat"),
                         weight=(weight, "C"), bias=(bias, "C"))
    if version == 2:
        vec = 16 // inp.dtype.itemsize  # x128::size
        if C % vec != 0:
            raise ValueError(f"{fn}: version 2 (16-byte loads) needs C % {vec} == 0, got C = {C}")
        for name, a in (("out", out), ("inp", inp), ("weight", weight), ("bias", bias)):
            if address(a) % 16 != 0:
                raise ValueError(f"{fn}: version 2 needs {name} 16-byte aligned, got address "
                                 f"{address(a):#x}; pass a fresh array")
    grid, block = launch_config(N) if version == 0 else warp_per_row(N)
    be.launch(STEM, f"layernorm_forward_kernel{version}", grid, block,
              (out, mean, rstd, inp, weight, bias, i32(N), i32(C), f32(eps)), floatX=floatX)


def layernorm_forward0(out, mean, rstd, inp, weight, bias, eps=EPS):
    _forward(0, out, mean, rstd, inp, weight, bias, eps)


def layernorm_forward2(out, mean, rstd, inp, weight, bias, eps=EPS):
    _forward(2, out, mean, rstd, inp, weight, bias, eps)


def layernorm_backward1(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    fn = "layernorm_backward"
    be = backend_of(inp)
    N, C, floatX = _rows(fn, be, inp, dinp=(dinp, "row"), dout=(dout, "row"), dweight=(dweight, "C"),
                         dbias=(dbias, "C"), weight=(weight, "C"), mean=(mean, "stat"), rstd=(rstd, "stat"))
    grid, block = warp_per_row(N)
    be.launch(STEM, "layernorm_backward_kernel1", grid, block,
              (dinp, dout, inp, weight, mean, rstd, i32(N), i32(C)), floatX=floatX)
    grid, block = launch_config(C)
    be.launch(STEM, "layernorm_param_backward_kernel1", grid, block,
              (dweight, dbias, dout, inp, mean, rstd, i32(N), i32(C)), floatX=floatX)


VERSIONS = {
    0: Version("forward: one thread per row, the oracle's loops (teaching version)",
               {"layernorm_forward": layernorm_forward0}, kernels=("layernorm_forward_kernel0",)),
    1: Version("backward: warp per row for dinp, a thread per column walking all rows for dweight/dbias",
               {"layernorm_backward": layernorm_backward1},
               kernels=("layernorm_backward_kernel1", "layernorm_param_backward_kernel1")),
    2: Version("forward: warp per row, 16-byte loads and stores (C % (16/itemsize) == 0, aligned)",
               {"layernorm_forward": layernorm_forward2}, kernels=("layernorm_forward_kernel2",)),
}
