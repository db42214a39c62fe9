"""The paper's experiments: oracle and gate bookkeeping on hand-made tables, sub-word buckets on
known tokenizations, teacher-forced tables against plain forwards, and the analyze CLI."""
import json

import numpy as np
import pytest

import minee
from minee import analysis
from minee.analysis import TeacherForced
from minee.exits import Gate
from minee.lens import log_softmax


def table(top1, confidence=None, targets=None):
    """A TeacherForced from hand-made (P, N) top-1 ids (other features filled in plainly)."""
    top1 = np.array(top1)
    conf = np.full(top1.shape, 0.5) if confidence is None else np.array(confidence, float)
    z = np.zeros(top1.shape)
    tg = top1[-1] if targets is None else np.array(targets)
    return TeacherForced(top1=top1, confidence=conf, margin=z, entropy=z, cosine=z, kl=z,
                         targets=tg, inputs=np.zeros(top1.shape[1], int))


# columns are tokens, rows exit points 0..3; the last row is the final prediction
HAND = [[1, 2, 9, 4, 5],
        [7, 2, 3, 4, 8],
        [1, 6, 3, 4, 8],
        [1, 2, 3, 9, 5]]
# token 0: matches at 0, 2, 3 -> first 0, stable 2; token 1: 0,1,3 -> first 0, stable 3
# token 2: 1,2,3 -> first 1, stable 1; token 3: never before the end -> 3, 3; token 4: 0,3 -> 0, 3


def test_e1_oracles_and_shares_on_a_hand_made_table():
    e1 = analysis.e1_natural(table(HAND), perplexity=12.0)
    assert e1["first_match_hist"] == [3, 1, 0, 1]
    assert e1["stable_hist"] == [0, 1, 1, 3]
    assert e1["share_needing_last_point"] == pytest.approx(3 / 5)
    assert e1["mean_layers_stable"] == pytest.approx(np.mean([3, 4, 2, 4, 4]) / 2)
    assert e1["saving_first_match"] == pytest.approx(1 - np.mean([1, 1, 2, 4, 1]) / 4)
    assert e1["agree"] == pytest.approx([3 / 5, 2 / 5, 2 / 5, 1.0])
    assert e1["perplexity"] == 12.0


def test_gate_exits_accuracy_and_error_by_hand():
    conf = [[0.9, 0.1, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.6, 0.1, 0.95],
            [0.1, 0.7, 0.1, 0.1, 0.1],
            [0.1, 0.1, 0.1, 0.1, 0.1]]
    tf = table(HAND, conf)
    exits, checks = analysis.gate_exits(Gate("confidence", 0.5, min_point=0), tf)
    assert exits.tolist() == [0, 2, 1, 3, 1]            # first candidate with confidence >= 0.5
    assert checks.tolist() == [1, 3, 2, 3, 2]           # LM-head checks spent (the last point needs none)
    r = analysis.gate_report(Gate("confidence", 0.5, min_point=0), tf)
    assert r["accuracy"] == pytest.approx(2 / 5)        # equals stable [2, 3, 1, 3, 3] at tokens 2 and 3
    assert r["exit_error"] == pytest.approx(2 / 5)      # exit top-1 differs from final at tokens 1 and 4
    assert r["mean_exit_depth"] == pytest.approx(np.mean([1, 3, 2, 4, 2]) / 2)
    # min_point=2 removes points 0 and 1 from the candidates; the default (the last third) starts at 1
    exits, _ = analysis.gate_exits(Gate("confidence", 0.5, min_point=2), tf)
    assert exits.tolist() == [3, 2, 3, 3, 3]
    exits, _ = analysis.gate_exits(Gate("confidence", 0.5), tf)
    assert exits.tolist() == [3, 2, 1, 3, 1]
    # the oracle gate is exact by definition
    assert analysis.gate_report(Gate("oracle"), tf)["accuracy"] == 1.0
    assert analysis.gate_report(Gate("oracle"), tf)["exit_error"] == 0.0


