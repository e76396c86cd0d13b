"""Gradient reduction for data parallel (llmcu/distributed.py): buckets, bf16, overlap.

What is reduced. The mean over the ranks of the gradient: all of it (-z 0), or
for ZeRO-1 (-z 1) the owning rank's shard [lo, hi) of the flat buffer
(distributed.shard_range); the rest of a rank's gradient is stale then and unused.

In what precision. A bf16 model's gradients are bf16 (uint16 bits) and travel as
bf16:
    NCCL (--device cuda): ncclAllReduce / ncclReduce / ncclReduceScatter on
        ncclBfloat16 with ncclAvg, in place, as llm.c does. NCCL implements ncclAvg
        on floating types as a pre-multiplied sum: each rank's value times 1/W,
        rounded to bf16, then added along the ring, each partial sum rounded to bf16
        (W - 1 roundings of the running sum, in an order that depends on the ring).
        That costs up to ~(W - 1)/2 bf16 ulps (2^-9 relative each) of the mean, which
        is noise next to the gradient's own bf16 rounding; it halves the bytes on the
        wire against fp32, which is why llm.c chose it.
    gloo (--device cpu/emu) has no usable bf16 sum of its own (its bf16 adds round
        after each add in its own order), so the same arithmetic is written out: each
        bucket's bf16 values are widened to fp32 (exact), summed across ranks in fp32,
        multiplied by float32(1/W) and rounded to the nearest bf16 once. For W = 2
        this is bit for bit what NCCL's bf16 ncclAvg gives: x/2 is exact in bf16, the
        fp32 sum of two bf16 values is exact unless their exponents differ by more
        than 16 (then both ways round to the larger value), and a sum of two terms does
        not depend on the order. For W > 2 NCCL rounds each hop; this rounds once.
An fp32 model's gradients travel as fp32, summed then scaled by float32(1/W) (gloo;
distributed.GlooCommunicator), or with ncclAvg on NCCL in buckets.

Buckets (overlap, --overlap 1, the default). The flat buffer is tensor-major
(wte, wpe, ln1w[0..L-1], ...), so a layer's gradients are 12 ranges (one per
layer tensor, LAYER_TENSORS), not one. layer_buckets gives bucket b = L-1-l the
ranges of layer l, in the order the backward finishes them (l = L-1 first), and a
last bucket with every other tensor (wte, wpe, the final norm; Llama's lm_head),
which is final only after the encoder's backward. The backward calls
layer_done(l) (llmcu/cpu/gpt2.backward_layers) and the reducer starts bucket
L-1-l at once:
    NCCL: an event recorded on the compute stream, the second (communication)
        stream waits on it, then one NCCL group of the bucket's collectives on that
        stream; so layer l's reduction runs while layer l-1's backward computes. The
        compute stream waits on an event recorded after the last bucket before the
        grad norm reads the gradients (finish). Nothing blocks the host.
    gloo: the bucket is packed into its own fp32 staging buffer and reduced with
        asynchronous work handles (async_op=True) on gloo's threads while the backward
        goes on; finish waits for them, scales, rounds and unpacks. -z 1 sends each
        piece of a range to the rank that owns it (a reduce to that rank), so the bytes
        on the wire are a reduce-scatter's.
With gradient accumulation only the last micro-step's backward starts buckets
(distributed.DataParallel counts them); the earlier ones only accumulate.
--overlap 0 reduces the whole buffer after the backward (reduce_all): one
all-reduce (-z 0) or one reduce-scatter of a padded copy (-z 1). Per element the
arithmetic of the two schedules is the same (sum over ranks, scale, round), so for
W = 2 they agree bit for bit (tests/test_dp_bf16.py checks it).

CUDA graphs: refused with data parallel (llmcu/train.make_graph_step says why).
"""

from __future__ import annotations

import math

import numpy as np

from .config import parameter_slices
from .formats import bf16_bits_to_float32, float32_to_bf16_bits

# The parameter tensors with one slice per layer (GPT-2 and Llama names); all others
# (embeddings, final norm, lm_head) go to the last bucket.
LAYER_TENSORS = frozenset({"ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w",
                           "ln2b", "fcw", "fcb", "fcprojw", "fcprojb"})

BF16 = np.dtype(np.uint16)  # the bf16 bits the models keep (llmcu.formats)


