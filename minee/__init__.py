"""minee: a from-scratch NumPy LLaMA for learning how LLMs compute and studying early exit on a CPU."""
from pathlib import Path

from .config import ConfigError, ModelConfig, load_config
from .generate import Generation, generate, generate_batch, generate_many
from . import shortcuts
from .model import Model, hook_names
from .speculative import speculative_generate
from .threads import get_threads, set_threads
from .tokenizer import TokenizerError, load_tokenizer
from .weights import WeightsError, load_weights

__all__ = ["load", "Model", "ModelConfig", "Generation", "generate", "generate_batch", "generate_many",
           "speculative_generate", "hook_names", "ConfigError", "WeightsError", "TokenizerError", "set_threads",
           "get_threads", "shortcuts"]


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
    called before: see minee/threads.py for why.
    """
    from .threads import ensure_threads
    ensure_threads()
    path = resolve(src, progress)
    config = load_config(path)
    return Model(config, load_weights(path, config), load_tokenizer(path), source=str(src))
