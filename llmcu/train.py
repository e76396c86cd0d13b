"""The training loop: device-agnostic, llm.c-style logs.

A backend model offers forward(inputs, targets) -> loss, zero_grad(),
backward(loss_scale=1.0), grad_norm(), update(lr, step, ..., grad_norm=None)
-> grad norm, and acts.logits after a forward; the loop below never looks
inside it.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from . import checkpoint, formats, runlog
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
    return device


DTYPES = ("fp32", "bf16")


def gpu_supports_bf16() -> bool:
    """True when the current CUDA device has bf16 tensor cores (compute capability >= 8.0)."""
    try:
        import cupy
        return int(cupy.cuda.Device().compute_capability) >= 80
    except Exception:
        return False


def resolve_dtype(dtype: str, device: str, config=None, data_parallel: bool = False) -> str:
    """'auto' -> 'bf16' where mixed precision is available: a GPU that supports it
    (cuda, compute capability >= 8.0) and one process (GPT-2 and Llama-family
    models alike; config is not consulted); else 'fp32'. An explicit dtype is
    checked against the (resolved) device."""
    if dtype == "auto":
        return "bf16" if (device == "cuda" and not data_parallel
                          and gpu_supports_bf16()) else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} or auto")
    if dtype == "bf16" and device not in ("cuda", "emu"):
        raise ValueError(f"--dtype bf16 is not supported on --device {device} (the NumPy model is "
                         f"fp32); bf16 runs on --device cuda (a GPU of compute capability >= 8.0) "
                         f"or --device emu (the kernels emulated on the CPU, for testing); "
                         f"or pass --dtype fp32")
    return dtype


def build_model(spec: str, device: str = "cpu", seed: int = 42, max_seq_len: int = 1024,
                dtype: str = "fp32", master_weights: bool = True):
    """A model from a checkpoint file (llm.c format) or a descriptor like 'd12'.

    device: "cpu" (the NumPy model), "cuda" (the kernels on a GPU) or "emu"
    (the same kernels emulated on the CPU: slow, for tests). 'hf:PATH_OR_NAME'
    loads pretrained Hugging Face GPT-2 weights (llmcu.hf.import_hf); a bare
    descriptor such as 'gpt2' is a random init of that size; 'llama', 'llama-d6',
    'gemma-d6', ... (llmcu.llama_config) a Llama-family one. Llama and Gemma
    files and Hugging Face checkpoints are recognised by their contents."""
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
        config, params = model_config(spec, max_seq_len=max_seq_len), None
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
        raise ValueError(f"--cuda-graph 1 needs a GPT-2 model on the CUDA kernels in one process "
                         f"(--device cuda or emu, -z 0), got {what} on --device {cfg.device}; "
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
    logfile: TextIO | None = None       # OUTPUT_DIR/main.log (rank 0 with -o)
    jsonl: runlog.RunLog | None = None  # OUTPUT_DIR/main.jsonl (rank 0 with -o)
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "lr": [], "skipped": []})

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def config(self):
        return self.model.config

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.accum_steps * self.comm.world_size


def setup_model(cfg: TrainConfig, comm, log):
    """The model -e names, or the newest checkpoint's with -y 1, wrapped for data parallel.

    Returns (model, dtype, resumed): dtype is what "auto" became; resumed is
    checkpoint.load_latest's (step, config, params, state), or None."""
    from . import distributed
    if cfg.threads:  # --threads: the CPU backend's pool and BLAS (llmcu/cpu/threads.py)
        from .cpu.threads import set_threads
        set_threads(cfg.threads)
    world = comm.world_size
    data_parallel = comm.backend != "none" or bool(cfg.zero_stage)
    dtype = resolve_dtype(cfg.dtype, cfg.device, data_parallel=data_parallel)  # "auto" resolved once
    resumed = None
    if cfg.resume:
        resumed = checkpoint.load_latest(cfg.output_dir, cfg.model, comm.rank, world,
                                         cfg.zero_stage)  # (step, config, params, state)
        if resumed[0] > cfg.max_steps:
            raise ValueError(f"-y 1: the newest checkpoint in {cfg.output_dir} is at step "
                             f"{resumed[0]}, past -x {cfg.max_steps}; pass -x >= {resumed[0]}")
        model = make_model(resumed[1], resumed[2], cfg.device, cfg.seed, dtype, cfg.master_weights)
    else:
        model = build_model(cfg.model, cfg.device, cfg.seed, dtype=dtype,
                            master_weights=cfg.master_weights)
    dtype = getattr(model, "dtype", "fp32")  # what "auto" became
    if dtype != "fp32" and data_parallel:
        raise ValueError(f"--dtype {dtype} with data parallel ({world} process(es), -z "
                         f"{cfg.zero_stage}) is not supported yet (the communicators and ZeRO-1 "
                         f"work on fp32 gradients); run one process with -z 0, or --dtype fp32")
    if data_parallel:
        model = distributed.DataParallel(model, comm, cfg.zero_stage)
        distributed.check_same_config(comm, distributed.run_fingerprint(cfg, model, resumed))
        log(f"data parallel: {world} process(es), {comm.backend}, -z {cfg.zero_stage}")
    return model, dtype, resumed


