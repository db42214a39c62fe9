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


def log_softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def lens_metrics(point_logits, final_logits, targets=None):
    """Per-point metrics (P, T) from lens logits (P, T, V) and the final logits (T, V).

    agree: top-1 equals the final top-1; kl: KL(final || point) in nats; entropy (nats);
    final_rank: rank of the final top-1 token (0 = top); final_prob: its probability;
    accuracy (if targets (T,), the gold next ids, -1 = none): top-1 equals the gold token.
    """
    logp = log_softmax(point_logits)                                     # (P, T, V)
    logq = log_softmax(final_logits)                                     # (T, V)
    top1, final_top1 = logp.argmax(-1), logq.argmax(-1)                  # (P, T), (T,)
    p_final = np.take_along_axis(logp, np.broadcast_to(final_top1[None, :, None], (*logp.shape[:2], 1)), -1)[..., 0]
    m = {
        "agree": (top1 == final_top1).astype(np.float32),
        "kl": (np.exp(logq) * (logq - logp)).sum(-1),
        "entropy": -(np.exp(logp) * logp).sum(-1),
        "final_rank": (logp > p_final[..., None]).sum(-1).astype(np.float32),
        "final_prob": np.exp(p_final),
    }
    if targets is not None:
        targets = np.asarray(targets)
        acc = (top1 == targets).astype(np.float32)
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


def top_k(logits, k):
    """Indices (..., k) of the k largest entries of the last axis, largest first."""
    part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logits, part, -1), axis=-1)
    return np.take_along_axis(part, order, -1)


def point_chunks(P, T, V, budget_bytes=512 << 20):
    """Split P points into slices whose (p, T, V) float32 logits fit the memory budget."""
    step = max(1, budget_bytes // (T * V * 4 * 3))      # logits, log-probs and a temporary
    return [slice(i, min(i + step, P)) for i in range(0, P, step)]


def position_chunks(P, T, V, budget_bytes=512 << 20):
    """Split T positions into slices whose (P, t, V) float32 logits fit the memory budget (at
    least one position each): token_curves needs every point of a position at once."""
    step = max(1, budget_bytes // (P * V * 4 * 4))      # logits, log-probs, their sorted copy, a temporary
    return [slice(i, min(i + step, T)) for i in range(0, T, step)]


def token_curves(logp, top):
    """Every token in a position's top-k at any point, with its probability and rank at every point:
    what the lens page draws when a token is pinned (a curve must not stop where it left the top-k).

    logp (P, T, V) log-probabilities at every point, top (P, T, k) their top-k ids. Returns
    curve_ids (T, P*k): each position's tokens, ascending, then -1; curve_probs (P, T, P*k)
    float32 and curve_ranks (P, T, P*k) int32 (0 = top), 0 and -1 where curve_ids is -1.
    """
    P, T, k = top.shape
    ids = np.full((T, P * k), -1)                                        # (T, C)
    for t in range(T):
        found = np.unique(top[:, t])
        ids[t, :len(found)] = found
    own = np.take_along_axis(logp, np.broadcast_to(np.maximum(ids, 0), (P, T, P * k)), -1)   # (P, T, C)
    ordered = np.sort(logp, axis=-1)                                     # (P, T, V) ascending
    above = np.array([[np.searchsorted(ordered[p, t], own[p, t], side="right") for t in range(T)]
                      for p in range(P)])                                # (P, T, C): entries <= each
    pad = ids < 0                                                        # (T, C)
    return {"curve_ids": ids,
            "curve_probs": np.where(pad, 0, np.exp(own)).astype(np.float32),
            "curve_ranks": np.where(pad, -1, logp.shape[-1] - above).astype(np.int32)}


def point_logits(model, states, points, shortcut=None):
    """Logits (..., V) of states at exit points: lm_head(final_norm(h_p)), or, through a shortcut
    (minee.shortcuts), lm_head(final_norm(h_p @ weight[p] + bias[p])). points: one int for all
    of states (..., D), or an index array / slice along the first axis of states (n, T, D)."""
    return model.unembed(states if shortcut is None else shortcut.apply(states, points))


def decode_points(model, states, final, targets, k=0, shortcut=None, curves=False):
    """Lens metrics {name: (P, T)} and, if k, top-k ids/probs (P, T, k) for states (P, T, D) of
    every exit point in order, decoded plainly or through a shortcut.

    All positions of a group of points go through the LM head as one matmul; groups are
    only as small as memory requires (all 2L points at once for a short prompt).
    curves (with k): also token_curves, which needs all points at once: the caller passes only
    as many positions as fit in memory (position_chunks).
    """
    P, T, _ = states.shape
    parts = []
    for sl in [slice(0, P)] if curves else point_chunks(P, T, model.config.vocab_size):
        logits = point_logits(model, states[sl], sl, shortcut)             # (p, T, V)
        m = lens_metrics(logits, final, targets)
        if k:
            top = top_k(logits, k)
            logp = log_softmax(logits)                                     # (p, T, V)
            m["top_ids"] = top
            m["top_probs"] = np.exp(np.take_along_axis(logp, top, -1))
            if curves:
                m.update(token_curves(logp, top))
        parts.append(m)
    return {name: np.concatenate([m[name] for m in parts]) for name in parts[0]}


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
    parts = [decode_points(model, states[:, s], final[s], targets[s], k, shortcut, curves=True)
             for s in position_chunks(*states.shape[:2], model.config.vocab_size)]
    m = {name: np.concatenate([part[name] for part in parts], axis=0 if name == "curve_ids" else 1)
         for name in parts[0]}                                           # joined along the positions
    C = (m["curve_ids"] >= 0).sum(1).max()                               # the longest list; the rest is padding
    curves = {name: m.pop(name)[..., :C] for name in ("curve_ids", "curve_probs", "curve_ranks")}
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
    logp = log_softmax(model.unembed(states[:, position]))              # (P, V)
    own = logp[:, wanted].T                                               # (K, P)
    rank = (logp[None, :, :] > own[:, :, None]).sum(-1)                  # (K, P)
    return Trajectory(ids=ids, position=position % T, tokens=wanted, rank=rank, prob=np.exp(own))


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
