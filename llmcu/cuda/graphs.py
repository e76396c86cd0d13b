"""GPT-2's training step captured as CUDA graphs, and the emulator's stand-in.

    step = GraphStep(model, B, T, accum_steps=1, weight_decay=0.0, grad_clip=1.0)
    loss, norm = step.forward_backward(batches)   # [(inputs, targets)] * accum_steps, host arrays
    step.update(lr, step_number)                  # AdamW, unless the caller skips this step

A step of GPT-2 d12 is about 500 kernel launches and GEMMs, each costing
Python and CuPy time on the host (about 13 ms of llmcu's Python per step,
measured on the CPU with launches stubbed, benchmarks/RESULTS.md). A CUDA graph
records them once and replays them with one launch. Two graphs:

- forward_backward: zero the gradients; for each micro-step, the forward from
  token ids in fixed device buffers, the backward (whose fused classifier also
  writes the losses: no separate cross-entropy pass), the losses' mean added to
  a device total; then the gradient norm and the clipping scale, on the device.
- update: AdamW over every tensor in one launch (adamw_multi_tensor), reading
  the learning rate, bias corrections, step and clipping scale from device
  memory, so the same graph serves every step.

Between them the host reads the loss and the norm (one sync, as the eager
step's) and decides whether to apply the update (llm.c's outlier skip).
Everything the graphs touch is allocated before capture: the model's flat
buffers, the batch buffers here, and runtime.scratch work buffers. While
capturing on the GPU any CuPy allocation raises, since a graph keeps raw
addresses that the memory pool could hand to another array afterwards. If
the model's buffers change (other (B,T) activations, new AdamW moments from a
checkpoint), the step is captured again.

Under the emulator (device "emu") a capture records each launch and each
piece of host code standing in for device work (runtime.Backend.run) without
running it, and a replay runs the record: any per-step value a kernel got as a
Python scalar, or any work done outside launches, would then be stale or
missing, and tests/test_graphs.py compares graph steps with eager ones bit for
bit to catch that.
"""

from __future__ import annotations

import numpy as np

from ..config import parameter_slices
from .adamw import adamw_hyper, adamw_multi_tensor, adamw_tensor_table, global_norm_device
from .classifier import loss_mean
from .encoder import token_runs


class Graph:
    """A captured sequence of device work; launch() replays it on the current stream."""

    def __init__(self, be, native=None, recorded=None):
        self.backend, self.native, self.recorded = be, native, recorded

    def launch(self) -> None:
        if self.native is not None:
            self.native.launch()
            return
        for fn, args in self.recorded:
            fn(*args)

    @property
    def num_nodes(self) -> int | None:
        """Recorded launches under the emulator; None on the GPU (not queried)."""
        return len(self.recorded) if self.recorded is not None else None


def _refuse_allocation(size):
    raise RuntimeError(f"graphs: a {size}-byte device allocation was requested while a CUDA graph "
                       f"was being captured; the graph would keep an address the memory pool can "
                       f"reuse. Allocate the buffer before capture (runtime.scratch)")


def capture(be, fn) -> Graph:
    """Run fn() under capture and return the Graph. fn must have run once before
    (modules loaded, scratch buffers allocated). GPU: on a side stream, with CuPy
    allocations refused; emulator: recorded, not run."""
    if be.capturing:
        raise RuntimeError("graphs.capture: already capturing")
    if be.name == "emu":
        be.recording, be.capturing = [], True
        try:
            fn()
            recorded = be.recording
        finally:
            be.recording, be.capturing = None, False
        return Graph(be, recorded=recorded)
    import cupy
    stream = _capture_stream()
    get = getattr(cupy.cuda, "get_allocator", None)  # absent from old CuPys: the pool is the default
    previous = get() if get is not None else cupy.get_default_memory_pool().malloc
    be.synchronize()
    with stream:
        cupy.cuda.set_allocator(_refuse_allocation)
        be.capturing = True
        try:
            stream.begin_capture()
            try:
                fn()
            finally:
                native = stream.end_capture()
        finally:
            be.capturing = False
            cupy.cuda.set_allocator(previous)
    return Graph(be, native=native)


_stream = None


def _capture_stream():
    """One non-blocking stream for captures (a capture cannot run on the legacy default stream)."""
    global _stream
    if _stream is None:
        import cupy
        _stream = cupy.cuda.Stream(non_blocking=True)
    return _stream


