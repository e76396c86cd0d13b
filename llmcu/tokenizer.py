"""Tokenizers, offline: GPT-2's BPE (shipped) and Llama 3's (the user's file).

The GPT-2 merge ranks ship inside llmcu (llmcu/assets/gpt2.tiktoken, byte-identical
to tiktoken's r50k_base file), so tokenizing never touches the network; tiktoken
only does the BPE. encode() is llm.c's encode_ordinary: "<|endoftext|>" inside
text is plain text. The end-of-text token is added by the caller (data.py).

Llama 3's ranks (Meta's tokenizer.model: 128,000 ranks in tiktoken format, plus
256 special tokens) are under Meta's license and are not shipped: load_tokenizer
(PATH) reads the user's copy, or finds original/tokenizer.model or
tokenizer.json in a Hugging Face Llama directory. Every document of a Llama 3
dataset is prefixed with <|begin_of_text|> = 128000, as llm.c's dev/data scripts do.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources

import tiktoken

from llmcu import formats
from llmcu.config import GPT2_EOT, GPT2_VOCAB_SIZE

EOT = GPT2_EOT                # 50256, "<|endoftext|>"
VOCAB_SIZE = GPT2_VOCAB_SIZE  # 50257 = 50256 merge ranks + EOT

RANKS_FILE = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenizer regex as tiktoken writes it for r50k_base/gpt2 (the
# possessive quantifiers and `\s++$` only make it faster; the splits are the
# same as GPT-2's original pattern).
GPT2_PAT_STR = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")


def _parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """A tiktoken ranks file: per line a base64 token, a space, its rank."""
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:  # binascii.Error is a ValueError
            raise ValueError(f"{where}: not a tiktoken ranks file: line {n} should be "
                             f"'<base64 token> <rank>', found {line[:60]!r}") from e
    return ranks


def _load_ranks() -> dict[bytes, int]:
    """Parse the packaged ranks file (base64 token, space, rank per line)."""
    data = resources.files("llmcu").joinpath("assets", RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(
            f"llmcu/assets/{RANKS_FILE}: the GPT-2 ranks file is corrupt: expected sha256 "
            f"{RANKS_SHA256}, found {digest}; reinstall llmcu")
    return _parse_ranks(data, f"llmcu/assets/{RANKS_FILE}")


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding, built from the packaged ranks (cached)."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Token ids of ordinary text ("<|endoftext|>" in text is not special)."""
    return get_encoding().encode_ordinary(text)


def _check_ids(ids) -> list[int]:
    ids = [int(i) for i in ids]
    for i in ids:
        if not 0 <= i < VOCAB_SIZE:
            raise ValueError(f"token id {i} is out of range: GPT-2 ids are 0..{VOCAB_SIZE - 1}")
    return ids


def decode_bytes(ids) -> bytes:
    """The raw bytes of a sequence of token ids."""
    return get_encoding().decode_bytes(_check_ids(ids))


def decode(ids) -> str:
    """Text of token ids; a partial UTF-8 sequence becomes U+FFFD."""
    return decode_bytes(ids).decode("utf-8", errors="replace")


def token_bytes(i: int) -> bytes:
    """The bytes of one token."""
    return decode_bytes([i])


def write_tokenizer_bin(path) -> None:
    """Write llm.c's gpt2_tokenizer.bin: all 50257 tokens, EOT 50256."""
    enc = get_encoding()
    tokens = [enc.decode_single_token_bytes(i) for i in range(VOCAB_SIZE)]
    formats.write_tokenizer_bin(path, tokens, EOT)


# ----------------------------------------------------------------------------
# Tokenizer: one object for either vocabulary (prepare, the loader, sampling)

LLAMA3_NUM_RANKS = 128000
LLAMA3_BOS = 128000          # <|begin_of_text|>: llm.c's per-document prefix for llama-3
LLAMA3_EOS = 128001          # <|end_of_text|>
LLAMA3_VOCAB_SIZE = 128256   # 128,000 ranks + 256 special tokens
# Meta's llama3 tokenizer.py pre-tokenizer pattern
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def llama3_special_tokens() -> dict[str, int]:
    """The 256 special tokens after the 128,000 ranks, named as Meta's tokenizer.py."""
    names = _LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in
                                      range(256 - len(_LLAMA3_NAMED_SPECIALS))]
    return {name: LLAMA3_NUM_RANKS + i for i, name in enumerate(names)}


