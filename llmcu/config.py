"""GPT-2 model configurations and the numbers derived from them.

One formula, one place: the padded vocabulary, the parameter tensors (names,
shapes, order) and the flops per token are computed here and nowhere else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
VOCAB_PAD_MULTIPLE = 128  # llm.c pads the vocabulary for faster GEMMs

# The 16 parameter tensors, in llm.c's order (the order of the model file).
PARAMETER_NAMES = (
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
)


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Vp: the vocabulary rounded up to a multiple of 128, as llm.c stores it."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class GPT2Config:
    max_seq_len: int = 1024      # maxT
    vocab_size: int = GPT2_VOCAB_SIZE  # V
    num_layers: int = 12         # L
    num_heads: int = 12          # NH
    channels: int = 768          # C
    padded_vocab_size: int = field(default=0)  # Vp; 0 means "derive from V"

    def __post_init__(self):
        for name in ("max_seq_len", "vocab_size", "num_layers", "num_heads", "channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config: {name} must be a positive int, got {value!r}")
        if self.channels % self.num_heads != 0:
            raise ValueError(
                f"GPT2Config: channels ({self.channels}) must be divisible by "
                f"num_heads ({self.num_heads})")
        if self.padded_vocab_size == 0:
            object.__setattr__(self, "padded_vocab_size", padded_vocab_size(self.vocab_size))
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(
                f"GPT2Config: padded_vocab_size ({self.padded_vocab_size}) is smaller "
                f"than vocab_size ({self.vocab_size})")

    @property
    def head_size(self) -> int:
        return self.channels // self.num_heads

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the 16 parameter tensors in llm.c's order.

        Per-layer tensors carry a leading L axis; Linear weights are (out, in).
        """
        Vp, C, L, maxT = self.padded_vocab_size, self.channels, self.num_layers, self.max_seq_len
        shapes = {
            "wte": (Vp, C), "wpe": (maxT, C),
            "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
            "attprojw": (L, C, C), "attprojb": (L, C),
            "ln2w": (L, C), "ln2b": (L, C),
            "fcw": (L, 4 * C, C), "fcb": (L, 4 * C),
            "fcprojw": (L, C, 4 * C), "fcprojb": (L, C),
            "lnfw": (C,), "lnfb": (C,),
        }
        return [(name, shapes[name]) for name in PARAMETER_NAMES]

    def num_parameters(self) -> int:
        """Number of stored parameters (padded wte rows included, as llm.c counts)."""
        return sum(math.prod(shape) for _, shape in self.parameter_shapes())

    def flops_per_token(self, T: int | None = None) -> int:
        """Training flops per token, llm.c's formula: 6N + 6*L*C*T."""
        T = self.max_seq_len if T is None else T
        return 6 * self.num_parameters() + 6 * self.num_layers * self.channels * T


# llm.c's depth descriptors: d6, d12 (124M), d24 (350M), d36 (774M), d48 (1558M).
_DEPTH_SHAPES = {6: (6, 384), 12: (12, 768), 24: (16, 1024), 36: (20, 1280), 48: (25, 1600)}
_NAMED = {"gpt2": 12, "gpt2-124m": 12, "gpt2-medium": 24, "gpt2-350m": 24,
          "gpt2-large": 36, "gpt2-774m": 36, "gpt2-xl": 48, "gpt2-1558m": 48}


def gpt2_descriptors() -> list[str]:
    """Every GPT-2 descriptor gpt2_config takes."""
    return [f"d{d}" for d in _DEPTH_SHAPES] + sorted(_NAMED)


def gpt2_config(descriptor: str, max_seq_len: int = 1024,
                vocab_size: int = GPT2_VOCAB_SIZE) -> GPT2Config:
    """A config from llm.c's descriptor ("d12") or a model name ("gpt2-medium")."""
    key = descriptor.strip().lower()
    depth = _NAMED.get(key)
    match = re.fullmatch(r"d(\d+)", key)
    if match:
        depth = int(match.group(1))
    if depth not in _DEPTH_SHAPES:
        raise ValueError(f"unknown GPT-2 model descriptor {descriptor!r}; expected one of: "
                         f"{', '.join(gpt2_descriptors())}")
    num_heads, channels = _DEPTH_SHAPES[depth]
    return GPT2Config(max_seq_len=max_seq_len, vocab_size=vocab_size,
                      num_layers=depth, num_heads=num_heads, channels=channels)


def parameter_slices(config: GPT2Config):
    """(name, slice, shape) of each parameter tensor in the flat array, llm.c's order."""
    out, offset = [], 0
    for name, shape in config.parameter_shapes():
        size = math.prod(shape)
        out.append((name, slice(offset, offset + size), shape))
        offset += size
    return out


