"""llm.c's binary files, byte for byte: model checkpoints, debug state, token
shards and the tokenizer.

Every file starts with a 1024-byte header of 256 little-endian 32-bit ints:
[0] a magic number naming the kind of file, [1] its version, then fields of
that kind. The payload follows at once and the file ends where the header says
it does. Readers check all of it (magic, version, header fields, exact size,
token ids) and raise FormatError naming the file, what was expected and what
was found. Writers go through atomic_write, so nothing is written half-way.

    model      20240326  v3 fp32 / v5 bf16  maxT V L NH C Vp | params (llm.c order)
    llama      20240803  v3 fp32 / v5 bf16  llm.c's Llama 3 header (+ llmcu's fields) | params
                                   (Llama/Gemma; see the section at the end)
    debug      20240327  v2                 B T            | x y logits loss grads
    tokenizer  20240328  v2                 n eot          | n x (len byte, bytes)
    shard      20240520  v1                 ntok           | ntok x uint16 (GPT-2)
               20240801  v7                 ntok           | ntok x uint32 (Llama 3)
    state      20240527  v1  llm.c's header + llmcu's fields | m v windows rng
                                   (training state beside a model checkpoint)
    eval       20240522  v1                 n longest      | per example a uint16 stream
                                   (multiple-choice evals such as HellaSwag)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmcu.config import GPT2_VOCAB_SIZE, GPT2Config

HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS

MODEL_MAGIC = 20240326
DEBUG_STATE_MAGIC = 20240327
TOKENIZER_MAGIC = 20240328
SHARD_MAGIC = 20240520
SHARD_MAGIC_UINT32 = 20240801  # llm.c's dev/data/data_common.py: llama-3 shards
TRAIN_STATE_MAGIC = 20240527  # llm.c's state_%08d_%05d.bin

MODEL_VERSION_FP32 = 3
MODEL_VERSION_BF16 = 5
DEBUG_STATE_VERSION = 2
TOKENIZER_VERSION = 2
SHARD_VERSION = 1
SHARD_VERSION_UINT32 = 7
# (magic, version) -> token dtype of a shard
SHARD_KINDS = {(SHARD_MAGIC, SHARD_VERSION): "uint16", (SHARD_MAGIC_UINT32, SHARD_VERSION_UINT32): "uint32"}
TRAIN_STATE_VERSION = 1

_MODEL_DTYPES = {"float32": MODEL_VERSION_FP32, "bfloat16": MODEL_VERSION_BF16}


class FormatError(ValueError):
    """A file that is not what it claims to be (magic, version, size, contents)."""


# ----------------------------------------------------------------------------
# writing: temporary name in the same directory, then rename

@contextlib.contextmanager
def atomic_write(path):
    """Yield a binary file on a temporary name beside `path`; rename it onto
    `path` only if the block finishes. On an exception the temporary file is
    deleted and whatever was at `path` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # name the caller's file, not the temporary one
            raise type(e)(e.errno, e.strerror, path) from None
        raise
    # make the rename itself durable (POSIX only; not possible on Windows)
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def removes_new_dirs_on_failure(prepare):
    """Decorator for a prepare function taking out_dir: if it raises, the
    directories it created (out_dir and any missing parents) are removed again
    while empty, so a failed prepare leaves no empty directories behind. A
    directory that existed before, or holds a finished download, stays."""
    @functools.wraps(prepare)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(prepare).bind(*args, **kwargs)
        bound.apply_defaults()
        new, d = [], Path(bound.arguments["out_dir"]).absolute()
        while not d.exists() and d != d.parent:
            new.append(d)
            d = d.parent
        try:
            return prepare(*args, **kwargs)
        except BaseException:
            for d in new:  # deepest first; rmdir refuses a non-empty one
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    return wrapper


def _make_header(magic: int, version: int, *fields: int, dtype: str = "<i4") -> bytes:
    header = np.zeros(HEADER_INTS, dtype=dtype)
    header[0], header[1] = magic, version
    header[2:2 + len(fields)] = fields
    return header.tobytes()


# ----------------------------------------------------------------------------
# reading: one header check for all four formats

def _kind_of_magic(magic: int) -> str | None:
    """The kind of llm.c file a magic number names, None for an unknown one."""
    return {MODEL_MAGIC: "llm.c GPT-2 model checkpoint", LLAMA_MODEL_MAGIC: "llm.c Llama model checkpoint",
            DEBUG_STATE_MAGIC: "llm.c debug state", TOKENIZER_MAGIC: "llm.c tokenizer",
            SHARD_MAGIC: "llm.c token shard", SHARD_MAGIC_UINT32: "llm.c token shard (uint32)",
            TRAIN_STATE_MAGIC: "training state",
            EVAL_MAGIC: "llm.c eval file"}.get(magic)


def _read_header(f, path: str, magic, versions: tuple[int, ...], what: str,
                 dtype: str = "<i4", hint: str = "") -> list[int]:
    """Read and check the 256-int header of an open file: magic, length, version.

    magic: the magic number, or a tuple of those the caller accepts (the first
    is the one `what` names). A file that does not start with it is "not an
    llm.c ... file", whatever its length (a text file passed as a model); one
    that does but ends before 1024 bytes is truncated. hint: what to pass or run
    instead, appended to the wrong-magic message."""
    magics = magic if isinstance(magic, tuple) else (magic,)
    raw = f.read(HEADER_BYTES)
    head = np.frombuffer(raw[:4], dtype=dtype) if len(raw) >= 4 else None
    starts_right = (head is not None and int(head[0]) in magics) or (
        len(raw) < 4 and any(np.array([m], dtype=dtype).tobytes().startswith(raw) for m in magics))
    if not starts_right:
        expected = " or ".join(f"{m} ({_kind_of_magic(m) or what})" for m in magics)
        if head is None:
            found = f"a {len(raw)}-byte file"
        else:
            kind = _kind_of_magic(int(head[0]))
            found = f"{int(head[0])}" + (f" (an {kind})" if kind else "")
        starts = "" if head is not None and _kind_of_magic(int(head[0])) else \
            f"; the file starts with {raw[:16]!r}"
        raise FormatError(
            f"{path}: not an {what}: bad magic number: expected {expected}, found {found}"
            f"{starts}" + (f"; {hint}" if hint else ""))
    if len(raw) < HEADER_BYTES:
        raise FormatError(
            f"{path}: file is truncated: expected a {HEADER_BYTES}-byte {what} header, "
            f"found a {len(raw)}-byte file")
    header = [int(v) for v in np.frombuffer(raw, dtype=dtype)]
    if header[1] not in versions:
        expected = " or ".join(str(v) for v in versions)
        raise FormatError(
            f"{path}: unknown {what} version: expected {expected}, found {header[1]}")
    return header


