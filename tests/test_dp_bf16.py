"""bf16 data parallel (llmcu/distributed.py, llmcu/buckets.py) on the emulator with gloo.

Two `python -m llmcu train --device emu --dtype bf16` processes started with
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT: the launch torchrun
does, without its agent, which costs ~3 s a run here) against one process
accumulating the same 2 micro-batches with -d, on a tiny GPT-2 (L=2, C=32, V=64)
and a tiny Llama, 4 steps. What must hold:

- -z 0 and -z 1 give the single process's losses, norms and parameters within
  the bf16 bounds below (the two differ in where bf16 rounds the gradient);
- the per-layer buckets reduced during the backward (--overlap 1) give the whole
  buffer reduced after it (--overlap 0) bit for bit, and -z 1 gives -z 0's
  parameters bit for bit (2 ranks: the same sum, scale and rounding per element;
  ZeRO-1's sharded update rounds with the same per-element bits);
- a 2-process bf16 -z 1 run resumed from its step-2 checkpoint repeats steps 2..4
  bit for bit; another world size, -z or dtype on resume is refused naming both.

NCCL and the CUDA-stream overlap are not run here (no GPU).
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import checkpoint, distributed, formats
from llmcu.buckets import layer_buckets
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu.gpt2 import init_parameters
from helpers import subprocess_env, write_tiny_run

ENV = subprocess_env(launcher=False)  # the tests launch their own process groups

TINY = GPT2Config(max_seq_len=16, vocab_size=64, num_layers=2, num_heads=2, channels=32)
B, T, STEPS, LR = 2, 8, 4, 3e-3
ARGS = ["-b", B, "-t", T, "-x", STEPS, "-l", LR, "-c", 0.1, "-s", 0, "-v", 0, "-d", 2 * B * T,
        "--device", "emu", "--dtype", "bf16"]
U = 2.0 ** -8  # bf16 unit roundoff


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("dp_bf16"), TINY, model_seed=3, data_seed=11)


def _cmd(files, model, out, *extra):
    return [sys.executable, "-m", "llmcu", "train", "-e", str(files / model), "-i",
            str(files / "train.bin"), "-j", str(files / "val.bin"), "-o", str(out),
            # in order: 2 ranks read what 1 process accumulating 2 micro-batches reads only then
            "--no-shuffle", *map(str, ARGS), *map(str, extra)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(files, out, *extra, nproc=2, model="tiny.bin", check=True):
    """nproc `llmcu train` processes with torchrun's variables; (return codes, outputs)."""
    port, procs = _free_port(), []
    for rank in range(nproc):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) if nproc > 1 else ENV
        procs.append(subprocess.Popen(_cmd(files, model, out, *extra), env=env, cwd=files, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    if check:
        assert codes == [0] * nproc, "\n".join(o + e[-3000:] for o, e in outs)
    return codes, outs


def run_log(out):
    """(train losses, grad norms) from a run's main.jsonl (rank 0's)."""
    rows = [json.loads(line) for line in (Path(out) / "main.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    return np.array([r["train_loss"] for r in train]), np.array([r["grad_norm"] for r in train])


def params(out, step=STEPS):
    return formats.read_model(Path(out) / f"model_{step:08d}.bin")[1]


@pytest.fixture(scope="module")
def runs(files):
    """One process with -d over 2 micro-batches; 2 processes with -z 0, -z 1 (overlapped,
    checkpoints every 2 steps) and -z 1 reducing after the backward (--overlap 0)."""
    out = {"single": files / "single"}
    _, outs = launch(files, out["single"], "-n", STEPS, nproc=1)
    assert "data parallel" not in outs[0][0]
    for name, extra in (("z0", ["-z", 0]), ("z1", ["-z", 1, "-n", 2]),
                        ("z1 whole", ["-z", 1, "--overlap", 0])):
        out[name] = files / name.replace(" ", "_")
        _, outs = launch(files, out[name], *extra)
        assert f"data parallel: 2 process(es), gloo, -z {extra[1]}" in outs[0][0]
        assert "precision: bf16" in outs[0][0]
    return out


def key_bias_mask(config):
    key = np.zeros(config.num_parameters(), bool)
    parameter_views(config, key)["qkvb"][:, config.channels:2 * config.channels] = True
    return key


@pytest.mark.parametrize("zero", ["z0", "z1"])
def test_bf16_data_parallel_matches_accumulation(runs, zero):
    """2 ranks == 1 process accumulating their 2 micro-batches, within bf16's bounds.

    Where they differ: one process accumulates the second micro-batch's gradient into the
    first's bf16 gradient (each GEMM adds its fp32 product and rounds), 2 ranks round each
    micro-batch's gradient to bf16 and average them (fp32 sum, one rounding): the gradients
    differ by about one bf16 rounding, <= U = 2^-8 relative per element.
    - grad norm: so within U relative (measured 3.5e-4 relative at step 1, which has the same
      parameters in both runs, and at most 4.9e-4 over the 4 steps);
    - train loss: the same at step 1 (same parameters, mean over the same tokens); then the
      parameters differ by a bf16 ulp here and there (below): measured <= 1.8e-4 over 4
      steps; bound 2e-3 (10x), well under the step-to-step changes (~2e-2);
    - parameters: AdamW's update is ~lr * sign(g) in the first steps, so where the two
      micro-batches' gradients nearly cancel the rounding flips the sign and the element
      moves 2 lr apart per step (the key bias, whose gradient is only rounding noise, most):
      every element within 2 * lr * steps; the bulk within a few bf16 ulps of values ~0.05
      (measured 99th percentile 2.4e-4; bound 1e-3, while the parameters moved ~1e-2)."""
    ref_loss, ref_norm = run_log(runs["single"])
    loss, norm = run_log(runs[zero])
    assert len(loss) == len(ref_loss) == STEPS
    assert loss[0] == pytest.approx(ref_loss[0], abs=2e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=2e-3)
    np.testing.assert_allclose(norm, ref_norm, rtol=U, atol=0)
    p, ref = params(runs[zero]), params(runs["single"])
    init = formats.read_model(runs["single"].parent / "tiny.bin")[1]
    assert np.abs(ref - init).max() > 1e-2  # training moved them
    d = np.abs(p - ref)
    print(f"{zero}: max |loss diff| {np.abs(loss - ref_loss).max():.2e}, max norm rel diff "
          f"{np.abs(norm / ref_norm - 1).max():.2e}, params: max diff {d.max():.2e}, 99th "
          f"percentile {np.quantile(d, 0.99):.2e}")
    assert d.max() <= 2 * LR * STEPS
    assert np.quantile(d, 0.99) <= 1e-3
    assert np.quantile(d[~key_bias_mask(TINY)], 0.5) <= 2e-5  # most elements: equal or one SR ulp


def test_overlap_and_zero1_agree_bit_for_bit(runs):
    """--overlap 1 (buckets during the backward) == --overlap 0 (whole buffer after it): bit
    for bit, losses, norms and parameters (2 ranks: the same fp32 sum of two bf16 values,
    scale and rounding per element, whatever the bucket order).

    -z 0 == -z 1 in losses and parameters too (the sharded AdamW rounds with the unsharded
    one's per-element bits); only the grad norm differs, by float64 rounding (measured 6e-9
    relative): -z 1 adds the squares of two shard norms, -z 0 takes the norm of the whole
    buffer in one pass. The float32 clip factors made from them came out equal here, hence
    the equal parameters."""
    base_loss, base_norm = run_log(runs["z1"])
    loss, norm = run_log(runs["z1 whole"])
    np.testing.assert_array_equal(loss, base_loss)
    np.testing.assert_array_equal(norm, base_norm)
    np.testing.assert_array_equal(params(runs["z1 whole"]), params(runs["z1"]))
    loss, norm = run_log(runs["z0"])
    np.testing.assert_array_equal(loss, base_loss)
    np.testing.assert_allclose(norm, base_norm, rtol=1e-7, atol=0)
    np.testing.assert_array_equal(params(runs["z0"]), params(runs["z1"]))


def test_zero1_bf16_state_files_hold_the_shards(runs):
    """Each rank's state holds its shard of m, v and the fp32 master weights, and the bf16
    parameters are the stochastic rounding of the gathered master shards."""
    N = TINY.num_parameters()
    masters = []
    for rank in range(2):
        lo, hi, _ = distributed.shard_range(N, 2, rank)
        st = formats.read_train_state(runs["z1"] / f"state_{STEPS:08d}_{rank:05d}.bin", hi - lo, 2, rank)
        assert st.master is not None and st.master.size == st.m.size == hi - lo
        masters.append(st.master)
    master = np.concatenate(masters)
    bits = formats.float32_to_bf16_bits(params(runs["z1"]))  # exact: the file holds bf16
    down = master.view(np.uint32) >> 16
    assert np.all((bits == down) | (bits == down + 1))  # one of the two bf16 neighbours


def test_zero1_bf16_resume_is_bit_identical(runs, files):
    """Resume the 2-rank bf16 -z 1 run from its step-2 checkpoint: steps 2..4 repeat exactly."""
    src, out = runs["z1"], files / "resumed"
    out.mkdir()
    for name in ("model_00000002.bin", "state_00000002_00000.bin", "state_00000002_00001.bin",
                 "DONE_00000002", "main.jsonl"):
        shutil.copy(src / name, out / name)
    _, outs = launch(files, out, "-z", 1, "-n", 2, "-y", 1)
    assert "resuming from step 2" in outs[0][0]
    loss, norm = run_log(src)
    rows = [json.loads(line) for line in (out / "main.jsonl").read_text().splitlines()]
    # the copied log holds the uninterrupted run's 4 steps: the resume cut it back to its
    # checkpoint (steps 0..1) and appended 2..3, so it reads as the uninterrupted run's
    again = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in again] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in again] == list(loss)
    assert [r["grad_norm"] for r in again] == list(norm)
    for name in (f"model_{STEPS:08d}.bin", f"state_{STEPS:08d}_00000.bin", f"state_{STEPS:08d}_00001.bin"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_resume_with_another_world_size_zero_or_dtype_is_refused(runs, files, tmp_path):
    """The step-4 checkpoint of the 2-rank bf16 -z 1 run, resumed as something else."""
    N = TINY.num_parameters()
    spec = str(files / "tiny.bin")
    for world, zero in ((1, 0), (1, 1), (2, 0), (4, 1)):
        with pytest.raises(ValueError) as e:
            checkpoint.load_latest(str(runs["z1"]), spec, 0, world, zero)
        msg = str(e.value)
        assert "was written by 2 process(es) with -z 1" in msg, msg
        assert f"this run has {world} process(es) with -z {zero}" in msg, msg
    assert checkpoint.load_latest(str(runs["z1"]), spec, 1, 2, 1)[0] == STEPS  # the same: fine
    # -z 0's state files hold all N elements: named as -z 0
    with pytest.raises(ValueError, match="written by 2 process.es. with -z 0, this run has 2 "
                                         r"process\(es\) with -z 1"):
        checkpoint.load_latest(str(_z0_checkpoint(runs, files)), spec, 0, 2, 1)
    with pytest.raises(ValueError, match="is from a --dtype bf16 run .* this run is --dtype fp32"):
        distributed.check_resume_dtype(str(runs["z1"] / f"model_{STEPS:08d}.bin"), "fp32")
    distributed.check_resume_dtype(str(runs["z1"] / f"model_{STEPS:08d}.bin"), "bf16")
    assert distributed.saved_layout(str(runs["z1"] / f"state_{STEPS:08d}_00001.bin"), N) == (2, 1)
    # end to end: one process resuming it stops before training, with the message
    out = tmp_path / "one"
    shutil.copytree(runs["z1"], out)
    codes, outs = launch(files, out, "-z", 1, "-y", 1, nproc=1, check=False)
    assert codes == [2], outs
    assert "was written by 2 process(es) with -z 1, this run has 1 process(es) with -z 1" in outs[0][1]
    # and the 1-process run's checkpoint resumed as fp32: the dtype is named
    codes, outs = launch(files, runs["single"], "-y", 1, "--dtype", "fp32", nproc=1, check=False)
    assert codes == [2], outs
    assert "is from a --dtype bf16 run (model file version 5), this run is --dtype fp32" in outs[0][1]


def _z0_checkpoint(runs, files):
    """A -z 0 state file layout from the -z 1 run's: rank r's file with all N elements."""
    d = files / "z0_layout"
    d.mkdir(exist_ok=True)
    N = TINY.num_parameters()
    shutil.copy(runs["z1"] / f"model_{STEPS:08d}.bin", d / f"model_{STEPS:08d}.bin")
    for rank in range(2):
        z = np.zeros(N, np.float32)
        formats.write_train_state(d / f"state_{STEPS:08d}_{rank:05d}.bin", formats.TrainState(
            step=STEPS, m=z, v=z, loader={"shard_index": 0, "sample_index": 0},
            num_processes=2, rank=rank))
    (d / f"DONE_{STEPS:08d}").touch()
    return d


# ----------------------------------------------------------------------------
# in process: the bucket schedule and the sharded bf16 update

def test_layer_buckets_cover_every_parameter_once():
    from llmcu.llama_config import LlamaConfig
    llama = LlamaConfig(max_seq_len=16, vocab_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                        channels=16, hidden_dim=24)
    for config in (TINY, llama):
        buckets = layer_buckets(config)
        assert len(buckets) == config.num_layers + 1
        owned = np.zeros(config.num_parameters(), np.int64)
        for ranges in buckets:
            for a, b in ranges:
                owned[a:b] += 1
        assert (owned == 1).all()
    # bucket 0 is the last layer (the backward finishes it first): its qkvw slice
    views = parameter_views(TINY, np.arange(TINY.num_parameters()))
    first = views["qkvw"][TINY.num_layers - 1]
    assert (int(first.min()), int(first.max()) + 1) in layer_buckets(TINY)[0]


def test_buckets_start_during_the_last_micro_steps_backward(tmp_path):
    """A 1-rank gloo group (real asynchronous work handles) around the bf16 kernel model: with
    2 micro-steps, the first backward starts nothing; in the second, bucket L-1-l starts when
    layer l's backward is done and before layer l-1's has run (its gradient still holds only
    the first micro-step's), the last bucket after the backward; the result equals the whole
    buffer reduced after the backward bit for bit."""
    from llmcu.cuda.gpt2 import GPT2
    comm = distributed.GlooCommunicator(distributed.ProcessGroup(0, 1, 0, "test"), "fs",
                                        str(tmp_path / "rdzv"))
    try:
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, TINY.vocab_size, (B, T + 1)) for _ in range(2)]
        p0 = init_parameters(TINY, seed=3)
        results = {}
        for overlap in (True, False):
            model = GPT2(TINY, p0.copy(), device="emu", dtype="bf16")
            dp = distributed.DataParallel(model, comm, zero_stage=1, overlap=overlap, accum_steps=2)
            seen = []
            start = dp.reducer.start

            def spy(b, grads, start=start, seen=seen, model=model, dp=dp):
                L = TINY.num_layers
                below = L - 2 - b  # the layer the backward computes next (-1: none)
                untouched = None
                if 0 <= below:
                    g = parameter_views(TINY, model.grads)["fcprojw"][below].copy()
                    untouched = np.array_equal(g, first_grads["fcprojw"][below])
                seen.append((dp._micro, b, untouched))
                start(b, grads)
            dp.reducer.start = spy
            dp.zero_grad()
            first_grads = None
            for i, batch in enumerate(batches):
                dp.forward(batch[:, :-1], batch[:, 1:])
                dp.backward(loss_scale=0.5)
                if i == 0:
                    first_grads = {k: v.copy() for k, v in parameter_views(TINY, model.grads).items()}
            norm = dp.grad_norm()
            dp.update(1e-3, 1, weight_decay=0.1, grad_clip=1.0, grad_norm=norm)
            results[overlap] = (norm, model.params.copy(), model.master.copy())
            if overlap:
                L = TINY.num_layers
                assert [(m, b) for m, b, _ in seen] == [(2, b) for b in range(L + 1)]
                assert all(u for _, b, u in seen if u is not None)
                assert dp.reducer.history == [list(range(L + 1))]
                with pytest.raises(RuntimeError, match="micro-step 3 of an optimizer step of 2"):
                    dp.forward(batches[0][:, :-1], batches[0][:, 1:])
                    dp.backward()
            else:
                assert seen == [] and dp.reducer.history == []
        assert results[True][0] == results[False][0]
        for a, b in zip(results[True][1:], results[False][1:]):
            np.testing.assert_array_equal(a, b)
    finally:
        comm.close()


@pytest.mark.parametrize("master_weights", [True, False], ids=["master", "no-master"])
def test_sharded_bf16_update_equals_the_full_update(master_weights):
    """keep_shard + update(shard=) on each of 3 shards (an odd size: shards cut tensors, the
    last one short), put together, is the unsharded bf16 update bit for bit: parameters
    (stochastic rounding with the same per-element bits), master weights, m and v; without
    master weights (-w 0) the bf16 parameters are updated in place, on the shard only."""
    from llmcu.cuda.gpt2 import GPT2
    config = GPT2Config(max_seq_len=8, vocab_size=40, num_layers=1, num_heads=2, channels=8)
    N, world = config.num_parameters(), 3
    assert N % world != 0
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [formats.float32_to_bf16_bits(rng.standard_normal(N).astype(np.float32)) for _ in range(2)]

    def run(shard):
        model = GPT2(config, p0.copy(), device="emu", dtype="bf16", master_weights=master_weights)
        if shard is not None:
            model.keep_shard(shard)
        for step, g in enumerate(grads, 1):
            model.zero_grad()
            model.grads[...] = g
            model.update(1e-2, step, weight_decay=0.1, grad_clip=1.0, grad_norm=3.0, shard=shard)
        master = model.master.copy() if master_weights else np.zeros(0, np.float32)
        return model.params.copy(), master, model.m.copy(), model.v.copy()

    full_p, full_master, full_m, full_v = run(None)
    parts = []
    for rank in range(world):
        lo, hi, _ = distributed.shard_range(N, world, rank)
        p, master, m, v = run((lo, hi))
        np.testing.assert_array_equal(p[lo:hi], full_p[lo:hi])
        np.testing.assert_array_equal(np.delete(p, np.s_[lo:hi]),
                                      np.delete(formats.float32_to_bf16_bits(p0), np.s_[lo:hi]))
        parts.append((master, m, v))
    for i, full in enumerate((full_master, full_m, full_v)):
        np.testing.assert_array_equal(np.concatenate([part[i] for part in parts]), full)
    model = GPT2(config, p0.copy(), device="emu", dtype="bf16")
    model.zero_grad()
    with pytest.raises(ValueError, match=r"shard must be the one keep_shard\(\) set, None"):
        model.update(1e-2, 1, shard=(0, 4))


# ----------------------------------------------------------------------------
# a Llama preset

def test_llama_bf16_zero1_matches_accumulation(tmp_path):
    """A tiny Llama (grouped-query attention, SwiGLU, RMSNorm), bf16 on the kernels: 2 ranks
    with -z 1 against 1 process with -d, 4 steps; bounds and reasons as for GPT-2 above
    (measured here: losses within 2.0e-4, norms within 6.6e-4 relative)."""
    from llmcu.cpu.llama import init_parameters as llama_init
    from llmcu.llama_config import LlamaConfig
    config = LlamaConfig(max_seq_len=16, vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                         channels=32, hidden_dim=48)
    formats.write_model(tmp_path / "llama.bin", config, llama_init(config, seed=7))
    rng = np.random.default_rng(11)
    formats.write_shard(tmp_path / "train.bin", rng.integers(0, config.vocab_size, 4000))
    formats.write_shard(tmp_path / "val.bin", rng.integers(0, config.vocab_size, 1000))
    launch(tmp_path, tmp_path / "one", nproc=1, model="llama.bin")
    _, outs = launch(tmp_path, tmp_path / "two", "-z", 1, model="llama.bin")
    assert "data parallel: 2 process(es), gloo, -z 1" in outs[0][0]
    (ref_loss, ref_norm), (loss, norm) = run_log(tmp_path / "one"), run_log(tmp_path / "two")
    assert len(loss) == STEPS
    print(f"llama: max |loss diff| {np.abs(loss - ref_loss).max():.2e}, max norm rel diff "
          f"{np.abs(norm / ref_norm - 1).max():.2e}")
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=2e-3)
    np.testing.assert_allclose(norm, ref_norm, rtol=U, atol=0)
    d = np.abs(params(tmp_path / "two") - params(tmp_path / "one"))
    assert d.max() <= 2 * LR * STEPS and np.quantile(d, 0.99) <= 1e-3


