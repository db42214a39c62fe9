"""Early exit (minee/exits.py, generate(exit=, kv=)): gates, exit points, KV fill, stats, CLI.

References are computed independently of minee.exits: the plain forward pass with hooks
(run_with_cache) + unembed for the residual state and logit-lens prediction at every exit point,
NumPy by hand for the features, the gates' rules and the KV projections (with the checkpoint's own
weights taken from transformers), and transformers itself for a decode step on a hand-made cache.
Exit points: p = 2l after block l's attention (resid_mid), p = 2l+1 after its FFN (resid_post).
"""
import json
import math

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from transformers import DynamicCache

import minee
from helpers import random_llama
from minee.__main__ import main
from minee.exits import (ExitDecoder, Gate, first_match_point, learned_prob, load_learned_gate, parse_gate,
                         patience_runs, save_learned_gate, stable_point, train_learned_gate)
from minee.lens import logit_stats

V, D, H, KV, F, L = 64, 64, 4, 2, 128, 4
HD = D // H
P = 2 * L                      # exit points 0 .. 7
LAST = P - 1
PROMPT = [3, 17, 40, 5, 22, 9, 60]
N_NEW = 12
KV_MODES = ("copy", "propagate", "compute")


# ------------------------------------------------------------------ fixtures and references

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint dir, transformers twin, minee model): 4 blocks, GQA, untied head. The LM head is
    drawn a bit wider (std 0.3) so that intermediate points give varied, sometimes confident predictions."""
    path = tmp_path_factory.mktemp("tiny_exits")
    ref = random_llama(path, head_std=0.3, vocab_size=V, hidden_size=D, intermediate_size=F,
                       num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
                       max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return path, ref, minee.load(path)


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[2]


@pytest.fixture(scope="module")
def plain(model):
    """Plain greedy decoding (no exit) of PROMPT."""
    return minee.generate(model, PROMPT, N_NEW)


STATE_NAMES = ["hook_embed"] + [f"blocks.{l}.hook_resid_{s}" for l in range(L) for s in ("mid", "post")]


def states(model, ids):
    """(P + 1, T, D) float64: the embedding, then the residual at every exit point p (row p + 1)."""
    _, acts = model.run_with_cache(np.array(ids), names=STATE_NAMES)
    return np.stack([acts[n][0] for n in STATE_NAMES]).astype(np.float64)


def lens_logits(model, ids):
    """(P, T, V): lm_head(final_norm(h_p)) at every exit point, from a plain forward pass."""
    return model.unembed(states(model, ids)[1:].astype(np.float32)).astype(np.float64)


def probs(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def step_views(model, prompt, gen):
    """For each decode step j >= 1 (the step that produced gen[j] from input gen[j-1]): the states
    (P + 1, D) and lens logits (P, V) at that input's position, from one full forward pass."""
    ids = list(prompt) + list(gen[:-1])
    s = states(model, ids)
    lg = model.unembed(s[1:].astype(np.float32)).astype(np.float64)
    return [(s[:, len(prompt) + j - 1], lg[:, len(prompt) + j - 1]) for j in range(1, len(gen))]


def hand_exit(spec_kind, value, cands, st, lg):
    """Where a gate must exit, by hand: the first checked candidate (the last point is never checked,
    it is the fallback) meeting the rule. Returns (exit point, LM-head calls the gate needs)."""
    run, prev, calls = 0, None, 0
    for p in cands:
        if p == LAST:
            break
        pr = probs(lg[p])
        srt = np.sort(pr)
        if spec_kind in ("confidence", "margin", "entropy", "patience", "learned"):
            calls += 1
        if spec_kind == "confidence":
            ok = srt[-1] >= value
        elif spec_kind == "margin":
            ok = srt[-1] - srt[-2] >= value
        elif spec_kind == "entropy":
            ok = -(pr * np.log(pr)).sum() <= value
        elif spec_kind == "patience":
            top = int(np.argmax(lg[p]))
            run = run + 1 if top == prev else 1
            prev = top
            ok = run >= value
        elif spec_kind == "cosine":
            a, b = st[p + 1], st[p]                       # state after point p, state before it
            ok = a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= value
        elif spec_kind == "learned":
            x = np.array([srt[-1], srt[-1] - srt[-2], -(pr * np.log(pr)).sum(),
                          st[p + 1] @ st[p] / (np.linalg.norm(st[p + 1]) * np.linalg.norm(st[p])), p / LAST])
            z = ((x - value["mean"]) / value["std"]) @ value["w"] + value["b"]
            ok = 1 / (1 + np.exp(-z)) >= value["threshold"]
        else:
            raise AssertionError(spec_kind)
        if ok:
            return p, max(calls, 1)
    return LAST, calls + 1                                # fallback: the full model, one more LM head


def hand_stable(top1):
    """First point from which the top-1 equals the last point's top-1 at every later point."""
    p = len(top1) - 1
    while p > 0 and top1[p - 1] == top1[-1]:
        p -= 1
    return p