def layer_buckets(config) -> list[list[tuple[int, int]]]:
    """The flat ranges [a, b) of each bucket, in reduction order: the layers L-1 down
    to 0 (bucket L-1-l is layer l), then every non-layer tensor. Together they cover
    every parameter once."""
    L = config.num_layers
    per_layer: list[list[tuple[int, int]]] = [[] for _ in range(L)]
    rest = []
    for name, sl, shape in parameter_slices(config):
        if name in LAYER_TENSORS and L > 0:
            n = math.prod(shape[1:])
            for layer in range(L):
                per_layer[layer].append((sl.start + layer * n, sl.start + (layer + 1) * n))
        else:
            rest.append((sl.start, sl.stop))
    return [per_layer[layer] for layer in reversed(range(L))] + [rest]


def bucket_layout(ranges, shards=None) -> list[tuple[int, int, int, int]]:
    """(a, b, offset, owner) for each range of a bucket: offset is where it sits in the
    bucket's packed staging buffer; with shards (each rank's ZeRO-1 (lo, hi)) the ranges
    are cut at the shard boundaries and owner is the rank that owns each piece (empty
    pieces left out), else owner is -1 (every rank keeps the mean)."""
    out, off = [], 0
    for a, b in ranges:
        if shards is None:
            out.append((a, b, off, -1))
        else:
            for owner, (lo, hi) in enumerate(shards):
                x, y = max(a, lo), min(b, hi)
                if x < y:
                    out.append((x, y, off + x - a, owner))
        off += b - a
    return out


def _widen(g):
    return bf16_bits_to_float32(g) if g.dtype == BF16 else g


