"""Matplotlib figures for the lens and early-exit analyses. Each function returns the Figure."""
import matplotlib.pyplot as plt
import numpy as np

from .exits import KV_MODES
from .hooks import point_label
from .lens import METRIC_TITLES

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _cell_text(s, width=8):
    """A token as a short visible label: control characters escaped, a token of only spaces as ␣."""
    s = "".join(_ESCAPES.get(c, c) for c in s)
    if not s.strip():
        s = "".join("␣" if c == " " else f"\\u{ord(c):04x}" for c in s) or "∅"
    return s if len(s) <= width else s[:width - 1] + "…"


def plot_lens(result, tokenizer, metric="entropy", points=None, out=None, shortcut=None):
    """Heatmap: exit points (rows, deepest on top) x input positions, coloured by `metric`,
    each cell labelled with the lens's top-1 token. points: indices to show (default all).
    shortcut: the same prompt's LensResult read through a shortcut, drawn to the right on the
    same colour scale."""
    points = list(range(len(result.points))) if points is None else list(points)
    results = [result] + ([shortcut] if shortcut is not None else [])
    values = [r.metrics[metric][points] for r in results]                 # (p, T) each
    n_rows, n_cols = values[0].shape
    fig, axes = plt.subplots(1, len(results), squeeze=False, sharey=True,     # wide and tall enough for the titles
                             figsize=(max(6.5, 1.6 + 0.85 * n_cols) * len(results), 1.8 + 0.24 * n_rows))
    cmap = "viridis_r" if metric in ("entropy", "kl", "final_rank") else "viridis"
    vmin, vmax = min(v.min() for v in values), max(v.max() for v in values)
    for ax, r, v in zip(axes[0], results, values):
        im = _lens_panel(ax, r, tokenizer, v, points, cmap, vmin, vmax)
        ax.set_title(f"{r.shortcut or 'plain lens'}: the top-1 token at every exit point\n"
                     f"coloured by {METRIC_TITLES.get(metric, metric)}", fontsize=10)
    axes[0, 0].set_yticks(range(n_rows), [point_label(p) for p in points], fontsize=7)
    axes[0, 0].set_ylabel("exit point (block.sub-layer)")
    fig.colorbar(im, ax=axes[0, -1], fraction=0.025, pad=0.01, label=METRIC_TITLES.get(metric, metric))
    return _save(fig, out)


