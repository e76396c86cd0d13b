"""The training step as CUDA graphs (llmcu/cuda/graphs.py) against the eager step.

A graph replays what was captured: kernel arguments given as Python scalars are
frozen at capture, and work done outside launches is not replayed. Under the
emulator a capture records without running and a replay runs the record, so
the same mistakes show here as on a GPU: every test drives several steps with a
changing learning rate, new batches and gradient clipping, and demands the
graph step's parameters, AdamW moments and master weights equal the eager
step's bit for bit (the same kernels in the same order; the one-launch AdamW is
bit-identical to the per-tensor one, tests/kernels/test_adamw.py). Losses
are sums in double in another order (the device's fixed tree against NumPy's
pairwise mean), so they agree to 1e-12 relative, not bitwise.
"""

import tracemalloc

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS
from llmcu import train as train_mod
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import init_parameters
from llmcu.cuda import graphs, runtime
from llmcu.cuda.gpt2 import GPT2
from llmcu.schedule import learning_rate

TINY = GPT2Config(max_seq_len=32, vocab_size=500, num_layers=2, num_heads=4, channels=64)
B, T = 2, 16
WD, CLIP = 0.1, 0.05   # a clip far below the norm (~1): every step is clipped
LRS = [1e-2, 3e-3, 7e-3]


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _batches(seed, steps, accum):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, TINY.vocab_size, size=(steps, accum, B, T + 1)).astype(np.int32)
    return [[(t[:, :-1], t[:, 1:]) for t in step] for step in toks]


def _eager_step(model, batch, lr, step):
    model.zero_grad()
    total = 0.0
    for x, y in batch:
        total += model.forward(x, y)
        model.backward(loss_scale=1.0 / len(batch))
    norm = model.grad_norm()
    model.update(lr, step, weight_decay=WD, grad_clip=CLIP, grad_norm=norm)
    return total / len(batch), norm


def _models(device, dtype, master_weights=True, config=TINY):
    p0 = init_parameters(config, seed=11)
    return [GPT2(config, p0.copy(), device=device, dtype=dtype, master_weights=master_weights, seed=7)
            for _ in range(2)]


def _assert_same_state(eager, graphed, what):
    for name in ("params", "grads", "m", "v", "master"):
        a, b = getattr(eager, name), getattr(graphed, name)
        if a is None and b is None:
            continue
        a, b = _host(a), _host(b)
        same = np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert same, (f"{what}: {name} differs between the eager and the graph step in "
                      f"{int((a != b).sum())} of {a.size} elements")


CASES = [("fp32", True, 1), ("bf16", True, 1), ("bf16", False, 2), ("fp32", True, 3)]


@pytest.mark.parametrize("device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,master,accum", CASES,
                         ids=[f"{d}-{'master' if m else 'nomaster'}-accum{a}" for d, m, a in CASES])
def test_graph_step_equals_eager_step(device, dtype, master, accum):
    eager, graphed = _models(device, dtype, master)
    step = graphs.GraphStep(graphed, B, T, accum, weight_decay=WD, grad_clip=CLIP)
    for s, batch in enumerate(_batches(1, len(LRS), accum)):
        loss_e, norm_e = _eager_step(eager, batch, LRS[s], s + 1)
        loss_g, norm_g = step.forward_backward(batch)
        step.update(LRS[s], s + 1)
        assert abs(loss_g - loss_e) <= 1e-12 * abs(loss_e), (s, loss_g, loss_e)
        assert norm_g == pytest.approx(norm_e, rel=1e-12), (s, norm_g, norm_e)
        assert norm_e > CLIP  # the clip scale is exercised
        _assert_same_state(eager, graphed, f"{dtype} step {s + 1}")
    assert step.captures == 1
    # the parameters moved: a graph that replayed nothing would fail above, but say it
    assert not np.array_equal(_host(graphed.params), _host(_models(device, dtype, master)[0].params))


def test_capture_records_instead_of_running():
    """Emulator: capturing runs nothing (as on a GPU); each replay runs the record once more."""
    _, model = _models("emu", "fp32")
    step = graphs.GraphStep(model, B, T, weight_decay=WD, grad_clip=CLIP)
    batch = _batches(2, 1, 1)[0]
    step.forward_backward(batch)          # captures, then replays once
    fwd_bwd, update = step._graphs
    assert fwd_bwd.num_nodes > 50 and update.num_nodes >= 1
    before = model.params.copy()
    step._prepare()                       # nothing stale: no new capture, nothing runs
    assert step.captures == 1 and np.array_equal(model.params, before)
    step.update(1e-2, 1)
    once = model.params.copy()
    assert not np.array_equal(once, before)
    step.update(1e-2, 2)                  # same gradients, the next step: moves again
    assert not np.array_equal(model.params, once)