def _check_size(f, path: str, expected: int, what: str) -> None:
    """The file must be exactly `expected` bytes: no less, no trailing bytes."""
    found = os.fstat(f.fileno()).st_size
    if found < expected:
        raise FormatError(
            f"{path}: file is truncated: expected {expected} bytes for {what}, found {found}")
    if found > expected:
        raise FormatError(
            f"{path}: file is oversized: expected {expected} bytes for {what}, found {found} "
            f"({found - expected} trailing bytes)")


def _read_array(f, dtype: str, count: int) -> np.ndarray:
    """`count` items from the current position, in native byte order."""
    data = np.fromfile(f, dtype=dtype, count=count)
    return data.astype(np.dtype(dtype).newbyteorder("="), copy=False)


# ----------------------------------------------------------------------------
# bfloat16: the top 16 bits of a float32, rounded to nearest even

def _array_module(a):
    """cupy for a CuPy array (the bf16 helpers also serve GPU arrays), else numpy."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def float32_to_bf16_bits(a) -> np.ndarray:
    """bf16 bit patterns (uint16) of float32 values, round to nearest even.

    inf stays inf; NaN becomes a quiet NaN of the same sign (rounding could
    otherwise carry a NaN's payload into the exponent and make it inf).
    NumPy in, NumPy out; CuPy in, CuPy out."""
    xp = _array_module(a)
    bits = xp.asarray(a, dtype=np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + (0x7FFF + lsb)) >> 16).astype(np.uint16)  # uint32 wraps; unused for NaN
    is_nan = xp.isnan(bits.view(np.float32))
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return xp.where(is_nan, quiet_nan, rounded)


def bf16_bits_to_float32(b) -> np.ndarray:
    """float32 values of bf16 bit patterns (exact). NumPy or CuPy, like the input."""
    xp = _array_module(b)
    bits = xp.asarray(b, dtype=np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


def round_to_bf16(a) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (round to nearest even), as float32."""
    return bf16_bits_to_float32(float32_to_bf16_bits(a))


# ----------------------------------------------------------------------------
# model checkpoint

def _check_float32(name: str, a, shape: tuple[int, ...] | None = None, size: int | None = None):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        found = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a float32 numpy array, found {found}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, found {a.shape}")
    if size is not None and (a.ndim != 1 or a.size != size):
        raise ValueError(f"{name} must be a flat array of {size} elements, found shape {a.shape}")
    return a


def write_model(path, config: GPT2Config, params: np.ndarray, dtype: str = "float32") -> None:
    """Write an llm.c model checkpoint: version 3 (fp32) or 5 (bf16) params.

    params is the flat float32 array of config.num_parameters() elements in
    llm.c's order (wte's padded rows V..Vp-1 should be zero, as llm.c keeps them).
    A LlamaConfig goes to write_llama_model (llm.c's Llama 3 layout)."""
    if not isinstance(config, GPT2Config):
        return write_llama_model(path, config, params, dtype)
    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"write_model: dtype must be one of {sorted(_MODEL_DTYPES)}, found {dtype!r}")
    _check_float32("write_model: params", params, size=config.num_parameters())
    c = config
    header = _make_header(MODEL_MAGIC, _MODEL_DTYPES[dtype], c.max_seq_len, c.vocab_size,
                          c.num_layers, c.num_heads, c.channels, c.padded_vocab_size)
    if dtype == "bfloat16":
        payload = float32_to_bf16_bits(params).astype("<u2", copy=False)
    else:
        payload = params.astype("<f4", copy=False)
    with atomic_write(path) as f:
        f.write(header)
        f.write(payload.tobytes())


_MODEL_HINT = ("pass a model .bin written by llmcu train, llm.c, or `llmcu convert --from-hf DIR "
               "--out model.bin` (llmcu train and sample -e also take a descriptor such as d12 or llama-d6)")


def _read_gpt2_header(f, path: str) -> tuple[GPT2Config, int]:
    """(config, version) from an open GPT-2 model file's header, all fields checked."""
    header = _read_header(f, path, (MODEL_MAGIC, LLAMA_MODEL_MAGIC),
                          (MODEL_VERSION_FP32, MODEL_VERSION_BF16), "llm.c model checkpoint",
                          hint=_MODEL_HINT)
    version = header[1]
    maxT, V, L, NH, C, Vp = header[2:8]
    fields = {"maxT": maxT, "V": V, "L": L, "NH": NH, "C": C, "Vp": Vp}
    for name, value in fields.items():
        if value <= 0:
            raise FormatError(f"{path}: bad model header: expected {name} > 0, found {value}")
    if Vp < V:
        raise FormatError(f"{path}: bad model header: expected Vp >= V, found Vp={Vp}, V={V}")
    if C % NH != 0:
        raise FormatError(
            f"{path}: bad model header: expected C divisible by NH, found C={C}, NH={NH}")
    return GPT2Config(max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=NH,
                      channels=C, padded_vocab_size=Vp), version


def read_model_header(path):
    """The config of an llm.c model file (GPT2Config, or LlamaConfig for a Llama
    file), from its header alone."""
    path = os.fspath(path)
    if _peek_magic(path) == LLAMA_MODEL_MAGIC:
        return read_llama_header(path)
    with open(path, "rb") as f:
        return _read_gpt2_header(f, path)[0]


