"""The `llmcu` command: prepare data, train, plot runs, export the tokenizer."""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import __version__
from .config import TrainConfig
from .schedule import SCHEDULES

_DEFAULTS = TrainConfig()


def _number(kind, lo=None, hi=None, also=()):
    """An argparse type: a finite `kind` (int or float) in [lo, hi] (either end may be
    None), or one of the values in `also` (such as -1 for "off"). A bad value is argparse's
    one-line error naming the flag, what it must be, and what was given."""
    want = ("an integer" if kind is int else "a finite number")
    if lo is not None and hi is not None:
        want += f" in [{lo:g}, {hi:g}]"
    elif lo is not None:
        want += f" >= {lo:g}"
    elif hi is not None:
        want += f" <= {hi:g}"
    if also:
        want += " or " + " or ".join(f"{v:g}" for v in also)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if value in also:
            return value
        if not math.isfinite(value) or (lo is not None and value < lo) or \
                (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's messages name the type
    return parse


_COUNT = _number(int, 1)      # B, T, steps, batches: at least one
_EVERY = _number(int, 0)      # every N steps, token counts, keep K: 0 is "off"/"none"
_NONNEG = _number(float, 0)   # rates, decay, thresholds: finite and not negative
_SEED = _number(int, 0)       # NumPy's generators take non-negative seeds


def _add_prepare(sub):
    p = sub.add_parser("prepare", help="download and tokenize a dataset into llm.c token shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", choices=["tinyshakespeare", "tinystories", "hellaswag", "fineweb",
                                        "edu_fineweb"])
    p.add_argument("--input", default=None,
                   help="local copy of the raw data (input.txt for tinyshakespeare, "
                        "TinyStories_all_data.tar.gz for tinystories, hellaswag_val.jsonl for "
                        "hellaswag, a glob of parquet files with a 'text' column or JSONL files "
                        "with a \"text\" field for fineweb/edu_fineweb) instead of downloading")
    p.add_argument("--out-dir", default=None,
                   help="where the .bin shards go (default data/<dataset>; fineweb: data/fineweb10B, ...)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="Llama 3 tokenizer (Meta's tokenizer.model, or a Hugging Face Llama directory): "
                        "documents prefixed with <|begin_of_text|>, uint32 shards; unset: GPT-2")
    p.add_argument("--version", default="10B", choices=["10B", "100B"],
                   help="fineweb/edu_fineweb: which sample of the Hugging Face dataset")
    p.add_argument("--shard-size", type=_COUNT, default=10**8, help="fineweb/edu_fineweb: tokens per shard")
    p.add_argument("--workers", type=_COUNT, default=None,
                   help="fineweb/edu_fineweb: tokenizer processes; unset: the CPU count")


def _prepare_out_dir(a) -> str:
    """--out-dir, or the dataset's default (config.DATASETS, else data/<dataset>; fineweb's
    data/fineweb10B, ...)."""
    if a.out_dir:
        return a.out_dir
    if a.dataset in ("fineweb", "edu_fineweb"):
        from .fineweb import default_out_dir
        return default_out_dir(a.dataset, a.version)
    from .config import DATASETS
    return DATASETS[a.dataset]["dir"] if a.dataset in DATASETS else os.path.join("data", a.dataset)


def _run_prepare(parser, a) -> int:
    from . import data
    from .tokenizer import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    if a.dataset in ("fineweb", "edu_fineweb"):
        from .fineweb import prepare_fineweb
        prepare_fineweb(a.dataset, _prepare_out_dir(a), input_pattern=a.input, version=a.version,
                        shard_size=a.shard_size, workers=a.workers, tok=tok)
    elif a.dataset == "tinyshakespeare":
        data.prepare_tinyshakespeare(_prepare_out_dir(a), input_path=a.input, tok=tok)
    elif a.dataset == "hellaswag":
        if tok.name != "gpt2":
            parser.error("prepare hellaswag: llm.c's eval file holds uint16 ids, GPT-2 only; "
                         "drop --tokenizer")
        from .hellaswag import prepare_hellaswag
        prepare_hellaswag(_prepare_out_dir(a), input_jsonl=a.input)
    else:
        data.prepare_tinystories(_prepare_out_dir(a), archive_path=a.input, tok=tok)
    return 0


def _add_train(sub):
    d = _DEFAULTS
    p = sub.add_parser("train", help="train GPT-2 (llm.c's flags)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--train-data", default=d.train_pattern, help="train token shards (glob pattern)")
    p.add_argument("-j", "--val-data", default=d.val_pattern, help="val token shards (glob pattern)")
    p.add_argument("-e", "--model", default=d.model,
                   help="model to start from: an llm.c .bin checkpoint, hf:DIR_OR_NAME for pretrained Hugging Face "
                        "GPT-2 weights (hf:gpt2 downloads when the network allows), or a descriptor "
                        "(d6, d12, d24, d36, d48, gpt2, ...) for a random init of that size; Llama family: "
                        "llama (= llama-d6), llama-d12, gemma-d6, ... (same depths), llama2-7b, llama3.2-1b, "
                        "gemma-2b, a Llama .bin file (llm.c's Llama 3 layout) or hf:DIR of a Llama/Gemma")
    p.add_argument("-o", "--output-dir", default=d.output_dir, help="directory for main.log and the final model")
    p.add_argument("-b", "--batch-size", type=_COUNT, default=d.batch_size, help="micro-batch size B")
    p.add_argument("-t", "--seq-len", type=_COUNT, default=d.seq_len, help="sequence length T")
    p.add_argument("-l", "--learning-rate", type=_NONNEG, default=d.learning_rate, help="AdamW learning rate")
    p.add_argument("-x", "--max-steps", type=_COUNT, default=d.max_steps, help="number of training steps")
    p.add_argument("-v", "--val-every", type=_EVERY, default=d.val_every, help="evaluate val loss every N steps (0: never)")
    p.add_argument("-m", "--val-batches", type=_COUNT, default=d.val_batches, help="number of val batches per evaluation")
    p.add_argument("-s", "--sample-every", type=_EVERY, default=d.sample_every, help="sample text every N steps (0: never)")
    p.add_argument("-g", "--gen-tokens", type=_EVERY, default=d.gen_tokens, help="number of tokens to sample")
    p.add_argument("-d", "--total-batch-size", type=_number(int, 1, also=(-1,)), default=d.total_batch_size,
                   help="tokens per optimizer step, a multiple of B*T; the gradient is accumulated over "
                        "total/(B*T) micro-batches (-1: B*T, no accumulation)")
    p.add_argument("-k", "--lr-schedule", default=d.lr_schedule, choices=list(SCHEDULES),
                   help="learning-rate schedule after warmup")
    p.add_argument("-u", "--warmup-iters", type=_EVERY, default=d.warmup_iters,
                   help="linear learning-rate warmup steps")
    p.add_argument("-q", "--final-lr-frac", type=_number(float, 0, 1), default=d.final_lr_frac,
                   help="final learning rate as a fraction of -l (1.0: no decay)")
    p.add_argument("-c", "--weight-decay", type=_NONNEG, default=d.weight_decay,
                   help="AdamW weight decay (matrices and embeddings only)")
    p.add_argument("--grad-clip", type=_NONNEG, default=d.grad_clip, help="clip the global gradient norm to this (0: off)")
    p.add_argument("-sl", "--skip-loss-z", type=_NONNEG, default=d.skip_loss_z,
                   help="skip the update when the loss z-score over the last 128 steps exceeds this (0: off)")
    p.add_argument("-sg", "--skip-norm-z", type=_NONNEG, default=d.skip_norm_z,
                   help="skip the update when the grad-norm z-score over the last 128 steps exceeds this (0: off)")
    p.add_argument("-n", "--checkpoint-every", type=_EVERY, default=d.checkpoint_every,
                   help="write a checkpoint to -o every N steps and at the last step: model_%%08d.bin, "
                        "state_%%08d_00000.bin (AdamW moments, step, RNG, data position), DONE_%%08d (0: off)")
    p.add_argument("-nk", "--checkpoint-keep", type=_EVERY, default=d.checkpoint_keep,
                   help="keep only the newest K complete checkpoints, deleting older ones (0: keep all)")
    p.add_argument("-y", "--resume", type=int, default=d.resume, choices=[0, 1],
                   help="1: resume from the newest complete checkpoint in -o (bit-identical to an "
                        "uninterrupted run)")
    p.add_argument("--hellaswag", metavar="PATH", default=d.hellaswag,
                   help="llm.c eval file (llmcu prepare hellaswag writes data/hellaswag/hellaswag_val.bin): "
                        "HellaSwag accuracy (acc_norm) at every val step (-v)")
    p.add_argument("--seed", type=_SEED, default=d.seed, help="seed for the random init and sampling")
    p.add_argument("--tokenizer", metavar="PATH", default=d.tokenizer,
                   help="Llama models: Meta's Llama 3 tokenizer.model (or a Hugging Face Llama directory) "
                        "for data prepared with it (uint32 shards) and decoded samples; a descriptor's "
                        "vocabulary becomes the tokenizer's; unset: GPT-2's, or the one in an hf: model's directory")
    p.add_argument("--no-shuffle", action="store_true",
                   help="read the train shards in order (default: as llm.c, a seeded permutation of the "
                        "shards every epoch and of the B*T windows in each shard; val is never shuffled)")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda", "emu", "auto"],
                   help="cpu: the NumPy model; cuda: the CUDA kernels on a GPU; emu: the same kernels "
                        "emulated on the CPU (slow, for testing); auto: cuda if a GPU is usable, else cpu")
    p.add_argument("--threads", type=_EVERY, default=d.threads,
                   help="CPU threads for the NumPy model's element-wise layers and BLAS (llm.c's "
                        "OMP_NUM_THREADS); 0: OMP_NUM_THREADS if set, else all CPUs")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision: bf16 is mixed precision (bf16 parameters, activations and "
                        "gradients; fp32 statistics, losses and AdamW moments) on --device cuda or emu; "
                        "auto: bf16 on a GPU of compute capability >= 8.0, fp32 otherwise")
    p.add_argument("-w", "--master-weights", type=int, default=d.master_weights, choices=[0, 1],
                   help="bf16: 1 keeps fp32 master weights and writes the bf16 parameters by stochastic "
                        "rounding (llm.c's -w); 0 updates the bf16 parameters in place")
    p.add_argument("--cuda-graph", type=int, default=d.cuda_graph, choices=[0, 1],
                   help="1: capture the training step as CUDA graphs and replay them (one launch "
                        "instead of ~500 per step; GPT-2 on --device cuda or emu, one process)")
    p.add_argument("-z", "--zero-stage", type=int, default=d.zero_stage, choices=[0, 1],
                   help="data parallel (several processes, from torchrun/mpirun/srun): 0 all-reduces the "
                        "gradients, 1 is ZeRO-1 (AdamW state sharded across ranks)")
    p.add_argument("--overlap", type=int, default=d.overlap, choices=[0, 1],
                   help="data parallel: 1 reduces each layer's gradients while the backward computes "
                        "the layers below (llmcu/buckets.py), 0 reduces them all after the backward")
    p.add_argument("--dist-backend", default=d.dist_backend, choices=["auto", "gloo", "nccl"],
                   help="data-parallel communicator: nccl (GPUs, cupy.cuda.nccl), gloo (CPU, "
                        "torch.distributed); auto: nccl for --device cuda, gloo otherwise, none for "
                        "one process")
    p.add_argument("-pi", "--init-method", default=d.init_method, choices=["tcp", "mpi", "fs"],
                   help="rendezvous of the processes: tcp (MASTER_ADDR/MASTER_PORT, torch's TCPStore), "
                        "mpi (mpi4py), fs (a file on a shared filesystem, -pf)")
    p.add_argument("-pf", "--init-file", default=d.init_file,
                   help="with -pi fs: a new file name on a filesystem every node sees")


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="write llm.c's gpt2_tokenizer.bin",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="gpt2_tokenizer.bin")


