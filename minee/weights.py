"""Read Hugging Face safetensors checkpoints into float32 NumPy arrays, trusting nothing in them.

A .safetensors file is: 8 bytes (little-endian u64) header length N, a JSON header of N bytes
{name: {"dtype", "shape", "data_offsets": [begin, end]}} with offsets into the data that follows,
then the raw tensor bytes. Checkpoints come from anywhere, so before a single tensor is allocated
every file is checked to be a regular file inside the model's directory, every header entry against
the file, then names, dtypes and shapes against config.json, then the model's size against the
memory this process may still use (limits.available_memory). Each problem is a WeightsError naming the file
and the tensor, never a huge allocation, a NumPy error or weights read from the wrong bytes.

NumPy has no bfloat16: bf16 is the top half of a float32, so widening the raw uint16 by a
16-bit shift is exact. Tensors are read and converted one at a time, so peak memory stays
close to the float32 model size.
"""
import json
import math
import struct
from pathlib import Path

import numpy as np

from .config import model_file, read_json
from .limits import MAX_HEADER_BYTES, check_memory

# safetensors dtype code -> NumPy dtype that holds its raw bytes (bf16 and fp8 travel as unsigned
# bits). The one copy of this table: the converter writes with it and `inspect` sizes tensors by it.
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
          "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.bool_}
FLOAT_DTYPES = ("F32", "F16", "BF16")      # the ones minee widens to float32
# No trained LLaMA weight comes near float16's largest value (checkpoints routinely ship in F16),
# so anything beyond it, like NaN or Inf, is damage that would turn the logits into NaN.
MAX_ABS_WEIGHT = float(np.finfo(np.float16).max)      # 65504


class WeightsError(ValueError):
    """The checkpoint's weights cannot be used: a damaged or hostile file, tensors that do not
    match config.json, or a model too big for this machine's memory."""


def read_header(path) -> dict:
    """{name: {"dtype", "shape", "data_offsets"}} of one .safetensors file, every entry checked
    against the file (no tensor data is read)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):          # e.g. a git-lfs pointer instead of the weights
            raise WeightsError(f"{path} is not a safetensors file (header length {n} is impossible; "
                               "a git-lfs pointer? run `git lfs pull` or download the file again)")
        text = f.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:            # bad JSON or text, a name twice, absurd nesting
        raise WeightsError(f"{path} is not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    _check_layout(path, header, data_size=size - 8 - n)
    return header


def _unique_keys(pairs):
    """json.loads hook: the object as a dict, refusing a key (a tensor name) that appears twice."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"{key!r} appears twice")
        out[key] = value
    return out


def _check_layout(path, header, data_size):
    """Every entry well formed and inside the data; no two tensors share bytes."""
    spans = sorted((_check_entry(path, name, info, data_size), name) for name, info in header.items())
    for ((_, end), name), ((begin, _), other) in zip(spans, spans[1:]):
        if begin < end:
            raise WeightsError(f"tensors {name} and {other} in {path} overlap (data_offsets); "
                               "the file is damaged")


def _check_entry(path, name, info, data_size):
    """(begin, end) of one header entry, or a WeightsError saying what is wrong with it."""
    def bad(problem):
        return WeightsError(f"tensor {name} in {path}: {problem}; the file is truncated or damaged: "
                            "download it again")

    if not isinstance(info, dict):
        raise bad(f"its header entry is {info!r:.40}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r:.40} (the safetensors dtypes minee knows: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"shape {shape!r:.60} is not a list of whole numbers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets {offsets!r:.60} are not two whole numbers >= 0")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] do not lie within its {data_size} bytes of data")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise bad(f"shape {shape} of {dtype} takes {nbytes} bytes but data_offsets span {end - begin}")
    return begin, end


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def safetensors_files(model_dir) -> list:
    """The checkpoint's .safetensors files: from model.safetensors.index.json if sharded. Each is a
    regular file inside the model's directory (config.model_file)."""
    model_dir = Path(model_dir)
    index = model_file(model_dir, "model.safetensors.index.json", WeightsError)
    if index is not None:
        weight_map = read_json(index, WeightsError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise WeightsError(f"{index} has no weight_map of tensor name -> shard file name")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if outside:
            raise WeightsError(f"{index} names {outside[0]!r} as a shard; shards must be .safetensors "
                               f"files in {model_dir}")
        files = [model_file(model_dir, s, WeightsError) for s in shards]
        missing = [s for s, f in zip(shards, files) if f is None]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = [model_file(model_dir, f.name, WeightsError) for f in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}; minee reads safetensors "
                                "checkpoints (convert a GGUF with `python weights_tool.py convert`)")
    return files