def read_model(path) -> tuple[GPT2Config, np.ndarray]:
    """Read an llm.c model checkpoint: (config, flat float32 params); a Llama
    file (magic 20240803) gives (LlamaConfig, params) through read_llama_model."""
    path = os.fspath(path)
    if _peek_magic(path) == LLAMA_MODEL_MAGIC:
        return read_llama_model(path)
    with open(path, "rb") as f:
        config, version = _read_gpt2_header(f, path)
        nparams = config.num_parameters()
        itemsize = 2 if version == MODEL_VERSION_BF16 else 4
        _check_size(f, path, HEADER_BYTES + nparams * itemsize,
                    f"{nparams} parameters (version {version}, {config})")
        if version == MODEL_VERSION_BF16:
            params = bf16_bits_to_float32(_read_array(f, "<u2", nparams))
        else:
            params = _read_array(f, "<f4", nparams)
    return config, params


# ----------------------------------------------------------------------------
# debug state (train_gpt2.py's reference for test_gpt2.c)

@dataclass
class DebugState:
    x: np.ndarray        # (B, T) int32 inputs
    y: np.ndarray        # (B, T) int32 targets
    logits: np.ndarray   # (B, T, V) float32, unpadded V
    loss: float
    grads: np.ndarray    # flat float32, config.num_parameters(), padded like the model


def _check_tokens_2d(name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray) or not np.issubdtype(a.dtype, np.integer) or a.ndim != 2:
        found = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a 2-D integer numpy array (B, T), found {found}")
    return a


def _debug_state_size(B: int, T: int, config: GPT2Config) -> int:
    return HEADER_BYTES + 4 * (2 * B * T + B * T * config.vocab_size + 1 + config.num_parameters())


def write_debug_state(path, config: GPT2Config, x, y, logits, loss, grads) -> None:
    """Write llm.c's debug state: x, y (B, T), logits (B, T, V), loss, grads (flat)."""
    _check_tokens_2d("write_debug_state: x", x)
    _check_tokens_2d("write_debug_state: y", y)
    if y.shape != x.shape:
        raise ValueError(f"write_debug_state: y must have x's shape {x.shape}, found {y.shape}")
    B, T = x.shape
    _check_float32("write_debug_state: logits", logits, shape=(B, T, config.vocab_size))
    _check_float32("write_debug_state: grads", grads, size=config.num_parameters())
    with atomic_write(path) as f:
        f.write(_make_header(DEBUG_STATE_MAGIC, DEBUG_STATE_VERSION, B, T))
        for a, dtype in ((x, "<i4"), (y, "<i4"), (logits, "<f4"),
                         (np.array([float(loss)]), "<f4"), (grads, "<f4")):
            f.write(np.ascontiguousarray(a, dtype=dtype).tobytes())


def read_debug_state(path, config: GPT2Config) -> DebugState:
    """Read llm.c's debug state for a model of `config`."""
    path = os.fspath(path)
    what = "llm.c debug state"
    with open(path, "rb") as f:
        header = _read_header(f, path, DEBUG_STATE_MAGIC, (DEBUG_STATE_VERSION,), what,
                              hint="scripts/train_gpt2.py writes one (out/reference/gpt2_d12_debug_state.bin)")
        B, T = header[2], header[3]
        if B <= 0 or T <= 0:
            raise FormatError(f"{path}: bad debug state header: expected B, T > 0, found B={B}, T={T}")
        if T > config.max_seq_len:
            raise FormatError(f"{path}: bad debug state header: expected T <= "
                              f"{config.max_seq_len} (config max_seq_len), found T={T}")
        _check_size(f, path, _debug_state_size(B, T, config), f"B={B}, T={T} and {config}")
        V = config.vocab_size
        x = _read_array(f, "<i4", B * T).reshape(B, T)
        y = _read_array(f, "<i4", B * T).reshape(B, T)
        logits = _read_array(f, "<f4", B * T * V).reshape(B, T, V)
        loss = float(_read_array(f, "<f4", 1)[0])
        grads = _read_array(f, "<f4", config.num_parameters())
    return DebugState(x=x, y=y, logits=logits, loss=loss, grads=grads)


# ----------------------------------------------------------------------------
# token shards

