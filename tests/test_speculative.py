"""Self-speculative decoding (minee/speculative.py): greedy output equals plain decoding, the cache
after a rollback equals plain decoding's, sampled tokens follow the full model's distribution.

References: minee.generate (plain decoding, itself checked against transformers in
test_generate.py), a fresh cache filled by one plain forward pass, and next-token distributions
computed by hand (softmax of the full model's logits) for the statistical test.
"""
import copy
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch

import minee
import weights_tool
from minee import speculative
from minee.__main__ import main
from minee.exits import Gate
from minee.hooks import point_name
from minee.lens import log_softmax
from minee.speculative import accept_greedy, draft_decoder, speculate, speculative_generate
from helpers import word_level_model, words

PROMPTS = [[5, 17, 99, 3, 42], [64, 2, 33]]
N_NEW = 24
LAST = 7                                       # the tiny model's last exit point (4 blocks)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """4 blocks, GQA, untied head. The blocks' output projections are scaled down (x0.2) and the
    head up (x3), so that early exit points often agree with the last one: drafts get accepted
    at useful rates (20-70%), not only rejected."""
    path = tmp_path_factory.mktemp("tiny_speculative")
    weights_tool.make_random_model(path, layers=4, d_model=48, heads=4, kv_heads=2, ffn=96, vocab=120,
                                   untied=True, std=0.15, seed=3)
    m = minee.load(path)
    for w in m.layers:
        w["self_attn.o_proj.weight"] *= 0.2
        w["mlp.down_proj.weight"] *= 0.2
    m.lm_head *= 3
    return m


def varied_gate(model):
    """A confidence gate (candidates from point 1 on) at the median confidence after block 0's
    attention, so drafts exit at different points."""
    _, acts = model.run_with_cache(np.array(PROMPTS[0]))
    probs = np.exp(log_softmax(model.unembed(acts["blocks.0.hook_resid_mid"])))
    return Gate("confidence", float(np.median(probs.max(-1))), min_point=1)


def with_eos(model, eos):
    """The same model with eos_token_ids = (eos,)."""
    m = copy.copy(model)
    m.config = dataclasses.replace(model.config, eos_token_ids=(eos,))
    return m


def plain_cache(model, ids):
    """The cache one plain forward pass over ids leaves."""
    kv = model.new_kv_cache(1, len(ids))
    model.forward(ids, kv_cache=kv)
    return kv


# ------------------------------------------------------------------ greedy == plain decoding

DRAFTS = ["fixed:0", "fixed:1", "fixed:3", "fixed:4", "fixed:5", f"fixed:{LAST}", "cosine:0.99", "varied"]


@pytest.mark.parametrize("k", [1, 2, 4, 50])
@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_equals_plain_decoding(model, draft, k):
    """Every draft point, a gate, k from 1 to more than the whole budget (50 > 24 tokens)."""
    gate = varied_gate(model) if draft == "varied" else draft
    for prompt in PROMPTS:
        plain = minee.generate(model, prompt, N_NEW, stop_at_eos=False)
        out = speculative_generate(model, prompt, N_NEW, draft=gate, k=k, stop_at_eos=False)
        assert out.tokens == plain.tokens
        s = out.stats
        assert s["new_tokens"] == N_NEW == 1 + s["accepted"] + s["cycles"]   # each cycle: accepted + 1
        assert len(out.exit_points) == N_NEW and out.exit_points[0] == LAST
        assert sum(p < LAST for p in out.exit_points) <= s["accepted"]    # early points only from drafts


def test_drafts_are_accepted_and_rejected(model):
    """The greedy tests above cover both outcomes: drafts accepted (several in a row) and rejected,
    and a gate whose drafts exit at different points within one cycle."""
    out = speculative_generate(model, PROMPTS[0], N_NEW, draft="fixed:3", k=4, stop_at_eos=False)
    by_pos = out.stats["acceptance_by_position"]
    assert 0 < out.stats["acceptance_rate"] < 1 and by_pos[0] > 0 and by_pos[1] > 0
    gated = speculative_generate(model, PROMPTS[0], N_NEW, draft=varied_gate(model), k=4, stop_at_eos=False)
    assert gated.stats["accepted"] > 0 and len(set(gated.exit_points)) > 2


def test_full_depth_draft_is_always_accepted(model):
    out = speculative_generate(model, PROMPTS[0], N_NEW, draft=f"fixed:{LAST}", k=4, stop_at_eos=False)
    assert out.stats["acceptance_rate"] == 1.0 and out.stats["acceptance_by_position"] == [1.0] * 4
    assert out.stats["cycles"] == 5              # 1 + (4 + 1) x 4 + (2 + 1): the last cycle fits the budget
    assert out.stats["drafted"] == 18


@pytest.mark.parametrize("draft", ["fixed:3", f"fixed:{LAST}"])
def test_stops_at_eos_inside_a_draft(model, draft):
    """EOS accepted as a draft, followed by more drafts in the same cycle: generation stops at it,
    exactly where plain decoding stops."""
    prompt, p = PROMPTS[0], int(draft.split(":")[1])
    plain = minee.generate(model, prompt, N_NEW, stop_at_eos=False).tokens
    _, acts = model.run_with_cache(np.array(prompt + plain), names=point_name(p))
    drafts = model.unembed(acts[point_name(p)][0]).argmax(-1)[len(prompt) - 1:]    # drafts[i]: for plain[i]
    j = next(i for i in range(8, N_NEW) if plain[i] not in plain[:i] and drafts[i] == plain[i])
    m = with_eos(model, plain[j])
    want = minee.generate(m, prompt, N_NEW).tokens
    assert want == plain[:j + 1]
    for k in (1, 2, 3, 5, 50):
        out = speculative_generate(m, prompt, N_NEW, draft=draft, k=k)
        s = out.stats
        assert out.tokens == want and s["new_tokens"] == j + 1
        assert s["tokens_per_cycle"] * s["cycles"] == pytest.approx(j)    # the stats count the tokens emitted
        assert s["accepted"] == sum(c == p for c in out.exit_points) or p == LAST
    assert out.exit_points[-1] == p and out.stats["accepted"] > 0    # k = 50: EOS was a draft


@pytest.mark.parametrize("prompt, draft", [(PROMPTS[0], f"fixed:{LAST}"), (PROMPTS[1], "varied")])
def test_stats_leave_out_the_drafts_after_an_accepted_eos(model, prompt, draft):
    """EOS is the first draft of the first cycle, accepted, and 3 more drafts follow it in that
    cycle: the stats count one cycle of one draft, accepted, that emitted one token, and the draft
    point is that draft's (the varied gate's drafts exit at points 7, 4, 1, 5 in that cycle)."""
    plain = minee.generate(model, prompt, N_NEW, stop_at_eos=False).tokens
    m = with_eos(model, plain[1])
    out = speculative_generate(m, prompt, N_NEW, draft=varied_gate(model) if draft == "varied" else draft, k=4)
    assert out.tokens == plain[:2]
    s = out.stats
    assert (s["cycles"], s["drafted"], s["accepted"], s["tokens_per_cycle"]) == (1, 1, 1, 1.0)
    assert s["acceptance_by_position"] == [1.0, None, None, None] and s["compared_by_position"] == [1, 0, 0, 0]
    assert s["mean_draft_point"] == out.exit_points[1]


# ------------------------------------------------------------------ drafts through a shortcut

@pytest.fixture(scope="module")
def shortcut(model):
    """Least-squares shortcuts of the tiny model, fitted on 600 random tokens."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 600)
    return minee.shortcuts.fit(model, ids, window=100, context=50, progress=False)


