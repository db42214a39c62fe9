"""The LLaMA building blocks as pure NumPy functions. All inputs and outputs are float32.

Shapes: B batch, T new positions, S positions attended to (cache + new), D model width,
H query heads, KV key/value heads, hd head width, F gated FFN width, V vocabulary.
"""
import math

import numpy as np


GEMM_MIN_ROWS = 4       # from this many rows on, one GEMM beats a GEMV per row (bench/README.md)
WIDE_MIN_ROWS = 512     # from this many rows on, the GEMM is written rows @ weight.T (C-contiguous)


def linear(x, weight, bias=None):
    """x (..., in) @ weight.T, weight (out, in) as stored in the checkpoint -> (..., out).

    Every leading position is a row (M of them). A matrix-vector product (GEMV) streams the weight
    once per row; one matrix-matrix product (GEMM) reads it once for all rows, but BLAS first
    copies it into cache-sized blocks, which costs about as much as streaming it two or three
    times more. So fewer than GEMM_MIN_ROWS rows run as one GEMV each, and more as one GEMM.
    Below WIDE_MIN_ROWS rows it is written weight @ rows.T, 1.2-1.8x faster for 4-64 rows and up
    to ~1.1x for 128 (OpenBLAS then packs the weight a few KB at a time, in L1), and returns a
    transposed view; from WIDE_MIN_ROWS rows on (long prefills, the lens), past OpenBLAS's block
    height, rows @ weight.T, whose C-contiguous result lets a reduction over `out` (the
    vocabulary) walk contiguous memory. Measured per shape in bench/README.md; minee.load maps
    the buffer the first form prefetches into (threads.py).
    """
    rows = x.reshape(-1, x.shape[-1])                              # (M, in)
    if len(rows) < GEMM_MIN_ROWS:
        y = (x[..., None, :] @ weight.T)[..., 0, :]                # (..., out): NumPy runs one GEMV per row
    elif len(rows) < WIDE_MIN_ROWS:
        y = (weight @ rows.T).T.reshape(*x.shape[:-1], -1)         # one GEMM (M, out), a transposed view
    else:
        y = (rows @ weight.T).reshape(*x.shape[:-1], -1)           # one GEMM (M, out), C-contiguous
    return y if bias is None else y + bias


def rms_norm(x, weight, eps):
    """x (..., D) scaled to unit root-mean-square over D, then by the learned weight (D,)."""
    ms = np.mean(x * x, axis=-1, keepdims=True)          # (..., 1)
    return x / np.sqrt(ms + eps) * weight                  # eps is a Python float: stays float32


def silu(x):
    """x * sigmoid(x); sigmoid via tanh so large |x| cannot overflow exp()."""
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


def gelu_tanh(x):
    """GELU in its tanh approximation (PyTorch's approximate="tanh"), Gemma's FFN activation."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_pytorch_tanh": gelu_tanh}     # config.json names -> functions


def gated_ffn(x, act, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None):
    """The FFN: down(act(gate(x)) * up(x)); x (..., D) -> (..., D) through width F. act = silu is
    LLaMA's SwiGLU, tanh GELU Gemma's GeGLU."""
    hidden = ACTIVATIONS[act](linear(x, w_gate, b_gate)) * linear(x, w_up, b_up)   # (..., F)
    return linear(hidden, w_down, b_down)                                          # (..., D)


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def softcap(x, cap):
    """Soft-capping (Gemma): cap * tanh(x / cap) keeps |x| below cap and leaves small x as they are."""
    return cap * np.tanh(x / cap)


# ---------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim, theta, scaling):
    """Rotation speed of each of the hd/2 dimension pairs, (hd/2,) float64, with rope_scaling applied."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":                   # positions divided by factor == frequencies divided by it
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq, s):
    """Llama 3.1 scaling: slow (long-wavelength) pairs / factor, fast ones kept, smooth ramp between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    ramp = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)   # 0: slow pair, 1: fast pair
    return (1 - ramp) * inv_freq / factor + ramp * inv_freq


def rope_cos_sin(positions, inv_freq):
    """cos, sin tables (T, hd) for absolute positions (T,); each angle repeated for both halves."""
    angles = np.outer(positions, inv_freq)                 # (T, hd/2) in float64 for accuracy
    angles = np.concatenate([angles, angles], axis=-1)     # (T, hd)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: HF's pairing of dimensions."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    """Rotate queries or keys x (B, heads, T, hd) by their positions' angles; cos/sin (B, 1, T, hd) or (T, hd)."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------- attention

def causal_mask(positions, S, window=None):
    """(B, T, S) bool: the token at position positions[b, t] may look at key j iff j <= its position,
    and, in a sliding-window layer, j > its position - window (the last `window` positions)."""
    keys = np.arange(S)
    mask = keys <= positions[..., None]
    if window is not None:
        mask &= keys > positions[..., None] - window
    return mask


def attention(q, k, v, mask, scale=None):
    """Grouped-query attention. q (B, H, T, hd); k, v (B, KV, S, hd); mask (B, T, S) -> (B, H, T, hd).

    The G = H/KV query heads that share a key/value head are stacked as extra rows, so one
    batched matmul per KV head serves them all (MHA: G=1, MQA: KV=1). scale: of the scores,
    default hd ** -0.5.
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    q = q.reshape(B, KV, G * T, hd)                                   # rows: (g, t) pairs
    scores = (q @ k.transpose(0, 1, 3, 2)) * (hd ** -0.5 if scale is None else scale)   # (B, KV, G*T, S)
    scores = scores.reshape(B, KV, G, T, -1)
    scores = np.where(mask[:, None, None], scores, -np.inf)           # hide later positions, unfilled cache slots
    probs = softmax(scores).reshape(B, KV, G * T, -1)
    return (probs @ v).reshape(B, H, T, hd)
