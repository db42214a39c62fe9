"""ModelConfig: the handful of numbers that define a LLaMA-family model, read from a Hugging Face config.json.

config.json comes from wherever the checkpoint came from, so it is untrusted: every field the
math uses is type- and range-checked here, and anything we do not implement is refused. A bad
field is a ConfigError naming the file, the field and its value, never a ZeroDivisionError deep
in the forward pass, a silent NaN model or a huge allocation made from a number in the file.

Families: llama, and those that differ from it in a few switches (the variant fields of
ModelConfig): mistral (sliding windows), qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3_text and
the text part of gemma3 (four norms per block, GeGLU, scaled embeddings, per-layer windows and RoPE
bases). `_variant` maps each model_type's fields onto them.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .limits import MAX_INT_FIELDS, MAX_TEXT_BYTES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")

# What a field left out of config.json means, where the family's transformers config class says
# something else than LLaMA's (`config_from_hf` falls back to these).
DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "max_window_layers": 28, "sliding_window": 4096, "head_dim": 128},
    "gemma3_text": {"max_position_embeddings": 131072, "sliding_window": 4096, "head_dim": 256,
                    "query_pre_attn_scalar": 256, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
                    "rope_local_base_freq": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
                    "bos_token_id": 2, "eos_token_id": 1},
}
GEMMA_WINDOW_PATTERN = 6        # gemma3 without layer_types: every 6th block full, the others sliding


class ConfigError(ValueError):
    """config.json is malformed or describes something minee does not compute."""


@dataclass
class ModelConfig:
    vocab_size: int                 # V: rows of the embedding / LM head
    d_model: int                    # D: width of the residual stream (hidden_size)
    n_layers: int                   # L: transformer blocks
    n_heads: int                    # H: query heads
    n_kv_heads: int                 # KV: key/value heads; H % KV == 0 (MHA: KV=H, MQA: KV=1, else GQA)
    head_dim: int                   # hd: width of one head (usually D // H, explicit in some models); even
    d_ff: int                       # F: gated FFN hidden width (intermediate_size)
    norm_eps: float = 1e-6          # RMSNorm epsilon
    rope_theta: float = 10000.0     # RoPE base frequency
    rope_scaling: dict = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False   # LM head shares the embedding matrix
    attention_bias: bool = False    # biases on q/k/v/o projections
    mlp_bias: bool = False          # biases on gate/up/down projections
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()       # generation stops at any of these
    # The variants: LLaMA's values are the defaults (see _variant for each family's).
    model_type: str = "llama"       # the family, as config.json names it
    qkv_bias: bool = False          # biases on q/k/v only, not o (Qwen2)
    qk_norm: bool = False           # RMSNorm over each head's hd on queries and keys, before RoPE (Qwen3, Gemma 3)
    post_norms: bool = False        # a norm on each sub-layer's output too: four per block (Gemma 3)
    norm_offset: float = 0.0        # RMSNorm scales by (norm_offset + w): Gemma stores w - 1 (offset 1)
    activation: str = "silu"        # the gated FFN's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    embed_scale: float = 1.0        # embeddings are multiplied by this (Gemma: sqrt(D))
    attn_scale: float = None        # queries . keys scale; None = hd ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    final_softcap: float = None     # logits -> c * tanh(logits / c) (None = off)
    layer_windows: tuple = ()       # per block: None (full attention) or W, attend to the last W positions; () = all full
    local_rope_theta: float = None  # RoPE base of the sliding-window blocks (Gemma 3: 10,000); None = rope_theta
    local_rope_scaling: dict = None

    def window(self, l):
        """Block l's sliding window W (it attends to positions t-W+1 .. t), or None (all earlier positions)."""
        return self.layer_windows[l] if self.layer_windows else None

    def local_rope(self, l):
        """Whether block l uses the sliding-window blocks' own RoPE (Gemma 3) rather than the global one."""
        return self.window(l) is not None and self.local_rope_theta is not None

    def rope_settings(self, local=False):
        """(theta, scaling) of the global RoPE, or of the sliding-window blocks' own (if any)."""
        if local and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    @property
    def n_params(self):
        """Parameter count implied by the shapes (the LM head counted once when tied; biases and q/k
        norms left out: they are a rounding error)."""
        D, F, hd = self.d_model, self.d_ff, self.head_dim
        attn = D * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * D * F + (4 if self.post_norms else 2) * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.n_layers * block + D + head


