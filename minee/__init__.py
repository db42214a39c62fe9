"""minee: a from-scratch NumPy LLaMA for learning how LLMs compute and studying early exit on a CPU."""
from .config import ConfigError, ModelConfig, load_config
from .generate import Generation, generate, generate_batch, generate_many
from . import shortcuts
from .loading import load, resolve
from .model import Model, hook_names
from .speculative import speculative_generate
from .threads import get_threads, set_threads
from .tokenizer import TokenizerError, load_tokenizer
from .weights import WeightsError, load_weights

__all__ = ["load", "Model", "ModelConfig", "Generation", "generate", "generate_batch", "generate_many",
           "speculative_generate", "hook_names", "ConfigError", "WeightsError", "TokenizerError", "set_threads",
           "get_threads", "shortcuts"]
