"""HellaSwag: preparation of llm.c's eval file and completion-style accuracy.

prepare_hellaswag tokenizes the public validation jsonl as llm.c's
dev/data/hellaswag.py does (context = encode(ctx), each ending encoded as
" " + ending) and writes hellaswag_val.bin in llm.c's eval-file format
(llmcu.formats.write_evalfile). evaluate_hellaswag runs a model on each
example's completions (context + completion, one row each) and picks the one
with the lowest mean cross-entropy over its completion tokens (llm.c's
acc_norm).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import formats

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def render_example(example: dict) -> dict:
    """llm.c's render data of one HellaSwag item: label, ctx_tokens, ending_tokens."""
    from .tokenizer import encode
    return {"label": int(example["label"]), "ctx_tokens": encode(example["ctx"]),
            "ending_tokens": [encode(" " + end) for end in example["endings"]]}


@formats.removes_new_dirs_on_failure
def prepare_hellaswag(out_dir="data/hellaswag", input_jsonl=None, log=print) -> str:
    """Tokenize the HellaSwag val jsonl (downloaded into out_dir unless input_jsonl
    is given) into out_dir/hellaswag_val.bin; returns that path."""
    from .data import DatasetError, _fetch_once
    out = Path(out_dir)
    if input_jsonl is None:
        src = _fetch_once(HELLASWAG_VAL_URL, out / "hellaswag_val.jsonl", log)
    else:
        src = Path(input_jsonl)
        if not src.is_file():
            raise DatasetError(f"HellaSwag input {src} does not exist")
    datas = []
    try:
        with open(src, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                    ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str)
                          and isinstance(ex.get("label"), int)
                          and isinstance(ex.get("endings"), list) and ex["endings"]
                          and all(isinstance(e, str) for e in ex["endings"])
                          and 0 <= ex["label"] < len(ex["endings"]))
                except ValueError as e:
                    raise DatasetError(f"{src}:{n}: not valid JSON ({e})") from e
                if not ok:
                    raise DatasetError(f"{src}:{n}: expected a HellaSwag item with a string \"ctx\", "
                                       f"a list of string \"endings\" and an int \"label\" indexing them")
                datas.append(render_example(ex))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read HellaSwag input {src}: {e}") from e
    if not datas:
        raise DatasetError(f"{src}: no HellaSwag examples found")
    path = os.path.join(out_dir, "hellaswag_val.bin")
    log(f"writing {len(datas):,} examples to {path}")
    formats.write_evalfile(path, datas)
    return path


def eval_seq_len(examples) -> int:
    """The common T of the model's input rows: the longest ctx + completion, minus one."""
    return max(len(ex.ctx_tokens) + max(len(e) for e in ex.ending_tokens) for ex in examples) - 1


def completion_losses(model, example: formats.EvalExample, T: int) -> np.ndarray:
    """Mean cross-entropy over each completion's tokens (one value per completion).

    Row i is ctx + completion i, padded with token 0 to T+1 tokens; inputs are
    its first T tokens, targets the last T. Works with any model offering
    forward(inputs, targets) and per-position losses in model.acts.losses."""
    nctx = len(example.ctx_tokens)
    rows = np.zeros((len(example.ending_tokens), T + 1), dtype=np.int32)
    mask = np.zeros((len(example.ending_tokens), T), dtype=bool)
    for i, end in enumerate(example.ending_tokens):
        row = example.ctx_tokens + end
        if len(row) > T + 1:
            raise ValueError(f"HellaSwag example {example.index}: {len(row)} tokens exceed T+1={T + 1}")
        rows[i, :len(row)] = row
        mask[i, max(nctx - 1, 0):len(row) - 1] = True  # the positions that predict the completion
        if not mask[i].any():
            raise ValueError(f"HellaSwag example {example.index}: completion {i} has no token "
                             f"to score (empty context and a one-token completion, or empty)")
    model.forward(rows[:, :-1], rows[:, 1:])
    losses = model.acts.losses
    if hasattr(losses, "get"):  # a CuPy array
        losses = losses.get()
    losses = np.asarray(losses, dtype=np.float64)
    return (losses * mask).sum(axis=1) / mask.sum(axis=1)


def evaluate_hellaswag(model, path, max_examples=None) -> tuple[int, int]:
    """(num_correct_norm, num_total) over the first max_examples (None: all) of an eval file."""
    examples = formats.read_evalfile(path)
    if max_examples is not None:
        examples = examples[:max_examples]
    if not examples:
        return 0, 0
    T = eval_seq_len(examples)
    max_T = model.config.max_seq_len
    if T > max_T:
        raise ValueError(f"{os.fspath(path)}: the longest example needs T={T}, more than the "
                         f"model's max_seq_len={max_T}")
    correct = 0
    for ex in examples:
        pred = int(np.argmin(completion_losses(model, ex, T)))
        correct += int(pred == ex.label)
    return correct, len(examples)