def test_patience_on_the_table():
    exits, _ = analysis.gate_exits(Gate("patience", 2, min_point=0), table(HAND))
    assert exits.tolist() == [3, 1, 2, 1, 2]            # same top-1 at two consecutive checked points


def test_teacher_forced_table_equals_a_plain_forward(tiny_with_tokenizer):
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=40)
    tf, ppl = analysis.teacher_forced(model, ids, window=16, context=64, progress=False)
    # with enough context every window sees the whole prefix: compare with one forward over all ids
    logits, acts = model.run_with_cache(ids[None, :-1])
    logp = log_softmax(logits[0])
    assert ppl == pytest.approx(float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())), rel=1e-4)
    L = model.config.n_layers
    for p in (0, 3, 2 * L - 1):
        name = f"blocks.{p // 2}.hook_resid_{'mid' if p % 2 == 0 else 'post'}"
        lens_logits = model.unembed(acts[name][0])
        np.testing.assert_array_equal(tf.top1[p], lens_logits.argmax(-1))
        probs = np.exp(log_softmax(lens_logits))
        np.testing.assert_allclose(tf.confidence[p], probs.max(-1), rtol=1e-4)
    np.testing.assert_array_equal(tf.targets, ids[1:])
    np.testing.assert_array_equal(tf.inputs, ids[:-1])
    assert np.abs(tf.kl[-1]).max() <= 1e-5 * np.log(model.config.vocab_size)   # 0 up to rounding of log-probs


def test_gate_exits_match_online_decoding(tiny_with_tokenizer):
    """The vectorized teacher-forced gate and the online ExitDecoder (kv=compute) exit alike."""
    model = minee.load(tiny_with_tokenizer)
    prompt = model.tokenizer.encode("To be, or not to be, that is the question")
    tf0, _ = analysis.teacher_forced(model, np.array(prompt), progress=False)
    gate = Gate("confidence", float(np.median(tf0.confidence[1:5])), min_point=1)   # exits vary
    out = minee.generate(model, prompt, 12, exit=gate, kv="compute", stop_at_eos=False)
    ids = np.array(prompt + out.tokens)
    tf, _ = analysis.teacher_forced(model, ids, window=64, progress=False)
    exits, _ = analysis.gate_exits(gate, tf)
    decoded = slice(len(prompt), len(ids) - 1)            # positions whose next token was decoded step by step
    assert exits[decoded].tolist() == out.exit_points[1:]
    assert len(set(out.exit_points[1:])) > 1              # the gate really varies


def test_subword_buckets_on_known_tokenizations(smollm2_dir):
    tok = minee.load(smollm2_dir).tokenizer
    ids = tok.encode("Hello antidisestablishmentarianism, world")
    pieces = [tok.hf.id_to_token(i) for i in ids]
    inputs, targets = np.array(ids[:-1]), np.array(ids[1:])
    b = analysis.subword_buckets(tok, inputs, targets)
    expected = []
    for prev, t in zip(pieces[:-1], pieces[1:]):
        if not t.lstrip("Ġ")[:1].isalpha():
            expected.append(2)                         # punctuation
        elif t.startswith("Ġ"):
            expected.append(0)                         # a new word
        else:
            expected.append(1)                         # glued to the previous piece
    assert b.tolist() == expected
    assert pieces[1].startswith("Ġ") and b[0] == 0     # " ant..." starts a word
    assert 1 in b.tolist()                             # the long word is split into continuations
    assert b[pieces.index(",") - 1] == 2
    # after a newline a word without the marker still starts a word
    ids = tok.encode("end.\nHamlet")
    pieces = [tok.hf.id_to_token(i) for i in ids]
    b = analysis.subword_buckets(tok, np.array(ids[:-1]), np.array(ids[1:]))
    after_newline = pieces.index("Ċ")                  # the piece after it predicts "Ham" (no marker)
    assert pieces[after_newline + 1][0].isalpha() and b[after_newline] == 0


