"""Cost of looking inside: a teacher-forced window's time split, and the lens of a prompt.

    python bench/lens.py [--model smollm2-135m] [--threads 1] [--window 256] [--context 128]
                         [--repeats 3] [--tokens 64] [--prompt-repeats 7] [--json]

1. One teacher-forced window of `analyze` (analysis.window_part: `--context` tokens seen, `--window`
   tokens scored, every exit point), timed whole and in parts, interleaved (whole, parts, whole,
   parts, ...), `--repeats` times:
   - forward: the forward pass keeping the state of every exit point (run_with_cache);
   - final distribution: lens.final_distribution of the last point's logits;
   - LM-head GEMMs: every block of lens.point_chunks through the LM head (lens.point_logits);
   - statistics: lens.logit_stats of each block against the final distribution, in the same loop
     as its GEMM (as lens.decoded_stats runs them: each block of logits evicts the LM head's weight
     from the caches, so the GEMMs are slower here than alone); then, apart, the last block's
     statistics without the final distribution, times the number of blocks: the difference is what
     the comparison with the final distribution (KL, final_prob) costs.
   The report gives medians of wall-clock and CPU seconds (CPU time is what a busy machine
   cannot inflate by time-slicing), the rest (whole minus its measured parts), and, per repeat,
   the ratio of the whole window to that repeat's LM-head GEMMs and of the parts' sum to them
   (the parts are timed in one run, so that ratio does not mix two runs).
2. The lens of a `--tokens` prompt (minee.lens.lens, every exit point, top-5) against one plain
   forward and run_with_cache, interleaved, `--prompt-repeats` times.

The memory layout of the LM head's output (ops.linear) is printed: the statistics give the same
numbers for any layout, but not at the same speed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minee                                                     # noqa: E402
from minee.analysis import corpus_ids, window_part              # noqa: E402
from minee.hooks import exit_point_names                        # noqa: E402
from minee.lens import final_distribution, lens, logit_stats, point_chunks, point_logits   # noqa: E402
from decode import busy_cores, loadavg, machine_report         # noqa: E402
from parallel import blas                                       # noqa: E402


def clock():
    return np.array([time.perf_counter(), time.process_time()])      # wall, CPU seconds


def window_split(model, ids, begin, start, end):
    """Seconds (wall, CPU) of each part of one window, computed as window_part computes it."""
    t, c = {}, clock()
    names = ["hook_embed"] + exit_point_names(model.config.n_layers)
    logits, acts = model.run_with_cache(ids[None, begin:end], names=names)
    scored = slice(start - begin, end - begin)
    states = np.stack([acts[n][0, scored] for n in names])[1:]                 # (P, T, D)
    t["forward"], c = clock() - c, clock()
    final = final_distribution(logits[0, scored])
    t["final distribution"], c = clock() - c, clock()
    P, T, _ = states.shape
    t["LM-head GEMMs"] = t["statistics"] = 0
    for ps, ts in point_chunks(P, T, model.config.vocab_size):                # as lens.decoded_stats
        c = clock()
        block = point_logits(model, states[ps, ts], ps)                        # (p, t, V)
        t["LM-head GEMMs"], c = t["LM-head GEMMs"] + clock() - c, clock()
        logit_stats(block, {k: v[ts] for k, v in final.items()})
        t["statistics"] += clock() - c
    without = []                                # the last block again, without the final distribution
    for _ in range(3):
        c = clock()
        logit_stats(block)
        without.append(clock() - c)
    n_blocks = len(point_chunks(P, T, model.config.vocab_size))
    t["statistics without final"] = n_blocks * np.median(without, axis=0)
    return t, block.flags.c_contiguous


def bench_window(model, args):
    ids = corpus_ids(model.tokenizer, max_tokens=args.context + args.window + 1)
    begin, start, end = 0, args.context, args.context + args.window
    runs = []
    for r in range(args.repeats):
        c = clock()
        window_part(model, begin, start, end, ids)
        whole = clock() - c
        parts, contiguous = window_split(model, ids, begin, start, end)
        runs.append({"whole window": whole, **parts})
        print(f"  repeat {r + 1}: whole {whole[0]:.1f} s wall / {whole[1]:.1f} s CPU, LM-head GEMMs "
              f"{parts['LM-head GEMMs'][0]:.1f} / {parts['LM-head GEMMs'][1]:.1f} s (loadavg {loadavg()})", flush=True)
    measured = ("forward", "final distribution", "LM-head GEMMs", "statistics")
    for run in runs:                            # per repeat: the whole, and its parts' sum, over its GEMMs
        run["ratio: whole / GEMMs"] = run["whole window"] / run["LM-head GEMMs"]
        run["ratio: parts / GEMMs"] = sum(run[k] for k in measured) / run["LM-head GEMMs"]
    med = {k: np.median([run[k] for run in runs], axis=0) for k in runs[0]}
    spread = {k: (np.min([run[k] for run in runs], axis=0), np.max([run[k] for run in runs], axis=0)) for k in runs[0]}
    med["rest (whole minus the parts)"] = med["whole window"] - sum(med[k] for k in measured)
    return {"contiguous_logits": contiguous, "median": {k: v.tolist() for k, v in med.items()},
            "spread": {k: [lo.tolist(), hi.tolist()] for k, (lo, hi) in spread.items()}}


def bench_prompt(model, args):
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, args.tokens)
    runs = {"forward": lambda: model.forward(ids),
            "run_with_cache (all resid points)": lambda: model.run_with_cache(ids, names="blocks.*.hook_resid_*"),
            "lens (all 2L points, top-5)": lambda: lens(model, ids)}
    times = {name: [] for name in runs}
    for _ in range(args.prompt_repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--window", type=int, default=256, help="scored tokens of the window")
    p.add_argument("--context", type=int, default=128, help="tokens seen before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="prompt length for the lens of one prompt")
    p.add_argument("--prompt-repeats", type=int, default=7, help="0 skips the lens of one prompt")
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    args = p.parse_args()
    minee.set_threads(args.threads)
    model = minee.load(args.model)
    c = model.config
    res = {"model": args.model, "machine": machine_report(), "blas": blas(), "threads": minee.get_threads(),
           "window": args.window, "context": args.context, "repeats": args.repeats,
           "points": 2 * c.n_layers, "vocab": c.vocab_size, "loadavg_start": loadavg(), "busy_start": busy_cores()}
    print(f"{args.model}: {2 * c.n_layers} exit points, vocabulary {c.vocab_size:,}; {res['blas']}, "
          f"{res['threads']} BLAS thread(s); loadavg {res['loadavg_start']}, other work kept "
          f"{res['busy_start']:.1f} cores busy")
    print(f"one window: {args.context} context + {args.window} scored tokens, {args.repeats} interleaved repeats")
    res["split"] = w = bench_window(model, args)
    print(f"LM head output: {'C-contiguous (M, V)' if w['contiguous_logits'] else 'V-strided (a transposed view)'}")
    gemm = w["median"]["LM-head GEMMs"]
    print(f"medians of {args.repeats}, [min - max]")
    print(f"{'part of analysis.window_part':32s} {'wall s':>8s} {'CPU s':>8s} {'x GEMMs':>8s}  CPU spread")
    for name, (wall, cpu) in w["median"].items():
        if not name.startswith("ratio"):
            lo, hi = w["spread"].get(name, [[np.nan] * 2] * 2)
            print(f"{name:32s} {wall:8.2f} {cpu:8.2f} {cpu / gemm[1]:8.2f}  [{lo[1]:.2f} - {hi[1]:.2f}]")
    for name in ("ratio: whole / GEMMs", "ratio: parts / GEMMs"):      # per repeat, then the median
        (wall, cpu), (lo, hi) = w["median"][name], w["spread"][name]
        print(f"{name}: {cpu:.2f}x CPU [{lo[1]:.2f} - {hi[1]:.2f}], {wall:.2f}x wall [{lo[0]:.2f} - {hi[0]:.2f}]")
    if args.prompt_repeats:
        res["prompt"] = t = bench_prompt(model, args)
        base = t["forward"]
        print(f"lens of a {args.tokens}-token prompt, median of {args.prompt_repeats}:")
        for name, s in t.items():
            print(f"  {name:36s} {s * 1e3:8.1f} ms  {s / base:6.2f}x forward")
    res["loadavg_end"], res["busy_end"] = loadavg(), busy_cores()
    print(f"loadavg at the end {res['loadavg_end']}, other work kept {res['busy_end']:.1f} cores busy")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