def _add_sample(sub):
    p = sub.add_parser("sample", help="generate text from a model (KV-cached)",
                       description="Print the prompt followed by the sampled continuation. An empty "
                                   "prompt starts from <|endoftext|> and prints only the continuation. "
                                   "Prompt + new tokens must fit the model's max_seq_len.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-e", "--model", required=True,
                   help="an llm.c .bin checkpoint, or a descriptor (d6, d12, ...) for a random init")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("-g", "--tokens", type=_EVERY, default=64, help="number of new tokens to generate")
    p.add_argument("--temperature", type=_NONNEG, default=1.0, help="softmax temperature (0: greedy)")
    p.add_argument("--top-k", type=_COUNT, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=_SEED, default=None, help="sampling seed (default: fresh randomness)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (llm.c's way; slow)")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="tokenizer of the model's vocabulary (Llama 3's tokenizer.model or a Hugging Face "
                        "Llama directory; unset: GPT-2's, or the one in an hf: model's directory)")


def _run_sample(parser, a) -> int:
    from .sample import sample_text
    from .train import build_model
    from .tokenizer import check_model_vocab, model_tokenizer
    tok = model_tokenizer(a.model, a.tokenizer)
    model = build_model(a.model, device="cpu", vocab_size=tok.vocab_size)  # a descriptor: the same init every run
    check_model_vocab(tok, model.config.vocab_size)
    text = sample_text(model, a.prompt, a.tokens, temperature=a.temperature, top_k=a.top_k,
                       seed=a.seed, use_cache=not a.no_cache, tok=tok)
    print(text)
    return 0


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert between Hugging Face GPT-2 and llm.c checkpoints",
                       description="--from-hf DIR_OR_NAME --out model.bin: import a Hugging Face GPT-2 "
                                   "checkpoint (a local directory with config.json and model.safetensors "
                                   "or pytorch_model.bin, or a hub name such as gpt2 when the network "
                                   "allows) into an llm.c model file. --to-hf DIR --model model.bin: "
                                   "write config.json and model.safetensors into DIR, which "
                                   "transformers.GPT2LMHeadModel.from_pretrained(DIR) loads.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR_OR_NAME", help="Hugging Face checkpoint to import")
    way.add_argument("--to-hf", metavar="DIR", help="directory to export a Hugging Face checkpoint to")
    p.add_argument("--out", help="llm.c model file to write (with --from-hf)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype of the written llm.c file (with --from-hf)")
    p.add_argument("--model", help="llm.c model file to export (with --to-hf)")


