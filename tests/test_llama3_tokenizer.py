"""The Llama 3 tokenizer (the user's tokenizer.model; tests use ../shared's copy):
known ids, how --tokenizer finds it, uint32 shards of tinyshakespeare with
llm.c's counts, and `llmcu train|sample -e llama-d6 --tokenizer` on them."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmcu import data, formats, tokenizer
from helpers import run_llmcu, subprocess_env

_ENV = subprocess_env()


def llmcu(*args, check=True):
    return run_llmcu(*args, env=_ENV, check=check)


@pytest.fixture(scope="module")
def llama3_file(shared_dir) -> Path:
    return shared_dir / "tokenizers" / "llama3.tiktoken"


@pytest.fixture(scope="module")
def llama3(llama3_file):
    return tokenizer.load_tokenizer(llama3_file)


def test_known_ids(llama3):
    assert llama3.name == "llama3" and llama3.vocab_size == 128256 and llama3.eot == 128000
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.decode([128000, 9906, 1917, 128001]) == "<|begin_of_text|>Hello world<|end_of_text|>"
    specials = tokenizer.llama3_special_tokens()
    assert len(specials) == 256 and specials["<|eot_id|>"] == 128009
    assert specials["<|reserved_special_token_246|>"] == 128255


def test_special_strings_in_text_are_ordinary(llama3):
    ids = llama3.encode("<|begin_of_text|>")
    assert 128000 not in ids and llama3.decode(ids) == "<|begin_of_text|>"


@pytest.mark.parametrize("text", ["", "héllo wörld, naïve café", "日本語のテキスト 中文 한국어 🙂",
                                  "numbers 1234567 and   spaces\n\n\ttabs", "can't won't I'LL"])
def test_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text)) == text


def test_out_of_range_ids_are_refused(llama3):
    with pytest.raises(ValueError, match=r"128256 is out of range: llama3 ids are 0\.\.128255"):
        llama3.decode([1, 128256])


def test_found_in_a_hugging_face_directory(llama3_file, llama3, tmp_path):
    hf = tmp_path / "Llama-3.2-1B"
    (hf / "original").mkdir(parents=True)
    shutil.copy(llama3_file, hf / "original" / "tokenizer.model")
    assert tokenizer.find_tokenizer_file(hf) == str(hf / "original" / "tokenizer.model")
    assert tokenizer.load_tokenizer(hf).encode("Hello world") == [9906, 1917]
    # an hf: model directory brings its tokenizer along
    assert tokenizer.model_tokenizer(f"hf:{hf}").name == "llama3"
    assert tokenizer.model_tokenizer("d6").name == "gpt2"


def test_tokenizer_json(llama3, tmp_path):
    """A Hugging Face tokenizer.json (byte-level vocab, special tokens in added_tokens)."""
    to_char = {b: c for c, b in tokenizer._bytes_from_hf_vocab().items()}
    enc = llama3.encoding
    vocab = {"".join(to_char[b] for b in enc.decode_single_token_bytes(i)): i for i in range(128000)}
    specials = tokenizer.llama3_special_tokens()
    vocab.update(specials)
    added = [{"id": i, "content": s, "special": True} for s, i in specials.items()]
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab},
                                                  "added_tokens": added}))
    tok = tokenizer.load_tokenizer(d)
    text = "Hello world, héllo 日本語 🙂 1234567"
    assert tok.name == "llama3" and tok.encode(text) == llama3.encode(text)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        tokenizer.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="original/tokenizer.model"):
        tokenizer.load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_text("aGVsbG8= 0\nnot a line\n")
    with pytest.raises(ValueError, match="line 2"):
        tokenizer.load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "small.model").write_text("aGVsbG8= 0\nd29ybGQ= 1\n")
    with pytest.raises(ValueError, match="found 2 ranks"):
        tokenizer.load_tokenizer(tmp_path / "small.model")


def test_gpt2_ranks_file_gives_gpt2(shared_dir):
    assert tokenizer.load_tokenizer(shared_dir / "tokenizers" / "gpt2.tiktoken").name == "gpt2"


# ----------------------------------------------------------------------------
# tinyshakespeare the llm.c way for llama-3, and training on it

@pytest.fixture(scope="module")
def shakespeare_llama3(shared_dir, llama3_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ts_llama3")
    r = llmcu("prepare", "tinyshakespeare", "--input", shared_dir / "datasets/tinyshakespeare/input.txt",
              "--out-dir", out, "--tokenizer", llama3_file)
    assert "32,768" in r.stdout and "276,224" in r.stdout, r.stdout
    return out


def test_tinyshakespeare_llama3_counts(shakespeare_llama3):
    for name, n in (("tiny_shakespeare_val.bin", 32768), ("tiny_shakespeare_train.bin", 276224)):
        path = shakespeare_llama3 / name
        header = np.fromfile(path, dtype="<i4", count=3)
        assert list(header) == [20240801, 7, n]
        assert path.stat().st_size == 1024 + 4 * n
        assert formats.read_shard_info(path) == (n, "uint32")
    val = formats.read_shard(shakespeare_llama3 / "tiny_shakespeare_val.bin", vocab_size=128256)
    assert val.dtype == np.uint32 and val[0] == 128000
    assert int(val.max()) >= 128000  # ids only uint32 holds


def test_train_and_sample_llama_d6(shakespeare_llama3, llama3_file):
    r = llmcu("train", "-e", "llama-d6", "--tokenizer", llama3_file,
              "-i", shakespeare_llama3 / "tiny_shakespeare_train.bin",
              "-j", shakespeare_llama3 / "tiny_shakespeare_val.bin",
              "-b", 1, "-t", 8, "-x", 2, "-v", 2, "-m", 1, "-s", 2, "-g", 6, "-l", 1e-3)
    assert "vocab_size: 128256" in r.stdout
    assert "train data: shuffled" in r.stdout
    losses = [float(line.split("train loss ")[1].split()[0]) for line in r.stdout.splitlines()
              if "train loss" in line]
    assert len(losses) == 2 and abs(losses[0] - np.log(128256)) < 1.0, r.stdout  # ~uniform at init
    sample = r.stdout.split("generating:\n---\n")[1].split("\n---")[0]
    assert sample.strip()  # decoded with Llama 3's vocabulary (GPT-2's would refuse ids >= 50257)


def test_sample_needs_the_models_tokenizer(llama3_file, tmp_path):
    from llmcu.cpu.llama import init_parameters
    from llmcu.llama_config import LlamaConfig
    config = LlamaConfig(max_seq_len=16, vocab_size=128256, num_layers=1, num_heads=2,
                         num_kv_heads=1, channels=8, hidden_dim=16)
    formats.write_model(tmp_path / "tiny.bin", config, init_parameters(config, seed=3))
    s = llmcu("sample", "-e", tmp_path / "tiny.bin", "--tokenizer", llama3_file,
              "--prompt", "Hello world", "-g", 3, "--seed", 1)
    assert s.stdout.startswith("Hello world")
    # without it the vocabularies disagree: refused, not decoded as GPT-2 ids
    bad = llmcu("sample", "-e", tmp_path / "tiny.bin", "-g", 3, check=False)
    assert bad.returncode == 2 and "128,256 tokens" in bad.stderr and "--tokenizer" in bad.stderr


def test_llama3_shard_refused_by_a_gpt2_model(shakespeare_llama3):
    r = llmcu("train", "-e", "d6", "-i", shakespeare_llama3 / "tiny_shakespeare_train.bin",
              "-j", shakespeare_llama3 / "tiny_shakespeare_val.bin", "-b", 1, "-t", 8, "-x", 1,
              check=False)
    assert r.returncode == 2, r.stderr
    assert "token id out of range: expected ids < 50257" in r.stderr, r.stderr
    assert re.search(r"found \d+ at position \d+", r.stderr) and "Traceback" not in r.stderr


def test_gpt2_shard_refused_by_a_llama3_loader(tmp_path):
    formats.write_shard(tmp_path / "gpt2.bin", np.arange(100))
    with pytest.raises(data.DatasetError, match="uint16 tokens, too narrow for a vocabulary of 128,256"):
        data.DataLoader(str(tmp_path / "gpt2.bin"), 2, 4, vocab_size=128256)


def test_model_vocabulary_must_fit_the_tokenizer(llama3):
    tokenizer.check_model_vocab(llama3, 128256)
    tokenizer.check_model_vocab(tokenizer.gpt2(), 50257)
    tokenizer.check_model_vocab(tokenizer.gpt2(), 64)  # a small test model: GPT-2 decodes its ids
    with pytest.raises(ValueError, match="vocabulary has 50,257 tokens, the llama3 tokenizer's 128,256"):
        tokenizer.check_model_vocab(llama3, 50257)
    with pytest.raises(ValueError, match="128,256 tokens, the gpt2 tokenizer's 50,257.*--tokenizer"):
        tokenizer.check_model_vocab(tokenizer.gpt2(), 128256)
