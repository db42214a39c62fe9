"""The logit lens: unembed, lens logits and metrics against torch, hand-made distributions,
corpus mode, top-k, pictures and the `lens` CLI.

Reference numbers come from transformers/torch (lm_head(norm(h_p)) on transformers' own hidden
states, metrics via torch.nn.functional) or are worked out by hand; never from minee itself.
"""
import json
import math

import numpy as np
import pytest
import torch

import minee
from helpers import random_llama
from minee.hooks import exit_point_names, point_label
from minee.lens import corpus_lens, lens, lens_metrics, logit_stats

pytestmark = pytest.mark.usefixtures("one_thread")
F = torch.nn.functional

PROMPT = "The capital of France is Paris, and the capital of Germany is"
TOL = {"tiny": 1e-5, "smollm2": 1e-4}          # max |diff| / max |ref|, fp32 (see test_hooks.py)


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(minee model, transformers model): a random 2-layer LLaMA built and saved by transformers."""
    out = tmp_path_factory.mktemp("tiny_lens")
    hf = random_llama(out, seed=1, vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return minee.load(out), hf


@pytest.fixture(params=["tiny", "smollm2"])
def pair(request):
    """(kind, minee model, transformers model, ids (T,))."""
    if request.param == "tiny":
        model, hf = request.getfixturevalue("tiny")
        ids = np.random.default_rng(5).integers(0, model.config.vocab_size, 10)
    else:
        model, hf = request.getfixturevalue("smol")
        ids = np.array(model.tokenizer.encode(PROMPT))
    return request.param, model, hf, ids


def hf_lens(hf, ids):
    """transformers' logits (T, V) and torch lens logits (P, T, V) = lm_head(norm(h_p)) for every
    exit point, h_p from transformers' hidden states (resid_post) and a pre-hook (resid_mid)."""
    layers = hf.model.layers
    mids, last = {}, {}
    handles = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda mod, args, kw, l=l: mids.__setitem__(l, args[0] if args else kw["hidden_states"]),
        with_kwargs=True) for l, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(
        lambda mod, args, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            out = hf(torch.as_tensor(ids)[None], output_hidden_states=True, use_cache=False)
            L = len(layers)
            hs = out.hidden_states                              # L + 1: embeddings, blocks 0..L-2, post-norm
            assert len(hs) == L + 1
            # HF's last hidden state is already normalized (design pitfall 5): the raw block
            # output comes from the hook, and normalizing it reproduces hidden_states[-1]
            torch.testing.assert_close(hf.model.norm(last["h"]), hs[-1])
            posts = [hs[l + 1] for l in range(L - 1)] + [last["h"]]
            states = torch.stack([s for l in range(L) for s in (mids[l], posts[l])])[:, 0]   # (P, T, D)
            lens_logits = hf.lm_head(hf.model.norm(states))                                   # (P, T, V)
    finally:
        for h in handles:
            h.remove()
    return out.logits[0], lens_logits


@pytest.fixture(scope="module")
def store():
    """Per-module memo: the SmolLM2 lens (60 points x T x 49152 logits) is costly, so compute it once."""
    return {}


def minee_lens(store, kind, model, ids):
    if ("minee", kind) not in store:
        store["minee", kind] = lens(model, ids, k=5)
    return store["minee", kind]


def torch_lens(store, kind, hf, ids):
    if ("torch", kind) not in store:
        store["torch", kind] = hf_lens(hf, ids)
    return store["torch", kind]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torch_metrics(lens_logits, final_logits, ids):
    """The lens metrics of lens_logits (P, T, V) against final_logits (T, V), in float64 torch,
    plus the top1-top2 gap of each distribution (to tell real disagreements from fp32 near-ties)."""
    logp = F.log_softmax(lens_logits.double(), -1)                              # (P, T, V)
    logq = F.log_softmax(final_logits.double(), -1).expand_as(logp)             # (P, T, V)
    final_top1 = logq[0].argmax(-1)                                             # (T,)
    idx = final_top1[None, :, None].expand(logp.shape[0], -1, 1)
    p_final = logp.gather(-1, idx)[..., 0]                                      # (P, T)
    gold = torch.as_tensor(np.append(ids[1:], -1))
    top1 = logp.argmax(-1)
    acc = (top1 == gold).double()
    acc[:, gold < 0] = float("nan")
    two = logp.topk(2, -1).values
    return {
        "kl": F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1),   # KL(final || point)
        "entropy": -(logp.exp() * logp).sum(-1),
        "agree": (top1 == final_top1).double(),
        "final_rank": (logp > p_final[..., None]).sum(-1).double(),
        "final_prob": p_final.exp(),
        "accuracy": acc,
    }, {"gap": (two[..., 0] - two[..., 1]), "final_gap": (logq[0].topk(2, -1).values.diff(dim=-1).abs()[..., 0]),
        "near_final": ((logp - p_final[..., None]).abs() < 1e-3).sum(-1) - 1}


