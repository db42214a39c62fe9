"""The logit lens: decode every exit point of the residual stream through the final norm + LM head.

For exit point p (the residual after a sub-layer, see hooks.exit_point_names) the lens
logits are lm_head(final_norm(h_p)), h_p normalized with its own RMS. Comparing them with
the model's final prediction shows where, and how early, the answer forms.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .hooks import exit_point_names, point_label

METRICS = ("entropy", "kl", "final_prob", "final_rank", "agree", "accuracy")   # the keys of lens_metrics
METRIC_TITLES = {
    "entropy": "entropy of the lens distribution (nats)",
    "kl": "KL(final || point) (nats)",
    "final_prob": "probability of the final top-1 token",
    "agree": "top-1 equals the final top-1",
    "accuracy": "top-1 equals the next gold token",
    "final_rank": "rank of the final top-1 token",
}
LOGITS_BUDGET = 256 << 20     # bytes of float32 lens logits decoded at once: one LM-head GEMM, ~1,300 SmolLM2 rows
GROUP_BYTES = 256 << 10       # bytes of logits the statistics work on at a time (one SmolLM2 row): they stay in cache
LOG_TINY = -87.0               # exp(-87) = 1.6e-38: just above float32's smallest normal number (1.2e-38)


def log_softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logit_stats(logits, final=None, rank=False, k=0):
    """Statistics of the distributions p = softmax(z) of logits z (..., V), name -> (...):

      top1        argmax z (the first one if tied)
      zmax        max z; with logsum = log S, S = sum exp(z - zmax): log p = (z - zmax) - logsum
      logsum
      confidence  p[top1] = 1 / S
      margin      p[top1] minus the second largest probability
      entropy     -sum p log p = logsum - sum p (z - zmax)                       (nats)
      top_ids     (k > 0) the k most likely tokens (..., k), the most likely first
      top_probs   their probabilities (..., k)

    and, given `final` (final_distribution of the final logits (T, V); logits (..., T, V)), the
    comparison of each row with the final distribution q at its position:

      kl          KL(q || p) = sum q log q - sum q (z - zmax) + logsum           (nats)
      final_prob  p at the final top-1 token
      final_rank  (rank=True) how many tokens are strictly more likely than it: 0 = top

    Every statistic is a maximum or a sum over the vocabulary, so a few passes give them all (the
    top tokens one after another: the largest, then the largest of the others...). They run on a
    few rows at a time (GROUP_BYTES: one row of a large vocabulary), which stay in the CPU's
    cache: only the first pass reads the logits from memory. Sums are NumPy's pairwise float32
    sums. Probabilities below exp(LOG_TINY) = 1.6e-38 count as that (float32's denormal numbers
    below 1.2e-38 are 10x slower to compute with); this changes no statistic beyond its rounding.
    Logits of any memory layout give the same numbers (others are first copied, see c_ordered).
    """
    logits = c_ordered(np.asarray(logits, np.float32))
    z = logits.reshape(-1, *logits.shape[-2:]) if final is not None else logits.reshape(1, -1, logits.shape[-1])
    A, T, V = z.shape                                                        # A rows at each of T positions
    n_top = max(k, 2)                                                        # the top two give the margin
    sums = {"top": np.empty((A, T, n_top), np.int64), "top_z": np.empty((A, T, n_top), np.float32),
            **{name: np.empty((A, T), np.float32) for name in ("zmax", "S", "sum_ez")}}
    if final is not None:
        sums |= {name: np.empty((A, T), np.float32) for name in ("sum_qz", "e_final")}
        sums |= {"final_rank": np.empty((A, T), np.int64)} if rank else {}
    g = max(1, min(T, GROUP_BYTES // (V * 4)))                               # rows per group
    shifted, e = np.empty((g, V), np.float32), np.empty((g, V), np.float32)  # scratch, cache-sized
    for t in range(0, T, g):                      # the final distribution at these positions stays cached
        n = min(g, T - t)
        q, ft = (None, None) if final is None else (final["q"][t:t + n], final["top1"][t:t + n])
        for a in range(A):
            part = _vocabulary_sums(z[a, t:t + n], shifted[:n], e[:n], n_top, q, ft, rank)
            for name, v in part.items():
                sums[name][a, t:t + n] = v
    S, top_z = sums["S"], sums["top_z"]                                      # (A, T), (A, T, n_top): z - zmax
    logsum = np.log(S)
    s = {"top1": sums["top"][..., 0], "zmax": sums["zmax"], "logsum": logsum, "confidence": 1 / S,
         "margin": (1 - np.exp(top_z[..., 1])) / S, "entropy": logsum - sums["sum_ez"] / S}
    if k:
        s["top_ids"], s["top_probs"] = sums["top"][..., :k], np.exp(top_z[..., :k]) / S[..., None]
    if final is not None:
        s["kl"] = final["q_log_q"] - sums["sum_qz"] + logsum
        s["final_prob"] = sums["e_final"] / S
        if rank:
            s["final_rank"] = sums["final_rank"]
    shape = logits.shape[:-1]
    return {name: v.reshape(shape + v.shape[2:]) for name, v in s.items()}


def _vocabulary_sums(z, shifted, e, n_top, q=None, final_top1=None, rank=False):
    """For rows z (n, V) at n consecutive positions, computed in the scratch arrays shifted and
    e (n, V): the n_top largest z (ids "top", values "top_z" as z - zmax), zmax, S = sum e with
    e = exp(z - zmax), sum e (z - zmax) and, given the final distribution q (n, V) there and its
    top-1 ids, sum q (z - zmax), e at the final top-1 and (rank) how many z are larger there."""
    rows = np.arange(len(z))
    top, top_z = np.empty((len(z), n_top), np.int64), np.zeros((len(z), n_top), np.float32)
    top[:, 0] = z.argmax(-1)                                                 # the first maximum: reads z from memory
    zmax = z[rows, top[:, 0]]
    np.subtract(z, zmax[:, None], out=shifted)                               # z - zmax <= 0, in cache from here on
    for j in range(1, n_top):                     # the next largest: the largest once the ones before are set aside
        shifted[rows, top[:, j - 1]] = -np.inf
        top[:, j] = shifted.argmax(-1)
        top_z[:, j] = shifted[rows, top[:, j]]
    for j in reversed(range(n_top)):
        shifted[rows, top[:, j]] = top_z[:, j]
    out = {"top": top, "top_z": top_z, "zmax": zmax}
    if q is not None:
        out["sum_qz"] = np.multiply(shifted, q, out=e).sum(-1)               # NumPy's pairwise sums
        if rank:
            out["final_rank"] = (shifted > shifted[rows, final_top1][:, None]).sum(-1)
    np.exp(np.maximum(shifted, LOG_TINY, out=e), out=e)                     # (n, V) e, no denormal
    out["S"] = e.sum(-1)
    if q is not None:
        out["e_final"] = e[rows, final_top1]
    out["sum_ez"] = np.multiply(shifted, e, out=shifted).sum(-1)
    return out


def c_ordered(x, slab=256):
    """x (..., V) itself if it is C-ordered, else a C-ordered copy. A V-strided array, such as the
    GEMM output (W @ rows.T).T, holds each row's values a whole row of W apart: a plain copy (or
    any pass along V) reads one float per cache line. Copied `slab` columns at a time, what it
    reads stays in the CPU's cache (12x faster measured for a 2560 x 49,152 block)."""
    if x.flags.c_contiguous:
        return x
    rows = x.reshape(-1, x.shape[-1])                  # (M, V), a view of the GEMM's output
    out = np.empty(rows.shape, x.dtype)
    for v in range(0, x.shape[-1], slab):
        out[:, v:v + slab] = rows[:, v:v + slab]
    return out.reshape(x.shape)


