"""Batched decoding, with and without early exit, prompts of different lengths, the queue
(generate_many): every row equals the same prompt decoded alone."""
import copy
import dataclasses
import json

import numpy as np
import pytest

import minee
import weights_tool
from minee.__main__ import main
from minee.cache import consecutive
from minee.exits import FEATURES, ExitDecoder, Gate, cosine
from minee.lens import log_softmax, logit_stats
from minee.ops import GEMM_MIN_ROWS, WIDE_MIN_ROWS, linear
from helpers import word_level_model, words


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_batch")
    weights_tool.make_random_model(path, layers=4, d_model=48, heads=4, kv_heads=2, ffn=96, vocab=120,
                                   untied=True, std=0.15, seed=3)
    return minee.load(path)


PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 8, 110, 1, 54, 60, 2], [64, 2, 33]]      # 5, 8 and 3 tokens
LAST = 7                                                                          # 4 layers: points 0 .. 7


def varied_gate(model):
    """A confidence gate whose threshold makes rows exit at different points."""
    _, acts = model.run_with_cache(np.array([p[:3] for p in PROMPTS]))
    probs = np.exp(log_softmax(model.unembed(acts["blocks.1.hook_resid_post"])))
    return Gate("confidence", float(np.median(probs.max(-1))), min_point=1)


def gates_of_every_kind(model):
    """One gate of every kind, each threshold the median of its feature after block 1 over the
    prompts' first positions, so that rows exit at different points."""
    _, acts = model.run_with_cache(np.array([p[:3] for p in PROMPTS]))
    after, before = acts["blocks.1.hook_resid_post"], acts["blocks.1.hook_resid_mid"]
    f = logit_stats(model.unembed(after))
    median = {name: float(np.median(f[name])) for name in ("confidence", "margin", "entropy")}
    learned = {"features": list(FEATURES), "mean": np.zeros(len(FEATURES)), "std": np.ones(len(FEATURES)),
               "w": np.array([20.0, 0, 0, 0, 0]), "b": -20.0 * median["confidence"], "threshold": 0.5}
    return [Gate("fixed", 3), Gate("confidence", median["confidence"], min_point=1),
            Gate("margin", median["margin"], min_point=1), Gate("entropy", median["entropy"], min_point=1),
            Gate("patience", 2), Gate("cosine", float(np.median(cosine(after, before))), min_point=1),
            Gate("learned", learned, min_point=1), Gate("oracle")]


def test_batch_without_exit_equals_rows_alone(model):
    batch = minee.generate_batch(model, PROMPTS, 10, stop_at_eos=False)
    for prompt, out in zip(PROMPTS, batch):
        assert out.tokens == minee.generate(model, prompt, 10, stop_at_eos=False).tokens


@pytest.mark.parametrize("kv", ["copy", "propagate", "compute"])
@pytest.mark.parametrize("kind", range(8), ids=["fixed", "confidence", "margin", "entropy", "patience", "cosine",
                                                "learned", "oracle"])
def test_batched_early_exit_equals_rows_alone(model, kind, kv):
    gate = gates_of_every_kind(model)[kind]
    batch = minee.generate_batch(model, PROMPTS, 10, exit=gate, kv=kv, stop_at_eos=False)
    points = set()
    for prompt, out in zip(PROMPTS, batch):
        alone = minee.generate(model, prompt, 10, exit=gate, kv=kv, stop_at_eos=False)
        assert out.tokens == alone.tokens
        assert out.exit_points == alone.exit_points
        points |= set(out.exit_points[1:])
    assert len(points) >= (1 if gate.kind == "fixed" else 3)          # rows really exit at different points


