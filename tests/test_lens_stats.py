"""The lens statistics computed in a few passes (lens.logit_stats) against plain float64 computed
the long way, and the teacher-forced table and analysis.json against the code as it was before
(issue 19), kept below as a reference that computes them the long way.

Tolerances, and why. Both compute in float32 from float32 logits z. Every statistic is a sum over
the V tokens of terms that float32 rounds to eps = 1.2e-7 of their size, and each addition may
round the partial sum to eps of its size. NumPy adds pairwise along contiguous memory (log2 V
levels of rounding) but one term after another along a strided axis (up to V / 2 levels: a tail of
small terms added to 1 vanishes). With `levels` the number of roundings:
- probabilities (confidence, margin, final_prob) are at most 1: absolute error <= levels eps;
- entropy and KL are sums of p (z - zmax) and q (z - zmax), plus log S. Their terms add up, in size,
  to at most log V + H(p) + H(q) + KL (since -sum p (z - zmax) = H(p) - log S and -sum q (z - zmax)
  = KL + H(q) - log S): absolute error <= levels eps (log V + H(p) + H(q) + KL).
logit_stats sums C-ordered rows pairwise: it is held to log2(V) levels against float64, on random
logits and on a model's. So is the code before on C-ordered logits. But ops.linear returned it
V-strided logits, summed one term after another: on its real input it was off by up to V / 2
levels (2.8e-4 in a probability near 1 on SmolLM2), and the table and analysis.json are compared
with it within that bound.
The top-1 of logit_stats is the first largest float32 logit, exactly as float64 finds it; the code
before took the argmax of rounded log-probabilities, which can pick another token only where the
two largest logits are closer than that rounding.
"""

import numpy as np
import pytest

import minee
from minee import analysis, lens
from minee.hooks import exit_point_names
from minee.lens import decoded_stats, final_distribution, lens_metrics, logit_stats, point_chunks

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = float(np.finfo(np.float32).eps)


# ------------------------------------------------------------------ references, the long way

