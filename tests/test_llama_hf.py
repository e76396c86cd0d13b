"""Llama/Gemma interop: Hugging Face checkpoints in and out (llmcu.hf), and the
Llama model file (llm.c's Llama 3 layout, llmcu.formats), all offline.

Tiny random LlamaForCausalLM / GemmaForCausalLM are created here with
transformers and saved with save_pretrained; import_hf must give a model whose
logits equal transformers', and export_hf a directory that from_pretrained
loads to the same logits. Logit tolerance 1e-5 absolute: both sides float32 on
O(1) logits, differing only in the order of float32 sums (measured ~1e-6, see
tests/test_llama.py); a mis-mapped tensor is off by O(1).
"""

import json

import numpy as np
import pytest

from llmcu import formats
from llmcu.config import parameter_views
from llmcu.llama_config import LlamaConfig

from helpers import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, B, T = 100, 2, 9


def tiny_hf(kind, seed=0, **over):
    if kind == "llama":
        kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
        kw.update(over)
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    else:
        kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  max_position_embeddings=32)
        kw.update(over)
        cfg, cls = transformers.GemmaConfig(**kw), transformers.GemmaForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every tensor random, norm weights included
        for p in model.parameters():
            p.copy_((0.2 if p.ndim == 1 else 0.1) * torch.randn(p.shape, generator=gen)
                    + (1.0 if p.ndim == 1 and kind == "llama" else 0.0))
    return model


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T)).astype(np.int32)


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(x).long()).logits.numpy()


def our_logits(config, params, x):
    from llmcu.cpu.llama import Llama
    m = Llama(config, params)
    m.forward(x)
    return m.acts.logits[..., :config.vocab_size]


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_import_save_pretrained_then_export_from_pretrained(kind, tmp_path):
    from llmcu.hf import export_hf, import_hf
    model = tiny_hf(kind)
    model.save_pretrained(tmp_path / "hf")
    config, params = import_hf(tmp_path / "hf")
    assert isinstance(config, LlamaConfig)
    x = tokens()
    ref = hf_logits(model, x)
    assert_close("imported logits", our_logits(config, params, x), ref, atol=1e-5, rtol=0)

    export_hf(tmp_path / "out", config, params)
    cls = transformers.AutoModelForCausalLM
    back = cls.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    assert type(back) is type(model)
    # the same tensors, bit for bit
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert_close("exported logits", hf_logits(back, x), ref, atol=1e-5, rtol=0)
    # and our config survives the round trip
    assert import_hf(tmp_path / "out")[0] == config


def test_import_sharded_checkpoint(tmp_path):
    from llmcu.hf import import_hf
    model = tiny_hf("llama", seed=2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    config, params = import_hf(tmp_path / "hf")
    x = tokens(1)
    assert_close("sharded logits", our_logits(config, params, x), hf_logits(model, x), atol=1e-5, rtol=0)


def _write_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}), "rope_type"),
    (dict(attention_bias=True), "biases"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(model_type="mistral"), "GPT-2|model_type"),
])
def test_import_rejects_unsupported_variants(tmp_path, changes, match):
    from llmcu.hf import import_hf
    tiny_hf("llama").save_pretrained(tmp_path)
    _write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        import_hf(tmp_path)


