"""Data-parallel training: the process group, the communicators, ZeRO-1.

Processes are started by the launchers clusters already run, and read who
they are from the environment (process_group_from_env):

    torchrun          RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    Open MPI mpirun   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK
    MPICH / PMI       PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
    SLURM srun        SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID

The first family that is present wins, in that order (torchrun inside srun
is torchrun). Nothing set at all is one process.

Communicators with one interface (rank, world_size, all_reduce_mean,
reduce_scatter_mean, all_gather, all_gather_host, average, barrier, close):

    GlooCommunicator  torch.distributed's gloo backend on NumPy arrays (CPU,
                      zero-copy through torch.from_numpy): the CPU backend,
                      which runs and tests the whole data-parallel path.
    NcclCommunicator  cupy.cuda.nccl on CuPy arrays, one GPU per process
                      (bound by local rank); the NCCL unique id goes from
                      rank 0 to the others through torch.distributed's
                      TCPStore (-pi tcp), mpi4py (-pi mpi) or a file on a
                      shared filesystem (-pi fs -pf PATH).
    LocalCommunicator one process, no library: every collective is a no-op.

DataParallel wraps a backend model (the NumPy GPT2 or the kernel GPT2) with
the interface train.py uses, and averages the gradients across ranks before
the norm and the update:

    -z 0  all-reduce (mean) of the whole flat gradient; every rank runs the
          full AdamW and keeps the full m and v.
    -z 1  ZeRO-1: the flat parameter buffer of N elements is cut into
          world_size equal shards of S = ceil(N / world_size) elements (the
          last one padded); a reduce-scatter (mean) gives each rank the
          averaged gradient of its shard, AdamW runs on the shard only (each
          parameter tensor's intersection with it, so weight decay still
          follows the tensor: cpu/flat_adamw.update_parameters(shard=)), m and v
          hold the shard's elements only (its rank's state file too), and an
          all-gather puts the updated shards back together on every rank.
          The grad norm is the square root of the all-reduced sum of the
          shards' squared norms. The gradient goes through a padded copy
          (S * world_size) and the parameters come back through it: two
          extra passes over N floats per step, where a padded parameter
          buffer in the models would allow in-place collectives. (With
          --overlap 1 the gradient skips the padded copy: each bucket's pieces
          are reduced to the ranks owning them, llmcu/buckets.py.)

The gradient is reduced once per optimizer step, during or after the last
micro-step's backward, in the model's gradient dtype (fp32, or bf16 for a bf16
model): llmcu/buckets.py, which also says how bf16 is averaged on NCCL and on
gloo. --overlap 1 (the default) reduces per layer as the backward finishes each
one, on a second CUDA stream (NCCL) or with asynchronous gloo work handles;
--overlap 0 reduces the whole buffer after the backward.

bf16 with ZeRO-1: each rank keeps the fp32 master weights (llm.c's -w 1), m and
v of its shard only (MixedPrecisionAdamW.keep_shard), updates them, writes its
shard of the bf16 parameters as their stochastic rounding (the same per-element
hash as one process: the bits do not depend on the world size), and the bf16
shards are all-gathered (as bytes: the gather does no arithmetic).
"""

from __future__ import annotations

import atexit
import datetime
import json
import math
import os
import socket
import time
import zlib
from dataclasses import dataclass

import numpy as np

BACKENDS = ("auto", "gloo", "nccl")
INIT_METHODS = ("tcp", "mpi", "fs")
TIMEOUT_S = 300  # rendezvous and collectives give up after this (a rank that died)

# (launcher, rank, world size, local rank) variable names, in priority order
LAUNCHER_VARS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MPICH/PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class ProcessGroup:
    """Who this process is, as the launcher said."""
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = 0   # None: the launcher did not say (only the GPU binding needs it)
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None


def _int_var(env, name, launcher):
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"process group ({launcher}): {name} must be an integer, "
                         f"found {value!r}") from None