def read_text(path, error=ConfigError) -> str:
    """The UTF-8 text of one of the small files minee reads (at most MAX_TEXT_BYTES), or `error` naming the file."""
    chunks, size = [], 0
    with open(path, "rb") as f:                          # read in pieces: bounded whatever the file claims
        while size <= MAX_TEXT_BYTES and (chunk := f.read(1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
    if size > MAX_TEXT_BYTES:
        raise error(f"{path} is over {MAX_TEXT_BYTES:,} bytes; minee reads such files only up to that size")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e})") from None


def read_json(path, error=ConfigError) -> dict:
    """The JSON object in one of the small files minee reads, or `error` naming the file."""
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:            # bad JSON, absurd nesting
        raise error(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


# ------------------------------------------------------------------ one field at a time

def _int(value, key, low=1):
    """value (of field key) as a whole number in low .. MAX_INT_FIELDS[key]; JSON true/false do not count."""
    high = MAX_INT_FIELDS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{key} must be a whole number from {low} to {high:,}, got {value!r}")
    return value


def _number(value, key, low, high, why):
    """value (of field key) as a float in [low, high]; NaN and Infinity, which Python's json reads, fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        span = f"from {low:g} to {high:g}" if high < math.inf else f">= {low:g}"
        raise ConfigError(f"{key} must be a number {span} ({why}), got {value!r}")
    return float(value)


def _flag(hf, key, default):
    """hf[key] as a bool: JSON true/false, or the default when absent or null."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _token_ids(hf, key):
    """A token id field (an int, a list of ints, or null) as a tuple of ids."""
    value = hf.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ConfigError(f"{key} must be a token id (a whole number >= 0), a list of them or null, "
                          f"got {value!r}")
    return tuple(ids)


# ------------------------------------------------------------------ the groups of fields

def _rope_settings(hf, kind="full_attention"):
    """(theta, scaling dict) of RoPE from either `rope_theta` + `rope_scaling` or transformers-5
    `rope_parameters`, which Gemma 3 keeps per layer kind ("full_attention", "sliding_attention"; its
    older configs give the sliding layers' base as rope_local_base_freq)."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ConfigError(f"{key} must be an object or null, got {hf[key]!r}")
    params = dict(hf.get("rope_parameters") or {})
    base = hf.get("rope_theta" if kind == "full_attention" else "rope_local_base_freq", 10000.0)
    if "full_attention" in params or "sliding_attention" in params:      # one entry per layer kind
        params = params.get(kind) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"rope_parameters[{kind!r}] must be an object, got {params!r}")
        return _rope(params.get("rope_theta", base), dict(params))
    if kind == "sliding_attention":
        return _rope(base, {})
    theta = hf.get("rope_theta")
    return _rope(params.get("rope_theta", 10000.0) if theta is None else theta,
                 dict(hf.get("rope_scaling") or params or {}))


def _rope(theta, scaling):
    """(theta, scaling dict) checked: a supported rope_type with the parameters it needs."""
    theta = _number(theta, "rope_theta", 1.0, math.inf, "the base of RoPE's wavelengths; LLaMA uses 1e4 to 5e5")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; minee implements "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling["rope_type"] = rope_type
    if rope_type == "linear" and "factor" not in scaling:
        raise ConfigError("rope_scaling of type 'linear' needs a 'factor'")
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in need if k not in scaling]
        if missing:
            raise ConfigError(f"rope_scaling of type 'llama3' is missing {', '.join(missing)}")
        low, high = (_number(scaling[k], k, 0.0, 1e6, "llama3 RoPE") for k in need[1:3])
        if high <= low:
            raise ConfigError(f"rope_scaling high_freq_factor ({high}) must be greater than "
                              f"low_freq_factor ({low})")
        old_len = _int(scaling["original_max_position_embeddings"], "original_max_position_embeddings")
        scaling.update(low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old_len)
    if rope_type != "default":
        scaling["factor"] = _number(scaling["factor"], "rope_scaling factor", 1.0, 1e6,
                                    "how many times longer the context is stretched")
    return theta, scaling


def _model_type(hf):
    """The family, checked: one of MODEL_TYPES."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"model_type {kind!r} is not supported; minee loads the LLaMA family: "
                          f"{', '.join(MODEL_TYPES)} (for gemma3, its text part)")
    return kind