def float64_stats(logits, final_logits=None):
    """Every statistic of softmax(logits) (..., V) in float64, from the same float32 logits."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.exp(logp)
    top2 = np.sort(p, -1)[..., -2:]
    top3 = np.argsort(-z, -1, kind="stable")[..., :3]                     # ties: the first id first
    r = {"top1": z.argmax(-1), "confidence": top2[..., 1], "margin": top2[..., 1] - top2[..., 0],
         "entropy": -(p * logp).sum(-1), "top_ids": top3, "top_probs": np.take_along_axis(p, top3, -1)}
    if final_logits is not None:
        f = np.asarray(final_logits, np.float64)
        logq = f - f.max(-1, keepdims=True)
        logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
        q = np.exp(logq)
        ft = np.broadcast_to(f.argmax(-1)[..., None], z.shape[:-1] + (1,))
        z_ft = np.take_along_axis(z, ft, -1)                                   # (..., 1)
        r["kl"] = (q * (logq - logp)).sum(-1)
        r["final_prob"] = np.take_along_axis(p, ft, -1)[..., 0]
        r["final_rank"] = (z > z_ft).sum(-1)
        # tokens above the final top-1 by less than float32 can tell apart once shifted by zmax
        r["rank_slack"] = ((z > z_ft) & (z - z_ft <= 2 * EPS * (z.max(-1, keepdims=True) - z_ft))).sum(-1)
        r["final_entropy"] = np.broadcast_to(-(q * logq).sum(-1), z.shape[:-1])
    return r


def today_log_softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def today_logit_features(logp):
    top2 = np.partition(logp, -2, axis=-1)[..., -2:]
    return {"confidence": np.exp(top2[..., 1]), "margin": np.exp(top2[..., 1]) - np.exp(top2[..., 0]),
            "entropy": -(np.exp(logp) * logp).sum(-1), "top1": logp.argmax(-1)}


def today_stats(logits, final_logits=None):
    """The statistics as minee computed them before issue 19 (lens_metrics, logit_features)."""
    logp = today_log_softmax(logits)
    r = today_logit_features(logp)
    if final_logits is not None:
        logq = today_log_softmax(final_logits)
        final_top1 = logq.argmax(-1)
        p_final = np.take_along_axis(logp, np.broadcast_to(final_top1[..., None], logp.shape[:-1] + (1,)), -1)[..., 0]
        r["kl"] = (np.exp(logq) * (logq - logp)).sum(-1)
        r["final_rank"] = (logp > p_final[..., None]).sum(-1)
        r["final_prob"] = np.exp(p_final)
    return r


def today_window_part(model, begin, s, end, ids, *maps):
    """analysis.window_part as it was before issue 19: log-softmax, np.partition, KL the long way,
    over groups of points sized for three arrays of logits."""
    from minee.shortcuts import Shortcuts
    names = ["hook_embed"] + exit_point_names(model.config.n_layers)
    logits, acts = model.run_with_cache(ids[None, begin:end], names=names)
    scored = slice(s - begin, end - begin)
    states = np.stack([acts[n][0, scored] for n in names])
    logq = today_log_softmax(logits[0, scored])
    targets = ids[s + 1:end + 1]
    shortcut = Shortcuts(*maps) if maps else None
    P, T, _ = states[1:].shape
    step = max(1, (512 << 20) // (T * model.config.vocab_size * 4 * 3))
    cols = {k: [] for k in ("top1", "confidence", "margin", "entropy", "kl", "gap")}
    for i in range(0, P, step):
        sl = slice(i, min(i + step, P))
        logp = today_log_softmax(lens.point_logits(model, states[1:][sl], sl, shortcut))
        f = today_logit_features(logp)
        f["kl"] = (np.exp(logq) * (logq - logp)).sum(-1)
        top2 = np.partition(logp, -2, axis=-1)[..., -2:]
        f["gap"] = top2[..., 1] - top2[..., 0]                  # (for the test) how close the top-1 was to a tie
        for k in cols:
            cols[k].append(f[k])
    part = {k: np.concatenate(v) for k, v in cols.items()}
    part["cosine"] = analysis.cosine(states[1:], states[:-1])
    part["targets"], part["inputs"] = targets, ids[s:end]
    part["nll"] = -logq[np.arange(len(targets)), targets]
    return part


# ------------------------------------------------------------------ the check

def check_stats(got, ref, V, who, levels=None):
    """The statistics in got within the float32 bounds of the float64 reference ref, for sums with
    `levels` roundings (default log2 V, pairwise; see the module docstring)."""
    rounding = (levels or np.log2(V)) * EPS
    np.testing.assert_array_equal(got["top1"], ref["top1"], err_msg=f"{who}: top1")
    if "top_ids" in got:
        np.testing.assert_array_equal(got["top_ids"], ref["top_ids"], err_msg=f"{who}: top_ids")
    for name in {"confidence", "margin", "final_prob", "top_probs"} & set(got):
        err = np.abs(got[name] - ref[name]).max()
        assert err <= rounding, f"{who}: {name} off by {err:.3g} > {rounding:.3g}"
    scale = np.log(V) + ref["entropy"] + ref["final_entropy"] + ref["kl"]
    for name in {"entropy", "kl"} & set(got):
        ratio = (np.abs(got[name] - ref[name]) / (rounding * scale)).max()
        assert ratio <= 1, f"{who}: {name} off by {ratio:.2f} x its bound"
        print(f"{who}: {name} within {ratio:.3f} of its bound")
    if "final_rank" in got:
        below = ref["final_rank"] - got["final_rank"]           # rounding can only merge tokens with it
        assert ((below >= 0) & (below <= ref["rank_slack"])).all(), f"{who}: final_rank"


def random_case(kind, V, shape, seed):
    """(logits (*shape, V), final logits (shape[-1], V)) float32 of a kind of distribution."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((*shape, V)) * 3
    f = rng.standard_normal((shape[-1], V)) * 3
    if kind == "ties":                                # integer logits: many exact ties, top-1 = top-2 often
        z, f = np.round(z), np.round(f)
        z[..., 0, :] = 1.0                            # one position uniform everywhere
    elif kind == "peaked":                            # one logit 80 above all others
        z[..., 5] += 80
        f[..., 7] += 80
    elif kind == "large":                             # float32 logits of magnitude 1e4
        z, f = z * 3e3, f * 3e3
    elif kind == "spread":                            # like the lens's early points: most p below 1e-38
        z, f = z * 40, f * 10
    return z.astype(np.float32), f.astype(np.float32)


