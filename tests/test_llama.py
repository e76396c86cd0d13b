"""The NumPy Llama/Gemma (llmcu/cpu/llama.py) against transformers in float32.

LlamaForCausalLM and GemmaForCausalLM with tiny random configs are built here
(eager attention, float32), every parameter redrawn at random (norm weights
too, so a wrong norm offset or a swapped gate/up shows), and their weights
mapped into llmcu's layout with llmcu.hf. Then llmcu's logits, loss, every
parameter gradient (against PyTorch autograd) and the parameters after three
AdamW steps with weight decay and clipping (against torch.optim.AdamW) must
agree. The configs cover grouped-query attention (NKV < NH) with an untied LM
head, a tied Llama, and a Gemma with multi-query attention (NKV = 1), GeGLU,
(1 + weight) norms, sqrt(C)-scaled embeddings and head_dim != C/NH.

Tolerances: both sides compute in float32; the only differences are the order
of the float32 sums (matmuls over C <= 48 and V = 100 terms, reductions in the
norms and the softmax), which gives relative errors around 1e-6 (measured
max |diff|: logits ~1e-6, gradients ~1e-6 of each tensor's largest
element). The asserted tolerances (1e-5 absolute on O(1) logits, 1e-6
relative on the loss, 1e-5 of the tensor's largest element for gradients and
2e-5 absolute on parameters after AdamW at lr 1e-2) leave that margin while
any real mistake (a wrong sign, a transposed head, a missing scale) is off by
orders of magnitude more.
"""

import numpy as np
import pytest

from llmcu.config import parameter_views
from llmcu.llama_config import LlamaConfig, llama_config

from helpers import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 100
B, T = 2, 11

CASES = {
    # grouped-query attention, 2 query heads per kv head, untied LM head
    "llama-gqa-untied": ("llama", dict(vocab_size=V, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=32,
                                       rms_norm_eps=1e-5, rope_theta=10000.0,
                                       tie_word_embeddings=False)),
    # tied embeddings, another theta and eps
    "llama-tied": ("llama", dict(vocab_size=V, hidden_size=24, intermediate_size=40,
                                 num_hidden_layers=2, num_attention_heads=3,
                                 num_key_value_heads=1, max_position_embeddings=16,
                                 rms_norm_eps=1e-6, rope_theta=500.0, tie_word_embeddings=True)),
    # Gemma: multi-query attention, head_dim 16 with NH*hs = 64 != C = 32
    "gemma-mqa": ("gemma", dict(vocab_size=V, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                head_dim=16, max_position_embeddings=32, rms_norm_eps=1e-6,
                                rope_theta=10000.0)),
}


def build_hf(case, seed=0):
    """(transformers model, llmcu LlamaConfig, llmcu flat params) for a case."""
    from llmcu.hf import hf_llama_config, hf_llama_to_flat
    kind, kwargs = CASES[case]
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_act="silu", **kwargs)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.GemmaConfig(hidden_act="gelu_pytorch_tanh", **kwargs)
        cls = transformers.GemmaForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights: around 1 for Llama, around 0 (1 + w) for Gemma
                base = 0.0 if kind == "gemma" else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    config = hf_llama_config(cfg.to_dict())
    params = hf_llama_to_flat(config, model.state_dict())
    return model, config, params


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, V, size=(B, T)).astype(np.int32),
            rng.integers(0, V, size=(B, T)).astype(np.int32))


def torch_grads_flat(model, config):
    from llmcu.hf import hf_llama_to_flat
    grads = {name: p.grad for name, p in model.named_parameters()}
    return hf_llama_to_flat(config, grads)


def test_config_from_hf_is_the_expected_shape():
    _, config, _ = build_hf("gemma-mqa")
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.channels) == (4, 1, 16, 32)
    assert config.mlp == "geglu" and config.norm_weight_offset == 1.0 and config.tie_embeddings
    assert config.embed_scale == pytest.approx(32 ** 0.5, rel=1e-7)
    _, config, _ = build_hf("llama-gqa-untied")
    assert (config.mlp, config.norm_weight_offset, config.embed_scale) == ("swiglu", 0.0, 1.0)
    assert not config.tie_embeddings and config.hidden_dim == 48


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_grads_match_transformers(case):
    from llmcu.cpu.llama import Llama
    model, config, params = build_hf(case)
    x, y = batch()
    xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    logits_ref = model(input_ids=xt).logits
    loss_ref = torch.nn.functional.cross_entropy(logits_ref.reshape(-1, V), yt.reshape(-1))
    loss_ref.backward()

    ours = Llama(config, params.copy())
    ours.zero_grad()
    loss = ours.forward(x, y)
    ours.backward()

    assert_close("logits", ours.acts.logits[..., :V], logits_ref, atol=1e-5, rtol=0)
    assert abs(loss - loss_ref.item()) <= 1e-6 * abs(loss_ref.item()), (loss, loss_ref.item())
    ref = parameter_views(config, torch_grads_flat(model, config))
    got = parameter_views(config, ours.grads)
    for name, _ in config.parameter_shapes():
        scale = float(np.abs(ref[name]).max())
        assert scale > 0, f"{name}: the reference gradient is all zero, the test would prove nothing"
        assert_close(f"grad {name}", got[name], ref[name], atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma-mqa"])
def test_adamw_steps_match_torch(case):
    """Three steps of forward, backward, clip to norm 1, AdamW with weight decay on
    the matrices and embeddings (the 2-D tensors) only: losses and parameters."""
    from llmcu.cpu.llama import Llama
    model, config, params = build_hf(case, seed=3)
    lr, wd, clip = 1e-2, 0.1, 1.0
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ours = Llama(config, params.copy())
    for step in range(1, 4):
        x, y = batch(seed=step)
        opt.zero_grad()
        logits = model(input_ids=torch.from_numpy(x).long()).logits
        loss_ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                                     torch.from_numpy(y).long().reshape(-1))
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        opt.step()

        ours.zero_grad()
        loss = ours.forward(x, y)
        ours.backward()
        norm = ours.update(lr, step, weight_decay=wd, grad_clip=clip)
        assert abs(loss - loss_ref.item()) <= 1e-5 * abs(loss_ref.item()), (step, loss, loss_ref.item())
        assert abs(norm - norm_ref) <= 1e-5 * norm_ref, (step, norm, norm_ref)
    from llmcu.hf import hf_llama_to_flat
    ref = parameter_views(config, hf_llama_to_flat(config, model.state_dict()))
    got = parameter_views(config, ours.params)
    moved = 0.0
    start = parameter_views(config, params)
    for name, _ in config.parameter_shapes():
        assert_close(f"param {name} after 3 AdamW steps", got[name], ref[name], atol=2e-5, rtol=0)
        moved = max(moved, float(np.abs(ref[name] - start[name]).max()))
    assert moved > 1e-3  # the steps moved the parameters far more than the tolerance


