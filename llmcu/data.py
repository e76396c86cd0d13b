"""Datasets: preparation of llm.c token shards, and the (B,T) shard DataLoader.

Preparation writes the same files as llm.c's dev/data scripts, so shards move
freely between llmcu and llm.c:

- tinyshakespeare: the text is split on blank lines ("\\n\\n"); every section
  is one document, prefixed with <|endoftext|>. The first 32,768 tokens are
  the val split, the rest train (32,768 + 305,260 tokens for the real file).
- TinyStories: the archive holds data00.json ... data49.json; data00 is val,
  the rest train. Each shard's stories are shuffled with random.Random(1337 +
  index of the shard within its split), as llm.c does, and every story becomes
  [EOT] + encode(story.strip()). The val file equals llm.c's byte for byte;
  train shards are concatenated in sorted order (llm.c appends them in the
  order its worker processes finish). The token arrays are held in memory
  until written: about 2 GB for the full dataset (~945M tokens), and
  tokenizing it takes ~15 min on 2 cores at ~1M tokens/s.

With a Llama 3 tokenizer (tokenizer.load_tokenizer(PATH)) every document is
prefixed with <|begin_of_text|> = 128000 instead and the shards are uint32
(llm.c's magic 20240801, version 7). FineWeb and FineWeb-Edu: llmcu/fineweb.py.

The DataLoader serves batches as llm.c's dataloader.h does: see
shard_num_batches() and batch_start() for the arithmetic. Unshuffled it reads
the shards in sorted order and each shard front to back. Shuffled (training;
llm.c's train loader shuffles), every epoch takes the shards in a seeded
permutation and the windows of num_processes*B*T tokens inside each shard in
another (shuffle_order()); every rank computes the same permutations and takes
its own B*T slice of each window, so ranks never read the same tokens. The
permutations depend only on (seed, epoch, shard), so state() = (epoch, position)
resumes the sequence exactly.
"""

from __future__ import annotations

import fnmatch
import glob
import http.client
import itertools
import json
import os
import posixpath
import random
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from llmcu import tokenizer
from llmcu.config import DATASETS
from llmcu.formats import (FormatError, atomic_write, read_shard, read_shard_info,
                           removes_new_dirs_on_failure, shard_dtype, write_shard)