CASES = [("normal", 1000, (3, 17)), ("ties", 50, (2, 9)), ("ties", 49152, (2, 3)), ("peaked", 1000, (3, 5)),
         ("large", 1000, (3, 5)), ("spread", 49152, (2, 4)), ("normal", 262144, (1, 2))]


@pytest.mark.parametrize("kind, V, shape", CASES, ids=[f"{k}-{v}" for k, v, _ in CASES])
def test_stats_equal_float64_and_todays_within_float32_rounding(kind, V, shape):
    z, f = random_case(kind, V, shape, seed=V + len(kind))
    ref = float64_stats(z, f)
    got = logit_stats(z, final_distribution(f), rank=True, k=3)
    check_stats(got, ref, V, "logit_stats")
    check_stats(logit_stats(z), ref, V, "logit_stats without final")          # the gate's features
    tie = np.sort(z, -1)[..., -1] - np.sort(z, -1)[..., -2] <= 2 * EPS * np.abs(z).max(-1)
    strided = np.ascontiguousarray(z.reshape(-1, V).T).T.reshape(z.shape)   # what ops.linear returned
    for logits, levels, who in [(z, None, "the code before"), (strided, V / 2, "the code before, V-strided")]:
        old = today_stats(logits, f)
        old["top1"] = np.where(tie, ref["top1"], old["top1"])      # before, a near-tie could go either way
        check_stats(old, ref, V, who, levels)
    if kind == "ties":
        assert (got["margin"][ref["margin"] == 0] == 0).all() and (ref["margin"] == 0).any()
        assert (got["final_rank"] == ref["final_rank"]).all()


def test_a_bound_can_fail():
    """The check is not vacuous: an entropy off by 100 roundings, or a top-1 moved, is caught."""
    z, f = random_case("normal", 1000, (2, 3), seed=1)
    ref = float64_stats(z, f)
    bad = logit_stats(z, final_distribution(f), rank=True)
    bad["entropy"] = bad["entropy"] + 100 * np.log2(1000) * EPS * np.log(1000)
    with pytest.raises(AssertionError, match="entropy"):
        check_stats(bad, ref, 1000, "bad")
    bad = logit_stats(z, final_distribution(f), rank=True)
    bad["top1"] = (bad["top1"] + 1) % 1000
    with pytest.raises(AssertionError, match="top1"):
        check_stats(bad, ref, 1000, "bad")


def test_any_layout_and_group_size_give_the_same_numbers(monkeypatch):
    z, f = random_case("spread", 4096, (3, 40), seed=2)
    final = final_distribution(f)
    want = logit_stats(z, final, rank=True)
    strided = np.ascontiguousarray(z.reshape(-1, 4096).T).T.reshape(z.shape)   # what (W @ x.T).T returns
    assert not strided.flags.c_contiguous
    for logits, group in [(strided, lens.GROUP_BYTES), (z, 1), (z, 7 * 4096 * 4), (z, 1 << 30)]:
        monkeypatch.setattr(lens, "GROUP_BYTES", group)
        got = logit_stats(logits, final, rank=True)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_lens_metrics_are_the_stats():
    z, f = random_case("normal", 500, (4, 6), seed=3)
    targets = np.array([3, 1, 4, 1, 5, -1])
    m = lens_metrics(z, f, targets)
    ref = float64_stats(z, f)
    np.testing.assert_array_equal(m["agree"], ref["top1"] == f.argmax(-1))
    np.testing.assert_array_equal(m["final_rank"], ref["final_rank"])
    np.testing.assert_array_equal(m["accuracy"][:, :-1], ref["top1"][:, :-1] == targets[:-1])
    assert np.isnan(m["accuracy"][:, -1]).all()


@pytest.mark.parametrize("P, T, V, budget", [(60, 256, 49152, None), (36, 256, 262144, None),
                                             (36, 1000, 262144, None), (7, 13, 100, 5 * 100 * 4), (3, 4, 10, 1)])
