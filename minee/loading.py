"""Where a model comes from: a directory or a known name in, a Model out, and a fingerprint to
tell loaded models apart (shortcut files and worker processes check it)."""
import hashlib
from pathlib import Path

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
    return Model(config, load_weights(path, config), load_tokenizer(path), source=str(src))


def fingerprint(model):
    """A short hash of every weight tensor's name, shape and first and last values.

    Cheap (milliseconds) but different for any other checkpoint, fine-tunes included, so
    shortcuts fitted on one model are never silently applied to another, and a worker that
    loaded another model than the one it was sent for is caught."""
    h = hashlib.sha256()
    for name in sorted(model.params):
        flat = model.params[name].reshape(-1)
        h.update(f"{name}:{model.params[name].shape}:{flat.dtype};".encode())
        h.update(flat[:256].tobytes() + flat[-256:].tobytes())
    return h.hexdigest()[:16]