@pytest.mark.parametrize("kind", [1, 7], ids=["confidence", "oracle"])
def test_batched_exit_through_a_shortcut_equals_rows_alone(model, kind):
    """Decoding exits through linear shortcuts: rows of a batch, each exiting (and checking its
    gate) at its own points, equal each prompt alone; the shortcut products are counted per row."""
    sc = minee.shortcuts.fit(model, np.random.default_rng(0).integers(0, 120, 300), progress=False)
    gate = gates_of_every_kind(model)[kind]
    batch = minee.generate_batch(model, PROMPTS, 8, exit=gate, shortcut=sc, stop_at_eos=False)
    for prompt, out in zip(PROMPTS, batch):
        alone = minee.generate(model, prompt, 8, exit=gate, shortcut=sc, stop_at_eos=False)
        assert out.tokens == alone.tokens and out.exit_points == alone.exit_points
        assert out.stats["shortcut_calls_per_token"] == pytest.approx(alone.stats["shortcut_calls_per_token"])
    assert len({p for out in batch for p in out.exit_points[1:]}) >= 3


def test_sampled_rows_with_exit_follow_their_own_seeds(model):
    kw = dict(temperature=1.5, top_k=40, stop_at_eos=False, exit=varied_gate(model), kv="propagate")
    batch = minee.generate_batch(model, PROMPTS, 12, seed=[4, 5, 6], **kw)
    for prompt, s, out in zip(PROMPTS, [4, 5, 6], batch):
        alone = minee.generate(model, prompt, 12, seed=s, **kw)
        assert out.tokens == alone.tokens and out.exit_points == alone.exit_points


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
    with pytest.raises(ValueError, match="list of prompts"):
        minee.generate_batch(model, "w1 w2", 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        minee.generate_batch(model, [], 4)


def test_a_2d_array_of_ids_is_one_prompt_per_row_in_batch_and_queue(model):
    ids = np.array([PROMPTS[0][:3], PROMPTS[2]])                                # (2, 3): 2 prompts of 3 ids
    want = [minee.generate(model, row.tolist(), 4, stop_at_eos=False).tokens for row in ids]
    assert [o.tokens for o in minee.generate_batch(model, ids, 4, stop_at_eos=False)] == want
    assert [o.tokens for o in minee.generate_many(model, ids, max_new_tokens=4, stop_at_eos=False)] == want


@pytest.mark.parametrize("prompts", [np.array(PROMPTS[0]), PROMPTS[0]])
def test_one_sequence_of_ids_as_prompts_names_the_fix_in_batch_and_queue(model, prompts):
    for run in (lambda: minee.generate_batch(model, prompts, 4), lambda: minee.generate_many(model, prompts)):
        with pytest.raises(ValueError, match=r"bare token ids.*pass \[ids\] for one prompt.*2-D array \(B, T\)"):
            run()


# ------------------------------------------------------------------ exited rows drop out

@pytest.mark.parametrize("kv", ["copy", "propagate"])
def test_exited_rows_stop_computing(model, kv):
    """Each token computes exactly the sub-layers up to its own exit point (not up to the batch's
    slowest row), so a batch with exit computes fewer row-sub-layers than without; with
    kv="compute" every row runs every sub-layer. The tokens stay those of each prompt alone."""
    gate = varied_gate(model)
    dec = ExitDecoder(model, gate, kv)
    kv_cache = model.new_kv_cache(3, 20)
    for b, prompt in enumerate(PROMPTS):
        model.forward(prompt, kv_cache=kv_cache, rows=[b])
    tokens = [p[-1] for p in PROMPTS]
    steps = []
    for _ in range(6):
        logits, points = dec.step_batch(tokens, kv_cache)
        tokens = logits.argmax(-1)
        steps.append(points)
    points = np.concatenate(steps)
    assert len(set(points.tolist())) >= 3                            # rows exit at different points
    assert dec.stats.sublayers == (points + 1).tolist()              # counted per row and token
    assert sum(dec.stats.sublayers) < len(points) * (LAST + 1)       # fewer than without exit
    summary = dec.stats.summary(model.config)
    assert summary["mean_blocks_computed"] == pytest.approx(np.mean(points + 1) / 2)
    assert summary["mean_blocks_computed"] == pytest.approx(summary["mean_exit_depth"])

    full = ExitDecoder(model, gate, "compute")
    full.step_batch([p[-1] for p in PROMPTS], model.new_kv_cache(3, 20))
    assert full.stats.sublayers == [LAST + 1] * 3


def test_per_row_stats_of_a_batch_are_each_rows_own(model):
    gate = varied_gate(model)
    batch = minee.generate_batch(model, PROMPTS, 8, exit=gate, kv="copy", stop_at_eos=False)
    for prompt, out in zip(PROMPTS, batch):
        alone = minee.generate(model, prompt, 8, exit=gate, kv="copy", stop_at_eos=False)
        for key in ("prompt_tokens", "new_tokens", "mean_exit_point", "mean_blocks_computed",
                    "lm_head_calls_per_token", "flops_per_token"):
            assert out.stats[key] == pytest.approx(alone.stats[key]), key
    assert len({out.stats["mean_exit_point"] for out in batch}) > 1


def test_step_on_chosen_rows_leaves_the_others_alone(model):
    """step_batch(rows=[2, 0]) decodes cache rows 2 and 0 (in that order) and nothing else."""
    kv = model.new_kv_cache(3, 12)
    for b, prompt in enumerate(PROMPTS):
        model.forward(prompt, kv_cache=kv, rows=[b])
    keys = kv.keys.copy()
    dec = ExitDecoder(model, varied_gate(model), "propagate")
    logits, points = dec.step_batch([9, 4], kv, rows=[2, 0])
    assert kv.lengths.tolist() == [6, 8, 4]
    np.testing.assert_array_equal(kv.keys[:, 1], keys[:, 1])
    for j, (b, tok) in enumerate([(2, 9), (0, 4)]):
        alone = model.new_kv_cache(1, 12)
        model.forward(PROMPTS[b], kv_cache=alone)
        want_logits, want_point = ExitDecoder(model, varied_gate(model), "propagate").step(tok, alone)
        assert points[j] == want_point
        np.testing.assert_allclose(logits[j], want_logits, rtol=1e-5, atol=1e-5 * np.abs(want_logits).max())


# ------------------------------------------------------------------ the queue

def with_eos(model, eos):
    """The same model with `eos` as its end-of-sequence token."""
    m = copy.copy(model)
    m.config = dataclasses.replace(model.config, eos_token_ids=(eos,))
    return m


QUEUE = [[5, 17, 99, 3, 42], [7, 7, 8, 110, 1, 54, 60, 2], [64, 2, 33], [1], [90, 91, 92, 93],
         [12, 40, 40, 12, 8, 3, 77], [100, 3], [55, 66, 77, 88, 99, 110, 11, 22, 33]]


def eos_model(model, n, exit=None):
    """The model with an EOS that some of QUEUE's greedy continuations (with this exit gate)
    reach at different steps."""
    plain = minee.generate_batch(model, QUEUE, n, stop_at_eos=False, exit=exit)
    firsts = {}
    for out in plain:
        for step, t in enumerate(out.tokens[:-1]):
            firsts.setdefault(t, {}).setdefault(tuple(out.prompt_tokens), step)
    eos = max(firsts, key=lambda t: (len(set(firsts[t].values())), -len(firsts[t])))
    assert len(set(firsts[eos].values())) >= 2 and len(firsts[eos]) < len(QUEUE)
    return with_eos(model, eos)


@pytest.mark.parametrize("exit", [None, "varied"])
def test_queue_equals_generate_per_prompt(model, exit):
    """More prompts than slots; rows end at different steps (EOS at several steps, the others at
    max_new_tokens), so slots are refilled mid-run: every result equals generate for its prompt,
    in prompt order."""
    n = 9
    gate = None if exit is None else varied_gate(model)
    m = eos_model(model, n, gate)
    many = list(minee.generate_many(m, QUEUE, batch_size=3, max_new_tokens=n, exit=gate))
    assert len(many) == len(QUEUE)
    lengths = {len(out.tokens) for out in many}
    assert len(lengths) >= 3 and n in lengths                         # EOS at different steps and max length
    for prompt, out in zip(QUEUE, many):
        alone = minee.generate(m, prompt, n, exit=gate)
        assert out.prompt_tokens == prompt
        assert out.tokens == alone.tokens and out.exit_points == alone.exit_points


def test_queue_sampling_follows_each_prompts_seed(model):
    """Prompt i samples from seed s + i (or seed[i]) whatever slot it lands in and whenever."""
    m = eos_model(model, 8)
    kw = dict(max_new_tokens=8, temperature=1.2, top_p=0.9)
    many = list(minee.generate_many(m, QUEUE, batch_size=2, seed=40, **kw))
    for i, (prompt, out) in enumerate(zip(QUEUE, many)):
        assert out.tokens == minee.generate(m, prompt, seed=40 + i, **kw).tokens
    seeds = list(range(100, 100 + len(QUEUE)))[::-1]
    listed = list(minee.generate_many(m, QUEUE, batch_size=5, seed=seeds, **kw))
    for prompt, s, out in zip(QUEUE, seeds, listed):
        assert out.tokens == minee.generate(m, prompt, seed=s, **kw).tokens


def test_queue_yields_in_prompt_order_as_results_come(model):
    """A short prompt list behind a long one: results come in prompt order, and the first is
    available before the whole list is decoded."""
    m = eos_model(model, 9)
    outs = minee.generate_many(m, QUEUE, batch_size=2, max_new_tokens=9)
    first = next(outs)
    assert first.prompt_tokens == QUEUE[0]
    assert [o.prompt_tokens for o in outs] == QUEUE[1:]


def test_queue_errors_come_before_any_decoding(model):
    with pytest.raises(ValueError, match="batch_size"):
        minee.generate_many(model, QUEUE, batch_size=0)
    with pytest.raises(ValueError, match="list of prompts"):
        minee.generate_many(model, "w1 w2")
    with pytest.raises(ValueError, match="out of range"):               # the 3rd prompt, found before decoding
        minee.generate_many(model, [[1, 2], [3], [5000]], batch_size=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        minee.generate_many(model, QUEUE, max_new_tokens=0)


def test_queue_progress_bar(model, capsys):
    list(minee.generate_many(model, QUEUE, batch_size=2, max_new_tokens=2))
    assert "8/8" in capsys.readouterr().err                            # more prompts than slots: a bar
    list(minee.generate_many(model, QUEUE, batch_size=2, max_new_tokens=2, progress=False))
    list(minee.generate_many(model, QUEUE[:2], batch_size=2, max_new_tokens=2))
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ linear and the cache view

@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 1, 48), (3, 1, 48), (GEMM_MIN_ROWS, 1, 48), (9, 1, 48),
                                   (1, 7, 48), (2, 5, 48), (48,), (WIDE_MIN_ROWS - 1, 48), (WIDE_MIN_ROWS, 48)])