def test_e6_splits_and_trains(tiny_with_tokenizer):
    model = minee.load(tiny_with_tokenizer)
    ids = analysis.corpus_ids(model.tokenizer, max_tokens=65)
    tf, _ = analysis.teacher_forced(model, ids, window=32, progress=False)
    e6 = analysis.e6_learned(tf, min_point=0, thresholds=(0.5, 0.9))
    assert (e6["train_tokens"], e6["test_tokens"]) == (32, 32)
    assert len(e6["learned"]) == len(e6["confidence"]) == 2
    assert e6["learned"][0]["mean_exit_depth"] <= e6["learned"][1]["mean_exit_depth"]


def test_analyze_cli_writes_every_file(tiny_with_tokenizer, tmp_path, capsys):
    from minee.__main__ import main
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(tiny_with_tokenizer), "--out", str(out), "--max-tokens", "80",
                 "--window", "40", "--gen-prompts", "2", "--gen-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"e1", "e2", "e3", "e4", "e5", "e6"}
    assert res["e1"]["tokens"] == 79 and res["e5"]["prompts"] == 2
    written = sorted(p.name for p in out.iterdir())
    assert written == ["analysis.json", "e1_lens_curves.png", "e1_oracle_hist.png", "e2_gates.png",
                       "e3_subword.png", "e4_sublayer.png", "e5_generation.png", "e6_learned.png",
                       "teacher_forced.npz"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_analyze_reuses_the_table_only_for_the_same_tokens(tiny_with_tokenizer, tmp_path, monkeypatch):
    model = minee.load(tiny_with_tokenizer)
    first = analysis.analyze(model, tmp_path, max_tokens=30, window=16, gen_prompts=0, progress=False)
    calls = []
    real = analysis.teacher_forced
    monkeypatch.setattr(analysis, "teacher_forced", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = analysis.analyze(model, tmp_path, max_tokens=30, window=16, gen_prompts=0, progress=False, reuse=True)
    assert calls == [] and again["e1"] == first["e1"]
    analysis.analyze(model, tmp_path, max_tokens=31, window=16, gen_prompts=0, progress=False, reuse=True)
    assert calls == [1]                                  # other tokens: computed afresh


def test_train_gate_cli_writes_a_gate_generate_can_use(tiny_with_tokenizer, tmp_path, capsys):
    from minee.__main__ import main
    from minee.exits import load_learned_gate
    gate = tmp_path / "gate.json"
    assert main(["train-gate", "--model", str(tiny_with_tokenizer), "--out", str(gate), "--max-tokens", "60",
                 "--window", "30", "--min-point", "1", "--threshold", "0.7", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["spec"] == f"learned:{gate},min_point=1" and res["tokens"] == 60
    params = load_learned_gate(gate)
    assert params["threshold"] == 0.7 and len(params["w"]) == 5
    model = minee.load(tiny_with_tokenizer)
    out = minee.generate(model, "Hello there", 4, exit=res["spec"], stop_at_eos=False)
    assert len(out.exit_points) == 4 and min(out.exit_points[1:]) >= 1


def test_e5_size_scales_with_the_tokens_unless_given():
    assert analysis.e5_size(256) == (2, 16)
    assert analysis.e5_size(1024) == (2, 48)
    assert analysis.e5_size(4096) == (8, 48) == analysis.e5_size(100_000)
    assert analysis.e5_size(256, prompts=5, new_tokens=7) == (5, 7)
    assert analysis.e5_size(256, prompts=0) == (0, 16)


def test_corpus_ids_refuses_more_tokens_than_the_corpus_holds(tiny_with_tokenizer, tmp_path):
    model = minee.load(tiny_with_tokenizer)
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.")
    n = len(model.tokenizer.encode(text.read_text()))
    assert len(analysis.corpus_ids(model.tokenizer, text, n)) == len(analysis.corpus_ids(model.tokenizer, text)) == n
    for bad in (n + 1, 1, 0, -5):
        with pytest.raises(ValueError, match=f"holds {n} tokens"):
            analysis.corpus_ids(model.tokenizer, text, bad)