def test_point_chunks_cover_the_lens_once_within_the_budget(P, T, V, budget):
    seen = np.zeros((P, T), int)
    for ps, ts in point_chunks(P, T, V, budget):
        seen[ps, ts] += 1
        rows = (ps.stop - ps.start) * (ts.stop - ts.start)
        assert rows * V * 4 <= (budget or lens.LOGITS_BUDGET) or rows == 1
    assert (seen == 1).all()


def test_decoded_stats_do_not_depend_on_the_blocks(tiny_with_tokenizer, monkeypatch):
    """Blocks of whole points, or of a few positions of one point (a large vocabulary's case)."""
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=30)
    final, states = lens.exit_states(model, ids)
    dist = final_distribution(final)
    want = decoded_stats(model, states, dist, rank=True, k=3)
    monkeypatch.setattr(lens, "LOGITS_BUDGET", 7 * model.config.vocab_size * 4)      # 7 positions a block
    assert len(point_chunks(*states.shape[:2], model.config.vocab_size)) > states.shape[0]
    got = decoded_stats(model, states, dist, rank=True, k=3)
    # a GEMM over other numbers of rows can round the logits otherwise: by ~1e-6 of their size
    z = np.sort(model.unembed(states), -1)
    clear = z[..., -1] - z[..., -2] > 1e-5 * np.abs(z).max()
    assert clear.mean() > 0.9
    for name in want:
        if name in ("top1", "top_ids", "final_rank"):
            np.testing.assert_array_equal(got[name][clear], want[name][clear], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------ the table and analysis.json

def check_table(new, ref, V):
    """A TeacherForced table against the code before's window parts (with their top-2 gaps), within
    the rounding of its strided sums (V / 2 levels, see the module docstring)."""
    rounding = V / 2 * EPS
    clear = ref["gap"] > 2 * EPS * 100                        # log-prob gap beyond rounding (|log p| < 100)
    assert (new.top1 == ref["top1"])[clear].all(), "top1 differs where it was no tie"
    print(f"\ntop1: {(new.top1 != ref['top1']).sum()} of {new.top1.size} differ, all at near-ties")
    for name in ("confidence", "margin"):
        err = np.abs(getattr(new, name) - ref[name]).max()
        assert err <= rounding, f"{name} off by {err:.3g}"
        print(f"{name} off by {err:.3g}, bound {rounding:.3g}")
    scale = np.log(V) + ref["entropy"] + ref["entropy"][-1] + ref["kl"]
    for name in ("entropy", "kl"):
        ratio = (np.abs(getattr(new, name) - ref[name]) / (rounding * scale)).max()
        assert ratio <= 1, f"{name} off by {ratio:.2f} x its bound"
        print(f"{name} within {ratio:.3f} of its bound")
    for name in ("cosine", "targets", "inputs"):
        np.testing.assert_array_equal(getattr(new, name), ref[name], err_msg=name)


def today_table(model, ids, window, context=128):
    parts = [today_window_part(model, *span, np.asarray(ids)) for span in lens.windows(len(ids) - 1, window, context)]
    ppl = float(np.exp(np.concatenate([p["nll"] for p in parts]).mean()))
    return {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}, ppl


def test_teacher_forced_table_equals_float64_and_todays(tiny_with_tokenizer):
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=90)
    tf, ppl = analysis.teacher_forced(model, ids, window=32, progress=False)
    ref, ref_ppl = today_table(model, ids, window=32)
    check_table(tf, ref, model.config.vocab_size)
    assert ppl == pytest.approx(ref_ppl, rel=1e-5)
    # every window sees its whole prefix (context 128): one plain forward gives the same logits
    final, states = lens.exit_states(model, ids[:-1])
    f64 = float64_stats(model.unembed(states), final)
    check_stats({k: getattr(tf, k) for k in ("top1", "confidence", "margin", "entropy", "kl")}, f64,
                model.config.vocab_size, "the table")


def gate_decisions(gate, table):
    """(decisions (C, N), the feature each was made on (C, N)) of a threshold gate at its candidates."""
    P = table.top1.shape[0]
    cand = [p for p in gate.candidates(P) if p < P - 1]
    f = table.features(cand)
    return np.asarray(gate.decide(f), bool), np.asarray(f[gate.kind], float)


