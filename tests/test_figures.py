"""Figures a reader can read: nothing clipped or hidden, no blank cells, legends off the data."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minee.lens import LensResult  # noqa: E402
from minee.plots import plot_gate_pareto, plot_generation, plot_lens  # noqa: E402

P = 60


class Tok:
    """A stand-in tokenizer: id i decodes to PIECES[i]."""
    PIECES = ["The", " cap", "ital", " ", "  ", "\n", "\t", " Paris", "\u00a0", "ok"]

    def decode(self, ids):
        return "".join(self.PIECES[int(i)] for i in ids)


def lens_result(ids, top1):
    """A LensResult of P points whose top-1 at point p, position t is top1[p, t]."""
    T = len(ids)
    rng = np.random.default_rng(0)
    return LensResult(ids=list(ids), points=[f"p{p}" for p in range(P)],
                      top_ids=np.asarray(top1)[..., None], top_probs=np.ones((P, T, 1)),
                      metrics={"entropy": rng.uniform(0, 5, (P, T)).astype(np.float32)},
                      final_top_ids=np.zeros(T, int), token_strings=[Tok.PIECES[i] for i in ids])


def inside_figure(fig, artist):
    fig.canvas.draw()
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


@pytest.mark.parametrize("T", [1, 2, 12])
def test_lens_heatmap_of_any_width_keeps_its_title_in_the_figure(T):
    """A one-token prompt made a 203-pixel-wide figure whose title was cut off on both sides."""
    res = lens_result(np.arange(T) % 3, np.zeros((P, T), int))
    fig = plot_lens(res, Tok(), "entropy")
    ax = fig.axes[0]
    assert inside_figure(fig, ax.title)
    assert fig.get_size_inches()[0] >= 6
    plt.close(fig)


def test_whitespace_tokens_are_visible_cells():
    top1 = np.tile(np.array([3, 4, 5, 6, 8, 7]), (P, 1))                 # " ", "  ", "\n", "\t", nbsp, " Paris"
    fig = plot_lens(lens_result([0, 1, 2, 9, 0, 1], top1), Tok(), "entropy")
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in fig.axes[0].texts}
    assert [texts[(c, 0)] for c in range(6)] == ["␣", "␣␣", "\\n", "\\t", "\\u00a0", " Paris"]
    assert all(t.strip() for t in texts.values())
    plt.close(fig)


def test_generation_legend_covers_no_curve():
    n = 20
    e5 = {"gate": "oracle", "prompts": 4, "new_tokens": n}
    for kv, drop in (("copy", 3), ("propagate", 9), ("compute", n)):
        curve = [1.0 if i < drop else 0.25 for i in range(n)]
        e5[kv] = {"agreement_by_position": curve, "identical_prefix_by_position": curve}
    fig = plot_generation(e5)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(r) if fig.legends else fig.axes[0].get_legend().get_window_extent(r)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(r))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["kv=copy", "kv=propagate", "kv=compute"]
    plt.close(fig)


def test_gate_plot_names_exit_depth():
    rows = [{"gate": "confidence:0.9,min_point=39", "mean_exit_depth": 24.0, "exit_error": 0.3},
            {"gate": "confidence:0.5,min_point=39", "mean_exit_depth": 21.0, "exit_error": 0.6},
            {"gate": "oracle", "mean_exit_depth": 26.0, "exit_error": 0.0}]
    fig = plot_gate_pareto(rows)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "mean exit depth (blocks)"
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [21.0, 24.0])
    plt.close(fig)