def rms(x, w, eps=1e-5):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def hand_kv(ref, l, h, pos):
    """Block l's keys/values (KV, hd) at position pos for residual h (D,), from the checkpoint's
    weights: input RMSNorm, k/v projections, rotate-half RoPE at pos (transformers' rotary tables)."""
    layer = ref.model.layers[l]
    x = rms(h, layer.input_layernorm.weight.detach().numpy().astype(np.float64))
    k = (x @ layer.self_attn.k_proj.weight.detach().numpy().T.astype(np.float64)).reshape(KV, HD)
    v = (x @ layer.self_attn.v_proj.weight.detach().numpy().T.astype(np.float64)).reshape(KV, HD)
    with torch.no_grad():
        cos, sin = ref.model.rotary_emb(torch.zeros(1, 1, D), torch.tensor([[pos]]))
    cos, sin = cos[0, 0].numpy().astype(np.float64), sin[0, 0].numpy().astype(np.float64)
    rot = np.concatenate([-k[:, HD // 2:], k[:, :HD // 2]], axis=-1)
    return k * cos + rot * sin, v


def prefilled(model, ids, room=4):
    """A cache holding the exact keys/values of ids (a plain forward), room for `room` more positions."""
    kv = model.new_kv_cache(1, len(ids) + room)
    model.forward(np.array(ids), kv_cache=kv)
    return kv


# ------------------------------------------------------------------ fixed at the last point == plain decoding

@pytest.mark.parametrize("kv", KV_MODES)
def test_fixed_last_point_reproduces_plain_decoding(model, plain, kv):
    out = minee.generate(model, PROMPT, N_NEW, exit=f"fixed:{LAST}", kv=kv)
    assert out.tokens == plain.tokens
    assert out.exit_points == [LAST] * N_NEW
    assert out.stats["mean_exit_depth"] == out.stats["mean_blocks_computed"] == L
    assert out.stats["share_early"] == 0.0


def test_plain_generation_reports_last_point(plain):
    assert plain.exit_points == [LAST] * N_NEW
    assert len(set(plain.tokens)) > 1                     # the random model does not just repeat one id


def test_smollm2_fixed_last_point_is_plain_greedy(smollm2_dir):
    model = minee.load(smollm2_dir)
    prompt = "The capital of France is"
    with threadpool_limits(1):                             # decode is GEMV-bound: one BLAS thread
        plain = minee.generate(model, prompt, 4)
        outs = [minee.generate(model, prompt, 4, exit="fixed:59", kv=kv) for kv in ("copy", "propagate")]
    assert plain.text.startswith(" Paris")
    for out in outs:
        assert out.tokens == plain.tokens and out.exit_points == [59] * 4


# ------------------------------------------------------------------ kv="compute": the exit token is the lens top-1

@pytest.mark.parametrize("gate", ["fixed:0", "fixed:2", "fixed:3", "fixed:4", "fixed:6", "confidence:0.5,min_point=0"])
def test_compute_exit_token_is_lens_top1_at_exit_point(model, gate):
    out = minee.generate(model, PROMPT, N_NEW, exit=gate, kv="compute")
    if gate.startswith("fixed"):
        assert out.exit_points[1:] == [int(gate.split(":")[1])] * (N_NEW - 1)
    else:
        assert len(set(out.exit_points[1:])) >= 3          # the gate really exits at different points
    lg = lens_logits(model, PROMPT + out.tokens[:-1])      # exact prefix: compute finished every layer
    for j in range(1, N_NEW):
        p, pos = out.exit_points[j], len(PROMPT) + j - 1
        assert out.tokens[j] == int(np.argmax(lg[p, pos])), (j, p)


def test_compute_cache_equals_plain_decoding_cache(model):
    tokens = [44, 8, 45, 8, 24, 8, 31]
    kv = prefilled(model, PROMPT, room=len(tokens))
    dec = ExitDecoder(model, "confidence:0.4,min_point=0", kv="compute")
    for t in tokens:
        dec.step(t, kv)
    assert len(set(dec.stats.points)) >= 2 and min(dec.stats.points) < LAST
    ref = model.new_kv_cache(1, kv.max_len)
    model.forward(np.array(PROMPT), kv_cache=ref)
    for t in tokens:                                       # plain decoding, one token at a time
        model.forward(np.array([t]), kv_cache=ref)
    n = len(PROMPT) + len(tokens)
    assert kv.length == ref.length == n
    for got, want in ((kv.keys, ref.keys), (kv.values, ref.values)):
        assert np.abs(got[:, :, :, :n] - want[:, :, :, :n]).max() <= 1e-6 * np.abs(want[:, :, :, :n]).max()


# ------------------------------------------------------------------ copy / propagate fill the skipped layers

def full_kv(model, ids):
    """Exact keys/values (L, KV, T, hd) of a plain forward over ids."""
    kv = model.new_kv_cache(1, len(ids))
    model.forward(np.array(ids), kv_cache=kv)
    return kv.keys[:, 0], kv.values[:, 0]


@pytest.mark.parametrize("p", [0, 3, 4, 6])
def test_copy_fills_deeper_blocks_with_exit_block_kv(model, p):
    tok, pos, l = 44, len(PROMPT), p // 2
    kv = prefilled(model, PROMPT)
    before_k, before_v = kv.keys.copy(), kv.values.copy()
    ExitDecoder(model, f"fixed:{p}", kv="copy").step(tok, kv)
    assert kv.length == pos + 1
    fk, fv = full_kv(model, PROMPT + [tok])
    for b in range(L):
        src = b if b <= l else l                           # deeper blocks: a copy of block l's entry
        np.testing.assert_allclose(kv.keys[b, 0, :, pos], fk[src, :, pos], rtol=1e-5, atol=1e-5 * np.abs(fk).max())
        np.testing.assert_allclose(kv.values[b, 0, :, pos], fv[src, :, pos], rtol=1e-5, atol=1e-5 * np.abs(fv).max())
        if b > l:                                          # literally copied
            np.testing.assert_array_equal(kv.keys[b, :, :, pos], kv.keys[l, :, :, pos])
            np.testing.assert_array_equal(kv.values[b, :, :, pos], kv.values[l, :, :, pos])
    # nothing else moved: the prefix is untouched, nothing written past pos
    for arr, old in ((kv.keys, before_k), (kv.values, before_v)):
        np.testing.assert_array_equal(arr[:, :, :, :pos], old[:, :, :, :pos])
        assert not arr[:, :, :, pos + 1:].any()


@pytest.mark.parametrize("p", [0, 3, 4])
def test_propagate_fills_deeper_blocks_with_projected_exit_state(tiny, p):
    _, ref, model = tiny
    tok, pos, l = 44, len(PROMPT), p // 2
    kv = prefilled(model, PROMPT)
    before_k = kv.keys.copy()
    ExitDecoder(model, f"fixed:{p}", kv="propagate").step(tok, kv)
    assert kv.length == pos + 1
    h = states(model, PROMPT + [tok])[p + 1, pos]         # the exit state (exact prefix)
    fk, fv = full_kv(model, PROMPT + [tok])
    for b in range(L):
        if b <= l:                                         # really computed
            k, v = fk[b, :, pos], fv[b, :, pos]
        else:                                              # exit state through block b's norm + k/v + RoPE
            k, v = hand_kv(ref, b, h, pos)
        np.testing.assert_allclose(kv.keys[b, 0, :, pos], k, rtol=1e-4, atol=1e-5 * np.abs(fk).max())
        np.testing.assert_allclose(kv.values[b, 0, :, pos], v, rtol=1e-4, atol=1e-5 * np.abs(fv).max())
    np.testing.assert_array_equal(kv.keys[:, :, :, :pos], before_k[:, :, :, :pos])
    assert not kv.keys[:, :, :, pos + 1:].any()


def hf_next_logits(ref, keys, values, token, pos):
    """transformers' logits for `token` at position pos attending to the hand-made cache (L, KV, pos, hd)."""
    cache = DynamicCache(config=ref.config)
    for b in range(L):
        cache.update(torch.from_numpy(np.ascontiguousarray(keys[b][None], np.float32)),
                     torch.from_numpy(np.ascontiguousarray(values[b][None], np.float32)), b)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([[token]]), cache=cache, position_ids=torch.tensor([[pos]]))
    return out.logits[0, -1].numpy()


@pytest.mark.parametrize("kv_mode", ["copy", "propagate"])
def test_next_token_attends_to_filled_entries(tiny, kv_mode):
    """After an exit at p = 2 (block 1 attention), the next token's step sees exactly the filled cache:
    compared with transformers attending to a cache filled by hand; corrupting the filled entries
    changes the next logits."""
    _, ref, model = tiny
    tok, nxt, pos, p, l = 44, 8, len(PROMPT), 2, 1
    kv = prefilled(model, PROMPT)
    ExitDecoder(model, f"fixed:{p}", kv=kv_mode).step(tok, kv)
    corrupted = model.new_kv_cache(1, kv.max_len)
    corrupted.keys[:], corrupted.values[:], corrupted.length = kv.keys, kv.values, kv.length
    corrupted.keys[l + 1:, :, :, pos] *= -1.0
    corrupted.values[l + 1:, :, :, pos] += 1.0
    full = ExitDecoder(model, f"fixed:{LAST}", kv=kv_mode)
    got, point = full.step(nxt, kv)
    bad, _ = ExitDecoder(model, f"fixed:{LAST}", kv=kv_mode).step(nxt, corrupted)
    assert point == LAST

    # the hand-filled cache: exact keys/values for the prefix and blocks <= l, the rule for deeper ones
    fk, fv = full_kv(model, PROMPT + [tok])
    hk, hv = fk.astype(np.float64), fv.astype(np.float64)
    h = states(model, PROMPT + [tok])[p + 1, pos]
    for b in range(l + 1, L):
        if kv_mode == "copy":
            hk[b, :, pos], hv[b, :, pos] = fk[l, :, pos], fv[l, :, pos]
        else:
            hk[b, :, pos], hv[b, :, pos] = hand_kv(ref, b, h, pos)
    want = hf_next_logits(ref, hk, hv, nxt, pos + 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.abs(bad - got).max() > 1e-2
    # and the filled cache is not the exact one: with it the next logits would differ
    exact = hf_next_logits(ref, fk, fv, nxt, pos + 1)
    assert np.abs(exact - got).max() > 1e-3


# ------------------------------------------------------------------ gates on hand-made inputs

def test_gate_rules_on_hand_made_features():
    def f(**kw):
        return {k: np.array(v, dtype=np.float64) for k, v in kw.items()}

    eq = np.testing.assert_array_equal
    eq(Gate("confidence", 0.9).decide(f(confidence=[0.2, 0.899, 0.9, 0.97])), [False, False, True, True])
    eq(Gate("margin", 0.5).decide(f(margin=[0.1, 0.49, 0.5, 0.8])), [False, False, True, True])
    eq(Gate("entropy", 1.0).decide(f(entropy=[3.0, 1.01, 1.0, 0.1])), [False, False, True, True])
    eq(Gate("patience", 3).decide(f(run=[1, 2, 3, 4])), [False, False, True, True])
    eq(Gate("cosine", 0.95).decide(f(cosine=[0.1, 0.949, 0.95, 0.999])), [False, False, True, True])
    eq(Gate("fixed", 3).decide(f(depth=[0.0, 0.5, 1.0])), [True, True, True])
    with pytest.raises(ValueError, match="oracle"):
        Gate("oracle").decide(f(depth=[0.5]))


def test_gate_candidates_and_options():
    """Candidates are the points checked; the last point (the full model) is the fallback, never checked."""
    assert Gate("confidence", 0.9, min_point=0).candidates(8) == list(range(7))
    assert Gate("confidence", 0.9, min_point=3).candidates(8) == [3, 4, 5, 6]
    assert Gate("confidence", 0.9, min_point=0, attn_points=False).candidates(8) == [1, 3, 5]
    assert Gate("confidence", 0.9, min_point=0, check_every=2).candidates(8) == [1, 3, 5]
    assert Gate("confidence", 0.9, min_point=0, check_every=3).candidates(8) == [2, 5]
    assert Gate("confidence", 0.9, min_point=2, attn_points=False, check_every=2).candidates(8) == [5]
    assert Gate("fixed", 5).candidates(8) == [5] and Gate("fixed", 7).candidates(8) == [7]


@pytest.mark.parametrize("kind, value", [("confidence", 0.9), ("margin", 0.5), ("entropy", 1.0), ("patience", 2),
                                         ("cosine", 0.9)])
def test_gates_check_the_last_third_by_default(kind, value):
    """Without min_point a gate starts at the network's last third: point 39 of SmolLM2's 60 (after
    block 19), point 4 of the tiny model's 8. An explicit min_point=0 still checks from the start."""
    assert Gate(kind, value).candidates(60) == list(range(39, 59))
    assert Gate(kind, value).candidates(8) == [4, 5, 6]
    assert Gate(kind, value, attn_points=False).candidates(60) == list(range(39, 59, 2))
    assert Gate(kind, value, min_point=0).candidates(60) == list(range(59))


def test_default_min_point_in_decoding_and_stats(model):
    out = minee.generate(model, PROMPT, N_NEW, exit="confidence:0.3", kv="compute")
    assert min(out.exit_points[1:]) >= 4
    assert out.stats["gate"] == "confidence:0.3,min_point=4"             # the stats name the point used
    early = minee.generate(model, PROMPT, N_NEW, exit="confidence:0.3,min_point=0", kv="compute")
    assert min(early.exit_points[1:]) < 4                                 # (so the default changed something)


def test_gate_features_on_hand_made_logits():
    """The gate's features (lens.logit_stats) from log-probabilities, and from the same logits
    shifted by a constant, which are the same distribution. float32: tolerances of its rounding."""
    for shift in (0.0, 7.0):
        uniform = logit_stats(np.full(10, math.log(0.1) + shift, np.float32))
        assert uniform["entropy"] == pytest.approx(math.log(10), rel=1e-6)
        assert uniform["margin"] == pytest.approx(0.0, abs=1e-7)
        assert uniform["confidence"] == pytest.approx(0.1, rel=1e-6)
        z = np.array([0.0, 0.0, 30.0, 0.0])
        onehot = logit_stats(z - 30.0 - math.log1p(3 * math.exp(-30.0)) + shift)    # log-softmax by hand
        assert onehot["confidence"] == pytest.approx(1.0, abs=1e-9) and onehot["top1"] == 2
        assert onehot["margin"] == pytest.approx(1.0, abs=1e-9) and onehot["entropy"] == pytest.approx(0.0, abs=1e-9)
        pr = np.array([0.2, 0.5, 0.1, 0.2])                    # ties below the top do not matter
        f = logit_stats(np.log(pr) + shift)
        assert f["confidence"] == pytest.approx(0.5) and f["margin"] == pytest.approx(0.3)
        assert f["entropy"] == pytest.approx(-(pr * np.log(pr)).sum()) and f["top1"] == 1
        batch = logit_stats(np.stack([np.log(pr), np.log(pr[::-1])])[None] + shift)      # (1, 2, V)
        np.testing.assert_allclose(batch["margin"], [[0.3, 0.3]], rtol=1e-6)
        np.testing.assert_array_equal(batch["top1"], [[1, 2]])


def test_first_match_and_stable_points_on_hand_made_top1():
    assert first_match_point(np.array([[5], [7], [5], [9], [5]])).tolist() == [0]
    assert stable_point(np.array([[5], [7], [5], [9], [5]])).tolist() == [4]
    cols = np.array([[5, 1, 3, 4, 2],
                     [5, 2, 3, 3, 1],
                     [5, 3, 4, 4, 2]])                     # (P=3, N=5)
    assert first_match_point(cols).tolist() == [0, 2, 2, 0, 0]
    assert stable_point(cols).tolist() == [0, 2, 2, 2, 2]


def test_patience_runs_on_hand_made_top1():
    top1 = np.array([5, 5, 7, 7, 7, 5])
    assert patience_runs(top1, np.ones(6, bool)).tolist() == [1, 2, 1, 2, 3, 1]
    # unchecked points neither count nor break a run
    assert patience_runs(np.array([5, 9, 5, 5]), np.array([True, False, True, True])).tolist() == [1, 0, 2, 3]


# ------------------------------------------------------------------ each gate in the decoder exits where it should

GATES = [  # spec, rule, value, checked candidates (the last point 7 is the fallback, never checked)
    ("confidence:0.5,min_point=0", "confidence", 0.5, [0, 1, 2, 3, 4, 5, 6]),
    ("margin:0.3,min_point=0", "margin", 0.3, [0, 1, 2, 3, 4, 5, 6]),
    ("entropy:1.9,min_point=0", "entropy", 1.9, [0, 1, 2, 3, 4, 5, 6]),
    ("patience:2,min_point=0", "patience", 2, [0, 1, 2, 3, 4, 5, 6]),
    ("cosine:0.92,min_point=0", "cosine", 0.92, [0, 1, 2, 3, 4, 5, 6]),
    ("confidence:0.4", "confidence", 0.4, [4, 5, 6]),                # the default: the last third
    ("confidence:0.4,min_point=3", "confidence", 0.4, [3, 4, 5, 6]),
    ("confidence:0.4,min_point=0,attn_points=0", "confidence", 0.4, [1, 3, 5]),
    ("margin:0.2,min_point=0,check_every=3", "margin", 0.2, [2, 5]),
    ("patience:2,min_point=0,attn_points=0", "patience", 2, [1, 3, 5]),
    ("cosine:0.9,min_point=4,attn_points=0", "cosine", 0.9, [5]),
]


@pytest.mark.parametrize("spec,rule,value,cands", GATES, ids=[g[0] for g in GATES])
def test_gate_exits_where_it_should(model, spec, rule, value, cands):
    out = minee.generate(model, PROMPT, N_NEW, exit=spec, kv="compute")
    want, calls = zip(*[hand_exit(rule, value, cands, st, lg) for st, lg in step_views(model, PROMPT, out.tokens)])
    assert out.exit_points[1:] == list(want)
    assert out.stats["lm_head_calls_per_token"] == pytest.approx(np.mean(calls))
    assert out.stats["mean_exit_depth"] == pytest.approx(np.mean([(p + 1) / 2 for p in want]))
    assert out.stats["mean_blocks_computed"] == L                   # kv=compute runs every block


def test_gates_in_decoder_exit_at_varied_points(model):
    """The thresholds above are not degenerate: together they exit early and late."""
    seen = set()
    for spec in ("confidence:0.5,min_point=0", "margin:0.3,min_point=0", "entropy:1.9,min_point=0",
                 "cosine:0.92,min_point=0"):
        pts = minee.generate(model, PROMPT, N_NEW, exit=spec, kv="compute").exit_points[1:]
        assert min(pts) < LAST, spec
        seen |= set(pts)
    assert len(seen) >= 4


# ------------------------------------------------------------------ parse_gate, str round trip, errors

@pytest.mark.parametrize("spec,kind,value", [
    ("fixed:3", "fixed", 3), ("confidence:0.9", "confidence", 0.9), ("margin:0.25", "margin", 0.25),
    ("entropy:1.5", "entropy", 1.5), ("patience:3", "patience", 3), ("cosine:0.95", "cosine", 0.95),
    ("oracle", "oracle", None)])
def test_parse_gate_every_kind_round_trips(spec, kind, value):
    g = parse_gate(spec)
    assert (g.kind, g.value) == (kind, value)
    assert type(g.value) is type(value)
    assert (g.min_point, g.check_every, g.attn_points) == (None, 1, True)
    assert str(g) == spec and parse_gate(str(g)) == g


@pytest.mark.parametrize("spec", ["confidence:0.9,min_point=4", "patience:3,attn_points=0",
                                  "entropy:1.5,min_point=2,check_every=3,attn_points=0", "cosine:0.9,min_point=0"])
def test_parse_gate_options_round_trip(spec):
    g = parse_gate(spec)
    assert str(g) == spec and parse_gate(str(g)) == g
    assert parse_gate(g) is g


def test_parse_gate_options_values():
    g = parse_gate("margin:0.5,check_every=2,attn_points=0,min_point=6")
    assert (g.min_point, g.check_every, g.attn_points) == (6, 2, False)
    assert parse_gate("margin:0.5,attn_points=1").attn_points is True


@pytest.mark.parametrize("spec,hint", [
    ("speed:0.9", "confidence"),                 # unknown kind: lists the kinds
    ("confidence", "confidence:0.9"),            # missing value: shows an example
    ("patience:", "patience:3"),
    ("confidence:0.9,foo=1", "min_point"),       # unknown option: lists the options
    ("confidence:0.9,min_point", "min_point=N"),  # option without a value
    ("confidence:0.9,check_every=0", "check_every"),
    # impossible values: errors naming what the value must be
    ("confidence:1.5", "(0, 1]"), ("confidence:0", "(0, 1]"), ("confidence:nan", "(0, 1]"),
    ("confidence:-0.2", "(0, 1]"), ("margin:1.2", "(0, 1]"), ("entropy:-1", ">= 0"), ("entropy:inf", ">= 0"),
    ("cosine:1.01", "(-1, 1]"), ("patience:0", ">= 1"), ("fixed:-1", ">= 0"),
    ("confidence:0.9,min_point=-3", "min_point"), ("confidence:0.9,check_every=-1", "check_every"),
    ("oracle,min_point=10", "no min_point"), ("fixed:3,attn_points=0", "no min_point"),
])
def test_parse_gate_bad_specs_name_the_fix(spec, hint):
    with pytest.raises(ValueError) as e:
        parse_gate(spec)
    assert hint in str(e.value)


@pytest.mark.parametrize("spec,hint", [
    ("confidence:high", "confidence"), ("fixed:2.5", "fixed"), ("confidence:0.9,min_point=x", "min_point")])
def test_parse_gate_bad_numbers_name_the_fix(spec, hint):
    """A non-number where a number belongs is a ValueError that names what was wrong, not only
    Python's bare 'could not convert string to float' / 'invalid literal for int()'."""
    with pytest.raises(ValueError) as e:
        parse_gate(spec)
    assert hint in str(e.value)


def test_decoder_rejects_bad_kv_mode_and_fixed_point(model):
    with pytest.raises(ValueError, match="copy, propagate, compute"):
        ExitDecoder(model, "confidence:0.9", kv="exact")
    with pytest.raises(ValueError, match="copy"):
        minee.generate(model, PROMPT, 3, exit="confidence:0.9", kv="approx")
    for bad in (P, P + 5):
        with pytest.raises(ValueError, match=f"fixed:0 .. fixed:{LAST}"):
            ExitDecoder(model, f"fixed:{bad}")
    ExitDecoder(model, "fixed:0")                          # both ends are fine
    ExitDecoder(model, f"fixed:{LAST}")


@pytest.mark.parametrize("spec, words", [
    (f"confidence:0.9,min_point={LAST}", ["min_point=0 .. 6", f"0 .. {LAST}"]),
    ("confidence:0.9,min_point=500", ["min_point=500", "min_point=0 .. 6"]),
    ("confidence:0.9,min_point=5,check_every=3", ["checks no exit point", "check_every"]),
    ("patience:4,attn_points=0", ["patience:4", "checks only 1"]),
])
def test_settings_this_model_cannot_use_are_errors(model, spec, words):
    """A gate that could never exit on this model is an error before anything runs, not a full-model run."""
    with pytest.raises(ValueError) as e:
        minee.generate(model, PROMPT, 3, exit=spec)
    for w in words:
        assert w in str(e.value), w


# ------------------------------------------------------------------ the learned gate

def synthetic(n, seed):
    """Features in their natural ranges; the label is a linear rule of confidence and entropy."""
    rng = np.random.default_rng(seed)
    f = {"confidence": rng.uniform(0, 1, n), "margin": rng.uniform(0, 1, n), "entropy": rng.uniform(0, 4, n),
         "cosine": rng.uniform(-1, 1, n), "depth": rng.uniform(0, 1, n)}
    return f, (3 * f["confidence"] - f["entropy"] + 0.5 > 0).astype(int)


def test_learned_gate_trains_saves_loads_and_reproduces(tmp_path):
    f, y = synthetic(600, 0)
    params = train_learned_gate(f, y)
    test_f, test_y = synthetic(400, 1)
    gate = Gate("learned", params)
    assert (gate.decide(test_f) == test_y.astype(bool)).mean() > 0.9
    assert (learned_prob(params, test_f)[test_y == 1] > 0.5).mean() > 0.9
    path = tmp_path / "gate.json"
    save_learned_gate(params, path)
    loaded = load_learned_gate(path)
    np.testing.assert_array_equal(learned_prob(loaded, test_f), learned_prob(params, test_f))
    np.testing.assert_array_equal(Gate("learned", loaded).decide(test_f), gate.decide(test_f))
    g = parse_gate(f"learned:{path},min_point=2")
    assert g.kind == "learned" and g.min_point == 2
    np.testing.assert_array_equal(g.decide(test_f), gate.decide(test_f))
    assert str(g) == f"learned:{path},min_point=2"
    np.testing.assert_array_equal(parse_gate(str(g)).decide(test_f), gate.decide(test_f))
    threshold = dict(params, threshold=0.9)                # the threshold is part of the saved gate
    save_learned_gate(threshold, path)
    assert parse_gate(f"learned:{path}").decide(test_f).sum() < gate.decide(test_f).sum()


@pytest.fixture(scope="module")
def tiny_gate(model, tmp_path_factory):
    """(params, file) of a learned gate trained on teacher-forced data of the tiny model
    (label: the point's top-1 equals the final top-1), features computed by hand."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, 40).tolist()
    s = states(model, ids)                                 # (P + 1, T, D)
    lg = model.unembed(s[1:].astype(np.float32)).astype(np.float64)
    pr = probs(lg)
    srt = np.sort(pr, -1)
    cos = (s[1:] * s[:-1]).sum(-1) / (np.linalg.norm(s[1:], axis=-1) * np.linalg.norm(s[:-1], axis=-1))
    feats = {"confidence": srt[..., -1], "margin": srt[..., -1] - srt[..., -2],
             "entropy": -(pr * np.log(pr)).sum(-1), "cosine": cos,
             "depth": np.broadcast_to(np.arange(P)[:, None] / LAST, cos.shape)}
    labels = lg.argmax(-1) == lg[-1].argmax(-1)
    params = train_learned_gate({k: v[:-1].ravel() for k, v in feats.items()}, labels[:-1].ravel(), threshold=0.5)
    path = tmp_path_factory.mktemp("gate") / "tiny_gate.json"
    save_learned_gate(params, path)
    return params, path


def test_learned_gate_in_generate_exits_where_its_rule_says(model, tiny_gate):
    """Loaded from its file by spec, the gate exits where the logistic rule (applied by hand) says."""
    _, path = tiny_gate
    out = minee.generate(model, PROMPT, N_NEW, exit=f"learned:{path},min_point=0", kv="compute")
    loaded = json.loads(path.read_text())
    loaded = {k: np.array(v) if isinstance(v, list) else v for k, v in loaded.items()}
    assert loaded["features"].tolist() == ["confidence", "margin", "entropy", "cosine", "depth"]
    want = [hand_exit("learned", loaded, list(range(LAST)), st, lgp)[0]
            for st, lgp in step_views(model, PROMPT, out.tokens)]
    assert out.exit_points[1:] == want
    assert len(set(want)) >= 2
    assert out.stats["gate"] == f"learned:{path},min_point=0"


def test_learned_gate_object_in_generate(model, tiny_gate):
    """A gate trained in the same session (never saved) works in generate like its saved copy."""
    params, path = tiny_gate
    from_file = minee.generate(model, PROMPT, N_NEW, exit=f"learned:{path}", kv="copy")
    in_memory = minee.generate(model, PROMPT, N_NEW, exit=Gate("learned", params), kv="copy")
    assert in_memory.tokens == from_file.tokens and in_memory.exit_points == from_file.exit_points
    assert in_memory.stats["gate"].startswith("learned")


def test_learned_gate_missing_file_is_a_clear_error(model, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"python -m minee train-gate --out {missing}"):
        parse_gate(f"learned:{missing}")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        minee.generate(model, PROMPT, 3, exit=f"learned:{missing}")


# ------------------------------------------------------------------ the oracle gate

@pytest.mark.parametrize("prompt", [PROMPT, [11, 2, 63, 30]])
def test_oracle_compute_is_greedy_and_exits_at_stable_point(model, prompt):
    plain = minee.generate(model, prompt, N_NEW)
    out = minee.generate(model, prompt, N_NEW, exit="oracle", kv="compute")
    assert out.tokens == plain.tokens
    want = [hand_stable(np.argmax(lg, -1).tolist()) for _, lg in step_views(model, prompt, out.tokens)]
    assert out.exit_points[1:] == want
    assert min(want) < LAST                                # some tokens settle before the last point
    assert out.stats["lm_head_calls_per_token"] == 1       # what an ideal gate pays, labelled as such
    assert out.stats["hindsight"] is True and plain.stats["hindsight"] is False
    assert out.stats["mean_blocks_computed"] == L          # kv=compute: even an ideal gate runs every block
    assert out.stats["mean_exit_depth"] == pytest.approx(np.mean([(p + 1) / 2 for p in want]))
    copy = minee.generate(model, prompt, N_NEW, exit="oracle", kv="copy")
    assert copy.stats["mean_blocks_computed"] == pytest.approx(copy.stats["mean_exit_depth"])


@pytest.mark.parametrize("tok", [18, 21])
def test_oracle_with_copy_fills_deeper_blocks(model, tok):
    """The oracle runs every layer, then (kv="copy") overwrites the blocks after its exit with copies."""
    kv = prefilled(model, PROMPT)
    pos = kv.length
    _, p = ExitDecoder(model, "oracle", kv="copy").step(tok, kv)
    lg = lens_logits(model, PROMPT + [tok])[:, pos]
    assert p == hand_stable(np.argmax(lg, -1).tolist())
    assert p // 2 < L - 1                                  # (chosen so that some blocks are skipped)
    fk, _ = full_kv(model, PROMPT + [tok])
    for b in range(L):
        np.testing.assert_allclose(kv.keys[b, 0, :, pos], fk[min(b, p // 2), :, pos], rtol=1e-5,
                                   atol=1e-5 * np.abs(fk).max())


# ------------------------------------------------------------------ stats

LM_HEAD = 2 * D * V            # multiply-adds x 2 of one vocabulary projection


def test_stats_layers_and_lm_head_calls(model):
    conf = minee.generate(model, PROMPT, N_NEW, exit="confidence:0.5,min_point=0", kv="copy")
    pts = conf.exit_points[1:]
    assert len(conf.exit_points) == len(conf.tokens) == N_NEW
    assert conf.stats["mean_exit_depth"] == pytest.approx(np.mean([(p + 1) / 2 for p in pts]))
    assert conf.stats["mean_blocks_computed"] == pytest.approx(conf.stats["mean_exit_depth"])
    assert conf.stats["mean_exit_point"] == pytest.approx(np.mean(pts))
    assert conf.stats["share_early"] == pytest.approx(np.mean([p < LAST for p in pts]))
    assert conf.stats["lm_head_calls_per_token"] > 1
    assert conf.stats["gate"] == "confidence:0.5,min_point=0" and conf.stats["kv"] == "copy"
    for spec in ("cosine:0.9", "fixed:3", "cosine:1.0"):
        assert minee.generate(model, PROMPT, N_NEW, exit=spec).stats["lm_head_calls_per_token"] == 1, spec


def test_stats_flops(model):
    def fl(spec, kv="copy"):
        return minee.generate(model, PROMPT, N_NEW, exit=spec, kv=kv).stats["flops_per_token"]

    full = fl(f"fixed:{LAST}")
    assert fl("fixed:0") < fl("fixed:1") < fl("fixed:4") < fl("fixed:5") < full
    assert fl("fixed:1") >= LM_HEAD                        # the one LM head is counted
    assert fl("fixed:1", "propagate") > fl("fixed:1", "copy")       # K/V projections of skipped blocks cost
    assert fl("fixed:1", "compute") == pytest.approx(full)          # compute saves nothing
    # a never-exiting confidence gate pays 7 extra LM heads per token on top of the full model;
    # a never-exiting cosine gate pays none
    assert fl("confidence:1.0,min_point=0") - full == pytest.approx(LAST * LM_HEAD, rel=1e-9)
    assert fl("cosine:1.0,min_point=0") == pytest.approx(full)


# ------------------------------------------------------------------ CLI

def test_cli_generate_exit_json(smollm2_dir, capsys):
    rc = main(["generate", "--model", str(smollm2_dir), "--prompt", "The capital of France is",
               "--max-new-tokens", "5", "--exit", "fixed:3", "--kv", "propagate", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["exit_points"] == [59, 3, 3, 3, 3] and len(out["tokens"]) == 5
    s = out["stats"]
    assert s["gate"] == "fixed:3" and s["kv"] == "propagate"
    assert s["mean_exit_depth"] == s["mean_blocks_computed"] == 2.0 and s["lm_head_calls_per_token"] == 1
    assert s["flops_per_token"] > 0 and s["share_early"] == 1.0


def test_cli_generate_bad_gate_is_an_error(smollm2_dir, capsys):
    rc = main(["generate", "--model", str(smollm2_dir), "--prompt", "Hi", "--max-new-tokens", "2",
               "--exit", "speed:3", "--json"])
    assert rc == 2
    assert "unknown gate" in capsys.readouterr().err


# ------------------------------------------------------------------ learned-gate files are untrusted input

def good_gate_dict():
    f, y = synthetic(300, 4)
    p = train_learned_gate(f, y, threshold=0.7)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()}


@pytest.mark.parametrize("text, words", [
    ('{"features": ["confidence"],\n"mean" [0.5]}', ["not valid JSON", "line 2"]),
    ("[1, 2, 3]", ["JSON object", "features"]),
    ('{"weights": [1, 2]}', ["missing field(s) features, mean, std, w, b, threshold", "unknown field(s) weights",
                            "minee train-gate"]),
    (lambda d: {**d, "features": ["confidence", "speed"]}, ["'features'", "confidence, margin"]),
    (lambda d: {**d, "w": d["w"][:2]}, ["'w'", "5 finite numbers"]),
    (lambda d: {**d, "mean": [float("nan")] * 5}, ["'mean'", "finite"]),
    (lambda d: {**d, "std": [0.0] * 5}, ["'std'", "> 0"]),
    (lambda d: {**d, "b": "x"}, ["'b'", "finite number"]),
    (lambda d: {**d, "threshold": 1.5}, ["'threshold'", "(0, 1)"]),
], ids=["bad_json", "not_an_object", "wrong_keys", "unknown_feature", "short_w", "nan_mean", "zero_std",
        "text_b", "threshold"])
def test_bad_gate_files_are_errors_naming_file_and_field(model, tmp_path, text, words):
    """The issue's cases: a JSON error without the file, `minee: error: 'features'` for wrong keys,
    and NaN gates accepted by generate."""
    path = tmp_path / "gate.json"
    raw = text(good_gate_dict()) if callable(text) else text
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    with pytest.raises(ValueError) as e:
        minee.generate(model, PROMPT, 3, exit=f"learned:{path}")
    for w in [str(path), *words]:
        assert w in str(e.value), w


def test_gate_file_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(ValueError, match="not one"):
        load_learned_gate(path)


def test_a_nan_gate_is_never_trained_or_saved(tmp_path):
    """--min-point 100 used to train on no data: mean/std of nothing gave a NaN gate that was saved."""
    f, y = synthetic(10, 0)
    empty = {k: v[:0] for k, v in f.items()}
    with pytest.raises(ValueError, match="no training examples"):
        train_learned_gate(empty, y[:0])
    with pytest.raises(ValueError, match="all 10 training labels are 1"):
        train_learned_gate(f, np.ones(10))
    bad = {**train_learned_gate(f, y), "w": np.full(5, np.nan)}
    with pytest.raises(ValueError, match="'w'"):
        save_learned_gate(bad, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.parametrize("chunk", [1, 3, 4, 8])
def test_oracle_finds_stable_points_decoding_from_the_end(model, chunk):
    """The oracle decodes points from the last one backwards and stops early; it must find the same
    stable points as decoding every point, for rows that settle early, late or at point 0."""
    rng = np.random.default_rng(chunk)
    states = rng.standard_normal((P, 6, D)).astype(np.float32)
    final = states[-1].copy()
    states[:, 0] = final[0]                                # row 0: the same state everywhere: stable at 0
    states[3:, 1] = final[1]                               # row 1: stable from point 3 on (at least)
    want = stable_point(model.unembed(states).argmax(-1))
    got = ExitDecoder(model, "oracle")._stable_points(states, chunk=chunk)
    np.testing.assert_array_equal(got, want)
    assert want[0] == 0 and want[1] <= 3 and len(set(want.tolist())) >= 3