@dataclass(frozen=True)
class Tokenizer:
    """A vocabulary: `eot` is the token every document starts with (GPT-2's
    <|endoftext|>, Llama 3's <|begin_of_text|>), `vocab_size` the ids it
    produces; shards of ids >= 65536 are uint32 (formats.shard_dtype)."""
    name: str                  # "gpt2" or "llama3"
    encoding: tiktoken.Encoding
    eot: int
    vocab_size: int
    source: str                # where the ranks came from

    def encode(self, text: str) -> list[int]:
        """Ordinary text: special-token strings inside it are plain text."""
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, ids) -> bytes:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range: {self.name} ids are "
                                 f"0..{self.vocab_size - 1}")
        return self.encoding.decode_bytes(ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


GPT2 = "gpt2"
LLAMA3 = "llama3"


def gpt2() -> Tokenizer:
    return Tokenizer(GPT2, get_encoding(), EOT, VOCAB_SIZE, "llmcu/assets/" + RANKS_FILE)


def _bytes_from_hf_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table inverted: tokenizer.json writes token bytes as
    printable characters (byte b is chr(b) for printable latin-1, else 256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


def _ranks_from_tokenizer_json(path: str) -> dict[bytes, int]:
    """The BPE ranks of a Hugging Face tokenizer.json (byte-level BPE, as Llama 3's)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        vocab = data["model"]["vocab"]
        specials = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        table = _bytes_from_hf_vocab()
        return {bytes(table[c] for c in token): int(rank) for token, rank in vocab.items()
                if int(rank) not in specials}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a byte-level BPE tokenizer.json (expected "
                         f"model.vocab of byte-level tokens): {e}") from e


def find_tokenizer_file(path) -> str:
    """The ranks file for --tokenizer PATH: PATH itself, or in a Hugging Face
    Llama directory original/tokenizer.model, tokenizer.model or tokenizer.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("original/tokenizer.model", "tokenizer.model", "tokenizer.json"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(
            f"--tokenizer {path}: a directory without original/tokenizer.model, tokenizer.model "
            f"or tokenizer.json; pass the tokenizer file itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer {path}: no such file (expected Meta's Llama 3 "
                                f"tokenizer.model, a tiktoken ranks file)")
    return path


@functools.lru_cache(maxsize=8)
def _load_file(path: str) -> Tokenizer:
    if path.endswith(".json"):
        ranks = _ranks_from_tokenizer_json(path)
    else:
        with open(path, "rb") as f:
            ranks = _parse_ranks(f.read(), path)
    n = len(ranks)
    if n == EOT and sorted(ranks.values()) == list(range(n)):
        if ranks == _load_ranks():
            return gpt2()
    if n != LLAMA3_NUM_RANKS or sorted(ranks.values()) != list(range(n)):
        raise ValueError(
            f"--tokenizer {path}: expected the Llama 3 tokenizer (ranks 0..{LLAMA3_NUM_RANKS - 1}, "
            f"{LLAMA3_NUM_RANKS:,} of them) or GPT-2's ({EOT:,}), found {n:,} ranks")
    enc = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks,
                            special_tokens=llama3_special_tokens())
    return Tokenizer(LLAMA3, enc, LLAMA3_BOS, LLAMA3_VOCAB_SIZE, path)


def load_tokenizer(path=None) -> Tokenizer:
    """GPT-2's tokenizer (path None), or the one in the file or directory `path`."""
    if path is None or path == "":
        return gpt2()
    return _load_file(os.path.abspath(find_tokenizer_file(path)))


def model_tokenizer(spec: str, path=None) -> Tokenizer:
    """The tokenizer for a model -e `spec`: --tokenizer `path` when given; else the one
    in an hf:DIR checkpoint (original/tokenizer.model, tokenizer.model, tokenizer.json)
    when there; else GPT-2's."""
    if path:
        return load_tokenizer(path)
    if spec.startswith("hf:") and os.path.isdir(spec[3:]):
        try:
            return load_tokenizer(spec[3:])
        except (FileNotFoundError, ValueError):  # none, or not tiktoken's (Llama 2's sentencepiece)
            pass
    return gpt2()


def check_model_vocab(tok: Tokenizer, vocab_size: int) -> None:
    """A model trained or sampled with `tok` must have its vocabulary; GPT-2's (the
    default) also serves smaller test models, whose ids it decodes."""
    if vocab_size != tok.vocab_size and not (tok.name == GPT2 and vocab_size < tok.vocab_size):
        hint = ("pass --tokenizer with the model's tokenizer (Llama 3: its tokenizer.model)"
                if tok.name == GPT2 else "pick a model with this vocabulary, or drop --tokenizer")
        raise ValueError(f"the model's vocabulary has {vocab_size:,} tokens, the {tok.name} tokenizer's "
                         f"{tok.vocab_size:,} ({tok.source}); {hint}")
