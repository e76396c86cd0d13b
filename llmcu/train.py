"""The training loop: device-agnostic, llm.c-style logs.

A backend model offers forward(inputs, targets) -> loss, zero_grad(),
backward(loss_scale=1.0), grad_norm(), update(lr, step, ..., grad_norm=None)
-> grad norm, and acts.logits after a forward; the loop below never looks
inside it.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from . import checkpoint, formats, outputs, runlog, tokenizer
from .config import GPT2Config, TrainConfig
from .data import DataLoader
from .mfu import bf16_peak_tflops, device_name, mfu
from .schedule import check_schedule, grad_accum_steps, learning_rate


DEVICES = ("cpu", "cuda", "emu")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; anything else is checked."""
    from . import cuda
    if device == "auto":
        return "cuda" if cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} or auto")
    if device == "cuda" and not cuda.is_available():
        raise ValueError("--device cuda: no usable CUDA GPU (CuPy missing or no device); install "
                         "llmcu[cuda12] or llmcu[cuda13] on a GPU machine, or use --device cpu")
    if device == "emu":  # the emulator compiles the kernels with a C++ compiler: check it is there
        from .emu import EmuError, _compiler_id
        cxx = os.environ.get("CXX") or "g++"
        try:
            _compiler_id(cxx)
        except EmuError:
            raise ValueError(f"--device emu compiles the kernels for the CPU with a C++ compiler, and "
                             f"`{cxx} --version` failed; install g++ (e.g. apt install g++) or set "
                             f"CXX to a C++17 compiler, or use --device cpu") from None
    return device


DTYPES = ("fp32", "bf16")


def gpu_supports_bf16() -> bool:
    """True when the current CUDA device has bf16 tensor cores (compute capability >= 8.0)."""
    try:
        import cupy
        return int(cupy.cuda.Device().compute_capability) >= 80
    except Exception:
        return False


def resolve_dtype(dtype: str, device: str, config=None) -> str:
    """'auto' -> 'bf16' where mixed precision is available: a GPU that supports it
    (cuda, compute capability >= 8.0), one process or data parallel (GPT-2 and
    Llama-family models alike; config is not consulted); else 'fp32'. An explicit
    dtype is checked against the (resolved) device."""
    if dtype == "auto":
        return "bf16" if (device == "cuda" and gpu_supports_bf16()) else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} or auto")
    if dtype == "bf16" and device not in ("cuda", "emu"):
        raise ValueError(f"--dtype bf16 is not supported on --device {device} (the NumPy model is "
                         f"fp32); bf16 runs on --device cuda (a GPU of compute capability >= 8.0) "
                         f"or --device emu (the kernels emulated on the CPU, for testing); "
                         f"or pass --dtype fp32")
    return dtype


def build_model(spec: str, device: str = "cpu", seed: int = 42, max_seq_len: int = 1024,
                dtype: str = "fp32", master_weights: bool = True, vocab_size: int | None = None):
    """A model from a checkpoint file (llm.c format) or a descriptor like 'd12'.

    device: "cpu" (the NumPy model), "cuda" (the kernels on a GPU) or "emu"
    (the same kernels emulated on the CPU: slow, for tests). 'hf:PATH_OR_NAME'
    loads pretrained Hugging Face GPT-2 weights (llmcu.hf.import_hf); a bare
    descriptor such as 'gpt2' is a random init of that size; 'llama', 'llama-d6',
    'gemma-d6', ... (llmcu.llama_config) a Llama-family one. Llama and Gemma
    files and Hugging Face checkpoints are recognised by their contents. vocab_size:
    a descriptor's vocabulary (the tokenizer's; default GPT-2's)."""
    if spec.startswith("hf:"):
        from .hf import import_hf
        config, params = import_hf(spec[3:])
    elif spec.endswith(".bin") or os.path.sep in spec or os.path.exists(spec):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"model checkpoint {spec} not found; pass a .bin file written by "
                                    f"llmcu or llm.c, or a descriptor such as d6 or d12")
        config, params = formats.read_model(spec)
    else:
        from .llama_config import model_config
        config, params = model_config(spec, max_seq_len=max_seq_len,
                                      vocab_size=vocab_size or tokenizer.VOCAB_SIZE), None
    return make_model(config, params, device, seed, dtype, master_weights)