def log_model(cfg: TrainConfig, model, dtype: str, log) -> float | None:
    """The model summary, precision and kernel lines; returns the MFU peak (mfu_peak)."""
    print_model_summary(model.config, log)
    if dtype != "fp32":
        log(f"precision: {dtype}, fp32 master weights: {'yes' if cfg.master_weights else 'no'}")
    peak = mfu_peak(cfg.device, dtype, log)  # TFLOP/s for the step lines' MFU column, or None
    inner = getattr(model, "model", model)  # DataParallel keeps the model it wraps in .model
    if hasattr(inner, "kernel_table"):  # a model on the kernels: what each op runs
        log("kernels: " + ", ".join(f"{op} {' + '.join(kernels)}" for op, kernels in inner.kernel_table().items()))
    return peak


def setup_data(cfg: TrainConfig, rank: int, world: int, accum_steps: int, log):
    """This rank's train and val loaders and the batch lines; returns (train, val, val_batches)."""
    B, T = cfg.batch_size, cfg.seq_len
    train_loader = DataLoader(cfg.train_pattern, B, T, rank, world)
    val_loader = DataLoader(cfg.val_pattern, B, T, rank, world) if cfg.val_pattern else None
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
    model, dtype, resumed = setup_model(cfg, comm, log)
    if T > model.config.max_seq_len:
        raise ValueError(f"seq_len T={T} exceeds the model's max_seq_len={model.config.max_seq_len}")
    graph = None
    if cfg.cuda_graph:
        graph = make_graph_step(model, B, T, accum_steps, cfg)
        log("CUDA graphs: the training step is captured and replayed (llmcu/cuda/graphs.py)")
    peak = log_model(cfg, model, dtype, log)
    train_loader, val_loader, val_batches = setup_data(cfg, rank, world, accum_steps, log)
    check_hellaswag(cfg, model.config)
    run = Run(cfg, log, comm, own_comm, model, graph, accum_steps, peak, train_loader, val_loader,
              val_batches, OutlierDetector(), OutlierDetector(), np.random.default_rng(cfg.seed))
    if cfg.output_dir:
        os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.output_dir and rank == 0:
        run.logfile = open(os.path.join(cfg.output_dir, "main.log"), "a" if resumed else "w")
        run.jsonl = runlog.RunLog(cfg.output_dir, "a" if resumed else "w")  # main.jsonl
    if resumed:
        run.start = resumed[0]
        checkpoint.restore(resumed[3], model, train_loader, run.rng, run.loss_detector,
                           run.norm_detector, checkpoint.state_path(cfg.output_dir, run.start, rank))
        log(f"resuming from step {run.start}: {checkpoint.model_path(cfg.output_dir, run.start)}")
    return run


def due(step: int, every: int, last: bool) -> bool:
    """Whether a hook run every `every` steps (0: never) runs at `step`; the last step always."""
    return every > 0 and (step % every == 0 or last)


def save_checkpoint(run: Run, step: int) -> None:
    """The state at the top of `step`: every rank writes its state, rank 0 the model."""
    cfg = run.cfg
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
    """Rank 0: up to -g tokens sampled from <|endoftext|> with the run's RNG."""
    from .tokenizer import EOT, decode
    gen_len = min(run.cfg.gen_tokens, run.config.max_seq_len - 1)
    text = decode(sample(run.model, [EOT], gen_len, run.rng))
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
    formats.write_model(path, run.config, run.model.params_host(),
                        dtype=checkpoint.model_file_dtype(run.model))
    run.log(f"wrote {path}")


def train(cfg: TrainConfig, log=print, comm=None) -> dict:
    """Run cfg.max_steps steps of AdamW; returns the losses for tests and callers.

    Data parallel (llmcu.distributed): comm=None takes the process group from the
    launcher's environment; each rank reads its slice of every batch, only rank 0
    logs, samples and writes the model file, every rank writes its optimizer state."""
    run = setup(cfg, log, comm)
    try:
        for step in range(run.start, cfg.max_steps + 1):
            last = step == cfg.max_steps
            # a checkpoint holds the state at the top of its step, before eval and sampling
            # (which use the RNG), so a resumed run repeats exactly what this run does next
            if step > 0 and step != run.start and due(step, cfg.checkpoint_every, last):
                save_checkpoint(run, step)
            if due(step, cfg.val_every, last):
                log_evals(run, step)
            if run.rank == 0 and cfg.gen_tokens > 0 and step > 0 and due(step, cfg.sample_every, last):
                log_sample(run, step)
            if last:
                break
            t0 = time.perf_counter()
            r = train_step(run.model, run.train_loader, step, cfg, run.accum_steps,
                           run.loss_detector, run.norm_detector, graph=run.graph)
            log_step(run, step, r, (time.perf_counter() - t0) * 1000.0)
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
