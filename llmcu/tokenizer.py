"""GPT-2's BPE tokenizer, offline.

The merge ranks ship inside llmcu (llmcu/assets/gpt2.tiktoken, byte-identical
to tiktoken's r50k_base file), so tokenizing never touches the network; tiktoken
only does the BPE. encode() is llm.c's encode_ordinary: "<|endoftext|>" inside
text is plain text. The end-of-text token is added by the caller (data.py).
"""

from __future__ import annotations

import base64
import functools
import hashlib
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


def _load_ranks() -> dict[bytes, int]:
    """Parse the packaged ranks file (base64 token, space, rank per line)."""
    data = resources.files("llmcu").joinpath("assets", RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(
            f"llmcu/assets/{RANKS_FILE}: the GPT-2 ranks file is corrupt: expected sha256 "
            f"{RANKS_SHA256}, found {digest}; reinstall llmcu")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


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