def make_model(config: GPT2Config, params, device: str = "cpu", seed: int = 42,
               dtype: str = "fp32", master_weights: bool = True):
    """The backend model for `device` with these parameters (None: a random init).
    dtype "bf16" (GPT-2 or Llama on the kernels, cuda or emu): mixed precision, with
    fp32 master weights unless master_weights is False (llmcu/cuda/gpt2.py); "auto"
    picks bf16 where it is available for this model (resolve_dtype)."""
    dtype = resolve_dtype(dtype, device, config)
    if not isinstance(config, GPT2Config):  # a LlamaConfig
        if device == "cpu":
            from .cpu.llama import Llama
            return Llama(config, params, seed=seed)
        from .cuda.llama import Llama as KernelLlama
        return KernelLlama(config, params, seed=seed, device=device, dtype=dtype,
                           master_weights=bool(master_weights))
    if device == "cpu":
        from .cpu.gpt2 import GPT2
        return GPT2(config, params, seed=seed)
    from .cuda.gpt2 import GPT2 as KernelGPT2
    if dtype == "fp32":
        return KernelGPT2(config, params, seed=seed, device=device)
    return KernelGPT2(config, params, seed=seed, device=device, dtype=dtype,
                      master_weights=bool(master_weights))


def sample(model, prompt_tokens, n_tokens, rng, temperature=1.0, top_k=None):
    """Autoregressive sampling; returns the generated token ids (prompt excluded).

    llmcu.sample.generate with its KV cache (on the NumPy parameters, so the
    training activations are left alone); prompt + n_tokens must fit the
    model's max_seq_len. GPT-2 and Llama/Gemma alike (forward_cached_llama).
    """
    from .sample import generate
    return generate(model, prompt_tokens, n_tokens, temperature=temperature, top_k=top_k, rng=rng)


def print_model_summary(config: GPT2Config, log=print):
    if not isinstance(config, GPT2Config):
        from .llama_config import print_llama_summary
        return print_llama_summary(config, log)
    log("[GPT-2]")
    log(f"max_seq_len: {config.max_seq_len}")
    log(f"vocab_size: {config.vocab_size}")
    log(f"padded_vocab_size: {config.padded_vocab_size}")
    log(f"num_layers: {config.num_layers}")
    log(f"num_heads: {config.num_heads}")
    log(f"channels: {config.channels}")
    log(f"num_parameters: {config.num_parameters()}")


def evaluate(model, loader: DataLoader, num_batches: int) -> float:
    loader.reset()
    total = 0.0
    for _ in range(num_batches):
        x, y = loader.next_batch()
        total += model.forward(x, y)
    return total / num_batches


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm with the outlier skip off: the run stops
    before the update, so the parameters (and every file written) stay finite."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run between steps; exit_code is 128 + the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


OUTLIER_WINDOW = 128  # llm.c's OUTLIER_DETECTOR_WINDOW_SIZE


class OutlierDetector:
    """z-score of each new value against a sliding window (llm.c's OutlierDetector).

    update(x) pushes x (dropping the oldest value once the window is full) and
    returns (x - mean) / std over the window, x included, with the population
    std; NaN while the window is still filling (the first `window` values),
    0.0 when the window is constant.
    """

    def __init__(self, window: int = OUTLIER_WINDOW):
        if window < 2:
            raise ValueError(f"OutlierDetector: window must be >= 2, got {window}")
        self.window = window
        self.values: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> float:
        full = len(self.values) == self.window
        self.values.append(float(value))
        if not full:
            return math.nan
        w = np.asarray(self.values, dtype=np.float64)
        std = float(w.std())
        return 0.0 if std == 0.0 else (float(value) - float(w.mean())) / std


@dataclass
class StepResult:
    loss: float           # mean loss over the micro-steps
    norm: float           # global gradient norm before clipping
    lr: float             # the learning rate this step used (or would have)
    skipped: str | None   # why the update was skipped; None when it was applied


