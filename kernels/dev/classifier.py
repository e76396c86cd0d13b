"""The classifier lab's launch code: the versions of kernels/dev/classifier.cu behind the
product wrappers' signatures (llmcu/cuda/classifier.py, and the oracle llmcu/cpu/classifier.py):

    crossentropy_forward(losses, logits, targets, V)
    fused_classifier_dlogits(logits, losses, targets, V, dloss)   (dlogits overwrite logits)

Shapes: logits (B,T,Vp) floatX (float32, or uint16 bf16 bits) with V real columns, targets
(B,T) int32, losses (B,T) float32. Activation gradients overwrite (=).

  3: fused_classifier_kernel3, the product's kernel2 (online softmax, 16-byte loads) with
     the row kept in registers: read once, written once. Needs Vp % (16 // itemsize) == 0,
     16-byte aligned logits and Vp <= 1024 * 8 * (16 // itemsize) (32768 fp32, 65536 bf16:
     GPT-2's Vp = 50304 fits in bf16 only).
Load by path (kernels/dev/ is not a package): benchmarks/lab.py, tests/lab/.
"""

import numpy as np

from llmcu.cuda.classifier import CLASSIFIER_BLOCK
from llmcu.cuda.runtime import FLOATX_NAMES, backend_of, block_per_row, check_array, f32, floatx_dtype, i32
from llmcu.cuda.vectorized import check_vectorized
from llmcu.lab import Version

STEM = "dev/classifier"
CLASSIFIER3_PACKETS = 8  # = CLASSIFIER3_PACKETS in the .cu file: x128 packets a thread keeps


def _check(fn, be, logits, V, targets, losses):
    dt = floatx_dtype(fn, "logits", logits)
    check_array(fn, "logits", logits, be, dtype=dt)
    Vp = logits.shape[-1]
    if not 0 < V <= Vp:
        raise ValueError(f"{fn}: V must be in [1, Vp={Vp}], got {V}")
    check_array(fn, "targets", targets, be, dtype=np.int32, shape=logits.shape[:-1])
    check_array(fn, "losses", losses, be, dtype=np.float32, shape=logits.shape[:-1])
    return logits.size // Vp, Vp, FLOATX_NAMES[dt]


def _fused3(fn, logits, losses, targets, V, dloss, write_dlogits):
    be = backend_of(logits)
    N, Vp, floatX = _check(fn, be, logits, V, targets, losses)
    check_vectorized(fn, Vp, dict(logits=logits), what="padded vocabulary columns Vp")
    most = CLASSIFIER_BLOCK * (16 // logits.dtype.itemsize) * CLASSIFIER3_PACKETS
    if Vp > most:
        raise ValueError(f"{fn}: version 3 keeps a row in registers: Vp must be at most {most} for "
                         f"{logits.dtype} logits, got Vp={Vp}")
    grid, block = block_per_row(N, CLASSIFIER_BLOCK)
    be.launch(STEM, "fused_classifier_kernel3", grid, block,
              (logits, losses, targets, f32(dloss), i32(N), i32(V), i32(Vp), i32(write_dlogits)), floatX=floatX)


def crossentropy_forward3(losses, logits, targets, V):
    _fused3("crossentropy_forward", logits, losses, targets, V, 0.0, 0)


def fused_classifier_dlogits3(logits, losses, targets, V, dloss):
    _fused3("fused_classifier_dlogits", logits, losses, targets, V, dloss, 1)


VERSIONS = {
    3: Version("kernel2 (online softmax, 16-byte loads) with the row kept in registers: one read, one write",
               {"crossentropy_forward": crossentropy_forward3, "fused_classifier_dlogits": fused_classifier_dlogits3},
               kernels=("fused_classifier_kernel3",)),
}
