"""The command line as a newcomer meets it: every bad argument is one line on stderr (exit code 2)
before anything is printed, the text and its summary line say what ran and what it cost, and
options that would be silently ignored are refused."""
import json

import numpy as np
import pytest

import minee
import weights_tool
from minee.__main__ import main

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random model with the byte-level tokenizer weights_tool writes (4 blocks, 8 exit points)."""
    path = tmp_path_factory.mktemp("byte_model")
    weights_tool.make_random_model(path, layers=4, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=300, std=0.3)
    return path


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `python -m minee ARGV`."""
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def refused(capsys, argv, *words):
    """The command fails with exit code 2, prints nothing on stdout and one line on stderr naming `words`."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minee: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------ generate: arguments checked first

@pytest.mark.parametrize("extra, words", [
    (["--max-new-tokens", "-1"], ["max_new_tokens", ">= 1", "-1"]),
    (["--max-new-tokens", "0"], ["max_new_tokens", ">= 1"]),
    (["--temperature", "nan"], ["temperature", "finite", "nan"]),
    (["--temperature", "inf"], ["temperature", "finite"]),
    (["--temperature", "-1"], ["temperature", ">= 0"]),
    (["--temperature", "1", "--top-p", "nan"], ["top_p", "(0, 1]"]),
    (["--temperature", "1", "--seed", "-3"], ["--seed", ">= 0"]),
    (["--top-k", "5"], ["top_k", "temperature > 0"]),                  # item 15: not silently ignored
    (["--top-p", "0.9"], ["top_p", "temperature > 0"]),
    (["--kv", "propagate"], ["--kv propagate", "--exit"]),
    (["--exit", "confidence:1.5"], ["confidence:1.5", "(0, 1]"]),
    (["--exit", "entropy:-1"], ["entropy", ">= 0"]),
    (["--exit", "confidence:0.9,check_every=0"], ["check_every", ">= 1"]),
    (["--exit", "confidence:0.9,min_point=500"], ["min_point=500", "min_point=0 .. 6"]),
    (["--exit", "confidence:0.9,min_point=7"], ["min_point=7", "full model"]),
    (["--exit", "patience:9"], ["patience:9", "checks only 3"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_generate_refuses_bad_arguments_before_printing(byte_model, capsys, extra, words):
    refused(capsys, ["generate", "--model", str(byte_model), "--prompt", "hello", *extra], *words)


def test_kv_and_sampling_options_work_where_they_apply(byte_model, capsys):
    """The same options are accepted where they do something (control for the refusals above)."""
    rc, out, err = run(capsys, "generate", "--model", str(byte_model), "--prompt", "hello", "--max-new-tokens", "3",
                       "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "1")
    assert rc == 0, err
    rc, out, err = run(capsys, "generate", "--model", str(byte_model), "--prompt", "hello", "--max-new-tokens", "3",
                       "--exit", "fixed:3", "--kv", "propagate", "--json")
    assert rc == 0 and json.loads(out)["stats"]["kv"] == "propagate"


def test_python_api_refuses_ignored_options(byte_model):
    model = minee.load(byte_model)
    with pytest.raises(ValueError, match="temperature > 0"):
        minee.generate(model, "hello", 3, top_k=5)
    with pytest.raises(ValueError, match="exit gate"):
        minee.generate(model, "hello", 3, kv="propagate")


# ------------------------------------------------------------------ generate: what is printed

def test_one_new_token_with_a_gate_prints_a_summary_not_an_error(byte_model, capsys):
    """--max-new-tokens 1: the only token comes from the prompt's pass, so no token was decoded with
    the gate; the summary says so instead of failing to format missing figures (exit code 0)."""
    rc, out, err = run(capsys, "generate", "--model", str(byte_model), "--prompt", "hello",
                       "--max-new-tokens", "1", "--exit", "confidence:0.5")
    assert rc == 0, err
    assert out.startswith("hello") and out.endswith("\n")
    assert "error" not in err and "no token was decoded" in err


def test_eos_as_first_token_with_a_gate(byte_model, tmp_path, capsys):
    """The same when generation stops at EOS right after the prompt."""
    model = minee.load(byte_model)
    first = minee.generate(model, "hello", 1).tokens[0]
    eos_dir = tmp_path / "eos"
    eos_dir.mkdir()
    for f in byte_model.iterdir():
        (eos_dir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((byte_model / "config.json").read_text())
    (eos_dir / "config.json").write_text(json.dumps({**cfg, "eos_token_id": int(first)}))
    rc, out, err = run(capsys, "generate", "--model", str(eos_dir), "--prompt", "hello", "--exit", "confidence:0.5")
    assert rc == 0, err
    assert "1 new" in err and "no token was decoded" in err


def test_summary_line_shows_depth_blocks_computed_and_lm_head_calls(byte_model, capsys):
    argv = ["generate", "--model", str(byte_model), "--prompt", "hello", "--max-new-tokens", "6"]
    _, _, plain = run(capsys, *argv)
    assert "4.0 of 4 blocks computed, 1.0 LM-head calls per token" in plain
    _, _, copy = run(capsys, *argv, "--exit", "fixed:3")
    assert "exit fixed:3 kv=copy: exit depth 2.0 blocks, 2.0 of 4 blocks computed, 1.0 LM-head calls" in copy
    _, _, compute = run(capsys, *argv, "--exit", "fixed:3", "--kv", "compute")
    assert "exit depth 2.0 blocks, 4.0 of 4 blocks computed" in compute          # every block ran
    _, _, conf = run(capsys, *argv, "--exit", "confidence:0.99,min_point=0")    # never confident: 7 checks + 1
    assert "8.0 LM-head calls per token" in conf
    _, _, oracle = run(capsys, *argv, "--exit", "oracle")
    assert "hindsight" in oracle


def test_plain_json_stats_have_the_exit_fields(byte_model, capsys):
    rc, out, _ = run(capsys, "generate", "--model", str(byte_model), "--prompt", "hello", "--max-new-tokens", "4",
                     "--json")
    s = json.loads(out)["stats"]
    assert (s["mean_exit_point"], s["mean_exit_depth"], s["mean_blocks_computed"]) == (7, 4, 4)
    assert s["share_early"] == 0 and s["lm_head_calls_per_token"] == 1 and s["hindsight"] is False
    assert s["flops_per_token"] > 0


def test_chat_prints_the_reply_on_its_own(smollm2_dir, capsys):
    question = "What is the capital of France?"
    argv = ["generate", "--model", str(smollm2_dir), "--prompt", question, "--chat", "--max-new-tokens", "8"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    _, js, _ = run(capsys, *argv, "--json")
    reply = json.loads(js)["text"]
    assert "Paris" in reply
    assert out == reply + "\n"                     # the question is not run into the answer


def test_smollm2_confidence_gate_does_not_exit_at_the_first_points(smollm2_dir, capsys):
    """The issue's case: `--exit confidence:0.9` printed "Paris Paris Paris" at 0.5 blocks per token,
    because the lens repeats the input token at the first points. Gates now start at point 39."""
    rc, out, _ = run(capsys, "generate", "--model", str(smollm2_dir), "--prompt", PROMPT, "--max-new-tokens", "6",
                     "--exit", "confidence:0.9", "--json")
    res = json.loads(out)
    assert rc == 0
    assert min(res["exit_points"]) >= 39
    assert res["stats"]["gate"] == "confidence:0.9,min_point=39"
    assert res["text"].startswith(" Paris.") and "Paris Paris" not in res["text"]


# ------------------------------------------------------------------ lens, analyze, train-gate: arguments

@pytest.mark.parametrize("extra, words", [
    (["--metric", "colour"], ["colour", "entropy", "final_prob"]),
    (["--top-k", "0"], ["--top-k", ">= 1"]),
    (["--out", "/nonexistent-dir/lens.png"], ["/nonexistent-dir", "does not exist"]),
])
def test_lens_refuses_bad_arguments(byte_model, capsys, extra, words):
    refused(capsys, ["lens", "--model", str(byte_model), "--prompt", "hello", *extra], *words)


@pytest.mark.parametrize("extra, words", [
    (["--max-tokens", "-5"], ["--max-tokens", ">= 2", "'all'"]),
    (["--max-tokens", "0"], ["--max-tokens", ">= 2"]),
    (["--max-tokens", "lots"], ["--max-tokens", "lots"]),
    (["--max-tokens", "100000000"], ["100000000", "corpus", "tokens"]),
    (["--window", "0"], ["window", ">= 1"]),
    (["--gen-prompts", "-1"], ["gen_prompts", ">= 0"]),
    (["--gen-tokens", "0"], ["gen_tokens", ">= 1"]),
    (["--corpus", "/nonexistent/corpus.txt"], ["/nonexistent/corpus.txt", "not found"]),
])
def test_analyze_refuses_bad_arguments_before_any_work(byte_model, tmp_path, capsys, extra, words):
    refused(capsys, ["analyze", "--model", str(byte_model), "--out", str(tmp_path / "an"), *extra], *words)
    assert not (tmp_path / "an").exists()


@pytest.mark.parametrize("command", [["analyze", "--out", "an"], ["train-gate", "--out", "g.json"],
                                     ["shortcuts", "fit", "--out", "sc.npz"]])
def test_a_missing_corpus_is_refused_before_the_model_is_loaded(tmp_path, capsys, command):
    """A mistyped --corpus is named at once, not after loading (and here, failing to load) the model."""
    *cmd, out = command
    refused(capsys, [*cmd, str(tmp_path / out), "--model", str(tmp_path / "no-such-model"),
                     "--corpus", str(tmp_path / "missing.txt")], str(tmp_path / "missing.txt"), "not found")


@pytest.mark.parametrize("extra, words", [
    (["--min-point", "100"], ["--min-point", "0 to 6", "100"]),
    (["--min-point", "7"], ["--min-point", "full model"]),
    (["--min-point", "-1"], ["--min-point"]),
    (["--threshold", "1.5"], ["--threshold", "(0, 1)"]),
    (["--threshold", "nan"], ["--threshold"]),
    (["--max-tokens", "1"], ["--max-tokens", ">= 2"]),
])
def test_train_gate_refuses_bad_arguments_and_writes_nothing(byte_model, tmp_path, capsys, extra, words):
    """The issue's `--min-point 100` wrote a gate full of NaN and exited 0."""
    gate = tmp_path / "g.json"
    refused(capsys, ["train-gate", "--model", str(byte_model), "--out", str(gate), "--max-tokens", "64", *extra],
            *words)
    assert not gate.exists()


def test_analyze_small_run_bounds_e5_and_shows_every_stage(byte_model, tmp_path, capsys):
    """--max-tokens bounds the whole run, E5 included, and every stage has a progress bar."""
    rc, out, err = run(capsys, "analyze", "--model", str(byte_model), "--out", str(tmp_path / "an"),
                       "--max-tokens", "256", "--window", "128")
    assert rc == 0, err
    res = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert (res["e5"]["prompts"], res["e5"]["new_tokens"]) == (2, 16)
    for stage in ("teacher-forced", "E1-E4, E6", "E5 generation", "figures"):
        assert f"{stage}: 100%" in err, stage
    assert "E5 agreement with plain greedy output (2 prompts x 16 tokens, oracle exits)" in out
    assert np.isfinite(res["e1"]["perplexity"])