def shard_dtype(vocab_size: int) -> str:
    """The token dtype of a shard for a vocabulary: uint16 (GPT-2) up to 65,536 ids,
    else uint32 (Llama 3's 128,256), as llm.c writes them."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_header(ntok: int, dtype: str = "uint16") -> bytes:
    """The 1024-byte header of a shard of `ntok` tokens of `dtype`."""
    kinds = {d: k for k, d in SHARD_KINDS.items()}
    if dtype not in kinds:
        raise ValueError(f"shard_header: dtype must be uint16 or uint32, found {dtype!r}")
    if not 0 <= ntok < 2**31:
        raise ValueError(f"shard_header: a shard holds 0..{2**31 - 1} tokens, found {ntok}")
    return _make_header(*kinds[dtype], ntok)


def write_shard(path, tokens, dtype: str = "uint16") -> None:
    """Write a token shard: header then tokens, uint16 (ids in [0, 65535], GPT-2's
    magic) or uint32 (Llama 3's magic 20240801, version 7)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        tokens = tokens.astype(np.int64)  # np.asarray([]) is float64
    if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim != 1:
        raise TypeError(f"write_shard: tokens must be a 1-D sequence of ints, "
                        f"found {tokens.dtype} of shape {tokens.shape}")
    if tokens.size >= 2**31:
        raise ValueError(f"write_shard: a shard holds at most {2**31 - 1} tokens, found {tokens.size}")
    header = shard_header(tokens.size, dtype)
    if tokens.dtype != np.dtype(dtype):
        top = np.iinfo(dtype).max
        bad = (tokens < 0) | (tokens > top)
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(f"write_shard: {os.fspath(path)}: token ids must be in [0, {top}] "
                             f"({dtype}), found {int(tokens[pos])} at position {pos}")
    with atomic_write(path) as f:
        f.write(header)
        f.write(tokens.astype("<" + np.dtype(dtype).str[1:]).tobytes())


def _open_shard(f, path: str) -> tuple[int, str]:
    header = _read_header(f, path, (SHARD_MAGIC, SHARD_MAGIC_UINT32),
                          tuple(sorted({v for _, v in SHARD_KINDS})), "llm.c token shard",
                          hint="pass token shards written by llmcu prepare (e.g. `llmcu prepare "
                               "tinyshakespeare` writes data/tinyshakespeare/tiny_shakespeare_*.bin)")
    magic, version, ntok = header[:3]
    dtype = SHARD_KINDS.get((magic, version))
    if dtype is None:
        expected = next(v for m, v in SHARD_KINDS if m == magic)
        raise FormatError(f"{path}: unknown llm.c token shard version: expected {expected} "
                          f"(with magic {magic}), found {version}")
    if ntok < 0:
        raise FormatError(f"{path}: bad token shard header: expected ntok >= 0, found {ntok}")
    itemsize = np.dtype(dtype).itemsize
    _check_size(f, path, HEADER_BYTES + itemsize * ntok, f"{ntok} tokens ({dtype})")
    return ntok, dtype


def read_shard_info(path) -> tuple[int, str]:
    """(number of tokens, "uint16" or "uint32") of a shard; checks magic, version and
    exact size only."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _open_shard(f, path)


def read_shard_header(path) -> int:
    """Number of tokens in a shard; checks magic, version and exact size only."""
    return read_shard_info(path)[0]


def read_shard(path, vocab_size: int | None = GPT2_VOCAB_SIZE) -> np.ndarray:
    """A shard's tokens as a read-only uint16 or uint32 memmap, every id checked
    < vocab_size (vocab_size=None skips that check)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        ntok, dtype = _open_shard(f, path)
    if ntok == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map zero bytes
    tokens = np.memmap(path, dtype="<" + np.dtype(dtype).str[1:], mode="r", offset=HEADER_BYTES,
                       shape=(ntok,))
    # max() first: one pass without a temporary; locate the culprit only on failure
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise FormatError(
            f"{path}: token id out of range: expected ids < {vocab_size} (the model's vocab "
            f"size), found {int(tokens[pos])} at position {pos}")
    return tokens


# ----------------------------------------------------------------------------
# tokenizer (llm.c's gpt2_tokenizer.bin): per token one length byte, then bytes

def write_tokenizer_bin(path, token_bytes: list[bytes], eot: int) -> None:
    """Write llm.c's tokenizer file: every token's bytes (1..255 of them) and the EOT id."""
    n = len(token_bytes)
    if not 0 <= eot < n:
        raise ValueError(f"write_tokenizer_bin: eot must be in [0, {n}), found {eot}")
    parts = []
    for i, b in enumerate(token_bytes):
        if not isinstance(b, (bytes, bytearray)) or not 1 <= len(b) <= 255:
            found = f"{len(b)} bytes" if isinstance(b, (bytes, bytearray)) else type(b).__name__
            raise ValueError(f"write_tokenizer_bin: token {i} must be 1..255 bytes, found {found}")
        parts.append(bytes([len(b)]))
        parts.append(bytes(b))
    with atomic_write(path) as f:
        f.write(_make_header(TOKENIZER_MAGIC, TOKENIZER_VERSION, n, eot, dtype="<u4"))
        f.write(b"".join(parts))


def read_tokenizer_bin(path) -> tuple[list[bytes], int]:
    """Read llm.c's tokenizer file: (token bytes for ids 0..n-1, eot id)."""
    path = os.fspath(path)
    what = "llm.c tokenizer"
    with open(path, "rb") as f:
        header = _read_header(f, path, TOKENIZER_MAGIC, (TOKENIZER_VERSION,), what, dtype="<u4",
                              hint="`llmcu tokenizer` writes gpt2_tokenizer.bin")
        data = f.read()
    n, eot = header[2], header[3]
    if eot >= n:
        raise FormatError(f"{path}: bad tokenizer header: expected eot < n ({n}), found eot={eot}")
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(data):
            raise FormatError(f"{path}: file is truncated: expected {n} tokens, "
                              f"found {i} before the end of the file")
        length = data[pos]
        if length == 0:
            raise FormatError(f"{path}: bad token {i} at byte {HEADER_BYTES + pos}: "
                              f"expected a length of 1..255, found 0")
        if pos + 1 + length > len(data):
            raise FormatError(
                f"{path}: file is truncated: token {i} expected {length} bytes, found "
                f"{len(data) - pos - 1} before the end of the file")
        tokens.append(data[pos + 1:pos + 1 + length])
        pos += 1 + length
    if pos != len(data):
        raise FormatError(f"{path}: file is oversized: expected {HEADER_BYTES + pos} bytes for "
                          f"{n} tokens, found {HEADER_BYTES + len(data)} "
                          f"({len(data) - pos} trailing bytes)")
    return tokens, eot


# ----------------------------------------------------------------------------
# training state (llm.c's state_%08d_%05d.bin, plus what llmcu needs to resume exactly)
#
# header (int32 slots; u64 = two slots, little-endian), llm.c's fields first:
#   [0] 20240527  [1] version 1  [2] num_processes  [3] rank (the file's, data parallel)
#   [4] use_master_weights (1: master float32[N] follows v, as in llm.c; bf16 runs with -w 1)
#   [5] should_shuffle (0: the DataLoader reads in order)
#   [10] step     [20:22] u64 rng_state (0: unused)  [22:24] u64 rng_state_last_update (0)
#   [30:32] u64 train loader shard index  [32:34] u64 sample index (-1 as 2**64-1)
# llmcu's fields (all 0 in a file from llm.c):
#   [40] extension version (1)  [41] B  [42] T  [43] outlier window size
#   [44:46] u64 num_parameters  [46] nL  [47] nN (values in the loss / grad-norm
#   outlier windows)  [48] nR (bytes of the sampling RNG's state, JSON)
#   [49] llmcu's loader shuffles (1; [5] stays 0: llm.c's shuffle payload, its
#   mt19937 state, is not written)  [50:52] u64 loader epoch  [52] shuffle seed
# payload: m float32[N], v float32[N], master float32[N] if [4] is 1 (llm.c's order; llm.c reads up to here),
#   loss window float64[nL], norm window float64[nN], RNG state JSON bytes[nR]

TRAIN_STATE_EXTENSION = 1


@dataclass
class TrainState:
    step: int                  # optimizer steps taken; training resumes at this step
    m: np.ndarray              # AdamW first moment, flat float32
    v: np.ndarray              # AdamW second moment, flat float32
    loader: dict               # DataLoader.state(): shard_index, sample_index (epoch, shuffle, seed)
    B: int = 0                 # micro-batch shape the loader position refers to (0: unknown)
    T: int = 0
    window: int = 0            # outlier detector window size (0: unknown)
    loss_window: list = None   # the loss outlier detector's values, oldest first
    norm_window: list = None   # the grad-norm outlier detector's values, oldest first
    rng_state: dict | None = None  # numpy bit_generator.state of the sampling RNG
    num_processes: int = 1     # data parallel: the world size and this file's rank (llm.c's
    rank: int = 0              # state_%08d_%05d.bin); m and v are the rank's ZeRO-1 shard with -z 1
    master: np.ndarray | None = None  # fp32 master weights of a bf16 run (llm.c's -w 1), flat float32


def write_train_state(path, state: TrainState, _midway=None) -> None:
    """Write a training state file (layout above) atomically.

    _midway: a test hook called once the header and m are written (it may
    kill the process, to test that a crash leaves the previous files usable)."""
    import json
    m = _check_float32("write_train_state: m", state.m)
    v = _check_float32("write_train_state: v", state.v, size=m.size)
    master = state.master
    if master is not None:
        master = _check_float32("write_train_state: master", master, size=m.size)
    loss_w = np.asarray(state.loss_window or [], dtype="<f8")
    norm_w = np.asarray(state.norm_window or [], dtype="<f8")
    rng = json.dumps(state.rng_state).encode() if state.rng_state is not None else b""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0:6] = (TRAIN_STATE_MAGIC, TRAIN_STATE_VERSION, state.num_processes, state.rank,
                   int(master is not None), 0)
    header[10] = state.step
    u64 = header.view("<u8")
    u64[15] = int(state.loader["shard_index"])
    u64[16] = int(state.loader["sample_index"]) % 2**64  # -1 -> 2**64-1, as llm.c's size_t
    header[40:44] = TRAIN_STATE_EXTENSION, state.B, state.T, state.window
    u64[22] = m.size
    header[46:49] = loss_w.size, norm_w.size, len(rng)
    header[49] = int(bool(state.loader.get("shuffle", False)))
    u64[25] = int(state.loader.get("epoch", 0))
    header[52] = int(state.loader.get("seed", 0))
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(m.astype("<f4", copy=False).tobytes())
        if _midway is not None:
            f.flush()
            _midway()
        f.write(v.astype("<f4", copy=False).tobytes())
        if master is not None:
            f.write(master.astype("<f4", copy=False).tobytes())
        f.write(loss_w.tobytes())
        f.write(norm_w.tobytes())
        f.write(rng)


