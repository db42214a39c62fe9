"""Generation: greedy parity with transformers' generate, EOS, seeded sampling, sample(), and the CLI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM

import minee
from helpers import random_llama
from minee.__main__ import main
from minee.generate import sample

REPO = Path(__file__).resolve().parents[1]
V = 256
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def make_checkpoint(path, seed=0, **overrides):
    """A tiny random LLaMA saved to path with a word-level tokenizer ('w0' .. 'w255'); returns the
    transformers model reloaded from disk."""
    ref = random_llama(path, seed=seed, **{**BASE, **overrides})
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return ref


def reference(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(ref, prompt, n):
    """transformers' greedy continuation (new ids only); stops at the config's EOS if it has one."""
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def set_eos(src, dst, eos):
    """Copy checkpoint src to dst with eos_token_id = eos in config.json and generation_config.json."""
    shutil.copytree(src, dst)
    for name in ("config.json", "generation_config.json"):
        f = dst / name
        if f.is_file():
            cfg = json.loads(f.read_text())
            cfg["eos_token_id"] = eos
            f.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, transformers reference, minee model)."""
    path = tmp_path_factory.mktemp("tiny_gen")
    ref = make_checkpoint(path)
    return path, ref, minee.load(path)


PROMPT = [17, 3, 250, 99, 42, 8, 120]


def words(ids):
    return " ".join(f"w{i}" for i in ids)


# ------------------------------------------------------------------ greedy parity and EOS

@pytest.mark.parametrize("prompt", [PROMPT, [5]], ids=["7-token-prompt", "1-token-prompt"])
def test_greedy_equals_transformers(tiny, prompt):
    path, ref, model = tiny
    want = hf_greedy(ref, prompt, 24)
    assert len(want) == 24
    out = minee.generate(model, prompt, max_new_tokens=24)
    assert out.tokens == want
    assert out.prompt_tokens == prompt
    assert out.text == words(want)


def test_text_prompt_equals_transformers(tiny):
    path, ref, model = tiny
    out = minee.generate(model, words(PROMPT), max_new_tokens=10)
    assert out.prompt_tokens == PROMPT
    assert out.tokens == hf_greedy(ref, PROMPT, 10)
    assert out.text == Tokenizer.from_file(str(path / "tokenizer.json")).decode(out.tokens)


def test_generation_object(tiny):
    _, _, model = tiny
    pieces = []
    out = minee.generate(model, np.array(PROMPT, dtype=np.int32), max_new_tokens=5, on_text=pieces.append)
    assert isinstance(out, minee.Generation)
    assert out.prompt_tokens == PROMPT and all(type(t) is int for t in out.prompt_tokens)
    assert len(out.tokens) == 5 and all(type(t) is int and 0 <= t < V for t in out.tokens)
    assert isinstance(out.text, str) and out.text == words(out.tokens)
    assert "".join(pieces) == out.text                      # streamed pieces add up to the text
    assert out.stats["prompt_tokens"] == len(PROMPT) and out.stats["new_tokens"] == 5
    assert out.stats["prefill_s"] >= 0 and out.stats["decode_s"] >= 0


def test_stops_at_eos(tiny, tmp_path):
    path, ref, _ = tiny
    full = hf_greedy(ref, PROMPT, 12)
    k = next(i for i in range(2, 12) if full[i] not in full[:i])    # first fresh token after step 2
    eos_dir = set_eos(path, tmp_path / "eos", full[k])
    want = hf_greedy(reference(eos_dir), PROMPT, 12)                 # transformers stops there too
    assert want == full[:k + 1]
    model = minee.load(eos_dir)
    out = minee.generate(model, PROMPT, max_new_tokens=12)
    assert out.tokens == want and out.tokens[-1] == full[k]
    assert out.stats["new_tokens"] == k + 1
    assert minee.generate(model, PROMPT, max_new_tokens=12, stop_at_eos=False).tokens == full


def test_stops_at_any_of_several_eos(tiny, tmp_path):
    path, ref, _ = tiny
    full = hf_greedy(ref, PROMPT, 12)
    k = next(i for i in range(3, 12) if full[i] not in full[:i])
    unused = next(t for t in range(V) if t not in full)
    model = minee.load(set_eos(path, tmp_path / "eos", [unused, full[k]]))
    assert minee.generate(model, PROMPT, max_new_tokens=12).tokens == full[:k + 1]


# ------------------------------------------------------------------ sampling through generate

def test_seeded_sampling_is_reproducible(tiny):
    _, _, model = tiny
    a = minee.generate(model, PROMPT, max_new_tokens=20, temperature=1.5, seed=0).tokens
    b = minee.generate(model, PROMPT, max_new_tokens=20, temperature=1.5, seed=0).tokens
    c = minee.generate(model, PROMPT, max_new_tokens=20, temperature=1.5, seed=1).tokens
    assert a == b
    assert a != c
    assert a != minee.generate(model, PROMPT, max_new_tokens=20).tokens     # it really sampled


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    path, ref, model = tiny
    greedy = hf_greedy(ref, PROMPT, 16)
    for seed in (0, 1):
        assert minee.generate(model, PROMPT, 16, temperature=1.5, top_k=1, seed=seed).tokens == greedy
        assert minee.generate(model, PROMPT, 16, temperature=1.5, top_p=1e-6, seed=seed).tokens == greedy


# ------------------------------------------------------------------ sample() on hand-made logits

P3 = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))