def test_linear_equals_matmul_for_every_number_of_rows(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((30, 48)).astype(np.float32)
    b = rng.standard_normal(30).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    got = linear(x, w, b)
    assert got.shape == shape[:-1] + (30,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(GEMM_MIN_ROWS, 576), (WIDE_MIN_ROWS - 1, 576), (WIDE_MIN_ROWS, 576),
                                   (2, WIDE_MIN_ROWS // 2, 576), (600, 576)])
def test_linear_with_many_rows_is_c_contiguous_and_equals_the_transposed_form(shape):
    """From WIDE_MIN_ROWS rows on, one GEMM written rows @ W.T: a C-contiguous (..., out) result, so
    that reductions over `out` (the vocabulary) walk contiguous memory (issues 19, 21); with any
    number of rows, equal to the (W @ rows.T).T form every GEMM used before up to float32 rounding.
    Tolerance: a float32 dot product of 576 terms errs by at most ~576 * 6e-8 = 3.5e-5 of the sum
    of |terms|, typically sqrt(576) times less; 1e-5 of the largest output is well above that and
    far below any real difference."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((1536, 576)).astype(np.float32)
    got = linear(x, w)
    before = (w @ x.reshape(-1, 576).T).T.reshape(*shape[:-1], 1536)
    assert got.shape == shape[:-1] + (1536,) and got.dtype == np.float32
    assert got.flags.c_contiguous == (x.size >= WIDE_MIN_ROWS * 576)
    np.testing.assert_allclose(got, before, rtol=0, atol=1e-5 * np.abs(before).max())


def test_cache_view_of_consecutive_rows_is_a_view():
    assert consecutive(None) == slice(None)
    assert consecutive([2, 3, 4]) == slice(2, 5)
    assert consecutive(np.array([1])) == slice(1, 2)
    assert consecutive([3, 1]).tolist() == [3, 1]
    assert consecutive([0, 2]).tolist() == [0, 2]


# ------------------------------------------------------------------ CLI --prompts-file

@pytest.fixture(scope="module")
def tokenized(model, tmp_path_factory):
    """The tiny model's directory with a word-level tokenizer ('w0' .. 'w119')."""
    return word_level_model(tmp_path_factory.mktemp("tiny_batch_tok"))


def test_cli_prompts_file_writes_one_json_line_per_prompt(tokenized, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(words(p) for p in QUEUE[:4]) + "\n\n" + words(QUEUE[4]) + "\n")
    rc = main(["generate", "--model", str(tokenized), "--prompts-file", str(f), "--batch-size", "2",
               "--max-new-tokens", "5", "--json", "--seed", "3", "--temperature", "1.0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [d["index"] for d in lines] == [0, 1, 2, 3, 4]
    assert [d["line"] for d in lines] == [1, 2, 3, 4, 6]                # the blank line 5 is skipped
    m = minee.load(tokenized)
    for i, (prompt, d) in enumerate(zip(QUEUE, lines)):
        assert d["prompt"] == words(prompt) and d["prompt_tokens"] == prompt
        assert d["tokens"] == minee.generate(m, prompt, 5, temperature=1.0, seed=3 + i).tokens


def test_cli_prompts_jsonl_keeps_newlines(tokenized, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps("w1 w2\nw3") + "\n" + json.dumps({"prompt": "w4\n\nw5"}) + "\n")
    rc = main(["generate", "--model", str(tokenized), "--prompts-file", str(f), "--max-new-tokens", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [d["prompt"] for d in lines] == ["w1 w2\nw3", "w4\n\nw5"]
    assert [d["prompt_tokens"] for d in lines] == [[1, 2, 3], [4, 5]]


@pytest.mark.parametrize("content,name,words_", [
    ("", "p.txt", "no prompts"),
    ("\n  \n", "p.txt", "no prompts"),
    ('"w1"\n{"prompt": 3}\n', "p.jsonl", "line 2"),
    ('"w1"\nw2\n', "p.jsonl", "line 2: not JSON"),
    ('{"prompt": "w1", "id": 4}\n', "p.jsonl", "exactly one key"),
    (b"w1 \xff\n", "p.txt", "not UTF-8"),
])
def test_cli_bad_prompts_file_is_one_clear_error(tokenized, tmp_path, capsys, content, name, words_):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = main(["generate", "--model", str(tokenized), "--prompts-file", str(f), "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert words_ in captured.err and str(f) in captured.err and len(captured.err.splitlines()) == 1


def test_cli_prompts_file_errors_before_any_output(tokenized, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("w1 w2\nw3\n")
    for argv, words_ in [(["--batch-size", "0"], "--batch-size"), (["--temperature", "-1"], "temperature"),
                         (["--max-new-tokens", "100000"], "context")]:
        rc = main(["generate", "--model", str(tokenized), "--prompts-file", str(f), *argv])
        captured = capsys.readouterr()
        assert rc == 2 and captured.out == "" and words_ in captured.err, argv
    rc = main(["generate", "--model", str(tokenized), "--prompts-file", str(tmp_path / "missing.txt")])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err
    rc = main(["generate", "--model", str(tokenized), "--prompt", "w1", "--batch-size", "4"])
    assert rc == 2 and "--prompts-file" in capsys.readouterr().err