def read_train_state(path, num_parameters: int, num_processes: int = 1, rank: int = 0) -> TrainState:
    """Read a training state file for a model of `num_parameters` parameters (the
    elements of m and v: a ZeRO-1 shard's size), written by `rank` of `num_processes`."""
    import json
    path = os.fspath(path)
    what = "training state"
    with open(path, "rb") as f:
        header = _read_header(f, path, TRAIN_STATE_MAGIC, (TRAIN_STATE_VERSION,), what,
                              hint="llmcu train -n writes state_%08d_00000.bin beside model_%08d.bin")
        raw = np.array(header, dtype=np.int64).astype("<i4")
        u64 = raw.view("<u8")
        if header[2] != num_processes or header[3] != rank:
            raise FormatError(f"{path}: expected the state of rank {rank} of {num_processes} "
                              f"process(es), found rank {header[3]} of {header[2]}")
        if header[4] not in (0, 1) or header[5] != 0:
            raise FormatError(f"{path}: expected use_master_weights 0 or 1 and should_shuffle 0 "
                              f"(llm.c's shuffled-loader payload is not read; llmcu keeps its own "
                              f"shuffle state in [49:53]), found {header[4]} and {header[5]}")
        nM = num_parameters if header[4] == 1 else 0  # master weights follow v
        ext = header[40]
        if ext not in (0, TRAIN_STATE_EXTENSION):
            raise FormatError(f"{path}: unknown llmcu state extension: expected "
                              f"{TRAIN_STATE_EXTENSION} (or 0, llm.c), found {ext}")
        if ext and int(u64[22]) != num_parameters:
            raise FormatError(f"{path}: state for {int(u64[22])} parameters, expected "
                              f"{num_parameters} (the model's)")
        nL, nN, nR = (header[46], header[47], header[48]) if ext else (0, 0, 0)
        if min(nL, nN, nR) < 0:
            raise FormatError(f"{path}: bad state header: negative lengths {nL}, {nN}, {nR}")
        _check_size(f, path, HEADER_BYTES + 8 * num_parameters + 4 * nM + 8 * (nL + nN) + nR,
                    f"{num_parameters} parameters' m and v, {nM} master weights, {nL}+{nN} "
                    f"window values, {nR} RNG bytes")
        m = _read_array(f, "<f4", num_parameters)
        v = _read_array(f, "<f4", num_parameters)
        master = _read_array(f, "<f4", nM) if nM else None
        loss_w = [float(x) for x in _read_array(f, "<f8", nL)]
        norm_w = [float(x) for x in _read_array(f, "<f8", nN)]
        rng = f.read(nR)
    sample = int(u64[16])
    try:
        rng_state = json.loads(rng.decode()) if nR else None
    except ValueError as e:
        raise FormatError(f"{path}: the RNG state is not valid JSON: {e}") from e
    return TrainState(step=header[10], m=m, v=v,
                      loader={"shard_index": int(u64[15]),
                              "sample_index": -1 if sample == 2**64 - 1 else sample,
                              "epoch": int(u64[25]), "shuffle": bool(header[49]),
                              **({"seed": header[52]} if header[49] else {})},
                      B=header[41], T=header[42], window=header[43],
                      loss_window=loss_w, norm_window=norm_w, rng_state=rng_state,
                      num_processes=header[2], rank=header[3], master=master)