def final_distribution(final_logits):
    """What the lens compares every point with, from the final logits (T, V): the probabilities
    q (T, V) (as in logit_stats, none below float32's smallest normal number), sum q log q (T,)
    (minus q's entropy), the final top-1 ids (T,), and zmax, logsum (T,) of logit_stats, with which
    log q = (final_logits - zmax) - logsum."""
    final_logits = c_ordered(final_logits)                                  # q is read row by row
    s = logit_stats(final_logits)
    log_q = (final_logits - s["zmax"][:, None]) - s["logsum"][:, None]     # (T, V)
    q = np.exp(np.maximum(log_q, LOG_TINY, out=log_q), out=log_q)
    return {"q": q, "q_log_q": -s["entropy"], "top1": s["top1"], "zmax": s["zmax"], "logsum": s["logsum"]}


def lens_metrics(point_logits, final_logits, targets=None):
    """Per-point metrics (P, T) from lens logits (P, T, V) and the final logits (T, V).

    agree: top-1 equals the final top-1; kl: KL(final || point) in nats; entropy (nats);
    final_rank: rank of the final top-1 token (0 = top); final_prob: its probability;
    accuracy (if targets (T,), the gold next ids, -1 = none): top-1 equals the gold token.
    """
    final = final_distribution(final_logits)
    return _metrics(logit_stats(point_logits, final, rank=True), final["top1"], targets)


