"""`llmcu prepare fineweb|edu_fineweb` on small local inputs: shard names, headers,
every document's tokens in order, independence from the number of workers,
resume after an interruption, and clear errors on bad input.

The inputs are a few hundred documents (unicode, empty ones, one longer than a
shard) written as JSONL and as parquet (pyarrow, the `fineweb` extra) in a
temp dir; shards are small (SHARD tokens) so a run makes a dozen of them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmcu import cli, fineweb, formats, tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARD = 997  # tokens per shard: odd, so boundaries fall inside documents


def make_docs() -> list[str]:
    rng = np.random.default_rng(5)
    words = ["the", "cat", "héllo", "wörld", "日本語", "中文", "naïve", "café", "🙂", "\n\n", "  ",
             "<|endoftext|>", "1234567", "?!", "\t"]
    docs = []
    for i in range(300):
        n = int(rng.integers(0, 40))
        docs.append(" ".join(words[j] for j in rng.integers(0, len(words), n)))
    docs[0] = "First document: Hello world"
    docs[7] = docs[150] = docs[299] = ""  # empty documents: only their end-of-text token
    docs[100] = "a long document " * 1500  # ~4,500 tokens: longer than several shards
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, docs):
    """The same documents as two JSONL files and as two parquet files (several row groups)."""
    d = tmp_path_factory.mktemp("fineweb_inputs")
    (d / "jsonl").mkdir()
    for k, part in enumerate((docs[:120], docs[120:])):
        with open(d / "jsonl" / f"part_{k}.jsonl", "w", encoding="utf-8") as f:
            for text in part:
                f.write(json.dumps({"id": len(text), "text": text}, ensure_ascii=k == 0) + "\n")
    return d


@pytest.fixture(scope="module")
def parquet_inputs(inputs, docs):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (inputs / "parquet").mkdir(exist_ok=True)
    for k, part in enumerate((docs[:170], docs[170:])):
        table = pa.table({"text": part, "id": list(range(len(part)))})
        pq.write_table(table, inputs / "parquet" / f"{k:03d}_00000.parquet", row_group_size=50)
    return inputs / "parquet"


def prepare(*args, capsys=None) -> tuple[int, str]:
    """cli.main in this process (fast; a subprocess test below checks the real command)."""
    code = cli.main(["prepare", *map(str, args)])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def expected_stream(docs, tok=None) -> np.ndarray:
    """[EOT] + encode(doc) per document, one document at a time (llm.c's loop)."""
    tok = tok or tokenizer.gpt2()
    out = []
    for text in docs:
        out.append(tok.eot)
        out.extend(tok.encode(text))
    return np.array(out, dtype=np.int64)


def shard_files(out: Path, prefix="fineweb") -> list[Path]:
    return sorted(out.glob(f"{prefix}_*.bin"), key=lambda p: p.name.rsplit("_", 1)[1])


def read_all(out: Path, prefix="fineweb") -> np.ndarray:
    return np.concatenate([formats.read_shard(p) for p in shard_files(out, prefix)]).astype(np.int64)


def test_jsonl_shards_hold_every_document_in_order(inputs, docs, tmp_path):
    out = tmp_path / "out"
    code, _ = prepare("fineweb", "--input", inputs / "jsonl" / "*.jsonl", "--out-dir", out,
                      "--shard-size", SHARD, "--workers", 1)
    assert code == 0
    stream = expected_stream(docs)
    n = -(-len(stream) // SHARD)
    assert n > 10
    names = [p.name for p in shard_files(out)]
    assert names == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n)]
    for i, p in enumerate(shard_files(out)):
        header = np.fromfile(p, dtype="<i4", count=256)
        want = SHARD if i < n - 1 else len(stream) - SHARD * (n - 1)
        assert list(header[:3]) == [20240520, 1, want], p.name
        assert p.stat().st_size == 1024 + 2 * want
    got = read_all(out)
    np.testing.assert_array_equal(got, stream)
    # the round trip: split on the end-of-text token, decode every document back
    starts = np.flatnonzero(got == tokenizer.EOT)
    assert len(starts) == len(docs)
    pieces = np.split(got, starts)[1:]
    assert [tokenizer.decode(p[1:]) for p in pieces] == docs


def test_parquet_gives_the_same_bytes_as_jsonl(inputs, parquet_inputs, tmp_path):
    for name, pattern in (("jsonl", inputs / "jsonl" / "*.jsonl"), ("parquet", parquet_inputs / "*.parquet")):
        code, _ = prepare("edu_fineweb", "--input", pattern, "--out-dir", tmp_path / name,
                          "--shard-size", SHARD, "--workers", 1)
        assert code == 0
    a, b = shard_files(tmp_path / "jsonl", "edu_fineweb"), shard_files(tmp_path / "parquet", "edu_fineweb")
    assert [p.name for p in a] == [p.name for p in b] and a[0].name == "edu_fineweb_val_000000.bin"
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_output_does_not_depend_on_the_number_of_workers(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "DOCS_PER_TASK", 16)  # many tasks, so 3 workers interleave
    for w in (1, 3):
        code, _ = prepare("fineweb", "--input", inputs / "jsonl" / "*.jsonl", "--out-dir",
                          tmp_path / f"w{w}", "--shard-size", SHARD, "--workers", w)
        assert code == 0
    one, three = shard_files(tmp_path / "w1"), shard_files(tmp_path / "w3")
    assert len(one) > 10 and [p.name for p in one] == [p.name for p in three]
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in three]