def read_headers(files) -> dict:
    """name -> (file, header entry) over all shards; a name in two shards is an error."""
    where = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in where:
                raise WeightsError(f"tensor {name} is in both {where[name][0]} and {path}; "
                                   "a checkpoint holds each tensor once")
            where[name] = (path, info)
    return where


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen F16/BF16 (BF16 given as its raw uint16 bits) to a new float32 array."""
    if dtype == "BF16":
        wide = raw.astype(np.uint32)
        wide <<= 16                                       # in place: no second full-size copy
        return wide.view(np.float32)
    return raw.astype(np.float32)


def read_tensor(f, path, name, info) -> np.ndarray:
    """The tensor of one checked header entry of the open file f, as float32 with every value in range.

    F32 is read straight into its own new array, F16/BF16 into a raw buffer that is widened, so
    loading holds the float32 model plus at most one raw tensor.
    """
    f.seek(0)
    data_start = 8 + struct.unpack("<Q", f.read(8))[0]                  # after the header
    raw = np.empty(info["shape"], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<"))
    f.seek(data_start + info["data_offsets"][0])
    if f.readinto(memoryview(raw.reshape(-1)).cast("B")) != raw.nbytes:
        raise WeightsError(f"tensor {name} in {path} is truncated; download the file again")
    array = raw if info["dtype"] == "F32" else to_float32(raw, info["dtype"])
    check_values(array, f"tensor {name} in {path}")
    return array


def check_values(array, what):
    """Refuse NaN, Inf and magnitudes no trained model has (MAX_ABS_WEIGHT): they mean damage."""
    if array.size and not (-MAX_ABS_WEIGHT <= array.min() and array.max() <= MAX_ABS_WEIGHT):
        raise WeightsError(f"{what} holds NaN, Inf or values beyond +-{MAX_ABS_WEIGHT:g}, which no "
                           "trained model has; the file is damaged: download it again")


def expected_shapes(config) -> dict:
    """Checkpoint name -> shape for every tensor a model with this config must have."""
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
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if config.post_norms:
            shapes.update({p + "pre_feedforward_layernorm.weight": (D,), p + "post_feedforward_layernorm.weight": (D,)})
        if config.attention_bias or config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config.attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (D,)
        if config.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,),
                           p + "mlp.down_proj.bias": (D,)})
    return shapes


# A multimodal gemma3 checkpoint holds its text model under other names, beside parts minee does not run.
TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                       "model.language_model.": "model."}
OTHER_PARTS = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_model_names(where, config) -> dict:
    """The headers {name: (file, entry)} under the text model's names: for a multimodal gemma3
    checkpoint its language model's tensors renamed and the vision parts left out; others as they are."""
    if config.model_type != "gemma3":
        return where
    renamed = {}
    for name, entry in where.items():
        if name.startswith(OTHER_PARTS):
            continue
        old = next((o for o in TEXT_MODEL_PREFIXES if name.startswith(o)), None)
        renamed[name if old is None else TEXT_MODEL_PREFIXES[old] + name[len(old):]] = entry
    return renamed


def _ignorable(name, config):
    """Tensors some checkpoints carry that change nothing: RoPE buffers, a tied head's copy."""
    return name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and config.tie_word_embeddings)


def _mismatches(where, want, config) -> list:
    """Every way the headers differ from what the config implies, as one line each."""
    problems = []
    for name, (_, info) in where.items():
        if name in want:
            if tuple(info["shape"]) != want[name]:
                problems.append(f"{name}: shape {tuple(info['shape'])}, config implies {want[name]}")
            elif info["dtype"] not in FLOAT_DTYPES:
                problems.append(f"{name}: dtype {info['dtype']}; minee reads {', '.join(FLOAT_DTYPES)}")
        elif not _ignorable(name, config):
            problems.append(f"unexpected tensor {name} {tuple(info['shape'])}")
    return problems + [f"missing tensor {n} {want[n]}" for n in want if n not in where]


def check_tensors(where, config, what):
    """WeightsError "`what` ...: problem; problem; ..." unless the tensors where = {name: (file,
    {"dtype", "shape"})} are exactly those the config implies, with its shapes, in a float dtype."""
    problems = _mismatches(where, expected_shapes(config), config)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise WeightsError(f"{what}: {shown}")


def load_weights(model_dir, config) -> dict:
    """Checkpoint name -> float32 array, checked against the config, and the model's size against
    the memory this process may still use, before any tensor is read."""
    want = expected_shapes(config)
    where = text_model_names(read_headers(safetensors_files(model_dir)), config)
    check_tensors(where, config, f"checkpoint in {model_dir} does not match its config.json")
    check_memory(4 * sum(math.prod(s) for s in want.values()), f"the model in {model_dir} (float32 weights)",
                 "use a smaller model, or free memory", WeightsError)
    params = {}
    for path in dict.fromkeys(where[name][0] for name in want):             # each file once, in order
        with open(path, "rb") as f:
            for name in want:
                if where[name][0] == path:
                    params[name] = read_tensor(f, path, name, where[name][1])
    return params
