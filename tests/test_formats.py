"""llm.c's binary formats: round trips, header bytes, bf16 rounding, bad files,
atomic writes."""

import contextlib
import os
import struct

import numpy as np
import pytest
import torch

from llmcu import formats
from llmcu.config import GPT2Config
from llmcu.formats import FormatError

TINY = GPT2Config(max_seq_len=8, vocab_size=50, num_layers=2, num_heads=2, channels=8)


def tiny_params(config=TINY, seed=0):
    """Random parameters in llm.c's layout, wte's padded rows zero."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(config.num_parameters()).astype(np.float32)
    C, V, Vp = config.channels, config.vocab_size, config.padded_vocab_size
    params[V * C:Vp * C] = 0.0
    return params


def header_ints(path, fmt="<256i"):
    return struct.unpack_from(fmt, open(path, "rb").read(1024))


def write_raw(path, header, payload=b"", fmt="<256i"):
    """A file with an arbitrary header (list of ints, zero-padded to 256)."""
    ints = list(header) + [0] * (256 - len(header))
    with open(path, "wb") as f:
        f.write(struct.pack(fmt, *ints))
        f.write(payload)
    return path


def expect_format_error(fn, path, *fragments):
    """fn() raises FormatError whose message names the file and every fragment."""
    with pytest.raises(FormatError) as info:
        fn()
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


# ----------------------------------------------------------------------------
# bf16

def torch_bf16_bits(values):
    t = torch.tensor(np.asarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def as_f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def test_bf16_random_values_match_torch():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-30, 30, 100_000))).astype(np.float32)
    np.testing.assert_array_equal(formats.float32_to_bf16_bits(x), torch_bf16_bits(x))


def test_bf16_ties_round_to_even():
    # 1.0 + half a bf16 ulp: tie, round down to even (1.0); 1.0+1ulp + half: tie, round up
    ties = as_f32([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000])
    expected = np.array([0x3F80, 0x3F82, 0xBF80, 0xBF82], dtype=np.uint16)
    np.testing.assert_array_equal(formats.float32_to_bf16_bits(ties), expected)
    np.testing.assert_array_equal(torch_bf16_bits(ties), expected)
    # just above and below a tie
    near = as_f32([0x3F808001, 0x3F807FFF])
    np.testing.assert_array_equal(formats.float32_to_bf16_bits(near), [0x3F81, 0x3F80])
    np.testing.assert_array_equal(formats.float32_to_bf16_bits(near), torch_bf16_bits(near))


def test_bf16_inf_and_overflow():
    x = np.array([np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max],
                 dtype=np.float32)
    bits = formats.float32_to_bf16_bits(x)
    np.testing.assert_array_equal(bits, [0x7F80, 0xFF80, 0x7F80, 0xFF80])  # max rounds to inf
    np.testing.assert_array_equal(bits, torch_bf16_bits(x))


def test_bf16_nan_stays_quiet_nan():
    # payloads that plain rounding would carry into the exponent (-> inf) or drop (-> inf)
    nans = as_f32([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF800001, 0x7F80FFFF])
    bits = formats.float32_to_bf16_bits(nans)
    back = formats.bf16_bits_to_float32(bits)
    assert np.isnan(back).all()
    assert (bits & 0x0040).all()  # quiet bit set
    np.testing.assert_array_equal(bits >> 15, [0, 1, 0, 0, 1, 0])  # sign kept
    assert torch.isnan(torch.tensor(nans).to(torch.bfloat16)).all()


def test_bf16_denormals_match_torch():
    x = as_f32([0x00000001, 0x00008000, 0x00018000, 0x00017FFF, 0x007FFFFF, 0x80008001,
                0x00400000, 0x80000000, 0x00000000])
    bits = formats.float32_to_bf16_bits(x)
    np.testing.assert_array_equal(bits, torch_bf16_bits(x))
    np.testing.assert_array_equal(bits, [0x0000, 0x0000, 0x0002, 0x0001, 0x0080, 0x8001,
                                         0x0040, 0x8000, 0x0000])


def test_bf16_bits_to_float32_exact():
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    values = formats.bf16_bits_to_float32(bits)
    assert values.dtype == np.float32
    reference = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(values.view(np.uint32), reference.view(np.uint32))


# ----------------------------------------------------------------------------
# model checkpoint

def test_model_v3_round_trip(tmp_path):
    path = tmp_path / "model.bin"
    params = tiny_params()
    formats.write_model(path, TINY, params)
    assert header_ints(path)[:8] == (20240326, 3, 8, 50, 2, 2, 8, 128)
    assert header_ints(path)[8:] == (0,) * 248
    assert os.path.getsize(path) == 1024 + 4 * TINY.num_parameters()
    raw = np.frombuffer(open(path, "rb").read()[1024:], dtype="<f4")
    np.testing.assert_array_equal(raw, params)  # llm.c order: the flat array as is
    config, back = formats.read_model(path)
    assert config == TINY
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back, params)


def test_model_v5_round_trip_within_bf16_precision(tmp_path):
    path = tmp_path / "model_bf16.bin"
    params = tiny_params()
    formats.write_model(path, TINY, params, dtype="bfloat16")
    assert header_ints(path)[:8] == (20240326, 5, 8, 50, 2, 2, 8, 128)
    assert os.path.getsize(path) == 1024 + 2 * TINY.num_parameters()
    raw = np.frombuffer(open(path, "rb").read()[1024:], dtype="<u2")
    np.testing.assert_array_equal(raw, torch_bf16_bits(params))
    config, back = formats.read_model(path)
    assert config == TINY and back.dtype == np.float32
    np.testing.assert_allclose(back, params, rtol=2.0**-8, atol=0)  # bf16: 8 mantissa bits
    assert not np.array_equal(back, params)  # really rounded


def test_model_v5_bit_exact_for_bf16_values(tmp_path):
    path = tmp_path / "model_bf16.bin"
    params = formats.bf16_bits_to_float32(formats.float32_to_bf16_bits(tiny_params()))
    formats.write_model(path, TINY, params, dtype="bfloat16")
    np.testing.assert_array_equal(formats.read_model(path)[1], params)


def test_write_model_rejects_wrong_size(tmp_path):
    with pytest.raises(ValueError, match=f"{TINY.num_parameters()} elements"):
        formats.write_model(tmp_path / "m.bin", TINY, np.zeros(10, dtype=np.float32))
    assert os.listdir(tmp_path) == []


def test_write_model_rejects_wrong_dtype(tmp_path):
    with pytest.raises(TypeError, match="float32.*float64"):
        formats.write_model(tmp_path / "m.bin", TINY, tiny_params().astype(np.float64))


def test_write_model_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="float16"):
        formats.write_model(tmp_path / "m.bin", TINY, tiny_params(), dtype="float16")


def test_read_model_bad_magic(tmp_path):
    path = write_raw(tmp_path / "m.bin", [1234, 3, 8, 50, 2, 2, 8, 128])
    expect_format_error(lambda: formats.read_model(path), path,
                        "bad magic number", "expected 20240326", "found 1234")


@pytest.mark.parametrize("version", [1, 2, 4, 6])
def test_read_model_unknown_version(tmp_path, version):
    path = write_raw(tmp_path / "m.bin", [20240326, version, 8, 50, 2, 2, 8, 128])
    expect_format_error(lambda: formats.read_model(path), path,
                        "unknown", "version", "expected 3 or 5", f"found {version}")


def test_read_model_truncated_header(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("<2i", 20240326, 3))
    expect_format_error(lambda: formats.read_model(path), path,
                        "truncated", "1024-byte", "found a 8-byte")


# Issue 22: a text file (or any non-llm.c file) given where an llm.c file belongs
# is "not an llm.c ... file" with its first bytes and what to pass instead, at any
# length; only a file that starts with the right magic can be "truncated".
READERS = {
    "model": (lambda p: formats.read_model(p), "llm.c model checkpoint",
              ["20240326", "20240803", "llmcu convert --from-hf"]),
    "model header": (lambda p: formats.read_model_header(p), "llm.c model checkpoint",
                     ["20240326", "20240803"]),
    "debug state": (lambda p: formats.read_debug_state(p, TINY), "llm.c debug state",
                    ["20240327", "train_gpt2.py"]),
    "shard": (lambda p: formats.read_shard(p), "llm.c token shard", ["20240520", "llmcu prepare"]),
    "shard header": (lambda p: formats.read_shard_header(p), "llm.c token shard", ["20240520"]),
    "tokenizer": (lambda p: formats.read_tokenizer_bin(p), "llm.c tokenizer",
                  ["20240328", "llmcu tokenizer"]),
    "train state": (lambda p: formats.read_train_state(p, 10), "training state",
                    ["20240527", "llmcu train -n"]),
    "eval file": (lambda p: formats.read_evalfile(p), "llm.c eval file",
                  ["20240522", "llmcu prepare hellaswag"]),
}


@pytest.mark.parametrize("size", [3, 11, 1023, 5000])
@pytest.mark.parametrize("reader", list(READERS))
def test_a_text_file_is_not_an_llmc_file(tmp_path, reader, size):
    read, what, fragments = READERS[reader]
    path = tmp_path / "notes.bin"
    path.write_bytes((b"hello world\n" * 500)[:size])
    message = expect_format_error(lambda: read(path), path, f"not an {what}", "bad magic number",
                                  "the file starts with b'hel", *fragments)
    assert "truncated" not in message and "\n" not in message, message


def test_another_llmc_file_is_named_by_its_magic(tmp_path):
    shard = tmp_path / "s.bin"
    formats.write_shard(shard, [1, 2, 3])
    message = expect_format_error(lambda: formats.read_model(shard), shard,
                                  "not an llm.c model checkpoint",
                                  "found 20240520 (an llm.c token shard)")
    assert "starts with" not in message


@pytest.mark.parametrize("reader", list(READERS))
def test_a_short_file_with_the_right_start_is_truncated(tmp_path, reader):
    """The right magic (or its first bytes), then the end: truncated, not a wrong kind."""
    read, what, fragments = READERS[reader]
    magic = next(f for f in fragments if f.isdigit())
    whole = tmp_path / "m.bin"
    whole.write_bytes(struct.pack("<2i", int(magic), 1) + b"\0" * 100)
    expect_format_error(lambda: read(whole), whole, "truncated", f"1024-byte {what} header")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(struct.pack("<i", int(magic))[:2])
    expect_format_error(lambda: read(cut), cut, "truncated", "found a 2-byte file")


def test_read_model_truncated_params(tmp_path):
    path = tmp_path / "m.bin"
    formats.write_model(path, TINY, tiny_params())
    size = os.path.getsize(path)
    os.truncate(path, size - 4)
    expect_format_error(lambda: formats.read_model(path), path,
                        "truncated", f"expected {size} bytes", f"found {size - 4}")


def test_read_model_oversized(tmp_path):
    path = tmp_path / "m.bin"
    formats.write_model(path, TINY, tiny_params(), dtype="bfloat16")
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 6)
    expect_format_error(lambda: formats.read_model(path), path,
                        "oversized", f"expected {size} bytes", f"found {size + 6}")


@pytest.mark.parametrize("fields, fragments", [
    ([8, 50, 2, 2, 8, 40], ["Vp >= V", "Vp=40", "V=50"]),
    ([8, 50, 2, 3, 8, 128], ["C divisible by NH", "C=8", "NH=3"]),
    ([8, 50, 0, 2, 8, 128], ["L > 0", "found 0"]),
    ([-1, 50, 2, 2, 8, 128], ["maxT > 0", "found -1"]),
])
def test_read_model_bad_header_fields(tmp_path, fields, fragments):
    path = write_raw(tmp_path / "m.bin", [20240326, 3] + fields)
    expect_format_error(lambda: formats.read_model(path), path, *fragments)


# ----------------------------------------------------------------------------
# debug state

def debug_inputs(config=TINY, B=2, T=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    y = rng.integers(0, config.vocab_size, (B, T)).astype(np.int32)
    logits = rng.standard_normal((B, T, config.vocab_size)).astype(np.float32)
    grads = tiny_params(config, seed=seed + 1)
    return x, y, logits, 3.25, grads


def test_debug_state_round_trip(tmp_path):
    path = tmp_path / "debug.bin"
    x, y, logits, loss, grads = debug_inputs()
    formats.write_debug_state(path, TINY, x, y, logits, loss, grads)
    assert header_ints(path)[:4] == (20240327, 2, 2, 4)
    raw = open(path, "rb").read()
    assert len(raw) == 1024 + 4 * (2 * 8 + 8 * 50 + 1 + TINY.num_parameters())
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4", 8, 1024).reshape(2, 4), x)
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4", 8, 1024 + 32).reshape(2, 4), y)
    assert struct.unpack_from("<f", raw, 1024 + 64 + 4 * 400) == (3.25,)
    state = formats.read_debug_state(path, TINY)
    np.testing.assert_array_equal(state.x, x)
    np.testing.assert_array_equal(state.y, y)
    np.testing.assert_array_equal(state.logits, logits)
    assert state.loss == 3.25 and isinstance(state.loss, float)
    np.testing.assert_array_equal(state.grads, grads)
    assert state.x.dtype == np.int32 and state.logits.dtype == np.float32


def test_debug_state_bad_magic(tmp_path):
    path = write_raw(tmp_path / "d.bin", [20240326, 2, 2, 4])
    expect_format_error(lambda: formats.read_debug_state(path, TINY), path,
                        "bad magic number", "expected 20240327", "found 20240326")


def test_debug_state_unknown_version(tmp_path):
    path = write_raw(tmp_path / "d.bin", [20240327, 1, 2, 4])
    expect_format_error(lambda: formats.read_debug_state(path, TINY), path,
                        "version", "expected 2", "found 1")


def test_debug_state_truncated(tmp_path):
    path = tmp_path / "d.bin"
    formats.write_debug_state(path, TINY, *debug_inputs())
    size = os.path.getsize(path)
    os.truncate(path, size - 1)
    expect_format_error(lambda: formats.read_debug_state(path, TINY), path,
                        "truncated", f"expected {size} bytes", f"found {size - 1}")


def test_debug_state_oversized(tmp_path):
    path = tmp_path / "d.bin"
    formats.write_debug_state(path, TINY, *debug_inputs())
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 4)
    expect_format_error(lambda: formats.read_debug_state(path, TINY), path,
                        "oversized", f"expected {size} bytes", f"found {size + 4}")


def test_debug_state_other_config_is_a_size_mismatch(tmp_path):
    path = tmp_path / "d.bin"
    formats.write_debug_state(path, TINY, *debug_inputs())
    other = GPT2Config(max_seq_len=8, vocab_size=50, num_layers=3, num_heads=2, channels=8)
    expect_format_error(lambda: formats.read_debug_state(path, other), path,
                        "truncated", "B=2, T=4")


def test_write_debug_state_rejects_wrong_logits_shape(tmp_path):
    x, y, logits, loss, grads = debug_inputs()
    padded = np.zeros((2, 4, TINY.padded_vocab_size), dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(2, 4, 50\)"):
        formats.write_debug_state(tmp_path / "d.bin", TINY, x, y, padded, loss, grads)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# token shards

def test_shard_round_trip(tmp_path):
    path = tmp_path / "shard.bin"
    tokens = [50256, 0, 1, 15496, 995, 50255]
    formats.write_shard(path, tokens)
    raw = open(path, "rb").read()
    assert struct.unpack_from("<3i", raw) == (20240520, 1, len(tokens))
    assert raw[12:1024] == bytes(1012)
    assert len(raw) == 1024 + 2 * len(tokens)
    np.testing.assert_array_equal(np.frombuffer(raw, "<u2", offset=1024), tokens)
    assert formats.read_shard_header(path) == len(tokens)
    back = formats.read_shard(path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, tokens)


def test_shard_accepts_numpy_int_arrays(tmp_path):
    for dtype in (np.uint16, np.int32, np.int64):
        tokens = np.arange(0, 60000, 7, dtype=dtype)
        formats.write_shard(tmp_path / "s.bin", tokens)
        np.testing.assert_array_equal(formats.read_shard(tmp_path / "s.bin", vocab_size=None), tokens)


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    formats.write_shard(path, [])
    assert formats.read_shard_header(path) == 0
    assert formats.read_shard(path).shape == (0,)


@pytest.mark.parametrize("bad, position", [(65536, 2), (-1, 2), (10**9, 2)])
def test_write_shard_rejects_ids_outside_uint16(tmp_path, bad, position):
    with pytest.raises(ValueError, match=rf"\[0, 65535\].*found {bad} at position {position}"):
        formats.write_shard(tmp_path / "s.bin", [1, 2, bad, 3])
    assert os.listdir(tmp_path) == []


def test_write_shard_rejects_floats(tmp_path):
    with pytest.raises(TypeError, match="float64"):
        formats.write_shard(tmp_path / "s.bin", [1.0, 2.5])


def test_read_shard_token_id_beyond_vocab(tmp_path):
    path = tmp_path / "s.bin"
    formats.write_shard(path, [50256, 3, 50257, 60000])
    expect_format_error(lambda: formats.read_shard(path), path,
                        "expected ids < 50257", "found 50257 at position 2")
    expect_format_error(lambda: formats.read_shard(path, vocab_size=10), path,
                        "expected ids < 10", "found 50256 at position 0")
    np.testing.assert_array_equal(formats.read_shard(path, vocab_size=None), [50256, 3, 50257, 60000])
    assert formats.read_shard_header(path) == 4  # the cheap check does not look at ids


def test_read_shard_bad_magic(tmp_path):
    path = write_raw(tmp_path / "s.bin", [1234, 1, 0])
    for reader in (formats.read_shard, formats.read_shard_header):
        expect_format_error(lambda: reader(path), path,
                            "bad magic number: expected 20240520 (llm.c token shard) or 20240801 "
                            "(llm.c token shard (uint32)), found 1234")


def test_read_shard_unknown_version(tmp_path):
    path = write_raw(tmp_path / "s.bin", [20240520, 7, 0])
    for reader in (formats.read_shard, formats.read_shard_header):
        expect_format_error(lambda: reader(path), path, "version", "expected 1", "found 7")


def test_read_shard_truncated(tmp_path):
    path = write_raw(tmp_path / "s.bin", [20240520, 1, 10], payload=b"\0" * 18)
    for reader in (formats.read_shard, formats.read_shard_header):
        expect_format_error(lambda: reader(path), path,
                            "truncated", "expected 1044 bytes for 10 tokens", "found 1042")


def test_read_shard_truncated_header(tmp_path):
    path = tmp_path / "s.bin"
    path.write_bytes(b"")
    expect_format_error(lambda: formats.read_shard_header(path), path,
                        "truncated", "1024-byte", "found a 0-byte")


def test_read_shard_oversized(tmp_path):
    path = write_raw(tmp_path / "s.bin", [20240520, 1, 10], payload=b"\0" * 21)
    for reader in (formats.read_shard, formats.read_shard_header):
        expect_format_error(lambda: reader(path), path,
                            "oversized", "expected 1044 bytes", "found 1045")


def test_read_shard_negative_count(tmp_path):
    path = write_raw(tmp_path / "s.bin", [20240520, 1, -5])
    expect_format_error(lambda: formats.read_shard_header(path), path, "ntok >= 0", "found -5")


# ----------------------------------------------------------------------------
# tokenizer file

TOKENS = [b"a", b"bc", b"\xff\xfe", b"<|endoftext|>", b"x" * 255]


def test_tokenizer_bin_round_trip(tmp_path):
    path = tmp_path / "tok.bin"
    formats.write_tokenizer_bin(path, TOKENS, eot=3)
    raw = open(path, "rb").read()
    assert struct.unpack_from("<4I", raw) == (20240328, 2, 5, 3)
    assert raw[1024:1032] == b"\x01a\x02bc\x02\xff\xfe"
    assert len(raw) == 1024 + sum(1 + len(t) for t in TOKENS)
    assert formats.read_tokenizer_bin(path) == (TOKENS, 3)


def test_tokenizer_bin_bad_magic(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240327, 2, 1, 0], b"\x01a", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "bad magic number", "expected 20240328", "found 20240327")


def test_tokenizer_bin_unknown_version(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 1, 1, 0], b"\x01a", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "version", "expected 2", "found 1")


def test_tokenizer_bin_truncated_missing_token(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 2, 3, 0], b"\x01a\x01b", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "truncated", "expected 3 tokens", "found 2")


def test_tokenizer_bin_length_past_end(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 2, 2, 0], b"\x01a\x05bc", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "truncated", "token 1 expected 5 bytes", "found 2")


def test_tokenizer_bin_zero_length(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 2, 2, 0], b"\x01a\x00", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "token 1", "expected a length of 1..255", "found 0")


def test_tokenizer_bin_oversized(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 2, 1, 0], b"\x01ab", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path,
                        "oversized", "expected 1026 bytes", "found 1027")


def test_tokenizer_bin_eot_out_of_range(tmp_path):
    path = write_raw(tmp_path / "t.bin", [20240328, 2, 1, 1], b"\x01a", fmt="<256I")
    expect_format_error(lambda: formats.read_tokenizer_bin(path), path, "eot < n (1)", "eot=1")


@pytest.mark.parametrize("bad", [b"", b"x" * 256])
def test_write_tokenizer_bin_rejects_bad_token_length(tmp_path, bad):
    with pytest.raises(ValueError, match=f"token 1 must be 1..255 bytes, found {len(bad)}"):
        formats.write_tokenizer_bin(tmp_path / "t.bin", [b"a", bad], eot=0)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# atomic writes

def test_atomic_write_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "shard.bin"
    formats.write_shard(path, [1, 2, 3])
    assert formats.read_shard_header(path) == 3
    assert os.listdir(path.parent) == ["shard.bin"]


def test_atomic_write_exception_keeps_old_file(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="boom"):
        with formats.atomic_write(path) as f:
            f.write(b"new contents, half")
            assert leftovers(tmp_path, ["file.bin"])  # the temp file is beside it
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old contents"
    assert leftovers(tmp_path, ["file.bin"]) == []


def test_rejected_model_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.bin"
    formats.write_model(path, TINY, tiny_params(seed=0))
    before = path.read_bytes()
    with pytest.raises(ValueError):
        formats.write_model(path, TINY, tiny_params(seed=1)[:-1])
    assert path.read_bytes() == before
    assert leftovers(tmp_path, ["model.bin"]) == []


def test_failed_write_after_header_keeps_old_file(tmp_path, monkeypatch):
    """A write that dies half-way through the file (after the header)."""
    path = tmp_path / "shard.bin"
    formats.write_shard(path, [1, 2, 3])
    before = path.read_bytes()
    real_atomic_write = formats.atomic_write

    class FailingFile:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                raise OSError("disk full after the header")
            return self.f.write(data)

    @contextlib.contextmanager
    def failing_atomic_write(p):
        with real_atomic_write(p) as f:
            yield FailingFile(f)

    monkeypatch.setattr(formats, "atomic_write", failing_atomic_write)
    with pytest.raises(OSError, match="disk full after the header"):
        formats.write_shard(path, [4, 5, 6, 7])
    assert path.read_bytes() == before
    assert leftovers(tmp_path, ["shard.bin"]) == []


# ----------------------------------------------------------------------------
# uint32 shards (llm.c's Llama 3 data) and the loader's shuffle state

def test_uint32_shard_round_trip(tmp_path):
    path = tmp_path / "l3.bin"
    tokens = np.array([128000, 9906, 1917, 0, 128255], dtype=np.int64)
    formats.write_shard(path, tokens, dtype="uint32")
    header = np.fromfile(path, dtype="<i4", count=3)
    assert list(header) == [20240801, 7, 5] and path.stat().st_size == 1024 + 4 * 5
    assert formats.read_shard_info(path) == (5, "uint32")
    back = formats.read_shard(path, vocab_size=128256)
    assert back.dtype == np.uint32 and back.tolist() == tokens.tolist()
    expect_format_error(lambda: formats.read_shard(path), path,
                        "expected ids < 50257", "found 128000 at position 0")
    with pytest.raises(ValueError, match=r"\[0, 65535\].*found 128000"):
        formats.write_shard(tmp_path / "u16.bin", tokens)  # uint16 by default
    with pytest.raises(ValueError, match="uint16 or uint32"):
        formats.write_shard(tmp_path / "x.bin", tokens, dtype="int64")


def test_uint32_shard_bad_version_and_size(tmp_path):
    path = write_raw(tmp_path / "s.bin", [20240801, 1, 0])
    expect_format_error(lambda: formats.read_shard_header(path), path,
                        "version", "expected 7", "found 1")
    path = write_raw(tmp_path / "t.bin", [20240801, 7, 10], payload=b"\0" * 20)
    expect_format_error(lambda: formats.read_shard_header(path), path,
                        "truncated", "expected 1064 bytes for 10 tokens (uint32)", "found 1044")


def test_train_state_keeps_the_shuffle_position(tmp_path):
    m = np.arange(5, dtype=np.float32)
    loader = {"shard_index": 3, "sample_index": 17, "epoch": 2**33 + 1, "shuffle": True, "seed": 42}
    formats.write_train_state(tmp_path / "s.bin", formats.TrainState(step=4, m=m, v=m, loader=loader))
    h = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=256)
    assert h[5] == 0 and h[49] == 1  # llm.c's should_shuffle stays 0: its payload is not written
    assert formats.read_train_state(tmp_path / "s.bin", 5).loader == loader
    plain = {"shard_index": 0, "sample_index": -1}  # an older llmcu state: no shuffle fields
    formats.write_train_state(tmp_path / "p.bin", formats.TrainState(step=4, m=m, v=m, loader=plain))
    assert formats.read_train_state(tmp_path / "p.bin", 5).loader == {**plain, "epoch": 0, "shuffle": False}
