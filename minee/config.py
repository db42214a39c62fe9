"""ModelConfig: the handful of numbers that define a LLaMA, read from a Hugging Face config.json.

config.json comes from wherever the checkpoint came from, so it is untrusted: every field the
math uses is type- and range-checked here, and anything we do not implement is refused. A bad
field is a ConfigError naming the file, the field and its value, never a ZeroDivisionError deep
in the forward pass, a silent NaN model or a huge allocation made from a number in the file.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .limits import MAX_INT_FIELDS, MAX_TEXT_BYTES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    d_ff: int                       # F: SwiGLU hidden width (intermediate_size)
    norm_eps: float = 1e-6          # RMSNorm epsilon
    rope_theta: float = 10000.0     # RoPE base frequency
    rope_scaling: dict = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False   # LM head shares the embedding matrix
    attention_bias: bool = False    # biases on q/k/v/o projections
    mlp_bias: bool = False          # biases on gate/up/down projections
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()       # generation stops at any of these

    @property
    def n_params(self):
        """Parameter count implied by the shapes (the LM head counted once when tied)."""
        D, F, hd = self.d_model, self.d_ff, self.head_dim
        attn = D * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * D * F + 2 * D
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

def _rope_settings(hf):
    """(theta, scaling dict) from either `rope_theta` + `rope_scaling` or transformers-5 `rope_parameters`."""
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ConfigError(f"{key} must be an object or null, got {hf[key]!r}")
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params or {})
    theta = hf.get("rope_theta")
    theta = _number(params.get("rope_theta", 10000.0) if theta is None else theta, "rope_theta", 1.0,
                    math.inf, "the base of RoPE's wavelengths; LLaMA uses 1e4 to 5e5")
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


def _reject_unsupported(hf):
    if hf.get("model_type") != "llama":
        raise ConfigError(f"model_type {hf.get('model_type')!r} is not supported; minee loads "
                          "LLaMA-family checkpoints (model_type 'llama')")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported; LLaMA's SwiGLU uses 'silu'")
    if hf.get("sliding_window") is not None:
        raise ConfigError("sliding_window attention is not supported (set sliding_window: null "
                          "only if the model was trained without it)")


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
    _reject_unsupported(hf)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise ConfigError(f"required field(s) missing: {', '.join(missing)}")
    d_model = _int(hf["hidden_size"], "hidden_size")
    n_heads, n_kv_heads, head_dim = _heads(hf)
    theta, scaling = _rope_settings(hf)
    bos = _token_ids(hf, "bos_token_id")
    return ModelConfig(
        vocab_size=_int(hf["vocab_size"], "vocab_size"),
        d_model=d_model,
        n_layers=_int(hf["num_hidden_layers"], "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=_int(hf["intermediate_size"], "intermediate_size"),
        norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", 1e-30, 1.0,
                         "RMSNorm's small positive epsilon"),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(hf.get("max_position_embeddings", 2048), "max_position_embeddings"),
        tie_word_embeddings=_flag(hf, "tie_word_embeddings", False),
        attention_bias=_flag(hf, "attention_bias", False),
        mlp_bias=_flag(hf, "mlp_bias", False),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(hf, "eos_token_id"),
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