def _run_convert(parser, a) -> int:
    from . import formats, hf
    if a.from_hf is not None:
        if not a.out:
            parser.error("convert --from-hf needs --out model.bin")
        try:
            config, params = hf.import_hf(a.from_hf)
        except ImportError as e:  # pytorch_model.bin without torch
            raise ValueError(str(e)) from None
        formats.write_model(a.out, config, params, dtype=a.dtype)
        print(f"wrote {a.out} ({config}, {a.dtype})")
    else:
        if not a.model:
            parser.error("convert --to-hf needs --model model.bin")
        config, params = formats.read_model(a.model)
        hf.export_hf(a.to_hf, config, params)
        print(f"wrote {a.to_hf}/config.json and {a.to_hf}/model.safetensors ({config})")
    return 0


def _add_plot(sub):
    p = sub.add_parser("plot", help="plot train/val loss and lr of runs into a PNG",
                       description="Read each RUN_DIR/main.jsonl (written by `llmcu train -o DIR`) "
                                   "and draw train and val loss (runs overlaid, labelled by "
                                   "directory name) and the learning rate into one PNG.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output dirs of training runs")
    p.add_argument("--out", default="loss.png", help="PNG file to write")
    p.add_argument("--title", default=None, help="plot title")


def _run_plot(a) -> int:
    from .plot import plot_runs
    try:
        plot_runs(a.run_dirs, a.out, title=a.title)
    except ImportError as e:
        raise ValueError(str(e)) from None
    print(f"wrote {a.out}")
    return 0