# ----------------------------------------------------------------------------- unembed and lens logits


def test_unembed_of_last_point_is_the_logits(pair):
    kind, model, _, ids = pair
    L = model.config.n_layers
    logits, acts = model.run_with_cache(ids)
    last = acts[f"blocks.{L - 1}.hook_resid_post"]
    for h, ref in [(last, logits), (last[0], logits[0]), (last[0, -1], logits[0, -1])]:   # any leading shape
        out = model.unembed(h)
        assert out.dtype == np.float32 and out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_lens_logits_of_every_point_match_torch(pair, store):
    kind, model, hf, ids = pair
    names = exit_point_names(model.config.n_layers)
    _, acts = model.run_with_cache(ids, names=names)
    ours = model.unembed(np.stack([acts[n][0] for n in names]))                # (P, T, V)
    ref_final, ref = torch_lens(store, kind, hf, ids)
    errs = [rel_err(ours[p], ref[p].numpy()) for p in range(len(names))]
    print(f"\n{kind}: lens logits worst rel err {max(errs):.3g} at point {int(np.argmax(errs))}")
    assert max(errs) <= TOL[kind], {names[p]: e for p, e in enumerate(errs) if e > TOL[kind]}
    # torch's own check of the last point: the lens of the final block output is the model's logits
    torch.testing.assert_close(ref[-1], ref_final, rtol=1e-5, atol=1e-5 * ref_final.abs().max().item())