class GradientReducer:
    """Averages a model's flat gradient across comm's ranks, whole (reduce_all) or in
    buckets started as the backward finishes each layer (start, then finish); see the
    module doc. shard: this rank's ZeRO-1 (lo, hi), None for -z 0; shards: every
    rank's (needed for -z 1)."""

    def __init__(self, comm, config, grads_dtype, shard=None, shards=None):
        self.comm, self.config = comm, config
        self.world, self.rank = comm.world_size, comm.rank
        self.dtype = np.dtype(grads_dtype)
        self.shard, self.shards = shard, shards
        self.buckets = layer_buckets(config)
        self.layout = [bucket_layout(r, shards if shard is not None else None) for r in self.buckets]
        self.started: list[int] = []   # buckets started since the last finish, in order
        self.history: list[list[int]] = []  # the order of every finished step's buckets (tests)
        self._pending = []
        self._staging = None
        self._cuda = None

    # -- whole buffer, after the backward (--overlap 0) ---------------------------

    def reduce_all(self, grads, padded=None, piece=None):
        """The mean over ranks of the whole gradient (-z 0) or of this rank's shard into
        grads[lo:hi] (-z 1, through `padded` (S*W,) and `piece` (S,) of grads' dtype)."""
        comm = self.comm
        if self.shard is None:
            if self.dtype != BF16 or comm.backend == "none":
                comm.all_reduce_mean(grads)
            elif comm.backend == "nccl":
                self._nccl_all_reduce_avg(grads, self._stream_ptr())
            else:
                full = bf16_bits_to_float32(grads).copy()
                comm.all_reduce_mean(full)
                grads[...] = float32_to_bf16_bits(full)
            return grads
        lo, hi = self.shard
        N = grads.size
        padded[:N] = grads
        padded[N:] = 0
        if self.dtype != BF16 or comm.backend == "none":
            comm.reduce_scatter_mean(piece, padded)
        elif comm.backend == "nccl":
            self._nccl_reduce_scatter_avg(piece, padded)
        else:
            wide = bf16_bits_to_float32(padded).copy()
            out = np.empty(piece.size, np.float32)
            comm.reduce_scatter_mean(out, wide)
            piece[...] = float32_to_bf16_bits(out)
        grads[lo:hi] = piece[:hi - lo]
        return grads

    # -- buckets, during the backward (--overlap 1) ---------------------------------

    def start(self, b: int, grads) -> None:
        """Start bucket b's reduction (asynchronous; finish() completes it)."""
        if self.comm.backend == "none":  # one process: the mean is the gradient itself
            self.started.append(b)
            return
        if self.comm.backend == "nccl":
            self._start_nccl(b, grads)
        else:
            self._start_gloo(b, grads)
        self.started.append(b)

    def finish(self, grads) -> None:
        """Wait for every started bucket; the gradient (or this rank's shard) is then the mean."""
        if self.comm.backend == "nccl":
            self._finish_nccl()
        elif self.comm.backend != "none":
            self._finish_gloo(grads)
        self.history.append(self.started)
        self.started = []

    # gloo: fp32 staging buffers, asynchronous work handles

    def _start_gloo(self, b, grads):
        import torch
        dist = self.comm.dist
        if self._staging is None:
            self._staging = [np.empty(sum(e - a for a, e in r), np.float32) for r in self.buckets]
        staging = self._staging[b]
        off = 0
        for a, e in self.buckets[b]:  # pack in bucket_layout's order (bf16 widened exactly)
            staging[off:off + e - a] = _widen(grads[a:e])
            off += e - a
        works = []
        if self.shard is None:
            works.append(dist.all_reduce(torch.from_numpy(staging), op=dist.ReduceOp.SUM,
                                         async_op=True))
        else:  # each piece to its owner (gloo's reduce uses the others' buffers as scratch)
            for a, e, off, owner in self.layout[b]:
                works.append(dist.reduce(torch.from_numpy(staging[off:off + e - a]), dst=owner,
                                         op=dist.ReduceOp.SUM, async_op=True))
        keep = [(a, e, off) for a, e, off, owner in self.layout[b] if owner in (-1, self.rank)]
        self._pending.append((works, staging, keep))

    def _finish_gloo(self, grads):
        scale = np.float32(1.0 / self.world)
        for works, staging, keep in self._pending:
            for w in works:
                w.wait()
            for a, e, off in keep:
                mean = staging[off:off + e - a] * scale
                grads[a:e] = float32_to_bf16_bits(mean) if self.dtype == BF16 else mean
        self._pending = []

    # NCCL: a second stream, events, ncclAvg in place

    def _stream_ptr(self):
        import cupy
        return cupy.cuda.get_current_stream().ptr

    def _nccl_dtype(self):
        from cupy.cuda import nccl
        # ncclBfloat16 = 9 (nccl.h, NCCL >= 2.10); older CuPy lacks the constant
        return getattr(nccl, "NCCL_BFLOAT16", 9) if self.dtype == BF16 else nccl.NCCL_FLOAT32

    @staticmethod
    def _avg():
        from cupy.cuda import nccl
        return getattr(nccl, "NCCL_AVG", 4)  # ncclAvg = 4 (nccl.h, NCCL >= 2.10)

    def _nccl_all_reduce_avg(self, x, stream):
        self.comm.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._nccl_dtype(), self._avg(),
                                 stream)

    def _nccl_reduce_scatter_avg(self, piece, padded):
        self.comm.comm.reduceScatter(padded.data.ptr, piece.data.ptr, piece.size, self._nccl_dtype(),
                                     self._avg(), self._stream_ptr())

    def _start_nccl(self, b, grads):
        import cupy
        from cupy.cuda import nccl
        if self._cuda is None:
            self._cuda = cupy.cuda.Stream(non_blocking=True)
        stream = self._cuda
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())  # layer l's backward kernels are queued before it
        stream.wait_event(ready)
        item = grads.dtype.itemsize
        base = grads.data.ptr
        comm, dt, avg = self.comm.comm, self._nccl_dtype(), self._avg()
        self.comm.wait_for = self._after_buckets  # other collectives queue behind the buckets
        nccl.groupStart()  # the bucket's collectives as one NCCL launch
        try:
            if self.shard is None:
                for a, e in self.buckets[b]:
                    comm.allReduce(base + a * item, base + a * item, e - a, dt, avg, stream.ptr)
            else:
                for a, e, _, owner in self.layout[b]:
                    comm.reduce(base + a * item, base + a * item, e - a, dt, avg, owner, stream.ptr)
        finally:
            nccl.groupEnd()

    def _after_buckets(self, stream) -> None:
        """Make `stream` wait (on the device, not the host) for every bucket queued so far."""
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self._cuda)
        stream.wait_event(done)

    def _finish_nccl(self):
        import cupy
        if self._cuda is None or not self.started:
            return
        self._after_buckets(cupy.cuda.get_current_stream())  # the norm and AdamW read the means
        self.comm.wait_for = None
