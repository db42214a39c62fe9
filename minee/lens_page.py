"""The logit lens as one self-contained, interactive HTML page.

`LensResult.to_html()`, `save_html(path)` and `show()` (and `python -m minee lens ... --html FILE`)
make a page that needs no server, no network and no CDN: open the file in any browser, offline.
It draws the exit points x positions grid coloured by a metric the reader picks, each cell's top-1
token; hovering (or tapping) a cell lists its top-k tokens, and a token clicked there is pinned:
its probability and rank at every exit point are drawn below the grid. A plain lens and a lens
read through shortcuts are shown with a toggle.

The page is hand-written (minee/data/lens_page.html and lens_page.js, about 450 lines) rather
than drawn by a plotting library: it needs only a grid of coloured cells, a tooltip and two line
charts, so a library would add hundreds of kilobytes to every page and a licence to carry, and
the script is short enough to read and to check for the one rule that keeps it safe:

Every string in the page (tokens, prompt, labels) comes from a model or from a user, so none is
written into the HTML. The data goes in <script type="application/json"> with <, > and & written
as \\u003c, \\u003e, \\u0026 (and all non-ASCII as \\u escapes), and the script puts strings into
the page only as textContent, never as HTML. The page's Content-Security-Policy loads nothing
from anywhere and runs only its own script, by hash.

The data, per lens: metrics (P, T) float32; each cell's top-k as an index into its position's list
of followed tokens (curve_ids, see minee.lens.token_curves) and their probabilities, float32; each
followed token's curve, P values of -ln p in 1/1000 nat (uint16, saturating at 65.5 nats) and of
its rank (uint16: exact below 32768, beyond that in steps of 0.05%). Arrays are little-endian,
zlib-compressed (inflated by the browser's DecompressionStream: any browser from 2023 on) and
base64-encoded; token texts are one shared table. A 60-point x 64-token lens of SmolLM2 with its
top-5 takes 0.6 to 0.7 MB.
"""
import base64
import hashlib
import html
import json
import unicodedata
import zlib
from pathlib import Path

import numpy as np

from .lens import METRIC_TITLES, METRICS

DATA_DIR = Path(__file__).parent / "data"
LOGP_SCALE = 1000              # curve code = round(-ln p * LOGP_SCALE), at most 65535
RANK_EXACT = 1 << 15           # curve ranks below this are stored exactly ...
RANK_SCALE = 2048              # ... larger ones as RANK_EXACT + RANK_SCALE * ln(rank / RANK_EXACT)


def page(results, metric="entropy", title=None):
    """The HTML page (a str) of one or more LensResults of the same sequence (e.g. plain, then
    through shortcuts), opening coloured by `metric`, with heading `title`."""
    first = results[0]
    for r in results:
        if r.curve_ids is None:
            raise ValueError("this LensResult has no token curves (curve_ids); make it with minee.lens.lens()")
        if r.ids != first.ids or r.points != first.points:
            raise ValueError(f"the lenses shown together must be of the same sequence and model ({len(r.ids)} "
                             f"vs {len(first.ids)} tokens, {len(r.points)} vs {len(first.points)} points)")
    metrics = [name for name in METRICS if all(name in r.metrics for r in results)]
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(metrics)}")
    index, table = token_table(results)
    data = {
        "title": title or "minee logit lens", "metric": metric,
        "metrics": [[name, METRIC_TITLES[name]] for name in metrics],
        "points": first.labels, "inputs": [index[i] for i in first.ids], **table,
        "logp_scale": LOGP_SCALE, "rank_exact": RANK_EXACT, "rank_scale": RANK_SCALE,
        "lenses": [lens_json(r, index, metrics) for r in results],
    }
    script = (DATA_DIR / "lens_page.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    template = (DATA_DIR / "lens_page.html").read_text(encoding="utf-8")
    # the data goes in last, so that nothing in it is ever read as one of the other markers
    return (template.replace("{{SCRIPT_HASH}}", digest).replace("{{SCRIPT}}", script)
            .replace("{{DATA}}", script_json(data)))


def token_table(results):
    """(token id -> row, {"ids": [...], "texts": [...]}): every token the page names, inputs and
    followed tokens of every lens, as visible text (or #id without a tokenizer)."""
    ids = sorted(set(results[0].ids).union(*(r.curve_ids[r.curve_ids >= 0].tolist() for r in results)))
    texts = {}
    for r in results:
        texts.update(r.texts or {})
    shown = [visible(texts[i]) if i in texts else f"#{i}" for i in ids]
    return {i: row for row, i in enumerate(ids)}, {"ids": ids, "texts": shown}


def lens_json(result, index, metrics):
    """One lens for the page: metrics, each cell's top-k and each followed token's curve, packed."""
    P, T, k = result.top_ids.shape
    counts = (result.curve_ids >= 0).sum(1)                              # (T,) tokens followed per position
    local = np.stack([np.searchsorted(result.curve_ids[t, :counts[t]], result.top_ids[:, t])
                      for t in range(T)], axis=1)                        # (P, T, k) row in its position's list
    followed = result.curve_ids >= 0                                     # (T, C)
    probs = result.curve_probs.transpose(1, 2, 0)[followed]              # (N, P): one curve per row,
    ranks = result.curve_ranks.transpose(1, 2, 0)[followed]              # positions in order
    with np.errstate(divide="ignore"):
        logp = np.minimum(np.round(-np.log(probs.astype(np.float64)) * LOGP_SCALE), 65535)     # (N, P)
    far = RANK_EXACT + np.round(RANK_SCALE * np.log(np.maximum(ranks, 1) / RANK_EXACT))
    return {
        "label": result.shortcut or "plain lens", "k": k,
        "metrics": {name: packed(result.metrics[name], "<f4") for name in metrics},
        "offsets": np.concatenate([[0], np.cumsum(counts)]).tolist(),   # (T + 1,) position t: rows offsets[t] ..
        "tokens": [index[i] for i in result.curve_ids[followed].tolist()],   # (N,) each row's token
        "top": packed(local, "<u2"), "top_probs": packed(result.top_probs, "<f4"),
        "logp": packed(logp, "<u2"),
        "rank": packed(np.where(ranks < RANK_EXACT, ranks, np.minimum(far, 65535)), "<u2"),
    }


def packed(values, dtype):
    """A NumPy array as base64 text of its bytes in `dtype` (little-endian, C order), compressed
    with zlib (the page inflates them with the browser's own DecompressionStream)."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(values, dtype).tobytes(), 9)).decode("ascii")


def visible(text):
    """A token as text that shows every character: a space as ␣, newlines, tabs, other control,
    format and separator characters as escapes (\\n, \\x00, \\u200b), the empty token as ∅."""
    out = "".join("␣" if c == " " else c.encode("unicode_escape").decode("ascii")
                  if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return out or "∅"


def script_json(data):
    """JSON that can stand inside <script type="application/json">: ASCII only, and no <, > or &
    (which could close the element or open a comment), each written as a \\u escape."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def iframe(page_html, n_points):
    """The page for a notebook cell: an <iframe srcdoc> (the page attribute-escaped) sandboxed to
    run scripts without the notebook's origin, so its script cannot reach the notebook or kernel.
    (In a <div>: IPython's HTML() warns about a bare iframe.)"""
    height = min(1100, 430 + 17 * n_points)
    return (f'<div><iframe srcdoc="{html.escape(page_html, quote=True)}" sandbox="allow-scripts" '
            f'style="width: 100%; height: {height}px; border: 1px solid #ddd"></iframe></div>')