# ----------------------------------------------------------------------------
# eval files (llm.c's dev/data/data_common.py write_evalfile, dataloader.h EvalLoader):
# multiple-choice examples such as HellaSwag. After the header (magic, version,
# num examples, longest example in bytes) every example is a uint16 stream:
#   65535 (START_EXAMPLE), its size in bytes (this stream included), its index,
#   label, num completions, num ctx tokens, ctx tokens, then per completion
#   its num tokens and tokens.

EVAL_MAGIC = 20240522
EVAL_VERSION = 1
EVAL_START_EXAMPLE = 0xFFFF
_EVAL_FIXED = 6  # uint16 fields of an example before the ctx tokens (the ctx count included)


@dataclass
class EvalExample:
    index: int
    label: int
    ctx_tokens: list[int]
    ending_tokens: list[list[int]]


def _eval_stream(idx: int, label: int, ctx, endings) -> list[int]:
    ctx = [int(t) for t in ctx]
    endings = [[int(t) for t in e] for e in endings]
    if not endings:
        raise ValueError(f"write_evalfile: example {idx} has no completions")
    if not 0 <= int(label) < len(endings):
        raise ValueError(f"write_evalfile: example {idx}: label {label} is not in "
                         f"[0, {len(endings)}) (its number of completions)")
    for what, toks in [("context", ctx)] + [(f"completion {i}", e) for i, e in enumerate(endings)]:
        if any(not 0 <= t < EVAL_START_EXAMPLE for t in toks):
            raise ValueError(f"write_evalfile: example {idx}: {what} token ids must be in [0, 65535)")
    stream = [EVAL_START_EXAMPLE, 0, idx, int(label), len(endings), len(ctx)] + ctx
    for e in endings:
        stream += [len(e)] + e
    if 2 * len(stream) >= 2**16:
        raise ValueError(f"write_evalfile: example {idx} is {2 * len(stream)} bytes; "
                         f"the format allows < 65536")
    stream[1] = 2 * len(stream)
    return stream


def write_evalfile(path, examples) -> None:
    """Write an llm.c eval file. examples: dicts with "label", "ctx_tokens" and
    "ending_tokens" (llm.c's render_example data) or EvalExample; an example's
    index is its position in the list, as in llm.c."""
    examples = list(examples)
    if not 0 < len(examples) < 2**16:
        raise ValueError(f"write_evalfile: expected 1..65535 examples, found {len(examples)}")
    stream: list[int] = []
    longest = 0
    for idx, ex in enumerate(examples):
        if isinstance(ex, EvalExample):
            label, ctx, endings = ex.label, ex.ctx_tokens, ex.ending_tokens
        else:
            label, ctx, endings = ex["label"], ex["ctx_tokens"], ex["ending_tokens"]
        s = _eval_stream(idx, label, ctx, endings)
        longest = max(longest, s[1])
        stream += s
    with atomic_write(path) as f:
        f.write(_make_header(EVAL_MAGIC, EVAL_VERSION, len(examples), longest))
        f.write(np.asarray(stream, dtype="<u2").tobytes())


def read_evalfile(path) -> list[EvalExample]:
    """Read and check an llm.c eval file: header, every example's delimiter,
    size and counts, the number of examples and the longest-example field."""
    path = os.fspath(path)
    what = "llm.c eval file"
    with open(path, "rb") as f:
        header = _read_header(f, path, EVAL_MAGIC, (EVAL_VERSION,), what,
                              hint="`llmcu prepare hellaswag` writes data/hellaswag/hellaswag_val.bin")
        rest = f.read()
    num, longest = header[2], header[3]
    if num < 0 or not 0 <= longest < 2**16:
        raise FormatError(f"{path}: bad {what} header: expected num examples >= 0 and longest "
                          f"example bytes in [0, 65536), found {num} and {longest}")
    if len(rest) % 2:
        raise FormatError(f"{path}: file is truncated: the example stream has an odd number "
                          f"of bytes ({len(rest)}), expected uint16 values")
    s = np.frombuffer(rest, dtype="<u2").astype(np.int64)
    examples: list[EvalExample] = []
    pos, found_longest = 0, 0
    while pos < s.size:
        k = len(examples)
        where = f"{path}: example {k} (at byte {HEADER_BYTES + 2 * pos})"
        if k == num:
            raise FormatError(f"{path}: file is oversized: the header says {num} examples, found "
                              f"{2 * (s.size - pos)} trailing bytes after them")
        if s.size - pos < _EVAL_FIXED:
            raise FormatError(f"{where}: file is truncated inside the example header")
        if s[pos] != EVAL_START_EXAMPLE:
            raise FormatError(f"{where}: expected the START_EXAMPLE delimiter 65535, found {s[pos]}")
        nbytes, index, label, ncomp, nctx = (int(v) for v in s[pos + 1:pos + 6])
        n = nbytes // 2
        if nbytes % 2 or n < _EVAL_FIXED or pos + n > s.size:
            kind = "truncated" if pos + n > s.size and n >= _EVAL_FIXED else "corrupt"
            raise FormatError(f"{where}: file is {kind}: example size {nbytes} bytes, "
                              f"{2 * (s.size - pos)} bytes left in the file")
        ex = s[pos:pos + n]
        q = _EVAL_FIXED
        ctx = ex[q:q + nctx]
        q += nctx
        endings = []
        for _ in range(ncomp):
            if q >= n:
                break
            m = int(ex[q])
            endings.append(ex[q + 1:q + 1 + m])
            q += 1 + m
        if ncomp < 1 or len(endings) != ncomp or q != n or len(ctx) != nctx:
            raise FormatError(f"{where}: corrupt example: {nctx} context tokens and {ncomp} "
                              f"completions do not fill its {nbytes} bytes")
        if not 0 <= label < ncomp:
            raise FormatError(f"{where}: label {label} is not in [0, {ncomp})")
        examples.append(EvalExample(index=index, label=label, ctx_tokens=ctx.tolist(),
                                    ending_tokens=[e.tolist() for e in endings]))
        found_longest = max(found_longest, nbytes)
        pos += n
    if len(examples) != num:
        raise FormatError(f"{path}: file is truncated: the header says {num} examples, found "
                          f"{len(examples)}")
    if found_longest != longest:
        raise FormatError(f"{path}: bad {what} header: longest example is {longest} bytes, "
                          f"the examples' longest is {found_longest}")
    return examples


