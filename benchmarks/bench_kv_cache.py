"""KV cache vs recomputation: generate N tokens from a d12 (124M) model.

Random-init d12 (llmcu.config.gpt2_config("d12")), prompt = [<|endoftext|>],
greedy (temperature 0) so both paths generate the same tokens, which is
checked. Prints both times and the speedup (target: >= 5x at 256 tokens).

    python benchmarks/bench_kv_cache.py [--tokens 256] [--model d12]

Not a pytest test (the uncached d12 run takes minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llmcu.config import gpt2_config  # noqa: E402
from llmcu.cpu.gpt2 import GPT2  # noqa: E402
from llmcu.sample import generate  # noqa: E402
from llmcu.tokenizer import EOT  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="d12", help="descriptor (random init)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens to generate")
    a = ap.parse_args(argv)
    config = gpt2_config(a.model)
    model = GPT2(config, seed=42)
    print(f"model {a.model}: {config.num_parameters():,} parameters, max_seq_len {config.max_seq_len}; "
          f"{a.tokens} tokens from [EOT], greedy; {platform.machine()}, {os.cpu_count()} CPUs")
    generate(model, [EOT], 2, temperature=0.0)  # warm-up: page in the parameters, start BLAS threads
    times, outs = {}, {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        t0 = time.perf_counter()
        outs[name] = generate(model, [EOT], a.tokens, temperature=0.0, use_cache=use_cache)
        times[name] = time.perf_counter() - t0
        print(f"{name:9s}: {times[name]:8.2f} s  ({times[name] / a.tokens * 1000:8.1f} ms/token)",
              flush=True)
    same = outs["cached"] == outs["uncached"]
    print(f"same tokens: {same}")
    print(f"speedup: {times['uncached'] / times['cached']:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
