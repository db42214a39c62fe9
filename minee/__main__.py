"""Command line: python -m minee generate|lens ... (every command has --json)."""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

import minee
from minee.config import read_text
from minee.exits import KV_MODES
from minee.generate import check_prompt, check_sampling, encode_prompt
from minee.hooks import point_label
from minee.limits import MAX_PROMPT_BYTES, out_of_memory_message
from minee.parallel import dask_cluster
from minee.shortcuts import DEFAULT_RIDGE
from minee.speculative import DEFAULT_K, draft_decoder
from minee.threads import default_threads

DEFAULT_MODEL = "smollm2-135m"


def load_with_tokenizer(name, why):
    """minee.load(name), or an error if the model has no tokenizer (every text command needs one)."""
    model = minee.load(name)
    if model.tokenizer is None:
        raise ValueError(f"{name} has no tokenizer.json, so {why}")
    return model


def load_shortcut(args, model):
    """The --shortcut file checked against the model, or None."""
    return None if args.shortcut is None else minee.shortcuts.load(args.shortcut, model)


def cmd_generate(args):
    from .exits import parse_gate
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.speculative and args.exit:
        raise ValueError("--speculative drafts with its own gate and keeps the full model's tokens; "
                         "drop --exit (or drop --speculative to early-exit without verification)")
    if args.k is not None and not args.speculative:
        raise ValueError("--k sets how many tokens --speculative drafts per cycle; add --speculative DRAFT")
    if args.kv is not None and args.exit is None:
        raise ValueError(f"--kv {args.kv} fills the keys/values of blocks that an early exit skips; "
                         "add --exit GATE (e.g. --exit confidence:0.9) or leave --kv out")
    if args.shortcut and not (args.exit or args.speculative):
        raise ValueError("--shortcut changes how early exits are decoded; give an --exit or --speculative gate too")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be a whole number >= 0, got {args.seed}")
    for gate in (args.exit, args.speculative):
        if gate is not None:
            parse_gate(gate)                        # a bad gate or gate file fails before the model loads
    if args.prompts_file is not None:
        if args.speculative:
            raise ValueError("--speculative decodes one prompt; give --prompt instead of --prompts-file")
        return cmd_generate_many(args)
    if args.batch_size is not None:
        raise ValueError("--batch-size sets how many of --prompts-file's prompts decode together; "
                         "give --prompts-file FILE or leave --batch-size out")
    model = load_with_tokenizer(args.model, "minee cannot encode a text prompt")
    shortcut = load_shortcut(args, model)
    k = DEFAULT_K if args.k is None else args.k
    if args.speculative:                                   # errors before any output
        draft_decoder(model, args.speculative, k, shortcut)
    started = []

    def stream(piece):
        """Print the prompt (not with --chat: the reply stands on its own), then each piece. Called
        only once generate() has checked every argument, so an error never follows printed text."""
        if not started and not args.chat:
            print(args.prompt, end="")
        started.append(True)
        print(piece, end="", flush=True)

    on_text = None if args.json else stream
    if args.speculative:
        out = minee.speculative_generate(model, args.prompt, args.max_new_tokens, draft=args.speculative, k=k,
                                         shortcut=shortcut, temperature=args.temperature, seed=args.seed,
                                         top_k=args.top_k, top_p=args.top_p, chat=args.chat, on_text=on_text)
    else:
        out = minee.generate(model, args.prompt, args.max_new_tokens, on_text=on_text,
                             **sampling_options(args, shortcut))
    if args.json:
        print(json.dumps(result_json(args, args.prompt, out), indent=2))
    else:
        print()                                     # the text ends its line on stdout
        print(f"[{summary_line(out.stats, model.config.n_layers, args.threads)}]", file=sys.stderr)