# ----------------------------------------------------------------------------
# Llama model checkpoint: llm.c's Llama 3 layout (train_llama3.py write_model)
#
# 2048-byte header: 256 int32 then 256 float32, little-endian.
#   int   [0] 20240803  [1] version 3 (fp32) / 5 (bf16)  [2] maxT  [3] V  [4] L  [5] NH
#         [6] NKV  [7] C  [8] multiple_of  [9] use_scaled_rope (1: Llama 3's RoPE scaling)
#         [10] [11] llm.c's Llama major.minor version (written 3, 1; not read)
#         llmcu's fields, 0 in llm.c's files: [12] 1 = present  [13] H  [14] hs
#         [15] tied embeddings  [16] mlp (0 swiglu, 1 geglu)  [17] Vp
#   float [0] ffn_dim_multiplier (0: none)  [1] norm_eps  [2] rope_theta
#         llmcu's: [3] norm_weight_offset  [4] embed_scale  [5:9] the RoPE scaling (factor,
#         low_freq_factor, high_freq_factor, original context); llm.c always applies
#         Llama 3.1's (8, 1, 4, 8192), which is what a file without llmcu's fields means
# payload, llm.c's order and shapes: wte (V,C), ln1w (L,C), qkvw (L,(NH+2*NKV)*hs,C),
#   attprojw (L,C,NH*hs), ln2w (L,C), fc = up (L,H,C), fc2 = gate (L,H,C), fcprojw (L,C,H),
#   lnfw (C,), lm_head (V,C) (always written, as llm.c reads it; a copy of wte when tied).
# The q and k rows of qkvw are stored in Meta's order, where RoPE pairs adjacent
# elements (2i, 2i+1) of a head, as llm.c's train_llama3.py writes them (it
# un-permutes Hugging Face weights); llmcu computes RoPE in Hugging Face's
# rotate_half order (i, i + hs/2), so read and write permute those rows.
# The vocabulary's padded rows V..Vp-1 (zero) are not stored.

LLAMA_MODEL_MAGIC = 20240803
LLAMA_HEADER_BYTES = 2 * HEADER_BYTES
_LLAMA_MLPS = ("swiglu", "geglu")


def _peek_magic(path) -> int | None:
    with open(path, "rb") as f:
        raw = f.read(4)
    return int(np.frombuffer(raw, dtype="<i4")[0]) if len(raw) == 4 else None


