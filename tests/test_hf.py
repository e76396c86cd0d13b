"""Hugging Face interop (llmcu.hf, `llmcu convert`, `-e hf:...`).

GPT-2's pretrained weights are not available offline, so the transformers
tests build tiny random GPT2LMHeadModels in the test and compare logits both
ways. They skip without transformers; the rest (the NumPy safetensors writer
and reader, the import/export round trip, the errors) need only NumPy.
"""

import json
import struct
import sys
import types

import numpy as np
import pytest

from llmcu import cli, hf
from llmcu.config import GPT2Config, parameter_views
from llmcu.cpu.gpt2 import GPT2, init_parameters
from llmcu.formats import read_model, write_model
from llmcu.train import build_model

L, NH, C, V, MAXT = 2, 2, 32, 101, 32  # V=101 pads to Vp=128
CONFIG = GPT2Config(max_seq_len=MAXT, vocab_size=V, num_layers=L, num_heads=NH, channels=C)


def random_params(seed=0):
    """init_parameters' std-0.02 weights plus noise on every tensor (biases and
    LayerNorms too), so a misplaced or untransposed tensor changes the logits."""
    params = init_parameters(CONFIG, seed=seed)
    params += np.random.default_rng(seed).normal(0, 0.1, params.size).astype(np.float32)
    parameter_views(CONFIG, params)["wte"][V:] = 0  # llm.c keeps the padded rows zero
    return params


def llmcu_logits(config, params, x):
    model = GPT2(config, params)
    model.forward(x)
    return model.acts.logits[..., :config.vocab_size].copy()


def tokens(seed=3, B=2, T=MAXT):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


# ----------------------------------------------------------------------------
# NumPy only

