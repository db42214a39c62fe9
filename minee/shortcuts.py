"""Linear shortcuts: one affine map per exit point that carries its state to an estimate of the last one.

The plain lens decodes an intermediate state h_p as if it were the last residual state (the one
after the last block, which the final norm + LM head decode). Intermediate states live in a
different basis, so the plain lens reads them badly. A shortcut learns, for every exit point p,

    h_p @ weight[p] + bias[p]  ~  h_last                       weight (P, D, D), bias (P, D)

and early exit decodes `unembed(h_p @ weight[p] + bias[p])` instead of `unembed(h_p)`: one extra
D x D product per decoded state, a small fraction of a block (Din et al. 2023, "Jump to
Conclusions"; the tuned lens of Belrose et al. 2023 trains the same maps on KL).

Fitting is least squares in closed form, accumulated in float64 window by window
(`window_sums`, summed in any order, then `solve`), so memory does not grow with the corpus and
the windows can be summed on worker processes (minee.parallel). `refine` then takes a few Adam
steps on the KL divergence to the model's final distribution, started from the least-squares
solution, in this process. The last point's map is the identity, and any point
that was not fitted keeps the identity too: through it, the shortcut lens is the plain lens.
"""
import functools
import hashlib
import io
import json
import operator
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .hooks import exit_point_names
from .lens import LOG_TINY, final_distribution, windows
from .limits import MAX_META_CHARS, MAX_NPY_HEADER
from .loading import fingerprint
from .ops import softcap
from .parallel import map_windows

METHODS = ("lstsq", "kl")                 # least squares; least squares refined on KL
DEFAULT_RIDGE = 1e-3
SUM_GROUP = 4       # windows summed per worker task: each sum is (K, D, D) x 2 float64, 313 MB for SmolLM2


class ShortcutsError(ValueError):
    """A shortcut file that cannot be used: unreadable, malformed, or fitted on another model."""


# ------------------------------------------------------------------ the maps

@dataclass
class Shortcuts:
    """Affine maps from every exit point's state to the last state, and how they were made."""
    weight: np.ndarray            # (P, D, D) float32; weight[P-1] = identity
    bias: np.ndarray              # (P, D) float32; bias[P-1] = 0
    meta: dict = field(default_factory=dict)   # fingerprint, model, tokens, ridge, method, points

    def apply(self, h, points):
        """Estimates of the last state from states h at exit points.

        points: one int (h (..., D) all at that point), or an index array / slice along h's first
        axis, h (n, T, D) with row i at exit point points[i]. Returns float32 of h's shape.
        """
        if np.ndim(points) == 0 and not isinstance(points, slice):
            return h @ self.weight[points] + self.bias[points]                     # (..., D)
        return np.matmul(h, self.weight[points]) + self.bias[points][:, None, :]   # (n, T, D)

    def digest(self):
        """A hash of the maps themselves (to tell two shortcut sets apart, e.g. in caches)."""
        return hashlib.sha256(self.weight.tobytes() + self.bias.tobytes()).hexdigest()[:16]

    def check_model(self, model, source="these shortcuts"):
        """Raise ShortcutsError unless the maps fit this model: fitted on it (same fingerprint), weight
        (P, D, D) and bias (P, D) float32, the last point's map the identity."""
        mine, theirs = fingerprint(model), self.meta.get("fingerprint")
        if mine != theirs:
            raise ShortcutsError(
                f"{source} were fitted on another model ({self.meta.get('model')!r}, fingerprint "
                f"{theirs}) than {model.source or 'this model'!r} (fingerprint {mine}); fit shortcuts "
                f"for this model with `python -m minee shortcuts fit --model M --out FILE.npz`")
        P, D = 2 * model.config.n_layers, model.config.d_model
        for name, array, shape in (("weight", self.weight, (P, D, D)), ("bias", self.bias, (P, D))):
            if problem := _mismatch(getattr(array, "dtype", type(array).__name__), np.shape(array), shape):
                raise ShortcutsError(f"{source}: {name} {problem}")
        if not (np.array_equal(self.weight[-1], np.eye(D)) and not self.bias[-1].any()):
            raise ShortcutsError(f"{source}: the map of the last point ({P - 1}) must be the identity (weight I, "
                                 "bias 0): the last state is what every other map estimates, and the oracle "
                                 "compares every point's token with its token")

    def save(self, path):
        """Write `path` (.npz): arrays weight (P, D, D) and bias (P, D) float32, and meta (JSON text)."""
        with open(path, "wb") as f:             # an open file: np.savez would append .npz to the name
            np.savez(f, weight=self.weight, bias=self.bias, meta=np.array(json.dumps(self.meta)))