def summary_line(s, n_layers, threads):
    """The generation's one-line summary: sizes, speed, and what each decoded token cost (or, for
    speculative decoding, how many drafts the full model accepted)."""
    rate = f", {s['decode_tokens_per_s']:.1f} tokens/s" if s["decode_tokens_per_s"] else ""
    line = f"{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new{rate}, {threads} BLAS thread(s)"
    if "draft" in s:
        line += f"; speculative {s['draft']}" + (f" through {s['shortcut']}" if s["shortcut"] else "") + f" k={s['k']}"
        if not s["drafted"]:
            return line + "; nothing was drafted"
        return (f"{line}: {s['accepted']} of {s['drafted']} drafts accepted ({s['acceptance_rate']:.0%}), "
                f"{s['tokens_per_cycle']:.2f} tokens per cycle")
    if "gate" in s:
        line += f"; exit {s['gate']} kv={s['kv']}" + (f" through {s['shortcut']}" if s["shortcut"] else "")
    if s["mean_exit_depth"] is None:
        return line + "; the only new token came from the prompt's pass, so no token was decoded"
    cost = (f"{s['mean_blocks_computed']:.1f} of {n_layers} blocks computed, "
            f"{s['lm_head_calls_per_token']:.1f} LM-head calls per token")
    if "gate" not in s:
        return f"{line}; {cost}"
    if s["hindsight"]:
        cost = f"hindsight costs of an ideal gate: {cost}"
    return f"{line}: exit depth {s['mean_exit_depth']:.1f} blocks, {cost}"


def cmd_generate_many(args):
    """--prompts-file: every prompt of the file through minee.generate_many, results in file order."""
    batch_size = 16 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    lines, prompts = zip(*read_prompts(args.prompts_file))
    model = load_with_tokenizer(args.model, "minee cannot encode a text prompt")
    for line, prompt in zip(lines, prompts):                 # before any is tokenized
        check_prompt(model, prompt, f"the prompt on line {line} of prompts file {args.prompts_file}")
    shortcut = load_shortcut(args, model)
    t0 = time.perf_counter()
    outs = minee.generate_many(model, prompts, batch_size, args.max_new_tokens, **sampling_options(args, shortcut))
    new_tokens = 0
    for i, (line, prompt, out) in enumerate(zip(lines, prompts, outs)):
        new_tokens += len(out.tokens)
        if args.json:
            print(json.dumps({"index": i, "line": line, **result_json(args, prompt, out)}), flush=True)
        else:
            print(f"{prompt}{chr(10) if args.chat else ''}{out.text}\n", flush=True)   # --chat: the reply on its own line
    seconds = time.perf_counter() - t0
    if not args.json:
        print(f"[{len(prompts)} prompts from {args.prompts_file}, {new_tokens} new tokens in {seconds:.1f} s "
              f"({new_tokens / seconds:.1f} tokens/s), batch size {batch_size}, {args.threads} BLAS thread(s)]",
              file=sys.stderr)


def sampling_options(args, shortcut):
    """generate's sampling and early-exit keyword arguments from the command line."""
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=args.chat,
                exit=args.exit, kv=args.kv, shortcut=shortcut)


def result_json(args, prompt, out):
    """One generation as the JSON object --json prints."""
    return {"model": args.model, "prompt": prompt, "prompt_tokens": out.prompt_tokens, "tokens": out.tokens,
            "text": out.text, "exit_points": out.exit_points, "threads": args.threads, "stats": out.stats}


def read_prompts(path):
    """[(line number, prompt)] from a prompts file, checked before anything runs.

    One prompt per line; blank lines are skipped. In a file whose name ends in .jsonl each line
    is JSON: a string, or an object {"prompt": "..."}; write a newline inside a prompt as \\n
    there. In any other file each line is the prompt's text as it is. The file may hold at most
    MAX_TEXT_BYTES and a line at most MAX_PROMPT_BYTES (each prompt is checked against the model's
    own limit once it is loaded, see check_prompt).
    """
    try:
        text = read_text(path, ValueError)
    except OSError as e:
        raise OSError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    jsonl = str(path).endswith(".jsonl")
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if (size := len(line.encode())) > MAX_PROMPT_BYTES:
            raise ValueError(f"prompts file {path}, line {n}: {size:,} bytes; a prompt may hold at most "
                             f"{MAX_PROMPT_BYTES:,}")
        if line.strip():
            prompts.append((n, json_prompt(path, n, line) if jsonl else line))
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (one per line)")
    return prompts


def json_prompt(path, n, line):
    """The prompt on line n of a .jsonl prompts file: a JSON string or {"prompt": string}."""
    where = f"prompts file {path}, line {n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}); in a .jsonl file every line "
                         'is a JSON string such as "Once upon a time" or an object {"prompt": "..."}') from None
    if isinstance(item, dict):
        if set(item) != {"prompt"}:
            raise ValueError(f'{where}: an object must hold exactly one key, "prompt" (got {sorted(item)})')
        item = item["prompt"]
    if not isinstance(item, str) or not item:
        raise ValueError(f"{where}: the prompt must be a non-empty string, got {item!r}")
    return item