def test_lens_result_matches_torch(pair, store):
    kind, model, hf, ids = pair
    L, T = model.config.n_layers, len(ids)
    res = minee_lens(store, kind, model, ids)
    ref_final, ref = torch_lens(store, kind, hf, ids)
    P = 2 * L
    points = [0, 1, L, P - 2, P - 1]
    m_ref, aux = torch_metrics(ref[points], ref_final, ids)          # (5, T) each
    assert res.points == exit_point_names(L)
    assert list(res.ids) == [int(i) for i in ids]
    assert res.top_ids.shape == res.top_probs.shape == (P, T, 5)
    for name, v in res.metrics.items():
        assert v.shape == (P, T), (name, v.shape)
    assert set(res.metrics) == set(m_ref)
    np.testing.assert_array_equal(res.final_top_ids, ref_final.argmax(-1).numpy())

    # top-k: probabilities equal torch's k largest; torch gives minee's ids the same probabilities
    ref_probs = F.softmax(ref, -1)                                              # (P, T, V)
    np.testing.assert_allclose(res.top_probs, ref_probs.topk(5, -1).values.numpy(), atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(res.top_probs, ref_probs.gather(-1, torch.as_tensor(res.top_ids)).numpy(),
                               atol=2e-4, rtol=1e-3)

    # KL and entropy move by at most ~2x the largest logit error of each distribution, and the logits
    # may err by TOL of their largest magnitude (the test above): the GEMM's summation order
    # (ops.linear's form for that many rows, the BLAS kernel) decides where in that band they land.
    logit_band = 4 * TOL[kind] * max(float(ref[points].abs().max()), float(ref_final.abs().max()))
    worst = {}
    for name in ("kl", "entropy", "final_prob"):
        got, want = res.metrics[name][points], m_ref[name].numpy()
        worst[name] = float(np.abs(got - want).max())
        np.testing.assert_allclose(got, want, atol=max(1e-3, logit_band) if name != "final_prob" else 5e-5,
                                   rtol=1e-4, err_msg=name)
    # argmax-based metrics: equal wherever torch's top-1 is not a near-tie at fp32 precision
    clear = (aux["gap"] > 1e-3).numpy() & (aux["final_gap"] > 1e-3).numpy()[None]
    for name in ("agree", "accuracy"):
        got, want = res.metrics[name][points], m_ref[name].numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        ok = np.isnan(want) | (got == want) | ~clear
        assert ok.all(), (name, np.argwhere(~ok))
    rank_diff = np.abs(res.metrics["final_rank"][points] - m_ref["final_rank"].numpy())
    assert (rank_diff <= aux["near_final"].numpy()).all(), rank_diff.max()
    print(f"\n{kind}: metric max abs diffs vs torch {worst}, rank diff {rank_diff.max()}")

    # the last point is the model itself
    m = res.metrics
    assert (m["agree"][-1] == 1).all() and (m["final_rank"][-1] == 0).all()
    # 0 up to the rounding of the two log-sum-exps: the final logits (T rows) and the points' (many
    # rows) are equal but laid out differently by ops.linear, and NumPy sums a strided axis of V
    # float32 terms in sequence (relative error up to V * eps), a contiguous one pairwise
    assert np.abs(m["kl"][-1]).max() <= model.config.vocab_size * np.finfo(np.float32).eps
    assert np.isnan(m["accuracy"][:, -1]).all() and not np.isnan(m["accuracy"][:, :-1]).any()


def test_lens_rejects_a_batch(tiny):
    """lens() decodes one sequence; a (2, T) batch must not silently lose its second row."""
    model, _ = tiny
    ids = np.random.default_rng(6).integers(0, model.config.vocab_size, (2, 6))
    assert lens(model, ids[:1]).ids == [int(i) for i in ids[0]]          # (1, T) is one sequence
    with pytest.raises(ValueError):
        lens(model, ids)


def test_lens_without_top_k(tiny):
    """k=0 (no top-k lists, CLI --top-k 0) gives the metrics or a clear ValueError, not KeyError('top_ids')."""
    model, _ = tiny
    ids = np.arange(6)
    try:
        res = lens(model, ids, k=0)
    except ValueError:
        return
    np.testing.assert_array_equal(res.metrics["kl"], lens(model, ids).metrics["kl"])


def test_corpus_lens_needs_two_tokens(tiny):
    """A text of < 2 tokens has nothing to predict: say so instead of returning {}."""
    model, _ = tiny
    with pytest.raises(ValueError):
        corpus_lens(model, np.array([3]), progress=False)


# ----------------------------------------------------------------------------- hand-made distributions


def logits_of(probs):
    return np.log(np.asarray(probs, np.float32))


def test_identical_distributions():
    rng = np.random.default_rng(0)
    final = rng.standard_normal((4, 30)).astype(np.float32) * 3           # (T, V)
    m = lens_metrics(np.stack([final, final + 7.0]), final)                # a constant shift is the same distribution
    np.testing.assert_allclose(m["kl"], 0, atol=1e-5)
    np.testing.assert_array_equal(m["agree"], 1)
    np.testing.assert_array_equal(m["final_rank"], 0)
    p = np.exp(final.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(m["final_prob"], np.broadcast_to(p.max(-1), (2, 4)), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], np.broadcast_to(-(p * np.log(p)).sum(-1), (2, 4)), rtol=1e-5)
    assert "accuracy" not in m


@pytest.mark.parametrize("V", [2, 50, 49152])
def test_uniform_entropy_is_log_v(V):
    final = np.zeros((1, V), np.float32)
    final[0, 3 % V] = 2.0                                      # final: one token at e^2 times the rest
    m = lens_metrics(np.zeros((1, 1, V), np.float32), final)
    assert m["entropy"][0, 0] == pytest.approx(math.log(V), rel=1e-5)
    q = np.full(V, 1.0)
    q[3 % V] = math.e ** 2
    q /= q.sum()
    # KL(q || uniform) = log V - H(q)
    assert m["kl"][0, 0] == pytest.approx(math.log(V) + (q * np.log(q)).sum(), rel=1e-4, abs=1e-6)
    assert m["final_prob"][0, 0] == pytest.approx(1 / V, rel=1e-5)
    assert m["agree"][0, 0] == 0                               # uniform argmax is token 0, final top-1 is 3
    assert m["final_rank"][0, 0] == 0                           # nothing is strictly more likely than it


def test_disagreeing_point_by_hand():
    q = [0.5, 0.2, 0.1, 0.1, 0.1]                     # final: top-1 token 0
    p = [0.1, 0.2, 0.4, 0.05, 0.25]                   # point: top-1 token 2; token 0 comes 4th (rank 3)
    m = lens_metrics(logits_of([p, q])[:, None], logits_of([q]), targets=[2])
    assert m["agree"][:, 0].tolist() == [0, 1]
    assert m["final_rank"][:, 0].tolist() == [3, 0]
    assert m["final_prob"][0, 0] == pytest.approx(0.1, rel=1e-5)
    kl = 0.5 * math.log(0.5 / 0.1) + 0.2 * math.log(1) + 0.1 * math.log(0.1 / 0.4) \
        + 0.1 * math.log(0.1 / 0.05) + 0.1 * math.log(0.1 / 0.25)
    assert m["kl"][0, 0] == pytest.approx(kl, rel=1e-5)
    assert m["entropy"][0, 0] == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-5)
    assert m["accuracy"][:, 0].tolist() == [1, 0]      # gold next token 2: the point is right, final wrong


