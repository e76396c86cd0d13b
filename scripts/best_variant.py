"""The fastest llmcu row of a bench_gpu_step.py JSON (its --json), as a --variants spec
or as the matching bench_step_breakdown.py flags, for the next GPU command:

    python scripts/best_variant.py OUT/bench_step_variants.json            # flash=7,gemm=...,graph=1
    python scripts/best_variant.py OUT/bench_step_variants.json --breakdown-flags
    python scripts/best_variant.py OUT/bench_step_variants.json --graph 1  # among graph rows only
    python scripts/best_variant.py OUT/bench_step_variants.json --attention OUT/bench_attention.json
        # ... with sched=heavy_first where bench_attention.py timed that order faster

Rows flagged SUSPECT (gradients unlike the reference row's) are never chosen. Exits 1
(saying why) when the file has no llmcu row with a time and a spec.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_gpu_step's variant specs


def best(result: dict, graph=None) -> tuple[str, dict, float]:
    """(row name, its variant dict, ms) of the fastest llmcu row (graph rows only, or eager
    only, when graph is 1 or 0) whose gradients were not flagged SUSPECT by bench_gpu_step's
    cross-check (they differ from the reference row's); ValueError when there is none."""
    variants = result.get("variants") or {}
    rows = [(name, variants[name], step["ms"]) for name, step in result.get("steps", {}).items()
            if name in variants and step.get("ms") is not None and not step.get("suspect", False)
            and (graph is None or bool(variants[name].get("graph")) == bool(graph))]
    if not rows:
        raise ValueError("no llmcu row with a time, a variant spec and gradients that agree with the "
                         "reference row's (a JSON from bench_gpu_step.py --json, written after this "
                         "script existed?)")
    return min(rows, key=lambda r: r[2])


def breakdown_flags(v: dict) -> str:
    """bench_step_breakdown.py's flags for a variant (the breakdown has no graph mode)."""
    flags = [f"--flash-version {v['flash']}", f"--gemm {v['gemm']}", f"--classifier-version {v['classifier']}"]
    if not v.get("lnfuse", True):
        flags.append("--no-fuse-residual")
    if v.get("bgrad"):
        flags.append("--bias-epilogue")
    if v.get("sched", "grouped") != "grouped":
        flags.append(f"--flash-schedule {v['sched']}")
    return " ".join(flags)


def with_attention_schedule(variant: dict, attention: dict) -> dict:
    """The variant with sched=heavy_first when bench_attention.py's JSON (`attention`) timed its
    attention version's forward+backward faster with schedule="heavy_first" than with the
    default order; unchanged otherwise (no such rows, a grouped row as fast or faster, or
    flash=auto, whose version the GPU picks). The spec text follows."""
    version = variant.get("flash")
    if not isinstance(version, int) or version < 3 or variant.get("sched", "grouped") != "grouped":
        return variant
    rows = {r["name"]: r for r in attention.get("rows", [])}
    heavy = rows.get(f"llmcu flash v{version} bf16 heavy-first")
    grouped = next((r for name, r in rows.items() if name.startswith(f"llmcu flash v{version} bf16 (")), None)
    if heavy is None or grouped is None or not heavy["fwd_bwd_ms"] < grouped["fwd_bwd_ms"]:
        return variant
    from bench_gpu_step import VARIANT_KEYS, variant_spec
    chosen = {**variant, "sched": "heavy_first"}
    return {**chosen, "spec": variant_spec({key: chosen[key] for key in VARIANT_KEYS})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--graph", type=int, choices=[0, 1], default=None)
    ap.add_argument("--breakdown-flags", action="store_true")
    ap.add_argument("--attention", type=Path, default=None,
                    help="bench_attention.py's JSON: add sched=heavy_first where it timed the "
                         "variant's attention version faster that way")
    a = ap.parse_args(argv)
    try:
        name, variant, ms = best(json.loads(a.json.read_text()), a.graph)
    except (OSError, ValueError) as e:
        print(f"best_variant: {a.json}: {e}", file=sys.stderr)
        return 1
    print(f"best_variant: {name} at {ms:.2f} ms/step", file=sys.stderr)
    if a.attention is not None:
        try:
            attention = json.loads(a.attention.read_text())
        except (OSError, ValueError) as e:  # the step variant still stands without it
            print(f"best_variant: {a.attention}: {e}; the schedule stays grouped", file=sys.stderr)
        else:
            variant = with_attention_schedule(variant, attention)
            print(f"best_variant: attention blocks {variant.get('sched', 'grouped')} (from {a.attention})",
                  file=sys.stderr)
    print(breakdown_flags(variant) if a.breakdown_flags else variant["spec"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
