"""HellaSwag: llm.c's eval-file format, preparation from the jsonl, and the
completion-style accuracy (acc_norm) checked against PyTorch."""

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from llmcu import formats, hellaswag
from llmcu.cli import main
from llmcu.config import GPT2Config, TrainConfig
from llmcu.cpu.gpt2 import GPT2, init_parameters
from llmcu.formats import FormatError, read_evalfile, write_evalfile

ITEMS = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
     "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. she", "split": "val",
     "split_type": "zeroshot", "label": 0,
     "endings": ["bends down and grabs the pole.", "swings and lands in her arms.",
                 "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
]


def _random_examples(n=5, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    return [{"label": int(rng.integers(4)),
             "ctx_tokens": rng.integers(0, vocab, rng.integers(1, 8)).tolist(),
             "ending_tokens": [rng.integers(0, vocab, rng.integers(1, 6)).tolist() for _ in range(4)]}
            for _ in range(n)]


def _offline(monkeypatch):
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


# ---------------------------------------------------------------- the file format

def test_evalfile_round_trip_and_llmc_layout(tmp_path):
    path = tmp_path / "eval.bin"
    datas = _random_examples()
    write_evalfile(path, datas)
    examples = read_evalfile(path)
    assert [(e.index, e.label, e.ctx_tokens, e.ending_tokens) for e in examples] == [
        (i, d["label"], d["ctx_tokens"], d["ending_tokens"]) for i, d in enumerate(datas)]
    # the layout, spelled out as llm.c's data_common.write_evalfile builds it
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    stream = np.frombuffer(raw[1024:], dtype="<u2").tolist()
    expected, longest = [], 0
    for i, d in enumerate(datas):
        s = [65535, 0, i, d["label"], 4, len(d["ctx_tokens"])] + d["ctx_tokens"]
        for e in d["ending_tokens"]:
            s += [len(e)] + e
        s[1] = 2 * len(s)
        longest = max(longest, s[1])
        expected += s
    assert header[:4].tolist() == [20240522, 1, len(datas), longest]
    assert not header[4:].any()
    assert stream == expected


def _corrupt(tmp_path, edit):
    path = tmp_path / "eval.bin"
    write_evalfile(path, _random_examples(3))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(raw)))
    return path


def _set_int(raw, i, v):
    raw[4 * i:4 * i + 4] = np.int32(v).tobytes()
    return raw


@pytest.mark.parametrize("edit, message", [
    (lambda r: _set_int(r, 0, 20240520), "bad magic number: expected 20240522"),
    (lambda r: _set_int(r, 1, 2), "unknown llm.c eval file version: expected 1, found 2"),
    (lambda r: r[:1000], "file is truncated"),
    (lambda r: r[:-2], "file is truncated"),
    (lambda r: r[:-1], "file is truncated"),
    (lambda r: _set_int(r, 2, 4), "file is truncated: the header says 4 examples, found 3"),
    (lambda r: _set_int(r, 2, 2), "file is oversized"),
    (lambda r: r[:1024] + b"\x00\x00" + r[1026:], "START_EXAMPLE delimiter"),
    (lambda r: _set_int(r, 3, 4), "longest example is 4 bytes"),
])
def test_evalfile_bad_input_is_a_clear_error(tmp_path, edit, message):
    path = _corrupt(tmp_path, edit)
    with pytest.raises(FormatError, match=message) as e:
        read_evalfile(path)
    assert str(path) in str(e.value)


def test_write_evalfile_rejects_bad_examples(tmp_path):
    with pytest.raises(ValueError, match="label 4"):
        write_evalfile(tmp_path / "x.bin", [{"label": 4, "ctx_tokens": [1], "ending_tokens": [[1]] * 4}])
    with pytest.raises(ValueError, match="65535"):
        write_evalfile(tmp_path / "x.bin", [{"label": 0, "ctx_tokens": [65535], "ending_tokens": [[1]]}])
    assert not (tmp_path / "x.bin").exists()


# ---------------------------------------------------------------- scores vs PyTorch