def _hf_to_meta_rows(w, n_heads: int, hs: int):
    """(L, n_heads*hs, C) q or k rows from rotate_half order to Meta's interleaved order."""
    L, _, C = w.shape
    return w.reshape(L, n_heads, 2, hs // 2, C).transpose(0, 1, 3, 2, 4).reshape(L, n_heads * hs, C)


def _meta_to_hf_rows(w, n_heads: int, hs: int):
    L, _, C = w.shape
    return w.reshape(L, n_heads, hs // 2, 2, C).transpose(0, 1, 3, 2, 4).reshape(L, n_heads * hs, C)


def _llama_file_tensors(config, views):
    """[(name, array)] in the file's order and layout (llm.c's) from llmcu's named views."""
    V, NH, NKV, hs, H = (config.vocab_size, config.num_heads, config.num_kv_heads,
                         config.head_dim, config.hidden_dim)
    qkv = views["qkvw"]
    q, k, v = qkv[:, :NH * hs], qkv[:, NH * hs:(NH + NKV) * hs], qkv[:, (NH + NKV) * hs:]
    qkv_file = np.concatenate([_hf_to_meta_rows(q, NH, hs), _hf_to_meta_rows(k, NKV, hs), v], axis=1)
    head = views["wte"] if config.tie_embeddings else views["lm_head"]
    return [("wte", views["wte"][:V]), ("ln1w", views["ln1w"]), ("qkvw", qkv_file),
            ("attprojw", views["attprojw"]), ("ln2w", views["ln2w"]),
            ("fc (up)", views["fcw"][:, H:]), ("fc2 (gate)", views["fcw"][:, :H]),
            ("fcprojw", views["fcprojw"]), ("lnfw", views["lnfw"]), ("lm_head", head[:V])]


def write_llama_model(path, config, params: np.ndarray, dtype: str = "float32") -> None:
    """Write a Llama/Gemma LlamaConfig model in llm.c's Llama 3 layout (above), atomically."""
    from .config import parameter_views
    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"write_llama_model: dtype must be one of {sorted(_MODEL_DTYPES)}, found {dtype!r}")
    _check_float32("write_llama_model: params", params, size=config.num_parameters())
    c = config
    ints = np.zeros(HEADER_INTS, dtype="<i4")
    ints[:18] = (LLAMA_MODEL_MAGIC, _MODEL_DTYPES[dtype], c.max_seq_len, c.vocab_size, c.num_layers,
                 c.num_heads, c.num_kv_heads, c.channels, c.multiple_of,
                 int(c.rope_scaling is not None), 3, 1,
                 1, c.hidden_dim, c.head_dim, int(c.tie_embeddings), _LLAMA_MLPS.index(c.mlp),
                 c.padded_vocab_size)
    floats = np.zeros(HEADER_INTS, dtype="<f4")
    floats[:5] = (c.ffn_dim_multiplier or 0.0, c.norm_eps, c.rope_theta, c.norm_weight_offset,
                  c.embed_scale)
    if c.rope_scaling is not None:
        floats[5:9] = c.rope_scaling
    tensors = _llama_file_tensors(c, parameter_views(c, params))
    with atomic_write(path) as f:
        f.write(ints.tobytes())
        f.write(floats.tobytes())
        for _, t in tensors:
            t = np.ascontiguousarray(t)
            if dtype == "bfloat16":
                f.write(float32_to_bf16_bits(t).astype("<u2", copy=False).tobytes())
            else:
                f.write(t.astype("<f4", copy=False).tobytes())


def _llama_config_from_header(path, ints, floats):
    from .llama_config import LlamaConfig
    maxT, V, L, NH, NKV, C, multiple_of, scaled_rope = ints[2:10]
    for name, value in {"maxT": maxT, "V": V, "L": L, "NH": NH, "NKV": NKV, "C": C,
                        "multiple_of": multiple_of}.items():
        if value <= 0:
            raise FormatError(f"{path}: bad Llama model header: expected {name} > 0, found {value}")
    if scaled_rope not in (0, 1):
        raise FormatError(f"{path}: bad Llama model header: use_scaled_rope is {scaled_rope}, "
                          f"expected 0 or 1")
    fields = dict(max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=NH, num_kv_heads=NKV,
                  channels=C, multiple_of=multiple_of,
                  ffn_dim_multiplier=float(floats[0]) if floats[0] != 0 else None,
                  norm_eps=float(floats[1]), rope_theta=float(floats[2]), tie_embeddings=False)
    if scaled_rope:
        from .cpu.rope import LLAMA31_SCALING
        llmcu_scaling = ints[12] == 1 and floats[5] > 0
        fields["rope_scaling"] = (tuple(float(x) for x in floats[5:8]) + (int(floats[8]),)
                                  if llmcu_scaling else LLAMA31_SCALING)
    if ints[12] == 1:  # llmcu's fields
        if not 0 <= ints[16] < len(_LLAMA_MLPS):
            raise FormatError(f"{path}: bad Llama model header: mlp kind {ints[16]}, expected 0 or 1")
        fields.update(hidden_dim=ints[13], head_dim=ints[14], tie_embeddings=bool(ints[15]),
                      mlp=_LLAMA_MLPS[ints[16]], padded_vocab_size=ints[17],
                      norm_weight_offset=float(floats[3]), embed_scale=float(floats[4]))
    elif ints[12] != 0:
        raise FormatError(f"{path}: bad Llama model header: slot 12 is {ints[12]}, expected 0 "
                          f"(llm.c) or 1 (llmcu's fields present)")
    try:
        return LlamaConfig(**fields)
    except ValueError as e:
        raise FormatError(f"{path}: bad Llama model header: {e}") from None


def read_llama_header(path):
    """The LlamaConfig of a Llama model file, from its header alone."""
    path = os.fspath(path)
    what = "llm.c Llama 3 model checkpoint"
    with open(path, "rb") as f:
        ints = _read_header(f, path, LLAMA_MODEL_MAGIC, (MODEL_VERSION_FP32, MODEL_VERSION_BF16), what)
        raw = f.read(HEADER_BYTES)
        if len(raw) < HEADER_BYTES:
            raise FormatError(f"{path}: file is truncated: expected a {LLAMA_HEADER_BYTES}-byte "
                              f"{what} header, found a {HEADER_BYTES + len(raw)}-byte file")
    return _llama_config_from_header(path, ints, np.frombuffer(raw, dtype="<f4"))


def read_llama_model(path):
    """Read a Llama model file: (LlamaConfig, flat float32 params in llmcu's layout)."""
    from .config import parameter_views
    path = os.fspath(path)
    config = read_llama_header(path)
    version = _peek_header_version(path)
    c = config
    V, L, C, H, hs, NH, NKV = (c.vocab_size, c.num_layers, c.channels, c.hidden_dim, c.head_dim,
                               c.num_heads, c.num_kv_heads)
    sizes = [V * C, L * C, L * c.qkv_channels * C, L * C * c.attn_channels, L * C, L * H * C,
             L * H * C, L * C * H, C, V * C]
    total = sum(sizes)
    itemsize = 2 if version == MODEL_VERSION_BF16 else 4
    with open(path, "rb") as f:
        _check_size(f, path, LLAMA_HEADER_BYTES + total * itemsize,
                    f"{total} parameters (version {version}, {config})")
        f.seek(LLAMA_HEADER_BYTES)
        if version == MODEL_VERSION_BF16:
            data = bf16_bits_to_float32(_read_array(f, "<u2", total))
        else:
            data = _read_array(f, "<f4", total)
    parts, offset = [], 0
    for n in sizes:
        parts.append(data[offset:offset + n])
        offset += n
    wte, ln1, qkv, attproj, ln2, up, gate, fcproj, lnf, head = parts
    params = np.zeros(config.num_parameters(), dtype=np.float32)
    p = parameter_views(config, params)
    p["wte"][:V] = wte.reshape(V, C)
    p["ln1w"][...] = ln1.reshape(L, C)
    qkv = qkv.reshape(L, c.qkv_channels, C)
    p["qkvw"][:, :NH * hs] = _meta_to_hf_rows(qkv[:, :NH * hs], NH, hs)
    p["qkvw"][:, NH * hs:(NH + NKV) * hs] = _meta_to_hf_rows(qkv[:, NH * hs:(NH + NKV) * hs], NKV, hs)
    p["qkvw"][:, (NH + NKV) * hs:] = qkv[:, (NH + NKV) * hs:]
    p["attprojw"][...] = attproj.reshape(L, C, c.attn_channels)
    p["ln2w"][...] = ln2.reshape(L, C)
    p["fcw"][:, :H] = gate.reshape(L, H, C)
    p["fcw"][:, H:] = up.reshape(L, H, C)
    p["fcprojw"][...] = fcproj.reshape(L, C, H)
    p["lnfw"][...] = lnf
    if config.tie_embeddings:
        if not np.array_equal(head, wte):
            raise FormatError(f"{path}: the header says the embeddings are tied, but lm_head "
                              f"differs from wte")
    else:
        p["lm_head"][:V] = head.reshape(V, C)
    return config, params


def _peek_header_version(path) -> int:
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(8), dtype="<i4")[1])