def parameter_views(config: GPT2Config, flat):
    """Named views into one flat parameter (or gradient) array, llm.c's order.

    The views share memory with `flat`, so an optimizer can update the flat
    array while the layers read the named tensors.
    """
    expected = config.num_parameters()
    if flat.ndim != 1 or flat.size != expected:
        raise ValueError(
            f"parameter_views: expected a 1-D array of {expected} elements for {config}, "
            f"got shape {tuple(flat.shape)}")
    return {name: flat[sl].reshape(shape) for name, sl, shape in parameter_slices(config)}


# Default locations, relative to the working directory (llm.c keeps them beside its scripts).
DATASETS = {
    "tinyshakespeare": {
        "dir": "data/tinyshakespeare",
        "train": "data/tinyshakespeare/tiny_shakespeare_train.bin",
        "val": "data/tinyshakespeare/tiny_shakespeare_val.bin",
    },
    "tinystories": {
        "dir": "data/tinystories",
        "train": "data/tinystories/TinyStories_train.bin",
        "val": "data/tinystories/TinyStories_val.bin",
    },
}


@dataclass
class TrainConfig:
    """What `llmcu train` runs; the defaults are llm.c's train_gpt2.c demo."""
    train_pattern: str = DATASETS["tinyshakespeare"]["train"]  # -i
    val_pattern: str = DATASETS["tinyshakespeare"]["val"]  # -j
    model: str = "d12"           # -e: a .bin checkpoint or a descriptor (d6, d12, gpt2-medium, ...)
    output_dir: str | None = None  # -o: main.log and the final model go here
    batch_size: int = 4          # -b  B
    seq_len: int = 64            # -t  T
    learning_rate: float = 1e-4  # -l
    max_steps: int = 40          # -x
    val_every: int = 10          # -v
    val_batches: int = 5         # -m
    sample_every: int = 20       # -s
    gen_tokens: int = 64         # -g
    seed: int = 42
    weight_decay: float = 0.0    # -c  matrices and embeddings only
    grad_clip: float = 1.0       # --grad-clip  (0: off)
    device: str = "cpu"
    total_batch_size: int = -1   # -d  tokens per optimizer step; -1: B*T (no accumulation)
    lr_schedule: str = "cosine"  # -k  cosine | linear | constant | wsd (llmcu.schedule)
    warmup_iters: int = 0        # -u  linear warmup steps
    final_lr_frac: float = 1.0   # -q  final lr = learning_rate * final_lr_frac (1.0: no decay)
    skip_loss_z: float = 0.0     # -sl skip the update when the loss z-score exceeds this (0: off)
    skip_norm_z: float = 0.0     # -sg skip the update when the grad-norm z-score exceeds this (0: off)
    checkpoint_every: int = 0    # -n  write a checkpoint (model, state, DONE) to -o every N steps (0: off)
    checkpoint_keep: int = 0     # -nk keep only the newest K complete checkpoints (0: all)
    resume: int = 0              # -y  1: resume from the newest complete checkpoint in -o
    hellaswag: str | None = None  # --hellaswag: llm.c eval file; HellaSwag accuracy at every val step
    zero_stage: int = 0          # -z  data parallel: 0 all-reduce, 1 ZeRO-1 (sharded AdamW state)
    dist_backend: str = "auto"   # --dist-backend auto | gloo | nccl (llmcu.distributed)
    init_method: str = "tcp"     # -pi rendezvous: tcp (MASTER_ADDR/PORT) | mpi (mpi4py) | fs (-pf)
    init_file: str | None = None  # -pf rendezvous file on a shared filesystem (-pi fs)
    dtype: str = "fp32"          # --dtype fp32 | bf16 (mixed precision; cuda and emu) | auto (bf16 where available)
    master_weights: int = 1      # -w  bf16: 1 keeps fp32 master weights (llm.c's -w), 0 updates bf16 in place
    cuda_graph: int = 0          # --cuda-graph 1: the step as CUDA graphs (llmcu/cuda/graphs.py; GPT-2 kernel models)
    tokenizer: str | None = None  # --tokenizer: Llama 3 tokenizer.model (or an HF dir); None: GPT-2
    shuffle: bool = True         # --no-shuffle sets False: the train loader's order (llm.c shuffles)
    overlap: int = 1             # --overlap data parallel: 1 reduces per layer during the backward (llmcu/buckets.py), 0 after it
    threads: int = 0             # --threads CPU threads (element-wise pool and BLAS); 0: OMP_NUM_THREADS or all CPUs