# ----------------------------------------------------------------------------
# on a GPU: NCCL at world size 1 (not run here: no GPU in this session)

def _cuda_available():
    from llmcu import cuda as llmcu_cuda
    return llmcu_cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU with CuPy here")
@pytest.mark.parametrize("zero", [0, 1])
def test_nccl_bf16_world_size_1_matches_plain_bf16_run(files, tmp_path, zero):
    """One GPU, NCCL at world size 1, bf16, the bucketed reduction on the second stream: the
    plain bf16 run bit for bit (a 1-rank ncclAvg copies, the -z 1 shard is the whole buffer and
    its one-launch update rounds with the per-tensor loop's bits); the grad norm within float64
    rounding (-z 1: sqrt of a sum of one square). Prints both runs' median step times: at world
    size 1 the difference bounds the bucketed reduction's overhead."""
    args = ["--device", "cuda", "-x", 8, "-n", 0]
    plain = tmp_path / "plain"
    r = subprocess.run(_cmd(files, "tiny.bin", plain, *args), env=ENV, cwd=files, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    nccl = tmp_path / "nccl"
    env = dict(ENV, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    r = subprocess.run(_cmd(files, "tiny.bin", nccl, *args, "--dist-backend", "nccl", "-z", zero),
                       env=env, cwd=files, text=True, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data parallel: 1 process(es), nccl, -z {zero}" in r.stdout
    (loss, norm), (ref_loss, ref_norm) = run_log(nccl), run_log(plain)
    np.testing.assert_array_equal(loss, ref_loss)
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-14, atol=0)
    np.testing.assert_array_equal(params(nccl, 8), params(plain, 8))
    ms = {name: float(np.median([json.loads(line)["ms"] for line in (out / "main.jsonl").read_text()
                                 .splitlines() if "train_loss" in json.loads(line)][2:]))
          for name, out in (("plain", plain), ("nccl", nccl))}
    print(f"-z {zero}: median step {ms['plain']:.2f} ms plain, {ms['nccl']:.2f} ms NCCL world size 1")


# ----------------------------------------------------------------------------
# the NCCL reducer's calls, against a stand-in for CuPy (no GPU here: this checks the
# arguments and their order, not NCCL)

class _Stream:
    def __init__(self, log, name):
        self.log, self.name, self.ptr = log, name, id(self)

    def wait_event(self, event):
        self.log.append(("wait", self.name, event.recorded_on))


class _Event:
    def __init__(self, log, disable_timing=False):
        self.log, self.recorded_on = log, None

    def record(self, stream):
        self.recorded_on = stream.name
        self.log.append(("record", stream.name))


class _DeviceArray(np.ndarray):
    """A NumPy array with CuPy's .data.ptr (its address)."""
    @property
    def data(self):
        from types import SimpleNamespace
        return SimpleNamespace(ptr=self.ctypes.data)


def _fake_cupy(monkeypatch, log):
    import types
    main = _Stream(log, "main")
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.NCCL_FLOAT32 = 7  # the others (NCCL_BFLOAT16, NCCL_AVG) missing, as in older CuPy
    nccl.groupStart = lambda: log.append(("groupStart",))
    nccl.groupEnd = lambda: log.append(("groupEnd",))
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cuda.Stream = lambda non_blocking=False: _Stream(log, "comm")
    cuda.Event = lambda disable_timing=False: _Event(log, disable_timing)
    cuda.get_current_stream = lambda: main
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    for name, mod in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, mod)
    return main


class _NcclLog:
    def __init__(self, log):
        self.log = log

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.log.append(("allReduce", send, recv, count, dtype, op, stream))

    def reduce(self, send, recv, count, dtype, op, root, stream):
        self.log.append(("reduce", send, recv, count, dtype, op, root, stream))


@pytest.mark.parametrize("zero", [0, 1])
def test_nccl_bucket_calls(monkeypatch, zero):
    """Each bucket: an event on the compute stream, the communication stream waits on it, then
    one NCCL group of in-place ncclAvg calls on bf16 (9, 4: nccl.h's ncclBfloat16, ncclAvg)
    over the bucket's ranges (-z 0: all-reduce; -z 1: a reduce of each piece to the rank owning
    it), on the communication stream; every element exactly once. finish: the compute stream
    waits on an event recorded on the communication stream, and collectives issued meanwhile
    on the compute stream (the loss average) wait for the buckets too."""
    from types import SimpleNamespace

    from llmcu.buckets import GradientReducer
    log = []
    main = _fake_cupy(monkeypatch, log)
    N, W = TINY.num_parameters(), 3
    shards = [distributed.shard_range(N, W, r)[:2] for r in range(W)]
    comm = SimpleNamespace(backend="nccl", world_size=W, rank=1, comm=_NcclLog(log), wait_for=None)
    reducer = GradientReducer(comm, TINY, np.uint16, shards[1] if zero else None,
                              shards if zero else None)
    grads = np.zeros(N, np.uint16).view(_DeviceArray)
    base = grads.data.ptr
    for b in range(TINY.num_layers + 1):
        reducer.start(b, grads)
        assert comm.wait_for is not None
    comm_stream = reducer._cuda
    calls = [c for c in log if c[0] in ("allReduce", "reduce")]
    covered = np.zeros(N, np.int64)
    for c in calls:
        send, recv, count = c[1:4]
        assert send == recv and (send - base) % 2 == 0
        a = (send - base) // 2
        covered[a:a + count] += 1
        assert c[4:6] == (9, 4) and c[-1] == comm_stream.ptr
        if zero:
            assert shards[c[6]][0] <= a and a + count <= shards[c[6]][1]  # sent to its owner
    assert (covered == 1).all() and {c[0] for c in calls} == {"reduce" if zero else "allReduce"}
    # per bucket: record on main, comm waits on it, then the group
    starts = [i for i, c in enumerate(log) if c == ("record", "main")]
    assert len(starts) == TINY.num_layers + 1
    for i in starts:
        assert log[i + 1] == ("wait", "comm", "main") and log[i + 2] == ("groupStart",)
    # a collective on the compute stream now waits for the buckets
    comm.wait_for(main)
    assert log[-2:] == [("record", "comm"), ("wait", "main", "comm")]
    reducer.finish(grads)
    assert log[-2:] == [("record", "comm"), ("wait", "main", "comm")]
    assert comm.wait_for is None and reducer.history == [list(range(TINY.num_layers + 1))]