def identity(model):
    """weight (P, D, D), bias (P, D) of maps that change nothing (I and 0 at every point): the plain lens."""
    P, D = 2 * model.config.n_layers, model.config.d_model
    return (np.broadcast_to(np.eye(D, dtype=np.float32), (P, D, D)).copy(),
            np.zeros((P, D), np.float32))


# ------------------------------------------------------------------ least squares, window by window

@dataclass
class Sums:
    """Float64 sufficient statistics of the least-squares fit for exit points `points` (K of them):
    sums over n tokens of x, y, x x^T and x y^T, where x = h_p and y = the last state."""
    points: np.ndarray            # (K,) exit points
    n: int                        # tokens
    sx: np.ndarray                # (K, D)
    sy: np.ndarray                # (D,)
    sxx: np.ndarray               # (K, D, D)
    sxy: np.ndarray               # (K, D, D)

    def __add__(self, other):
        if not np.array_equal(self.points, other.points):
            raise ValueError("cannot add sums over different exit points")
        return Sums(self.points, self.n + other.n, self.sx + other.sx, self.sy + other.sy,
                    self.sxx + other.sxx, self.sxy + other.sxy)


def state_sums(states, last, points):
    """Sums of one block of tokens: states (K, T, D) at `points`, last states (T, D)."""
    X = states.astype(np.float64)                                             # (K, T, D)
    Y = last.astype(np.float64)                                               # (T, D)
    return Sums(np.asarray(points), len(Y), X.sum(1), Y.sum(0),
                np.matmul(X.transpose(0, 2, 1), X), np.matmul(X.transpose(0, 2, 1), Y))


def window_states(model, begin, start, end, ids, points):
    """One teacher-forced window (see lens.windows): the model runs ids[begin:end]; returns the
    states of tokens start .. end-1 at `points` (K, T, D) and their last states (T, D)."""
    names = exit_point_names(model.config.n_layers)
    _, acts = model.run_with_cache(np.asarray(ids)[None, begin:end],
                                   names=[names[p] for p in points] + [names[-1]])
    scored = slice(start - begin, end - begin)
    return np.stack([acts[names[p]][0, scored] for p in points]), acts[names[-1]][0, scored]


def window_sums(model, begin, start, end, ids, points):
    """Sums of one teacher-forced window; windows' sums add up in any order."""
    return state_sums(*window_states(model, begin, start, end, ids, points), points)


def solve(sums, ridge=DEFAULT_RIDGE):
    """weight (K, D, D), bias (K, D) float32 minimizing, for each point,

        mean_n |x_n W + b - y_n|^2  +  lam |W - I|^2,    lam = ridge * mean variance of x's coordinates

    The ridge pulls W towards the identity (the plain lens), not towards zero, and is relative to
    the states' scale: ridge = 0 is plain least squares, a large ridge gives W = I and
    b = mean(y) - mean(x). The bias is not penalized."""
    check_ridge(ridge)
    if sums.n < 2:
        raise ValueError(f"fitting needs at least 2 tokens, got {sums.n}")
    D = sums.sy.shape[0]
    my = sums.sy / sums.n                                                      # (D,)
    weights, biases = [], []
    for sx, sxx, sxy in zip(sums.sx, sums.sxx, sums.sxy):
        mx = sx / sums.n                                                       # (D,)
        cxx = sxx / sums.n - np.outer(mx, mx)                                  # (D, D) covariance of x
        cxy = sxy / sums.n - np.outer(mx, my)                                  # (D, D) cross-covariance
        lam = ridge * np.trace(cxx) / D
        try:
            w = np.linalg.solve(cxx + lam * np.eye(D), cxy + lam * np.eye(D))  # (D, D)
        except np.linalg.LinAlgError:
            raise ValueError("the states' covariance is singular (too few tokens or ridge = 0); "
                             "fit on more tokens or use a ridge > 0") from None
        weights.append(w)
        biases.append(my - mx @ w)
    return np.array(weights, np.float32), np.array(biases, np.float32)


