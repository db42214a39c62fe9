"""The LLaMA forward pass in NumPy, top to bottom:

    ids (B, T) -> embed -> L x [ x + attn(norm(x)) ; x + mlp(norm(x)) ] -> final norm -> LM head -> logits (B, T, V)

A named hook point sits on every arrow that carries the residual stream (TransformerLens
names, see hook_names), so tools such as the logit lens and early exit are thin layers on
top of this file rather than edits inside it. They all run the blocks through `sublayer`.

The other families minee loads differ from LLaMA in a few switches of the config, each one
commented line below: Mistral and Qwen slide a window over the keys in some layers, Qwen2 adds
q/k/v biases, Qwen3 normalizes queries and keys, and Gemma 3 does that too, normalizes each
sub-layer's output as well as its input, scales norms by 1 + w, embeddings by sqrt(D), uses a
GELU in its FFN and may soft-cap the logits.
"""
import numpy as np

from .cache import KVCache
from .ops import (apply_rope, attention, causal_mask, gated_ffn, linear, rms_norm, rope_cos_sin, rope_inv_freq,
                  softcap)

BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def hook_names(n_layers):
    """Every hook point in the order the forward pass reaches it."""
    blocks = [f"blocks.{l}.{h}" for l in range(n_layers) for h in BLOCK_HOOKS]
    return ["hook_embed", *blocks, "hook_final_norm"]


