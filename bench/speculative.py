"""Self-speculative decoding on a real model: wall-clock speedup over plain decoding, acceptance,
and a cost model that says where speculation can pay.

    python bench/speculative.py [--threads 1] [--new-tokens 64] [--points 39,47,55] [--ks 1,2,4]
                                [--gates SPEC;SPEC] [--shortcut FILE.npz | --fit-tokens N | --no-shortcut]
                                [--quick] [--out bench/results]

What it does, in one process with BLAS pinned to --threads:
  1. plain greedy decoding of every prompt in bench/prompts.txt (the reference tokens);
  2. shortcuts for the drafts: --shortcut FILE, else least squares fitted on the first --fit-tokens
     tokens of minee's corpus (never on the prompts); every configuration runs without and with it;
  3. teacher-forced acceptance: one forward pass over each prompt + its plain tokens gives, at every
     exit point p, whether the early-exit top-1 (plain lens, and through the shortcut) equals the
     full model's. Along the greedy path that is exactly whether a draft at p is accepted: alpha(p)
     is the acceptance rate of a draft, and replaying the flags through the cycle rule gives the
     exact cycles of any (p, k);
  4. unit costs, measured: one attention sub-layer, one FFN sub-layer and the LM head on R = 1 ..
     k+1 rows (block 15, at a typical position), one shortcut map; medians of interleaved repeats;
  5. the cost model. Plain decoding costs T_plain = L (attn_1 + ffn_1) + head_1 per token. A cycle
     with k drafts at point p costs
         T_cycle = k (early_1(p) + head_1 [+ map_1])  k drafts: sub-layers 0 .. p, the LM head
                                                      (and the shortcut map)
                 + early_1(p)                         the last row's early sub-layers (no LM head)
                 + late_{k+1}(p) + head_{k+1}         verification: the other sub-layers and the
                                                      LM head on k+1 rows at once
     and yields 1 + a + .. + a^k tokens if each draft is accepted with probability a independently.
     The break-even acceptance a* solves (1 - a^(k+1)) / (1 - a) = T_cycle / T_plain (none when
     T_cycle > (k+1) T_plain: even all-accepted drafts lose). It is given with the measured
     multi-row costs and with ideal ones (R rows cost one row: a matmul that reads its weights
     once). The predicted speedup replays the measured acceptance flags through the unit costs;
  6. measured runs, interleaved per prompt: plain, every configuration (rotated order), plain.
     Speedup = plain decode seconds / speculative decode seconds summed over the prompts (the
     prefill is the same full-model pass in both and is left out); the median of the per-prompt
     ratios next to it. Every greedy output is compared with plain decoding's.

Progress goes to stderr; a markdown report to stdout and OUT/speculative.md, the numbers to
OUT/speculative.json, the acceptance-vs-break-even figure to OUT/speculative.png.
--quick: 3 prompts x 16 tokens, one point and k, a shortcut fitted on 1,024 tokens: a smoke run.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minee                                                      # noqa: E402
from early_exit import save_results                               # noqa: E402
from minee.analysis import corpus_ids                             # noqa: E402
from minee.hooks import exit_point_names                          # noqa: E402
from minee.lens import point_logits, shortcut_label               # noqa: E402
from minee.speculative import speculative_generate                # noqa: E402

HERE = Path(__file__).resolve().parent
GOAL = 1.3
GATE = "confidence:0.5,min_point=41,attn_points=0,check_every=2"   # checks after blocks 20, 22, .., 28
TABLE_POINTS = (19, 29, 39, 47, 53, 55, 57, 58)                     # cost-model rows in the report


def log(msg):
    print(f"[speculative] {msg}", file=sys.stderr, flush=True)


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def machine():
    """CPU, cores, BLAS (library, version, kernel, threads), NumPy."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown")
    blas = [f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
            for i in threadpool_info()]
    return {"cpu": cpu, "cores": os.cpu_count(), "blas": blas, "numpy": np.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------ acceptance, teacher-forced

def agreement(model, prompt_ids, tokens, shortcut=None):
    """(P, n-1) bool: does exit point p's top-1 (through the shortcut, if any) equal the full
    model's, at the positions that predict tokens[1:] (tokens[0] comes from the prefill)?"""
    names = exit_point_names(model.config.n_layers)
    ids = np.array(list(prompt_ids) + list(tokens[:-1]))
    _, acts = model.run_with_cache(ids, names=names)
    steps = slice(len(prompt_ids), len(ids))                              # inputs tokens[0 .. n-2]
    top1 = np.stack([point_logits(model, acts[name][0, steps], p, shortcut).argmax(-1)
                     for p, name in enumerate(names)])                    # (P, n-1)
    return top1 == top1[-1]


def replay(flags, k):
    """Cycles of speculative_generate for acceptance flags (n-1,) along the greedy path: a list of
    (drafts, accepted) per cycle, with the same budget rule (at most what is left minus one)."""
    n, made, cycles = len(flags) + 1, 1, []
    while made < n:
        drafts = min(k, n - made - 1)
        a = 0
        while a < drafts and flags[made - 1 + a]:
            a += 1
        cycles.append((drafts, a))
        made += a + 1
    return cycles


# ------------------------------------------------------------------ unit costs and the cost model

def unit_costs(model, max_rows, position, shortcut, reps=15):
    """Median seconds of one attention sub-layer, one FFN sub-layer (block 15), the LM head on
    R = 1 .. max_rows rows at positions `position` .. (a cache filled up to there), and of one
    shortcut map on one row."""
    kv = model.new_kv_cache(1, position + max_rows + 1)
    model.forward(np.arange(position) % 1000 + 100, kv_cache=kv)
    rng = np.random.default_rng(0)
    x = {r: (rng.standard_normal((1, r, model.config.d_model)) * 2).astype(np.float32)
         for r in range(1, max_rows + 1)}
    pos = {r: position + np.arange(r)[None] for r in x}
    fns = {("map", 1): lambda: shortcut.apply(x[1], 39)} if shortcut else {}
    for r in x:
        fns[("attn", r)] = lambda r=r: model.attn_sublayer(15, x[r], pos[r], kv)
        fns[("mlp", r)] = lambda r=r: model.mlp_sublayer(15, x[r])
        fns[("head", r)] = lambda r=r: model.unembed(x[r])
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    out = {kind: [None] + [float(np.median(times[(kind, r)])) for r in x] for kind in ("attn", "mlp", "head")}
    out["map"] = float(np.median(times[("map", 1)])) if shortcut else 0.0
    out["position"] = position
    return out


def ideal(costs):
    """The unit costs if R rows cost what one row costs (a matmul that reads its weights once,
    whatever the number of rows: the memory-bound ideal the verification pass is designed for)."""
    return {**costs, **{kind: [None] + [costs[kind][1]] * (len(costs[kind]) - 1) for kind in ("attn", "mlp", "head")}}


def early(costs, p, rows=1):
    """Seconds of sub-layers 0 .. p on `rows` rows."""
    return (p // 2 + 1) * costs["attn"][rows] + (p + 1) // 2 * costs["mlp"][rows]


def late(costs, p, rows, n_layers):
    """Seconds of sub-layers p+1 .. 2L-1 on `rows` rows."""
    return (n_layers - (p // 2 + 1)) * costs["attn"][rows] + (n_layers - (p + 1) // 2) * costs["mlp"][rows]


def plain_token(costs, n_layers):
    return early(costs, 2 * n_layers - 1) + costs["head"][1]


def cycle_seconds(costs, p, k, n_layers, shortcut=False):
    """Predicted seconds of one cycle with k drafts at fixed point p (module docstring, step 5)."""
    draft = early(costs, p) + costs["head"][1] + (costs["map"] if shortcut else 0.0)
    return k * draft + early(costs, p) + late(costs, p, k + 1, n_layers) + costs["head"][k + 1]


def break_even(ratio, k):
    """The acceptance a with 1 + a + .. + a^k = ratio (= T_cycle / T_plain); None above k + 1."""
    if ratio > k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** j for j in range(k + 1)) < ratio else (lo, mid)
    return (lo + hi) / 2


def cost_model(costs, ks, n_layers):
    """Per point p = 0 .. 2L-2 and k: cycle time over a plain token, the break-even acceptance, the
    speedup if every draft were accepted and the acceptance the goal needs; with the measured
    multi-row costs and with ideal ones (drafts without a shortcut map; it adds costs["map"])."""
    rows = []
    for p in range(2 * n_layers - 1):
        for k in ks:
            row = {"point": p, "k": k}
            for name, c in (("measured", costs), ("ideal", ideal(costs))):
                ratio = cycle_seconds(c, p, k, n_layers) / plain_token(c, n_layers)
                row[name] = {"cycle_over_plain": ratio, "break_even": break_even(ratio, k),
                             "best_speedup": (k + 1) / ratio, "for_goal": break_even(GOAL * ratio, k)}
            rows.append(row)
    return rows


# ------------------------------------------------------------------ measured runs

def get_shortcut(args, model):
    """The drafts' shortcuts: loaded from --shortcut, fitted on the corpus, or None (--no-shortcut)."""
    if args.no_shortcut:
        return None
    if args.shortcut:
        return minee.shortcuts.load(args.shortcut, model)
    tokens = 1024 if args.quick else args.fit_tokens
    log(f"fitting least-squares shortcuts on the first {tokens} tokens of minee's corpus")
    return minee.shortcuts.fit(model, corpus_ids(model.tokenizer, max_tokens=tokens))


def timed_runs(model, ids, plain, configs, n):
    """Per configuration key: decode seconds and stats of every prompt, and the count of outputs
    that differ from plain decoding. Per prompt: plain, every configuration (rotated), plain."""
    runs = {"plain": [[] for _ in ids], **{key: [[] for _ in ids] for key in configs}}
    stats, differ = {key: [] for key in runs}, {key: 0 for key in runs}
    keys = list(configs)
    for i, (prompt_ids, want) in enumerate(zip(ids, plain)):
        order = keys[i % len(keys):] + keys[:i % len(keys)]                 # rotate who goes first
        for key in ["plain"] + order + ["plain"]:
            if key == "plain":
                out = minee.generate(model, prompt_ids, n, stop_at_eos=False)
            else:
                gate, k, sc = configs[key]
                out = speculative_generate(model, prompt_ids, n, draft=gate, k=k, shortcut=sc, stop_at_eos=False)
            runs[key][i].append(out.stats["decode_s"])
            stats[key].append(out.stats)
            differ[key] += out.tokens != want
        log(f"prompt {i + 1}/{len(ids)} done, loadavg {loadavg()[0]}")
    return runs, stats, differ


def by_position(stats):
    """Acceptance per draft position pooled over runs: accepted / compared."""
    compared = np.sum([s["compared_by_position"] for s in stats], 0)                  # (k,)
    accepted = np.sum([[0 if a is None else a * c for a, c in zip(s["acceptance_by_position"],
                                                                  s["compared_by_position"])] for s in stats], 0)
    return [float(a / c) if c else None for a, c in zip(accepted, compared)]


def run(args):
    model = minee.load(args.model)
    L = model.config.n_layers
    prompts = [line for line in (HERE / "prompts.txt").read_text().splitlines() if line.strip()]
    n = args.new_tokens
    points, ks = [int(p) for p in args.points.split(",")], [int(k) for k in args.ks.split(",")]
    if args.quick:
        prompts, n, points, ks = prompts[:3], 16, [47], [2]
    ids = [model.tokenizer.encode(p) for p in prompts]
    before = loadavg()
    sc = get_shortcut(args, model)
    variants = {"plain lens": None, **({"shortcut": sc} if sc else {})}
    configs = {}
    for name, s in variants.items():
        suffix = " +shortcut" if s else ""
        configs.update({f"fixed:{p} k={k}{suffix}": (f"fixed:{p}", k, s) for p in points for k in ks})
        configs.update({f"{g} k={ks[-1]}{suffix}": (g, ks[-1], s) for g in args.gates})
    log(f"{len(prompts)} prompts x {n} tokens, {len(configs)} configurations, {args.threads} thread(s), "
        f"loadavg {' '.join(before)}")

    plain = [minee.generate(model, i, n, stop_at_eos=False).tokens for i in ids]
    flags = {name: [agreement(model, i, t, s) for i, t in zip(ids, plain)] for name, s in variants.items()}
    alpha = {name: np.concatenate(f, axis=1).mean(1).tolist() for name, f in flags.items()}     # (P,)
    position = int(np.mean([len(i) for i in ids])) + n // 2
    costs = unit_costs(model, max(ks) + 1, position, sc)
    log(f"unit costs at position {position}: attn {costs['attn'][1] * 1e3:.2f} ms, FFN "
        f"{costs['mlp'][1] * 1e3:.2f} ms, LM head {costs['head'][1] * 1e3:.2f} ms (1 row)")

    runs, stats, differ = timed_runs(model, ids, plain, configs, n)
    plain_s = np.array([np.mean(t) for t in runs["plain"]])                 # (prompts,) mean of 2 runs
    rows = []
    for key, (gate, k, s) in configs.items():
        spec_s, st = np.array([t[0] for t in runs[key]]), stats[key]
        drafted, accepted = sum(x["drafted"] for x in st), sum(x["accepted"] for x in st)
        row = {"config": key, "draft": gate, "k": k, "shortcut": s is not None,
               "speedup": float(plain_s.sum() / spec_s.sum()),
               "speedup_median_prompt": float(np.median(plain_s / spec_s)),
               "acceptance_rate": accepted / drafted, "drafted": drafted, "accepted": accepted,
               "acceptance_by_position": by_position(st),
               "tokens_per_cycle": (accepted + sum(x["cycles"] for x in st)) / sum(x["cycles"] for x in st),
               "draft_share": float(sum(x["draft_s"] for x in st) / sum(x["decode_s"] for x in st)),
               "identical": len(ids) - differ[key], "decode_s": float(spec_s.sum())}
        if gate.startswith("fixed:"):
            p, variant = int(gate.split(":")[1]), "shortcut" if s else "plain lens"
            cycles = [c for f in flags[variant] for c in replay(f[p], k)]
            predicted = sum(cycle_seconds(costs, p, d, L, s is not None) for d, _ in cycles)
            row["alpha_teacher_forced"] = alpha[variant][p]
            row["predicted_speedup"] = len(ids) * (n - 1) * plain_token(costs, L) / predicted
            row["break_even"] = break_even(cycle_seconds(costs, p, k, L, s is not None) / plain_token(costs, L), k)
        rows.append(row)
    return {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads, "machine": machine(), "loadavg_before": before, "loadavg_after": loadavg(),
            "prompts": len(ids), "new_tokens": n, "plain_decode_s": float(plain_s.sum()),
            "shortcut": sc and (args.shortcut or shortcut_label(sc)),
            "alpha_by_point": alpha, "unit_costs_s": costs, "cost_model": cost_model(costs, ks, L), "rows": rows}


# ------------------------------------------------------------------ report

def pct(a):
    return "n/a" if a is None else f"{a:.0%}"


def report(res):
    m, c = res["machine"], res["unit_costs_s"]
    L = len(res["alpha_by_point"]["plain lens"]) // 2
    lines = [f"{res['date']}, {m['cpu']}, {m['cores']} cores, {', '.join(m['blas'])}, NumPy {m['numpy']}; "
             f"loadavg {' '.join(res['loadavg_before'])} before, {' '.join(res['loadavg_after'])} after.",
             f"{res['prompts']} prompts x {res['new_tokens']} greedy tokens; plain decoding "
             f"{res['plain_decode_s']:.1f} s (mean of the runs before and after each prompt's configurations); "
             f"shortcut: {res['shortcut'] or 'none'}.",
             "", "| draft | k | speedup (median prompt) | predicted | acceptance | by position | tokens/cycle | "
             "alpha (teacher-forced) | break-even | time drafting | identical |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        pred = f"{r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "n/a"
        sc = " + shortcut" if r["shortcut"] else ""
        lines.append(f"| `{r['draft']}`{sc} | {r['k']} | {r['speedup']:.2f}x ({r['speedup_median_prompt']:.2f}x) | "
                     f"{pred} | {r['acceptance_rate']:.0%} | {' '.join(pct(a) for a in r['acceptance_by_position'])} | "
                     f"{r['tokens_per_cycle']:.2f} | {pct(r.get('alpha_teacher_forced'))} | "
                     f"{pct(r['break_even']) if 'break_even' in r else 'n/a'} | {r['draft_share']:.0%} | "
                     f"{r['identical']}/{res['prompts']} |")
    lines += ["", f"Unit costs at position {c['position']} (medians): " + "; ".join(
        f"{kind} " + ", ".join(f"{r} row{'s' * (r > 1)} {v * 1e3:.2f} ms" for r, v in enumerate(c[kind]) if v)
        for kind in ("attn", "mlp", "head")) + f"; shortcut map {c['map'] * 1e3:.2f} ms.",
        f"Plain token from these: {plain_token(c, L) * 1e3:.1f} ms.", "",
        "Cost model, measured multi-row costs / ideal ones (R rows cost one row), drafts without a shortcut:", "",
        "| point | k | cycle / plain token | best case (all accepted) | break-even acceptance | "
        f"acceptance for {GOAL}x | alpha, plain lens / shortcut |", "|---:|---:|---:|---:|---:|---:|---:|"]
    alpha = res["alpha_by_point"]
    for r in res["cost_model"]:
        if r["point"] not in TABLE_POINTS:
            continue
        me, ie, p = r["measured"], r["ideal"], r["point"]
        lines.append(f"| {p} | {r['k']} | {me['cycle_over_plain']:.2f} / {ie['cycle_over_plain']:.2f} | "
                     f"{me['best_speedup']:.2f}x / {ie['best_speedup']:.2f}x | {pct(me['break_even'])} / "
                     f"{pct(ie['break_even'])} | {pct(me['for_goal'])} / {pct(ie['for_goal'])} | "
                     f"{pct(alpha['plain lens'][p])} / {pct(alpha.get('shortcut', [None] * (p + 1))[p])} |")
    return "\n".join(lines)


def plot(res, out):
    """Acceptance per exit point (teacher-forced) against the break-even acceptance per k."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, alpha), style in zip(res["alpha_by_point"].items(), ("k.-", "m.-")):
        ax.plot(range(len(alpha)), alpha, style, label=f"acceptance alpha(p), {name} (teacher-forced)")
    ks = sorted({r["k"] for r in res["cost_model"]})
    for k, colour in zip(ks, plt.cm.tab10.colors):
        for name, style in (("measured", "-"), ("ideal", ":")):
            pts = [(r["point"], r[name]["break_even"]) for r in res["cost_model"]
                   if r["k"] == k and r[name]["break_even"] is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=colour, label=f"break-even, k={k} ({name} multi-row costs)")
    ax.set_xlabel("draft exit point p (2l: after block l's attention, 2l+1: after its FFN)")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Self-speculation on {res['model']}: it pays only where alpha(p) is above the break-even",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--points", default="39,47,55", help="fixed draft points, comma-separated")
    p.add_argument("--ks", default="1,2,4", help="draft lengths, comma-separated")
    p.add_argument("--gates", default=GATE, type=lambda s: [g for g in s.split(";") if g],
                   help="draft gates (run with the largest k), ';'-separated")
    p.add_argument("--shortcut", default=None, help="shortcut file (python -m minee shortcuts fit)")
    p.add_argument("--fit-tokens", type=int, default=8192,
                   help="without --shortcut: fit least squares on this many corpus tokens")
    p.add_argument("--no-shortcut", action="store_true", help="only drafts through the plain lens")
    p.add_argument("--quick", action="store_true", help="3 prompts x 16 tokens, one configuration: a smoke run")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    with threadpool_limits(args.threads):
        res = run(args)
    save_results(res, args.out, "speculative", report, plot)


if __name__ == "__main__":
    main()