def test_accuracy_target_minus_one_is_nan():
    final = logits_of([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])       # top-1: 0, 2, 1
    m = lens_metrics(final[None], final, targets=np.array([0, -1, 0]))
    acc = m["accuracy"][0]
    assert acc[0] == 1 and np.isnan(acc[1]) and acc[2] == 0
    assert np.nanmean(acc) == 0.5                       # a NaN is excluded from an average, not a zero


# ----------------------------------------------------------------------------- corpus mode


@pytest.mark.parametrize("n, window", [(23, 8), (18, 8), (17, 8), (12, 50)])
def test_corpus_lens_is_the_mean_of_window_lenses(tiny, n, window):
    """Windows of `window` inputs, each predicting the next id of the text; the last is shorter."""
    model, _ = tiny
    ids = np.random.default_rng(n).integers(0, model.config.vocab_size, n)
    got = corpus_lens(model, ids, window=window, progress=False)
    per_window, covered = [], 0
    for s in range(0, n - 1, window):
        inputs = ids[s:min(s + window, n - 1)]
        covered += len(inputs)
        # lens of inputs + the next id: its first len(inputs) positions have real gold targets
        r = lens(model, ids[s:s + len(inputs) + 1])
        per_window.append({k: v[:, :len(inputs)] for k, v in r.metrics.items()})
    assert covered == n - 1                                     # every token but the last is an input once
    assert set(got) == set(per_window[0])
    for name in got:
        allpos = np.concatenate([w[name] for w in per_window], axis=1)     # (P, n-1)
        assert not np.isnan(allpos).any()
        assert got[name].shape == (2 * model.config.n_layers,)
        np.testing.assert_allclose(got[name], allpos.mean(1), rtol=1e-5, atol=1e-6, err_msg=name)