def _lens_panel(ax, result, tokenizer, values, points, cmap, vmin, vmax):
    """One lens heatmap with every cell labelled by its top-1 token; returns the image."""
    labels = [[_cell_text(tokenizer.decode([t])) for t in result.top_ids[p, :, 0]] for p in points]
    inputs = [_cell_text(t, 12) for t in (result.token_strings or map(str, result.ids))]
    im = ax.imshow(values, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            shade = im.norm(values[r, c])
            dark = shade < 0.5 if cmap == "viridis" else shade > 0.5
            ax.text(c, r, labels[r][c], ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    ax.set_xticks(range(values.shape[1]), inputs, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("input token (each column predicts the token after it)")
    return im


def plot_point_curves(summary, out=None, title="Logit lens over a corpus", shortcut=None):
    """Per-point curves of agreement, accuracy, KL and entropy; summary: name -> (P,) means.
    shortcut: the same means read through a shortcut ({label: summary} for several), drawn on
    the same axes."""
    curves = {"plain lens": summary}
    if shortcut is not None:
        curves.update(shortcut if "agree" not in shortcut else {"shortcut": shortcut})
    P = len(summary["agree"])
    x = np.arange(P)
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    panels = [("agree", "top-1 = final top-1"), ("accuracy", "top-1 = next gold token"),
              ("kl", "KL(final || point), nats"), ("entropy", "entropy, nats")]
    for ax, (name, label) in zip(axes.flat, panels):
        for curve, values in curves.items():
            if name in values:
                ax.plot(x, np.asarray(values[name]), marker=".", lw=1, label=curve)
        if name in ("kl", "entropy"):
            ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    if len(curves) > 1:
        axes[0, 0].legend(fontsize=8)
    ticks = list(range(1, P, max(2, 2 * (P // 20))))            # block outputs, about 10 of them
    for ax in axes[1]:
        ax.set_xticks(ticks, [point_label(p) for p in ticks], rotation=45, fontsize=8)
        ax.set_xlabel("exit point (odd = after a whole block)")
    fig.suptitle(title)
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=110)
    return fig


def _save(fig, out):
    fig.tight_layout()
    if out:
        fig.savefig(out, dpi=110)
    return fig


def plot_oracle_hist(e1, out=None, shortcut=None):
    """Where each token could have exited: first-match and stable oracle points (E1).
    shortcut: E1 of the same tokens through a shortcut; then the stable points of both are shown."""
    P = e1["points"]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(P)
    n = e1["tokens"]
    if shortcut is None:
        bars = [("first match", e1["first_match_hist"]), ("stable (saturation)", e1["stable_hist"])]
    else:
        bars = [(f"stable, plain lens (saving {e1['saving_stable']:.1%})", e1["stable_hist"]),
                (f"stable, shortcut (saving {shortcut['saving_stable']:.1%})", shortcut["stable_hist"])]
    for i, (label, hist) in enumerate(bars):
        ax.bar(x - 0.2 + 0.4 * i, np.array(hist) / n, width=0.4, label=label)
    ax.set_xticks(x[1::4], [point_label(p) for p in x[1::4]], rotation=45, fontsize=8)
    ax.set_ylabel("share of tokens")
    ax.set_xlabel("earliest exit point whose top-1 equals the final top-1")
    ax.set_title(f"Oracle exit points over {n} tokens: {e1['share_needing_last_point']:.1%} need the "
                 f"last point; perplexity {e1['perplexity']:.1f}", fontsize=10)
    ax.legend()
    return _save(fig, out)


def _kind(row):
    return row["gate"].split(":")[0].split(",")[0]


def _sweep(row):
    """The gate kind with its options: one threshold sweep, e.g. 'confidence,min_point=19'."""
    head, _, options = row["gate"].partition(",")
    return head.split(":")[0] + ("," + options if options else "")


def plot_gate_pareto(rows, out=None, title="Gates: exit error vs exit depth (teacher-forced)", shortcut=None):
    """One line per gate kind over its threshold sweep; the oracle as a star (E2, E6).
    shortcut: the same kind of rows for gates reading a shortcut, drawn dashed."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for rows_, style, suffix, key in ((rows, "-", "", _kind), (shortcut or [], "--", " + shortcut", _sweep)):
        for i, kind in enumerate(dict.fromkeys(key(r) for r in rows_)):
            pts = sorted((r["mean_exit_depth"], r["exit_error"]) for r in rows_ if key(r) == kind)
            if kind == "oracle":
                ax.scatter(*zip(*pts), marker="*" if not suffix else "P", s=200, color="black",
                           label="oracle" + suffix, zorder=3)
            else:
                ax.plot(*zip(*pts), style, marker="o", ms=4, color=f"C{i}", label=kind + suffix)
    ax.set_xlabel("mean exit depth (blocks)")
    ax.set_ylabel("exit error: exit top-1 != final top-1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_subword(e3, out=None):
    """Stable oracle points of word-initial vs continuation vs other target tokens (E3)."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, r in e3.items():
        h = np.array(r["stable_hist"], dtype=float)
        ax.plot(np.cumsum(h) / h.sum(), label=f"{name} ({r['tokens']} tokens, "
                f"{r['share_needing_last_point']:.0%} need the last point)")
    P = len(next(iter(e3.values()))["stable_hist"])
    ticks = np.arange(1, P, 4)
    ax.set_xticks(ticks, [point_label(p) for p in ticks], rotation=45, fontsize=8)
    ax.set_ylabel("share of tokens settled")
    ax.set_xlabel("stable exit point")
    ax.set_title("Sub-words: when does the prediction settle? (cumulative)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_sublayer(e4, out=None):
    """Stable exit points that fall after attention vs after the FFN, per block (E4)."""
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(e4["stable_hist_block"]))
    ax.bar(x - 0.2, e4["stable_hist_attention"], width=0.4, label="after attention (even p)")
    ax.bar(x + 0.2, e4["stable_hist_block"], width=0.4, label="after the FFN (odd p)")
    ax.set_xlabel("block")
    ax.set_ylabel("tokens whose stable exit is here")
    ax.set_title(f"Sub-layer exits: {e4['stable_at_attention']:.1%} of stable exits are attention "
                 "half-blocks", fontsize=10)
    ax.legend()
    return _save(fig, out)


def plot_generation(e5, out=None):
    """Agreement with plain greedy decoding by position, per KV fill strategy (E5)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for kv in KV_MODES:
        if kv in e5:
            axes[0].plot(e5[kv]["agreement_by_position"], label=f"kv={kv}")
            axes[1].plot(e5[kv]["identical_prefix_by_position"], label=f"kv={kv}")
    axes[0].set_title("same token as plain decoding at position", fontsize=10)
    axes[1].set_title("whole output identical up to position", fontsize=10)
    for ax in axes:
        ax.set_xlabel("generated position")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"share of {e5['prompts']} prompts")
    axes[0].set_ylim(-0.05, 1.05)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(KV_MODES), fontsize=9)
    fig.suptitle(f"Generation with gate {e5['gate']}: {e5['prompts']} prompts x {e5['new_tokens']} tokens",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))                         # the legend sits below the panels
    if out:
        fig.savefig(out, dpi=110)
    return fig


def plot_trajectory(traj, tokenizer=None, out=None):
    """Rank and probability of the chosen tokens at every exit point (lens.token_trajectory)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    x = np.arange(traj.rank.shape[1])
    for k, token in enumerate(traj.tokens):
        name = repr(tokenizer.decode([token])) if tokenizer else f"id {token}"
        axes[0].plot(x, traj.rank[k] + 1, marker=".", lw=1, label=name)
        axes[1].plot(x, traj.prob[k], marker=".", lw=1, label=name)
    axes[0].set_yscale("log")
    axes[0].invert_yaxis()                                         # rank 1 on top
    axes[0].set_ylabel("rank in the lens distribution (1 = top-1)")
    axes[1].set_ylabel("probability in the lens distribution")
    ticks = list(range(1, len(x), max(2, 2 * (len(x) // 20))))
    for ax in axes:
        ax.set_xticks(ticks, [point_label(p) for p in ticks], rotation=45, fontsize=8)
        ax.set_xlabel("exit point")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=9)
    after = repr(tokenizer.decode([traj.ids[traj.position]])) if tokenizer else f"id {traj.ids[traj.position]}"
    fig.suptitle(f"Lens trajectories at position {traj.position} (after {after})", fontsize=10)
    return _save(fig, out)