def check_ridge(ridge):
    """A clear error unless ridge is a finite number >= 0."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) or not 0 <= ridge < np.inf:
        raise ValueError(f"ridge (--ridge) must be a finite number >= 0 (0 = plain least squares, default "
                         f"{DEFAULT_RIDGE}), got {ridge!r}")


def fit(model, ids, points=None, ridge=DEFAULT_RIDGE, window=256, context=128, progress=True, workers=1):
    """Least-squares shortcuts for exit points (default: all), fitted on the token ids (N,).

    Teacher-forced in windows of `window` counted tokens, each after up to `context` tokens the
    model sees but that are not counted. Points not fitted (and the last) keep the identity.
    workers: processes summing windows side by side (minee.parallel); the sums of SUM_GROUP
    consecutive windows are added where they are computed, then the groups' sums in order, with
    any number of workers, so the maps are the same. Every argument is checked before the model runs."""
    check_ridge(ridge)
    ids = _one_sequence(model, ids)
    if len(ids) < 2:
        raise ValueError(f"fitting needs at least 2 tokens, got {len(ids)}")
    P = 2 * model.config.n_layers
    points = _check_points(range(P - 1) if points is None else points, P)
    groups = map_windows(window_sums, model, windows(len(ids), window, context), ids, points,
                         workers=workers, group=SUM_GROUP, desc="fit shortcuts", progress=progress)
    sums = functools.reduce(operator.add, groups)
    weight, bias = identity(model)
    weight[points], bias[points] = solve(sums, ridge)
    meta = {"fingerprint": fingerprint(model), "model": str(model.source), "tokens": int(sums.n),
            "ridge": float(ridge), "method": "lstsq", "points": [int(p) for p in points]}
    return Shortcuts(weight, bias, meta)


def _one_sequence(model, ids):
    """Token ids (T,) or (1, T) as an int64 (T,) array, or a clear error."""
    ids = model.check_ids(ids)
    if ids.shape[0] != 1:
        raise ValueError(f"fit reads one token sequence, got a batch of {ids.shape[0]}; concatenate them")
    return ids[0]


def _check_points(points, P):
    points = np.asarray(list(points), dtype=np.int64)
    bad = points[(points < 0) | (points >= P - 1)]
    if len(points) == 0 or bad.size:
        raise ValueError(f"shortcut points must be exit points 0 .. {P - 2} (the last point {P - 1} is "
                         f"the identity), got {points.tolist()}")
    return np.unique(points)


# ------------------------------------------------------------------ KL refinement

def kl_and_grad(model, x, w, b, final):
    """Mean KL(q || softmax(unembed(x w + b))) over n tokens and its gradient in w (D, D), b (D,).

    x (n, D) states at one exit point; final: lens.final_distribution of the final logits (n, V)
    (q and sum q log q, shared by every point). With z the logits, KL = sum q log q - sum q (z - zmax)
    + log S and the gradient in z is p - q, p = exp(z - zmax) / S (as in lens.logit_stats). Backpropagates
    by hand through the LM head (and its soft-capping, if the model has one) and the final RMSNorm
    (y = g * u, u = z / r, r = sqrt(mean(z^2) + eps), g its scale: the weight, or 1 + weight for Gemma)."""
    n, cap = len(x), model.config.final_softcap
    g = model.config.norm_offset + model.final_norm                            # (D,)
    z = x @ w + b                                                              # (n, D)
    r = np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + model.config.norm_eps)   # (n, 1)
    u = z / r                                                                  # (n, D) unit RMS
    logits = (u * g) @ model.lm_head.T                                         # (n, V)
    if cap is not None:
        logits = softcap(logits, cap)
        through_cap = 1 - (logits / cap) ** 2                                  # (n, V) d cap tanh(a / cap) / da
    logits -= logits.max(-1, keepdims=True)                                    # z - zmax <= 0
    kl = final["q_log_q"] - (logits * final["q"]).sum(-1)                      # (n,), + log S below
    p = np.exp(np.maximum(logits, LOG_TINY, out=logits), out=logits)           # (n, V) S p, no denormals
    S = p.sum(-1, keepdims=True)                                               # (n, 1)
    kl = float((kl + np.log(S[:, 0])).sum() / n)
    p /= S
    p -= final["q"]                                                            # (n, V) n * dKL/dz = p - q
    if cap is not None:
        p *= through_cap
    d_u = (p @ model.lm_head) * (g / n)                                        # (n, D)
    d_z = (d_u - u * np.mean(d_u * u, axis=-1, keepdims=True)) / r             # (n, D)
    return kl, x.T @ d_z, d_z.sum(0)


def refine(model, sc, ids, points=None, steps=100, batch=64, lr=3e-4, tokens=4096, seed=0, window=256,
           context=128, progress=True):
    """Refine the maps at `points` (default: the fitted ones) by Adam on the KL divergence to the
    final distribution, from their current values (the least-squares solution), on token ids.

    The states of about `tokens` tokens, in windows spread evenly over ids, are kept in memory
    ((points, tokens, D) float32: 136 KB per token for SmolLM2); each step takes `batch` of them
    at random for every point. Returns new Shortcuts (method "kl")."""
    from tqdm.auto import tqdm
    sc.check_model(model)
    ids = _one_sequence(model, ids)
    P = 2 * model.config.n_layers
    points = _check_points(sc.meta.get("points", range(P - 1)) if points is None else points, P)
    if steps < 1 or batch < 1 or tokens < 1 or lr <= 0:
        raise ValueError(f"refine needs steps >= 1, batch >= 1, tokens >= 1 and lr > 0, "
                         f"got {steps}, {batch}, {tokens}, {lr}")
    spans = windows(len(ids), window, context)
    keep = np.unique(np.linspace(0, len(spans) - 1, max(1, -(-tokens // window))).round().astype(int))
    states, last = [], []
    for begin, start, end in tqdm([spans[i] for i in keep], desc="KL states", unit="window",
                                  disable=not progress):
        x, y = window_states(model, begin, start, end, ids, points)          # (K, T, D), (T, D)
        states.append(x)
        last.append(y)
    states, last = np.concatenate(states, axis=1), np.concatenate(last)       # (K, N, D), (N, D)
    weight, bias = sc.weight.copy(), sc.bias.copy()
    adam = [_Adam(weight[p], bias[p]) for p in points]
    rng = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="KL refine", unit="step", disable=not progress)
    for _ in bar:
        idx = rng.choice(len(last), size=min(batch, len(last)), replace=False)
        final = final_distribution(model.unembed(last[idx]))                   # q (n, V), sum q log q (n,)
        losses = []
        for k, p in enumerate(points):
            kl, gw, gb = kl_and_grad(model, states[k, idx], weight[p], bias[p], final)
            adam[k].step(weight[p], bias[p], gw, gb, lr)
            losses.append(kl)
        bar.set_postfix(kl=f"{np.mean(losses):.3f}")
    meta = {**sc.meta, "method": "kl", "kl_steps": int(steps), "kl_batch": int(batch), "kl_lr": float(lr),
            "kl_tokens": int(len(last)), "kl_points": [int(p) for p in points]}
    return Shortcuts(weight, bias, meta)


class _Adam:
    """Adam's moment estimates for one point's (w, b); step() updates them in place."""

    def __init__(self, w, b, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = [np.zeros_like(w), np.zeros_like(b)]
        self.v = [np.zeros_like(w), np.zeros_like(b)]
        self.beta1, self.beta2, self.eps, self.t = beta1, beta2, eps, 0

    def step(self, w, b, gw, gb, lr):
        self.t += 1
        for param, grad, m, v in zip((w, b), (gw, gb), self.m, self.v):
            m *= self.beta1
            m += (1 - self.beta1) * grad
            v *= self.beta2
            v += (1 - self.beta2) * grad * grad
            m_hat = m / (1 - self.beta1 ** self.t)
            v_hat = v / (1 - self.beta2 ** self.t)
            param -= (lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(param.dtype)


# ------------------------------------------------------------------ the file



def load(path, model):
    """Shortcuts from a .npz written by Shortcuts.save, checked against `model` before use.

    The file is untrusted: every array's header (dtype, shape) is checked before it is read,
    values must be finite, the metadata must be well formed, and the fingerprint must be this
    model's. Any problem is a ShortcutsError naming the file and the field."""
    P, D = 2 * model.config.n_layers, model.config.d_model
    where = f"shortcut file {path}"
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ShortcutsError(f"{where} not found; make one with `python -m minee shortcuts fit "
                             "--model M --out FILE.npz`") from None
    except Exception as e:                     # zipfile fails on damaged bytes with errors of every kind
        raise ShortcutsError(f"{where} is not a .npz archive ({type(e).__name__}: {e})") from None
    with zf:
        weight = _float_array(zf, where, "weight", (P, D, D))
        bias = _float_array(zf, where, "bias", (P, D))
        meta = _read_meta(zf, where, P)
    sc = Shortcuts(weight, bias, meta)
    sc.check_model(model, where)
    return sc


