"""Loading Hugging Face GPT-2 checkpoints (llmcu.torch_gpt2.from_hf_checkpoint).

GPT-2's pretrained weights are not available offline, so each test writes a
tiny random checkpoint in HF's own naming and layout: Conv1D weights stored
(in, out), a 'transformer.' prefix (or none, as some exports have), the
attn.bias / attn.masked_bias buffers, a tied lm_head.weight in
pytorch_model.bin. model.safetensors is written with the safetensors package
when it is installed and by hand otherwise (the format is a JSON header and
raw bytes), which also exercises the loader's built-in reader.
"""

import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmcu.config import parameter_views  # noqa: E402
from llmcu import torch_gpt2  # noqa: E402
from llmcu.torch_gpt2 import from_hf_checkpoint, hf_config, to_flat  # noqa: E402

L, NH, C, V, MAXT = 2, 4, 32, 101, 16  # V=101 pads to Vp=128

HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": L,
             "n_head": NH, "n_embd": C, "n_positions": MAXT, "n_ctx": MAXT, "vocab_size": V,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def hf_state_dict(seed=0):
    """A random GPT-2 state dict exactly as transformers' GPT2LMHeadModel names and stores it."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"transformer.wte.weight": rnd(V, C), "transformer.wpe.weight": rnd(MAXT, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({
            h + "ln_1.weight": 1 + rnd(C), h + "ln_1.bias": rnd(C),
            h + "attn.bias": torch.tril(torch.ones(MAXT, MAXT, dtype=torch.bool)).view(1, 1, MAXT, MAXT),
            h + "attn.masked_bias": torch.tensor(-1e4),
            h + "attn.c_attn.weight": rnd(C, 3 * C), h + "attn.c_attn.bias": rnd(3 * C),
            h + "attn.c_proj.weight": rnd(C, C), h + "attn.c_proj.bias": rnd(C),
            h + "ln_2.weight": 1 + rnd(C), h + "ln_2.bias": rnd(C),
            h + "mlp.c_fc.weight": rnd(C, 4 * C), h + "mlp.c_fc.bias": rnd(4 * C),
            h + "mlp.c_proj.weight": rnd(4 * C, C), h + "mlp.c_proj.bias": rnd(C),
        })
    sd["transformer.ln_f.weight"] = 1 + rnd(C)
    sd["transformer.ln_f.bias"] = rnd(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied
    return sd


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.bool: "BOOL"}


def save_safetensors(state, path):
    """model.safetensors as HF writes it (no tied duplicate), by package or by hand."""
    state = {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    try:
        from safetensors.torch import save_file
    except ImportError:
        pass
    else:
        save_file(state, str(path), metadata={"format": "pt"})
        return
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in state.items():
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_checkpoint(directory, state, fmt):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif fmt == "bin-noprefix":
        torch.save({k.removeprefix("transformer."): v for k, v in state.items()},
                   directory / "pytorch_model.bin")
    elif fmt == "safetensors":
        save_safetensors(state, directory / "model.safetensors")
    elif fmt == "safetensors-bf16":
        save_safetensors({k: v.to(torch.bfloat16) if v.is_floating_point() else v
                          for k, v in state.items()}, directory / "model.safetensors")
    return directory


@pytest.mark.parametrize("fmt", ["bin", "bin-noprefix", "safetensors", "safetensors-bf16"])
def test_every_tensor_lands_in_place(tmp_path, fmt):
    state = hf_state_dict()
    model = from_hf_checkpoint(write_checkpoint(tmp_path / "gpt2-tiny", state, fmt))
    if fmt == "safetensors-bf16":  # the loader widens bf16 to float32 exactly
        state = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v
                 for k, v in state.items()}
    cfg = model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.channels, cfg.vocab_size, cfg.max_seq_len,
            cfg.padded_vocab_size) == (L, NH, C, V, MAXT, 128)

    p = parameter_views(cfg, to_flat(model))  # llm.c's layout
    raw = state
    # specific elements, spelled out: HF Conv1D (in, out) -> llm.c (out, in)
    assert p["qkvw"][1, 70, 3] == raw["transformer.h.1.attn.c_attn.weight"][3, 70].item()
    assert p["attprojw"][0, 5, 31] == raw["transformer.h.0.attn.c_proj.weight"][31, 5].item()
    assert p["fcw"][1, 127, 0] == raw["transformer.h.1.mlp.c_fc.weight"][0, 127].item()
    assert p["fcprojw"][0, 2, 100] == raw["transformer.h.0.mlp.c_proj.weight"][100, 2].item()
    assert p["qkvb"][1, 95] == raw["transformer.h.1.attn.c_attn.bias"][95].item()
    assert p["wte"][100, 7] == raw["transformer.wte.weight"][100, 7].item()
    assert p["wpe"][15, 31] == raw["transformer.wpe.weight"][15, 31].item()
    # and every tensor whole, per layer
    for name, key in torch_gpt2.PARAMETER_MAP.items():
        layers = range(L) if "{l}" in key else [None]
        for l in layers:
            expected = raw[key.format(l=l)].numpy()
            if name in torch_gpt2.HF_CONV1D:
                expected = expected.T
            got = p[name][l] if l is not None else p[name]
            if name == "wte":
                assert not got[V:].any(), "padded wte rows must be zero"
                got = got[:V]
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} layer {l}")


def test_loaded_model_runs_like_the_numpy_oracle(tmp_path):
    """The loaded model's logits agree with llmcu's NumPy GPT-2 on the same flat params."""
    from llmcu.cpu.gpt2 import GPT2
    model = from_hf_checkpoint(write_checkpoint(tmp_path / "ckpt", hf_state_dict(1), "bin"))
    x = np.random.default_rng(0).integers(0, V, size=(2, MAXT))
    logits, _ = model(torch.from_numpy(x))
    oracle = GPT2(model.config, to_flat(model))
    oracle.forward(x)
    np.testing.assert_allclose(logits.detach().numpy()[..., :V], oracle.acts.logits[..., :V],
                               atol=1e-5, rtol=0)


def test_missing_weights_error_names_directory_and_files(tmp_path):
    d = tmp_path / "no-weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CONFIG))
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        from_hf_checkpoint(d)
    msg = str(e.value)
    assert str(d) in msg
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg  # what was expected
    assert "config.json" in msg and "tokenizer.json" in msg           # what was found


def test_missing_config_and_missing_directory(tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    torch.save(hf_state_dict(), d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        from_hf_checkpoint(d)
    assert str(d) in str(e.value) and "pytorch_model.bin" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf_checkpoint(tmp_path / "nowhere")


def test_bad_checkpoints_are_rejected(tmp_path):
    state = hf_state_dict()
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.bias"):
        from_hf_checkpoint(write_checkpoint(tmp_path / "a", state, "bin"))
    state = hf_state_dict()
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match="c_attn.weight has shape"):
        from_hf_checkpoint(write_checkpoint(tmp_path / "b", state, "bin"))
    d = write_checkpoint(tmp_path / "c", hf_state_dict(), "bin")
    (d / "config.json").write_text(json.dumps({**HF_CONFIG, "n_inner": 3 * C}))
    with pytest.raises(ValueError, match="n_inner"):
        hf_config(d)


def test_logits_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = write_checkpoint(tmp_path / "ckpt", hf_state_dict(2), "bin")
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()
    model = from_hf_checkpoint(d)
    x = torch.from_numpy(np.random.default_rng(3).integers(0, V, size=(2, MAXT)))
    with torch.no_grad():
        expected = ref(x).logits
        logits, _ = model(x)
    np.testing.assert_allclose(logits[..., :V].numpy(), expected.numpy(), atol=1e-5, rtol=0)