def _text_part(hf):
    """A multimodal gemma3 config's text_config, as a gemma3_text config; any other config as it is."""
    if hf.get("model_type") != "gemma3":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("a gemma3 config.json needs a text_config object (minee runs its text part)")
    inherited = {k: hf[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id") if k in hf}
    return {**inherited, **text, "model_type": "gemma3_text"}


def _activation(hf, kind):
    """The gated FFN's activation: silu for LLaMA, Mistral and Qwen (hidden_act), tanh-approximated
    GELU for Gemma 3 (hidden_activation)."""
    key, want = ("hidden_activation", "gelu_pytorch_tanh") if kind == "gemma3_text" else ("hidden_act", "silu")
    act = hf.get(key, want)
    if act != want:
        raise ConfigError(f"{key} {act!r} is not supported; {kind}'s gated FFN uses {want!r}")
    return act


def _layer_windows(hf, kind, n_layers):
    """Per block: None (full attention) or its sliding window W. LLaMA has none; Mistral slides in
    every block when sliding_window is set; Qwen2/3 only with use_sliding_window, in the blocks
    layer_types names (or from max_window_layers on); Gemma 3 in the blocks layer_types names (or
    all but every sixth)."""
    window = hf.get("sliding_window")
    if kind == "llama":
        if window is not None:
            raise ConfigError("sliding_window attention is not part of model_type 'llama' (set "
                              "sliding_window: null only if the model was trained without it; a "
                              "Mistral checkpoint says model_type 'mistral')")
        return ()
    if kind in ("qwen2", "qwen3") and not _flag(hf, "use_sliding_window", False):
        return ()                                          # transformers ignores sliding_window then
    if window is None:
        return ()
    window = _int(window, "sliding_window")
    types = None if kind == "mistral" else hf.get("layer_types")    # Mistral: transformers ignores it
    if types is None:
        if kind == "mistral":
            types = ["sliding_attention"] * n_layers
        elif kind == "gemma3_text":
            every = _int(hf.get("_sliding_window_pattern", hf.get("sliding_window_pattern", GEMMA_WINDOW_PATTERN)),
                         "_sliding_window_pattern")
            types = ["full_attention" if (l + 1) % every == 0 else "sliding_attention" for l in range(n_layers)]
        else:
            first = _int(hf["max_window_layers"], "max_window_layers", low=0)
            types = ["sliding_attention" if l >= first else "full_attention" for l in range(n_layers)]
    kinds = ("full_attention", "sliding_attention")
    if not isinstance(types, list) or len(types) != n_layers or any(t not in kinds for t in types):
        raise ConfigError(f"layer_types must list {n_layers} entries (one per layer), each 'full_attention' "
                          f"or 'sliding_attention', got {types!r:.200}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _variant(hf, kind, source_type, d_model):
    """The variant fields of ModelConfig for this family (those LLaMA's defaults do not give)."""
    if kind == "llama":
        return {"attention_bias": _flag(hf, "attention_bias", False), "mlp_bias": _flag(hf, "mlp_bias", False)}
    if kind == "mistral":
        return {}                                          # no biases, whatever the file says
    if kind == "qwen2":
        return {"qkv_bias": True}                          # q/k/v always carry biases, o never
    if kind == "qwen3":
        return {"qk_norm": True, "attention_bias": _flag(hf, "attention_bias", False)}
    if _flag(hf, "use_bidirectional_attention", False):
        raise ConfigError("use_bidirectional_attention is true: that is an encoder (EmbeddingGemma); "
                          "minee runs causal language models")
    # transformers' Gemma 3 soft-caps the logits in Gemma3ForCausalLM only, not in the multimodal model, and
    # never its attention scores (attn_logit_softcapping is a Gemma 2 field it keeps but does not use)
    cap = hf.get("final_logit_softcapping") if source_type == "gemma3_text" else None
    local_theta, local_scaling = _rope_settings(hf, "sliding_attention")
    return {"qk_norm": True, "post_norms": True, "norm_offset": 1.0,
            "attention_bias": _flag(hf, "attention_bias", False),
            "embed_scale": float(np.float32(math.sqrt(d_model))),      # rounded to float32, as transformers does
            "attn_scale": _int(hf["query_pre_attn_scalar"], "query_pre_attn_scalar") ** -0.5,
            "final_softcap": None if cap is None else _number(cap, "final_logit_softcapping", 1e-6, 1e6,
                                                              "the scale logits are soft-capped to"),
            "local_rope_theta": local_theta, "local_rope_scaling": local_scaling}


def _heads(hf):
    """(n_heads, n_kv_heads, head_dim), checked to fit together."""
    n_heads = _int(hf["num_attention_heads"], "num_attention_heads")
    n_kv_heads = n_heads if hf.get("num_key_value_heads") is None else _int(hf["num_key_value_heads"],
                                                                             "num_key_value_heads")
    if n_heads % n_kv_heads:
        raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of "
                          f"num_key_value_heads ({n_kv_heads})")
    if hf.get("head_dim") is not None:
        head_dim = _int(hf["head_dim"], "head_dim")
    else:
        head_dim = hf["hidden_size"] // n_heads
    if head_dim < 2 or head_dim % 2:
        source = ("head_dim" if hf.get("head_dim") is not None else
                  f"head_dim (hidden_size {hf['hidden_size']} // num_attention_heads {n_heads})")
        raise ConfigError(f"{source} is {head_dim}; it must be even and >= 2 because RoPE rotates "
                          "pairs of dimensions")
    return n_heads, n_kv_heads, head_dim


def config_from_hf(hf: dict) -> ModelConfig:
    """Build a ModelConfig from the dict in a Hugging Face config.json, checking every field used."""
    source_type = _model_type(hf)
    hf = _text_part(hf)
    kind = hf["model_type"]
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise ConfigError(f"required field(s) missing: {', '.join(missing)}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor {hf['partial_rotary_factor']!r} is not supported: "
                          "minee rotates every dimension of a head")
    hf = {**DEFAULTS.get(kind, {}), **hf}                  # what the family's config class assumes
    d_model = _int(hf["hidden_size"], "hidden_size")
    n_layers = _int(hf["num_hidden_layers"], "num_hidden_layers")
    n_heads, n_kv_heads, head_dim = _heads(hf)
    theta, scaling = _rope_settings(hf)
    bos = _token_ids(hf, "bos_token_id")
    return ModelConfig(
        vocab_size=_int(hf["vocab_size"], "vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=_int(hf["intermediate_size"], "intermediate_size"),
        norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", 1e-30, 1.0,
                         "RMSNorm's small positive epsilon"),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(hf["max_position_embeddings"], "max_position_embeddings"),
        tie_word_embeddings=_flag(hf, "tie_word_embeddings", False),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(hf, "eos_token_id"),
        model_type=source_type,
        activation=_activation(hf, kind),
        layer_windows=_layer_windows(hf, kind, n_layers),
        **_variant(hf, kind, source_type, d_model),
    )


def model_tree(model_dir) -> Path:
    """The directory every file of a model must lie in: the model directory itself (its real path),
    or, for a snapshot in a Hugging Face cache (models--ORG--NAME/snapshots/REVISION, whose files
    are links into models--ORG--NAME/blobs/), the whole models--ORG--NAME directory."""
    d = Path(model_dir).resolve()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def model_file(model_dir, name, error=ConfigError):
    """model_dir/name, checked to be a regular file inside the model's tree (model_tree), symlinks
    followed; None if there is no such file. A link out of the tree (a chat template pointing at a
    file elsewhere on the machine), a directory, a pipe or a device is `error` naming it."""
    path = Path(model_dir) / name
    if not os.path.lexists(path):
        return None
    tree = model_tree(model_dir)
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):                      # a broken link, a link loop
        raise error(f"{path} is a broken or looping link") from None
    if not real.is_relative_to(tree):
        raise error(f"{path} links to {real}, outside the model's directory {tree}; minee reads a model's "
                    "files only from inside it (copy the file in if you trust it)")
    if not real.is_file():
        raise error(f"{path} is not a regular file")
    return path


def load_config(model_dir) -> ModelConfig:
    """The checked ModelConfig of a model directory; every ConfigError names its config.json."""
    path = model_file(model_dir, "config.json")
    if path is None:
        raise FileNotFoundError(f"no config.json in {model_dir}; point minee at a Hugging Face "
                                "model directory (config.json + *.safetensors)")
    hf = read_json(path)
    try:
        return config_from_hf(hf)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