def _metrics(s, final_top1, targets):
    """The lens metrics (METRICS) from logit_stats s (P, T) with rank=True."""
    m = {"agree": (s["top1"] == final_top1).astype(np.float32), "kl": s["kl"], "entropy": s["entropy"],
         "final_rank": s["final_rank"].astype(np.float32), "final_prob": s["final_prob"]}
    if targets is not None:
        targets = np.asarray(targets)
        acc = (s["top1"] == targets).astype(np.float32)
        m["accuracy"] = np.where(targets >= 0, acc, np.nan).astype(np.float32)
    return m


@dataclass
class LensResult:
    """The lens of one sequence: P exit points x T positions."""
    ids: list                      # input token ids (T,)
    points: list                   # exit point hook names (P,)
    top_ids: np.ndarray            # (P, T, k) top-k token ids per point and position
    top_probs: np.ndarray          # (P, T, k) their probabilities
    metrics: dict                  # name -> (P, T) float32, see lens_metrics
    final_top_ids: np.ndarray      # (T,) the model's own prediction
    token_strings: list = field(default=None)   # input tokens as text, if a tokenizer is known
    shortcut: str = None           # None: the plain lens; else which shortcut it was read through
    # what the interactive page (minee.lens_page) draws beyond the cells: a token's curve over all
    # points, for every token in a position's top-k at any point (see token_curves)
    curve_ids: np.ndarray = None   # (T, C) those tokens per position, ascending, then -1 as padding
    curve_probs: np.ndarray = None   # (P, T, C) float32: their probability at every point (0: padding)
    curve_ranks: np.ndarray = None   # (P, T, C) int32: their rank at every point, 0 = top (-1: padding)
    texts: dict = None             # token id -> text, for ids and curve_ids (None without a tokenizer)

    @property
    def labels(self):
        return [point_label(p) for p in range(len(self.points))]

    def to_json(self, tokenizer=None):
        def text(ids):
            return tokenizer.token_strings(ids) if tokenizer else None
        return {
            "ids": list(map(int, self.ids)), "tokens": self.token_strings,
            "points": self.points, "shortcut": self.shortcut, "final_top1": self.final_top_ids.tolist(),
            "top_ids": self.top_ids.tolist(),
            "top1_tokens": [text(row[:, 0]) for row in self.top_ids] if tokenizer else None,
            "top_probs": np.round(self.top_probs, 5).tolist(),
            "metrics": {k: np.round(v, 5).tolist() for k, v in self.metrics.items()},
        }

    def to_html(self, shortcut=None, metric="entropy", title=None):
        """This lens as one self-contained interactive HTML page (see minee.lens_page). shortcut:
        the same prompt's LensResult read through a shortcut, shown with a toggle; metric: the
        colour the page opens with; title: the page's heading (default "minee logit lens")."""
        from .lens_page import page
        return page([self] + ([shortcut] if shortcut is not None else []), metric, title)

    def save_html(self, path, shortcut=None, metric="entropy", title=None):
        """Write to_html(...) to `path` (UTF-8); open it in any browser, offline. Returns path."""
        Path(path).write_text(self.to_html(shortcut, metric, title), encoding="utf-8")
        return path

    def show(self, shortcut=None, metric="entropy", title=None):
        """Display the page in a Jupyter, Colab or VS Code notebook (in an isolated iframe)."""
        from IPython.display import HTML, display

        from .lens_page import iframe
        display(HTML(iframe(self.to_html(shortcut, metric, title), len(self.points))))

    def _repr_html_(self):
        """A LensResult at the end of a notebook cell shows as the interactive page."""
        from .lens_page import iframe
        return iframe(self.to_html(), len(self.points))