def test_smollm2_analysis_equals_float64_and_todays(smollm2_dir, tmp_path, monkeypatch):
    """analyze over 128 tokens of SmolLM2 (no E5, which decodes no statistics): the table equals
    float64 within its bound and the code before within that code's; analysis.json equals the code
    before's, except a gate's report where one of its decisions flipped at a feature within that
    tolerance of its threshold."""
    model = minee.load(smollm2_dir)
    V = model.config.vocab_size
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=128)
    res = analysis.analyze(model, tmp_path / "new", max_tokens=128, gen_prompts=0, progress=False)
    tf, _ = analysis.load_table(tmp_path / "new" / "teacher_forced.npz", ids, 256, 2 * model.config.n_layers)
    ref_parts = []

    def today(*args):
        ref_parts.append(today_window_part(*args))
        return {k: v for k, v in ref_parts[-1].items() if k != "gap"}
    monkeypatch.setattr(analysis, "window_part", today)
    ref = analysis.analyze(model, tmp_path / "old", max_tokens=128, gen_prompts=0, progress=False)
    assert len(ref_parts) == 1                                 # one window: 127 predictions
    check_table(tf, ref_parts[0], V)
    final, states = lens.exit_states(model, ids[:-1])
    # the float64 statistics of the very logits the table was made from: the same blocks through the
    # LM head (a GEMM of other rows rounds each logit differently, by more than the sums' bound)
    for ps, ts in point_chunks(*states.shape[:2], V):
        block = lens.point_logits(model, states[ps, ts], ps)                  # (p, t, V)
        for p in [p for p in range(ps.start, ps.stop) if p % 6 == 0]:      # float64 at every 6th point (memory)
            f64 = float64_stats(block[p - ps.start], final[ts])
            check_stats({k: getattr(tf, k)[p, ts] for k in ("top1", "confidence", "margin", "entropy", "kl")},
                        f64, V, f"the table at point {p}")

    ref_tf, _ = analysis.load_table(tmp_path / "old" / "teacher_forced.npz", ids, 256, 2 * model.config.n_layers)
    rounding = V / 2 * EPS                                     # the code before's sums (check_table)
    scale = np.log(V) + 2 * ref_tf.entropy.max() + ref_tf.kl.max()
    flipped = set()
    for gate in analysis.default_gate_sweep(tf.top1.shape[0]):
        if gate.kind in ("confidence", "margin", "entropy"):
            new_d, _ = gate_decisions(gate, tf)
            old_d, feature = gate_decisions(gate, ref_tf)
            differ = new_d != old_d
            tol = rounding * (scale if gate.kind == "entropy" else 1)
            near = np.abs(feature - gate.value)[differ]
            assert (near <= tol).all(), f"{gate}: a decision flipped far from its threshold"
            if differ.any():
                flipped.add(str(gate))
                print(f"{gate}: {differ.sum()} decision(s) flipped, {near.max():.2g} from the threshold")
    # numbers of analysis.json: per-point means of entropy and KL, and log perplexity, within the
    # table's bound; the learned gate's parameters are fitted to features that moved by that much
    # (2.8e-4 for a probability here); everything else counts decisions and must be equal
    bound = {"kl": rounding * scale, "entropy": rounding * scale, "perplexity": rounding * scale, "params": 1e-3}
    compare(res, ref, flipped, bound)


def compare(new, old, flipped, bound, key=None, where=""):
    """Equal JSON trees, numbers under a key of `bound` within it (perplexity: its log), except
    the reports of gates in `flipped`."""
    if isinstance(old, dict):
        if old.get("gate") in flipped:
            return
        assert new.keys() == old.keys(), where
        for k in old:
            compare(new[k], old[k], flipped, bound, k if k in bound else key, f"{where}.{k}")
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old)):
            compare(a, b, flipped, bound, key, f"{where}[{i}]")
    elif key == "perplexity":
        assert abs(np.log(new / old)) <= bound[key], where
    elif key is not None and isinstance(old, float):
        assert abs(new - old) <= bound[key], where
    else:
        assert new == old, where