def test_corpus_windows_are_independent_contexts(tiny):
    """A window really restarts the context: splitting a text changes later windows' metrics."""
    model, _ = tiny
    ids = np.random.default_rng(9).integers(0, model.config.vocab_size, 17)
    one = corpus_lens(model, ids, window=16, progress=False)
    two = corpus_lens(model, ids, window=8, progress=False)
    r = lens(model, ids)                                        # one window == lens of all 17, minus the last
    for name in one:
        np.testing.assert_allclose(one[name], r.metrics[name][:, :-1].mean(1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(one["kl"], two["kl"])


# ----------------------------------------------------------------------------- top-k


# large k / n cases matter: k rounds of "the largest of the others" must keep them in order
@pytest.mark.parametrize("shape, k", [((50,), 1), ((50,), 7), ((3, 4, 50), 5), ((2, 64), 64), ((6, 1000), 10),
                                      ((3, 257), 128), ((1000,), 500), ((2, 49152), 5)])
def test_top_k_equals_sorting(shape, k):
    x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)     # continuous: no ties
    want = np.argsort(-x, axis=-1)[..., :k]
    s = logit_stats(x, k=k)
    np.testing.assert_array_equal(s["top_ids"], want)
    p = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(s["top_probs"], np.take_along_axis(p, want, -1), rtol=1e-5)
    ties = np.round(x)                                  # ties go to the first id, as a stable sort has them
    np.testing.assert_array_equal(logit_stats(ties, k=k)["top_ids"], np.argsort(-ties, axis=-1, kind="stable")[..., :k])


# ----------------------------------------------------------------------------- pictures and CLI


def test_plot_lens_writes_a_readable_png(smol, store, hf_smollm2_tokenizer, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from minee.plots import plot_lens

    model, _ = smol
    res = minee_lens(store, "smollm2", model, np.array(model.tokenizer.encode(PROMPT)))
    tok = hf_smollm2_tokenizer
    P, T = len(res.points), len(res.ids)
    for metric, points in [("entropy", None), ("kl", range(1, P, 2))]:
        out = tmp_path / f"lens_{metric}.png"
        fig = plot_lens(res, model.tokenizer, metric=metric, points=points, out=out)
        rows = list(range(P)) if points is None else list(points)
        assert out.stat().st_size > 10_000
        img = mpimg.imread(out)                                             # (H, W, 3|4)
        w_in, h_in = fig.get_size_inches()
        assert img.shape[0] / img.shape[1] == pytest.approx(h_in / w_in, rel=0.02)
        assert img.shape[1] > img.shape[0] * 0.5 and img[..., :3].std() > 0.05   # not blank
        ax = fig.axes[0]
        assert ax.images[0].get_array().shape == (len(rows), T)
        np.testing.assert_allclose(ax.images[0].get_array(), res.metrics[metric][rows])
        # every cell is labelled with its top-1 token (as transformers' tokenizer decodes it)
        texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t for t in ax.texts}
        assert len(texts) == len(rows) * T
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bbox = ax.get_window_extent(renderer)
        cell_w, cell_h = bbox.width / T, bbox.height / len(rows)
        for r, p in enumerate(rows):
            for c in range(T):
                t = texts[(c, r)]
                want = tok.decode([int(res.top_ids[p, c, 0])])
                if not want.strip(" "):
                    want = "␣" * len(want)                          # a token of spaces is shown, not blank
                if len(want) <= 7 and "\n" not in want:
                    assert t.get_text() == want, (p, c)
                ext = t.get_window_extent(renderer)                 # readable: fits its cell
                assert ext.width <= cell_w and ext.height <= cell_h, (p, c, t.get_text())
        ticks = [x.get_text() for x in ax.get_xticklabels()]
        assert ticks[1] == tok.decode([int(res.ids[1])])
        assert [y.get_text() for y in ax.get_yticklabels()] == [point_label(p) for p in rows]
        plt.close(fig)


def test_plot_point_curves_writes_png(tiny, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from minee.plots import plot_point_curves

    model, _ = tiny
    ids = np.random.default_rng(4).integers(0, model.config.vocab_size, 30)
    summary = corpus_lens(model, ids, window=10, progress=False)
    out = tmp_path / "curves.png"
    fig = plot_point_curves(summary, out=out)
    assert out.stat().st_size > 10_000
    img = mpimg.imread(out)
    w_in, h_in = fig.get_size_inches()
    assert img.shape[0] / img.shape[1] == pytest.approx(h_in / w_in, rel=0.02)
    plotted = {ax.get_title().lower(): ax.lines[0].get_ydata() for ax in fig.axes if ax.lines}
    assert len(plotted) == 4
    # each panel shows the metric its title names
    for word, name in [("= final top-1", "agree"), ("gold", "accuracy"), ("kl(", "kl"), ("entropy", "entropy")]:
        (title,) = [t for t in plotted if word in t]
        np.testing.assert_allclose(plotted[title], summary[name], err_msg=title)
    plt.close(fig)


def test_cli_lens_json_and_png(smollm2_dir, hf_smollm2, hf_smollm2_tokenizer, capsys, tmp_path):
    from minee.__main__ import main

    prompt = "The capital of France is"
    png = tmp_path / "lens.png"
    rc = main(["lens", "--model", str(smollm2_dir), "--prompt", prompt, "--out", str(png), "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)                                     # stdout is only the JSON document
    ids = hf_smollm2_tokenizer(prompt)["input_ids"]
    torch.set_num_threads(1)
    with torch.no_grad():
        greedy = int(hf_smollm2(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
    assert data["ids"] == ids
    assert len(data["points"]) == 60 and data["points"][-1] == "blocks.29.hook_resid_post"
    assert data["top_ids"][-1][-1][0] == greedy                 # last point, last position, rank 0
    assert data["final_top1"][-1] == greedy
    assert data["top1_tokens"][-1][-1] == hf_smollm2_tokenizer.decode([greedy]) == " Paris"
    assert data["figure"] == str(png) and png.stat().st_size > 10_000
    assert len(data["metrics"]["kl"]) == 60 and len(data["metrics"]["kl"][0]) == len(ids)