def test_drafts_go_through_the_shortcut(model, shortcut):
    """A cycle's first draft is the shortcut lens's top-1 at the draft point (h_p @ W[p] + b[p],
    then the final norm and LM head), computed here from a plain forward pass; without the
    shortcut, the plain lens's top-1."""
    differ = 0
    for prompt, p in itertools.product(PROMPTS, range(LAST)):
        _, acts = model.run_with_cache(np.array(prompt), names=point_name(p))
        h = acts[point_name(p)][0, -1]                                    # (D,) state at the last position
        want = {"shortcut": int(model.unembed(h @ shortcut.weight[p] + shortcut.bias[p]).argmax()),
                "plain": int(model.unembed(h).argmax())}
        for name, sc in (("shortcut", shortcut), ("plain", None)):
            kv = model.new_kv_cache(1, len(prompt))
            model.forward(prompt[:-1], kv_cache=kv)
            drafts = speculative.draft(draft_decoder(model, f"fixed:{p}", 1, sc), kv, prompt[-1], 1)[0]
            assert drafts[0] == want[name], (prompt, p, name)
        differ += want["shortcut"] != want["plain"]
    assert differ >= 3                                    # the shortcut changes some drafts


@pytest.mark.parametrize("draft", ["fixed:1", "fixed:3", "varied"])
def test_greedy_with_a_shortcut_equals_plain_decoding(model, shortcut, draft):
    gate = varied_gate(model) if draft == "varied" else draft
    for prompt in PROMPTS:
        plain = minee.generate(model, prompt, N_NEW, stop_at_eos=False).tokens
        out = speculative_generate(model, prompt, N_NEW, draft=gate, k=3, shortcut=shortcut, stop_at_eos=False)
        assert out.tokens == plain
        assert out.stats["shortcut"].startswith("shortcut (lstsq")


