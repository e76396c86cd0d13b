"""FineWeb-style preparation speed: llmcu's pipeline against llm.c's fineweb.py loop.

Both tokenize the same JSONL documents (read in the main process, one JSON line
per document, as both do with the dataset's rows) with the GPT-2 tokenizer on
the same number of worker processes and write 100M-token-style shards (here
--shard-size tokens) into a temp dir:

- llm.c: dev/data/fineweb.py's loop, reimplemented: pool.imap(tokenize, docs,
  chunksize=16), where tokenize is [eot] + encode_ordinary(text) per document
  turned into a numpy uint16 array, copied into a shard buffer in the main
  process, each full shard written with llm.c's header.
- llmcu: llmcu.fineweb.prepare_fineweb (chunks of documents per task, one
  array back per chunk, the same shards).

Prints tokens/s for each, the ratio, and checks that the shards are byte-identical.

    python benchmarks/bench_prepare.py                       # tinyshakespeare x 8 as documents
    python benchmarks/bench_prepare.py --input 'data/*.jsonl' --workers 4
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from llmcu import fineweb, tokenizer
from llmcu.formats import shard_header

SHARED = Path(os.environ.get("LLMCU_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")


# ----------------------------------------------------------------------------
# llm.c's dev/data/fineweb.py, as written there (tiktoken, one document per task)

_enc = None


def _init_llmc():
    global _enc
    _enc = tokenizer.get_encoding()  # tiktoken.get_encoding("gpt2") needs the network


def llmc_tokenize(doc):
    # tokenizes a single document and returns a numpy array of uint16 tokens
    eot = _enc._special_tokens["<|endoftext|>"]  # end of text token
    tokens = [eot]  # the special <|endoftext|> token delimits all documents
    tokens.extend(_enc.encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    tokens_np_uint16 = tokens_np.astype(np.uint16)
    return tokens_np_uint16


def llmc_write_datafile(filename, toks):
    with open(filename, "wb") as f:
        f.write(shard_header(len(toks), "uint16"))
        f.write(toks.tobytes())


def llmc_prepare(docs_path, out_dir, shard_size, nprocs):
    def fw():
        with open(docs_path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
    with mp.Pool(nprocs, initializer=_init_llmc) as pool:
        shard_index = 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
        token_count = 0
        for tokens in pool.imap(llmc_tokenize, fw(), chunksize=16):
            while token_count + len(tokens) >= shard_size:  # llm.c: `if`; a loop for documents > a shard
                split = "val" if shard_index == 0 else "train"
                filename = os.path.join(out_dir, f"fineweb_{split}_{shard_index:06d}.bin")
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                llmc_write_datafile(filename, all_tokens_np)
                shard_index += 1
                token_count = 0
                tokens = tokens[remainder:]
            all_tokens_np[token_count:token_count + len(tokens)] = tokens
            token_count += len(tokens)
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            filename = os.path.join(out_dir, f"fineweb_{split}_{shard_index:06d}.bin")
            llmc_write_datafile(filename, all_tokens_np[:token_count])


# ----------------------------------------------------------------------------

def make_input(path: Path, copies: int) -> int:
    """tinyshakespeare's blank-line sections as documents, `copies` times over."""
    text = (SHARED / "datasets/tinyshakespeare/input.txt").read_text(encoding="utf-8")
    sections = text.split("\n\n")
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for c in range(copies):
            for s in sections:
                f.write(json.dumps({"text": s}) + "\n")
                n += 1
    return n


def shard_bytes(d) -> list[bytes]:
    return [Path(p).read_bytes() for p in sorted(glob.glob(os.path.join(d, "fineweb_*.bin")))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=None, help="a JSONL file with a \"text\" field (default: "
                                                  "tinyshakespeare sections, --copies times)")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=10**6)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best time counts")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.input is None:
            docs_path = tmp / "docs.jsonl"
            ndocs = make_input(docs_path, a.copies)
        else:
            docs_path = Path(a.input)
            ndocs = sum(1 for _ in open(docs_path, encoding="utf-8"))
        times = {"llm.c": [], "llmcu": []}
        for r in range(a.repeat):
            for name in ("llm.c", "llmcu"):  # interleaved, so both see the same machine load
                out = tmp / f"{name}_{r}"
                out.mkdir()
                t0 = time.perf_counter()
                if name == "llm.c":
                    llmc_prepare(docs_path, out, a.shard_size, a.workers)
                else:
                    fineweb.prepare_fineweb("fineweb", out, str(docs_path), shard_size=a.shard_size,
                                            workers=a.workers, log=None)
                times[name].append(time.perf_counter() - t0)
        same = shard_bytes(tmp / "llm.c_0") == shard_bytes(tmp / "llmcu_0")
        ntok = sum(len(b) - 1024 for b in shard_bytes(tmp / "llmcu_0")) // 2
    print(f"{ndocs:,} documents, {ntok:,} tokens, {a.workers} worker process(es), "
          f"shards of {a.shard_size:,} tokens, best of {a.repeat}")
    rate = {}
    for name, ts in times.items():
        rate[name] = ntok / min(ts)
        print(f"{name:6s}: {min(ts):7.3f} s  {rate[name] / 1e6:6.2f} M tokens/s   "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)} s)")
    print(f"ratio llmcu / llm.c: {rate['llmcu'] / rate['llm.c']:.2f}x")
    print(f"shards byte-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
