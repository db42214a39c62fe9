"""Where a model comes from: a directory or a known name in, a Model out, and a fingerprint to
tell loaded models apart (shortcut files and Dask workers check it)."""
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from .config import load_config
from .model import Model
from .threads import ensure_threads, map_gemm_buffer
from .tokenizer import load_tokenizer
from .weights import load_weights


def resolve(src, progress=True) -> Path:
    """A model directory from a path, a GGUF file (converted into the cache once) or a known name
    (fetched and converted on first use)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    from .convert import KNOWN_MODELS, converted_gguf, fetch
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf(path, progress=progress)
    if str(src) in KNOWN_MODELS:
        return fetch(str(src), progress=progress)
    raise FileNotFoundError(f"{src!r} is neither a model directory, a .gguf file nor a known model name "
                            f"({', '.join(KNOWN_MODELS)})")


def load(src, progress=True) -> Model:
    """Load a Hugging Face LLaMA directory (config.json + *.safetensors [+ tokenizer.json]), a llama
    GGUF file (converted into the cache on first use, see convert.converted_gguf) or a known name.

    Also sets NumPy's BLAS to MINEE_THREADS threads (default 1) unless minee.set_threads was
    called before, and maps OpenBLAS's packing buffer: see minee/threads.py for why.
    """
    ensure_threads()
    map_gemm_buffer()
    path = resolve(src, progress)
    config = load_config(path)
    tokenizer = load_tokenizer(path)           # before the weights, whose memory check then counts it
    return Model(config, load_weights(path, config), tokenizer, source=str(src))


def fingerprint(model, every_value=False):
    """A hash that tells loaded models apart.

    Default: a short hash of every weight tensor's name, shape and first and last 256 values.
    Cheap (milliseconds) but different for any other checkpoint, fine-tunes included, so
    shortcuts fitted on one model are never silently applied to another (shortcut files store it).
    It does not see the config, nor an edit that leaves the ends of every tensor alone.

    every_value=True: a hash of the config and of every byte of every weight (blake2b), so any
    edit changes it, at the cost of reading every weight once. Dask workers, which load the model
    again from its source, compare it with the caller's model's (minee.parallel)."""
    if every_value:
        h = hashlib.blake2b(json.dumps(dataclasses.asdict(model.config), sort_keys=True).encode(), digest_size=16)
    else:
        h = hashlib.sha256()
    for name in sorted(model.params):
        flat = np.ascontiguousarray(model.params[name]).reshape(-1)
        h.update(f"{name}:{model.params[name].shape}:{flat.dtype};".encode())
        h.update(flat if every_value else flat[:256].tobytes() + flat[-256:].tobytes())
    return h.hexdigest() if every_value else h.hexdigest()[:16]