def test_a_shortcut_of_another_model_is_refused(model, small_vocab):
    other = minee.shortcuts.fit(small_vocab, np.arange(200) % 8, window=50, context=20, progress=False)
    with pytest.raises(minee.shortcuts.ShortcutsError, match="fitted on another model"):
        speculative_generate(model, PROMPTS[0], 4, draft="fixed:3", shortcut=other)


# ------------------------------------------------------------------ the cache after rollback

def cycles_with_deeper_later_draft(points, k):
    """Cycles (of k drafts) in which a draft exits deeper than an earlier one of the same cycle,
    i.e. verification starts it before its own exit point."""
    groups = [points[i:i + k] for i in range(0, len(points), k)]
    return sum(any(g[j] > min(g[:j]) for j in range(1, len(g))) for g in groups)


@pytest.mark.parametrize("draft", ["fixed:3", "varied"])
def test_cache_after_rollback_equals_plain_decoding(model, draft):
    """After every cycle (drafts rejected and the cache rolled back, or all accepted), the cache
    holds what one plain forward pass over the same tokens writes, in every layer."""
    decoder = draft_decoder(model, varied_gate(model) if draft == "varied" else draft, 3)
    prompt = PROMPTS[0]
    kv = model.new_kv_cache(1, 80)
    tokens = [int(model.forward(prompt, kv_cache=kv)[0, -1].argmax())]
    rolled_back = 0
    for _ in range(10):
        new, _ = speculate(decoder, kv, tokens[-1], 3)
        rolled_back += len(new) < 4
        tokens += new
        ids = prompt + tokens[:-1]                          # the newest token is not in the cache yet
        assert kv.length == len(ids)
        want = plain_cache(model, ids)
        for got, ref in ((kv.keys, want.keys), (kv.values, want.values)):
            err = np.abs(got[:, :, :, :len(ids)] - ref).max()
            assert err <= 1e-5 * np.abs(ref).max(), err
    assert tokens == minee.generate(model, prompt, len(tokens), stop_at_eos=False).tokens
    assert rolled_back > 0
    if draft == "varied":
        assert cycles_with_deeper_later_draft(decoder.stats.points, 3) > 0


# ------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """8 tokens, so the exact distribution of two sampled tokens has 64 cells; 2 blocks (points 0 .. 3)."""
    path = tmp_path_factory.mktemp("tiny_speculative_v8")
    weights_tool.make_random_model(path, layers=2, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=8,
                                   untied=True, std=0.3, seed=1)
    return minee.load(path)


def exact_pair(model, prefix, temperature, top_k):
    """P(t1, t2 | prefix) (V, V) under the full model, softmax by hand (top_k: keep the k largest)."""
    V = model.config.vocab_size

    def dist(logits):
        z = logits.astype(np.float64) / temperature
        if top_k:
            z = np.where(z < np.sort(z, -1)[..., -top_k, None], -np.inf, z)
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    logits = model.forward(np.array([prefix + [a] for a in range(V)]))             # (V, T+1, V)
    return dist(logits[0, -2])[:, None] * dist(logits[:, -1])                        # (V, V)


def sampled_pairs(model, decoder, prefix, k, temperature, top_k, n, seed):
    """n draws of the first two tokens after prefix, each from cycles after prefix[-1]."""
    kv = model.new_kv_cache(1, len(prefix) + 2 * k + 4)
    model.forward(prefix[:-1], kv_cache=kv)
    n_prefix, rng, counts = kv.length, np.random.default_rng(seed), np.zeros((8, 8), np.int64)
    for _ in range(n):
        kv.length = n_prefix                               # forget the previous draw
        tokens = [prefix[-1]]
        while len(tokens) < 3:
            tokens += speculate(decoder, kv, tokens[-1], k, temperature, top_k, None, rng)[0]
        counts[tokens[1], tokens[2]] += 1
    return counts


