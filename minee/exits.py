"""Early exit without extra heads: decode from an intermediate exit point through the model's
own final norm + LM head, decide when with a gate, and fill the keys/values that the skipped
layers never computed.

Exit points p = 0 .. 2L-1 (see hooks.py): p = 2l after block l's attention, p = 2l+1 after its
FFN. The last point 2L-1 is the full model. A Gate looks at features of the residual state at
each candidate point (confidence, margin, entropy, top-1, cosine to the previous state) and
says "exit here" or "go on".
"""
import json
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .lens import logit_stats, point_logits
from .limits import MAX_GATE_FILE

GATE_KINDS = ("fixed", "confidence", "margin", "entropy", "patience", "cosine", "learned", "oracle")
LOGIT_GATES = ("confidence", "margin", "entropy", "patience", "learned")   # need the LM head to decide
KV_MODES = ("copy", "propagate", "compute")                                 # how skipped blocks get keys/values
FEATURES = ("confidence", "margin", "entropy", "cosine", "depth")          # inputs of the learned gate


# ------------------------------------------------------------------ gates

def default_min_point(n_points):
    """First point a gate checks unless told otherwise: the start of the network's last third.

    At the first points the lens of a tied-embedding model repeats the input token with
    near-certainty (SmolLM2: 99% of tokens at point 0, confidence 0.99), so a gate allowed to look
    there exits at once with the wrong token. For SmolLM2 (60 points) this is point 39, after
    block 19."""
    return 2 * n_points // 3 - 1


@dataclass
class Gate:
    """When to leave the network. kind in GATE_KINDS; value: threshold, point (fixed),
    K (patience) or the parameter dict of a learned gate. Options for the deciding gates:
    min_point (first candidate; None = default_min_point), check_every (check every n-th
    candidate), attn_points (whether after-attention points p = 2l are candidates or only
    block outputs). Settings no model could use are errors here; settings this model cannot
    use are errors in candidates()."""
    kind: str
    value: object = None
    min_point: int = None
    check_every: int = 1
    attn_points: bool = True

    def __post_init__(self):
        _check_kind(self.kind)
        if self.kind in _RANGES:
            ok, wanted = _RANGES[self.kind]
            if not ok(self.value):
                raise ValueError(f"gate {self.kind}:{self.value} needs {wanted} (e.g. {self.kind}:{_EXAMPLES[self.kind]})")
        if not self.decides:
            if (self.min_point, self.check_every, self.attn_points) != (None, 1, True):
                raise ValueError(f"the {self.kind} gate takes no min_point, check_every or attn_points option")
        elif self.min_point is not None and not self.min_point >= 0:
            raise ValueError(f"min_point must be an exit point >= 0, got {self.min_point}")
        if not self.check_every >= 1:
            raise ValueError(f"check_every must be >= 1 (1 = check every candidate point), got {self.check_every}")

    @property
    def needs_logits(self):
        return self.kind in LOGIT_GATES

    @property
    def decides(self):
        """Whether the gate decides at candidate points (all but fixed and oracle): those take the options."""
        return self.kind not in ("fixed", "oracle")

    def first_point(self, n_points):
        """min_point, or the default for a model with n_points exit points."""
        return default_min_point(n_points) if self.min_point is None else self.min_point

    def candidates(self, n_points):
        """Exit points this gate checks, in order, on a model with n_points exit points. The last
        point (the full model) is the fallback and is never checked; fixed:P has the one point P;
        the oracle looks at every point. A setting that could never exit here is an error."""
        last = n_points - 1
        if self.kind == "oracle":
            return list(range(n_points))
        if self.kind == "fixed":
            if self.value > last:
                raise ValueError(f"fixed:{self.value} is beyond this model's last exit point; use fixed:0 .. fixed:{last}")
            return [self.value]
        start = self.first_point(n_points)
        if start >= last:
            raise ValueError(f"min_point={start} leaves the gate nothing to check: this model's exit points are "
                             f"0 .. {last}, and {last} is the full model; use min_point=0 .. {last - 1}")
        pts = [p for p in range(start, last) if self.attn_points or p % 2 == 1][self.check_every - 1::self.check_every]
        if not pts:
            raise ValueError(f"gate {self} checks no exit point before the last one ({last}) on this model; "
                             "lower check_every or min_point")
        if self.kind == "patience" and self.value > len(pts):
            raise ValueError(f"patience:{self.value} needs {self.value} checked points, but the gate checks only "
                             f"{len(pts)} ({pts[0]} .. {pts[-1]}); lower K or min_point")
        return pts

    def decide(self, f):
        """Exit decision from features f (arrays of any common shape) -> bool array."""
        k, v = self.kind, self.value
        if k == "confidence":
            return f["confidence"] >= v
        if k == "margin":
            return f["margin"] >= v
        if k == "entropy":
            return f["entropy"] <= v
        if k == "patience":
            return f["run"] >= v
        if k == "cosine":
            return f["cosine"] >= v
        if k == "learned":
            return learned_prob(v, f) >= v["threshold"]
        if k == "fixed":
            return np.ones_like(f["depth"], dtype=bool)
        raise ValueError(f"gate {k!r} decides from the full pass (oracle), not from features")

    def __str__(self):
        """The spec string parse_gate reads back (options only where not the default)."""
        learned = self.kind == "learned"
        value = "" if self.value is None else f":{self.value.get('path', '<unsaved>') if learned else self.value}"
        opts = [f",min_point={self.min_point}"] * (self.min_point is not None)
        opts += [f",check_every={self.check_every}"] * (self.check_every != 1)
        opts += [",attn_points=0"] * (not self.attn_points)
        return self.kind + value + "".join(opts)