# --- configs and presets -------------------------------------------------------

# Published totals of the reference models (their model cards / safetensors
# metadata); checked independently below against transformers on the meta device.
PUBLISHED = {"llama2-7b": 6_738_415_616, "llama3.2-1b": 1_235_814_400, "gemma-2b": 2_506_172_416}

# The Hugging Face config.json values of those models, written out by hand here.
HF_REFERENCE = {
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, tie_word_embeddings=False)),
    "llama3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                  num_hidden_layers=16, num_attention_heads=32,
                                  num_key_value_heads=8, tie_word_embeddings=True)),
    "gemma-2b": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                               num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1,
                               head_dim=256)),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_reference_presets_count_like_transformers(name):
    config = llama_config(name)
    assert config.num_parameters() == PUBLISHED[name]
    kind, kwargs = HF_REFERENCE[name]
    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.GemmaConfig)(**kwargs)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.GemmaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert config.hidden_dim == kwargs["intermediate_size"]


def test_small_preset_matches_gpt2_d6_size():
    from llmcu.config import gpt2_config
    llama, gpt2 = llama_config("llama-d6"), gpt2_config("d6")
    assert llama == llama_config("llama")
    assert llama.num_kv_heads < llama.num_heads  # grouped-query attention
    assert abs(llama.num_parameters() / gpt2.num_parameters() - 1) < 0.01
    gemma = llama_config("gemma-d6")
    assert (gemma.num_kv_heads, gemma.mlp, gemma.norm_weight_offset) == (1, "geglu", 1.0)


def test_hidden_dim_formula():
    from llmcu.llama_config import llama_hidden_dim
    assert llama_hidden_dim(4096, 256, None) == 11008    # Llama 2 7B
    assert llama_hidden_dim(4096, 1024, 1.3) == 14336    # Llama 3.1 8B
    assert llama_hidden_dim(2048, 256, 1.5) == 8192      # Llama 3.2 1B


def test_flops_per_token():
    c = LlamaConfig(vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, channels=32, max_seq_len=16)
    n = c.num_parameters()
    assert c.flops_per_token(8) == 6 * n + 6 * 2 * 32 * 8
    u = LlamaConfig(vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, channels=32,
                    max_seq_len=16, tie_embeddings=False)
    assert u.flops_per_token(8) == 6 * (u.num_parameters() - 128 * 32) + 6 * 2 * 32 * 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of"),
    (dict(mlp="relu"), "mlp"),
    (dict(channels=30, num_heads=4), "divisible"),
    (dict(head_dim=7), "even"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=200, padded_vocab_size=100), "padded_vocab_size"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kwargs)


def test_unknown_descriptor():
    with pytest.raises(ValueError, match="llama-d6"):
        llama_config("llama-d7")


def test_forward_checks_inputs():
    from llmcu.cpu.llama import Llama
    c = LlamaConfig(vocab_size=100, num_layers=1, num_heads=2, num_kv_heads=1, channels=16, max_seq_len=8)
    m = Llama(c)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward(np.zeros((1, 9), np.int32))
    with pytest.raises(ValueError, match="token ids"):
        m.forward(np.full((1, 4), 100, np.int32))
    with pytest.raises(ValueError, match="targets shape"):
        m.forward(np.zeros((1, 4), np.int32), np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="params must be float32"):
        Llama(c, np.zeros(5, np.float32))


def test_gradient_accumulation_equals_one_big_batch():
    """Two half batches with loss_scale 1/2 accumulate the full batch's gradient."""
    from llmcu.cpu.llama import Llama
    c = LlamaConfig(vocab_size=100, num_layers=2, num_heads=4, num_kv_heads=2, channels=32, max_seq_len=16)
    x, y = batch()
    full = Llama(c, seed=5)
    full.zero_grad()
    full.forward(x, y)
    full.backward()
    acc = Llama(c, seed=5)
    acc.zero_grad()
    for i in range(2):
        acc.forward(x[i:i + 1], y[i:i + 1])
        acc.backward(loss_scale=0.5)
    # float32 sums in another order: 1e-6 of the largest gradient
    assert_close("accumulated grads", acc.grads, full.grads, atol=1e-6 * np.abs(full.grads).max(), rtol=0)
    assert np.abs(full.grads).max() > 0