def train_step(model, loader, step: int, cfg: TrainConfig, accum_steps: int = 1,
               loss_detector: OutlierDetector | None = None,
               norm_detector: OutlierDetector | None = None, graph=None) -> StepResult:
    """One optimizer step (0-based `step`) as llm.c's train_gpt2.cu does it.

    zero_grad once; accum_steps micro-steps of next batch, forward, backward
    with loss_scale 1/accum_steps (so the gradient is that of the mean loss
    over all micro-batches); then, unless the loss or grad-norm z-score
    exceeds cfg.skip_loss_z / cfg.skip_norm_z (0: off), AdamW at the
    scheduled learning rate. A skipped step leaves the parameters as they were.
    graph: a llmcu.cuda.graphs.GraphStep of the model, which then runs the
    micro-steps and the update as CUDA graphs (the same arithmetic).
    """
    lr = learning_rate(cfg.lr_schedule, step, cfg.max_steps, cfg.learning_rate,
                       cfg.warmup_iters, cfg.final_lr_frac)
    if graph is not None:
        loss, norm = graph.forward_backward([loader.next_batch() for _ in range(accum_steps)])
    else:
        model.zero_grad()
        total = 0.0
        for _ in range(accum_steps):
            x, y = loader.next_batch()
            total += model.forward(x, y)
            model.backward(loss_scale=1.0 / accum_steps)
        loss = total / accum_steps
        comm = getattr(model, "comm", None)  # data parallel: the mean over every rank's micro-batches
        if comm is not None:
            loss = comm.average(loss)
        norm = model.grad_norm()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        # nothing is updated from a NaN/inf gradient; the outlier windows do not see it either
        what = f"loss {loss} and gradient norm {norm}"
        if cfg.skip_loss_z > 0 or cfg.skip_norm_z > 0:
            return StepResult(loss=loss, norm=norm, lr=lr, skipped=f"a non-finite {what}")
        raise TrainingDiverged(
            f"step {step + 1}: non-finite {what}; the update was not applied and training "
            f"stopped. Try a lower learning rate (-l), a warmup (-u), gradient clipping "
            f"(--grad-clip 1.0), or -sl/-sg to skip such steps")
    zloss = loss_detector.update(loss) if loss_detector is not None else math.nan
    znorm = norm_detector.update(norm) if norm_detector is not None else math.nan
    skipped = None
    if math.isfinite(zloss) and cfg.skip_loss_z > 0 and zloss > cfg.skip_loss_z:
        skipped = f"loss z-score of {zloss:.4f}"
    elif math.isfinite(znorm) and cfg.skip_norm_z > 0 and znorm > cfg.skip_norm_z:
        skipped = f"grad norm z-score of {znorm:.4f}"
    elif graph is not None:
        graph.update(lr, step + 1)
    else:
        model.update(lr, step + 1, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                     grad_norm=norm)
    return StepResult(loss=loss, norm=norm, lr=lr, skipped=skipped)


def mfu_peak(device: str, dtype: str, log=print) -> float | None:
    """The dense bf16 peak (TFLOP/s) for the step lines' MFU column (llm.c's "% bf16 MFU"):
    bf16 on a GPU whose peak llmcu.mfu knows; otherwise None (no column), saying why on a GPU."""
    if device != "cuda" or dtype != "bf16":
        return None
    name = device_name()
    peak = bf16_peak_tflops(name)
    if peak is None:
        log(f"MFU: no dense bf16 peak known for {name} (llmcu/mfu.py); the step lines leave it out")
    else:
        log(f"MFU: llm.c's formula (6N + 6LCT flops per token) against {name}'s dense bf16 peak, "
            f"{peak:g} TFLOP/s")
    return peak


def make_graph_step(model, B: int, T: int, accum_steps: int, cfg: TrainConfig):
    """--cuda-graph 1: the GraphStep of a GPT-2 kernel model, or a clear error."""
    from .cuda.gpt2 import GPT2 as KernelGPT2
    if not isinstance(model, KernelGPT2):
        what = type(model).__name__
        if what == "DataParallel":
            what += " (several processes or -z 1)"
        why = ("; with data parallel the captured step would have to hold the gradient "
               "reduction's NCCL calls and its second stream's events, which has not been run "
               "on a GPU here, so the combination is refused" if what.startswith("DataParallel")
               else "")
        raise ValueError(f"--cuda-graph 1 needs a GPT-2 model on the CUDA kernels in one process "
                         f"(--device cuda or emu, -z 0), got {what} on --device {cfg.device}{why}; "
                         f"run with --cuda-graph 0")
    from .cuda.graphs import GraphStep
    return GraphStep(model, B, T, accum_steps, weight_decay=cfg.weight_decay,
                     grad_clip=cfg.grad_clip)