def test_safetensors_writer_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
               "b.c": np.arange(7, dtype=np.int64), "h": rng.normal(size=(2,)).astype(np.float16),
               "scalar": np.array(2.5, dtype=np.float32), "mask": np.tril(np.ones((4, 4), bool))}
    path = tmp_path / "x.safetensors"
    hf.write_safetensors(path, tensors, metadata={"format": "pt"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # data 8-byte aligned
    header = json.loads(data[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
    assert header["b.c"]["dtype"] == "I64" and header["mask"]["dtype"] == "BOOL"
    assert len(data) == 8 + n + sum(t.nbytes for t in tensors.values())
    back = hf.read_safetensors(path)
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        np.testing.assert_array_equal(back[k], t, err_msg=k)
    assert not list(tmp_path.glob("*.tmp.*"))  # written atomically, nothing left behind


def test_safetensors_reader_widens_bf16_and_rejects_truncation(tmp_path):
    x = np.array([1.0, -2.5, 3.140625], dtype=np.float32)  # exact in bfloat16
    bits = (x.view(np.uint32) >> 16).astype("<u2")
    head = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bits.tobytes())
    np.testing.assert_array_equal(hf.read_safetensors(path)["w"], x)
    path.write_bytes(struct.pack("<Q", len(head)) + head + bits.tobytes()[:4])
    with pytest.raises(ValueError, match="does not fit"):
        hf.read_safetensors(path)


def test_export_then_import_is_exact(tmp_path):
    params = random_params(1)
    out = hf.export_hf(tmp_path / "new" / "hf-dir", CONFIG, params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) \
        == (V, MAXT, C, L, NH)
    assert cfg["activation_function"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    state = hf.read_safetensors(out / "model.safetensors")
    assert "lm_head.weight" not in state  # tied to wte
    assert state["transformer.wte.weight"].shape == (V, C)  # unpadded
    assert state["transformer.h.1.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D (in, out)
    p = parameter_views(CONFIG, params)
    assert state["transformer.h.1.attn.c_attn.weight"][3, 70] == p["qkvw"][1, 70, 3]
    assert state["transformer.h.0.mlp.c_proj.weight"][100, 2] == p["fcprojw"][0, 2, 100]

    config, back = hf.import_hf(out)
    assert config == CONFIG
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, params)
    assert not parameter_views(config, back)["wte"][V:].any()


def test_convert_cli_both_directions_and_train_spec(tmp_path, capsys):
    params = random_params(2)
    write_model(tmp_path / "m.bin", CONFIG, params)
    assert cli.main(["convert", "--to-hf", str(tmp_path / "hf"), "--model", str(tmp_path / "m.bin")]) == 0
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.bin")]) == 0
    config, back = read_model(tmp_path / "back.bin")
    assert config == CONFIG
    np.testing.assert_array_equal(back, params)
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b16.bin"),
                     "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "b16.bin").stat().st_size < (tmp_path / "back.bin").stat().st_size
    # -e hf:DIR starts training from these weights; a descriptor stays a random init
    model = build_model(f"hf:{tmp_path / 'hf'}")
    np.testing.assert_array_equal(model.params, params)
    # argument errors
    with pytest.raises(SystemExit):
        cli.main(["convert", "--from-hf", str(tmp_path / "hf")])
    with pytest.raises(SystemExit):
        cli.main(["convert", "--to-hf", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cli.main(["convert", "--out", "x.bin"])
    assert cli.main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", "x.bin"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_files_are_named(tmp_path):
    d = tmp_path / "ckpt"
    hf.export_hf(d, CONFIG, random_params())
    (d / "model.safetensors").unlink()
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        hf.import_hf(d)
    msg = str(e.value)
    assert str(d) in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg
    assert "config.json" in msg and "tokenizer.json" in msg
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.import_hf(d)
    with pytest.raises(FileNotFoundError, match="is a file"):
        hf.import_hf(d / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.import_hf(tmp_path / "nowhere")


def test_hub_name_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(FileNotFoundError, match="needs huggingface_hub") as e:
        hf.import_hf("openai-community/gpt2")
    assert "pass its path" in str(e.value)


def test_hub_name_without_network(monkeypatch):
    calls = []

    def snapshot_download(repo_id, **kw):  # what huggingface_hub does offline
        calls.append(repo_id)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    with pytest.raises(FileNotFoundError, match="could not be fetched") as e:
        hf.import_hf("gpt2")
    assert "couldn't connect" in str(e.value) and "pass its path" in str(e.value)
    assert calls == ["gpt2"]
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        build_model("hf:openai-community/gpt2")


def test_hub_download_is_used(monkeypatch, tmp_path):
    d = hf.export_hf(tmp_path / "cache" / "snap", CONFIG, random_params(4))
    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=lambda repo_id, **kw: str(d)))
    config, params = hf.import_hf("someone/tiny-gpt2")
    assert config == CONFIG
    np.testing.assert_array_equal(params, random_params(4))


def test_unsupported_variants_are_rejected(tmp_path):
    d = hf.export_hf(tmp_path / "c", CONFIG, random_params())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        hf.import_hf(d)


# ----------------------------------------------------------------------------
# against transformers (float32; both sides run the same math in float32, and
# on these tiny shapes they agree to ~1e-6)

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def test_import_matches_transformers(transformers, tmp_path):
    import torch
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=L, n_head=NH, n_embd=C, n_positions=MAXT, vocab_size=V)).eval()
    with torch.no_grad():  # make biases and LayerNorms non-trivial too
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "ref", safe_serialization=True)
    assert (tmp_path / "ref" / "model.safetensors").is_file()
    x = tokens()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).logits.numpy()

    config, params = hf.import_hf(tmp_path / "ref")
    assert config == CONFIG
    np.testing.assert_allclose(llmcu_logits(config, params, x), expected, atol=1e-5, rtol=0)
    # and through the CLI, into an llm.c file
    assert cli.main(["convert", "--from-hf", str(tmp_path / "ref"), "--out", str(tmp_path / "m.bin")]) == 0
    config, params2 = read_model(tmp_path / "m.bin")
    np.testing.assert_array_equal(params2, params)


def test_export_matches_transformers(transformers, tmp_path):
    import torch
    params = random_params(5)
    x = tokens(6)
    expected = llmcu_logits(CONFIG, params, x)
    write_model(tmp_path / "m.bin", CONFIG, params)
    for out in (tmp_path / "api", tmp_path / "cli"):
        if out.name == "api":
            hf.export_hf(out, CONFIG, params)
        else:
            assert cli.main(["convert", "--to-hf", str(out), "--model", str(tmp_path / "m.bin")]) == 0
        model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
        assert model.dtype == torch.float32
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
        with torch.no_grad():
            got = model(torch.from_numpy(x)).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=out.name)
        # round trip through transformers' own save: exactly the same parameters
        model.save_pretrained(tmp_path / f"{out.name}-resaved")
        config, back = hf.import_hf(tmp_path / f"{out.name}-resaved")
        assert config == CONFIG
        np.testing.assert_array_equal(back, params)
