"""Token trajectories (lens.token_trajectory): the rank and probability of chosen tokens at every
exit point, against transformers' hidden states and a float64 computation by hand."""
import numpy as np
import pytest
import torch

import minee
from helpers import random_llama
from minee.lens import token_trajectory

V, L = 96, 3
IDS = [5, 17, 80, 3, 41, 60, 22]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("traj")
    ref = random_llama(path, head_std=0.3, vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=L,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return ref, minee.load(path)


def rank_and_prob(logits, tokens):
    """(K, 2) bounds of each token's rank (how many ids score strictly higher), counting ids within
    float32 rounding of its logit (relative to the logits' size) as either side, and (K,) softmax
    probabilities, in float64."""
    logits = logits.astype(np.float64)
    tol = 1e-5 * np.abs(logits).max()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return np.array([[(logits > logits[t] + tol).sum(), (logits > logits[t] - tol).sum() - 1] for t in tokens]), p[tokens]


def assert_rank(got, bounds):
    assert ((bounds[:, 0] <= got) & (got <= bounds[:, 1])).all(), (got, bounds)


@pytest.mark.parametrize("position", [-1, 0, 3])
def test_trajectory_matches_transformers_and_a_hand_computation(tiny, position):
    ref, model = tiny
    tokens = [0, 7, 50, 95]
    traj = token_trajectory(model, IDS, tokens, position=position)
    assert traj.rank.shape == traj.prob.shape == (len(tokens), 2 * L) and traj.tokens == tokens
    assert traj.position == position % len(IDS)
    with torch.no_grad():
        out = ref(torch.tensor([IDS]), output_hidden_states=True)
    pos = position % len(IDS)
    norm = ref.model.norm.weight.detach().double().numpy()
    head = ref.lm_head.weight.detach().double().numpy()
    for l in range(L - 1):                                # block outputs: transformers' hidden states (pre-norm)
        h = out.hidden_states[l + 1][0, pos].double().numpy()
        logits = (h / np.sqrt((h * h).mean() + ref.config.rms_norm_eps) * norm) @ head.T
        rank, prob = rank_and_prob(logits, tokens)
        assert_rank(traj.rank[:, 2 * l + 1], rank)
        np.testing.assert_allclose(traj.prob[:, 2 * l + 1], prob, rtol=1e-4)
    rank, prob = rank_and_prob(out.logits[0, pos].numpy(), tokens)   # the last point is the model's output
    assert_rank(traj.rank[:, -1], rank)
    np.testing.assert_allclose(traj.prob[:, -1], prob, rtol=1e-4)
    _, acts = model.run_with_cache(IDS, names="blocks.*.hook_resid_mid")   # after-attention points by hand
    for l in range(L):
        h = acts[f"blocks.{l}.hook_resid_mid"][0, pos].astype(np.float64)
        logits = (h / np.sqrt((h * h).mean() + ref.config.rms_norm_eps) * norm) @ head.T
        rank, prob = rank_and_prob(logits, tokens)
        assert_rank(traj.rank[:, 2 * l], rank)
        np.testing.assert_allclose(traj.prob[:, 2 * l], prob, rtol=1e-4)
    assert len(np.unique(traj.rank)) > 3                 # the ranks really move between points


def test_trajectory_errors(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="outside the sequence of 7 tokens"):
        token_trajectory(model, IDS, [1], position=7)
    with pytest.raises(ValueError, match="out of range"):
        token_trajectory(model, IDS, [V])
    with pytest.raises(ValueError, match="no tokenizer"):
        token_trajectory(model, IDS, " Paris")
    with pytest.raises(ValueError, match="one sequence"):
        token_trajectory(model, [IDS, IDS], [1])


def test_smollm2_trajectory_by_text(smollm2_dir, tmp_path):
    from minee.plots import plot_trajectory
    model = minee.load(smollm2_dir)
    ids = model.tokenizer.encode("The capital of France is")
    traj = token_trajectory(model, ids, [" Paris", " Lyon"])
    assert traj.tokens == [model.tokenizer.encode(t)[0] for t in (" Paris", " Lyon")]
    assert traj.rank[0, -1] == 0 and traj.rank[1, -1] > 0             # the model's answer is " Paris"
    assert traj.prob[0, -1] > traj.prob[1, -1]
    with pytest.raises(ValueError, match="3 tokens"):
        token_trajectory(model, ids, " Parisian capital")
    fig = plot_trajectory(traj, model.tokenizer, out=tmp_path / "traj.png")
    assert (tmp_path / "traj.png").stat().st_size > 10_000
    rank_ax, prob_ax = fig.axes
    assert [ln.get_label() for ln in prob_ax.lines] == ["' Paris'", "' Lyon'"]
    np.testing.assert_array_equal(rank_ax.lines[0].get_ydata(), traj.rank[0] + 1)
    assert rank_ax.yaxis_inverted() and rank_ax.get_yscale() == "log"