from llmcu.progress import Progress

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
TINYSTORIES_URL = (
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz")

TINYSHAKESPEARE_VAL_TOKENS = 32768  # llm.c: "the first 32,768 tokens as the validation split"
TINYSTORIES_SHUFFLE_SEED = 1337     # llm.c: random.Random(1337 + shard index within the split)
DOWNLOAD_TIMEOUT_S = 30

class DatasetError(RuntimeError):
    """A dataset is missing, unreadable, or not what was expected."""


def default_paths(dataset: str) -> dict:
    """{"dir", "train", "val"}: where `llmcu prepare <dataset>` writes by default."""
    if dataset not in DATASETS:
        raise ValueError(
            f"default_paths: unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    return dict(DATASETS[dataset])


def _num_threads() -> int:
    return max(1, os.cpu_count() or 1)


def _quiet(*args, **kwargs):
    pass


def _download(url: str, dest: Path, log, hint: str) -> None:
    """Fetch url into dest, atomically: a failed download leaves nothing behind."""
    log(f"downloading {url} to {dest}...")
    fetch_errors = (OSError, urllib.error.URLError, http.client.HTTPException, ValueError)
    with atomic_write(dest) as f:
        try:
            response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
        except fetch_errors as e:
            raise DatasetError(f"could not fetch {url} ({e}); {hint}") from e
        with response:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except fetch_errors as e:
                    raise DatasetError(f"could not fetch {url} ({e}); {hint}") from e
                if not chunk:
                    break
                f.write(chunk)


def _fetch_once(url: str, dest: Path, log) -> Path:
    """Download url to dest unless a previous run already did."""
    if dest.exists():
        log(f"{dest} already exists, skipping download")
    else:
        _download(url, dest, log,
                  f"without network access, pass --input PATH to a local copy of {dest.name}")
    return dest


def _write_split(path: Path, tokens: np.ndarray, log) -> None:
    log(f"writing {len(tokens):,} tokens to {path}")
    write_shard(path, tokens, dtype=tokens.dtype.name)


TOKENIZE_CHUNK_DOCS = 4096  # documents per encode_ordinary_batch call (one progress tick)


def _documents_to_tokens(docs: list[str], log=None, desc: str = "tokenizing",
                         tok: tokenizer.Tokenizer | None = None) -> np.ndarray:
    """[EOT] + encode(doc) for every doc, concatenated, as uint16 (uint32 for a
    vocabulary over 65,536 ids). tok: default GPT-2; its eot is the prefix.

    log: None tokenizes silently; otherwise a progress indicator (llmcu.progress)
    counts documents: redrawn in place on a terminal, plain lines through log
    elsewhere."""
    tok = tok or tokenizer.gpt2()
    enc = tok.encoding
    ids = []
    bar = Progress(len(docs), desc, unit="docs", log=log) if log not in (None, _quiet) else None
    for i in range(0, len(docs), TOKENIZE_CHUNK_DOCS):
        chunk = docs[i:i + TOKENIZE_CHUNK_DOCS]
        ids.extend(enc.encode_ordinary_batch(chunk, num_threads=_num_threads()))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    total = sum(len(x) for x in ids) + len(ids)
    # one fromiter pass: 8x faster than a slice assignment per document
    stream = itertools.chain.from_iterable(itertools.chain((tok.eot,), x) for x in ids)
    return np.fromiter(stream, dtype=shard_dtype(tok.vocab_size), count=total)


# ----------------------------------------------------------------------------
# tinyshakespeare

def tokenize_tinyshakespeare(text: str, log=None, tok: tokenizer.Tokenizer | None = None) -> np.ndarray:
    """llm.c's tokenization: every blank-line-separated section is a document.

    Equal to llm.c's encode("<|endoftext|>" + text.replace("\\n\\n",
    "\\n\\n<|endoftext|>")): the special token splits the text, so each
    section is encoded on its own, keeping its trailing "\\n\\n".
    """
    sections = text.split("\n\n")
    docs = [s + "\n\n" for s in sections[:-1]] + [sections[-1]]
    return _documents_to_tokens(docs, log, "tokenizing tinyshakespeare", tok)


@removes_new_dirs_on_failure
def prepare_tinyshakespeare(out_dir="data/tinyshakespeare", input_path=None, log=print,
                            tok: tokenizer.Tokenizer | None = None) -> dict:
    """Write tiny_shakespeare_{val,train}.bin into out_dir.

    input_path: a local input.txt; None downloads it into out_dir (once).
    tok: the tokenizer (default GPT-2; Llama 3 writes uint32 shards).
    Returns {"train": path, "val": path, "train_tokens": n, "val_tokens": n}.
    """
    log = log or _quiet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if input_path is None:
        input_path = _fetch_once(TINYSHAKESPEARE_URL, out_dir / "input.txt", log)
    input_path = Path(input_path)
    try:
        text = input_path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"tinyshakespeare input {input_path} does not exist") from e
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"tinyshakespeare input {input_path} is not UTF-8 text ({e})") from e
    except OSError as e:
        raise DatasetError(f"cannot read tinyshakespeare input {input_path}: {e}") from e

    tokens = tokenize_tinyshakespeare(text, log, tok)
    n_val = TINYSHAKESPEARE_VAL_TOKENS
    if len(tokens) <= n_val:
        raise DatasetError(
            f"{input_path} tokenizes to {len(tokens):,} tokens; expected more than {n_val:,} "
            f"(the val split) so that the train split is not empty")
    paths = default_paths("tinyshakespeare")
    val_path = out_dir / Path(paths["val"]).name
    train_path = out_dir / Path(paths["train"]).name
    _write_split(val_path, tokens[:n_val], log)
    _write_split(train_path, tokens[n_val:], log)
    return {"train": str(train_path), "val": str(val_path),
            "train_tokens": len(tokens) - n_val, "val_tokens": n_val}