def _run_train(parser, a) -> int:
    from .train import train
    from .schedule import grad_accum_steps
    try:
        grad_accum_steps(a.total_batch_size, a.batch_size, a.seq_len)
    except ValueError as e:
        parser.error(str(e))
    from .train import resolve_device
    from .train import resolve_dtype
    try:
        device = resolve_device(a.device)
        resolve_dtype(a.dtype, device)  # checks it; "auto" is resolved per model and launch
    except ValueError as e:
        parser.error(str(e))
    if a.device == "auto" and os.environ.get("RANK", "0") == "0":  # rank 0 logs
        print(f"device: {device} (--device auto: {'a usable CUDA GPU' if device == 'cuda' else 'no usable CUDA GPU'})",
              flush=True)
    cfg = TrainConfig(train_pattern=a.train_data, val_pattern=a.val_data, model=a.model,
                      output_dir=a.output_dir, batch_size=a.batch_size, seq_len=a.seq_len,
                      learning_rate=a.learning_rate, max_steps=a.max_steps, val_every=a.val_every,
                      val_batches=a.val_batches, sample_every=a.sample_every, gen_tokens=a.gen_tokens,
                      seed=a.seed, weight_decay=a.weight_decay, grad_clip=a.grad_clip, device=device,
                      total_batch_size=a.total_batch_size, lr_schedule=a.lr_schedule,
                      warmup_iters=a.warmup_iters, final_lr_frac=a.final_lr_frac,
                      skip_loss_z=a.skip_loss_z, skip_norm_z=a.skip_norm_z,
                      checkpoint_every=a.checkpoint_every, checkpoint_keep=a.checkpoint_keep,
                      resume=a.resume, hellaswag=a.hellaswag, zero_stage=a.zero_stage,
                      dist_backend=a.dist_backend, init_method=a.init_method, init_file=a.init_file,
                      dtype=a.dtype, master_weights=a.master_weights, cuda_graph=a.cuda_graph,
                      tokenizer=a.tokenizer, shuffle=not a.no_shuffle, overlap=a.overlap,
                      threads=a.threads)
    train(cfg, log=lambda s: print(s, flush=True))
    return 0