def parse_gate(spec):
    """A Gate from a CLI spec: KIND[:VALUE][,min_point=N][,check_every=N][,attn_points=0|1].

    e.g. "confidence:0.9", "patience:3,attn_points=0", "fixed:40", "learned:gate.json", "oracle".
    """
    if isinstance(spec, Gate):
        return spec
    head, *opts = str(spec).split(",")
    kind, _, value = head.partition(":")
    _check_kind(kind)
    if kind != "oracle" and not value:
        raise ValueError(f"gate {kind!r} needs a value, e.g. {kind}:{_EXAMPLES[kind]}")
    kwargs = {}
    for opt in opts:
        name, _, v = opt.partition("=")
        if name not in ("min_point", "check_every", "attn_points") or not v:
            raise ValueError(f"gate option {opt!r} not understood; use min_point=N, check_every=N, attn_points=0|1")
        number = _number(v, int, name, f"{name}=1")
        kwargs[name] = bool(number) if name == "attn_points" else number
    if kind == "oracle":
        if value:
            raise ValueError("the oracle gate takes no value; write just 'oracle'")
        parsed = None
    elif kind == "learned":
        parsed = load_learned_gate(value)
    else:
        parsed = _number(value, int if kind in ("fixed", "patience") else float, f"gate {kind!r}",
                         f"{kind}:{_EXAMPLES[kind]}")
    return Gate(kind, parsed, **kwargs)


def _check_kind(kind):
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate {kind!r}; choose from {', '.join(GATE_KINDS)} "
                         "(e.g. confidence:0.9, entropy:1.5, patience:3, cosine:0.95, fixed:40, oracle)")


def _number(text, kind, what, example):
    """int(text) or float(text), or an error naming what needed the number."""
    try:
        return kind(text)
    except ValueError:
        need = "an integer" if kind is int else "a number"
        raise ValueError(f"{what} needs {need}, got {text!r} (e.g. {example})") from None


_EXAMPLES = {"fixed": 40, "confidence": 0.9, "margin": 0.5, "entropy": 1.0, "patience": 3,
             "cosine": 0.95, "learned": "gate.json"}