class GraphStep:
    """A GPT-2 kernel model's (llmcu/cuda/gpt2.py) training step as two graphs (module doc).

    B, T, accum_steps fix the batch shape; beta1, beta2, eps, weight_decay and grad_clip
    are fixed for the run (the schedule's learning rate is passed per step)."""

    def __init__(self, model, B: int, T: int, accum_steps: int = 1, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 grad_clip: float | None = None):
        if not hasattr(model, "_forward_device"):
            raise TypeError(f"GraphStep: needs a GPT-2 kernel model (llmcu.cuda.gpt2.GPT2), got "
                            f"{type(model).__name__}")
        for name, n in (("B", B), ("T", T), ("accum_steps", accum_steps)):
            if int(n) < 1:
                raise ValueError(f"GraphStep: {name} must be >= 1, got {n}")
        if T > model.config.max_seq_len:
            raise ValueError(f"GraphStep: T={T} exceeds the model's max_seq_len={model.config.max_seq_len}")
        self.model, self.B, self.T, self.accum_steps = model, int(B), int(T), int(accum_steps)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.grad_clip = grad_clip
        be, xp = model.backend, model.xp
        self.backend = be
        n = accum_steps
        self.inputs = xp.zeros((n, B, T), dtype=np.int32)
        self.targets = xp.zeros((n, B, T), dtype=np.int32)
        self.order = xp.zeros((n, B * T), dtype=np.int32)   # encoder.token_runs of each micro-batch
        self.end = xp.zeros((n, B * T), dtype=np.int32)
        self.loss = xp.zeros(1, dtype=np.float64)           # mean loss over the micro-steps
        self.norm = xp.zeros(1, dtype=np.float64)           # gradient norm before clipping
        self.hyper = xp.zeros(4, dtype=np.float32)          # lr, bias corrections, clip scale
        self.step_seed = xp.zeros(2, dtype=np.uint32)       # rounding seed, 1-based step
        slices = [sl for _, sl, _ in parameter_slices(model.config)]
        decays = [weight_decay if name in model.DECAYED else 0.0
                  for name, _, _ in parameter_slices(model.config)]
        self.table = adamw_tensor_table(xp, slices, decays)
        self._graphs = None
        self._captured = None
        self.captures = 0  # how many times the step was captured (tests, logs)

    # -- the device work ------------------------------------------------------

    def _buffers(self):
        """The model's arrays the graphs hold addresses of: a new one means a new capture."""
        m = self.model
        a = m.acts
        return (m.params, m.grads, m.m, m.v, m.master, a.memory if a else None,
                a.stats if a else None, a, m._scratch and m._scratch["dres"])

    def _forward_backward(self):
        m, be, n = self.model, self.backend, self.accum_steps
        m.zero_grad()
        be.fill(self.loss, 0)
        for i in range(n):
            # no separate cross-entropy pass: the backward's fused classifier writes the same
            # losses (the same kernel) while it turns the logits into dlogits, so the logits
            # are read twice per step instead of three times (llm.c's training forward)
            m._forward_device(self.inputs[i])
            m._backward_device(self.inputs[i], self.targets[i], (self.order[i], self.end[i]),
                               loss_scale=1.0 / n)
            loss_mean(self.loss, m.acts.losses, 1.0 / (self.B * self.T * n))
        global_norm_device(m.grads, self.norm, self.hyper[3:4], self.grad_clip)

    def _update(self):
        m = self.model
        adamw_multi_tensor(m.params, m.grads, m.m, m.v, self.table, self.hyper, self.step_seed,
                           self.beta1, self.beta2, self.eps, master_params=m.master)

    def _prepare(self):
        """Allocate what the graphs use, run the work once, capture it (again if stale)."""
        m, xp = self.model, self.model.xp
        if m.grads is None:
            m.zero_grad()
        if m.m is None:
            m.m = xp.zeros(m.params.size, dtype=np.float32)
            m.v = xp.zeros(m.params.size, dtype=np.float32)
        if self._graphs is not None and all(x is y for x, y in zip(self._buffers(), self._captured)):
            return
        self._forward_backward()  # warm-up: modules, activations, scratch (the update is not run)
        m._backward_scratch(self.B, self.T)
        self._captured = self._buffers()
        self._graphs = (capture(self.backend, self._forward_backward), capture(self.backend, self._update))
        self.captures += 1

    # -- the host side ------------------------------------------------------------

    def forward_backward(self, batches) -> tuple[float, float]:
        """Copy accum_steps (inputs, targets) host batches of (B,T) token ids to the
        device, replay the forward/backward graph, return (mean loss, gradient norm)."""
        batches = list(batches)
        if len(batches) != self.accum_steps:
            raise ValueError(f"GraphStep.forward_backward: expected {self.accum_steps} (inputs, targets) "
                             f"batches, got {len(batches)}")
        V = self.model.config.vocab_size
        host = []
        for i, (x, y) in enumerate(batches):
            x, y = np.asarray(x), np.asarray(y)
            for name, a in (("inputs", x), ("targets", y)):
                if a.shape != (self.B, self.T):
                    raise ValueError(f"GraphStep.forward_backward: batch {i} {name} must be "
                                     f"({self.B},{self.T}), got {a.shape}")
                if a.size and (a.min() < 0 or a.max() >= V):
                    raise ValueError(f"GraphStep.forward_backward: batch {i} {name}: token ids must "
                                     f"be in [0, {V}), found {a.min()}..{a.max()}")
            host.append((x.astype(np.int32), y.astype(np.int32)))
        self._prepare()
        for i, (x, y) in enumerate(host):
            order, end = token_runs(x)
            for dst, src in ((self.inputs, x), (self.targets, y), (self.order, order), (self.end, end)):
                _upload(dst[i], src)
        self._graphs[0].launch()
        return float(_read(self.loss)[0]), float(_read(self.norm)[0])

    def update(self, lr: float, step: int) -> None:
        """AdamW at 1-based `step` with learning rate lr, clipped by the scale the last
        forward_backward computed; master weights and stochastic rounding as
        model.update (llmcu/cuda/mixed_precision.py)."""
        if self._graphs is None:
            raise RuntimeError("GraphStep.update: call forward_backward first")
        if step < 1:
            raise ValueError(f"GraphStep.update: step is 1-based, got {step}")
        hyper = adamw_hyper(lr, step, self.beta1, self.beta2)
        _upload(self.hyper[0:3], hyper[0:3])  # [3], the clip scale, came from the device
        _upload(self.step_seed, np.array([self.model.seed & 0xFFFFFFFF, step], dtype=np.uint32))
        self._graphs[1].launch()


def _upload(dst, src) -> None:
    """dst[...] = host array src: an ordered copy on the current stream (GPU) or a plain copy."""
    if isinstance(dst, np.ndarray):
        dst[...] = src
    else:
        dst.set(np.ascontiguousarray(src, dtype=dst.dtype))


def _read(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else a