@dataclass
class Run:
    """What setup() builds: everything the step loop and its hooks read."""
    cfg: TrainConfig
    log: Callable           # the caller's log on rank 0, a no-op on the other ranks
    comm: object            # llmcu.distributed communicator (backend "none": one process)
    own_comm: bool          # train() made comm from the environment, so it closes it
    model: object           # the backend model; DataParallel-wrapped when data parallel
    graph: object | None    # llmcu.cuda.graphs.GraphStep with --cuda-graph 1, else None
    accum_steps: int        # micro-steps per optimizer step
    peak: float | None      # dense bf16 TFLOP/s for the step lines' MFU column, or None
    train_loader: DataLoader
    val_loader: DataLoader | None
    val_batches: int
    loss_detector: OutlierDetector
    norm_detector: OutlierDetector
    rng: np.random.Generator  # sampling; saved in checkpoints
    start: int = 0            # the first step: 0, or the resumed checkpoint's step
    resumed: bool = False     # -y 1 found a checkpoint: its step's eval and sample are done
    step_ms: list = field(default_factory=list)  # this process's step times, for the time left
    logfile: TextIO | None = None       # OUTPUT_DIR/main.log (rank 0 with -o)
    jsonl: runlog.RunLog | None = None  # OUTPUT_DIR/main.jsonl (rank 0 with -o)
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "lr": [], "skipped": []})
    tok: tokenizer.Tokenizer | None = None  # decodes the samples (--tokenizer; GPT-2 by default)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def config(self):
        return self.model.config

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.accum_steps * self.comm.world_size


def setup_model(cfg: TrainConfig, comm, log, accum_steps: int = 1, vocab_size: int | None = None):
    """The model -e names, or the newest checkpoint's with -y 1, wrapped for data parallel.
    vocab_size: a descriptor's vocabulary (the run's tokenizer's; None: GPT-2's).

    Returns (model, dtype, resumed): dtype is what "auto" became; resumed is
    checkpoint.load_latest's (step, config, params, state), or None."""
    from . import distributed
    if cfg.threads:  # --threads: the CPU backend's pool and BLAS (llmcu/cpu/threads.py)
        from .cpu.threads import set_threads
        set_threads(cfg.threads)
    world = comm.world_size
    data_parallel = comm.backend != "none" or bool(cfg.zero_stage)
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # "auto" resolved once
    resumed = None
    if cfg.resume:
        resumed = checkpoint.load_latest(cfg.output_dir, cfg.model, comm.rank, world,
                                         cfg.zero_stage, log=log)  # (step, config, params, state)
        if resumed[0] > cfg.max_steps:
            raise ValueError(f"-y 1: the newest checkpoint in {cfg.output_dir} is at step "
                             f"{resumed[0]}, past -x {cfg.max_steps}; pass -x >= {resumed[0]}")
        model = make_model(resumed[1], resumed[2], cfg.device, cfg.seed, dtype, cfg.master_weights)
    else:
        model = build_model(cfg.model, cfg.device, cfg.seed, dtype=dtype,
                            master_weights=cfg.master_weights,
                            vocab_size=vocab_size)
    dtype = getattr(model, "dtype", "fp32")  # what "auto" became
    if resumed:
        distributed.check_resume_dtype(checkpoint.model_path(cfg.output_dir, resumed[0]), dtype)
    if data_parallel:
        model = distributed.DataParallel(model, comm, cfg.zero_stage, overlap=bool(cfg.overlap),
                                         accum_steps=accum_steps)
        distributed.check_same_config(comm, distributed.run_fingerprint(cfg, model, resumed))
        log(f"data parallel: {world} process(es), {comm.backend}, -z {cfg.zero_stage}")
    return model, dtype, resumed