def process_group_from_env(environ=None) -> ProcessGroup:
    """The process group from the launcher's environment variables (see the module doc).

    Raises ValueError naming the variable when the environment is incomplete or
    inconsistent (a world size without a rank, a rank outside the world)."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_var in LAUNCHER_VARS:
        has_rank, has_size = rank_var in env, size_var in env
        if not (has_rank or has_size):
            continue
        if launcher == "SLURM" and not has_rank:
            continue  # SLURM_NTASKS alone is set inside any sbatch allocation: not a launch
        if has_size and not has_rank:
            raise ValueError(f"process group ({launcher}): {size_var}={env[size_var]} is set but "
                             f"{rank_var} is not; launch with {_launch_hint(launcher)}, or unset "
                             f"{size_var} to run one process")
        if has_rank and not has_size:
            raise ValueError(f"process group ({launcher}): {rank_var}={env[rank_var]} is set but "
                             f"{size_var} is not; launch with {_launch_hint(launcher)}, or unset "
                             f"{rank_var} to run one process")
        rank, world = _int_var(env, rank_var, launcher), _int_var(env, size_var, launcher)
        if world < 1:
            raise ValueError(f"process group ({launcher}): {size_var} must be >= 1, found {world}")
        if not 0 <= rank < world:
            raise ValueError(f"process group ({launcher}): {rank_var} must be in [0, {world}) "
                             f"({size_var}={world}), found {rank}")
        local = _int_var(env, local_var, launcher) if local_var in env else (0 if world == 1 else None)
        if local is not None and local < 0:
            raise ValueError(f"process group ({launcher}): {local_var} must be >= 0, found {local}")
        port = env.get("MASTER_PORT")
        if port is not None:
            port = _int_var(env, "MASTER_PORT", launcher)
        return ProcessGroup(rank, world, local, launcher, env.get("MASTER_ADDR"), port)
    return ProcessGroup()


def _launch_hint(launcher):
    return {"torchrun": "torchrun --nproc_per_node N -m llmcu train ...",
            "Open MPI": "mpirun -np N llmcu train ...",
            "MPICH/PMI": "mpiexec -n N llmcu train ...",
            "SLURM": "srun --ntasks N llmcu train ..."}[launcher]


# ----------------------------------------------------------------------------
# GPU binding

def select_gpu(pg: ProcessGroup, device_count: int) -> int:
    """The GPU this process uses: its local rank, checked against the node's GPUs."""
    if pg.local_rank is None:
        if pg.world_size > 1:
            raise ValueError(f"select_gpu: rank {pg.rank} of {pg.world_size} has no local rank "
                             f"({pg.launcher} did not set it: LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK, "
                             f"MPI_LOCALRANKID or SLURM_LOCALID), so it cannot pick its GPU")
        return 0
    if device_count < 1:
        raise ValueError(f"select_gpu: rank {pg.rank} needs a GPU but this node has none "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if pg.local_rank >= device_count:
        raise ValueError(f"select_gpu: rank {pg.rank} has local rank {pg.local_rank}, so it needs "
                         f"GPU {pg.local_rank}, but this node has {device_count} GPU(s) "
                         f"(devices 0..{device_count - 1}; CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                         f"{device_count} processes per node (torchrun --nproc_per_node "
                         f"{device_count}, srun --ntasks-per-node {device_count})")
    return pg.local_rank


def bind_gpu(pg: ProcessGroup, device_count=None) -> int:
    """Make GPU select_gpu(...) CuPy's current device; device_count: a callable
    returning the number of GPUs (tests pass a fake one)."""
    if device_count is None:
        import cupy
        device_count = cupy.cuda.runtime.getDeviceCount
    dev = select_gpu(pg, device_count())
    import cupy
    cupy.cuda.Device(dev).use()
    return dev


# ----------------------------------------------------------------------------
# communicators

class LocalCommunicator:
    """World size 1 without any library: every collective leaves its input as it is."""
    backend = "none"

    def __init__(self):
        self.rank, self.world_size, self.local_rank = 0, 1, 0

    def all_reduce_mean(self, x):
        return x

    def all_reduce_sum(self, x):
        return x

    def reduce_scatter_mean(self, out, x):
        out[...] = x[:out.size]
        return out

    def all_gather(self, out, x):
        out[:x.size] = x
        return out

    def all_gather_host(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)[None]

    def average(self, value: float) -> float:
        return float(value)

    def barrier(self):
        pass

    def close(self):
        pass


def _check_flat(fn, name, a, size=None, dtypes=(np.float32,)):
    if a.ndim != 1 or a.dtype not in dtypes or (size is not None and a.size != size):
        want = f"({size},)" if size is not None else "1-D"
        kinds = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{fn}: {name} must be {kinds} {want}, got {a.dtype} {tuple(a.shape)}")


class GlooCommunicator:
    """torch.distributed gloo on NumPy arrays (CPU): the CPU data-parallel backend."""
    backend = "gloo"

    def __init__(self, pg: ProcessGroup, init_method: str = "tcp", init_file: str | None = None):
        import torch.distributed as dist
        self.dist, self.rank, self.world_size, self.local_rank = dist, pg.rank, pg.world_size, pg.local_rank
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if init_method == "fs":
            url = "file://" + os.path.abspath(_need_file(init_file))
        elif init_method == "mpi":
            addr, port = _mpi_broadcast(pg, (socket.gethostname(), _free_port()) if pg.rank == 0 else None)
            url = f"tcp://{addr}:{port}"
        elif pg.launcher == "torchrun":
            url = "env://"  # torchrun's agent store: MASTER_ADDR/MASTER_PORT as the launcher set them
        else:
            addr, port = _need_master(pg)
            url = f"tcp://{addr}:{port}"
        dist.init_process_group("gloo", init_method=url, rank=pg.rank, world_size=pg.world_size,
                                timeout=timeout)
        # a process that stops on an error must still take the group down, or gloo's threads
        # abort the interpreter at exit ("terminate called without an active exception")
        atexit.register(self.close)
        # torch >= 2.13 names them *_single; older versions *_tensor
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        self._all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def _t(self, a):
        import torch
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            raise ValueError(f"GlooCommunicator: arrays must be contiguous NumPy arrays, got "
                             f"{type(a).__name__}")
        return torch.from_numpy(a)  # shares the memory: the collective writes the array itself

    def all_reduce_sum(self, x):
        self.dist.all_reduce(self._t(x), op=self.dist.ReduceOp.SUM)
        return x

    def all_reduce_mean(self, x):
        self.all_reduce_sum(x)
        x *= x.dtype.type(1.0 / self.world_size)
        return x

    def reduce_scatter_mean(self, out, x):
        """out (S,) = mean over ranks of x[rank*S:(rank+1)*S]; x (world_size*S,)."""
        _check_flat("reduce_scatter_mean", "x", x, out.size * self.world_size)
        self._reduce_scatter(self._t(out), self._t(x), op=self.dist.ReduceOp.SUM)
        out *= out.dtype.type(1.0 / self.world_size)
        return out

    def all_gather(self, out, x):
        """out (world_size*S,) = the x (S,) of every rank, in rank order (float32, or
        uint8: any data as bytes)."""
        _check_flat("all_gather", "out", out, x.size * self.world_size, (np.float32, np.uint8))
        self._all_gather(self._t(out), self._t(x))
        return out

    def all_gather_host(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        out = np.empty((self.world_size,) + a.shape, a.dtype)
        self._all_gather(self._t(out.reshape(-1)), self._t(a.reshape(-1)))
        return out

    def average(self, value: float) -> float:
        return float(self.all_reduce_mean(np.array([value], dtype=np.float64))[0])

    def barrier(self):
        self.dist.barrier()

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


class NcclCommunicator:
    """NCCL through cupy.cuda.nccl on CuPy arrays, one GPU per process, on the
    current stream (so a collective is ordered after the kernels before it)."""
    backend = "nccl"

    def __init__(self, pg: ProcessGroup, init_method: str = "tcp", init_file: str | None = None):
        import cupy
        from cupy.cuda import nccl
        self.cupy, self.nccl = cupy, nccl
        self.rank, self.world_size, self.local_rank = pg.rank, pg.world_size, pg.local_rank
        uid = nccl.get_unique_id() if pg.rank == 0 else None
        if pg.world_size > 1:
            uid = _decode_uid(exchange_unique_id(pg, _encode_uid(uid) if uid is not None else None,
                                                 init_method, init_file))
        self.comm = nccl.NcclCommunicator(pg.world_size, uid, pg.rank)
        atexit.register(self.close)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint8): nccl.NCCL_UINT8}
        if pg.world_size > 1 and init_method == "fs":
            self.barrier()  # everyone has read the id: rank 0 removes the file
            if pg.rank == 0:
                os.remove(init_file)

    def _args(self, a):
        if not isinstance(a, self.cupy.ndarray) or not a.flags.c_contiguous:
            raise ValueError(f"NcclCommunicator: arrays must be contiguous CuPy arrays, got "
                             f"{type(a).__name__}")
        if a.dtype not in self._dtypes:
            raise ValueError(f"NcclCommunicator: dtype must be one of {sorted(map(str, self._dtypes))}, "
                             f"got {a.dtype}")
        return a.data.ptr, self._dtypes[a.dtype]

    wait_for = None  # set by llmcu/buckets.py while buckets are in flight on its own stream

    def _stream(self):
        stream = self.cupy.cuda.get_current_stream()
        if self.wait_for is not None:
            # a collective on this stream (the loss average, the norm) while the gradient
            # buckets are still queued on the reducer's stream: NCCL calls on one communicator
            # must not run concurrently from two streams (llm.c issues all of them on one
            # stream), so this stream waits for the buckets first
            self.wait_for(stream)
        return stream.ptr

    def all_reduce_sum(self, x):
        ptr, dt = self._args(x)
        self.comm.allReduce(ptr, ptr, x.size, dt, self.nccl.NCCL_SUM, self._stream())
        return x

    def all_reduce_mean(self, x):
        self.all_reduce_sum(x)
        x *= x.dtype.type(1.0 / self.world_size)
        return x

    def reduce_scatter_mean(self, out, x):
        _check_flat("reduce_scatter_mean", "x", x, out.size * self.world_size)
        (src, dt), (dst, _) = self._args(x), self._args(out)
        self.comm.reduceScatter(src, dst, out.size, dt, self.nccl.NCCL_SUM, self._stream())
        out *= out.dtype.type(1.0 / self.world_size)
        return out

    def all_gather(self, out, x):
        _check_flat("all_gather", "out", out, x.size * self.world_size, (np.float32, np.uint8))
        (src, dt), (dst, _) = self._args(x), self._args(out)
        self.comm.allGather(src, dst, x.size, dt, self._stream())
        return out

    def all_gather_host(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        src = self.cupy.asarray(a.reshape(-1))
        out = self.cupy.empty(self.world_size * a.size, a.dtype)
        ptr, dt = self._args(src)
        self.comm.allGather(ptr, out.data.ptr, a.size, dt, self._stream())
        return self.cupy.asnumpy(out).reshape((self.world_size,) + a.shape)

    def average(self, value: float) -> float:
        x = self.cupy.asarray(np.array([value], dtype=np.float64))
        return float(self.all_reduce_mean(x).get()[0])

    def barrier(self):
        self.all_reduce_sum(self.cupy.zeros(1, dtype=np.float32))
        self.cupy.cuda.get_current_stream().synchronize()

    def close(self):
        if self.comm is not None:
            self.comm.destroy()
            self.comm = None


# ----------------------------------------------------------------------------
# rendezvous for the NCCL unique id

def _encode_uid(uid) -> bytes:
    # CuPy >= 13 gives bytes, older versions a tuple of signed chars
    kind = "bytes" if isinstance(uid, (bytes, bytearray)) else "tuple"
    data = list(uid) if kind == "bytes" else [int(x) for x in uid]
    return json.dumps({"kind": kind, "data": data}).encode()


def _decode_uid(payload: bytes):
    d = json.loads(payload.decode())
    return bytes(d["data"]) if d["kind"] == "bytes" else tuple(d["data"])


def _need_master(pg: ProcessGroup):
    if not pg.master_addr or pg.master_port is None:
        raise ValueError(
            f"rendezvous -pi tcp: rank {pg.rank} of {pg.world_size} ({pg.launcher}) needs "
            f"MASTER_ADDR and MASTER_PORT (the host and a free port of rank 0), found "
            f"MASTER_ADDR={pg.master_addr!r} MASTER_PORT={pg.master_port!r}; e.g. under SLURM "
            f"export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
            f"MASTER_PORT=29500, or use -pi fs -pf /shared/path or -pi mpi")
    return pg.master_addr, pg.master_port


def _need_file(path):
    if not path:
        raise ValueError("rendezvous -pi fs needs -pf PATH: a file name on a filesystem every "
                         "node sees, new for each run (e.g. $HOME/llmcu_rdzv_$SLURM_JOB_ID)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_broadcast(pg: ProcessGroup, value):
    try:
        from mpi4py import MPI
    except ImportError:
        raise ValueError("rendezvous -pi mpi needs mpi4py (pip install mpi4py, built against the "
                         "MPI that runs mpirun); or use -pi tcp or -pi fs") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != pg.world_size or comm.Get_rank() != pg.rank:
        raise ValueError(f"rendezvous -pi mpi: MPI says rank {comm.Get_rank()} of {comm.Get_size()}, "
                         f"the environment ({pg.launcher}) rank {pg.rank} of {pg.world_size}")
    return comm.bcast(value, root=0)


def exchange_unique_id(pg: ProcessGroup, payload: bytes | None, init_method: str,
                       init_file: str | None = None, timeout_s: float = TIMEOUT_S) -> bytes:
    """Rank 0's payload (the NCCL unique id), on every rank, through the rendezvous
    -pi names: tcp (torch.distributed's TCPStore at MASTER_ADDR:MASTER_PORT),
    mpi (mpi4py's bcast) or fs (a file on a shared filesystem)."""
    if init_method not in INIT_METHODS:
        raise ValueError(f"exchange_unique_id: init_method must be one of {', '.join(INIT_METHODS)}, "
                         f"got {init_method!r}")
    if (pg.rank == 0) != (payload is not None):
        raise ValueError("exchange_unique_id: rank 0, and only rank 0, passes the payload")
    if init_method == "mpi":
        return _mpi_broadcast(pg, payload)
    if init_method == "fs":
        path = _need_file(init_file)
        if pg.rank == 0:
            if os.path.exists(path):
                raise ValueError(f"rendezvous -pi fs: {path} exists already (left by an earlier "
                                 f"run?); delete it or pass a new -pf")
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)  # the others never see half a file
            return payload
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rendezvous -pi fs: rank {pg.rank} waited {timeout_s:.0f} s "
                                   f"for rank 0 to write {path}")
            time.sleep(0.05)
        with open(path, "rb") as f:
            return f.read()
    import torch.distributed as dist
    addr, port = _need_master(pg)
    # under torchrun the agent already serves a store on MASTER_PORT: every rank is a client
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, pg.world_size, pg.rank == 0 and not agent,
                          timeout=datetime.timedelta(seconds=timeout_s))
    key = f"llmcu/nccl_unique_id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if pg.rank == 0:
        store.set(key, payload)
        # rank 0 serves the store: it stays until every rank has read the id
        store.wait([f"{key}/read/{r}" for r in range(1, pg.world_size)])
        return payload
    got = bytes(store.get(key))
    store.set(f"{key}/read/{pg.rank}", b"1")
    return got


