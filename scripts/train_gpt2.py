"""The PyTorch reference, as llm.c's train_gpt2.py: write the files llmcu is tested against.

    python scripts/train_gpt2.py                      # d12 (124M), random init from --seed
    python scripts/train_gpt2.py --hf-dir DIR         # a Hugging Face GPT-2 checkpoint

writes into --output-dir (default out/reference, git-ignored; about 1 GB at d12)
    gpt2_<model>.bin              the initial parameters (llm.c model file, float32)
    gpt2_<model>_debug_state.bin  one batch x, y and, before any update, its logits,
                                  loss and gradients (what llm.c's test_gpt2 checks)
    gpt2_tokenizer.bin            the GPT-2 tokenizer (unless --no-tokenizer)
then overfits that batch for --steps AdamW steps, printing each step's loss.
The batch is the first B*T+1 tokens of --input-bin, or random tokens from
--seed when that file does not exist. Runs from the repo root uninstalled.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmcu.config import GPT2Config, gpt2_config  # noqa: E402
from llmcu.cpu.gpt2 import init_parameters  # noqa: E402
from llmcu.formats import FormatError, read_shard, write_debug_state, write_model  # noqa: E402
from llmcu.torch_gpt2 import (configure_optimizer, from_flat, from_hf_checkpoint,  # noqa: E402
                              grads_to_flat, to_flat)

DEFAULT_INPUT = "data/tinyshakespeare/tiny_shakespeare_val.bin"
DEFAULT_OUTPUT_DIR = "out/reference"  # .gitignore's out/: the d12 files are about 1 GB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="d12", help="llm.c descriptor, e.g. d12 (default: %(default)s)")
    src.add_argument("--hf-dir", default=None, help="load a Hugging Face GPT-2 checkpoint directory")
    p.add_argument("--layers", type=int, default=None, help="override L of --model (tests use tiny models)")
    p.add_argument("--heads", type=int, default=None, help="override NH of --model")
    p.add_argument("--channels", type=int, default=None, help="override C of --model")
    p.add_argument("--vocab-size", type=int, default=None, help="override V of --model")
    p.add_argument("--max-seq-len", type=int, default=None, help="override maxT of --model")
    p.add_argument("--name", default=None, help="file stem (default: gpt2_<model>)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.0, help="0 disables clipping")
    p.add_argument("--input-bin", default=DEFAULT_INPUT, help="token shard (default: %(default)s)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="where the model, debug state and tokenizer files go, created if needed "
                        "(default: %(default)s, which .gitignore covers)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write gpt2_tokenizer.bin")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build_model(args):
    """(config, torch model, file stem) from --hf-dir or --model and its overrides."""
    if args.hf_dir is not None:
        model = from_hf_checkpoint(args.hf_dir, device=args.device)
        return model.config, model, args.name or f"gpt2_{Path(args.hf_dir).resolve().name}"
    base = gpt2_config(args.model)
    overrides = {"num_layers": args.layers, "num_heads": args.heads, "channels": args.channels,
                 "vocab_size": args.vocab_size, "max_seq_len": args.max_seq_len}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    fields = dict(max_seq_len=base.max_seq_len, vocab_size=base.vocab_size,
                  num_layers=base.num_layers, num_heads=base.num_heads, channels=base.channels)
    config = GPT2Config(**{**fields, **overrides})  # Vp re-derived from V
    name = f"gpt2_{args.model}"
    if overrides:
        c = config
        name = f"gpt2_L{c.num_layers}_NH{c.num_heads}_C{c.channels}_V{c.vocab_size}"
    model = from_flat(config, init_parameters(config, args.seed), device=args.device)
    return config, model, args.name or name


def get_batch(args, config):
    """The first B*T+1 tokens of --input-bin (random tokens if it is missing) as x, y."""
    B, T = args.batch_size, args.seq_len
    if os.path.exists(args.input_bin):
        tokens = read_shard(args.input_bin, vocab_size=config.vocab_size)
        if tokens.size < B * T + 1:
            raise FormatError(f"{args.input_bin}: {tokens.size} tokens, need B*T+1 = {B * T + 1}")
        tokens = np.asarray(tokens[:B * T + 1], dtype=np.int64)
        print(f"batch: the first {B * T + 1} tokens of {args.input_bin}")
    else:
        rng = np.random.default_rng(args.seed)
        tokens = rng.integers(0, config.vocab_size, size=B * T + 1, dtype=np.int64)
        print(f"batch: {args.input_bin} not found, using random tokens (seed {args.seed}); "
              f"`llmcu prepare tinyshakespeare` writes it")
    return tokens[:-1].reshape(B, T), tokens[1:].reshape(B, T)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):  # float32 means float32: the reference must not use TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    config, model, name = build_model(args)
    if args.seq_len > config.max_seq_len:
        print(f"error: --seq-len {args.seq_len} exceeds the model's max_seq_len {config.max_seq_len}",
              file=sys.stderr)
        return 1
    print(f"model: {name} {config}, {config.num_parameters():,} parameters")
    try:
        x_np, y_np = get_batch(args, config)
    except FormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    write_model(out / f"{name}.bin", config, to_flat(model))
    if not args.no_tokenizer:
        from llmcu import tokenizer  # needs tiktoken; not needed for the model files
        tokenizer.write_tokenizer_bin(out / "gpt2_tokenizer.bin")

    # the debug state: step 0's batch, logits, loss and gradients, before any update
    x = torch.from_numpy(x_np).to(args.device)
    y = torch.from_numpy(y_np).to(args.device)
    logits, loss = model(x, y)
    loss.backward()
    write_debug_state(out / f"{name}_debug_state.bin", config, x_np, y_np,
                      logits[..., :config.vocab_size].detach().cpu().numpy(), loss.item(),
                      grads_to_flat(model))
    print(f"wrote {out / f'{name}.bin'} and {out / f'{name}_debug_state.bin'}")

    optimizer = configure_optimizer(model, args.lr, weight_decay=args.weight_decay)
    for step in range(args.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1000
        print(f"step {step}: loss {loss.item():.6f} (took {ms:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