def test_import_rejects_wrong_shapes_and_extra_tensors(tmp_path):
    from llmcu.hf import import_hf, read_safetensors, write_safetensors
    tiny_hf("llama").save_pretrained(tmp_path)
    _write_config(tmp_path, intermediate_size=40)
    with pytest.raises(ValueError, match="gate_proj.weight has shape"):
        import_hf(tmp_path)
    _write_config(tmp_path, intermediate_size=48)
    state = read_safetensors(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(ValueError, match="unexpected tensors: model.layers.0.self_attn.q_proj.bias"):
        import_hf(tmp_path)


def test_export_rejects_a_config_transformers_cannot_load(tmp_path):
    from llmcu.cpu.llama import init_parameters
    from llmcu.hf import export_hf
    c = LlamaConfig(vocab_size=V, num_layers=1, num_heads=2, num_kv_heads=1, channels=16,
                    max_seq_len=16, mlp="geglu")  # GeGLU without the rest of Gemma
    with pytest.raises(ValueError, match="neither a Llama"):
        export_hf(tmp_path, c, init_parameters(c))


# --- the model file -------------------------------------------------------------

CONFIGS = {
    "llama-untied": LlamaConfig(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2, channels=32,
                                max_seq_len=16, multiple_of=16, ffn_dim_multiplier=1.3,
                                tie_embeddings=False, rope_theta=500000.0),
    "gemma": LlamaConfig(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=1, channels=32,
                         head_dim=16, hidden_dim=40, max_seq_len=16, mlp="geglu",
                         norm_weight_offset=1.0, embed_scale=32 ** 0.5, norm_eps=1e-6),
}


def random_params(config, seed=0):
    from llmcu.cpu.llama import init_parameters
    flat = init_parameters(config, seed)
    # norms random too, so a swapped tensor shows
    p = parameter_views(config, flat)
    rng = np.random.default_rng(seed)
    for name in ("ln1w", "ln2w", "lnfw"):
        p[name][...] = rng.standard_normal(p[name].shape).astype(np.float32)
    return flat


@pytest.mark.parametrize("name", list(CONFIGS))
def test_model_file_round_trip(name, tmp_path):
    config = CONFIGS[name]
    params = random_params(config)
    formats.write_model(tmp_path / "m.bin", config, params)
    got_config, got = formats.read_model(tmp_path / "m.bin")
    assert got_config == config
    np.testing.assert_array_equal(got, params)
    formats.write_model(tmp_path / "b.bin", config, params, dtype="bfloat16")
    _, got16 = formats.read_model(tmp_path / "b.bin")
    np.testing.assert_array_equal(got16, formats.bf16_bits_to_float32(formats.float32_to_bf16_bits(params)))
    assert (tmp_path / "b.bin").stat().st_size < (tmp_path / "m.bin").stat().st_size


def test_model_file_is_llmc_llama3_layout(tmp_path):
    """Header slots, tensor order and shapes as llm.c's train_llama3.py writes them,
    read here with plain NumPy; q/k rows in Meta's interleaved RoPE order."""
    from llmcu.cpu.rope import rope_forward, rope_frequencies
    c = CONFIGS["llama-untied"]
    params = random_params(c, seed=3)
    formats.write_model(tmp_path / "m.bin", c, params)
    raw = (tmp_path / "m.bin").read_bytes()
    ints = np.frombuffer(raw[:1024], "<i4")
    floats = np.frombuffer(raw[1024:2048], "<f4")
    assert list(ints[:10]) == [20240803, 3, 16, V, 2, 4, 2, 32, 16, 0]
    assert floats[0] == np.float32(1.3) and floats[1] == np.float32(1e-5) and floats[2] == 500000.0
    H, hs, C, L = c.hidden_dim, 8, 32, 2
    data = np.frombuffer(raw[2048:], "<f4")
    sizes = [V * C, L * C, L * 64 * C, L * C * C, L * C, L * H * C, L * H * C, L * C * H, C, V * C]
    assert data.size == sum(sizes)
    parts = np.split(data, np.cumsum(sizes)[:-1])
    p = parameter_views(c, params)
    np.testing.assert_array_equal(parts[0].reshape(V, C), p["wte"][:V])
    np.testing.assert_array_equal(parts[5].reshape(L, H, C), p["fcw"][:, H:])   # c_fc = up
    np.testing.assert_array_equal(parts[6].reshape(L, H, C), p["fcw"][:, :H])   # c_fc2 = gate
    np.testing.assert_array_equal(parts[9].reshape(V, C), p["lm_head"][:V])
    # q and k of layer 0: Meta's RoPE (pairs 2i, 2i+1) on the file's rows equals
    # llmcu's rotate_half RoPE on llmcu's rows, after the same de-interleave
    wq_file = parts[2].reshape(L, 64, C)[0]
    x = np.random.default_rng(0).standard_normal((1, 5, C)).astype(np.float32)
    cos, sin = rope_frequencies(hs, 16, c.rope_theta)
    ours = np.empty((1, 5, 64), np.float32)
    rope_forward(ours, x @ p["qkvw"][0].T, cos, sin, 4, 2)
    qk = 6 * hs  # 4 query heads and 2 key heads; then 2 value heads
    meta = (x @ wq_file[:qk].T).reshape(5, 6, hs // 2, 2)  # (T, q+k heads, pair, element)
    rot = np.stack([meta[..., 0] * cos[:5, None] - meta[..., 1] * sin[:5, None],
                    meta[..., 1] * cos[:5, None] + meta[..., 0] * sin[:5, None]], axis=-1)
    deinterleaved = rot.transpose(0, 1, 3, 2).reshape(5, qk)  # element 2i+s -> s*hs/2+i
    # float32 products in another grouping: 1e-5 on values of about 0.1..1
    np.testing.assert_allclose(deinterleaved, ours[0, :, :qk], rtol=1e-5, atol=1e-5)
    assert not np.allclose(wq_file[:qk], p["qkvw"][0][:qk])  # the rows really are permuted
    # v rows are not permuted
    np.testing.assert_array_equal(wq_file[48:], p["qkvw"][0][48:])


def test_model_file_written_by_llmc_reads_with_derived_fields(tmp_path):
    """A file with llmcu's header fields zeroed (as llm.c writes it) reads as the
    untied SwiGLU Llama whose hidden size follows from multiple_of and ffn_dim_multiplier."""
    c = CONFIGS["llama-untied"]
    params = random_params(c, seed=4)
    formats.write_model(tmp_path / "m.bin", c, params)
    raw = bytearray((tmp_path / "m.bin").read_bytes())
    raw[12 * 4:18 * 4] = bytes(24)
    raw[1024 + 3 * 4:1024 + 5 * 4] = bytes(8)
    (tmp_path / "llmc.bin").write_bytes(bytes(raw))
    got_config, got = formats.read_model(tmp_path / "llmc.bin")
    assert got_config == c
    np.testing.assert_array_equal(got, params)


def _patched(tmp_path, name, offset, value, dtype="<i4"):
    raw = bytearray((tmp_path / "m.bin").read_bytes())
    raw[offset:offset + 4] = np.array([value], dtype).tobytes()
    (tmp_path / name).write_bytes(bytes(raw))
    return tmp_path / name


def test_model_file_bad_inputs(tmp_path):
    c = CONFIGS["gemma"]
    params = random_params(c, seed=5)
    formats.write_model(tmp_path / "m.bin", c, params)
    good = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(good[:-4])
    with pytest.raises(formats.FormatError, match="truncated"):
        formats.read_model(tmp_path / "trunc.bin")
    (tmp_path / "long.bin").write_bytes(good + b"\0\0\0\0")
    with pytest.raises(formats.FormatError, match="oversized"):
        formats.read_model(tmp_path / "long.bin")
    (tmp_path / "head.bin").write_bytes(good[:1500])
    with pytest.raises(formats.FormatError, match="2048-byte"):
        formats.read_model(tmp_path / "head.bin")
    with pytest.raises(formats.FormatError, match="version"):
        formats.read_model(_patched(tmp_path, "v.bin", 4, 4))
    with pytest.raises(formats.FormatError, match="use_scaled_rope is 3"):
        formats.read_model(_patched(tmp_path, "r.bin", 9 * 4, 3))
    with pytest.raises(formats.FormatError, match="NKV > 0"):
        formats.read_model(_patched(tmp_path, "k.bin", 6 * 4, 0))
    with pytest.raises(formats.FormatError, match="multiple of num_kv_heads"):
        formats.read_model(_patched(tmp_path, "k3.bin", 6 * 4, 3))
    with pytest.raises(formats.FormatError, match="mlp kind"):
        formats.read_model(_patched(tmp_path, "mlp.bin", 16 * 4, 7))
    # tied, but the stored lm_head differs from wte
    raw = bytearray(good)
    raw[-4:] = np.array([123.0], "<f4").tobytes()
    (tmp_path / "tie.bin").write_bytes(bytes(raw))
    with pytest.raises(formats.FormatError, match="tied"):
        formats.read_model(tmp_path / "tie.bin")
    with pytest.raises(TypeError, match="float32"):
        formats.write_model(tmp_path / "x.bin", c, params.astype(np.float64))
    with pytest.raises(ValueError, match="elements"):
        formats.write_model(tmp_path / "x.bin", c, params[:-1])
    assert not (tmp_path / "x.bin").exists()


def test_model_file_write_is_atomic(tmp_path, monkeypatch):
    """A failure half-way leaves the previous file untouched and no temporary behind."""
    c = CONFIGS["llama-untied"]
    params = random_params(c)
    formats.write_model(tmp_path / "m.bin", c, params)
    before = (tmp_path / "m.bin").read_bytes()
    calls = {"n": 0}
    real = formats.float32_to_bf16_bits

    def boom(a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(a)
    monkeypatch.setattr(formats, "float32_to_bf16_bits", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        formats.write_model(tmp_path / "m.bin", c, params * 2, dtype="bfloat16")
    assert (tmp_path / "m.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


# --- Llama 3's RoPE frequency scaling (rope_type "llama3") ------------------------

# hs = 8 and theta 1e4 give wavelengths 6.3, 63, 628, 6283 positions; with an
# original context of 256, low_freq_factor 1 and high_freq_factor 8 these fall
# in all three bands (kept below 32, blended between 32 and 256, divided by the
# factor above 256), so each branch of the formula is exercised.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                   high_freq_factor=8.0, original_max_position_embeddings=256)
SCALING = (4.0, 1.0, 8.0, 256)


def test_scaled_rope_tables_match_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from llmcu.cpu.rope import rope_frequencies
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                                   rope_parameters=dict(LLAMA3_ROPE))
    rot = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(64)[None]
    cos_ref, sin_ref = rot(torch.zeros(1, 64, 8), pos)
    cos, sin = rope_frequencies(8, 64, 10000.0, SCALING)
    # the same float32 operations in the same order: equal up to libm's cos/sin (a few ulp)
    assert_close("scaled cos", cos, cos_ref[0, :, :4], atol=2e-6, rtol=0)
    assert_close("scaled sin", sin, sin_ref[0, :, :4], atol=2e-6, rtol=0)
    plain_cos, _ = rope_frequencies(8, 64, 10000.0)
    assert np.abs(plain_cos - cos).max() > 1e-2  # the scaling changed the slow frequencies
    assert np.array_equal(plain_cos[:, 0], cos[:, 0])  # and kept the fastest one


def test_import_export_llama3_scaled_rope(tmp_path):
    from llmcu.hf import export_hf, import_hf
    model = tiny_hf("llama", seed=5, rope_parameters=dict(LLAMA3_ROPE))
    model.save_pretrained(tmp_path / "hf")
    config, params = import_hf(tmp_path / "hf")
    assert config.rope_scaling == SCALING
    x = np.random.default_rng(3).integers(0, V, size=(B, 32)).astype(np.int32)  # every position
    ref = hf_logits(model, x)
    assert_close("scaled-rope logits", our_logits(config, params, x), ref, atol=1e-5, rtol=0)
    # without the scaling the logits differ by far more than the tolerance above
    import dataclasses
    plain = dataclasses.replace(config, rope_scaling=None)
    assert np.abs(our_logits(plain, params, x) - ref).max() > 1e-3
    export_hf(tmp_path / "out", config, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert_close("exported scaled-rope logits", hf_logits(back.float().eval(), x), ref, atol=1e-5, rtol=0)
    assert import_hf(tmp_path / "out")[0] == config


def test_model_file_keeps_rope_scaling(tmp_path):
    import dataclasses

    from llmcu.cpu.rope import LLAMA31_SCALING
    c = dataclasses.replace(CONFIGS["llama-untied"], rope_scaling=(32.0, 1.0, 4.0, 8192))
    params = random_params(c, seed=6)
    formats.write_model(tmp_path / "m.bin", c, params)
    raw = (tmp_path / "m.bin").read_bytes()
    assert np.frombuffer(raw[36:40], "<i4")[0] == 1  # llm.c's use_scaled_rope
    got_config, got = formats.read_model(tmp_path / "m.bin")
    assert got_config == c
    np.testing.assert_array_equal(got, params)
    # as llm.c writes it (no llmcu fields): use_scaled_rope=1 means Llama 3.1's fixed numbers
    llmc = bytearray(raw)
    llmc[12 * 4:18 * 4] = bytes(24)
    llmc[1024 + 3 * 4:1024 + 9 * 4] = bytes(24)
    (tmp_path / "llmc.bin").write_bytes(bytes(llmc))
    assert formats.read_model(tmp_path / "llmc.bin")[0].rope_scaling == LLAMA31_SCALING
    llmc[36:40] = np.array([2], "<i4").tobytes()
    (tmp_path / "bad.bin").write_bytes(bytes(llmc))
    with pytest.raises(formats.FormatError, match="use_scaled_rope is 2"):
        formats.read_model(tmp_path / "bad.bin")


def test_llama_config_rejects_bad_rope_scaling():
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(rope_scaling=(8.0, 4.0, 1.0, 8192))  # low >= high
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(rope_scaling=(8.0, 1.0, 4.0))


def test_ffn_dim_multiplier_survives_hf_and_model_file_round_trips(tmp_path):
    """Issue 22: an HF Llama whose MLP size comes from ffn_dim_multiplier 1.25 (as
    Meta's params.json and llmcu's llama-dN presets describe it) keeps 1.25 through
    import_hf -> the llm.c Llama .bin -> read_model -> export_hf -> import_hf, so
    llm.c, which derives the hidden size from the header, gets the same size."""
    from llmcu.hf import export_hf, import_hf
    from llmcu.llama_config import llama_hidden_dim
    H = llama_hidden_dim(32, 16, 1.25)
    assert H != llama_hidden_dim(32, 16, None)  # the multiplier matters at this shape
    model = tiny_hf("llama", seed=7, intermediate_size=H, multiple_of=16, ffn_dim_multiplier=1.25)
    model.save_pretrained(tmp_path / "hf")
    config, params = import_hf(tmp_path / "hf")
    assert (config.ffn_dim_multiplier, config.multiple_of, config.hidden_dim) == (1.25, 16, H)
    formats.write_model(tmp_path / "m.bin", config, params)
    floats = np.frombuffer((tmp_path / "m.bin").read_bytes()[1024:2048], "<f4")
    assert floats[0] == np.float32(1.25)
    back, got = formats.read_model(tmp_path / "m.bin")
    assert back == config and back.ffn_dim_multiplier == 1.25
    export_hf(tmp_path / "out", back, got)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["ffn_dim_multiplier"], cfg["multiple_of"], cfg["intermediate_size"]) == (1.25, 16, H)
    assert import_hf(tmp_path / "out")[0] == config
    # transformers still loads the exported directory (the two keys are extra attributes)
    x = tokens(2)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert_close("round-tripped logits", hf_logits(loaded.float().eval(), x), hf_logits(model, x),
                 atol=1e-5, rtol=0)
    # an llmcu preset (llama-d6's MLP: multiplier 1.25) through Hugging Face and back
    c = LlamaConfig(vocab_size=V, num_layers=1, num_heads=4, num_kv_heads=2, channels=32,
                    max_seq_len=16, multiple_of=16, ffn_dim_multiplier=1.25, tie_embeddings=True)
    export_hf(tmp_path / "preset", c, random_params(c, seed=8))
    assert import_hf(tmp_path / "preset")[0] == c
    # keys that do not give intermediate_size are not believed: the size rules
    _write_config(tmp_path / "hf", ffn_dim_multiplier=3.0)
    got = import_hf(tmp_path / "hf")[0]
    assert got.hidden_dim == H and got.ffn_dim_multiplier is None
