"""The real model end to end: SmolLM2-135M converted by weights_tool, run by minee, against
transformers loading the same GGUF (logits on varied prompts, 32 greedy tokens)."""
import numpy as np
import pytest
import torch

import minee
from helpers import hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind",
    "Question: What is 12 plus 7? Answer:",
    "Les élèves ont appris que la Terre tourne autour du Soleil, et",
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_logits_match_transformers(smol, prompt):
    model, hf = smol
    ids = model.tokenizer.encode(prompt)
    ours = model.forward(ids)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS[:3], ids=range(3))
def test_32_greedy_tokens_match_transformers(smol, prompt):
    model, hf = smol
    ids = model.tokenizer.encode(prompt)
    ours = minee.generate(model, ids, max_new_tokens=32, stop_at_eos=False).tokens
    assert ours == hf_greedy(hf, ids, 32)


def test_the_capital_of_france(smol):
    model, _ = smol
    assert minee.generate(model, "The capital of France is", max_new_tokens=3).text.startswith(" Paris.")


def test_chat_text_leaves_out_the_end_of_turn_token(smol):
    model, _ = smol
    out = minee.generate(model, "What is the capital of France?", max_new_tokens=30, chat=True)
    assert out.tokens[-1] in model.config.eos_token_ids              # stopped on <|im_end|>
    assert "Paris" in out.text and "<|im_end|>" not in out.text
