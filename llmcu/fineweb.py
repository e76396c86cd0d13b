"""FineWeb and FineWeb-Edu: documents to llm.c token shards, as dev/data/fineweb.py.

Documents come from local files (--input: a glob of parquet files with a `text`
column, as the dataset ships, or JSONL with a `text` field; files in sorted
order, rows in file order) or, without --input, from the Hugging Face dataset
(HuggingFaceFW/fineweb or fineweb-edu, sample-10BT / sample-100BT; needs the
optional `datasets` package). Every document becomes [EOT] + encode(text)
(EOT: GPT-2's <|endoftext|> 50256, Llama 3's <|begin_of_text|> 128000), and
the token stream is cut into shards of `shard_size` tokens: shard 0 is
{name}_val_000000.bin, the rest {name}_train_%06d.bin, the last one holds what
is left. A document longer than the room left in a shard continues in the next
one(s), as in llm.c.

Speed: the main process reads documents and sends chunks of DOCS_PER_TASK of
them to a pool of tokenizer processes; each returns one array holding its
chunk's tokens (not one per document, as llm.c's loop does); pool.imap keeps
the chunks in order, so the shards do not depend on the number of workers.

Resume: after each shard is written (atomically: a temporary name, then a
rename) {name}_prepare.json records where in the document stream every
finished shard ends. A rerun with the same inputs, tokenizer and shard size
keeps the finished shards, skips the documents they hold (parquet files and
row groups by their row counts, without reading them) and rewrites the shard
that was being filled.
"""

from __future__ import annotations

import collections
import glob
import gzip
import itertools
import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from llmcu import tokenizer
from llmcu.data import DatasetError
from llmcu.formats import FormatError, atomic_write, read_shard_info, shard_dtype, shard_header
from llmcu.progress import Progress

SHARD_SIZE = 10**8     # tokens per shard (llm.c's default)
DOCS_PER_TASK = 256    # documents per pool task: few enough to balance, many enough to amortize IPC
STATE_VERSION = 1

DATASETS = {  # llmcu name -> (file prefix, Hugging Face repo, local dir prefix)
    "fineweb": ("fineweb", "HuggingFaceFW/fineweb", "fineweb"),
    "edu_fineweb": ("edu_fineweb", "HuggingFaceFW/fineweb-edu", "edu_fineweb"),
}
VERSIONS = {"10B": "sample-10BT", "100B": "sample-100BT"}


def default_out_dir(dataset: str, version: str = "10B") -> str:
    """data/fineweb10B, data/edu_fineweb100B, ... (llm.c's local_dir names)."""
    return f"data/{DATASETS[dataset][2]}{version}"


def shard_path(out_dir, prefix: str, index: int) -> Path:
    """llm.c's shard names: index 0 is val, every other index train."""
    split = "val" if index == 0 else "train"
    return Path(out_dir) / f"{prefix}_{split}_{index:06d}.bin"


# ----------------------------------------------------------------------------
# documents

