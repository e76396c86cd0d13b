"""GPT-2 tokenizer: known ids, round trips, llm.c's tokenizer file, offline use."""

import socket
import struct

import pytest
import tiktoken

from llmcu import formats, tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def fresh_encoding():
    """Drop the cached Encoding before and after, so the test builds it itself."""
    tokenizer.get_encoding.cache_clear()
    yield
    tokenizer.get_encoding.cache_clear()


def test_constants():
    assert tokenizer.EOT == 50256
    assert tokenizer.VOCAB_SIZE == 50257
    assert tokenizer.get_encoding().n_vocab == 50257
    assert tokenizer.get_encoding().eot_token == 50256


def test_hello_world():
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_decode_known_ids():
    ids = [50256, 16773, 18162, 21986, 11, 198, 13681, 263, 23875, 198]
    assert tokenizer.decode(ids) == "<|endoftext|>Come Running Away,\nGreater conquer\n"


def test_endoftext_in_text_is_ordinary():
    ids = tokenizer.encode("<|endoftext|>")
    assert tokenizer.EOT not in ids
    assert len(ids) > 1
    assert tokenizer.decode(ids) == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n",
    "numbers 1234567 and punctuation ?!;:...",
    "héllo wörld, naïve café",
    "日本語のテキスト 中文 한국어",
    "emoji 🤖🚀 and combining e\u0301",
    "contractions: don't, I'll, we've, they're",
])
def test_round_trip(text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.EOT for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")


def test_partial_utf8_is_replaced():
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1  # one emoji spans several byte-level tokens
    assert "\ufffd" in tokenizer.decode(ids[:1])


def test_token_bytes():
    assert tokenizer.token_bytes(15496) == b"Hello"
    assert tokenizer.token_bytes(995) == b" world"
    assert tokenizer.token_bytes(50256) == b"<|endoftext|>"


@pytest.mark.parametrize("bad", [50257, 100000, -1])
def test_decode_out_of_range_id(bad):
    with pytest.raises(ValueError, match=str(bad)):
        tokenizer.decode([15496, bad])


def test_token_bytes_out_of_range():
    with pytest.raises(ValueError, match="50257"):
        tokenizer.token_bytes(50257)


def test_tokenizer_bin_round_trip(tmp_path):
    path = tmp_path / "gpt2_tokenizer.bin"
    tokenizer.write_tokenizer_bin(path)
    raw = path.read_bytes()
    # header, read independently of the reader
    magic, version, n, eot = struct.unpack_from("<4I", raw, 0)
    assert (magic, version, n, eot) == (20240328, 2, 50257, 50256)
    assert raw[16:1024] == bytes(1024 - 16)
    # first entry: length byte then the bytes of token 0 ("!")
    assert raw[1024:1026] == b"\x01!"
    token_list, eot = formats.read_tokenizer_bin(path)
    assert eot == 50256
    assert len(token_list) == 50257
    reference = tiktoken.Encoding(  # tiktoken's own decode of every id
        name="ref", pat_str=tokenizer.GPT2_PAT_STR,
        mergeable_ranks=tokenizer._load_ranks(),
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    for i, b in enumerate(token_list):
        assert b == reference.decode_bytes([i]), i
    assert len(raw) == 1024 + sum(1 + len(b) for b in token_list)


def test_works_without_network(no_network, fresh_encoding):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_corrupt_ranks_file_is_rejected(monkeypatch, fresh_encoding):
    monkeypatch.setattr(tokenizer, "RANKS_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="gpt2.tiktoken.*expected sha256 0{64}, found 306cd27f"):
        tokenizer.get_encoding()


def _shakespeare(shared_dir):
    path = shared_dir / "datasets" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path.read_text(encoding="utf-8")[:2000]


def test_matches_tiktoken_loader_and_pattern(shared_dir, monkeypatch):
    """Our parse of the ranks and our regex against tiktoken's own (both offline)."""
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    from tiktoken.load import load_tiktoken_bpe
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, cache nothing
    assets = tokenizer.resources.files("llmcu").joinpath("assets", tokenizer.RANKS_FILE)
    with tokenizer.resources.as_file(assets) as ranks_path:
        ranks = load_tiktoken_bpe(str(ranks_path))
    assert ranks == tokenizer._load_ranks()
    reference = tiktoken.Encoding(
        name="ref", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    text = _shakespeare(shared_dir) + " tail   \n\n  spaces 123 don't "
    assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_matches_tiktoken_gpt2(shared_dir, no_network):
    """tiktoken's own "gpt2" encoding, only if it is cached locally."""
    text = _shakespeare(shared_dir)
    try:
        reference = tiktoken.get_encoding("gpt2")
    except Exception as e:  # no cached files: the download attempt fails
        pytest.skip(f"tiktoken's gpt2 encoding is not available offline ({type(e).__name__})")
    assert tokenizer.encode(text) == reference.encode_ordinary(text)