class Model:
    """A loaded model: config, float32 weights under their checkpoint names, optional tokenizer."""

    def __init__(self, config, params, tokenizer=None, source=None):
        self.config = config
        self.source = source                                   # where it was loaded from, for reports
        self.params = params                                   # checkpoint name -> float32 array
        self.tokenizer = tokenizer
        self.embed_tokens = params["model.embed_tokens.weight"]                  # (V, D)
        self.lm_head = params.get("lm_head.weight", self.embed_tokens)          # (V, D), maybe tied
        self.final_norm = params["model.norm.weight"]                           # (D,)
        self.layers = [_layer_params(params, l) for l in range(config.n_layers)]
        self.hook_names = hook_names(config.n_layers)
        self.inv_freq = {local: rope_inv_freq(config.head_dim, *config.rope_settings(local)) for local in (False, True)}
        self._rope_tables = {}                                 # local -> (cos, sin) tables, grown on demand
        wrong = [f"{name} ({a.dtype})" for name, a in params.items() if a.dtype != np.float32]
        if wrong:
            raise TypeError(f"minee computes in float32; convert these weights first: {', '.join(wrong)}")

    # ------------------------------------------------------------ the forward pass

    def forward(self, ids, kv_cache=None, hooks=None, rows=None, last_only=False):
        """Logits (B, T, V) float32 for token ids (T,) or (B, T).

        kv_cache: a KVCache from new_kv_cache; each row's positions continue from its own length
        and the new keys/values are appended. rows: the cache rows the B sequences live in
        (default all, in order), e.g. rows=[2] to prefill a prompt into row 2 alone.
        hooks: {hook name: fn(x, name)}; fn may return a replacement. last_only: logits (B, 1, V)
        of the last position only, which is all that prefilling a prompt before decoding needs
        (the LM head is the largest weight; hook_final_norm then sees the last position only).
        """
        ids = self.check_ids(ids)                                               # (B, T)
        B, T = ids.shape
        positions = self.positions(B, T, kv_cache, rows)                        # (B, T)
        hook = self.hook_caller(hooks)
        x = hook("hook_embed", self.embed(ids))                                 # (B, T, D)
        for p in range(2 * self.config.n_layers):                              # block p // 2: attention, then FFN
            x = self.sublayer(p, x, positions, kv_cache, rows, hook)
        if kv_cache is not None:
            kv_cache.advance(T, rows)
        if last_only:
            x = x[:, -1:]                                                       # (B, 1, D)
        h = hook("hook_final_norm", self.norm(x, self.final_norm))
        return self.head(h)                                                     # (B, T, V)

    def sublayer(self, p, x, positions, kv_cache=None, rows=None, hook=None):
        """The residual stream after exit point p from the residual x (B, T, D) before it: block
        l = p // 2's attention (p even) or its FFN (p odd), added to x, with the hook points it
        passes (hook from hook_caller). forward, early exit and speculative verification all run
        the blocks through here, so every family's block is written once and hooks fire in all."""
        hook = hook or no_hook
        l = p // 2
        if p % 2 == 0:
            x = hook(f"blocks.{l}.hook_resid_pre", x)
            attn_out = hook(f"blocks.{l}.hook_attn_out", self.attn_sublayer(l, x, positions, kv_cache, rows))
            return hook(f"blocks.{l}.hook_resid_mid", x + attn_out)
        mlp_out = hook(f"blocks.{l}.hook_mlp_out", self.mlp_sublayer(l, x))
        return hook(f"blocks.{l}.hook_resid_post", x + mlp_out)

    def embed(self, ids):
        """Embeddings (B, T, D) of token ids (B, T)."""
        return self.embed_tokens[ids] * np.float32(self.config.embed_scale)      # Gemma: x sqrt(D); LLaMA: x 1

    def attn_sublayer(self, l, x, positions, kv_cache=None, rows=None):
        """Block l's attention on the residual x (B, T, D) of tokens at positions (B, T) -> (B, T, D).

        With a kv_cache, the new keys/values go into the given cache rows (default all) and
        each token attends to its row's earlier positions (in a sliding-window layer, the last W)."""
        c, w = self.config, self.layers[l]
        B, T, _ = x.shape
        h = self.norm(x, w["input_layernorm.weight"])                                      # (B, T, D)
        q = self.split_heads(linear(h, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")))  # (B, H, T, hd)
        if c.qk_norm:                                          # Qwen3, Gemma 3: RMSNorm over each query head
            q = self.norm(q, w["self_attn.q_norm.weight"])
        q = apply_rope(q, *self.rope(positions[:, None], l))                               # (B, H, T, hd)
        k, v = self.keys_values(l, h, positions)                                           # (B, KV, T, hd)
        if kv_cache is not None:
            kv_cache.write(l, k, v, positions, rows)
            k, v = kv_cache.view(l, int(positions.max()) + 1, rows)                        # (B, KV, S, hd)
        mask = causal_mask(positions, k.shape[2], c.window(l))                             # (B, T, S)
        out = attention(q, k, v, mask, c.attn_scale)                                       # (B, H, T, hd)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)                                  # (B, T, H*hd)
        out = linear(out, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))    # (B, T, D)
        if c.post_norms:                                       # Gemma 3: the sub-layer's output is normalized too
            out = self.norm(out, w["post_attention_layernorm.weight"])
        return out

    def keys_values(self, l, h, positions):
        """Block l's keys (rotated to their positions (B, T)) and values (B, KV, T, hd) from the
        normalized residual h (B, T, D)."""
        w = self.layers[l]
        k = self.split_heads(linear(h, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")))  # (B, KV, T, hd)
        v = self.split_heads(linear(h, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")))  # (B, KV, T, hd)
        if self.config.qk_norm:                                # Qwen3, Gemma 3: RMSNorm over each key head
            k = self.norm(k, w["self_attn.k_norm.weight"])
        return apply_rope(k, *self.rope(positions[:, None], l)), v

    def mlp_sublayer(self, l, x):
        """Block l's gated FFN on the residual x (B, T, D) -> (B, T, D)."""
        c, w = self.config, self.layers[l]
        # the norm before the FFN: LLaMA calls it post_attention_layernorm; Gemma 3, which gives that
        # name to the norm after attention, calls it pre_feedforward_layernorm
        h = self.norm(x, w["pre_feedforward_layernorm.weight" if c.post_norms else "post_attention_layernorm.weight"])
        out = gated_ffn(h, c.activation, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"],
                        w.get("mlp.gate_proj.bias"), w.get("mlp.up_proj.bias"), w.get("mlp.down_proj.bias"))
        if c.post_norms:                                       # Gemma 3: the sub-layer's output is normalized too
            out = self.norm(out, w["post_feedforward_layernorm.weight"])
        return out

    def head(self, h):
        """Logits (..., V) from final-normalized states h (..., D): the LM head."""
        logits = linear(h, self.lm_head)
        if self.config.final_softcap is not None:              # Gemma 2-style: logits kept below the cap
            logits = softcap(logits, self.config.final_softcap)
        return logits

    def unembed(self, h):
        """Logits (..., V) from any residual state h (..., D): final RMSNorm with h's own RMS, then LM head."""
        return self.head(self.norm(np.asarray(h, np.float32), self.final_norm))

    # ------------------------------------------------------------ helpers

    def norm(self, x, weight):
        """RMSNorm over the last axis of x with this model's epsilon, scaled by norm_offset + weight
        (LLaMA: the weight itself; Gemma stores it minus 1, offset 1)."""
        return rms_norm(x, self.config.norm_offset + weight, self.config.norm_eps)

    def split_heads(self, x):
        """(B, T, n*hd) -> (B, n, T, hd)."""
        B, T, _ = x.shape
        return x.reshape(B, T, -1, self.config.head_dim).transpose(0, 2, 1, 3)

    def rope(self, positions, l=0):
        """cos, sin (..., hd) for integer positions of any shape, with block l's RoPE (Gemma's
        sliding-window blocks have their own base), from tables grown by doubling."""
        local = self.config.local_rope(l)
        cos, sin = self._rope_tables.get(local, (np.zeros((0, self.config.head_dim), np.float32),) * 2)
        end = int(np.max(positions)) + 1
        if end > len(cos):
            size = max(end, 2 * len(cos), 256)
            cos, sin = self._rope_tables[local] = rope_cos_sin(np.arange(size), self.inv_freq[local])
        return cos[positions], sin[positions]

    def positions(self, B, T, kv_cache=None, rows=None):
        """Positions (B, T) of the tokens a forward pass computes: 0 .. T-1 without a cache, else
        continuing each cache row (checked for room)."""
        if kv_cache is None:
            if rows is not None:
                raise ValueError("rows= picks rows of a KV cache; pass kv_cache= too")
            return np.broadcast_to(np.arange(T), (B, T))
        kv_cache.check_room(B, T, rows)
        return kv_cache.positions(T, rows)

    def new_kv_cache(self, batch_size=1, max_len=2048):
        """An empty KVCache for batch_size sequences of up to max_len positions."""
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim)

    def check_ids(self, ids):
        """Token ids as an int64 (B, T) array, or a clear error."""
        ids = np.asarray(ids)
        if ids.size == 0:
            raise ValueError(f"token ids must have shape (T,) or (B, T) with T >= 1, got {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape (T,) or (B, T) with T >= 1, got {ids.shape}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range: the vocabulary has "
                             f"{self.config.vocab_size} ids (0 .. {self.config.vocab_size - 1})")
        return ids.astype(np.int64)

    def hook_caller(self, hooks):
        """hook(name, x) -> x, or what hooks[name](x, name) returned in its place (hooks: {name: fn} or None)."""
        if not hooks:
            return no_hook
        unknown = [n for n in hooks if n not in self.hook_names]
        if unknown:
            raise KeyError(f"unknown hook point(s) {unknown}; valid names look like 'hook_embed', "
                           "'blocks.3.hook_resid_mid', 'hook_final_norm' (see model.hook_names)")

        def call(name, x):
            fn = hooks.get(name)
            out = None if fn is None else fn(x, name)
            if out is None:
                return x
            out = np.asarray(out, dtype=np.float32)
            if out.shape != x.shape:
                raise ValueError(f"hook {name} returned shape {out.shape}; it must keep {x.shape}")
            return out

        return call

    def run_with_cache(self, ids, names=None, kv_cache=None):
        """(logits, {hook name: activation}) for the requested hook points (default: all)."""
        from .hooks import select_hooks
        acts = {}

        def save(x, name):
            acts[name] = x

        logits = self.forward(ids, kv_cache, hooks={n: save for n in select_hooks(self.hook_names, names)})
        return logits, acts

    def __repr__(self):
        c = self.config
        return (f"Model({c.model_type}, layers={c.n_layers}, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads}, "
                f"vocab={c.vocab_size}, params={c.n_params / 1e6:.1f}M)")


def no_hook(name, x):
    """The hook caller of a pass without hooks: every point passes x through."""
    return x


def _layer_params(params, l):
    """Block l's weights keyed by their name inside the block, e.g. 'self_attn.q_proj.weight'."""
    prefix = f"model.layers.{l}."
    return {name[len(prefix):]: array for name, array in params.items() if name.startswith(prefix)}