def init_communicator(backend: str = "auto", device: str = "cpu", init_method: str = "tcp",
                      init_file: str | None = None, environ=None, device_count=None):
    """The communicator for this process: the launcher's process group, bound to its
    GPU for NCCL. backend auto: nccl for --device cuda, gloo otherwise, and no
    library at all for a single process (unless a backend is named)."""
    if backend not in BACKENDS:
        raise ValueError(f"init_communicator: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if init_method not in INIT_METHODS:
        raise ValueError(f"init_communicator: init_method must be one of {', '.join(INIT_METHODS)}, "
                         f"got {init_method!r}")
    pg = process_group_from_env(environ)
    if backend == "auto":
        if pg.world_size == 1:
            return LocalCommunicator()
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        if device != "cuda":
            raise ValueError(f"--dist-backend nccl needs --device cuda (found --device {device}); "
                             f"use gloo for the CPU backends")
        bind_gpu(pg, device_count)
        return NcclCommunicator(pg, init_method, init_file)
    if device == "cuda":
        raise ValueError("--dist-backend gloo works on host (NumPy) arrays: use it with --device "
                         "cpu or emu, and nccl with --device cuda")
    return GlooCommunicator(pg, init_method, init_file)


# ----------------------------------------------------------------------------
# the same configuration on every rank

def check_same_config(comm, fields: dict) -> None:
    """Raise ValueError on every rank when any rank's `fields` (name -> value)
    differ from rank 0's, naming the fields and each rank's value."""
    if comm.world_size == 1:
        return
    names = sorted(fields)
    text = json.dumps({k: repr(fields[k]) for k in names}, sort_keys=True).encode()
    hashes = np.array([zlib.crc32(repr(fields[k]).encode()) for k in names] + [len(names)], np.int64)
    every = comm.all_gather_host(hashes)
    if (every == every[0]).all():
        return
    # gather every rank's values to say who differs in what
    length = comm.all_gather_host(np.array([len(text)], np.int64))
    buf = np.zeros(int(length.max()), np.uint8)
    buf[:len(text)] = np.frombuffer(text, np.uint8)
    texts = comm.all_gather_host(buf)
    values = [json.loads(bytes(texts[r][:int(length[r][0])]).decode()) for r in range(comm.world_size)]
    lines = []
    for name in sorted(set().union(*values)):
        seen = [v.get(name, "<missing>") for v in values]
        if any(s != seen[0] for s in seen):
            lines.append(f"{name}: " + ", ".join(f"rank {r} has {s}" for r, s in enumerate(seen)))
    raise ValueError(f"mismatched configurations across ranks (every rank must be started with the "
                     f"same arguments and model): {'; '.join(lines)}")


# ----------------------------------------------------------------------------
# data parallel model

def shard_range(num_parameters: int, world_size: int, rank: int) -> tuple[int, int, int]:
    """(lo, hi, S): ZeRO-1's shard of the flat buffer owned by `rank`, and the
    padded shard size S = ceil(N / world_size) (hi - lo < S only on the last ranks)."""
    S = math.ceil(num_parameters / world_size)
    lo = min(rank * S, num_parameters)
    return lo, min(lo + S, num_parameters), S


class DataParallel:
    """A backend model whose gradients are averaged across the ranks of `comm`
    before the norm and the update (-z 0), or with ZeRO-1 (-z 1): see the module doc.

    Same interface as the models (train.py cannot tell them apart); anything
    else is the wrapped model's."""

    def __init__(self, model, comm, zero_stage: int = 0, overlap: bool = False, accum_steps: int = 1):
        if zero_stage not in (0, 1):
            raise ValueError(f"DataParallel: zero_stage must be 0 or 1 (-z), got {zero_stage}")
        from .buckets import GradientReducer
        self.model, self.comm, self.zero_stage = model, comm, zero_stage
        self.overlap, self.accum_steps = bool(overlap), int(accum_steps)
        N, W = model.params.size, comm.world_size
        self.shard = self._padded = self._piece = None
        shards = [shard_range(N, W, r)[:2] for r in range(W)]
        if zero_stage == 1:
            import inspect
            if "shard" not in inspect.signature(model.update).parameters:
                raise ValueError(f"-z 1: {type(model).__module__}.{type(model).__name__}.update has no "
                                 f"shard= (AdamW on a ZeRO-1 shard); use -z 0 with this model")
            lo, hi, S = shard_range(N, W, comm.rank)
            self.shard, self.shard_size = (lo, hi), S
            if hasattr(model, "keep_shard"):  # bf16: the fp32 master copy shrinks to the shard
                model.keep_shard(self.shard)
            xp = getattr(model, "xp", np)
            # gradient in, parameters out, in the model's dtype (float32, or bf16 bits)
            self._padded = xp.zeros(S * W, dtype=model.params.dtype)
            self._piece = xp.zeros(S, dtype=model.params.dtype)
        self.reducer = GradientReducer(comm, model.config, model.params.dtype, self.shard,
                                       shards if self.shard is not None else None)
        self._micro = 0          # backward() calls since zero_grad()
        self._launched = False   # the buckets of this step were started during the backward
        self._synced = False
        self._norm = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, inputs, targets=None):
        return self.model.forward(inputs, targets)

    def zero_grad(self):
        if self._launched:  # a reduction still in flight writes the gradients: let it land first
            self.reducer.finish(self.model.grads)
            self._launched = False
        self._synced, self._norm, self._micro = False, None, 0
        self.model.zero_grad()

    def backward(self, loss_scale=1.0):
        """The model's backward; with overlap, the last micro-step of the optimizer step
        (accum_steps backward calls after zero_grad) starts each layer's bucket as soon as
        the backward has finished it, and the last bucket (embeddings, final norm) after."""
        self._synced, self._norm = False, None
        self._micro += 1
        if not self.overlap or self._micro < self.accum_steps:
            self.model.backward(loss_scale=loss_scale)
            return
        if self._micro > self.accum_steps or self._launched:
            raise RuntimeError(f"DataParallel.backward: micro-step {self._micro} of an optimizer "
                               f"step of {self.accum_steps} (accum_steps): the gradients are "
                               f"already being reduced; call zero_grad() first")
        L = self.model.config.num_layers
        self.model.backward(loss_scale=loss_scale, layer_done=lambda layer: self.reducer.start(
            L - 1 - layer, self.model.grads))
        self.reducer.start(L, self.model.grads)
        self._launched = True

    def _sync(self):
        """Average the gradient across ranks (all of it, or this rank's shard): wait for
        the buckets started during the backward, or reduce the whole buffer now."""
        if self._synced:
            return
        if self.model.grads is None:
            raise RuntimeError("DataParallel: no gradients; call backward first")
        if self._launched:
            self.reducer.finish(self.model.grads)
            self._launched = False
        else:  # the rest of g is stale and unused with -z 1
            self.reducer.reduce_all(self.model.grads, self._padded, self._piece)
        self._synced = True

    def grad_norm(self) -> float:
        self._sync()
        if self._norm is None:
            if self.shard is None:
                self._norm = self.model.grad_norm()
            else:
                lo, hi = self.shard
                part = self.model.grads[lo:hi]
                local = _shard_norm(self.model, part) ** 2 if hi > lo else 0.0
                self._norm = math.sqrt(max(self.comm.all_reduce_sum(
                    _scalar_array(self, local))[0].item(), 0.0))
        return self._norm

    def update(self, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               grad_clip=None, grad_norm=None):
        self._sync()  # a no-op after grad_norm(), as train_step calls them
        norm = self.grad_norm() if grad_norm is None else float(grad_norm)
        if self.shard is None:
            return self.model.update(lr, step, beta1, beta2, eps, weight_decay, grad_clip, grad_norm=norm)
        lo, hi = self.shard
        self.model.update(lr, step, beta1, beta2, eps, weight_decay, grad_clip, grad_norm=norm,
                          shard=self.shard)
        p = self.model.params
        self._piece[:hi - lo] = p[lo:hi]
        self._piece[hi - lo:] = 0
        if p.dtype == np.float32:
            self.comm.all_gather(self._padded, self._piece)
        else:  # bf16 bits, gathered as bytes (no arithmetic)
            self.comm.all_gather(self._padded.view(np.uint8), self._piece.view(np.uint8))
        p[...] = self._padded[:p.size]
        return norm

    def optimizer_state(self):
        """This rank's (m, v): the whole buffer (-z 0) or its shard (-z 1)."""
        if self.shard is None or self.model.m is not None:
            return self.model.optimizer_state()
        lo, hi = self.shard
        return np.zeros(hi - lo, np.float32), np.zeros(hi - lo, np.float32)

    def load_optimizer_state(self, m, v, master=None):
        """This rank's m and v (and, bf16 -w 1, master weights): whole, or its -z 1 shard."""
        kw = {} if master is None else {"master": master}
        if self.shard is None:
            self.model.load_optimizer_state(m, v, **kw)
        else:
            self.model.load_optimizer_state(m, v, shard=self.shard, **kw)