def input_files(pattern: str) -> list[str]:
    """The files of an --input glob, sorted; each must be parquet or JSONL."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise DatasetError(f"--input {pattern}: no files match; expected parquet files with a "
                           f"'text' column or JSONL files with a \"text\" field")
    for path in files:
        if _kind(path) is None:
            raise DatasetError(f"--input {pattern}: {path} is neither parquet (.parquet) nor "
                               f"JSONL (.jsonl, .json, .jsonl.gz)")
    return files


def _kind(path: str) -> str | None:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    return None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError("reading parquet files needs pyarrow: pip install 'llmcu[fineweb]' "
                           "(or give JSONL files with a \"text\" field)") from None
    return pq


def _parquet_documents(path: str, skip: int):
    """The `text` column of a parquet file, from row `skip` on (skipped row groups
    are not read). Yields str; returns through StopIteration."""
    pq = _pyarrow_parquet()
    import pyarrow as pa
    try:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
        if "text" not in names:
            raise DatasetError(f"{path}: expected a 'text' column, found columns {names}")
        for g in range(f.num_row_groups):
            rows = f.metadata.row_group(g).num_rows
            if skip >= rows:
                skip -= rows
                continue
            column = f.read_row_group(g, columns=["text"]).column("text")
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DatasetError(f"{path}: the 'text' column must hold strings, found {column.type}")
            texts = column.to_pylist()
            for i in range(skip, len(texts)):
                if texts[i] is None:
                    raise DatasetError(f"{path}: row group {g}, row {i}: 'text' is null")
                yield texts[i]
            skip = 0
    except (OSError, pa.ArrowException) as e:  # ArrowInvalid: not a parquet file
        raise DatasetError(f"{path}: cannot read it as parquet: {e}") from None


def _jsonl_documents(path: str, skip: int):
    """The "text" field of every line of a JSONL file (gzip by name), from document
    `skip` on; returns (StopIteration.value) the number of documents in the file."""
    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                n += 1
                if n <= skip:
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DatasetError(f"{path}:{lineno}: not valid JSON ({e})") from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise DatasetError(f"{path}:{lineno}: expected an object with a string "
                                       f"\"text\" field, found {line.strip()[:80]!r}")
                yield text
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read it as JSONL text: {e}") from None
    return n


def _parquet_rows(path: str) -> int:
    pq = _pyarrow_parquet()
    import pyarrow as pa
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"{path}: cannot read it as parquet: {e}") from None


def local_documents(files: list[str], skip: int = 0):
    """Every document of the files in order, the first `skip` left out (parquet
    files and row groups skipped by their row counts, unread)."""
    for path in files:
        if _kind(path) == "parquet":
            rows = _parquet_rows(path)
            if skip < rows:
                yield from _parquet_documents(path, skip)
            skip = max(0, skip - rows)
        else:
            n = yield from _jsonl_documents(path, skip)
            skip = max(0, skip - n)


def hub_documents(dataset: str, version: str, skip: int = 0):
    """The documents of the Hugging Face dataset, streamed (needs `datasets` and network)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"reading {dataset} from the Hugging Face hub needs the datasets package: pip install "
            f"'llmcu[fineweb]'; or download the parquet files and pass --input 'DIR/*.parquet'") from None
    repo = DATASETS[dataset][1]
    try:
        ds = datasets.load_dataset(repo, name=VERSIONS[version], split="train", streaming=True)
        for row in itertools.islice(ds, skip, None):
            yield row["text"]
    except (OSError, ConnectionError, ValueError) as e:
        raise DatasetError(f"cannot stream {repo} ({VERSIONS[version]}) from the hub: {e}; "
                           f"without network access pass --input with local parquet files") from None


# ----------------------------------------------------------------------------
# tokenizing: a pool of processes, chunks in order

_worker_tok = None


def _init_worker(tokenizer_path) -> None:
    global _worker_tok
    # Ctrl-C reaches every process of the terminal's group: the workers leave it to the parent,
    # which stops them and prints one line (llmcu.cli), instead of a traceback each. A worker
    # is forked with SIGINT blocked (_submit), so none arrives before it is ignored here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _worker_tok = tokenizer.load_tokenizer(tokenizer_path)


def tokenize_chunk(docs: list[str], tok: tokenizer.Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, lengths): [EOT] + encode(doc) for every doc concatenated, in the
    shard dtype, and each document's token count (its EOT included)."""
    tok = tok or _worker_tok
    encode = tok.encoding.encode_ordinary
    # one call per document in this process: encode_ordinary_batch(num_threads=1) goes through
    # a thread pool, whose hand-offs took ~40% of the time on 2 cores
    ids = [encode(doc) for doc in docs]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    # one fromiter pass: 8x faster than a slice assignment per document (data.py)
    stream = itertools.chain.from_iterable(itertools.chain((tok.eot,), x) for x in ids)
    return np.fromiter(stream, dtype=shard_dtype(tok.vocab_size), count=total), lengths


