"""The adamw lab's launch code: the versions of kernels/dev/adamw.cu behind the product
wrapper's signature (llmcu/cuda/adamw.py; the oracle llmcu/cpu/adamw.py takes the same
arguments without the last two):

    adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_scale=1.0, master_params=None, seed=None)

params, grads floatX (float32, or uint16 bf16 bits), m, v and master_params float32, all
of one shape. With master_params the update runs on the fp32 master copy and params get
it stochastically rounded (seed: 32-bit, default the step).

  3: adamw_kernel3, the product's kernel2 with 16-byte loads and stores (one x128 packet
     of params a thread): kernel2's arithmetic and random bits element for element, so its
     results bit for bit. Needs params.size % (16 // itemsize) == 0 and 16-byte aligned
     arrays. For fp32 without master weights it is kernel2's in-place path (the product
     runs kernel1 there: the oracle's arithmetic, the same results).
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

import numpy as np

from llmcu.cuda.adamw import check_update
from llmcu.cuda.runtime import FLOATX_NAMES, f32, i64, launch_config
from llmcu.cuda.vectorized import check_vectorized
from llmcu.lab import Version

STEM = "dev/adamw"


def adamw_update3(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, grad_scale=1.0, master_params=None, seed=None):
    fn = "adamw_update"
    be, dt, seed = check_update(fn, params, grads, m, v, step, master_params, seed)  # the product's
    packets = check_vectorized(fn, params.size, dict(params=params, grads=grads, m=m, v=v,
                                                     master_params=master_params))
    grid, block = launch_config(packets)
    be.launch(STEM, "adamw_kernel3", grid, block,
              (params, master_params, grads, m, v, i64(params.size), f32(lr), f32(beta1), f32(beta2),
               f32(1.0 - beta1 ** step), f32(1.0 - beta2 ** step), f32(eps), f32(weight_decay),
               f32(grad_scale), np.uint32(seed)), floatX=FLOATX_NAMES[dt])


VERSIONS = {
    3: Version("kernel2 with 16-byte loads and stores (one x128 packet a thread), kernel2's bits",
               {"adamw_update": adamw_update3}, kernels=("adamw_kernel3",)),
}