def test_recaptures_when_the_model_buffers_change():
    """An eval forward at another T makes new activations: the next step captures again
    and still equals the eager step."""
    eager, graphed = _models("emu", "bf16")
    step = graphs.GraphStep(graphed, B, T, weight_decay=WD, grad_clip=CLIP)
    batches = _batches(3, 2, 1)
    for s, batch in enumerate(batches):
        _eager_step(eager, batch, LRS[s], s + 1)
        step.forward_backward(batch)
        step.update(LRS[s], s + 1)
        x = batch[0][0][:, :7]
        eager.forward(x, x)
        graphed.forward(x, x)             # (B, 7) activations replace the (B, T) ones
    assert step.captures == 2
    _assert_same_state(eager, graphed, "after an eval at another T")


def _numpy_bytes_kept_by(fn):
    """Bytes of NumPy array data allocated while fn() ran and still alive after it."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        result = fn()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    domain = np.lib.tracemalloc_domain
    flt = [tracemalloc.DomainFilter(True, domain)]
    diff = after.filter_traces(flt).compare_to(before.filter_traces(flt), "filename")
    return sum(d.size_diff for d in diff if d.size_diff > 0), result


def test_capture_allocates_no_device_memory():
    """Everything a captured step touches exists before capture: the record holds no
    array made during it (on a GPU such an array's memory goes back to the pool while
    the graph keeps its address). The same check catches a scratch buffer that is
    allocated per call (planted below)."""
    _, model = _models("emu", "bf16")
    step = graphs.GraphStep(model, B, T, 2, weight_decay=WD, grad_clip=CLIP)
    step.forward_backward(_batches(4, 1, 2)[0])
    be = model.backend
    kept, graph = _numpy_bytes_kept_by(lambda: graphs.capture(be, step._forward_backward))
    assert graph.num_nodes > 50
    assert kept < 1024, f"capture kept {kept} bytes of new NumPy arrays alive"

    def fresh(be, name, shape, dtype=np.float32):  # a scratch() that allocates every call
        return be.xp.empty(shape, dtype=dtype)

    original = runtime.scratch
    runtime.scratch = fresh
    try:
        planted, _ = _numpy_bytes_kept_by(lambda: graphs.capture(be, step._forward_backward))
    finally:
        runtime.scratch = original
    assert planted > 10 * 1024, f"the planted per-call allocation went unnoticed ({planted} bytes)"


def test_scratch_refuses_a_new_buffer_while_capturing():
    be = runtime.get_backend("emu")
    be.capturing = True
    try:
        with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
            runtime.scratch(be, "test_never_seen", (3, 5))
    finally:
        be.capturing = False


def test_bad_batches_are_refused():
    _, model = _models("emu", "fp32")
    step = graphs.GraphStep(model, B, T, 2)
    good = _batches(5, 1, 2)[0]
    with pytest.raises(ValueError, match="expected 2 \\(inputs, targets\\) batches, got 1"):
        step.forward_backward(good[:1])
    x, y = good[0]
    with pytest.raises(ValueError, match=r"inputs must be \(2,16\), got \(2, 15\)"):
        step.forward_backward([(x[:, :15], y[:, :15]), good[1]])
    bad = y.copy()
    bad[0, 0] = TINY.vocab_size
    with pytest.raises(ValueError, match=r"targets: token ids must be in \[0, 500\)"):
        step.forward_backward([(x, bad), good[1]])
    with pytest.raises(RuntimeError, match="call forward_backward first"):
        step.update(1e-3, 1)
    assert step.captures == 0  # refused before anything was captured


def test_graph_step_refuses_unsupported_models():
    p0 = init_parameters(TINY, seed=1)
    with pytest.raises(TypeError, match="GPT-2 kernel model"):
        graphs.GraphStep(object(), B, T)
    with pytest.raises(ValueError, match="T=64 exceeds"):
        graphs.GraphStep(GPT2(TINY, p0, device="emu"), B, 64)


def _train(tmp_path, cuda_graph, device="emu", steps=3, dtype="bf16"):
    from llmcu import formats
    rng = np.random.default_rng(0)
    path = tmp_path / "train.bin"
    if not path.exists():
        formats.write_shard(str(path), rng.integers(0, 500, size=4096).astype(np.uint16))
    cfg = TrainConfig(train_pattern=str(path), val_pattern=None, model="d2", batch_size=B, seq_len=T,
                      max_steps=steps, val_every=0, sample_every=0, device=device, dtype=dtype,
                      learning_rate=3e-3, warmup_iters=1, final_lr_frac=0.0, grad_clip=0.5, weight_decay=0.1,
                      total_batch_size=2 * B * T, cuda_graph=cuda_graph)
    logs = []
    hist = train_mod.train(cfg, log=logs.append)
    return hist, logs


def test_train_with_cuda_graph_matches_eager_training(tmp_path, monkeypatch):
    """llmcu train --cuda-graph 1 (here on the emulator): the same losses as without,
    through the training loop's schedule, gradient accumulation and clipping."""
    monkeypatch.setattr(train_mod, "build_model", _tiny_builder(train_mod.build_model))
    eager, _ = _train(tmp_path, 0)
    graphed, logs = _train(tmp_path, 1)
    assert any("CUDA graphs" in line for line in logs)
    np.testing.assert_allclose(graphed["train"], eager["train"], rtol=1e-12)
    assert graphed["lr"] == eager["lr"] and len(set(graphed["lr"])) > 1


