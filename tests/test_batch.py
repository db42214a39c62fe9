"""Batched decoding, with and without early exit, prompts of different lengths: every row equals
the same prompt decoded alone."""
import numpy as np
import pytest

import minee
import weights_tool
from minee.exits import ExitDecoder, Gate
from minee.lens import log_softmax


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_batch")
    weights_tool.make_random_model(path, layers=4, d_model=48, heads=4, kv_heads=2, ffn=96, vocab=120,
                                   untied=True, std=0.15, seed=3)
    return minee.load(path)


PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 8, 110, 1, 54, 60, 2], [64, 2, 33]]      # 5, 8 and 3 tokens


def varied_gate(model):
    """A confidence gate whose threshold makes rows exit at different points."""
    _, acts = model.run_with_cache(np.array([p[:3] for p in PROMPTS]))
    probs = np.exp(log_softmax(model.unembed(acts["blocks.1.hook_resid_post"])))
    return Gate("confidence", float(np.median(probs.max(-1))), min_point=1)


def test_batch_without_exit_equals_rows_alone(model):
    batch = minee.generate_batch(model, PROMPTS, 10, stop_at_eos=False)
    for prompt, out in zip(PROMPTS, batch):
        assert out.tokens == minee.generate(model, prompt, 10, stop_at_eos=False).tokens


@pytest.mark.parametrize("kv", ["copy", "propagate", "compute"])
def test_batched_early_exit_equals_rows_alone(model, kv):
    gate = varied_gate(model)
    batch = minee.generate_batch(model, PROMPTS, 10, exit=gate, kv=kv, stop_at_eos=False)
    points = set()
    for prompt, out in zip(PROMPTS, batch):
        alone = minee.generate(model, prompt, 10, exit=gate, kv=kv, stop_at_eos=False)
        assert out.tokens == alone.tokens
        assert out.exit_points == alone.exit_points
        points |= set(out.exit_points[1:])
    assert len(points) > 2                      # rows really exit at different points


def test_sampled_rows_follow_their_own_seeds(model):
    """Row b samples from its own stream: seed=[s0, s1, s2] gives row b == generate(prompt b, seed=s_b),
    an int seed s gives row b == generate(prompt b, seed=s + b), whatever the other rows are."""
    kw = dict(temperature=1.5, top_k=40, stop_at_eos=False)
    seeds = [11, 22, 33]
    batch = minee.generate_batch(model, PROMPTS, 12, seed=seeds, **kw)
    for prompt, s, out in zip(PROMPTS, seeds, batch):
        assert out.tokens == minee.generate(model, prompt, 12, seed=s, **kw).tokens
    by_int = minee.generate_batch(model, PROMPTS, 12, seed=7, **kw)
    for b, (prompt, out) in enumerate(zip(PROMPTS, by_int)):
        assert out.tokens == minee.generate(model, prompt, 12, seed=7 + b, **kw).tokens
    others = minee.generate_batch(model, [PROMPTS[0], [9, 9]], 12, seed=[11, 5], **kw)
    assert others[0].tokens == batch[0].tokens
    assert len({tuple(o.tokens) for o in batch}) == 3                 # the rows really differ


def test_batched_step_fills_each_row_from_its_own_exit(model):
    kv = model.new_kv_cache(3, 9)
    for b, prompt in enumerate(PROMPTS):
        model.forward(prompt[:-1], kv_cache=kv, rows=[b])
    dec = ExitDecoder(model, varied_gate(model), "copy")
    _, points = dec.step_batch([p[-1] for p in PROMPTS], kv)
    for b, p in enumerate(points):
        l_exit, pos = p // 2, len(PROMPTS[b]) - 1
        for l in range(l_exit + 1, model.config.n_layers):
            np.testing.assert_array_equal(kv.keys[l, b, :, pos], kv.keys[l_exit, b, :, pos])
            np.testing.assert_array_equal(kv.values[l, b, :, pos], kv.values[l_exit, b, :, pos])
    assert kv.lengths.tolist() == [len(p) for p in PROMPTS]


def test_batch_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="single prompt to stream"):
        minee.generate_batch(model, PROMPTS, 4, on_text=print)
    with pytest.raises(ValueError, match="one seed per prompt"):
        minee.generate_batch(model, PROMPTS, 4, seed=[1, 2])
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        minee.generate_batch(model, PROMPTS, 4, seed=[1, -2, 3])
