"""ModelConfig: the handful of numbers that define a LLaMA, read from a Hugging Face config.json.

Every field that changes the math is parsed here; anything we do not implement is a clear
error naming the field, never a silently wrong forward pass.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """config.json describes something minee does not compute."""


@dataclass
class ModelConfig:
    vocab_size: int                 # V: rows of the embedding / LM head
    d_model: int                    # D: width of the residual stream (hidden_size)
    n_layers: int                   # L: transformer blocks
    n_heads: int                    # H: query heads
    n_kv_heads: int                 # KV: key/value heads; H % KV == 0 (MHA: KV=H, MQA: KV=1, else GQA)
    head_dim: int                   # hd: width of one head (usually D // H, explicit in some models)
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


def _rope_settings(hf):
    """(theta, scaling dict) from either `rope_theta` + `rope_scaling` or transformers-5 `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
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
    return float(theta), scaling


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


def config_from_hf(hf: dict) -> ModelConfig:
    """Build a ModelConfig from the dict in a Hugging Face config.json."""
    _reject_unsupported(hf)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
    n_heads = hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise ConfigError(f"num_attention_heads ({n_heads}) must be a multiple of "
                          f"num_key_value_heads ({n_kv_heads})")
    theta, scaling = _rope_settings(hf)
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        d_ff=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
    )


def load_config(model_dir) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}; point minee at a Hugging Face "
                                "model directory (config.json + *.safetensors)")
    return config_from_hf(json.loads(path.read_text()))