def exit_states(model, ids):
    """(final logits (T, V), exit-point states (P, T, D)) for one sequence in one forward pass."""
    names = exit_point_names(model.config.n_layers)
    logits, acts = model.run_with_cache(np.asarray(ids)[None], names=names)
    return logits[0], np.stack([acts[n][0] for n in names])


def point_chunks(P, T, V, budget_bytes=None):
    """Blocks (points, positions), as a pair of slices, of the P x T lens of a sequence, each of
    whose float32 logits (p, t, V) fit the memory budget (default LOGITS_BUDGET): as many whole
    points at a time as fit, or, where one point's T x V logits do not (a long sequence, a large
    vocabulary), one point at a time, split over positions. Every block is one LM-head GEMM."""
    rows = max(1, (budget_bytes or LOGITS_BUDGET) // (V * 4))     # (point, position) pairs per block
    if rows >= T:
        step = rows // T
        return [(slice(p, min(p + step, P)), slice(0, T)) for p in range(0, P, step)]
    return [(slice(p, p + 1), slice(t, min(t + rows, T))) for p in range(P) for t in range(0, T, rows)]


def point_logits(model, states, points, shortcut=None):
    """Logits (..., V) of states at exit points: lm_head(final_norm(h_p)), or, through a shortcut
    (minee.shortcuts), lm_head(final_norm(h_p @ weight[p] + bias[p])). points: one int for all
    of states (..., D), or an index array / slice along the first axis of states (n, T, D)."""
    return model.unembed(states if shortcut is None else shortcut.apply(states, points))


def decoded_stats(model, states, final, shortcut=None, rank=False, k=0):
    """logit_stats {name: (P, T)} of states (P, T, D) of every exit point in order, decoded plainly
    or through a shortcut, against `final` (final_distribution of the final logits (T, V)), and,
    if k, the top-k ids and probabilities "top_ids", "top_probs" (P, T, k).

    Each block of point_chunks goes through the LM head as one GEMM: all 2L points at once for a
    short prompt, a few points of a 256-token window, as much as the memory budget allows.
    """
    P, T, _ = states.shape
    out = {}
    for ps, ts in point_chunks(P, T, model.config.vocab_size):
        logits = point_logits(model, states[ps, ts], ps, shortcut)                   # (p, t, V)
        s = logit_stats(logits, {name: v[ts] for name, v in final.items()}, rank, k)  # name -> (p, t[, k])
        for name, v in s.items():
            out.setdefault(name, np.empty((P, T, *v.shape[2:]), v.dtype))[ps, ts] = v
    return out


def decode_points(model, states, final, targets, k=0, shortcut=None, curves=False):
    """Lens metrics {name: (P, T)} and, if k, top-k ids/probs (P, T, k) for states (P, T, D) of
    every exit point in order, decoded plainly or through a shortcut; final: the final logits (T, V).
    curves (with k): also token_curves, the followed tokens of the lens page."""
    dist = final_distribution(final)
    s = decoded_stats(model, states, dist, shortcut, rank=True, k=k)
    m = _metrics(s, dist["top1"], targets)
    if k:
        m["top_ids"], m["top_probs"] = s["top_ids"], s["top_probs"]
    if curves:
        m.update(token_curves(model, states, s, shortcut))
    return m


def token_curves(model, states, s, shortcut=None):
    """Every token in a position's top-k at any point, with its probability and rank at every point:
    what the lens page draws when a token is pinned (a curve must not stop where it left the top-k).

    states (P, T, D) of every exit point, s their decoded_stats with k. A second pass over the same
    blocks of the LM head, as the top-k must be known first. Returns curve_ids (T, C): each
    position's tokens, ascending, then -1; curve_probs (P, T, C) float32 and curve_ranks (P, T, C)
    int32 (0 = top, as in token_trajectory), 0 and -1 where curve_ids is -1.
    """
    top = s["top_ids"]                                                   # (P, T, k)
    P, T, k = top.shape
    followed = [np.unique(top[:, t]) for t in range(T)]
    ids = np.full((T, max(map(len, followed))), -1)                      # (T, C)
    for t, found in enumerate(followed):
        ids[t, :len(found)] = found
    probs = np.zeros((P, T, ids.shape[1]), np.float32)                   # (P, T, C)
    ranks = np.full((P, T, ids.shape[1]), -1, np.int32)                  # (P, T, C)
    for ps, ts in point_chunks(P, T, model.config.vocab_size):
        logits = c_ordered(point_logits(model, states[ps, ts], ps, shortcut))   # (p, t, V)
        for i, p in enumerate(range(P)[ps]):
            for j, t in enumerate(range(T)[ts]):
                z, n = logits[i, j], len(followed[t])                   # (V,)
                own = z[followed[t]]                                     # (n,) their logits
                probs[p, t, :n] = np.exp(own - s["zmax"][p, t] - s["logsum"][p, t])
                # rank = how many logits are strictly larger; NumPy sorts a row with SIMD in ~0.2 ms
                ranks[p, t, :n] = len(z) - np.searchsorted(np.sort(z), own, side="right")
    return {"curve_ids": ids, "curve_probs": probs, "curve_ranks": ranks}


def lens(model, ids, k=5, shortcut=None):
    """The lens of one sequence `ids` (T,): every exit point decoded at every position, plainly
    or through `shortcut` (minee.shortcuts.Shortcuts fitted on this model), with the top-k of each
    cell and the curve of every token in a position's top-k (token_curves) for the lens page."""
    ids = model.check_ids(ids)
    if ids.shape[0] != 1:
        raise ValueError(f"lens() reads one sequence, got a batch of {ids.shape[0]}; call it per row")
    if k < 1:
        raise ValueError(f"k (top tokens per cell) must be >= 1, got {k}")
    ids = [int(i) for i in ids[0]]
    final, states = exit_states(model, ids)                              # (T, V), (P, T, D)
    targets = np.array(ids[1:] + [-1])                                   # next gold token, none at the end
    if shortcut is not None:
        shortcut.check_model(model)
    m = decode_points(model, states, final, targets, k, shortcut, curves=True)
    curves = {name: m.pop(name) for name in ("curve_ids", "curve_probs", "curve_ranks")}
    tok = model.tokenizer
    used = sorted(set(ids) | set(curves["curve_ids"][curves["curve_ids"] >= 0].tolist()))
    return LensResult(
        ids=ids, points=exit_point_names(model.config.n_layers),
        top_ids=m.pop("top_ids"), top_probs=m.pop("top_probs"), metrics=m,
        final_top_ids=final.argmax(-1),
        token_strings=tok.token_strings(ids) if tok else None,
        shortcut=None if shortcut is None else shortcut_label(shortcut),
        **curves, texts=dict(zip(used, tok.token_strings(used))) if tok else None)


def shortcut_label(shortcut):
    """How a lens was read, for titles and JSON: e.g. 'shortcut (kl, 36864 tokens)'."""
    return f"shortcut ({shortcut.meta.get('method')}, {shortcut.meta.get('tokens')} tokens)"


def windows(n_positions, window=256, context=128):
    """Teacher-forced windows over positions 0 .. n_positions-1: (begin, start, end) triples.

    Positions start .. end-1 are scored (`window` of them, fewer in the last window); the model
    also sees up to `context` earlier positions begin .. start-1, so that no scored prediction is
    made from a cut-off context. Consecutive windows score disjoint positions, so sums over
    windows can be added in any order.
    """
    check_window(window, context)
    return [(max(0, s - context), s, min(s + window, n_positions)) for s in range(0, n_positions, window)]


def check_window(window, context=0):
    """A clear error unless window (positions scored per forward pass) is a whole number >= 1 and
    context (earlier positions each window sees, unscored) one >= 0."""
    for name, value, least, what in (("window", window, 1, "tokens scored per forward pass"),
                                     ("context", context, 0, "earlier tokens each window sees")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} ({what}) must be a whole number >= {least}, got {value!r}")


def corpus_lens(model, ids, window=256, progress=True, shortcut=None):
    """Lens metrics averaged over a long token sequence, in non-overlapping windows: name -> (P,).
    shortcut: read every point through these shortcuts instead of plainly."""
    from tqdm.auto import tqdm
    ids = np.asarray(ids)
    if len(ids) < 2:
        raise ValueError(f"corpus_lens needs at least 2 tokens (an input and its next token), got {len(ids)}")
    check_window(window)
    if shortcut is not None:
        shortcut.check_model(model)
    sums, counts = {}, {}
    starts = range(0, len(ids) - 1, window)
    for s in tqdm(starts, desc="lens", unit="window", disable=not progress):
        chunk = ids[s:s + window + 1]                      # one extra id: the last position's target
        final, states = exit_states(model, chunk[:-1])
        for name, v in decode_points(model, states, final, chunk[1:], shortcut=shortcut).items():
            sums[name] = sums.get(name, 0) + np.nansum(v, axis=1)
            counts[name] = counts.get(name, 0) + np.sum(~np.isnan(v), axis=1)
    return {name: sums[name] / counts[name] for name in sums}


@dataclass
class Trajectory:
    """How the lens ranks chosen tokens at every exit point, at one position of a sequence."""
    ids: list                      # the input token ids (T,)
    position: int                  # the position read (0 .. T-1): its lens predicts the next token
    tokens: list                   # the K token ids followed
    rank: np.ndarray               # (K, P) rank in the lens distribution, 0 = top-1
    prob: np.ndarray               # (K, P) probability in the lens distribution


def token_trajectory(model, ids, tokens, position=-1):
    """Rank and probability of each of `tokens` at every exit point, in the lens of `position`
    (default: the last one, which predicts the next token). tokens: ids, or texts of one token each
    (e.g. [" Paris", " Berlin"]). Where does the model start to favour a token, and how far down
    the list is it before that?"""
    ids = model.check_ids(ids)
    if ids.shape[0] != 1:
        raise ValueError(f"token_trajectory() reads one sequence, got a batch of {ids.shape[0]}")
    ids = [int(i) for i in ids[0]]
    T = len(ids)
    if not -T <= position < T:
        raise ValueError(f"position {position} is outside the sequence of {T} tokens (use 0 .. {T - 1} or -1)")
    wanted = [_one_token(model, t) for t in ([tokens] if isinstance(tokens, (str, int, np.integer)) else tokens)]
    _, states = exit_states(model, ids)                                  # (P, T, D)
    logits = model.unembed(states[:, position])                          # (P, V)
    own = logits[:, wanted].T                                             # (K, P)
    rank = (logits[None, :, :] > own[:, :, None]).sum(-1)                # (K, P): larger logits, 0 = top
    prob = np.exp(np.take_along_axis(log_softmax(logits), np.array(wanted)[None], -1)).T   # (K, P)
    return Trajectory(ids=ids, position=position % T, tokens=wanted, rank=rank, prob=prob)


def _one_token(model, token):
    """A token id from an id or from a text that the tokenizer encodes as exactly one token."""
    if isinstance(token, str):
        if model.tokenizer is None:
            raise ValueError(f"this model has no tokenizer, so {token!r} cannot be looked up; pass a token id")
        found = model.tokenizer.encode(token, add_special_tokens=False)
        if len(found) != 1:
            raise ValueError(f"{token!r} is {len(found)} tokens ({found}), not one; pass one of them as an id")
        token = found[0]
    return int(model.check_ids([token])[0, 0])