# ----------------------------------------------------------------------------
# TinyStories

def _check_member_name(archive: Path, name: str) -> None:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") \
            or ".." in name.replace("\\", "/").split("/"):
        raise DatasetError(
            f"{archive}: unsafe member path {name!r} (absolute or containing '..'); "
            f"refusing to read this archive")


def _tokenize_stories(stories, seed: int, where: str, log=None, tok=None) -> np.ndarray:
    if not isinstance(stories, list):
        raise DatasetError(f"{where}: expected a JSON list of stories, found {type(stories).__name__}")
    stories = list(stories)
    random.Random(seed).shuffle(stories)
    docs = []
    for i, item in enumerate(stories):
        if not isinstance(item, dict) or not isinstance(item.get("story"), str):
            raise DatasetError(f"{where}: every entry must be an object with a string \"story\"; "
                               f"found {str(item)[:80]!r}")
        docs.append(item["story"].strip())
    return _documents_to_tokens(docs, log, f"tokenizing {where.rsplit(':', 1)[-1]}", tok)


@removes_new_dirs_on_failure
def prepare_tinystories(out_dir="data/tinystories", archive_path=None, log=print,
                        tok: tokenizer.Tokenizer | None = None) -> dict:
    """Write TinyStories_{val,train}.bin into out_dir.

    archive_path: a local TinyStories_all_data.tar.gz; None downloads it into
    out_dir (once). The json shards are read straight from the archive.
    Returns {"train": path, "val": path, "train_tokens": n, "val_tokens": n}.
    """
    log = log or _quiet
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if archive_path is None:
        archive_path = _fetch_once(TINYSTORIES_URL, out_dir / "TinyStories_all_data.tar.gz", log)
    archive = Path(archive_path)
    if not archive.is_file():
        raise DatasetError(f"TinyStories archive {archive} does not exist")

    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
            shards = sorted((m for m in members
                             if fnmatch.fnmatch(posixpath.basename(m.name), "data*.json")),
                            key=lambda m: m.name)
            if len(shards) < 2:
                raise DatasetError(
                    f"{archive}: expected data00.json ... data49.json (at least 2 json shards: "
                    f"one val, the rest train), found {len(shards)}: "
                    f"{[m.name for m in shards] or [m.name for m in members][:10]}")
            for m in shards:
                if not m.isfile():
                    raise DatasetError(f"{archive}: member {m.name!r} is not a regular file")
            log(f"Number of shards: {len(shards)}")
            # the seed is 1337 + the shard's index within its split (llm.c)
            seeds = {shards[0].name: TINYSTORIES_SHUFFLE_SEED}
            seeds.update({m.name: TINYSTORIES_SHUFFLE_SEED + i for i, m in enumerate(shards[1:])})
            tokens = {}
            # read in archive order: a gzip stream only seeks forward cheaply
            for m in members:
                if m.name not in seeds or m.name in tokens:
                    continue
                where = f"{archive}:{m.name}"
                try:
                    stories = json.load(tar.extractfile(m))
                except (ValueError, UnicodeDecodeError) as e:
                    raise DatasetError(f"{where} is not valid JSON ({e})") from e
                tokens[m.name] = _tokenize_stories(stories, seeds[m.name], where, log, tok)
                log(f"tokenized {m.name}: {len(stories):,} stories, "
                    f"{len(tokens[m.name]):,} tokens")
                del stories
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"cannot read TinyStories archive {archive}: {e}") from e

    paths = default_paths("tinystories")
    val_path = out_dir / Path(paths["val"]).name
    train_path = out_dir / Path(paths["train"]).name
    val = tokens.pop(shards[0].name)
    _write_split(val_path, val, log)
    train = np.concatenate([tokens.pop(m.name) for m in shards[1:]])
    _write_split(train_path, train, log)
    return {"train": str(train_path), "val": str(val_path),
            "train_tokens": len(train), "val_tokens": len(val)}