def read_npz_array(zf, where, name, check, error=ShortcutsError):
    """Array `name` of the .npz archive zf (a zipfile.ZipFile), read only once check(shape, dtype)
    accepted its header (it returns an error message or None), so that no size a file declares is
    allocated unchecked. The header is read from at most MAX_NPY_HEADER bytes (numpy would read
    whatever length the file declares, before checking it). Any problem is `error` naming `where`."""
    member = f"{name}.npy"
    if member not in zf.namelist():
        raise error(f"{where}: field {name!r} is missing (the file has {sorted(zf.namelist())})")
    try:
        with zf.open(member) as f:
            head = io.BytesIO(f.read(MAX_NPY_HEADER + 16))
        version = np.lib.format.read_magic(head)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(head)
        problem = check(tuple(shape), dtype)
    except Exception as e:     # zipfile, zlib, lzma, bz2 and numpy fail on damaged bytes with errors of their own
        raise error(f"{where}: field {name!r} cannot be read ({type(e).__name__}: {e})") from None
    if problem:
        raise error(f"{where}: field {name!r} {problem}")
    try:
        with zf.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
        raise error(f"{where}: field {name!r} cannot be read ({type(e).__name__}: {e})") from None


def _mismatch(dtype, shape, want):
    """What is wrong with an array of this dtype and shape where little-endian float32 of shape
    `want` is needed, or None."""
    if dtype != np.dtype("<f4") or tuple(shape) != want:
        return f"is {dtype} {tuple(shape)}; this model needs float32 {want}"


