"""Data-parallel training (llmcu/distributed.py) on the CPU backend (gloo).

The launches are real: torchrun (python -m torch.distributed.run) for the
training runs, torch.multiprocessing for the collectives, and plain
`python -m llmcu train` processes with torchrun's variables for the bad
launches. Everything runs on a tiny GPT-2 (L=2, C=32, V=64) written by the
test, so a 10-step run takes seconds.

What 2 ranks must reproduce: 1 process with -d accumulating 2 micro-batches
of the same B. Rank r reads batch r of every pair, exactly the micro-batch
the single process reads second when r = 1, and (g0 + g1) / 2 is the
accumulated gradient up to float32 summation order (see test_data_parallel_
matches_accumulation for the tolerances).
"""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_close, subprocess_env, write_tiny_run
from llmcu import cuda as llmcu_cuda
from llmcu import checkpoint, distributed, formats
from llmcu.config import GPT2Config, parameter_views

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(launcher=False)  # the tests launch their own process groups

TINY = GPT2Config(max_seq_len=16, vocab_size=64, num_layers=2, num_heads=2, channels=32)
B, T, STEPS, LR = 2, 8, 10, 3e-3
# lr 3e-3 and weight decay 0.1 move the parameters by up to 3e-2 in 10 steps; grad clip 1.0
# (the default) clips most steps (norms 1.1-2.0). (At lr 1e-2 this tiny model's trajectory is
# chaotic: float32 rounding differences grow to 1e-5 in the loss by step 9, so two runs that
# differ only in summation order can no longer be compared tightly.)
# --no-shuffle: the runs are compared with one process accumulating 2 micro-batches, which
# equals 2 ranks' slices only when both read the windows in order (shuffled, the permuted
# windows are P*B*T tokens for the ranks but B*T for the single process; tests/test_data.py
# checks the shuffled ranks' slices)
TRAIN_ARGS = ["-b", B, "-t", T, "-x", STEPS, "-l", LR, "-c", 0.1, "-s", 0, "-v", 5, "-m", 2, "--no-shuffle"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("dist"), TINY, model_seed=3, data_seed=11)


def _train_cmd(files, out, *extra):
    return ["-m", "llmcu", "train", "-e", str(files / "tiny.bin"), "-i", str(files / "train.bin"),
            "-j", str(files / "val.bin"), "-o", str(out), *map(str, TRAIN_ARGS), *map(str, extra)]


def _torchrun(files, out, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *_train_cmd(files, out, *extra)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=files)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _run_log(out):
    """(train losses, grad norms, {step: val loss}) from a run's main.jsonl (written by rank 0)."""
    rows = [json.loads(line) for line in (Path(out) / "main.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    return ([r["train_loss"] for r in train], [r["grad_norm"] for r in train],
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


@pytest.fixture(scope="module")
def runs(files):
    """The single-process reference (-d over 2 micro-batches) and the 2-rank runs (-z 0, -z 1)."""
    single = files / "single"
    r = subprocess.run([sys.executable, *_train_cmd(files, single, "-d", 2 * B * T)], env=ENV,
                       capture_output=True, text=True, timeout=300, cwd=files)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel" not in r.stdout  # one process: no communicator at all
    out = {"single": single}
    for z in (0, 1):
        out[z] = files / f"dp_z{z}"
        r = _torchrun(files, out[z], "-d", 2 * B * T, "-z", z, "-n", 5)
        assert f"data parallel: 2 process(es), gloo, -z {z}" in r.stdout
    return out


# ----------------------------------------------------------------------------
# the process group from the environment

@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, "none")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"},
     (3, 4, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (5, 8, 1, "Open MPI")),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "2"}, (2, 3, 2, "MPICH/PMI")),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "16", "SLURM_LOCALID": "6"}, (6, 16, 6, "SLURM")),
    ({"SLURM_NTASKS": "16"}, (0, 1, 0, "none")),  # inside an allocation, not launched by srun
    # torchrun started by srun: torchrun's variables win
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
     (1, 2, 1, "torchrun")),
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2, None, "torchrun")),  # no local rank: only a GPU needs it
])
def test_process_group_from_env(env, want):
    pg = distributed.process_group_from_env(env)
    assert (pg.rank, pg.world_size, pg.local_rank, pg.launcher) == want


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2 is set but RANK is not"]),
    ({"RANK": "0"}, ["RANK=0 is set but WORLD_SIZE is not"]),
    ({"RANK": "2", "WORLD_SIZE": "2"}, ["RANK must be in [0, 2)", "found 2"]),
    ({"RANK": "one", "WORLD_SIZE": "2"}, ["RANK must be an integer", "'one'"]),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, ["Open MPI", "OMPI_COMM_WORLD_RANK is not"]),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, ["PMI_SIZE must be >= 1"]),
])
def test_incomplete_environment_is_a_clear_error(env, words):
    with pytest.raises(ValueError) as e:
        distributed.process_group_from_env(env)
    for w in words:
        assert w in str(e.value)


