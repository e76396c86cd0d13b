"""Dataset preparation (tinyshakespeare, TinyStories) and the shard DataLoader."""

import io
import json
import random
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from llmcu import data, tokenizer
from llmcu.data import DataLoader, DatasetError
from llmcu.formats import FormatError, read_shard, read_shard_header, write_shard

EOT = 50256
REPO = Path(__file__).resolve().parent.parent


def _offline(monkeypatch):
    """Make every download fail the way it does without network access."""
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.fixture(scope="module")
def input_txt(shared_dir):
    path = shared_dir / "datasets" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="module")
def prepared(input_txt, tmp_path_factory):
    """tinyshakespeare prepared once for the module: (result dict, logged lines)."""
    lines = []
    out = tmp_path_factory.mktemp("tinyshakespeare")
    result = data.prepare_tinyshakespeare(out, input_path=input_txt, log=lines.append)
    return result, lines


# ----------------------------------------------------------------------------
# tinyshakespeare

def test_tinyshakespeare_known_token_counts(input_txt, prepared):
    result, _ = prepared
    assert result["val_tokens"] == 32768
    assert result["train_tokens"] == 305260
    assert read_shard_header(result["val"]) == 32768
    assert read_shard_header(result["train"]) == 305260
    assert len(read_shard(result["train"])) == 305260


def test_tinyshakespeare_val_starts_with_eot_and_the_text(input_txt, prepared):
    result, _ = prepared
    val = read_shard(result["val"])
    assert val[0] == EOT
    text = input_txt.read_text(encoding="utf-8")
    decoded = tokenizer.decode(val[:300].tolist())
    assert decoded.startswith("<|endoftext|>First Citizen:\nBefore we proceed any further, "
                              "hear me speak.\n\n<|endoftext|>All:\nSpeak, speak.\n\n")
    assert text.startswith(decoded.replace("<|endoftext|>", ""))
    assert decoded.count("<|endoftext|>") == 1 + decoded.count("\n\n")


def test_tinyshakespeare_equals_llmc_encoding(input_txt, prepared):
    # llm.c: encode("<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>"), allowed_special)
    result, _ = prepared
    text = input_txt.read_text(encoding="utf-8")
    ref = tokenizer.get_encoding().encode(
        "<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>"),
        allowed_special={"<|endoftext|>"})
    got = np.concatenate([read_shard(result["val"]), read_shard(result["train"])])
    np.testing.assert_array_equal(got, np.array(ref, dtype=np.uint16))


def test_tinyshakespeare_logs_counts_and_paths(prepared):
    result, lines = prepared
    assert f"writing 32,768 tokens to {result['val']}" in lines
    assert f"writing 305,260 tokens to {result['train']}" in lines


def test_tokenize_sections_each_get_eot():
    enc = tokenizer.encode
    got = data.tokenize_tinyshakespeare("First:\nHi.\n\nSecond:\nYo.\n\n\nThird")
    want = ([EOT] + enc("First:\nHi.\n\n") + [EOT] + enc("Second:\nYo.\n\n")
            + [EOT] + enc("\nThird"))
    assert got.dtype == np.uint16
    assert got.tolist() == want