def _shard_norm(model, part) -> float:
    """The norm of a slice of the gradient with the model's own global_norm
    (the kernel for the kernel model, on the GPU or emulated; NumPy's otherwise)."""
    if hasattr(model, "backend"):
        from .cuda.adamw import global_norm
    else:
        from .cpu.adamw import global_norm
    return global_norm(part)


def _scalar_array(dp: DataParallel, value: float):
    xp = getattr(dp.model, "xp", np)
    if xp is not np and dp.comm.backend == "nccl":
        return xp.asarray(np.array([value], np.float64))
    return np.array([value], np.float64)


def check_resume_dtype(model_file: str, dtype: str) -> None:
    """-y 1: the checkpoint's model file must be in the run's dtype (version 5 = bf16 for a
    --dtype bf16 run, version 3 = fp32 for fp32): a bf16 run's state (master weights,
    moments of bf16 parameters) does not continue as fp32 or the other way round."""
    from . import formats
    version = formats._peek_header_version(model_file)
    saved = {formats.MODEL_VERSION_FP32: "fp32", formats.MODEL_VERSION_BF16: "bf16"}.get(version)
    if saved is not None and saved != dtype:
        raise ValueError(f"-y 1: the checkpoint {model_file} is from a --dtype {saved} run "
                         f"(model file version {version}), this run is --dtype {dtype}; resume "
                         f"with --dtype {saved}")