def _torch_scores(config, params, example, T):
    """llm.c's dev/data/hellaswag.py computation: F.cross_entropy (no reduction) over
    the shifted rows, averaged over the completion positions."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from llmcu.torch_gpt2 import from_flat
    model = from_flat(config, params).eval()
    rows = [example.ctx_tokens + e for e in example.ending_tokens]
    tokens = torch.zeros((len(rows), T + 1), dtype=torch.long)
    mask = torch.zeros((len(rows), T + 1), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(example.ctx_tokens):len(row)] = 1
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    V = config.vocab_size
    losses = F.cross_entropy(logits[..., :V].reshape(-1, V), tokens[:, 1:].reshape(-1),
                             reduction="none").view(len(rows), -1).double()
    shift_mask = mask[:, 1:].double()
    avg = (losses * shift_mask).sum(1) / shift_mask.sum(1)
    return avg.numpy(), int(avg.argmin())


@pytest.mark.parametrize("vocab_size", [64, 50257])
def test_scores_and_accuracy_match_pytorch(tmp_path, vocab_size):
    config = GPT2Config(max_seq_len=32, vocab_size=vocab_size, num_layers=2, num_heads=2, channels=32)
    params = init_parameters(config, seed=5)
    params *= 8  # sharper logits, so the four scores differ clearly
    model = GPT2(config, params.copy())
    path = tmp_path / "eval.bin"
    write_evalfile(path, _random_examples(5, vocab=min(vocab_size, 50), seed=1))
    examples = read_evalfile(path)
    T = hellaswag.eval_seq_len(examples)
    correct = 0
    for ex in examples:
        ours = hellaswag.completion_losses(model, ex, T)
        ref, ref_pred = _torch_scores(config, params, ex, T)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
        assert int(np.argmin(ours)) == ref_pred
        correct += int(ref_pred == ex.label)
    assert hellaswag.evaluate_hellaswag(model, path) == (correct, 5)
    assert hellaswag.evaluate_hellaswag(model, path, max_examples=2)[1] == 2


def test_evaluate_rejects_examples_longer_than_the_model(tmp_path):
    config = GPT2Config(max_seq_len=4, vocab_size=64, num_layers=1, num_heads=2, channels=16)
    path = tmp_path / "eval.bin"
    write_evalfile(path, [{"label": 0, "ctx_tokens": [1, 2, 3], "ending_tokens": [[1, 2, 3]] * 4}])
    with pytest.raises(ValueError, match="max_seq_len=4"):
        hellaswag.evaluate_hellaswag(GPT2(config), path)


# ---------------------------------------------------------------- preparation

@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def test_prepare_from_a_local_jsonl(jsonl, tmp_path):
    from llmcu.tokenizer import encode
    out = hellaswag.prepare_hellaswag(tmp_path / "out", input_jsonl=jsonl, log=lambda s: None)
    examples = read_evalfile(out)
    assert len(examples) == 2
    for ex, item in zip(examples, ITEMS):
        assert ex.label == item["label"]
        assert ex.ctx_tokens == encode(item["ctx"])
        assert ex.ending_tokens == [encode(" " + e) for e in item["endings"]]


def test_prepare_offline_without_input_says_pass_input(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    from llmcu.data import DatasetError
    with pytest.raises(DatasetError, match="--input"):
        hellaswag.prepare_hellaswag(tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out" / "hellaswag_val.jsonl").exists()
    assert main(["prepare", "hellaswag", "--out-dir", str(tmp_path / "out")]) == 2
    assert "--input" in capsys.readouterr().err


def test_prepare_rejects_a_malformed_jsonl(tmp_path):
    from llmcu.data import DatasetError
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "x", "label": 7, "endings": ["a", "b"]}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1"):
        hellaswag.prepare_hellaswag(tmp_path / "out", input_jsonl=bad, log=lambda s: None)


def test_cli_prepare_and_train_log_hellaswag(jsonl, tmp_path, capsys):
    out = tmp_path / "hs"
    assert main(["prepare", "hellaswag", "--input", str(jsonl), "--out-dir", str(out)]) == 0
    evalfile = out / "hellaswag_val.bin"
    assert len(read_evalfile(evalfile)) == 2
    # a tiny model and shard, trained in-process with --hellaswag's config field
    config = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=16)
    model_path = tmp_path / "tiny.bin"
    formats.write_model(model_path, config, init_parameters(config, seed=1))
    shard = tmp_path / "tok.bin"
    formats.write_shard(shard, np.random.default_rng(0).integers(0, 50257, 2000))
    from llmcu.train import train
    lines = []
    cfg = TrainConfig(train_pattern=str(shard), val_pattern=str(shard), model=str(model_path),
                      batch_size=2, seq_len=16, max_steps=2, val_every=1, val_batches=1,
                      sample_every=0, hellaswag=str(evalfile))
    history = train(cfg, log=lines.append)
    hs = [s for s in lines if s.startswith("HellaSwag:")]
    assert len(hs) == 3, lines  # steps 0, 1 and the last
    for s in hs:
        n, m, acc = __import__("re").fullmatch(r"HellaSwag: (\d+)/(\d+) = ([\d.]+)", s).groups()
        assert int(m) == 2 and abs(int(n) / 2 - float(acc)) < 1e-6
    assert [s for s, _ in history["hellaswag"]] == [0, 1, 2]
    assert sum(1 for s in lines if s.startswith("val loss ")) == 3


def test_train_help_lists_hellaswag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--hellaswag PATH" in capsys.readouterr().out