def cmd_lens(args):
    from .lens import METRICS, lens
    if args.metric not in METRICS:
        raise ValueError(f"unknown metric {args.metric!r}; choose from {', '.join(METRICS)}")
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (tokens listed per cell), got {args.top_k}")
    for path in (args.out, args.html):
        if path:
            check_output_file(path)
    model = load_with_tokenizer(args.model, "minee cannot encode a text prompt")
    shortcut = load_shortcut(args, model)
    ids = encode_prompt(model, args.prompt)
    result = lens(model, ids, k=args.top_k)
    through = shortcut and lens(model, ids, k=args.top_k, shortcut=shortcut)
    if args.out:
        from .plots import plot_lens
        points = range(1, len(result.points), 2) if args.blocks_only else None
        plot_lens(result, model.tokenizer, args.metric, points=points, out=args.out, shortcut=through)
    if args.html:
        result.save_html(args.html, shortcut=through, metric=args.metric, title=f"minee logit lens: {args.model}")
    if args.json:
        print(json.dumps({"model": args.model, "prompt": args.prompt, "figure": args.out, "page": args.html,
                          **result.to_json(model.tokenizer),
                          "through_shortcut": through and through.to_json(model.tokenizer)}))
        return
    for r in [result] + ([through] if through else []):
        print_lens(r, model.tokenizer, args.metric)
    for path, what in ((args.out, "figure"), (args.html, "interactive page")):
        if path:
            print(f"{what} written to {path}", file=sys.stderr)