_RANGES = {   # kind -> (test of the value, what it must be); NaN fails every test
    "confidence": (lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    "margin": (lambda v: 0 < v <= 1, "a probability difference in (0, 1]"),
    "entropy": (lambda v: 0 <= v < math.inf, "a finite entropy in nats >= 0"),
    "cosine": (lambda v: -1 < v <= 1, "a cosine in (-1, 1]"),
    "patience": (lambda v: v >= 1, "a count K >= 1"),
    "fixed": (lambda v: v >= 0, "an exit point >= 0"),
}


def check_kv_mode(kv):
    if kv not in KV_MODES:
        raise ValueError(f"unknown kv fill {kv!r}; choose from {', '.join(KV_MODES)}")


# ------------------------------------------------------------------ features

def cosine(a, b):
    """Cosine similarity of states a, b (..., D) along D."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def patience_runs(top1, checked):
    """run[i] = how many consecutive checked points up to i (axis 0) share point i's top-1."""
    run = np.zeros(top1.shape, dtype=np.int64)
    prev, count = None, None
    for i in range(top1.shape[0]):
        if not checked[i]:
            continue
        count = 1 if prev is None else np.where(top1[i] == prev, count + 1, 1)
        run[i], prev = count, top1[i]
    return run


# ------------------------------------------------------------------ the learned gate

def learned_prob(params, f):
    """P(exiting here gives the final token) from a logistic regression on FEATURES."""
    x = np.stack([f[n] for n in params["features"]], axis=-1)
    z = ((x - params["mean"]) / params["std"]) @ params["w"] + params["b"]
    return 1.0 / (1.0 + np.exp(-z))


def train_learned_gate(features, labels, threshold=0.5, l2=1e-3, iters=50):
    """Fit the logistic-regression gate by Newton's method. features: name -> (N,) arrays
    (FEATURES); labels (N,) 1 where exiting gives the final model's token. Returns the params dict."""
    x = np.stack([np.asarray(features[n], np.float64) for n in FEATURES], axis=-1)
    y = np.asarray(labels, np.float64)
    if len(y) == 0:
        raise ValueError("no training examples: the learned gate needs at least one token at one exit point")
    if not np.isfinite(x).all():
        raise ValueError("the training features contain NaN or infinity")
    if y.min() == y.max():
        raise ValueError(f"all {len(y)} training labels are {int(y[0])}: a gate learns only from both safe and "
                         "unsafe exits; train on more tokens or on other exit points")
    check_threshold(threshold, "threshold")
    mean, std = x.mean(0), x.std(0) + 1e-8
    X = np.hstack([(x - mean) / std, np.ones((len(x), 1))])           # (N, F+1), last column: bias
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        grad = X.T @ (p - y) / len(y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(y) + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return {"features": list(FEATURES), "mean": mean, "std": std, "w": w[:-1], "b": float(w[-1]),
            "threshold": float(threshold)}


LEARNED_FIELDS = ("features", "mean", "std", "w", "b", "threshold")


def check_threshold(t, where):
    if not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ValueError(f"{where} must be a probability in (0, 1), got {t!r}")


def learned_params(raw, source):
    """The learned gate's parameters from a dict as saved, checked: the fields LEARNED_FIELDS,
    one finite number per feature in mean/std/w, std > 0, a threshold in (0, 1). `source` names
    where they came from in the errors. Returns a new dict with NumPy arrays."""
    fix = "write gate files with `python -m minee train-gate --out FILE`"
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object with the fields {', '.join(LEARNED_FIELDS)}; {fix}")
    missing = [k for k in LEARNED_FIELDS if k not in raw]
    extra = [k for k in raw if k not in LEARNED_FIELDS and k != "path"]
    if missing or extra:
        problems = [f"missing field(s) {', '.join(missing)}"] * bool(missing)
        problems += [f"unknown field(s) {', '.join(map(str, extra))}"] * bool(extra)
        raise ValueError(f"{source}: {'; '.join(problems)}; {fix}")
    names = raw["features"]
    if (not isinstance(names, list) or not names or len(set(map(str, names))) != len(names)
            or not all(n in FEATURES for n in names)):
        raise ValueError(f"{source}: field 'features' must list distinct names from {', '.join(FEATURES)}")
    params = {"features": list(names)}
    for k in ("mean", "std", "w"):
        try:
            a = np.array(raw[k], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):          # OverflowError: a whole number beyond float64
            a = None
        if a is None or a.shape != (len(names),) or not np.isfinite(a).all():
            raise ValueError(f"{source}: field {k!r} must be {len(names)} finite numbers, one per feature")
        params[k] = a
    if not (params["std"] > 0).all():
        raise ValueError(f"{source}: field 'std' must be > 0")
    if not (isinstance(raw["b"], (int, float)) and abs(raw["b"]) <= sys.float_info.max):    # exact, even for huge ints
        raise ValueError(f"{source}: field 'b' must be a finite number")
    check_threshold(raw["threshold"], f"{source}: field 'threshold'")
    params["b"], params["threshold"] = float(raw["b"]), float(raw["threshold"])
    return params


def save_learned_gate(params, path):
    """Write the gate as JSON (checked first: a gate that could not be loaded is never written)."""
    checked = learned_params(params, "the gate to save")
    with open(path, "w") as f:
        json.dump({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in checked.items()}, f, indent=1)


def load_learned_gate(path):
    """A learned gate's parameters from its JSON file, checked (see learned_params)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"learned gate file {path} not found; train one with "
                                f"`python -m minee train-gate --out {path}`")
    if path.stat().st_size > MAX_GATE_FILE:
        raise ValueError(f"learned gate file {path} is {path.stat().st_size:,} bytes; a gate file is a few "
                         "hundred bytes, so this is not one")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:     # not UTF-8, not JSON, a number of over 4,300 digits, deep nesting
        raise ValueError(f"learned gate file {path} is not valid JSON ({e})") from None
    params = learned_params(raw, f"learned gate file {path}")
    params["path"] = str(path)
    return params


# ------------------------------------------------------------------ cost model

def flops(config, S):
    """Estimated multiply-add FLOPs (x2) of each piece of one decoded token with S cached positions."""
    D, F, V, hd = config.d_model, config.d_ff, config.vocab_size, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    return {"attn": 2 * D * (2 * q + 2 * kv) + 4 * q * S, "mlp": 6 * D * F,
            "lm_head": 2 * D * V, "kv_project": 4 * D * kv, "shortcut": 2 * D * D}


# ------------------------------------------------------------------ one early-exit decode step

@dataclass
class ExitStats:
    """One entry per decoded token, in decoding order: its exit point, the sub-layers computed for
    it, the LM heads and shortcut products run for it, and its estimated FLOPs. Rows decoded
    together each count their own. For the oracle the costs are hindsight figures (hindsight=True):
    what a gate that knew each token's stable point would have paid, not the full pass the oracle
    ran to find it."""
    points: list = field(default_factory=list)
    sublayers: list = field(default_factory=list)
    lm_head_calls: list = field(default_factory=list)
    shortcut_calls: list = field(default_factory=list)
    flops: list = field(default_factory=list)
    hindsight: bool = False

    def record(self, **step):
        """Append one decode step's tokens: each field's values as an array (n,), one per row."""
        for name, values in step.items():
            getattr(self, name).extend(np.asarray(values).tolist())

    def full_pass(self, config, S):
        """Record tokens decoded by the whole model (plain decoding), one per row, with S (n,)
        positions attended."""
        S = np.asarray(S).reshape(-1)
        f = flops(config, S)
        n, L = len(S), config.n_layers
        self.record(points=np.full(n, 2 * L - 1), sublayers=np.full(n, 2 * L), lm_head_calls=np.ones(n, int),
                    shortcut_calls=np.zeros(n, int), flops=L * (f["attn"] + f["mlp"]) + f["lm_head"])

    def subset(self, index):
        """The stats of the tokens at these indices (e.g. one prompt's tokens of a batch)."""
        per_token = {f.name: [getattr(self, f.name)[i] for i in index] for f in fields(self) if f.name != "hindsight"}
        return ExitStats(**per_token, hindsight=self.hindsight)

    def summary(self, config):
        """Per decoded token: exit point and depth (blocks, (p + 1) / 2), blocks computed, share
        that left early, LM-head calls, FLOPs. None when no token was decoded (the first new token
        comes from the prompt's pass)."""
        pts = np.array(self.points, dtype=float)
        n = len(pts)

        def mean(values):
            return float(np.sum(values)) / n if n else None

        return {"mean_exit_point": mean(pts), "mean_exit_depth": mean((pts + 1) / 2),
                "mean_blocks_computed": mean(np.asarray(self.sublayers) / 2),
                "share_early": mean(pts < 2 * config.n_layers - 1),
                "lm_head_calls_per_token": mean(self.lm_head_calls),
                "shortcut_calls_per_token": mean(self.shortcut_calls), "flops_per_token": mean(self.flops),
                "hindsight": self.hindsight}


class ExitDecoder:
    """Decodes one position at a time with early exit; keeps the gate's settings and the stats.

    step_batch(tokens, kv, rows) runs the sub-layers in order for n sequences at once, checks the
    gate at its candidate points, keeps each row's state at the point where it exits, fills the
    skipped blocks' keys/values (kv mode) and returns the logits (n, V) at the exit points. A row
    that exited drops out: the deeper sub-layers run on the rows still going (gathered, computed,
    scattered back), and the gate checks only them. kv="compute" is the exception: it finishes
    every block of every row for an exact cache. step(token, kv) is one sequence.

    shortcut (minee.shortcuts.Shortcuts): decode an early exit point p through its affine map,
    lm_head(final_norm(h_p @ weight[p] + bias[p])), for the gate's features and for the token.
    The skipped blocks' keys/values are still filled from the exit state h_p itself (propagate)
    or the exit block's K/V (copy): the map estimates the *last* state, which no block's K/V
    projection sees, while h_p is the input the next block really expects
    (docs/reproduction.md, E7, measures the alternative).

    hooks: {hook name: fn(x, name)} as for Model.forward, called at hook_embed and at every block
    point a step computes (on the rows that compute it); hook_final_norm belongs to plain passes.
    """

    def __init__(self, model, gate, kv="copy", shortcut=None, hooks=None):
        check_kv_mode(kv)
        if shortcut is not None:
            shortcut.check_model(model)
        self.model, self.kv_mode, self.shortcut = model, kv, shortcut
        self.hook = model.hook_caller(hooks)
        self.n_points = 2 * model.config.n_layers
        gate = parse_gate(gate)
        if gate.min_point is None and gate.decides:
            gate = replace(gate, min_point=gate.first_point(self.n_points))    # the stats name the point used
        self.gate = gate
        self.candidates = set(gate.candidates(self.n_points))                  # errors for impossible settings
        self.stats = ExitStats(hindsight=gate.kind == "oracle")

    def sublayer(self, p, x, positions, kv, rows=None):
        """Residual after exit point p given the residual before it: x (n, 1, D) at positions (n, 1)
        of cache rows `rows` (default all), through Model.sublayer with the decoder's hooks."""
        return self.model.sublayer(p, x, positions, kv, rows, self.hook)

    def step(self, token, kv):
        """One token of one sequence -> (logits (V,), exit point)."""
        logits, points = self.step_batch([token], kv)
        return logits[0], int(points[0])

    def step_batch(self, tokens, kv, rows=None):
        """One new position for each of n sequences living in cache rows `rows` (default all):
        tokens (n,) -> logits (n, V), exit points (n,)."""
        tokens = np.asarray(tokens).reshape(-1)
        rows = np.arange(kv.batch_size) if rows is None else np.asarray(rows)     # (n,) cache rows
        positions = self.model.positions(len(tokens), 1, kv, rows)                 # (n, 1)
        S = positions[:, 0] + 1                                                    # (n,) positions attended
        self.cost = {k: np.broadcast_to(v, S.shape) for k, v in flops(self.model.config, S).items()}
        self.tally = {"sublayers": np.zeros(len(S), np.int64), "lm_head_calls": np.zeros(len(S), np.int64),
                      "shortcut_calls": np.zeros(len(S), np.int64), "flops": np.zeros(len(S))}   # this step's cost per row
        x = self.hook("hook_embed", self.model.embed(tokens[:, None]))               # (n, 1, D)
        run = self._oracle if self.gate.kind == "oracle" else self._gated
        points, states, logits = run(x, positions, kv, rows)
        self.fill_skipped(points, states, positions, kv, rows)
        kv.advance(1, rows)
        self.stats.record(points=points, **self.tally)
        return logits, points

    def _run(self, p, x, positions, kv, rows, on):
        """sublayer() for the rows `on` of the step (x, positions and rows already taken at `on`),
        with its cost charged to them."""
        self.tally["sublayers"][on] += 1
        self.tally["flops"][on] += self.cost["attn" if p % 2 == 0 else "mlp"][on]
        return self.sublayer(p, x, positions, kv, rows)

    def _decode(self, x, points, on):
        """Logits (k, V) of the states x (k, 1, D) of the rows `on` at exit points (k,), through the
        shortcut if any (except at the last point, where it is the identity), with their costs
        charged to those rows."""
        self.tally["lm_head_calls"][on] += 1
        self.tally["flops"][on] += self.cost["lm_head"][on]
        if self.shortcut is None:
            return self.model.unembed(x)[:, -1]
        early = points < self.n_points - 1
        self.tally["shortcut_calls"][on[early]] += 1
        self.tally["flops"][on[early]] += self.cost["shortcut"][on[early]]
        x = x.copy()
        x[early] = self.shortcut.apply(x[early], points[early])              # (k_early, 1, D)
        return self.model.unembed(x)[:, -1]

    def _gated(self, x, positions, kv, rows):
        """Run sub-layers until every row's gate said exit at a candidate point (or the last point).

        Returns exit points (n,), exit states (n, 1, D) and their logits (n, V)."""
        n, last = len(x), self.n_points - 1
        points, states = np.full(n, last), x.copy()
        done, decoded = np.zeros(n, bool), np.zeros(n, bool)          # exited; logits already computed
        logits = np.zeros((n, self.model.config.vocab_size), np.float32)
        prev_top1, run = np.full(n, -1), np.zeros(n, dtype=np.int64)
        for p in range(self.n_points):
            on = self.computing(done)
            if not on.size:
                break
            check = p in self.candidates and p != last
            before = x.copy() if check else None                      # (n, 1, D) for the cosine feature
            x[on] = self._run(p, x[on], positions[on], kv, rows[on], on)   # gather, compute, scatter back
            if not check:
                continue
            live = np.flatnonzero(~done)                              # rows the gate still checks
            f = {"depth": np.full(len(live), p / last), "cosine": cosine(x[live, 0], before[live, 0])}
            if self.gate.needs_logits:
                logits[live] = self._decode(x[live], np.full(len(live), p), live)
                f.update(logit_stats(logits[live]))                  # confidence, margin, entropy, top1
                run[live] = np.where(f["top1"] == prev_top1[live], run[live] + 1, 1)
                prev_top1[live], f["run"] = f["top1"], run[live]
            exit_now = live[np.asarray(self.gate.decide(f), dtype=bool)]
            points[exit_now], states[exit_now] = p, x[exit_now]
            decoded[exit_now] = self.gate.needs_logits
            done[exit_now] = True
        states[~done] = x[~done]
        undecoded = np.flatnonzero(~decoded)
        if undecoded.size:
            logits[undecoded] = self._decode(states[undecoded], points[undecoded], undecoded)
        return points, states, logits

    def computing(self, done):
        """Rows of the step that compute the next sub-layer, given which have exited (done (n,)):
        those still going; every row with kv="compute", which finishes all blocks for an exact cache."""
        return np.arange(len(done)) if self.kv_mode == "compute" else np.flatnonzero(~done)

    def _oracle(self, x, positions, kv, rows):
        """Run every point, then exit in hindsight at each row's first point from which the top-1
        (through the shortcut, if any) stays final. The stats count what an ideal gate would pay:
        the sub-layers up to p (all of them with kv="compute"), one LM head (and one shortcut)."""
        states = []
        for p in range(self.n_points):
            x = self.sublayer(p, x, positions, kv, rows)
            states.append(x[:, 0])
        states = np.stack(states)                                          # (P, n, D)
        points = self._stable_points(states)                               # (n,)
        paid = np.full_like(points, self.n_points - 1) if self.kv_mode == "compute" else points
        every = np.arange(len(points))
        sub = np.stack([self.cost["attn" if q % 2 == 0 else "mlp"] for q in range(self.n_points)])  # (P, n)
        self.tally["flops"] += np.cumsum(sub, axis=0)[paid, every]
        self.tally["sublayers"] += paid + 1
        exit_states = states[points, every][:, None]                       # (n, 1, D)
        return points, exit_states, self._decode(exit_states, points, every)

    def _stable_points(self, states, chunk=4):
        """stable_point of every row from its states (P, n, D), decoded (through the shortcut, if
        any) from the last point backwards, a chunk of points at a time, stopping once every row
        has met a top-1 that differs from its final one: a token that settles late (most of them)
        costs a few LM heads instead of P."""
        top1 = np.empty(states.shape[:2], dtype=np.int64)                  # (P, n), filled from the end
        known = self.n_points                                              # top1[known:] is decoded
        while known > 0 and not (top1[known:] != top1[-1]).any(0).all():
            lo = max(0, known - chunk)
            top1[lo:known] = point_logits(self.model, states[lo:known], slice(lo, known), self.shortcut).argmax(-1)
            known = lo
        return known + stable_point(top1[known:])

    def fill_skipped(self, points, states, positions, kv, rows):
        """Keys/values at each row's new position for the blocks after its exit block (points // 2).

        compute: nothing to do, every block ran for every row. Otherwise a row stopped computing
        at its exit, so no block after its exit block has keys/values at this position: each is
        written here."""
        if self.kv_mode == "compute":
            return
        l_exit, pos = points // 2, positions[:, 0]                             # (n,), (n,)
        for l in range(1, self.model.config.n_layers):
            i = np.flatnonzero(l_exit < l)                                     # rows of the step that skipped block l
            if not i.size:
                continue
            r = rows[i]                                                        # their cache rows
            if self.kv_mode == "copy":                 # the exit block's K/V, reused in every deeper block
                kv.keys[l, r, :, pos[i]] = kv.keys[l_exit[i], r, :, pos[i]]
                kv.values[l, r, :, pos[i]] = kv.values[l_exit[i], r, :, pos[i]]
            else:                                      # propagate (CALM): the exit state through block l's K/V projections
                k, v = kv_projection(self.model, l, states[i], positions[i])
                kv.write(l, k, v, positions[i], r)
                self.tally["flops"][i] += self.cost["kv_project"][i]


def kv_projection(model, l, x, positions):
    """Block l's keys and values (n, KV, 1, hd) for residual states x (n, 1, D) at positions (n, 1)."""
    h = model.norm(x, model.layers[l]["input_layernorm.weight"])
    return model.keys_values(l, h, positions)


# ------------------------------------------------------------------ oracles on teacher-forced data

def first_match_point(top1):
    """top1 (P, N) per point and token -> (N,) first point whose top-1 equals the last point's."""
    return np.argmax(top1 == top1[-1], axis=0)


def stable_point(top1):
    """top1 (P, N) -> (N,) first point from which the top-1 equals the last point's at every later point."""
    differs = top1 != top1[-1]                                          # (P, N)
    P = top1.shape[0]
    last_diff = np.where(differs.any(0), P - 1 - np.argmax(differs[::-1], axis=0), -1)
    return last_diff + 1