class Interrupted(Exception):
    pass


def test_resume_keeps_finished_shards_and_rewrites_the_partial_one(inputs, docs, tmp_path, monkeypatch):
    monkeypatch.setattr(fineweb, "DOCS_PER_TASK", 16)
    pattern = str(inputs / "jsonl" / "*.jsonl")
    straight = tmp_path / "straight"
    fineweb.prepare_fineweb("fineweb", straight, pattern, shard_size=SHARD, workers=1, log=None)

    out = tmp_path / "resumed"

    def stop(index):
        if index == 5:  # shard 5 is written and recorded; shard 6 is half filled
            raise Interrupted
    with pytest.raises(Interrupted):
        fineweb.prepare_fineweb("fineweb", out, pattern, shard_size=SHARD, workers=1, log=None,
                                _after_shard=stop)
    kept = shard_files(out)
    assert [p.name for p in kept] == [p.name for p in shard_files(straight)[:6]]
    assert not list(out.glob("*.tmp.*"))  # nothing half-written under any name
    (out / "fineweb_train_000006.bin.tmp.999.deadbeef").write_bytes(b"\0" * 100)  # a killed run's
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}

    seen = []
    real = fineweb.tokenize_chunk
    monkeypatch.setattr(fineweb, "tokenize_chunk", lambda chunk, tok=None: (seen.extend(chunk), real(chunk, tok))[1])
    lines = []
    fineweb.prepare_fineweb("fineweb", out, pattern, shard_size=SHARD, workers=1, log=lines.append)
    assert any("6 finished shard(s)" in line for line in lines), lines
    # the progress line counts documents and tokens and gives tokens/s
    assert any(f"tokens | {len(seen)} docs |" in line and "tokens/s" in line for line in lines), lines
    # the kept shards were not rewritten, and their documents were not tokenized again
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == stamps
    assert 0 < len(seen) < len(docs) and seen == docs[len(docs) - len(seen):]
    assert not list(out.glob("*.tmp.*"))
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(straight)]
    assert [p.read_bytes() for p in shard_files(out)] == [p.read_bytes() for p in shard_files(straight)]

    # a finished run is not redone; a different shard size is refused, not mixed in
    lines.clear()
    fineweb.prepare_fineweb("fineweb", out, pattern, shard_size=SHARD, workers=1, log=lines.append)
    assert any("nothing to do" in line for line in lines), lines
    code = cli.main(["prepare", "fineweb", "--input", pattern, "--out-dir", str(out),
                     "--shard-size", "500", "--workers", "1"])
    assert code == 2


def test_resume_rewrites_a_damaged_shard(inputs, tmp_path):
    pattern = str(inputs / "jsonl" / "*.jsonl")
    out = tmp_path / "out"
    fineweb.prepare_fineweb("fineweb", out, pattern, shard_size=SHARD, workers=1, log=None)
    good = [p.read_bytes() for p in shard_files(out)]
    state = json.loads((out / "fineweb_prepare.json").read_text())
    state["complete"] = False  # as if the run stopped after shard 4, which a crash then truncated
    state["shard_ends"] = state["shard_ends"][:5]
    (out / "fineweb_prepare.json").write_text(json.dumps(state))
    damaged = shard_files(out)[3]
    damaged.write_bytes(damaged.read_bytes()[:1500])
    for p in shard_files(out)[5:]:
        p.unlink()
    fineweb.prepare_fineweb("fineweb", out, pattern, shard_size=SHARD, workers=1, log=None)
    assert [p.read_bytes() for p in shard_files(out)] == good


# ----------------------------------------------------------------------------
# bad input: exit code 2, one line naming the problem, no traceback

def _bad_jsonl(d):
    (d / "a.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    return d / "*.jsonl", ["a.jsonl:2", "\"text\""]


def _not_json(d):
    (d / "a.jsonl").write_text('{"text": "fine"}\n{not json\n')
    return d / "*.jsonl", ["a.jsonl:2", "not valid JSON"]


def _no_text_column(d):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["x", "y"]}), d / "a.parquet")
    return d / "*.parquet", ["a.parquet", "expected a 'text' column", "content"]


def _unreadable_parquet(d):
    pytest.importorskip("pyarrow")
    (d / "a.parquet").write_bytes(b"this is not parquet at all" * 10)
    return d / "*.parquet", ["a.parquet", "cannot read it as parquet"]