def _float_array(zf, where, name, shape):
    """A finite little-endian float32 array of exactly this shape."""
    array = read_npz_array(zf, where, name, lambda got_shape, dtype: _mismatch(dtype, got_shape, shape))
    if not np.isfinite(array).all():
        raise ShortcutsError(f"{where}: field {name!r} has {int((~np.isfinite(array)).sum())} NaN or "
                             "infinite values")
    return array


def _read_meta(zf, where, P):
    """The metadata dict, with the fields minee uses checked."""
    def check(shape, dtype):
        if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * MAX_META_CHARS:
            return f"must be one JSON string, got {dtype} {shape}"
    try:
        meta = json.loads(str(read_npz_array(zf, where, "meta", check)))
    except json.JSONDecodeError as e:
        raise ShortcutsError(f"{where}: field 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ShortcutsError(f"{where}: field 'meta' must be a JSON object")
    checks = {"fingerprint": (lambda v: isinstance(v, str), "a string"),
              "tokens": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
              "ridge": (lambda v: isinstance(v, (int, float)) and np.isfinite(v) and v >= 0, "a finite number >= 0"),
              "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
              "points": (lambda v: isinstance(v, list) and v and all(_whole(p) and 0 <= p < P - 1 for p in v),
                         f"a list of exit points 0 .. {P - 2} (the last point's map is the identity)")}
    for name, (ok, what) in checks.items():
        if name not in meta or not ok(meta[name]):
            raise ShortcutsError(f"{where}: meta field {name!r} must be {what}, got "
                                 f"{str(meta.get(name, 'nothing'))[:80]!r}")
    return meta


def _whole(v):
    """A JSON whole number (true and false are not)."""
    return isinstance(v, int) and not isinstance(v, bool)