# ----------------------------------------------------------------------------
# DataLoader

def shard_num_batches(ntok: int, B: int, T: int, num_processes: int = 1) -> int:
    """Batches one shard serves per process: each reads B*T+1 tokens, the
    window moves by num_processes*B*T tokens (llm.c's shard_num_samples)."""
    return (ntok - 1) // (num_processes * B * T)


def batch_start(sample_index: int, B: int, T: int, process_rank: int = 0,
                num_processes: int = 1) -> int:
    """Token offset (within the shard) of batch sample_index for process_rank."""
    return sample_index * num_processes * B * T + process_rank * B * T


SHUFFLE_SEED = 42  # llm.c seeds its train loader's shuffle with 42 (+ rank; here the same on all ranks)


def shuffle_order(n: int, seed: int, *key: int) -> np.ndarray:
    """The seeded permutation of range(n) for (seed, *key): the shard order of an
    epoch is shuffle_order(num_shards, seed, epoch), the window order inside a
    shard shuffle_order(num_windows, seed, epoch, shard). Stateless, so the
    same on every rank and after a resume."""
    return np.random.default_rng([seed, *key]).permutation(n)


class DataLoader:
    """Serves (inputs, targets) int32 (B,T) batches from llm.c token shards
    (uint16 or uint32; every id checked < vocab_size).

    Shards matching filename_pattern are taken in sorted order; within a shard
    batch k for process r starts at batch_start(k, B, T, r, P); after the last
    batch of the last shard it starts again at the first shard (a new epoch).
    shuffle=True permutes the shards every epoch and the windows inside each
    shard (shuffle_order with `seed`), the same on every rank.
    """

    def __init__(self, filename_pattern, B: int, T: int, process_rank: int = 0,
                 num_processes: int = 1, *, vocab_size: int = tokenizer.VOCAB_SIZE,
                 shuffle: bool = False, seed: int = SHUFFLE_SEED):
        for name, value in (("B", B), ("T", T), ("num_processes", num_processes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DataLoader: {name} must be a positive int, got {value!r}")
        if not isinstance(process_rank, (int, np.integer)) or not 0 <= process_rank < num_processes:
            raise ValueError(f"DataLoader: process_rank must be in [0, {num_processes}), "
                             f"got {process_rank!r}")
        self.filename_pattern = str(filename_pattern)
        self.B, self.T = int(B), int(T)
        self.process_rank, self.num_processes = int(process_rank), int(num_processes)
        self.vocab_size = vocab_size
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.shards = sorted(glob.glob(self.filename_pattern))
        if not self.shards:
            raise DatasetError(
                f"no token shards match {self.filename_pattern!r}; prepare the data first, "
                f"e.g. `llmcu prepare tinyshakespeare`")
        # validate every header now, so no error waits for the middle of training
        need = self.num_processes * self.B * self.T + 1
        self.shard_tokens, self.shard_dtypes = [], []
        for path in self.shards:
            ntok, dtype = read_shard_info(path)
            if ntok < need:
                raise DatasetError(
                    f"shard {path} holds {ntok:,} tokens; B={self.B}, T={self.T}, "
                    f"num_processes={self.num_processes} need at least {need:,} "
                    f"(num_processes*B*T+1)")
            if vocab_size is not None and np.iinfo(dtype).max < vocab_size - 1:
                raise DatasetError(
                    f"shard {path} holds {dtype} tokens, too narrow for a vocabulary of "
                    f"{vocab_size:,} ids; prepare the data with this model's tokenizer")
            self.shard_tokens.append(ntok)
            self.shard_dtypes.append(dtype)
        self.num_tokens = sum(self.shard_tokens)
        self._tokens = None
        self._loaded = None
        self.reset()

    def _num_batches(self, shard_index: int) -> int:
        return shard_num_batches(self.shard_tokens[shard_index], self.B, self.T,
                                 self.num_processes)

    def _load_shard(self, shard_index: int) -> None:
        if self._loaded == shard_index:
            return
        path = self.shards[shard_index]
        try:
            tokens = read_shard(path, vocab_size=self.vocab_size)
        except FormatError as e:
            if "token id out of range" not in str(e):
                raise
            raise FormatError(f"{e}: these tokens do not belong to this model's tokenizer "
                               f"(a Llama 3 shard needs a Llama model trained with --tokenizer; "
                               f"GPT-2 ids are < 50257)") from None
        if len(tokens) != self.shard_tokens[shard_index]:
            raise DatasetError(
                f"shard {path} changed while in use: it held {self.shard_tokens[shard_index]:,} "
                f"tokens when the loader was built, now {len(tokens):,}")
        self._tokens, self._loaded = tokens, shard_index

    def _enter(self, epoch: int, position: int) -> None:
        """Make shard `position` of `epoch`'s order the current one."""
        n = len(self.shards)
        if self.shuffle:
            if getattr(self, "_order_epoch", None) != epoch:
                self._shard_order = shuffle_order(n, self.seed, epoch)
                self._order_epoch = epoch
            shard = int(self._shard_order[position])
            self._windows = shuffle_order(self._num_batches(shard), self.seed, epoch, shard)
        else:
            shard, self._windows = position, None
        self._epoch, self._shard_index, self._shard = epoch, position, shard
        self._load_shard(shard)

    def reset(self) -> None:
        """Back to the first batch of the first shard (of the first epoch)."""
        self._sample_index = -1  # no batch drawn yet
        self._enter(0, 0)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        self._sample_index += 1
        if self._sample_index >= self._num_batches(self._shard):
            position = self._shard_index + 1
            epoch = self._epoch + (position == len(self.shards))
            self._sample_index = 0
            self._enter(epoch, position % len(self.shards))
        B, T = self.B, self.T
        window = self._sample_index if self._windows is None else int(self._windows[self._sample_index])
        start = batch_start(window, B, T, self.process_rank, self.num_processes)
        inputs = self._tokens[start:start + B * T].astype(np.int32).reshape(B, T)
        targets = self._tokens[start + 1:start + B * T + 1].astype(np.int32).reshape(B, T)
        return inputs, targets

    def state(self) -> dict:
        """The position: the shard (its place in the epoch's order) and the index of
        the batch last served (-1 before the first), as llm.c saves
        current_shard_idx/current_sample_idx; with shuffling also the epoch and seed."""
        return {"shard_index": self._shard_index, "sample_index": self._sample_index,
                "epoch": self._epoch, "shuffle": self.shuffle, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        """Resume from state(): the next next_batch() continues the sequence."""
        try:
            shard_index = int(state["shard_index"])
            sample_index = int(state["sample_index"])
            epoch = int(state.get("epoch", 0))
            shuffle = bool(state.get("shuffle", False))
            seed = int(state.get("seed", self.seed))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"DataLoader.load_state: expected a dict with int 'shard_index' "
                             f"and 'sample_index', got {state!r}") from e
        if shuffle != self.shuffle:
            raise ValueError(
                f"DataLoader.load_state: the saved position is for a loader with shuffling "
                f"{'on' if shuffle else 'off'}, this one has it {'on' if self.shuffle else 'off'}; "
                f"resume with the same setting ({'without' if shuffle else 'with'} --no-shuffle)")
        if sample_index == 2**64 - 1:  # llm.c stores -1 in a size_t
            sample_index = -1
        if not 0 <= shard_index < len(self.shards):
            raise ValueError(f"DataLoader.load_state: shard_index must be in "
                             f"[0, {len(self.shards)}), got {shard_index}")
        if epoch < 0:
            raise ValueError(f"DataLoader.load_state: epoch must be >= 0, got {epoch}")
        self.seed = seed
        self._enter(epoch, shard_index)
        n = self._num_batches(self._shard)
        if not -1 <= sample_index < n:
            raise ValueError(f"DataLoader.load_state: sample_index for shard {shard_index} "
                             f"must be in [-1, {n}), got {sample_index}")
        self._sample_index = sample_index