def test_tinyshakespeare_offline_without_input_mentions_input_flag(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(DatasetError, match="--input") as err:
        data.prepare_tinyshakespeare(tmp_path / "ts", log=None)
    assert data.TINYSHAKESPEARE_URL in str(err.value)
    assert not (tmp_path / "ts").exists()  # no partial input.txt, no temp file, no empty dir


def test_tinyshakespeare_uses_cached_input_without_download(input_txt, tmp_path, monkeypatch):
    _offline(monkeypatch)
    (tmp_path / "input.txt").write_bytes(input_txt.read_bytes())
    result = data.prepare_tinyshakespeare(tmp_path, log=None)
    assert (result["val_tokens"], result["train_tokens"]) == (32768, 305260)


def test_tinyshakespeare_missing_input_names_path(tmp_path):
    missing = tmp_path / "nope" / "input.txt"
    with pytest.raises(DatasetError, match="does not exist") as err:
        data.prepare_tinyshakespeare(tmp_path / "out", input_path=missing, log=None)
    assert str(missing) in str(err.value)


def test_tinyshakespeare_non_utf8_input_names_path(tmp_path):
    bad = tmp_path / "input.txt"
    bad.write_bytes(b"caf\xe9\n\n\xff\xfe")
    with pytest.raises(DatasetError, match="not UTF-8") as err:
        data.prepare_tinyshakespeare(tmp_path / "out", input_path=bad, log=None)
    assert str(bad) in str(err.value)


def test_tinyshakespeare_too_short_input_is_an_error(tmp_path):
    short = tmp_path / "input.txt"
    short.write_text("To be, or not to be.\n\nThat is the question.\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="32,768"):
        data.prepare_tinyshakespeare(tmp_path / "out", input_path=short, log=None)
    assert not (tmp_path / "out" / "tiny_shakespeare_val.bin").exists()


def test_prepro_script_runs_from_anywhere(input_txt, tmp_path):
    script = REPO / "scripts" / "prepro_tinyshakespeare.py"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--input", str(input_txt),
                           "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "writing 305,260 tokens" in proc.stdout
    assert read_shard_header(out / "tiny_shakespeare_train.bin") == 305260


def test_prepro_script_reports_missing_input(tmp_path):
    script = REPO / "scripts" / "prepro_tinyshakespeare.py"
    proc = subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "missing.txt"),
                           "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "missing.txt" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------
# TinyStories

def _stories(shard, n):
    return [{"story": f"  Once upon a time, shard {shard} story {i} had {i * 7} cats.\n",
             "instruction": {"words": ["cat"]}} for i in range(n)]


def _make_archive(path, shards, extra=()):
    """shards: {member name: list of story dicts}, added in the given order."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in list(shards.items()) + list(extra):
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def stories():
    return {"data00.json": _stories(0, 5), "data01.json": _stories(1, 4),
            "data02.json": _stories(2, 6)}


def _count(story_list):
    return sum(1 + len(tokenizer.encode(s["story"].strip())) for s in story_list)


def test_tinystories_token_counts(tmp_path, stories):
    # archive order deliberately unsorted; a non-shard member is ignored
    archive = _make_archive(tmp_path / "ts.tar.gz",
                            {k: stories[k] for k in ("data02.json", "data00.json", "data01.json")},
                            extra=[("README.txt", b"not a shard")])
    result = data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None)
    assert result["val_tokens"] == _count(stories["data00.json"])
    assert result["train_tokens"] == _count(stories["data01.json"]) + _count(stories["data02.json"])
    assert read_shard_header(result["val"]) == result["val_tokens"]
    assert len(read_shard(result["train"])) == result["train_tokens"]


def test_tinystories_with_the_llama3_tokenizer(tmp_path, stories, shared_dir):
    """prepare takes --tokenizer for every dataset: <|begin_of_text|> per story, uint32 shards."""
    llama3 = tokenizer.load_tokenizer(shared_dir / "tokenizers" / "llama3.tiktoken")
    archive = _make_archive(tmp_path / "ts.tar.gz", stories)
    result = data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None, tok=llama3)
    val = read_shard(result["val"], vocab_size=llama3.vocab_size)
    assert val.dtype == np.uint32 and (val == 128000).sum() == 5 and val[0] == 128000
    assert np.fromfile(result["train"], dtype="<i4", count=2).tolist() == [20240801, 7]
    assert sorted(llama3.decode(val.tolist()).split("<|begin_of_text|>")[1:]) == \
        sorted(s["story"].strip() for s in stories["data00.json"])


def test_tinystories_val_is_exactly_data00(tmp_path, stories):
    archive = _make_archive(tmp_path / "ts.tar.gz", stories)
    result = data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None)
    val = read_shard(result["val"])
    assert val[0] == EOT
    docs = tokenizer.decode(val.tolist()).split("<|endoftext|>")
    assert docs[0] == ""
    assert sorted(docs[1:]) == sorted(s["story"].strip() for s in stories["data00.json"])


def test_tinystories_shuffles_each_shard_like_llmc(tmp_path, stories):
    # llm.c shuffles shard i of a split with random.Random(1337 + i)
    archive = _make_archive(tmp_path / "ts.tar.gz", stories)
    result = data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None)

    def expected(shard_list):
        out = []
        for i, name in enumerate(shard_list):
            items = list(stories[name])
            random.Random(1337 + i).shuffle(items)
            for s in items:
                out += [EOT] + tokenizer.encode(s["story"].strip())
        return out

    assert read_shard(result["val"]).tolist() == expected(["data00.json"])
    assert read_shard(result["train"]).tolist() == expected(["data01.json", "data02.json"])


def test_tinystories_single_shard_is_an_error(tmp_path, stories):
    archive = _make_archive(tmp_path / "ts.tar.gz", {"data00.json": stories["data00.json"]})
    with pytest.raises(DatasetError, match="found 1"):
        data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None)
    assert not (tmp_path / "out" / "TinyStories_val.bin").exists()


@pytest.mark.parametrize("bad_name", ["../data03.json", "/tmp/data03.json", "a/../../x.txt"])
def test_tinystories_unsafe_member_is_rejected(tmp_path, stories, bad_name):
    archive = _make_archive(tmp_path / "ts.tar.gz", stories, extra=[(bad_name, [])])
    with pytest.raises(DatasetError, match="unsafe"):
        data.prepare_tinystories(tmp_path / "out", archive_path=archive, log=None)
    assert not (tmp_path / "out").exists()  # nothing written, not even the directory


def test_tinystories_missing_archive_names_path(tmp_path):
    with pytest.raises(DatasetError, match="missing.tar.gz"):
        data.prepare_tinystories(tmp_path / "out", archive_path=tmp_path / "missing.tar.gz",
                                 log=None)


def test_tinystories_not_an_archive(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"this is not a tarball")
    with pytest.raises(DatasetError, match="bogus.tar.gz"):
        data.prepare_tinystories(tmp_path / "out", archive_path=bogus, log=None)


def test_tinystories_offline_without_archive_mentions_input_flag(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(DatasetError, match="--input"):
        data.prepare_tinystories(tmp_path / "out", log=None)
    assert not (tmp_path / "out").exists()


# Issue 22: a failed prepare leaves no empty output directories behind (the ones
# it created; a directory that was already there stays).
def _bad_input(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "missing.input"
    bad = tmp_path / "bad.input"
    bad.write_bytes(b"caf\xe9 not utf-8, not a tarball, not json\n\xff\xfe")
    return bad


@pytest.mark.parametrize("kind", ["missing", "bad", "offline"])
@pytest.mark.parametrize("dataset", ["tinyshakespeare", "tinystories", "hellaswag"])
def test_failed_prepare_leaves_no_new_directories(tmp_path, monkeypatch, dataset, kind):
    from llmcu.hellaswag import prepare_hellaswag
    _offline(monkeypatch)
    source = None if kind == "offline" else _bad_input(tmp_path, kind)
    prepare = {"tinyshakespeare": lambda out: data.prepare_tinyshakespeare(out, source, log=None),
               "tinystories": lambda out: data.prepare_tinystories(out, source, log=None),
               "hellaswag": lambda out: prepare_hellaswag(out, source, log=lambda s: None)}[dataset]
    with pytest.raises(DatasetError):
        prepare(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(DatasetError):
        prepare(tmp_path / "existing")
    assert (tmp_path / "existing").is_dir()


# ----------------------------------------------------------------------------
# DataLoader

B, T, P = 2, 4, 2  # P*B*T = 16 tokens per step over all processes


@pytest.fixture
def two_shards(tmp_path):
    # shard 0: tokens 0..39 -> (40-1)//16 = 2 batches; shard 1: 1000..1049 -> 3 batches
    write_shard(tmp_path / "toy_000.bin", np.arange(40) % tokenizer.VOCAB_SIZE)
    write_shard(tmp_path / "toy_001.bin", (1000 + np.arange(50)) % tokenizer.VOCAB_SIZE)
    return str(tmp_path / "toy_*.bin")


def _expected(base, k, rank):
    start = base + k * P * B * T + rank * B * T
    x = np.arange(start, start + B * T, dtype=np.int32).reshape(B, T)
    return x, x + 1


def test_loader_first_batches_exact(two_shards):
    x0, y0 = DataLoader(two_shards, B, T, 0, P).next_batch()
    x1, y1 = DataLoader(two_shards, B, T, 1, P).next_batch()
    assert x0.dtype == np.int32 and y0.dtype == np.int32 and x0.shape == (B, T)
    assert x0.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y0.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert x1.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
    assert y1.tolist() == [[9, 10, 11, 12], [13, 14, 15, 16]]


@pytest.mark.parametrize("rank", [0, 1])
def test_loader_advances_shards_and_wraps(two_shards, rank):
    loader = DataLoader(two_shards, B, T, rank, P)
    assert loader.num_tokens == 90
    assert [Path(s).name for s in loader.shards] == ["toy_000.bin", "toy_001.bin"]
    order = [(0, 0), (0, 1), (1000, 0), (1000, 1), (1000, 2), (0, 0), (0, 1), (1000, 0)]
    for base, k in order:
        x, y = loader.next_batch()
        ex, ey = _expected(base, k, rank)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_loader_reset_starts_over(two_shards):
    loader = DataLoader(two_shards, B, T, 1, P)
    first = loader.next_batch()
    for _ in range(3):
        loader.next_batch()
    loader.reset()
    again = loader.next_batch()
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_loader_state_resumes_identical_sequence(two_shards):
    loader = DataLoader(two_shards, B, T, 1, P)
    unshuffled = {"epoch": 0, "shuffle": False, "seed": 42}
    assert loader.state() == {"shard_index": 0, "sample_index": -1, **unshuffled}
    for _ in range(3):
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state()))
    assert saved == {"shard_index": 1, "sample_index": 0, **unshuffled}
    rest = [loader.next_batch() for _ in range(6)]
    resumed = DataLoader(two_shards, B, T, 1, P)
    resumed.load_state(saved)
    for (x, y), (rx, ry) in zip(rest, [resumed.next_batch() for _ in range(6)]):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_loader_load_state_rejects_out_of_range(two_shards):
    loader = DataLoader(two_shards, B, T, 0, P)
    with pytest.raises(ValueError, match="shard_index"):
        loader.load_state({"shard_index": 2, "sample_index": 0})
    with pytest.raises(ValueError, match="sample_index"):
        loader.load_state({"shard_index": 0, "sample_index": 2})


def test_loader_too_small_shard_names_shard_needed_found(two_shards, tmp_path):
    write_shard(tmp_path / "toy_002.bin", np.arange(16))
    with pytest.raises(DatasetError) as err:
        DataLoader(two_shards, B, T, 0, P)
    msg = str(err.value)
    assert "toy_002.bin" in msg and "17" in msg and "16" in msg


def test_loader_no_match_names_pattern_and_prepare(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(DatasetError) as err:
        DataLoader(pattern, B, T)
    assert pattern in str(err.value) and "llmcu prepare tinyshakespeare" in str(err.value)


def test_loader_rejects_token_ids_beyond_vocab(tmp_path):
    # written by hand: write_shard may itself refuse ids >= vocab
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, 40)
    tokens = np.arange(40, dtype=np.uint16)
    tokens[5] = 50257
    (tmp_path / "bad.bin").write_bytes(header.tobytes() + tokens.tobytes())
    with pytest.raises(FormatError):
        DataLoader(str(tmp_path / "bad.bin"), B, T)


def test_loader_rejects_bad_arguments(two_shards):
    with pytest.raises(ValueError, match="B"):
        DataLoader(two_shards, 0, T)
    with pytest.raises(ValueError, match="process_rank"):
        DataLoader(two_shards, B, T, process_rank=2, num_processes=2)


def test_loader_offsets_formula():
    assert data.shard_num_batches(40, B, T, P) == 2
    assert data.shard_num_batches(33, B, T, P) == 2
    assert data.shard_num_batches(32, B, T, P) == 1
    assert data.batch_start(3, B, T, 1, P) == 3 * 16 + 8


def test_default_paths():
    assert data.default_paths("tinyshakespeare")["train"] == \
        "data/tinyshakespeare/tiny_shakespeare_train.bin"
    assert data.default_paths("tinystories")["val"] == "data/tinystories/TinyStories_val.bin"
    with pytest.raises(ValueError, match="tinyshakespeare"):
        data.default_paths("nope")


# ----------------------------------------------------------------------------
# the shuffling loader (training; llm.c's train loader shuffles)

@pytest.fixture
def many_shards(tmp_path):
    """4 shards of distinct tokens (shard s holds s*10000 + 0..n-1), 5..9 windows each
    of P*B*T = 16 tokens, so every batch names its shard and window."""
    for s, n in enumerate((81, 97, 120, 145)):
        write_shard(tmp_path / f"sh_{s:03d}.bin", s * 10000 + np.arange(n))
    return str(tmp_path / "sh_*.bin")


def _window(x, rank):
    """(shard, window index) of a batch served to `rank`."""
    first = int(x[0, 0])
    return first // 10000, (first % 10000 - rank * B * T) // (P * B * T)


def _epoch(loader, rank=0):
    n = sum(loader._num_batches(i) for i in range(len(loader.shards)))
    return [_window(loader.next_batch()[0], rank) for _ in range(n)]


def test_shuffled_covers_every_window_once_per_epoch(many_shards):
    plain = _epoch(DataLoader(many_shards, B, T, 0, P))
    shuffled = DataLoader(many_shards, B, T, 0, P, shuffle=True)
    first, second = _epoch(shuffled), _epoch(shuffled)
    assert len(plain) == 5 + 6 + 7 + 9
    for epoch in (first, second):
        assert epoch != plain and sorted(epoch) == sorted(plain)  # same windows, once each
        shards = [s for s, _ in epoch]  # a shard's windows are served together
        assert [s for i, s in enumerate(shards) if i == 0 or s != shards[i - 1]] == \
            list(dict.fromkeys(shards)) and len(set(shards)) == 4
    assert first != second  # a new permutation every epoch
    orders = [list(dict.fromkeys(s for s, _ in epoch)) for epoch in (first, second)]
    assert orders != [[0, 1, 2, 3]] * 2  # the shards are permuted ...
    assert [w for s, w in first if s == 3] != list(range(9))  # ... and the windows inside them
    # the inputs and targets are still consecutive tokens of one window
    x, y = DataLoader(many_shards, B, T, 0, P, shuffle=True).next_batch()
    np.testing.assert_array_equal(y.ravel()[:-1], x.ravel()[1:])


def test_shuffled_ranks_take_disjoint_slices_of_the_same_windows(many_shards):
    a = DataLoader(many_shards, B, T, 0, P, shuffle=True)
    b = DataLoader(many_shards, B, T, 1, P, shuffle=True)
    tokens = {0: set(), 1: set()}
    for _ in range(60):  # more than two epochs
        xa, xb = a.next_batch()[0], b.next_batch()[0]
        assert _window(xa, 0) == _window(xb, 1)  # the same global window ...
        assert int(xb[0, 0]) == int(xa[0, 0]) + B * T  # ... rank 1 right after rank 0
        assert not set(xa.ravel()) & set(xb.ravel())
        tokens[0] |= set(xa.ravel())
        tokens[1] |= set(xb.ravel())
    assert not tokens[0] & tokens[1]


def test_shuffled_resume_is_bit_identical(many_shards):
    loader = DataLoader(many_shards, B, T, 1, P, shuffle=True, seed=7)
    for _ in range(33):  # into the second epoch
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state()))
    assert saved["epoch"] == 1 and saved["shuffle"] is True and saved["seed"] == 7
    rest = [loader.next_batch() for _ in range(40)]
    resumed = DataLoader(many_shards, B, T, 1, P, shuffle=True)  # the seed comes from the state
    resumed.load_state(saved)
    for (x, y), (rx, ry) in zip(rest, [resumed.next_batch() for _ in range(40)]):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    with pytest.raises(ValueError, match="shuffling on.*this one has it off.*without --no-shuffle"):
        DataLoader(many_shards, B, T, 1, P).load_state(saved)


def test_seed_changes_the_order_and_reset_restarts_it(many_shards):
    a = _epoch(DataLoader(many_shards, B, T, 0, P, shuffle=True, seed=1))
    b = DataLoader(many_shards, B, T, 0, P, shuffle=True, seed=2)
    assert a != _epoch(b)
    b.reset()
    assert b.state()["epoch"] == 0 and b.next_batch()[0].tolist() == \
        DataLoader(many_shards, B, T, 0, P, shuffle=True, seed=2).next_batch()[0].tolist()


def test_train_shuffles_and_val_never_does(many_shards):
    from llmcu.config import TrainConfig
    from llmcu.train import setup_data
    lines = []
    for shuffle in (True, False):
        cfg = TrainConfig(train_pattern=many_shards, val_pattern=many_shards, batch_size=B,
                          seq_len=T, shuffle=shuffle)
        train, val, _ = setup_data(cfg, 0, 1, 1, lines.append)
        assert train.shuffle is shuffle and val.shuffle is False
    assert "train data: shuffled (a seeded permutation of the shards and windows every epoch)" in lines
    assert "train data: in order (--no-shuffle)" in lines


def test_uint32_shards_load(tmp_path):
    write_shard(tmp_path / "l3.bin", 128000 + np.arange(40), dtype="uint32")
    x, y = DataLoader(str(tmp_path / "l3.bin"), B, T, vocab_size=128256).next_batch()
    assert x.tolist() == [[128000, 128001, 128002, 128003], [128004, 128005, 128006, 128007]]
    with pytest.raises(FormatError, match="expected ids < 50257.*do not belong to this model's tokenizer"):
        DataLoader(str(tmp_path / "l3.bin"), B, T)


def test_training_resumes_bit_identical_across_an_epoch_with_shuffling(tmp_path):
    """train() with the shuffled loader: a run checkpointed at step 10 (in the second epoch:
    9 windows an epoch) and resumed repeats the uninterrupted run's losses exactly;
    --no-shuffle gives other losses."""
    from llmcu import formats
    from llmcu.config import GPT2Config, TrainConfig
    from llmcu.cpu.gpt2 import init_parameters
    from llmcu.train import train
    tiny = GPT2Config(max_seq_len=16, vocab_size=64, num_layers=1, num_heads=2, channels=8)
    formats.write_model(tmp_path / "tiny.bin", tiny, init_parameters(tiny, seed=3))
    write_shard(tmp_path / "train.bin", np.random.default_rng(1).integers(0, 64, 2 * 8 * 9 + 1))

    def run(out, **kw):
        cfg = dict(train_pattern=str(tmp_path / "train.bin"), val_pattern="", model=str(tmp_path / "tiny.bin"),
                   output_dir=str(tmp_path / out), batch_size=2, seq_len=8, learning_rate=1e-2,
                   max_steps=14, val_every=0, sample_every=0)
        lines = []
        return train(TrainConfig(**{**cfg, **kw}), log=lines.append)["train"], lines

    straight, lines = run("a")
    assert "train data: shuffled (a seeded permutation of the shards and windows every epoch)" in lines
    run("b", max_steps=10, checkpoint_every=10)
    resumed, lines = run("b", resume=1, checkpoint_every=10)
    assert any("resuming from step 10" in line for line in lines)
    assert resumed == straight[10:]
    plain, lines = run("c", shuffle=False)
    assert "train data: in order (--no-shuffle)" in lines and plain != straight
    with pytest.raises(ValueError, match="shuffling on.*this one has it off"):
        run("b", resume=1, shuffle=False)
