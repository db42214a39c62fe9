"""Where a model comes from: a GGUF file loaded directly (converted once into the cache), and the
tiny random models of weights_tool, which now carry a tokenizer so text prompts work."""
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

import minee
import weights_tool
from minee import convert
from minee.__main__ import main
from test_convert import write_tiny_llama_gguf

IDS = [1, 40, 280, 7, 266, 12]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty model cache, and a count of the GGUF conversions made into it."""
    monkeypatch.setenv("MINEE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = convert._convert
    monkeypatch.setattr(convert, "_convert", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    return tmp_path / "cache", calls


def gguf_file(tmp_path, folder, seed):
    path = tmp_path / folder / "model.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path, seed=seed)
    return path


def test_load_a_gguf_file_converts_once_and_matches_transformers(tmp_path, cache):
    import torch
    from transformers import AutoModelForCausalLM

    root, calls = cache
    path = gguf_file(tmp_path, "a", seed=0)
    model = minee.load(path)
    assert len(calls) == 1 and model.source == str(path)
    again = minee.load(str(path))                                     # a second load: no conversion
    assert len(calls) == 1
    converted = list((root / "gguf").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("model-")
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].numpy()
    got = model.forward(IDS)[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    np.testing.assert_array_equal(again.forward(IDS)[0], got)
    assert model.tokenizer.encode("hello world") == again.tokenizer.encode("hello world")


def test_another_file_with_the_same_name_is_not_confused(tmp_path, cache):
    root, calls = cache
    a, b = gguf_file(tmp_path, "a", seed=0), gguf_file(tmp_path, "b", seed=1)
    la, lb = minee.load(a).forward(IDS), minee.load(b).forward(IDS)
    assert len(calls) == 2 and len(list((root / "gguf").iterdir())) == 2
    assert np.abs(la - lb).max() > 1e-3                               # b's own weights, not a's conversion
    b.write_bytes(a.read_bytes())                                      # b now holds a's contents: a's entry
    np.testing.assert_array_equal(minee.load(b).forward(IDS), la)
    assert len(calls) == 2


def test_cli_model_gguf_shows_progress_once(tmp_path, cache, capsys):
    _, calls = cache
    path = gguf_file(tmp_path, "a", seed=0)
    argv = ["generate", "--model", str(path), "--prompt", "hello world", "--max-new-tokens", "3", "--json"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "converting" in first.err and str(path) in first.err
    assert main(argv) == 0
    second = capsys.readouterr()
    assert "converting" not in second.err and json.loads(second.out)["tokens"] == json.loads(first.out)["tokens"]
    assert len(calls) == 1


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "fake.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        minee.load(bad)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=".gguf file"):
        minee.load(other)
    assert not (cache[0] / "gguf").exists() or not any((cache[0] / "gguf").iterdir())


# ------------------------------------------------------------------ weights_tool random: with a tokenizer

@pytest.mark.parametrize("vocab", [256, 300, 20000])
def test_random_model_has_a_byte_level_tokenizer_of_its_vocabulary(tmp_path, vocab):
    out = tmp_path / "r"
    assert weights_tool.main(["random", str(out), "--vocab", str(vocab)]) == 0
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == vocab == json.loads((out / "config.json").read_text())["vocab_size"]
    text = "Héllo, wörld! 東京 😀\n\tend"
    ids = tok.encode(text).ids
    assert max(ids) < vocab and tok.decode(ids) == text               # every byte is covered
    again = tmp_path / "again"
    weights_tool.main(["random", str(again), "--vocab", str(vocab)])
    assert (again / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()   # deterministic


def test_generate_with_a_text_prompt_on_a_random_model(tmp_path, capsys):
    """The issue's case: `generate --model RANDOM_DIR --prompt ...` failed for want of a tokenizer."""
    out = tmp_path / "r"
    weights_tool.main(["random", str(out)])
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["tokens"]) == 5 and res["prompt_tokens"] == Tokenizer.from_file(
        str(out / "tokenizer.json")).encode("Hello").ids


def test_small_vocabulary_needs_no_tokenizer_flag(tmp_path, capsys):
    assert weights_tool.main(["random", str(tmp_path / "small"), "--vocab", "100"]) == 2
    assert "--no-tokenizer" in capsys.readouterr().err
    assert weights_tool.main(["random", str(tmp_path / "small"), "--vocab", "100", "--no-tokenizer"]) == 0
    assert not (tmp_path / "small" / "tokenizer.json").exists()
    assert os.path.isfile(tmp_path / "small" / "model.safetensors")