def _check_outputs(a) -> None:
    """Every path a subcommand will write, checked before any work (llmcu.outputs)."""
    from .outputs import check_dir, check_file
    if a.command == "prepare":
        check_dir(_prepare_out_dir(a), "--out-dir")
    elif a.command in ("tokenizer", "plot") or (a.command == "convert" and a.from_hf and a.out):
        check_file(a.out, "--out")
    elif a.command == "convert" and a.to_hf:
        check_dir(a.to_hf, "--to-hf")
    # train checks -o in llmcu.train.setup, which API callers go through too


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the flag, what it must be, what was given)
    rather than the whole usage block; --help still shows everything."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `llmcu` command line: every subcommand and flag."""
    parser = _Parser(prog="llmcu", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmcu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_tokenizer(sub)
    _add_sample(sub)
    _add_convert(sub)
    _add_plot(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .data import DatasetError
    from .emu import EmuError
    from .formats import FormatError
    from .outputs import describe_os_error
    from .train import Interrupted, TrainingDiverged
    try:
        _check_outputs(a)
        if a.command == "prepare":
            return _run_prepare(parser, a)
        if a.command == "train":
            return _run_train(parser, a)
        if a.command == "sample":
            return _run_sample(parser, a)
        if a.command == "convert":
            return _run_convert(parser, a)
        if a.command == "plot":
            return _run_plot(a)
        if a.command == "tokenizer":
            from .tokenizer import write_tokenizer_bin
            write_tokenizer_bin(a.out)
            print(f"wrote {a.out}")
            return 0
    except (DatasetError, FormatError, ValueError, EmuError) as e:
        print(f"llmcu {a.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # reading or writing a path: the path and the OS's reason
        print(f"llmcu {a.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"llmcu {a.command}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGINT/SIGTERM during training: where it stopped, how to resume
        print(f"llmcu {a.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"llmcu {a.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