def test_cli_world_size_without_rank(files, tmp_path):
    r = subprocess.run([sys.executable, *_train_cmd(files, tmp_path / "o")],
                       env=dict(ENV, WORLD_SIZE="2"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "llmcu train: error: process group (torchrun): WORLD_SIZE=2 is set but RANK is not" in r.stderr
    assert "Traceback" not in r.stderr


def test_rank_without_its_gpu_is_a_clear_error():
    # a node with 2 GPUs (simulated device count) and 4 processes on it: local rank 3 has none
    env = {"RANK": "7", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n0", "MASTER_PORT": "1"}
    with pytest.raises(ValueError) as e:
        distributed.init_communicator("nccl", "cuda", environ=env, device_count=lambda: 2)
    msg = str(e.value)
    for w in ("rank 7", "local rank 3", "needs GPU 3", "2 GPU(s)", "--nproc_per_node 2"):
        assert w in msg, msg
    pg = distributed.process_group_from_env(env)
    assert distributed.select_gpu(pg, 4) == 3  # with enough GPUs it is its local rank
    with pytest.raises(ValueError, match="has no local rank"):
        distributed.select_gpu(distributed.ProcessGroup(1, 2, None, "torchrun"), 4)
    with pytest.raises(ValueError, match="needs a GPU but this node has none"):
        distributed.select_gpu(pg, 0)


def test_backend_and_device_must_fit():
    with pytest.raises(ValueError, match="nccl needs --device cuda"):
        distributed.init_communicator("nccl", "cpu", environ={})
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.init_communicator("mpi", "cpu", environ={})
    assert isinstance(distributed.init_communicator("auto", "cpu", environ={}),
                      distributed.LocalCommunicator)


def test_shard_range_covers_every_parameter_once():
    for n, world in ((30080, 2), (30081, 2), (7, 3), (5, 8)):
        owned = np.zeros(n, np.int64)
        for r in range(world):
            lo, hi, S = distributed.shard_range(n, world, r)
            assert hi - lo <= S and S * world >= n
            owned[lo:hi] += 1
        assert (owned == 1).all(), (n, world)


# ----------------------------------------------------------------------------
# the gloo collectives and the configuration check, 2 processes

def _collectives_worker(rank, init_file, result_file, port, uid_file):
    # the NCCL unique id's way from rank 0 to the others (no GPU needed): TCPStore, shared file
    pg = distributed.ProcessGroup(rank, 2, rank, "test", "127.0.0.1", port)
    out = {}
    for method in ("tcp", "fs"):
        payload = distributed._encode_uid(bytes(range(128))) if rank == 0 else None
        got = distributed.exchange_unique_id(pg, payload, method, uid_file, timeout_s=60)
        out["uid " + method] = list(distributed._decode_uid(got))
    comm = distributed.GlooCommunicator(distributed.ProcessGroup(rank, 2, rank, "test"), "fs", init_file)
    rng = np.random.default_rng(100 + rank)
    x = rng.standard_normal(10).astype(np.float32)
    out["x"] = x.tolist()
    out["mean"] = comm.all_reduce_mean(x.copy()).tolist()
    piece = np.full(5, np.nan, np.float32)  # poisoned: every element must be written
    out["rs"] = comm.reduce_scatter_mean(piece, x.copy()).tolist()
    full = np.full(10, np.nan, np.float32)
    out["ag"] = comm.all_gather(full, x[:5].copy()).tolist()
    out["avg"] = comm.average(float(rank) + 0.25)
    out["host"] = comm.all_gather_host(np.array([rank, 10 + rank], np.int64)).tolist()
    try:
        distributed.check_same_config(comm, {"batch_size": 4 + rank, "seq_len": 64})
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    distributed.check_same_config(comm, {"batch_size": 4, "seq_len": 64})  # equal: passes
    comm.close()
    with open(f"{result_file}.{rank}", "w") as f:
        json.dump(out, f)


def test_gloo_collectives_rendezvous_and_config_check(tmp_path):
    import torch.multiprocessing as mp
    res = tmp_path / "res"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives_worker, args=(str(tmp_path / "rdzv"), str(res), port, str(tmp_path / "uid")),
             nprocs=2)
    outs = [json.loads(Path(f"{res}.{r}").read_text()) for r in range(2)]
    for o in outs:  # rank 1 received rank 0's id both ways
        assert o["uid tcp"] == o["uid fs"] == list(range(128))
    # old CuPy's ids are tuples of signed chars: they survive the trip as tuples
    uid = tuple(range(-64, 64))
    assert distributed._decode_uid(distributed._encode_uid(uid)) == uid
    # a file left by an earlier run is refused, not read; tcp without MASTER_ADDR says what to set
    with pytest.raises(ValueError, match="exists already"):
        distributed.exchange_unique_id(distributed.ProcessGroup(0, 2, 0, "test"), b"x", "fs",
                                       str(tmp_path / "uid"))
    with pytest.raises(ValueError, match="needs MASTER_ADDR and MASTER_PORT"):
        distributed.exchange_unique_id(distributed.ProcessGroup(0, 2, 0, "SLURM"), b"x", "tcp")
    x = np.array([o["x"] for o in outs], np.float32)
    mean = (x[0] + x[1]) * np.float32(0.5)  # two terms: the sum is exact to the rounding of one add
    for r, o in enumerate(outs):
        # a sum of two float32 values rounds the same way in any order: exact equality
        np.testing.assert_array_equal(np.array(o["mean"], np.float32), mean)
        np.testing.assert_array_equal(np.array(o["rs"], np.float32), mean[5 * r:5 * r + 5])
        np.testing.assert_array_equal(np.array(o["ag"], np.float32), np.concatenate([x[0, :5], x[1, :5]]))
        assert o["avg"] == pytest.approx(0.75, abs=1e-15)
        assert o["host"] == [[0, 10], [1, 11]]
        # every rank raises, naming the field and each rank's value
        assert "mismatched configurations across ranks" in o["mismatch"]
        assert "batch_size: rank 0 has 4, rank 1 has 5" in o["mismatch"]
        assert "seq_len" not in o["mismatch"]


def test_cli_mismatched_configurations(files, tmp_path):
    """Two `llmcu train` processes launched by hand with torchrun's variables and different -b."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, b in ((0, 2), (1, 4)):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, *_train_cmd(files, tmp_path / "o"), "-b", str(b)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        assert "mismatched configurations across ranks" in err, err
        assert "batch_size: rank 0 has 2, rank 1 has 4" in err, err


# ----------------------------------------------------------------------------
# training: 2 ranks == 1 process accumulating 2 micro-batches

@pytest.mark.parametrize("zero", [0, 1])
def test_data_parallel_matches_accumulation(runs, zero):
    ref_loss, ref_norm, _ = _run_log(runs["single"])
    loss, norm, val = _run_log(runs[zero])
    assert len(loss) == len(ref_loss) == STEPS
    # The losses and norms are computed from parameters that differ by float32 rounding (below):
    # measured <= 7e-8 relative (in-process replay of both orders); 1e-6 leaves a 10x margin and
    # is far below the step-to-step changes (~1e-2), so a wrong data slice or a wrong average fails.
    assert_close("train loss", np.array(loss), np.array(ref_loss), atol=0, rtol=1e-6)
    assert_close("grad norm", np.array(norm), np.array(ref_norm), atol=0, rtol=1e-6)
    assert sorted(val) == [0, 5, 10]  # rank 0 logged the (rank-averaged) val loss

    config, ref = formats.read_model(runs["single"] / f"model_{STEPS:08d}.bin")
    _, params = formats.read_model(runs[zero] / f"model_{STEPS:08d}.bin")
    assert config == TINY
    init = formats.read_model(runs["single"].parent / "tiny.bin")[1]
    assert np.abs(ref - init).max() > 1e-2  # training moved the parameters (by ~3e-2)
    # Tolerances. The two runs add the same per-token gradient terms in a different order
    # (wte, tied to the classifier, gets its two terms per micro-batch before the micro-batches
    # are summed instead of after), so the gradients differ by float32 rounding (measured 1.5e-8
    # on values up to 0.4) and AdamW's normalised update carries that to about lr * 1e-5 per
    # step: measured <= 1.2e-7 after 10 steps; 1e-6 allows 8x that (the update itself is ~3e-3).
    # The key bias (qkvb rows C..2C) is the exception: softmax is invariant to adding a constant
    # to a row of scores, so its gradient is zero up to rounding noise (~1e-11), whose sign
    # depends on the summation order, and AdamW (eps 1e-8) turns it into steps of up to
    # lr * |g| / eps of either sign: measured 1e-5 after 10 steps; we allow
    # 2 * lr * STEPS * 1e-2 = 6e-4 there (noise up to 1e-10 every step).
    C = TINY.channels
    key = np.zeros(ref.size, bool)
    parameter_views(TINY, key)["qkvb"][:, C:2 * C] = True
    assert_close("parameters (key bias excluded)", params[~key], ref[~key], atol=1e-6, rtol=0)
    assert_close("key bias", params[key], ref[key], atol=2 * LR * STEPS * 1e-2, rtol=0)


def test_zero1_on_the_kernel_model_emu(files):
    """The kernel model (the .cu kernels, emulated) under -z 1 on 2 ranks: its AdamW kernel on
    the shards and its norm kernel on the shards reproduce 1 process accumulating 2 micro-batches
    (4 steps; tolerances as in test_data_parallel_matches_accumulation)."""
    args = ["--device", "emu", "-x", 4, "-v", 0, "-d", 2 * B * T]
    single, dp = files / "emu_single", files / "emu_z1"
    r = subprocess.run([sys.executable, *_train_cmd(files, single, *args)], env=ENV,
                       capture_output=True, text=True, timeout=300, cwd=files)
    assert r.returncode == 0, r.stderr[-3000:]
    _torchrun(files, dp, *args, "-z", 1)
    ref_loss, ref_norm, _ = _run_log(single)
    loss, norm, _ = _run_log(dp)
    assert len(loss) == 4
    assert_close("train loss", np.array(loss), np.array(ref_loss), atol=0, rtol=1e-6)
    assert_close("grad norm", np.array(norm), np.array(ref_norm), atol=0, rtol=1e-6)
    ref = formats.read_model(single / "model_00000004.bin")[1]
    params = formats.read_model(dp / "model_00000004.bin")[1]
    C = TINY.channels
    key = np.zeros(ref.size, bool)
    parameter_views(TINY, key)["qkvb"][:, C:2 * C] = True
    assert_close("parameters (key bias excluded)", params[~key], ref[~key], atol=1e-6, rtol=0)
    assert_close("key bias", params[key], ref[key], atol=2 * LR * 4 * 1e-2, rtol=0)


def test_zero1_shards_the_optimizer_state(runs):
    """-z 1 state files hold each rank's half of m and v; together they are -z 0's m and v."""
    N = TINY.num_parameters()
    full = formats.read_train_state(runs[0] / f"state_{STEPS:08d}_00001.bin", N, 2, 1)
    parts = []
    for rank in range(2):
        lo, hi, _ = distributed.shard_range(N, 2, rank)
        st = formats.read_train_state(runs[1] / f"state_{STEPS:08d}_{rank:05d}.bin", hi - lo, 2, rank)
        assert (st.num_processes, st.rank, st.m.size) == (2, rank, hi - lo)
        parts.append(st)
    m = np.concatenate([p.m for p in parts])
    v = np.concatenate([p.v for p in parts])
    # same gradients (the reduce-scatter adds the same two terms as the all-reduce) but for the
    # clip factor, whose norm sums the shards' squares in another order: ~1e-7 relative. The
    # key-bias moments are rounding noise (see above) and compared with the noise bound.
    key = np.zeros(N, bool)
    parameter_views(TINY, key)["qkvb"][:, TINY.channels:2 * TINY.channels] = True
    assert_close("m", m[~key], full.m[~key], atol=1e-9, rtol=1e-4)
    assert_close("v", v[~key], full.v[~key], atol=1e-12, rtol=1e-4)
    assert np.abs(m[key]).max() < 1e-9
    # a plain-DP state cannot be read as a shard, nor a rank's as another's
    with pytest.raises(formats.FormatError, match="expected the state of rank 0 of 2"):
        formats.read_train_state(runs[1] / f"state_{STEPS:08d}_00001.bin", N - N // 2, 2, 0)


def test_zero1_resume_reproduces_uninterrupted_run(runs, files):
    """Resume a 2-rank -z 1 run from its step-5 checkpoint: steps 5..10 repeat bit for bit."""
    src, out = runs[1], files / "resumed_z1"
    out.mkdir()
    for name in ("model_00000005.bin", "state_00000005_00000.bin", "state_00000005_00001.bin",
                 "DONE_00000005", "main.log", "main.jsonl"):
        shutil.copy(src / name, out / name)
    r = _torchrun(files, out, "-d", 2 * B * T, "-z", 1, "-n", 5, "-y", 1)
    assert "resuming from step 5" in r.stdout
    loss, norm, val = _run_log(src)
    # the copied log holds the uninterrupted run's 10 steps: the resume cut it back to its
    # checkpoint (steps 0..4, val up to 5) and appended steps 5..9 and val 10
    again_loss, again_norm, again_val = _run_log(out)
    # the same operations on the same data in the same order: exactly equal
    assert again_loss == loss and again_norm == norm and again_val == val
    rows = [json.loads(line) for line in (out / "main.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(STEPS))
    np.testing.assert_array_equal(formats.read_model(out / f"model_{STEPS:08d}.bin")[1],
                                  formats.read_model(src / f"model_{STEPS:08d}.bin")[1])
    for rank in range(2):
        name = f"state_{STEPS:08d}_{rank:05d}.bin"
        assert (out / name).read_bytes() == (src / name).read_bytes()


def test_resume_with_another_world_size_is_a_clear_error(runs, files, tmp_path):
    """A 2-rank -z 1 checkpoint resumed by one process: the state files say so."""
    out = tmp_path / "one"
    shutil.copytree(runs[1], out)
    r = subprocess.run([sys.executable, *_train_cmd(files, out), "-z", "1", "-n", "5", "-y", "1"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert ("was written by 2 process(es) with -z 1, this run has 1 process(es) with -z 1; a "
            "ZeRO-1 state is split by world size, so resume with 2 process(es) and -z 1") in r.stderr, r.stderr


@pytest.mark.parametrize("device", ["cpu", "emu"])
def test_update_on_a_shard_matches_the_full_update(device):
    """ZeRO-1's AdamW on each rank's shard (update(shard=)), put together, is the full AdamW:
    both backends, an odd parameter count so the last shard is short and shards cut tensors."""
    from llmcu.train import make_model
    config = GPT2Config(max_seq_len=8, vocab_size=40, num_layers=1, num_heads=2, channels=8)
    N = config.num_parameters()
    world = 3
    assert N % world != 0
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(N).astype(np.float32)
    grads = [rng.standard_normal(N).astype(np.float32) for _ in range(2)]

    def run(shard):
        model = make_model(config, p0.copy(), device)
        for step, g in enumerate(grads, 1):
            model.zero_grad()
            model.grads[...] = model.xp.asarray(g) if hasattr(model, "xp") else g
            model.update(1e-2, step, weight_decay=0.1, grad_clip=1.0, grad_norm=3.0, shard=shard)
        params = np.asarray(model.params_host()).copy()
        m, v = model.optimizer_state()
        return params, np.asarray(m), np.asarray(v)

    full_p, full_m, full_v = run(None)
    m_parts, v_parts = [], []
    for rank in range(world):
        lo, hi, _ = distributed.shard_range(N, world, rank)
        p, m, v = run((lo, hi))
        # the same elementwise AdamW on the same elements: bit-identical on the shard ...
        np.testing.assert_array_equal(p[lo:hi], full_p[lo:hi])
        # ... and nothing outside it moved
        np.testing.assert_array_equal(np.delete(p, np.s_[lo:hi]), np.delete(p0, np.s_[lo:hi]))
        m_parts.append(m)
        v_parts.append(v)
    np.testing.assert_array_equal(np.concatenate(m_parts), full_m)
    np.testing.assert_array_equal(np.concatenate(v_parts), full_v)
    with pytest.raises(ValueError, match=r"update_parameters: m must hold 3 elements \(the shard 0:3\)"):
        model = make_model(config, p0.copy(), device)
        model.zero_grad()
        model.update(1e-2, 1, shard=(0, 4))
        model.update(1e-2, 2, shard=(0, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not llmcu_cuda.is_available(), reason="no CUDA GPU with CuPy here")
@pytest.mark.parametrize("zero", [0, 1])
def test_nccl_world_size_1_matches_plain_cuda_run(files, zero):
    """The NCCL path on one GPU (torchrun, world size 1): the same run as without a
    communicator, bit for bit (a 1-rank all-reduce / reduce-scatter / all-gather copies, the
    mean multiplies by 1.0, the shard is the whole buffer). Multi-GPU: not measured here.
    Passed on an H200 (2026-11-28) once both runs were pinned to fp32."""
    plain = files / f"cuda_plain_z{zero}"
    # --dtype fp32 on both: "auto" would make the single-process run bf16 on a bf16 GPU and
    # the data-parallel one fp32 (seen on an H200, 2026-11-28: losses differed at step 0)
    r = subprocess.run([sys.executable, *_train_cmd(files, plain, "--device", "cuda", "--dtype", "fp32")], env=ENV,
                       capture_output=True, text=True, timeout=300, cwd=files)
    assert r.returncode == 0, r.stderr[-3000:]
    nccl = files / f"cuda_nccl_z{zero}"
    r = _torchrun(files, nccl, "--device", "cuda", "--dtype", "fp32", "--dist-backend", "nccl", "-z", zero,
                  nproc=1)
    assert f"data parallel: 1 process(es), nccl, -z {zero}" in r.stdout
    (loss, norm, _), (ref_loss, ref_norm, _) = _run_log(nccl), _run_log(plain)
    assert loss == ref_loss
    # -z 1 takes the norm as sqrt(sum over shards of norm^2): sqrt(sqrt(s)^2) in float64 can be
    # 1 ulp off sqrt(s); the float32 clip factor made from it is the same
    assert_close("grad norm", np.array(norm), np.array(ref_norm), atol=0, rtol=1e-14)
    np.testing.assert_array_equal(formats.read_model(nccl / f"model_{STEPS:08d}.bin")[1],
                                  formats.read_model(plain / f"model_{STEPS:08d}.bin")[1])


def test_sigint_on_one_rank_stops_every_rank_at_the_same_step(files, tmp_path):
    """Ctrl-C reaching only rank 1: rank 0 hears of it through the per-step flag all-reduce
    (train.stop_requested), both ranks stop before the same step, the checkpoint written
    there holds both ranks' states, and a 2-rank -y 1 resumes from it to the end."""
    import signal
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = _train_cmd(files, out, "-x", 300, "-n", 100, "-v", 0)
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=files, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for line in procs[0].stdout:  # rank 0 logs
        if line.startswith("step   10/"):
            procs[1].send_signal(signal.SIGINT)
            break
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [130, 130], outs
    stops = set()
    for _, err in outs:
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        m = re.search(r"interrupted \(SIGINT\) at step (\d+)/300; wrote a checkpoint at step (\d+)", err)
        assert m and m.group(1) == m.group(2), err
        stops.add(int(m.group(1)))
    assert len(stops) == 1, outs  # the same step on both ranks
    step = stops.pop()
    assert 10 <= step < 300
    assert step in checkpoint.complete_steps(str(out))
    assert all((out / f"state_{step:08d}_{r:05d}.bin").exists() for r in range(2))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", *args, "-y", "1"], env=ENV, cwd=files,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"resuming from step {step}" in r.stdout
    assert len(_run_log(out)[0]) == 300
