"""GELU (tanh approximation) on the kernels of kernels/gelu.cu.

Same functions and signatures as llmcu/cpu/gelu.py. Activation gradients overwrite (=).
"""

from .runtime import backend_of, check_array, i32, launch_config


def gelu_forward(out, inp):
    be = backend_of(inp)
    check_array("gelu_forward", "inp", inp, be)
    check_array("gelu_forward", "out", out, be, shape=inp.shape)
    grid, block = launch_config(inp.size)
    be.launch("gelu", "gelu_forward_kernel1", grid, block, (out, inp, i32(inp.size)))


def gelu_backward(dinp, dout, inp):
    be = backend_of(inp)
    for name, a in (("inp", inp), ("dinp", dinp), ("dout", dout)):
        check_array("gelu_backward", name, a, be, shape=inp.shape)
    grid, block = launch_config(inp.size)
    be.launch("gelu", "gelu_backward_kernel1", grid, block, (dinp, inp, dout, i32(inp.size)))
