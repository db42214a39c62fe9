"""KV cache: every layer's keys and values, preallocated once; each row is one sequence with its own length."""
import math

import numpy as np

from .limits import check_memory


class CacheFullError(ValueError):
    """More positions were fed than the cache was allocated for."""


class KVCache:
    """keys/values (L, B, KV, max_len, hd) float32; row b has its positions 0 .. lengths[b]-1 filled.

    The model writes a forward pass's new positions with `write`, reads a layer's keys/values
    with `view`, and moves the rows' lengths on with `advance` once all layers have been written.
    Rows may hold sequences of different lengths (prompts of different lengths, a row refilled
    with a new prompt); setting a row's length back forgets its later positions. A cache larger
    than the memory this process may still allocate (limits.check_memory) is refused before it is
    allocated.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        check_memory(2 * 4 * math.prod(shape), f"a KV cache of {batch_size} row(s) x {max_len:,} positions",
                     "make a smaller one: fewer positions (max_len; for generate, a shorter prompt or fewer "
                     "max_new_tokens) or fewer rows (batch_size)")
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.lengths = np.zeros(batch_size, dtype=np.int64)     # (B,) filled positions per row

    @property
    def batch_size(self):
        return self.keys.shape[1]

    @property
    def max_len(self):
        return self.keys.shape[3]

    @property
    def length(self):
        """The length every row shares; an error when rows differ (read `lengths` then)."""
        if (self.lengths != self.lengths[0]).any():
            raise ValueError(f"the cache rows hold different lengths {self.lengths.tolist()}; "
                             "read kv.lengths for each row's own")
        return int(self.lengths[0])

    @length.setter
    def length(self, n):
        self.lengths[:] = n

    def positions(self, T, rows=None):
        """Positions (n, T) of T new tokens in the given rows (default all): each continues its row."""
        start = self.lengths if rows is None else self.lengths[rows]    # (n,)
        return start[:, None] + np.arange(T)                            # (n, T)

    def check_room(self, B, T, rows=None):
        """Raise a clear error before a forward pass that would not fit, or that names rows
        (other than None, all of them) that are not distinct rows of this cache."""
        if rows is not None:
            self.check_rows(rows)
        n = self.batch_size if rows is None else len(rows)
        if B != n:
            raise ValueError(f"input has batch size {B} but {n} cache rows were given; make a cache "
                             f"with model.new_kv_cache({B}, max_len) or pass rows= with {B} rows")
        longest = int(self.positions(T, rows).max()) + 1
        if longest > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} positions per row and {longest} are "
                                 f"needed; make a bigger one with model.new_kv_cache(batch_size, "
                                 f"max_len={longest})")

    def check_rows(self, rows):
        """rows must be distinct whole numbers 0 .. batch_size-1, one per sequence of the batch."""
        r = np.asarray(rows)
        fix = f"pass rows= as distinct cache rows 0 .. {self.batch_size - 1}, one per sequence of the input"
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise ValueError(f"rows must be a list of row numbers, got {rows!r}; {fix}")
        bad = r[(r < 0) | (r >= self.batch_size)]
        if bad.size:
            raise ValueError(f"row {int(bad[0])} is not a row of this KV cache, which has {self.batch_size}; {fix}")
        if len(np.unique(r)) != len(r):
            raise ValueError(f"rows {r.tolist()} name a row twice, which would write two sequences into one; {fix}")

    def write(self, layer, k, v, positions, rows=None):
        """Store k, v (n, KV, T, hd) at positions (n, T) of the given rows (default all) of one layer."""
        rows = np.arange(self.batch_size) if rows is None else np.asarray(rows)
        at = (layer, rows[:, None], slice(None), positions)              # selects (n, T, KV, hd)
        self.keys[at] = k.transpose(0, 2, 1, 3)
        self.values[at] = v.transpose(0, 2, 1, 3)

    def view(self, layer, end, rows=None):
        """Keys and values (n, KV, end, hd) of positions 0 .. end-1 of one layer, for the given
        rows (default all): a view when they are consecutive, else a copy."""
        sel = consecutive(rows)
        return self.keys[layer, sel, :, :end], self.values[layer, sel, :, :end]

    def advance(self, T, rows=None):
        """Count T more positions as filled in the given rows (default all)."""
        if rows is None:
            self.lengths += T
        else:
            self.lengths[rows] += T

    def reset(self):
        self.lengths[:] = 0


def consecutive(rows):
    """rows (default all) as a slice when they are consecutive in order (indexing with it gives a
    view, not a copy), else as they are."""
    if rows is None:
        return slice(None)
    rows = np.asarray(rows)
    if rows.size and (rows == np.arange(rows[0], rows[0] + rows.size)).all():
        return slice(int(rows[0]), int(rows[0]) + rows.size)
    return rows