def chi_square_p(counts, probs):
    """p-value of Pearson's chi-square test of counts against probs: 0 if a cell of probability 0
    was drawn, else over the possible cells, those with an expected count below 5 pooled into one."""
    expected, observed = probs.ravel() * counts.sum(), counts.ravel().astype(np.float64)
    if observed[expected == 0].any():
        return 0.0
    small, keep = (expected > 0) & (expected < 5), expected >= 5
    if small.any():
        expected = np.append(expected[keep], expected[small].sum())
        observed = np.append(observed[keep], observed[small].sum())
    else:
        expected, observed = expected[keep], observed[keep]
    stat = ((observed - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


SIGNIFICANCE = 1e-3
N_DRAWS = 2000
SAMPLING = {"fixed:1 k=2 T=1": ("fixed:1", 2, 1.0, None),
            "fixed:2 k=1 T=0.7 top_k=4": ("fixed:2", 1, 0.7, 4),
            "gate k=3 T=1.3": ("varied", 3, 1.3, None)}


@pytest.mark.parametrize("case", SAMPLING)
def test_sampled_tokens_follow_the_full_model(small_vocab, case):
    """Chi-square goodness of fit of 2,000 sampled (t1, t2) pairs against the full model's exact
    joint distribution, at significance 1e-3 with a fixed seed: acceptance at draft positions 1
    and 2, the residual draw after a rejection and the bonus token all matter here."""
    model, prefix = small_vocab, [1, 2, 3, 4]
    draft, k, temperature, top_k = SAMPLING[case]
    gate = Gate("confidence", 0.5, min_point=1) if draft == "varied" else draft
    decoder = draft_decoder(model, gate, k)
    probs = exact_pair(model, prefix, temperature, top_k)
    counts = sampled_pairs(model, decoder, prefix, k, temperature, top_k, N_DRAWS, seed=0)
    assert chi_square_p(counts, probs) > SIGNIFICANCE
    tv = 0.5 * np.abs(counts / N_DRAWS - probs).sum()
    assert tv < 0.08, tv                                       # expected ~0.04 for 64 cells, 2,000 draws


def test_the_sampling_test_catches_a_wrong_rule(small_vocab, monkeypatch):
    """The same test rejects a rule that keeps every draft (tokens then follow the draft, not p)."""
    def keep_all(drafts, q, logits, temperature, top_k, top_p, rng):
        return len(drafts), speculative.sample(logits[len(drafts)], temperature, top_k, top_p, rng)

    monkeypatch.setattr(speculative, "accept_sampled", keep_all)
    model, prefix = small_vocab, [1, 2, 3, 4]
    decoder = draft_decoder(model, "fixed:1", 2)
    counts = sampled_pairs(model, decoder, prefix, 2, 1.0, None, N_DRAWS, seed=0)
    assert chi_square_p(counts, exact_pair(model, prefix, 1.0, None)) < SIGNIFICANCE


def test_seeded_sampling_is_reproducible(model):
    kw = dict(draft="fixed:3", k=3, temperature=1.0, top_p=0.9, stop_at_eos=False)
    a = speculative_generate(model, PROMPTS[0], N_NEW, seed=5, **kw)
    b = speculative_generate(model, PROMPTS[0], N_NEW, seed=5, **kw)
    c = speculative_generate(model, PROMPTS[0], N_NEW, seed=6, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens


# ------------------------------------------------------------------ stats, pieces, errors

def test_stats(model):
    out = speculative_generate(model, PROMPTS[0], N_NEW, draft="fixed:3", k=3, stop_at_eos=False)
    s = out.stats
    assert s["draft"] == "fixed:3" and s["k"] == 3 and s["mean_draft_point"] == 3.0
    assert s["acceptance_rate"] == s["accepted"] / s["drafted"]
    assert len(s["acceptance_by_position"]) == 3 and all(0 <= a <= 1 for a in s["acceptance_by_position"])
    assert s["tokens_per_cycle"] == (N_NEW - 1) / s["cycles"]
    assert 0 < s["draft_s"] + s["verify_s"] <= s["decode_s"]
    assert s["decode_tokens_per_s"] == pytest.approx((N_NEW - 1) / s["decode_s"])


def test_accept_greedy():
    logits = np.eye(5)[[2, 4, 1, 0]]                        # the full model's argmax: 2, 4, 1, 0
    assert accept_greedy([2, 4, 1], logits) == (3, 0)       # all accepted, then the bonus token
    assert accept_greedy([2, 3, 1], logits) == (1, 4)       # the first mismatch gets the full model's token
    assert accept_greedy([0, 4, 1], logits) == (0, 2)
    assert accept_greedy([], logits[:1]) == (0, 2)          # k = 0: one plain step


def test_streams_text_and_returns_a_generation(model):
    pieces = []
    out = speculative_generate(model, PROMPTS[0], 10, draft="fixed:3", k=2, on_text=pieces.append)
    assert isinstance(out, minee.Generation) and out.prompt_tokens == PROMPTS[0]
    assert pieces == [""] * len(out.tokens) and out.text == ""      # no tokenizer: empty text


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k \\(tokens drafted per cycle\\) must be a whole number >= 1"),
    (dict(k=-2), "whole number >= 1"), (dict(k=1.5), "whole number >= 1"), (dict(k=True), "whole number >= 1"),
    (dict(draft="oracle"), "cannot draft"),
    (dict(draft="fixed:8"), r"use fixed:0 \.\. fixed:7"),
    (dict(draft="sometimes"), "unknown gate"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=5000), "exceeds the model's context"),
])
def test_errors_name_the_fix(model, kwargs, match):
    kwargs = {"max_new_tokens": 4, "draft": "fixed:3", **kwargs}
    with pytest.raises(ValueError, match=match):
        speculative_generate(model, PROMPTS[0], **kwargs)