def saved_layout(state_file: str, num_parameters: int) -> tuple[int, int | None]:
    """(processes, -z) of the run that wrote a state file, from its header: the world size
    it names and whether m holds all num_parameters (-z 0) or that rank's ZeRO-1 shard
    (-z 1); -z is None when the header does not say (an llm.c file) or both fit (1 process)."""
    from . import formats
    header = np.fromfile(state_file, dtype="<i4", count=formats.HEADER_INTS)
    world, rank = int(header[2]), int(header[3])
    size = int(header.view("<u8")[22]) if header[40] == formats.TRAIN_STATE_EXTENSION else None
    if size is None or world < 1 or not 0 <= rank < world:
        return world, None
    lo, hi, _ = shard_range(num_parameters, world, rank)
    if size == num_parameters and hi - lo != size:
        return world, 0
    if size == hi - lo and size != num_parameters:
        return world, 1
    return world, None


def resume_layout_error(state_file: str, num_parameters: int, world: int, zero_stage: int) -> str | None:
    """The message for resuming with another world size or -z than the run that wrote
    state_file (naming both), or None when the layouts agree (or cannot be told)."""
    saved_world, saved_z = saved_layout(state_file, num_parameters)
    if saved_world == world and saved_z in (None, zero_stage):
        return None
    z = f" with -z {saved_z}" if saved_z is not None else ""
    return (f"-y 1: the checkpoint ({state_file}) was written by {saved_world} process(es){z}, "
            f"this run has {world} process(es) with -z {zero_stage}; a ZeRO-1 state is split by "
            f"world size, so resume with {saved_world} process(es)"
            + (f" and -z {saved_z}" if saved_z is not None else ""))


def run_fingerprint(cfg, model, resumed=None) -> dict:
    """What must be equal on every rank: the training config, the model config,
    a checksum of the starting parameters and the checkpoint a resume starts from."""
    import dataclasses
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()}
    fields["model config"] = model.config
    fields["initial parameters crc32"] = zlib.crc32(np.ascontiguousarray(model.params_host()).view(np.uint8))
    fields["resume step"] = resumed[0] if resumed else None
    return fields