def _tiny_builder(build):
    def tiny(spec, device="cpu", seed=42, max_seq_len=1024, **kw):
        return train_mod.make_model(TINY, init_parameters(TINY, seed), device, seed,
                                    kw.get("dtype", "fp32"), kw.get("master_weights", 1))
    return tiny


def test_cuda_graph_on_the_numpy_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_model", _tiny_builder(train_mod.build_model))
    with pytest.raises(ValueError, match="--cuda-graph 1 needs a GPT-2 model on the CUDA kernels"):
        _train(tmp_path, 1, device="cpu", dtype="fp32")


def test_learning_rate_schedule_is_what_the_graph_reads():
    """The update graph takes the schedule's learning rate through device memory:
    two different rates from the same state give different parameters."""
    lr_a = learning_rate("cosine", 0, 10, 1e-2, 2, 0.0)
    lr_b = learning_rate("cosine", 5, 10, 1e-2, 2, 0.0)
    assert lr_a != lr_b
    results = []
    for lr in (lr_a, lr_b):
        _, model = _models("emu", "fp32")
        step = graphs.GraphStep(model, B, T)
        step.forward_backward(_batches(6, 1, 1)[0])
        step.update(lr, 1)
        results.append(model.params.copy())
    assert not np.array_equal(*results)


def test_recaptures_after_loading_optimizer_state():
    """A resumed run loads AdamW's moments into new arrays (load_optimizer_state): the
    graphs hold the old addresses, so the next step captures again and still equals the
    eager step from the same loaded state."""
    eager, graphed = _models("emu", "fp32")
    step = graphs.GraphStep(graphed, B, T, weight_decay=WD, grad_clip=CLIP)
    batches = _batches(7, 3, 1)
    _eager_step(eager, batches[0], LRS[0], 1)
    step.forward_backward(batches[0])
    step.update(LRS[0], 1)
    rng = np.random.default_rng(8)
    m = rng.standard_normal(eager.params.size).astype(np.float32) * 1e-3
    v = np.abs(rng.standard_normal(eager.params.size).astype(np.float32)) * 1e-6
    for model in (eager, graphed):
        model.load_optimizer_state(m.copy(), v.copy())
    for s in (1, 2):
        _eager_step(eager, batches[s], LRS[s], s + 1)
        step.forward_backward(batches[s])
        step.update(LRS[s], s + 1)
    assert step.captures == 2
    _assert_same_state(eager, graphed, "after load_optimizer_state")


HS64 = GPT2Config(max_seq_len=80, vocab_size=500, num_layers=1, num_heads=2, channels=128)


def test_graph_step_with_the_tensor_core_attention():
    """bf16 at head size 64 runs attention version 3 (mma.sync, emulated): the captured step
    equals the eager step bit for bit with T=70 (two 64-row tiles, the second partial)."""
    p0 = init_parameters(HS64, seed=3)
    eager, graphed = [GPT2(HS64, p0.copy(), device="emu", dtype="bf16", seed=7) for _ in range(2)]
    assert "attention:attention_flash_forward_kernel3" in graphed.kernel_table()["flash_attention_forward"]
    Tv = 70
    rng = np.random.default_rng(5)
    step = graphs.GraphStep(graphed, 1, Tv, 1, weight_decay=WD, grad_clip=CLIP)
    for s in range(2):
        toks = rng.integers(0, HS64.vocab_size, size=(1, Tv + 1)).astype(np.int32)
        batch = [(toks[:, :-1], toks[:, 1:])]
        loss_e, norm_e = _eager_step(eager, batch, LRS[s], s + 1)
        loss_g, norm_g = step.forward_backward(batch)
        step.update(LRS[s], s + 1)
        assert abs(loss_g - loss_e) <= 1e-12 * abs(loss_e), (s, loss_g, loss_e)
        assert norm_g == pytest.approx(norm_e, rel=1e-12), (s, norm_g, norm_e)
        _assert_same_state(eager, graphed, f"bf16 hs=64 step {s + 1}")
    assert step.captures == 1
