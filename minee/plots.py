"""Matplotlib figures for the lens and early-exit analyses. Each function returns the Figure."""
import matplotlib.pyplot as plt
import numpy as np

from .hooks import point_label

METRIC_TITLES = {
    "entropy": "entropy of the lens distribution (nats)",
    "kl": "KL(final || point) (nats)",
    "final_prob": "probability of the final top-1 token",
    "agree": "top-1 equals the final top-1",
    "accuracy": "top-1 equals the next gold token",
    "final_rank": "rank of the final top-1 token",
}


def _cell_text(s, width=8):
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= width else s[:width - 1] + "…"


def plot_lens(result, tokenizer, metric="entropy", points=None, out=None):
    """Heatmap: exit points (rows, deepest on top) x input positions, coloured by `metric`,
    each cell labelled with the lens's top-1 token. points: indices to show (default all)."""
    points = list(range(len(result.points))) if points is None else list(points)
    values = result.metrics[metric][points]                           # (p, T)
    labels = [[_cell_text(tokenizer.decode([t])) for t in result.top_ids[p, :, 0]] for p in points]
    inputs = [_cell_text(t, 12) for t in (result.token_strings or map(str, result.ids))]
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * n_cols, 1.5 + 0.24 * n_rows))
    cmap = "viridis_r" if metric in ("entropy", "kl", "final_rank") else "viridis"
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
    for r in range(n_rows):
        for c in range(n_cols):
            shade = im.norm(values[r, c])
            dark = shade < 0.5 if cmap == "viridis" else shade > 0.5
            ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_xticks(range(n_cols), inputs, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [point_label(p) for p in points], fontsize=7)
    ax.set_xlabel("input token (each column predicts the token after it)")
    ax.set_ylabel("exit point (block.sub-layer)")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label=METRIC_TITLES.get(metric, metric))
    ax.set_title(f"Logit lens: top-1 token at every exit point, coloured by {metric}")
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=110)
    return fig


def plot_point_curves(summary, out=None, title="Logit lens over a corpus"):
    """Per-point curves of agreement, accuracy, KL and entropy; summary: name -> (P,) means."""
    P = len(summary["agree"])
    x = np.arange(P)
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    panels = [("agree", "top-1 = final top-1"), ("accuracy", "top-1 = next gold token"),
              ("kl", "KL(final || point), nats"), ("entropy", "entropy, nats")]
    for ax, (name, label) in zip(axes.flat, panels):
        if name in summary:
            ax.plot(x, summary[name], marker=".", lw=1)
            if name in ("kl", "entropy"):
                ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    ticks = list(range(1, P, max(2, 2 * (P // 20))))            # block outputs, about 10 of them
    for ax in axes[1]:
        ax.set_xticks(ticks, [point_label(p) for p in ticks], rotation=45, fontsize=8)
        ax.set_xlabel("exit point (odd = after a whole block)")
    fig.suptitle(title)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=110)
    return fig