def _chunks(docs, n: int):
    it = iter(docs)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _submit(executor, chunk):
    """executor.submit(tokenize_chunk, chunk) with SIGINT blocked: a worker forked in there
    starts with it blocked (_init_worker then ignores it); this process gets a Ctrl-C that
    came meanwhile as soon as the mask is back."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return executor.submit(tokenize_chunk, chunk)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def tokenized_chunks(docs, tok: tokenizer.Tokenizer, workers: int):
    """tokenize_chunk of every DOCS_PER_TASK documents, in order, on `workers` processes
    (1: in this process)."""
    if workers <= 1:
        for chunk in _chunks(docs, DOCS_PER_TASK):
            yield tokenize_chunk(chunk, tok)
        return
    path = None if tok.name == tokenizer.GPT2 else tok.source
    # A window of 2 tasks per worker in flight, taken in order. Not multiprocessing.Pool: after a
    # Ctrl-C its terminate() hung now and then (measured: 2 of 3 runs interrupted at 2-4 s), its
    # workers printing tracebacks; here the workers ignore SIGINT and are let finish their task.
    executor = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(path,))
    pending = collections.deque()
    try:
        for chunk in _chunks(docs, DOCS_PER_TASK):
            pending.append(_submit(executor, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        # the queued tasks are dropped; each worker (deaf to Ctrl-C) finishes the ~256 documents
        # it holds and exits. Killing it instead could cut a result off half-sent, and the
        # executor's thread would wait for the rest of it forever (at interpreter exit too).
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()


# ----------------------------------------------------------------------------
# resume state

def _state_path(out_dir, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}_prepare.json"


def _fingerprint(source, tok: tokenizer.Tokenizer, shard_size: int) -> dict:
    """What the shards depend on: a rerun resumes only if these are the same."""
    if isinstance(source, list):
        source = [[os.path.abspath(p), os.path.getsize(p)] for p in source]
    return {"version": STATE_VERSION, "source": source, "tokenizer": tok.name,
            "shard_size": shard_size}


def _write_state(path: Path, fingerprint: dict, ends: list, complete: bool) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps({**fingerprint, "shard_ends": ends, "complete": complete}).encode())


def _resume_point(out_dir, prefix: str, fingerprint: dict, dtype: str, log):
    """(shard ends kept, complete): the finished shards a previous run left that are
    intact, each with the (document, token offset) where it ends."""
    path = _state_path(out_dir, prefix)
    if not path.exists():
        return [], False
    try:
        state = json.loads(path.read_text())
        ends = [tuple(int(v) for v in e) for e in state["shard_ends"]]
        complete = bool(state["complete"])
        saved = {k: state[k] for k in fingerprint}
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable resume state ({e}); delete it (and the shards "
                           f"beside it) to start over") from None
    if json.loads(json.dumps(fingerprint)) != saved:
        raise DatasetError(
            f"{out_dir} holds shards of a different run ({path}: {saved}, now {fingerprint}); "
            f"pass another --out-dir or delete {prefix}_*.bin and {path.name}")
    kept = []
    for i, end in enumerate(ends):
        try:
            ntok, found = read_shard_info(shard_path(out_dir, prefix, i))
        except (OSError, FormatError):
            break
        last = complete and i == len(ends) - 1
        if found != dtype or (ntok != fingerprint["shard_size"] and not last):
            break
        kept.append(end)
    if len(kept) < len(ends):
        complete = False
    if kept:
        log(f"resuming: {len(kept)} finished shard(s) in {out_dir} kept")
    return kept, complete


# ----------------------------------------------------------------------------
# the pipeline

def write_shards(chunks, out_dir, prefix: str, dtype: str, shard_size: int, start=(0, 0),
                 first_shard: int = 0, on_shard=None, progress=None) -> int:
    """Cut the token stream of `chunks` ((tokens, lengths) per chunk of documents)
    into shards. start: (document, offset) of the first token (tokens before the
    offset of that document are dropped). on_shard(index, (doc, offset)) after each
    full shard is written. progress: (Progress of tokens, {"docs": count}) or None.
    Returns the number of shards in the directory."""
    buf = np.empty(shard_size, dtype=dtype)
    fill, index = 0, first_shard
    doc0, skip = start
    for tokens, lengths in chunks:
        starts = np.concatenate(([0], np.cumsum(lengths)))  # document d's tokens: starts[d]..starts[d+1]
        i = min(skip, len(tokens))  # the first document's tokens already in a kept shard
        skip = 0
        while i < len(tokens):
            take = min(shard_size - fill, len(tokens) - i)
            buf[fill:fill + take] = tokens[i:i + take]
            fill += take
            i += take
            if fill == shard_size:
                _write(shard_path(out_dir, prefix, index), buf)
                d = int(np.searchsorted(starts, i, side="right")) - 1  # document holding token i
                if on_shard is not None:
                    on_shard(index, (doc0 + d, i - int(starts[d])))
                index += 1
                fill = 0
        if progress is not None:
            bar, counts = progress
            counts["docs"] += len(lengths)
            bar.update(len(tokens))
        doc0 += len(lengths)
    if fill:
        _write(shard_path(out_dir, prefix, index), buf[:fill])
        index += 1
    return index


def _write(path: Path, tokens: np.ndarray) -> None:
    with atomic_write(path) as f:
        f.write(shard_header(len(tokens), tokens.dtype.name))
        f.write(memoryview(np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))))


def prepare_fineweb(dataset: str = "fineweb", out_dir=None, input_pattern: str | None = None,
                    version: str = "10B", shard_size: int = SHARD_SIZE, workers: int | None = None,
                    tok: tokenizer.Tokenizer | None = None, log=print, _after_shard=None) -> dict:
    """Write {prefix}_val_000000.bin and {prefix}_train_%06d.bin into out_dir.

    input_pattern: a glob of local parquet/JSONL files; None streams the Hugging Face
    dataset. workers: tokenizer processes (None: the CPU count). _after_shard(index):
    a test hook called after each full shard is recorded (it may raise, to simulate
    an interruption). Returns {"dir", "shards": [paths], "tokens"}."""
    if dataset not in DATASETS:
        raise ValueError(f"prepare_fineweb: dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    if version not in VERSIONS:
        raise ValueError(f"prepare_fineweb: version must be one of {sorted(VERSIONS)}, got {version!r}")
    if not isinstance(shard_size, int) or not 0 < shard_size < 2**31:
        raise ValueError(f"--shard-size must be in [1, {2**31 - 1}] tokens, got {shard_size}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    log = log or (lambda *a, **k: None)
    tok = tok or tokenizer.gpt2()
    prefix = DATASETS[dataset][0]
    out_dir = Path(out_dir or default_out_dir(dataset, version))
    files = input_files(input_pattern) if input_pattern is not None else None
    source = files if files is not None else f"{DATASETS[dataset][1]}/{VERSIONS[version]}"
    dtype = shard_dtype(tok.vocab_size)
    fingerprint = _fingerprint(source, tok, shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{prefix}_*.bin.tmp.*"):  # left by a killed run
        stale.unlink()
    ends, complete = _resume_point(out_dir, prefix, fingerprint, dtype, log)
    if complete:
        shards = [shard_path(out_dir, prefix, i) for i in range(len(ends))]
        log(f"{out_dir}: all {len(shards)} shards are already written; nothing to do")
        return {"dir": str(out_dir), "shards": [str(p) for p in shards],
                "tokens": sum(read_shard_info(p)[0] for p in shards)}
    start = ends[-1] if ends else (0, 0)
    log(f"tokenizing {source if files is None else f'{len(files)} file(s) of {input_pattern}'} "
        f"with {tok.name} on {workers} process(es) into {shard_size:,}-token {dtype} shards in {out_dir}")
    docs = local_documents(files, start[0]) if files is not None else hub_documents(dataset, version, start[0])
    state_path = _state_path(out_dir, prefix)

    def on_shard(index, end):
        ends.append(list(end))
        _write_state(state_path, fingerprint, ends, complete=False)
        if _after_shard is not None:
            _after_shard(index)

    counts = {"docs": 0}
    with Progress(None, f"{prefix}", unit="tokens", log=None if log is print else log,
                  extra=lambda: f"{counts['docs']:,} docs") as bar:
        n = write_shards(tokenized_chunks(docs, tok, workers), out_dir, prefix, dtype, shard_size,
                         start=start, first_shard=len(ends), on_shard=on_shard,
                         progress=(bar, counts))
    if n == 0:
        raise DatasetError(f"{source}: no documents found")
    # the last shard may be partial: record where it ends as the end of the input
    _write_state(state_path, fingerprint, ends + [[counts["docs"] + start[0], 0]]
                 if n > len(ends) else ends, complete=True)
    shards = [shard_path(out_dir, prefix, i) for i in range(n)]
    total = sum(read_shard_info(p)[0] for p in shards)
    log(f"wrote {n} shard(s), {total:,} tokens: {shards[0].name} (val) ... {shards[-1].name}")
    return {"dir": str(out_dir), "shards": [str(p) for p in shards], "tokens": total}
