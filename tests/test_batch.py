"""Batched decoding, with and without early exit: every row equals the same prompt decoded alone."""
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


PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 8, 110, 1], [64, 2, 33, 90, 15]]


def varied_gate(model):
    """A confidence gate whose threshold makes rows exit at different points."""
    _, acts = model.run_with_cache(np.array(PROMPTS))
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


def test_batched_step_fills_each_row_from_its_own_exit(model):
    kv = model.new_kv_cache(3, 8)
    model.forward(np.array(PROMPTS)[:, :4], kv_cache=kv)
    dec = ExitDecoder(model, varied_gate(model), "copy")
    _, points = dec.step_batch(np.array(PROMPTS)[:, 4], kv)
    pos = 4
    for b, p in enumerate(points):
        l_exit = p // 2
        for l in range(l_exit + 1, model.config.n_layers):
            np.testing.assert_array_equal(kv.keys[l, b, :, pos], kv.keys[l_exit, b, :, pos])
            np.testing.assert_array_equal(kv.values[l, b, :, pos], kv.values[l_exit, b, :, pos])
    assert kv.length == 5


def test_batch_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="equal token length"):
        minee.generate_batch(model, [[1, 2, 3], [4, 5]], 4)
    with pytest.raises(ValueError, match="single prompt to stream"):
        minee.generate_batch(model, PROMPTS, 4, on_text=print)
