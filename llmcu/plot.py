"""`llmcu plot`: train/val loss and learning rate of one or more runs, as a PNG."""

from __future__ import annotations

import os

from .runlog import read_runlog, series


def plot_runs(run_dirs, out: str = "loss.png", title: str | None = None) -> str:
    """Draw the runs' main.jsonl into `out`: losses (top, several runs overlaid,
    labelled by directory name) and lr (bottom). Returns out."""
    runs = [(os.path.basename(os.path.normpath(str(d))) or str(d), read_runlog(d))
            for d in run_dirs]
    try:
        import matplotlib
    except ImportError:
        raise ImportError("llmcu plot needs matplotlib: pip install 'llmcu[plot]' "
                          "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(runs):
        c = colors[i % len(colors)]
        steps, train = series(records, "train_loss")
        vsteps, val = series(records, "val_loss")
        lsteps, lr = series(records, "lr")
        if steps:
            ax_loss.plot([s + 1 for s in steps], train, color=c, alpha=0.45, lw=1,
                         label=f"{name} train")
        if vsteps:
            ax_loss.plot(vsteps, val, color=c, lw=2, marker="o", ms=4, label=f"{name} val")
        if lsteps:
            ax_lr.plot([s + 1 for s in lsteps], lr, color=c, lw=1.5, label=name)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title or "llmcu: train and val loss")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
