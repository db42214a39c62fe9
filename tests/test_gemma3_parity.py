"""The real Gemma 3 270M end to end: fetched and converted by minee, run by minee, against
transformers loading the same GGUF (logits on varied prompts, greedy continuations, and a prompt
longer than the 512-position sliding window, in a full pass and decoding with the KV cache)."""
import numpy as np
import pytest
import torch

import minee
from helpers import hf_greedy
from minee.analysis import corpus_ids

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4          # max |minee - transformers| <= TOL * max |logit|
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind",
    "Question: What is 12 plus 7? Answer:",
    "Les élèves ont appris que la Terre tourne autour du Soleil, et",
]


@pytest.fixture(scope="module")
def gemma(gemma3_dir, hf_gemma3):
    """(minee model, transformers twin) of Gemma 3 270M."""
    return minee.load(gemma3_dir), hf_gemma3


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_logits_match_transformers(gemma, prompt):
    model, hf = gemma
    ids = model.tokenizer.encode(prompt)
    assert ids[0] == model.config.bos_token_id == 2                 # Gemma's tokenizer adds <bos>
    ours = model.forward(ids)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    err = rel_err(ours, ref)
    print(f"[parity] gemma3-270m prompt {PROMPTS.index(prompt)}: rel={err:.2e}")
    assert ours.dtype == np.float32 and err <= TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=range(3))
def test_32_greedy_tokens_match_transformers(gemma, prompt):
    model, hf = gemma
    ids = model.tokenizer.encode(prompt)
    ours = minee.generate(model, ids, max_new_tokens=32, stop_at_eos=False).tokens
    assert ours == hf_greedy(hf, ids, 32)


def test_the_capital_of_france(gemma):
    model, _ = gemma
    out = minee.generate(model, "The capital of France is", max_new_tokens=12)
    assert out.text == " the capital of the country of France. It is the largest"


def test_beyond_the_sliding_window_in_a_full_pass_and_with_the_cache(gemma):
    """A 700-token prompt: its 5 of 6 sliding layers see only the last 512 positions. The full pass's
    logits at the last positions, and 8 tokens decoded with the KV cache, equal transformers'."""
    model, hf = gemma
    ids = [model.config.bos_token_id] + corpus_ids(model.tokenizer, max_tokens=700)[1:].tolist()
    assert len(ids) > model.config.window(0) + 100
    ours = model.forward(ids)[0, -64:]
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), logits_to_keep=64).logits[0].numpy()
    err = rel_err(ours, ref)
    print(f"[parity] gemma3-270m 700 tokens, last 64 positions: rel={err:.2e}")
    assert err <= TOL
    decoded = minee.generate(model, ids, max_new_tokens=8, stop_at_eos=False).tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert decoded == out[0, len(ids):].tolist()
