"""Read Hugging Face safetensors checkpoints into float32 NumPy arrays.

A .safetensors file is: 8 bytes (little-endian u64) header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw tensor bytes. We read it ourselves
because NumPy has no bfloat16: bf16 is the top half of a float32, so widening the raw
uint16 by a 16-bit shift is exact. Tensors are read and converted one at a time, so
peak memory stays close to the float32 model size.
"""
import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class WeightsError(ValueError):
    """The checkpoint's tensors do not match what the config describes."""


def read_header(path) -> dict:
    """{name: {"dtype", "shape", "data_offsets"}} of one .safetensors file (no tensor data read)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):          # e.g. a git-lfs pointer instead of the weights
            raise WeightsError(f"{path} is not a safetensors file (header length {n} is impossible; "
                               "a git-lfs pointer? run `git lfs pull` or download the file again)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path} is not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def safetensors_files(model_dir) -> list:
    """The checkpoint's .safetensors files: from model.safetensors.index.json if sharded."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; minee reads safetensors "
                                "checkpoints (convert a GGUF with `python weights_tool.py convert`)")
    return files


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen F16/BF16 (BF16 given as its raw uint16 bits) to a new float32 array."""
    if dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16                                       # in place: no second full-size copy
        return wide.view(np.float32)
    return raw.astype(np.float32)


def iter_tensors(path):
    """Yield (name, float32 array) for every tensor in one .safetensors file.

    Each tensor is read straight into its own new array (F32) or into a raw buffer that is
    widened (F16/BF16), so loading holds the float32 model plus at most one raw tensor.
    """
    header = read_header(path)
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in header.items():
            if info["dtype"] not in _DTYPES:
                raise WeightsError(f"tensor {name} in {path} has dtype {info['dtype']}; minee reads "
                                   f"{', '.join(_DTYPES)}")
            raw = np.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            if end - begin != raw.nbytes or f.readinto(memoryview(raw.reshape(-1)).cast("B")) != raw.nbytes:
                raise WeightsError(f"tensor {name} in {path} is truncated or its header is inconsistent; "
                                   "download the file again")
            yield name, raw if info["dtype"] == "F32" else to_float32(raw, info["dtype"])


def expected_shapes(config) -> dict:
    """Checkpoint name -> shape for every tensor a LLaMA with this config must have."""
    D, F, V, hd = config.d_model, config.d_ff, config.vocab_size, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for l in range(config.n_layers):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.o_proj.weight": (D, q),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (D,)})
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,),
                           p + "mlp.down_proj.bias": (D,)})
    return shapes


def _ignorable(name, config):
    """Tensors some checkpoints carry that change nothing: RoPE buffers, a tied head's copy."""
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_word_embeddings)


def load_weights(model_dir, config) -> dict:
    """Checkpoint name -> float32 array, checked against the config (one error lists every problem)."""
    want = expected_shapes(config)
    params, problems = {}, []
    for path in safetensors_files(model_dir):
        for name, array in iter_tensors(path):
            if name in want:
                if tuple(array.shape) != want[name]:
                    problems.append(f"{name}: shape {tuple(array.shape)}, config implies {want[name]}")
                params[name] = array
            elif not _ignorable(name, config):
                problems.append(f"unexpected tensor {name} {tuple(array.shape)}")
    problems += [f"missing tensor {n} {want[n]}" for n in want if n not in params]
    if problems:
        raise WeightsError(f"checkpoint in {model_dir} does not match its config.json:\n  "
                           + "\n  ".join(problems))
    return params
