"""KV cache: every layer's keys and values, preallocated once, filled left to right."""
import numpy as np


class CacheFullError(ValueError):
    """More positions were fed than the cache was allocated for."""


class KVCache:
    """keys/values (L, B, KV, max_len, hd) float32; `length` positions are filled in every row.

    The model writes a forward pass's new positions with `write`, reads a layer's filled
    prefix with `view`, and moves `length` on once all layers have been written.
    """

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.keys = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.length = 0

    @property
    def batch_size(self):
        return self.keys.shape[1]

    @property
    def max_len(self):
        return self.keys.shape[3]

    def check_room(self, B, T):
        """Raise a clear error before a forward pass that would not fit."""
        if B != self.batch_size:
            raise ValueError(f"input has batch size {B} but the KV cache was made for "
                             f"{self.batch_size}; make one with model.new_kv_cache({B}, max_len)")
        if self.length + T > self.max_len:
            raise CacheFullError(f"KV cache holds {self.max_len} positions: {self.length} are used "
                                 f"and {T} more were fed; make a bigger one with "
                                 f"model.new_kv_cache(batch_size, max_len={self.length + T})")

    def write(self, layer, k, v, start):
        """Store k, v (B, KV, T, hd) at positions start .. start+T-1 of one layer."""
        T = k.shape[2]
        self.keys[layer, :, :, start:start + T] = k
        self.values[layer, :, :, start:start + T] = v

    def view(self, layer, end):
        """Keys and values (B, KV, end, hd) of positions 0 .. end-1 of one layer."""
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reset(self):
        self.length = 0