def log_model(cfg: TrainConfig, model, dtype: str, log) -> float | None:
    """The model summary, precision and kernel lines; returns the MFU peak (mfu_peak)."""
    print_model_summary(model.config, log)
    chosen = " (--dtype auto)" if cfg.dtype == "auto" else ""
    if dtype != "fp32":
        log(f"precision: {dtype}{chosen}, fp32 master weights: {'yes' if cfg.master_weights else 'no'}")
    else:
        log(f"precision: fp32{chosen}")
    peak = mfu_peak(cfg.device, dtype, log)  # TFLOP/s for the step lines' MFU column, or None
    inner = getattr(model, "model", model)  # DataParallel keeps the model it wraps in .model
    if hasattr(inner, "kernel_table"):  # a model on the kernels: what each op runs
        log("kernels: " + ", ".join(f"{op} {' + '.join(kernels)}" for op, kernels in inner.kernel_table().items()))
    return peak


def setup_data(cfg: TrainConfig, rank: int, world: int, accum_steps: int, log, vocab_size=None):
    """This rank's train and val loaders and the batch lines; returns (train, val, val_batches).
    The train loader shuffles unless --no-shuffle (llm.c's does); val never does. Token
    ids are checked against vocab_size (the model's)."""
    B, T = cfg.batch_size, cfg.seq_len
    vocab_size = vocab_size or tokenizer.VOCAB_SIZE
    train_loader = DataLoader(cfg.train_pattern, B, T, rank, world, vocab_size=vocab_size,
                              shuffle=cfg.shuffle)
    val_loader = DataLoader(cfg.val_pattern, B, T, rank, world,
                            vocab_size=vocab_size) if cfg.val_pattern else None
    log("train data: " + ("shuffled (a seeded permutation of the shards and windows every epoch)"
                          if cfg.shuffle else "in order (--no-shuffle)"))
    log(f"train dataset num_batches: {train_loader.num_tokens // (B * T)}")
    if val_loader is not None:
        log(f"val dataset num_batches: {val_loader.num_tokens // (B * T)}")
    val_batches = min(cfg.val_batches, val_loader.num_tokens // (B * T)) if val_loader else 0
    log(f"total batch size: {B * T * accum_steps * world} tokens (B*T = {B * T}, processes {world}, "
        f"grad accumulation steps: {accum_steps})")
    log(f"learning rate schedule: {cfg.lr_schedule}, warmup {cfg.warmup_iters}, "
        f"final lr fraction {cfg.final_lr_frac}")
    return train_loader, val_loader, val_batches


def check_hellaswag(cfg: TrainConfig, config) -> None:
    """--hellaswag: fail before training on a bad or too-long eval file."""
    if not cfg.hellaswag:
        return
    from .hellaswag import eval_seq_len
    hs_T = eval_seq_len(formats.read_evalfile(cfg.hellaswag))
    if hs_T > config.max_seq_len:
        raise ValueError(f"--hellaswag {cfg.hellaswag}: its longest example needs T={hs_T}, "
                         f"more than the model's max_seq_len={config.max_seq_len}")


def setup(cfg: TrainConfig, log=print, comm=None) -> Run:
    """Everything before the first step: the checks, the process group (comm=None: from
    the launcher's environment), the model (resumed with -y 1), CUDA graphs, the summary
    lines, the loaders, the log files and, with -y 1, the checkpoint's training state."""
    from . import distributed
    B, T = cfg.batch_size, cfg.seq_len
    check_schedule(cfg.lr_schedule)
    resolve_dtype(cfg.dtype, cfg.device)  # checks it; "auto" is resolved per model below
    own_comm = comm is None
    if own_comm:
        comm = distributed.init_communicator(cfg.dist_backend, cfg.device, cfg.init_method,
                                             cfg.init_file)
    rank, world = comm.rank, comm.world_size
    if rank != 0:
        log = lambda *args, **kwargs: None  # noqa: E731  (only rank 0 logs)
    accum_steps = grad_accum_steps(cfg.total_batch_size, B, T, world)
    if (cfg.checkpoint_every > 0 or cfg.resume) and not cfg.output_dir:
        raise ValueError("-n (checkpoints) and -y 1 (resume) need an output dir: pass -o DIR")
    if cfg.output_dir and rank == 0:  # before the model is built and the data read; rank 0
        # only: ranks probing one new directory at once would remove it under each other
        outputs.check_dir(cfg.output_dir, "-o")
    tok = tokenizer.model_tokenizer(cfg.model, cfg.tokenizer)  # read once, before the model
    model, dtype, resumed = setup_model(cfg, comm, log, accum_steps, tok.vocab_size)
    if T > model.config.max_seq_len:
        raise ValueError(f"seq_len T={T} exceeds the model's max_seq_len={model.config.max_seq_len}")
    graph = None
    if cfg.cuda_graph:
        graph = make_graph_step(model, B, T, accum_steps, cfg)
        log("CUDA graphs: the training step is captured and replayed (llmcu/cuda/graphs.py)")
    peak = log_model(cfg, model, dtype, log)
    tokenizer.check_model_vocab(tok, model.config.vocab_size)
    train_loader, val_loader, val_batches = setup_data(cfg, rank, world, accum_steps, log,
                                                       model.config.vocab_size)
    check_hellaswag(cfg, model.config)
    run = Run(cfg, log, comm, own_comm, model, graph, accum_steps, peak, train_loader, val_loader,
              val_batches, OutlierDetector(), OutlierDetector(), np.random.default_rng(cfg.seed),
              tok=tok)
    if cfg.output_dir:
        os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.output_dir and rank == 0:
        if resumed:  # drop what the stopped run logged past its checkpoint: it is done again
            checkpoint.cut_logs(cfg.output_dir, resumed[0])
            checkpoint.remove_incomplete(cfg.output_dir, log)
        run.logfile = open(os.path.join(cfg.output_dir, "main.log"), "a" if resumed else "w")
        run.jsonl = runlog.RunLog(cfg.output_dir, "a" if resumed else "w")  # main.jsonl
    if resumed:
        run.start, run.resumed = resumed[0], True
        checkpoint.restore(resumed[3], model, train_loader, run.rng, run.loss_detector,
                           run.norm_detector, checkpoint.state_path(cfg.output_dir, run.start, rank))
        log(f"resuming from step {run.start}: {checkpoint.model_path(cfg.output_dir, run.start)}")
    return run


def due(step: int, every: int, last: bool) -> bool:
    """Whether a hook run every `every` steps (0: never) runs at `step`; the last step always."""
    return every > 0 and (step % every == 0 or last)


def save_checkpoint(run: Run, step: int) -> None:
    """The state at the top of `step`'s training (after its eval and sample): every rank
    writes its state, rank 0 the model. The logs are flushed first, so a resumed run finds
    every line up to the checkpoint (checkpoint.cut_logs)."""
    cfg = run.cfg
    if run.logfile:
        run.logfile.flush()
    checkpoint.save(cfg.output_dir, step, run.model, run.train_loader, run.rng, run.loss_detector,
                    run.norm_detector, keep=cfg.checkpoint_keep, log=run.log,
                    comm=run.comm if run.comm.backend != "none" else None)


def log_evals(run: Run, step: int) -> None:
    """The val loss (each rank's slice, averaged over the ranks) and, on rank 0, HellaSwag."""
    cfg, log = run.cfg, run.log
    if run.val_loader is not None and run.val_batches > 0:
        val_loss = run.comm.average(evaluate(run.model, run.val_loader, run.val_batches))
        log(f"val loss {val_loss:.6f}")
        run.history["val"].append((step, val_loss))
        if run.logfile:
            run.logfile.write(f"s:{step} tel:{val_loss:.6f}\n")
            run.jsonl.val(step, val_loss)
    if run.rank == 0 and cfg.hellaswag:
        from .hellaswag import evaluate_hellaswag
        correct, total = evaluate_hellaswag(run.model, cfg.hellaswag)
        acc = correct / total if total else 0.0
        log(f"HellaSwag: {correct}/{total} = {acc:.6f}")
        run.history.setdefault("hellaswag", []).append((step, acc))
        if run.logfile:
            run.logfile.write(f"s:{step} eval:{acc:.4f}\n")


def log_sample(run: Run, step: int) -> None:
    """Rank 0: up to -g tokens sampled from the document token (<|endoftext|>, or Llama 3's
    <|begin_of_text|>) with the run's RNG."""
    tok = run.tok or tokenizer.gpt2()
    gen_len = min(run.cfg.gen_tokens, run.config.max_seq_len - 1)
    text = tok.decode(sample(run.model, [tok.eot], gen_len, run.rng))
    run.log("generating:\n---")
    run.log(text)
    run.log("---")


def log_step(run: Run, step: int, r: StepResult, ms: float) -> None:
    """Record a step: history, the skip line, the step line, main.log and main.jsonl."""
    cfg, log = run.cfg, run.log
    run.history["train"].append(r.loss)
    run.history["lr"].append(r.lr)
    if r.skipped:
        run.history["skipped"].append(step)
        log(f"skipping update of step {step + 1} due to {r.skipped}")
    tokens = run.tokens_per_step
    tok_s = tokens / (ms / 1000.0)
    util = "" if run.peak is None else \
        f"{100 * mfu(run.config.flops_per_token(cfg.seq_len), tokens, ms / 1000.0, run.peak):.1f}% bf16 MFU | "
    log(f"step {step + 1:4d}/{cfg.max_steps} | train loss {r.loss:.6f} | norm {r.norm:.4f} | "
        f"lr {r.lr:.2e} | {ms:.2f} ms | {util}{tok_s:.0f} tok/s")
    if run.logfile:
        run.logfile.write(f"s:{step} trl:{r.loss:.6f} lr:{r.lr:.6f} norm:{r.norm:.2f}\n")
        run.logfile.flush()
        run.jsonl.train_step(step, r.loss, r.lr, r.norm, ms, tok_s, skipped=r.skipped)


def save_model(run: Run) -> None:
    """-o without -n: the final model file (with -n the last checkpoint holds it)."""
    path = checkpoint.model_path(run.cfg.output_dir, run.cfg.max_steps)
    params = run.model.params_host()
    checkpoint.check_finite(params, path)
    formats.write_model(path, run.config, params, dtype=checkpoint.model_file_dtype(run.model))
    run.log(f"wrote {path}")


def _hook_due(step: int, every: int, at_end: bool) -> bool:
    """Due every `every` steps (at_end False), or only because `step` is the last (True)."""
    return every > 0 and (step % every != 0 if at_end else step % every == 0)


def run_hooks(run: Run, step: int, at_end: bool = False) -> None:
    """The evals and the sample of `step`: at_end False, those due every -v / -s steps; True,
    those the last step adds. The checkpoint of `step` goes between the two, so it holds the
    state an uninterrupted longer run has there (a resumed run skips the first kind)."""
    cfg = run.cfg
    if _hook_due(step, cfg.val_every, at_end):
        log_evals(run, step)
    if run.rank == 0 and cfg.gen_tokens > 0 and step > 0 and _hook_due(step, cfg.sample_every, at_end):
        log_sample(run, step)


def hooks_due(run: Run, step: int) -> bool:
    """Whether `step` has a periodic eval or sample (run_hooks) to do before its training step."""
    cfg = run.cfg
    evals = _hook_due(step, cfg.val_every, False) and (run.val_batches > 0 or bool(cfg.hellaswag))
    samples = cfg.gen_tokens > 0 and step > 0 and _hook_due(step, cfg.sample_every, False)
    return evals or samples


def log_progress(run: Run, step: int, ms: float) -> None:
    """After the third step and at every tenth of the run: steps done, ms/step, time left
    (the training steps' mean, the first left out: it pays for warm-up; evals not counted)."""
    cfg = run.cfg
    run.step_ms.append(ms)
    done, total = step + 1 - run.start, cfg.max_steps - run.start
    if total < 10 or step + 1 == cfg.max_steps or not (
            done == 3 or (10 * done) // total > (10 * (done - 1)) // total):
        return
    times = run.step_ms[1:] or run.step_ms
    mean = sum(times) / len(times)
    left = (cfg.max_steps - step - 1) * mean / 1000.0
    run.log(f"progress: {step + 1}/{cfg.max_steps} steps, {mean:.0f} ms/step, about "
            f"{int(left // 60)}m{int(left % 60):02d}s left (training steps only)")


class StopSignals:
    """SIGINT and SIGTERM during training set `signum`, which the loop reads between steps,
    so a step, an eval or a checkpoint is never cut half-way. A second signal raises
    KeyboardInterrupt at once (checkpoint.save removes what it had half-written). Only in
    the main thread (the only one Python delivers signals to); elsewhere a no-op."""

    def __enter__(self):
        self.signum = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def stop_requested(run: Run, stop: StopSignals) -> bool:
    """Whether to stop before this step's training; data parallel: if any rank got the
    signal, so every rank stops at the same step (one scalar all-reduce a step)."""
    flag = stop.signum is not None
    if run.comm.backend != "none":
        flag = run.comm.average(1.0 if flag else 0.0) > 0
    return flag


def stop_run(run: Run, step: int, signum: int | None, hooks_done: bool, saved: bool) -> None:
    """Stop at `step`, before its training step, after a signal: with -n, write the checkpoint
    at `step` unless it is there (saved) or `step` still owes its eval or sample (a resumed
    run would skip them); then raise Interrupted with where things stand."""
    cfg = run.cfg
    signum = signum or signal.SIGINT  # a rank that only heard of it from another
    wrote = ""
    if cfg.checkpoint_every > 0 and step > 0 and not saved and not (run.resumed and step == run.start):
        if hooks_done or not hooks_due(run, step):
            save_checkpoint(run, step)
            wrote = f"wrote a checkpoint at step {step}; "
        else:
            wrote = f"no checkpoint at step {step} (its val/sample were not done yet); "
    steps = checkpoint.complete_steps(cfg.output_dir) if cfg.output_dir else []
    where = (f"last complete checkpoint: {checkpoint.model_path(cfg.output_dir, steps[-1])}; "
             f"resume with -y 1" if steps else "no checkpoint to resume from (-n N writes them)")
    raise Interrupted(signum, f"interrupted ({signal.Signals(signum).name}) at step "
                              f"{step}/{cfg.max_steps}; {wrote}{where}")


def train(cfg: TrainConfig, log=print, comm=None) -> dict:
    """Run cfg.max_steps steps of AdamW; returns the losses for tests and callers.

    Data parallel (llmcu.distributed): comm=None takes the process group from the
    launcher's environment; each rank reads its slice of every batch, only rank 0
    logs, samples and writes the model file, every rank writes its optimizer state.
    SIGINT/SIGTERM stop it between steps with Interrupted (StopSignals, stop_run); a
    non-finite loss or gradient norm with the outlier skip off, with TrainingDiverged."""
    run = setup(cfg, log, comm)
    try:
        with StopSignals() as stop:
            for step in range(run.start, cfg.max_steps + 1):
                last = step == cfg.max_steps
                # signalled during the last step: stop before this step's evals (one process;
                # data parallel asks the ranks once a step, below, so they all stop together)
                if run.comm.backend == "none" and stop.signum is not None:
                    stop_run(run, step, stop.signum, hooks_done=False, saved=False)
                # a checkpoint holds the state at the top of its step after that step's eval
                # and sample, so a resumed run begins with the training step, repeating nothing
                saved = False
                if not (run.resumed and step == run.start):
                    run_hooks(run, step)
                    if step > 0 and due(step, cfg.checkpoint_every, last):
                        save_checkpoint(run, step)
                        saved = True
                if last:
                    run_hooks(run, step, at_end=True)
                    break
                if stop_requested(run, stop):  # signalled during the eval, sample or checkpoint
                    stop_run(run, step, stop.signum, hooks_done=True, saved=saved)
                t0 = time.perf_counter()
                r = train_step(run.model, run.train_loader, step, cfg, run.accum_steps,
                               run.loss_detector, run.norm_detector, graph=run.graph)
                ms = (time.perf_counter() - t0) * 1000.0
                log_step(run, step, r, ms)
                log_progress(run, step, ms)
            if cfg.output_dir and cfg.checkpoint_every == 0 and run.rank == 0:
                save_model(run)
    finally:
        if run.logfile:
            run.logfile.close()
        if run.jsonl:
            run.jsonl.close()
        if run.own_comm:
            run.comm.close()
    return run.history