def draws(logits, n=200, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [sample(logits, rng=rng, **kw) for _ in range(n)]


def test_sample_greedy_is_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9], dtype=np.float32)
    assert sample(logits) == 1
    assert sample(logits, temperature=0.0, top_k=3, top_p=0.2) == 1
    assert type(sample(logits)) is int


def test_sample_top_k_restricts_support():
    logits = np.array([0.0, 3.0, -2.0, 2.9, 2.8, 1.0], dtype=np.float32)
    picked = draws(logits, top_k=2, temperature=1.0)
    assert set(picked) == {1, 3}
    assert set(draws(logits, top_k=3, temperature=5.0)) == {1, 3, 4}
    assert set(draws(logits, n=400, top_k=100, temperature=5.0)) == set(range(6))   # k > V: no restriction


def test_sample_top_p_restricts_support():
    assert set(draws(P3, temperature=1.0, top_p=0.5)) == {0}
    assert set(draws(P3, temperature=1.0, top_p=0.55)) == {0}
    assert set(draws(P3, temperature=1.0, top_p=0.65)) == {0, 1}      # 0.6 alone falls short of 0.65
    assert set(draws(P3, temperature=1.0, top_p=0.8)) == {0, 1}
    assert set(draws(P3, temperature=1.0, top_p=1.0)) == {0, 1, 2}


def test_sample_frequencies_follow_softmax_with_temperature():
    n = 4000
    for temperature in (1.0, 2.0):
        counts = np.bincount(draws(P3, n=n, temperature=temperature), minlength=3) / n
        want = np.array([0.6, 0.3, 0.1]) ** (1 / temperature)
        want /= want.sum()
        assert np.max(np.abs(counts - want)) < 0.03, (temperature, counts, want)
    assert set(draws(P3, temperature=0.05)) == {0}


def test_sample_does_not_modify_logits():
    logits = np.array([0.5, 1.5, -0.5, 1.0], dtype=np.float32)
    before = logits.copy()
    draws(logits, n=5, temperature=0.7, top_k=2, top_p=0.9)
    np.testing.assert_array_equal(logits, before)


def test_sample_without_rng_still_samples():
    """rng is optional in sample()'s signature; temperature > 0 must work without one."""
    picked = {sample(P3, temperature=1.0) for _ in range(50)}
    assert picked <= {0, 1, 2} and len(picked) > 1


# ------------------------------------------------------------------ CLI

def test_cli_json(tiny, capsys):
    path, ref, _ = tiny
    rc = main(["generate", "--model", str(path), "--prompt", words(PROMPT), "--max-new-tokens", "6", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads(captured.out)
    assert data["prompt_tokens"] == PROMPT
    assert len(data["tokens"]) == 6
    assert data["tokens"] == hf_greedy(ref, PROMPT, 6)
    assert data["text"] == Tokenizer.from_file(str(path / "tokenizer.json")).decode(data["tokens"])
    assert data["stats"]["new_tokens"] == 6


def test_cli_streams_text(tiny, capsys):
    path, ref, _ = tiny
    rc = main(["generate", "--model", str(path), "--prompt", words(PROMPT), "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith(words(PROMPT))
    assert words(hf_greedy(ref, PROMPT, 4)) in captured.out
    assert "Traceback" not in captured.err


def test_cli_seeded_sampling_is_reproducible(tiny, capsys):
    path, _, _ = tiny
    argv = ["generate", "--model", str(path), "--prompt", words(PROMPT), "--max-new-tokens", "8",
            "--temperature", "1.5", "--seed", "3", "--json"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1] and len(runs[0]) == 8


def test_cli_subprocess_missing_model_is_a_clean_error(tmp_path):
    missing = tmp_path / "no_such_model"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "minee", "generate", "--model", str(missing),
                           "--prompt", "hello", "--json"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------ a batch of ids, streaming to the end

def test_a_batch_of_id_rows_is_refused_not_cut_to_its_first_row(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError) as e:
        minee.generate(model, [[1, 2, 3], [4, 5, 6]], 3)
    assert "2 rows" in str(e.value) and "generate_batch" in str(e.value)
    assert minee.generate(model, [[1, 2, 3]], 3).tokens == minee.generate(model, [1, 2, 3], 3).tokens


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A random model with a byte-level tokenizer: its text often ends inside a UTF-8 character."""
    import weights_tool
    path = tmp_path_factory.mktemp("byte_gen")
    weights_tool.make_random_model(path, layers=2, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=256, std=0.4)
    return minee.load(path)


def test_text_stream_sends_the_held_back_tail(byte_model):
    from minee.generate import TextStream
    tok = byte_model.tokenizer
    first_byte = tok.encode("é")[0]                    # "é" is two bytes, two tokens in a byte-level vocabulary
    stream = TextStream(tok)
    assert stream.push(first_byte) == ""               # held back: half a character
    assert stream.finish() == tok.decode([first_byte]) == "\ufffd"


def test_streamed_text_equals_the_text(byte_model):
    """For every length, the pieces on_text receives add up to Generation.text, also when the
    generation stops in the middle of a multi-byte character."""
    cut_mid_character = 0
    for n in range(1, 25):
        pieces = []
        out = minee.generate(byte_model, "héllo", n, on_text=pieces.append)
        assert "".join(pieces) == out.text, n
        cut_mid_character += out.text.endswith("\ufffd")
    assert cut_mid_character > 0                        # the case that lost text before