def _no_files(d):
    return d / "nothing_*.parquet", ["no files match", "nothing_*.parquet"]


def _wrong_kind(d):
    (d / "a.txt").write_text("plain text")
    return d / "*", ["a.txt", "neither parquet", "JSONL"]


@pytest.mark.parametrize("case", [_bad_jsonl, _not_json, _no_text_column, _unreadable_parquet,
                                  _no_files, _wrong_kind])
def test_bad_input_is_a_clear_error(case, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    pattern, words = case(d)
    code, err = prepare("fineweb", "--input", pattern, "--out-dir", tmp_path / "out",
                        "--shard-size", SHARD, "--workers", 1, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmcu prepare: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def test_bad_input_from_the_command_line(tmp_path):
    """The real command: exit status 2, one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, "-m", "llmcu", "prepare", "fineweb", "--input",
                        str(tmp_path / "*.parquet"), "--out-dir", str(tmp_path / "out")],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "no files match" in r.stderr


def test_hub_without_datasets_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(fineweb.DatasetError, match=r"llmcu\[fineweb\].*--input"):
        fineweb.prepare_fineweb("fineweb", tmp_path, None, shard_size=SHARD, workers=1, log=None)


def test_benchmark_peer_writes_the_same_shards(inputs, docs, tmp_path):
    """benchmarks/bench_prepare.py's reimplementation of llm.c's fineweb.py loop writes
    exactly llmcu's shards (so its timing compares like with like)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_prepare
    finally:
        sys.path.pop(0)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    (tmp_path / "llmc").mkdir()
    bench_prepare.llmc_prepare(src, tmp_path / "llmc", SHARD, 2)
    fineweb.prepare_fineweb("fineweb", tmp_path / "llmcu", str(src), shard_size=SHARD, workers=2, log=None)
    assert bench_prepare.shard_bytes(tmp_path / "llmc") == bench_prepare.shard_bytes(tmp_path / "llmcu")
    assert len(bench_prepare.shard_bytes(tmp_path / "llmc")) > 10


def test_llama3_tokenizer_writes_uint32_shards_on_any_number_of_workers(inputs, docs, shared_dir, tmp_path):
    llama3_file = shared_dir / "tokenizers" / "llama3.tiktoken"
    llama3 = tokenizer.load_tokenizer(llama3_file)
    for w in (1, 2):
        code, _ = prepare("fineweb", "--input", inputs / "jsonl" / "*.jsonl", "--out-dir", tmp_path / f"w{w}",
                          "--shard-size", SHARD, "--workers", w, "--tokenizer", llama3_file)
        assert code == 0
    one, two = shard_files(tmp_path / "w1"), shard_files(tmp_path / "w2")
    assert [p.read_bytes() for p in one] == [p.read_bytes() for p in two]
    header = np.fromfile(one[0], dtype="<i4", count=3)
    assert list(header) == [20240801, 7, SHARD] and one[0].stat().st_size == 1024 + 4 * SHARD
    got = np.concatenate([formats.read_shard(p, vocab_size=llama3.vocab_size) for p in one]).astype(np.int64)
    np.testing.assert_array_equal(got, expected_stream(docs, llama3))
    pieces = np.split(got, np.flatnonzero(got == 128000))[1:]
    assert [llama3.decode(p[1:]) for p in pieces] == docs


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_ctrl_c_stops_the_workers_with_one_line_and_resumes(shared_dir, tmp_path):
    """Ctrl-C as a terminal sends it (to the whole process group, workers included) in the
    middle of a 2-worker prepare: exit 130, one line, no temporary file left, back in well
    under the time left; a rerun then finishes the same shards as an uninterrupted run.
    (multiprocessing.Pool hung after such a Ctrl-C now and then; the workers now ignore it.)"""
    import signal
    import time
    text = (shared_dir / "datasets/tinyshakespeare/input.txt").read_text()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(30):  # ~14M tokens: seconds of work on 2 workers
            f.writelines(json.dumps({"text": part}) + "\n" for part in text.split("\n\n"))
    args = ["prepare", "fineweb", "--input", tmp_path / "docs.jsonl", "--workers", 2,
            "--shard-size", 1_000_000]
    cmd = [sys.executable, "-m", "llmcu", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen(cmd + ["--out-dir", str(tmp_path / "cut")], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    p.stdout.readline()  # "tokenizing ...": the workers are up
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err == "llmcu prepare: interrupted\n", err
    assert time.monotonic() - t0 < 10
    assert not [n for n in os.listdir(tmp_path / "cut") if ".tmp." in n]
    for out in ("cut", "whole"):
        r = subprocess.run(cmd + ["--out-dir", str(tmp_path / out)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(tmp_path / "whole"))
    assert sorted(os.listdir(tmp_path / "cut")) == names
    for n in names:
        if n.endswith(".bin"):
            assert (tmp_path / "cut" / n).read_bytes() == (tmp_path / "whole" / n).read_bytes(), n