def check_output_file(path):
    """A figure, page or gate file can be written there: its directory exists and the path is not a
    directory (checked before the work)."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: its directory does not exist ({parent})")
    if Path(path).expanduser().is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; give a file name")


def token_limit(text):
    """--max-tokens: a whole number >= 2, or 'all' (None)."""
    if text == "all":
        return None
    if not text.lstrip("-").isdigit() or int(text) < 2:
        raise ValueError(f"--max-tokens must be a whole number >= 2 (an input and its next token) or 'all', "
                         f"got {text!r}")
    return int(text)


def print_lens(result, tok, metric):
    """The lens as a table: one line per exit point, deepest first."""
    print(f"{'point':>8}  {result.shortcut or 'plain lens'}: top-1 prediction after each input token "
          f"({metric} in brackets)")
    for p in reversed(range(len(result.points))):
        cells = [f"{tok.decode([t])!r}[{v:.2f}]" for t, v in
                 zip(result.top_ids[p, :, 0], result.metrics[metric][p])]
        print(f"{result.labels[p]:>8}  " + " ".join(cells))
    print(f"{'input':>8}  " + " ".join(repr(s) for s in result.token_strings))


def cmd_analyze(args):
    from .analysis import analyze, check_run_sizes, corpus_file
    max_tokens = token_limit(args.max_tokens)
    check_run_sizes(args.window, args.gen_prompts, args.gen_tokens)
    corpus_file(args.corpus)
    model = load_with_tokenizer(args.model, "the analysis cannot encode a text corpus")
    shortcut = load_shortcut(args, model)
    res = analyze(model, args.out, corpus=args.corpus, max_tokens=max_tokens, window=args.window,
                  gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens, progress=not args.json,
                  reuse=args.reuse, skip_tokens=args.skip_tokens, shortcut=shortcut, workers=args.workers)
    if args.json:
        print(json.dumps(res))
        return
    e1, e4 = res["e1"], res["e4"]
    print(f"{e1['tokens']} tokens, perplexity {e1['perplexity']:.2f}, final top-1 accuracy "
          f"{e1['final_accuracy']:.1%}")
    print(f"E1 stable oracle: {e1['share_needing_last_point']:.1%} of tokens need the last point, "
          f"mean {e1['mean_layers_stable']:.1f} layers (saving {e1['saving_stable']:.1%}); "
          f"first match: mean {e1['mean_layers_first_match']:.1f} layers")
    best = min((r for r in res["e2"] if r["exit_error"] <= 0.05 and not r["gate"].startswith("oracle")),
               key=lambda r: r["mean_exit_depth"], default=None)
    if best:
        print(f"E2 cheapest gate with exit error <= 5%: {best['gate']} (exit depth {best['mean_exit_depth']:.1f} blocks)")
    for name, r in res["e3"].items():
        print(f"E3 {name}: {r['tokens']} tokens, mean stable point {r['mean_stable_point']:.1f}, "
              f"{r['share_needing_last_point']:.1%} need the last point")
    print(f"E4 {e4['stable_at_attention']:.1%} of stable exits are after an attention sub-layer")
    if res["e5"]:
        e5 = res["e5"]
        print(f"E5 agreement with plain greedy output ({e5['prompts']} prompts x {e5['new_tokens']} tokens, "
              f"{e5['gate']} exits): " + ", ".join(f"kv={kv} {e5[kv]['agreement']:.1%}" for kv in KV_MODES))
    if shortcut:
        sc, mid = res["shortcut"]["e1"], e1["points"] // 2 - 1                  # after half the blocks
        print(f"through {res['shortcut']['label']}: agreement at {point_label(mid)} {e1['agree'][mid]:.1%} -> "
              f"{sc['agree'][mid]:.1%}; stable oracle saving {e1['saving_stable']:.1%} -> {sc['saving_stable']:.1%}")
    print(f"figures and analysis.json written to {args.out}", file=sys.stderr)


def cmd_train_gate(args):
    from .analysis import check_run_sizes, corpus_file, corpus_ids, gate_training_data, teacher_forced
    from .exits import check_threshold, default_min_point, save_learned_gate, train_learned_gate
    max_tokens = token_limit(args.max_tokens)
    check_run_sizes(args.window)
    corpus_file(args.corpus)
    check_threshold(args.threshold, "--threshold")
    check_output_file(args.out)
    model = load_with_tokenizer(args.model, "training the gate cannot encode a text corpus")
    P = 2 * model.config.n_layers
    min_point = default_min_point(P) if args.min_point is None else args.min_point
    if not 0 <= min_point <= P - 2:
        raise ValueError(f"--min-point must be an exit point from 0 to {P - 2} (the last point, {P - 1}, is the "
                         f"full model and never a candidate), got {min_point}")
    ids = corpus_ids(model.tokenizer, args.corpus, max_tokens, args.skip_tokens)
    tf, ppl = teacher_forced(model, ids, window=args.window, progress=not args.json, workers=args.workers)
    feats, labels = gate_training_data(tf, np.arange(min_point, P - 1))
    params = train_learned_gate(feats, labels, threshold=args.threshold)
    save_learned_gate(params, args.out)
    spec = f"learned:{args.out},min_point={min_point}"
    if args.json:
        print(json.dumps({"out": args.out, "spec": spec, "tokens": int(len(ids)), "perplexity": ppl,
                          "positive_share": float(labels.mean())}))
    else:
        print(f"trained on {len(ids)} tokens x {P - 1 - min_point} points "
              f"({labels.mean():.1%} safe exits); use it with --exit {spec}")


def cmd_shortcuts_fit(args):
    from .analysis import check_run_sizes, corpus_file, corpus_ids
    from .shortcuts import check_ridge, fit, refine
    max_tokens = token_limit(args.max_tokens)
    check_output_file(args.out)
    check_run_sizes(args.window)
    corpus_file(args.corpus)
    check_ridge(args.ridge)
    if args.kl_steps < 0 or args.skip_tokens < 0:
        raise ValueError("--kl-steps (0 = least squares only) and --skip-tokens must be >= 0")
    model = minee.load(args.model)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; fitting shortcuts encodes a text corpus")
    ids = corpus_ids(model.tokenizer, args.corpus, max_tokens, args.skip_tokens)
    P = 2 * model.config.n_layers
    first = P // 3 - 1 if args.kl_min_point is None else args.kl_min_point
    if args.kl_steps and (min(args.kl_batch, args.kl_tokens) < 1 or args.kl_lr <= 0 or not 0 <= first < P - 1):
        raise ValueError(f"--kl-batch and --kl-tokens must be >= 1, --kl-lr > 0 and --kl-min-point in "
                         f"0 .. {P - 2}")                 # checked before the fit, not after it
    sc = fit(model, ids, ridge=args.ridge, window=args.window, progress=not args.json, workers=args.workers)
    if args.kl_steps:
        sc = refine(model, sc, ids, points=range(first, P - 1), steps=args.kl_steps, batch=args.kl_batch,
                    lr=args.kl_lr, tokens=args.kl_tokens, window=args.window, progress=not args.json)
    sc.save(args.out)
    if args.json:
        print(json.dumps({"out": args.out, **sc.meta}))
    else:
        print(f"fitted {len(sc.meta['points'])} exit points on {sc.meta['tokens']} tokens "
              f"(method {sc.meta['method']}, ridge {sc.meta['ridge']}); use it with --shortcut {args.out}")


def parser():
    p = argparse.ArgumentParser(prog="python -m minee", description=minee.__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd):
        cmd.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"model directory or known name (default {DEFAULT_MODEL}, fetched on first use)")
        cmd.add_argument("--threads", type=int, default=None,
                         help="BLAS threads (default: $MINEE_THREADS, else 1; single-token decode is "
                              "memory-bound and extra threads often slow it down on small shared machines)")
        cmd.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    g = sub.add_parser("generate", help="continue a prompt, streaming tokens, or every prompt of a file")
    common(g)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="one prompt per line (in a .jsonl file: a JSON string or {\"prompt\": ...} per line, "
                           "for prompts with newlines); decoded in batches, printed in file order "
                           "(--json: one JSON object per line)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="with --prompts-file: prompts decoded together (default 16); a finished row "
                        "takes the next prompt at once")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (needs --temperature)")
    g.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set with probability >= P (needs --temperature)")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (>= 0); with --prompts-file, prompt i uses seed + i")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template and print only the reply")
    g.add_argument("--exit", metavar="GATE", default=None,
                   help="early exit gate: fixed:P, confidence:T, margin:T, entropy:T, patience:K, "
                        "cosine:T, learned:PATH or oracle; options: ,min_point=N ,check_every=N "
                        ",attn_points=0. Gates check from min_point on; by default from the start of the "
                        "network's last third (point 39 of SmolLM2's 60, after block 19), because at the "
                        "first points the lens repeats the input token. e.g. confidence:0.9 or "
                        "entropy:0.5,min_point=41,attn_points=0")
    g.add_argument("--kv", choices=KV_MODES, default=None,
                   help="with --exit: keys/values of the blocks an early-exited token skips (default copy)")
    g.add_argument("--speculative", metavar="DRAFT", default=None,
                   help="self-speculative decoding: draft tokens by early exit at this gate (e.g. fixed:39, "
                        "after block 19) and keep only what the full model confirms: greedy output is "
                        "plain decoding's, token for token")
    g.add_argument("--k", type=int, default=None,
                   help=f"tokens drafted per cycle with --speculative (default {DEFAULT_K})")
    shortcut_option(g, "decode early exits (--exit) or drafts (--speculative) through these shortcuts")
    g.set_defaults(run=cmd_generate)

    le = sub.add_parser("lens", help="logit lens: what every exit point predicts")
    common(le)
    le.add_argument("--prompt", required=True)
    le.add_argument("--out", help="write the heatmap to this PNG")
    le.add_argument("--html", metavar="FILE",
                    help="write the interactive lens to this HTML page: hover a cell for its top tokens, click "
                         "one to follow it across the exit points; one self-contained file that works offline")
    le.add_argument("--metric", default="entropy",
                    help="cell colour (the page's first colour): entropy (default), kl, final_prob, final_rank, "
                         "agree, accuracy")
    le.add_argument("--top-k", type=int, default=5, help="top-k tokens per cell in --json and --html")
    le.add_argument("--blocks-only", action="store_true",
                    help="plot only block outputs (odd points), not the after-attention points")
    shortcut_option(le, "also read every point through these shortcuts (drawn side by side; a toggle on the page)")
    le.set_defaults(run=cmd_lens)

    def corpus(cmd, max_tokens):
        cmd.add_argument("--corpus", default=None, help="text file (default: minee's evaluation corpus)")
        cmd.add_argument("--max-tokens", default=str(max_tokens),
                         help=f"corpus tokens to use: a number >= 2 or 'all' (default {max_tokens})")
        cmd.add_argument("--skip-tokens", type=int, default=0,
                         help="start after this many corpus tokens (e.g. those shortcuts were fitted on)")
        cmd.add_argument("--window", type=int, default=256, help="tokens scored per forward pass (default 256)")
        cmd.add_argument("--workers", type=int, default=None,
                         help="processes computing windows side by side, each holding a copy of the model "
                              "(default 1: none started; -1 = one per core)")
        cmd.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                         help="compute the windows on the workers of this Dask cluster (e.g. tcp://host:8786; "
                              "pip install minee[dask]); they need minee and the model at the same path")

    an = sub.add_parser("analyze", help="the paper's experiments E1-E6 over a corpus, to JSON + PNG")
    common(an)
    corpus(an, 4096)
    an.add_argument("--out", required=True, help="output directory")
    an.add_argument("--gen-prompts", type=int, default=None,
                    help="prompts for E5 generation (0 = skip E5; default: scaled with --max-tokens, "
                         "2 for 256 tokens up to 8 from 4096 on)")
    an.add_argument("--gen-tokens", type=int, default=None,
                    help="tokens generated per E5 prompt (default: scaled with --max-tokens, "
                         "16 for 256 tokens up to 48 from 768 on)")
    an.add_argument("--reuse", action="store_true",
                    help="reuse OUT/teacher_forced.npz from an earlier run on the same tokens")
    shortcut_option(an, "also run E1, E2 and E5 through these shortcuts")
    an.set_defaults(run=cmd_analyze)

    tg = sub.add_parser("train-gate", help="train the learned early-exit gate on teacher-forced corpus data")
    common(tg)
    corpus(tg, 2048)
    tg.add_argument("--out", required=True, help="gate file to write (JSON), for --exit learned:OUT")
    tg.add_argument("--min-point", type=int, default=None,
                    help="train on exit points from this one on (default: the start of the last third, "
                         "as for the gates)")
    tg.add_argument("--threshold", type=float, default=0.8,
                    help="exit when P(exit gives the final token) >= this (stored in the file)")
    tg.set_defaults(run=cmd_train_gate)

    sh = sub.add_parser("shortcuts", help="linear shortcuts from every exit point to the last state")
    fit = sh.add_subparsers(dest="action", required=True).add_parser(
        "fit", help="fit the maps by least squares (optionally refined on KL) on a corpus")
    common(fit)
    corpus(fit, 36864)
    fit.add_argument("--out", required=True, help="file to write (.npz), for --shortcut OUT")
    fit.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                     help=f"pull towards the identity, relative to the states' variance (default {DEFAULT_RIDGE})")
    fit.add_argument("--kl-steps", type=int, default=0, help="Adam steps on KL after least squares (0 = none)")
    fit.add_argument("--kl-tokens", type=int, default=4096, help="tokens the KL steps draw from (default 4096)")
    fit.add_argument("--kl-batch", type=int, default=64, help="tokens per KL step (default 64)")
    fit.add_argument("--kl-lr", type=float, default=3e-4, help="Adam learning rate of the KL steps (default 3e-4)")
    fit.add_argument("--kl-min-point", type=int, default=None,
                     help="refine exit points from this one on (default: a third of the way in, 19 of 60)")
    fit.set_defaults(run=cmd_shortcuts_fit)
    return p


def shortcut_option(cmd, what):
    cmd.add_argument("--shortcut", metavar="FILE", default=None,
                     help=f"{what}; made by `python -m minee shortcuts fit`")


def workers_backend(args):
    """--workers checked (default 1; with --dask-scheduler, every worker of the cluster), and the
    cluster's connection for the command to run in (a no-op without --dask-scheduler)."""
    if "workers" not in args:
        return contextlib.nullcontext()
    if args.dask_scheduler is not None:
        if args.workers is not None:
            raise ValueError("--workers counts processes on this machine; with --dask-scheduler the "
                             "cluster's workers compute the windows, so leave --workers out")
        args.workers = -1
        return dask_cluster(args.dask_scheduler)
    if args.workers is None:
        args.workers = 1
    if args.workers < 1 and args.workers != -1:
        raise ValueError(f"--workers must be >= 1, or -1 for every core; got {args.workers}")
    return contextlib.nullcontext()


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        minee.set_threads(default_threads() if args.threads is None else args.threads)
        args.threads = minee.get_threads()
        with workers_backend(args):
            args.run(args)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        print(f"minee: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except MemoryError:                             # an allocation beyond every check (they leave some room)
        print(f"minee: error: {out_of_memory_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                       # Ctrl-C: joblib has already stopped any workers
        print("minee: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
