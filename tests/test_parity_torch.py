"""The NumPy oracle (llmcu.cpu.gpt2) against the PyTorch reference (llmcu.torch_gpt2).

Both start from the same parameters (init_parameters) and one batch of random
tokens, and are compared as llm.c's test_gpt2 compares its C model with
PyTorch: logits, loss and every gradient tensor at step 0, then the losses of
10 AdamW steps overfitting that batch. test_gpt2's tolerances (logits 1e-2,
grads 2e-2, losses 1e-2) are met by a wide margin; the tolerances asserted
here sit about 10x above the differences measured on a 2-core x86 CPU
(torch 2.13 CPU, numpy 2.4 with OpenBLAS); every run prints its own:

    d12 (124M), B=4, T=64, init seed 42, tokens seed 1234, math attention:
      logits 3.0e-06, loss 7.8e-07 (loss 11.000660)
      grads, max|diff| / max|grad| per tensor: 4.9e-07 (lnfb) .. 1.41e-06 (qkvb)
      10-step losses 7.7e-06, grad norms 9.3e-06 relative, final params 4.5e-05
    tiny (L=2, C=32, V=101), lr 1e-3, weight decay 0.1, clip 1.0:
      logits 1.8e-07, loss 1.0e-07, grads <= 4.2e-07 relative,
      10-step losses 6.5e-07, grad norms 5.6e-07 relative, final params 4.4e-06

Gradient tolerances are relative to each tensor's largest gradient, because
the tensors' scales differ by 50x (ln1w ~4e-3, attprojb ~0.16). Float32 sums
of hundreds of terms in another order differ by ~1e-6 relative; a real bug (a
missing term, a transposed weight, a wrong scale) is O(1). The step-0
differences then grow along the 10-step trajectory (d12's loss falls from 11
to 3.4), which is why the later-step tolerances are looser. The tiny test is
sensitive to the optimizer's semantics: decaying every tensor, or none, moves
its 10-step losses by 5e-4 and 3.5e-4, skipping the clipping by 8e-3, all far
above its 1e-5 tolerance.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmcu.config import GPT2Config, gpt2_config, parameter_views  # noqa: E402
from llmcu.cpu.gpt2 import DECAYED, GPT2, init_parameters  # noqa: E402
from llmcu import torch_gpt2  # noqa: E402


def random_batch(config, B, T, seed):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=(B, T + 1))
    return tokens[:, :-1], tokens[:, 1:]


def train_numpy(config, flat, x, y, steps, lr, weight_decay=0.0, grad_clip=None):
    """Step 0's logits (B,T,Vp), loss and grads, then each step's loss, grad
    norm, and the parameters after the last update."""
    model = GPT2(config, flat.copy())
    out = {"losses": [], "norms": []}
    for step in range(steps):
        loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        if step == 0:
            out.update(logits=model.acts.logits.copy(), loss=loss, grads=model.grads.copy())
        out["norms"].append(model.update(lr, step + 1, weight_decay=weight_decay, grad_clip=grad_clip))
        out["losses"].append(loss)
    out["params"] = model.params
    return out


def train_torch(config, flat, x, y, steps, lr, weight_decay=0.0, grad_clip=None,
                attention=torch_gpt2.DEFAULT_ATTENTION):
    """The same as train_numpy with torch.optim.AdamW and clip_grad_norm_."""
    model = torch_gpt2.from_flat(config, flat, attention=attention)
    optimizer = torch_gpt2.configure_optimizer(model, lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out = {"losses": [], "norms": []}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        logits, loss = model(xt, yt)
        loss.backward()
        if step == 0:
            out.update(logits=logits.detach().numpy().copy(), loss=loss.item(),
                       grads=torch_gpt2.grads_to_flat(model))
        if grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        else:  # in float64: torch's float32 CPU norm of d12's 38M-element wte is ~5e-5 off
            norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in model.parameters()]))
        out["norms"].append(float(norm))
        optimizer.step()
        out["losses"].append(loss.item())
    out["params"] = torch_gpt2.to_flat(model)
    return out


def compare(config, ours, ref, tol, capsys, label):
    """Assert and print every comparison; `tol` maps what -> tolerance."""
    V = config.vocab_size
    lines = [f"{label}: NumPy vs PyTorch float32"]

    def report(name, diff, limit, extra=""):
        lines.append(f"  {name:<16} max|diff| {diff:.2e}  (tol {limit:.0e}){extra}")

    d = float(np.abs(ours["logits"][..., :V] - ref["logits"][..., :V]).max())
    report("logits", d, tol["logits"])
    dl = abs(ours["loss"] - ref["loss"])
    report("loss", dl, tol["loss"], f"  loss {ours['loss']:.6f}")
    g_ours = parameter_views(config, ours["grads"])
    g_ref = parameter_views(config, ref["grads"])
    grad_rel = {}
    for name, _ in config.parameter_shapes():
        diff = float(np.abs(g_ours[name] - g_ref[name]).max())
        scale = float(np.abs(g_ref[name]).max())
        rel = diff / scale
        norm_rel = float(np.linalg.norm(g_ours[name] - g_ref[name]) / np.linalg.norm(g_ref[name]))
        grad_rel[name] = rel
        report(f"grad {name}", diff, tol["grads"] * scale,
               f"  /max|g| {rel:.2e}  |diff|/|g| {norm_rel:.2e}  max|g| {scale:.1e}")
    steps_d = np.abs(np.array(ours["losses"]) - np.array(ref["losses"]))
    report("step losses", float(steps_d.max()), tol["losses"],
           "  " + " ".join(f"{v:.6f}" for v in ours["losses"]))
    norm_d = [abs(a - b) / b for a, b in zip(ours["norms"], ref["norms"])]
    dn = max(norm_d)
    report("grad norms (rel)", dn, tol["norms"], "  per step " + " ".join(f"{v:.0e}" for v in norm_d))
    dp = float(np.abs(ours["params"] - ref["params"]).max())
    report("final params", dp, tol["params"])
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    summary = "\n".join(lines)

    assert d <= tol["logits"], summary
    assert dl <= tol["loss"], summary
    bad = {n: r for n, r in grad_rel.items() if r > tol["grads"]}
    assert not bad, f"gradients off: {bad}\n{summary}"
    assert steps_d.max() <= tol["losses"], summary
    assert dn <= tol["norms"], summary
    assert dp <= tol["params"], summary


# -- d12 (124M), llm.c's test_gpt2 setting -------------------------------------

D12_STEPS, D12_LR = 10, 1e-4
D12_TOL = {"logits": 5e-5, "loss": 1e-5, "grads": 1.5e-5, "losses": 1e-4, "norms": 1e-4,
           "params": 5e-4}


@pytest.fixture(scope="module")
def d12_runs():
    config = gpt2_config("d12")
    flat = init_parameters(config, seed=42)
    x, y = random_batch(config, B=4, T=64, seed=1234)
    ours = train_numpy(config, flat, x, y, D12_STEPS, D12_LR)
    ref = train_torch(config, flat, x, y, D12_STEPS, D12_LR)
    return config, ours, ref


@pytest.mark.slow
def test_d12_matches_pytorch(d12_runs, capsys):
    config, ours, ref = d12_runs
    compare(config, ours, ref, D12_TOL, capsys, "d12 B=4 T=64, 10 AdamW steps lr 1e-4")


# -- a tiny model: padding (V=101, Vp=128), weight decay and clipping -----------

TINY = GPT2Config(max_seq_len=16, vocab_size=101, num_layers=2, num_heads=4, channels=32)
TINY_STEPS, TINY_LR = 10, 1e-3
TINY_WD, TINY_CLIP = 0.1, 1.0
TINY_TOL = {"logits": 2e-6, "loss": 2e-6, "grads": 5e-6, "losses": 1e-5, "norms": 1e-5,
            "params": 3e-5}


@pytest.mark.parametrize("attention", torch_gpt2.ATTENTION_IMPLS)
def test_tiny_matches_pytorch_with_decay_and_clipping(attention, capsys):
    flat = init_parameters(TINY, seed=7)
    x, y = random_batch(TINY, B=4, T=16, seed=8)
    ours = train_numpy(TINY, flat, x, y, TINY_STEPS, TINY_LR, TINY_WD, TINY_CLIP)
    ref = train_torch(TINY, flat, x, y, TINY_STEPS, TINY_LR, TINY_WD, TINY_CLIP, attention)
    compare(TINY, ours, ref, TINY_TOL, capsys,
            f"tiny ({attention}) wd {TINY_WD} clip {TINY_CLIP}, {TINY_STEPS} steps lr {TINY_LR}")
    # the clipping path must really run, or this test checks nothing about it
    assert max(ref["norms"]) > TINY_CLIP, ref["norms"]


def test_flat_round_trip_and_layout():
    flat = np.random.default_rng(0).standard_normal(TINY.num_parameters()).astype(np.float32)
    model = torch_gpt2.from_flat(TINY, flat)
    assert np.array_equal(torch_gpt2.to_flat(model), flat)
    # specific elements land where llm.c keeps them: per-layer tensors stacked over L,
    # Linear weights (out, in)
    views = parameter_views(TINY, flat)
    h1 = model.transformer.h[1]
    assert h1.attn.c_attn.weight[5, 7].item() == views["qkvw"][1, 5, 7]
    assert h1.mlp.c_proj.weight[3, 100].item() == views["fcprojw"][1, 3, 100]
    assert h1.ln_2.bias[9].item() == views["ln2b"][1, 9]
    assert model.transformer.wte.weight[120, 4].item() == views["wte"][120, 4]
    assert model.transformer.ln_f.weight[31].item() == views["lnfw"][31]
    # no backward yet: the gradients are zeros, in the same layout
    assert not torch_gpt2.grads_to_flat(model).any()


def test_optimizer_groups_follow_llmc_decay_set():
    model = torch_gpt2.from_flat(TINY, init_parameters(TINY, seed=1))
    decay, no_decay = torch_gpt2.configure_optimizer(model, 1e-3, weight_decay=0.1).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    expected = sum(TINY.num_layers if "{l}" in torch_gpt2.PARAMETER_MAP[n] else 1 for n in DECAYED)
    assert len(decay["params"]) == expected
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    assert any(p is model.transformer.h[0].attn.c_attn.bias for p in no_decay["params"])