# ------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model directory with a word-level tokenizer ('w0' .. 'w119')."""
    return word_level_model(tmp_path_factory.mktemp("tiny_speculative_cli"))


def test_cli_json_equals_plain_decoding(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", words(PROMPTS[0]), "--max-new-tokens", "12", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(argv + ["--speculative", "fixed:5", "--k", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == plain["tokens"] and spec["text"] == plain["text"]
    assert spec["stats"]["draft"] == "fixed:5" and spec["stats"]["k"] == 3


def test_cli_summary_line(tiny_dir, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", words(PROMPTS[0]), "--max-new-tokens", "12",
               "--speculative", "fixed:5"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith(words(PROMPTS[0]))
    assert "speculative fixed:5 k=4:" in captured.err and "drafts accepted" in captured.err


def test_cli_with_a_shortcut(tiny_dir, tmp_path, capsys):
    model = minee.load(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 120, 300)
    minee.shortcuts.fit(model, ids, window=100, context=50, progress=False).save(tmp_path / "sc.npz")
    argv = ["generate", "--model", str(tiny_dir), "--prompt", words(PROMPTS[0]), "--max-new-tokens", "12"]
    assert main(argv + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(argv + ["--speculative", "fixed:3", "--shortcut", str(tmp_path / "sc.npz")]) == 0
    captured = capsys.readouterr()
    assert words(plain["tokens"]) in captured.out
    assert "speculative fixed:3 through shortcut (lstsq" in captured.err


@pytest.mark.parametrize("extra, match", [
    (["--speculative", "fixed:5", "--exit", "fixed:3"], "drop --exit"),
    (["--shortcut", "sc.npz"], "give an --exit or --speculative gate too"),
    (["--speculative", "fixed:5", "--k", "0"], "must be a whole number >= 1"),
    (["--k", "3"], "add --speculative DRAFT"),
    (["--speculative", "oracle"], "cannot draft"),
    (["--speculative", "fixed:99"], "beyond this model's last exit point; use fixed:0 .. fixed:7"),
    (["--speculative", "fixed:5", "--temperature", "-1"], "temperature must be a finite number >= 0"),
])
def test_cli_errors_before_any_output(tiny_dir, capsys, extra, match):
    rc = main(["generate", "--model", str(tiny_dir), "--prompt", words(PROMPTS[0])] + extra)
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and match in captured.err


def test_cli_speculative_decodes_one_prompt(tiny_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text(words(PROMPTS[0]) + "\n" + words(PROMPTS[1]) + "\n")
    rc = main(["generate", "--model", str(tiny_dir), "--prompts-file", str(tmp_path / "prompts.txt"),
               "--speculative", "fixed:5"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "give --prompt instead of --prompts-file" in captured.err


# ------------------------------------------------------------------ SmolLM2

@pytest.fixture(scope="module")
def smol_plain(smollm2_dir):
    """SmolLM2 and its plain greedy continuations of two prompts."""
    m = minee.load(smollm2_dir)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    return m, {p: minee.generate(m, p, 10, stop_at_eos=False).tokens for p in prompts}


@pytest.mark.parametrize("draft, k", [("fixed:39", 4), ("fixed:51", 2), ("fixed:57", 12),
                                      ("confidence:0.5,min_point=41,attn_points=0,check_every=2", 3)])
def test_smollm2_greedy_equals_plain_decoding(smol_plain, one_thread, draft, k):
    model, plain = smol_plain
    for prompt, want in plain.items():
        out = speculative_generate(model, prompt, 10, draft=draft, k=k, stop_at_eos=False)
        assert out.tokens == want, (prompt, draft, k)
