"""Early exit on a real model: agreement with full greedy decoding vs measured wall-clock speedup.

For every gate setting and KV fill strategy, generates --new-tokens greedy tokens for each prompt
in bench/prompts.txt and reports: token agreement with plain greedy decoding (position by
position), the full model's NLL of the generated text, mean exit depth and blocks computed, LM-head
calls per token, and the measured decode speedup over plain decoding (same process, same threads, the
plain baseline timed at the start, middle and end and its median used).

The oracle row is the ceiling for exit without extra heads: every token exits exactly at its
stable point (found in hindsight from a full pass over the plain greedy text) and the
decode is replayed with the plain tokens forced, so its agreement is 100% by construction and
its time is real.

    python bench/early_exit.py [--threads 1] [--new-tokens 64] [--quick] [--out bench/results]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minee                                                      # noqa: E402
from minee.exits import ExitDecoder, Gate, stable_point           # noqa: E402
from minee.lens import exit_states, log_softmax                   # noqa: E402

HERE = Path(__file__).resolve().parent

# Gate sweeps. SmolLM2 ties its embedding and LM head, so at the first points the lens
# "predicts" the input token with ~100% confidence: logit gates need a min_point. Checking the
# vocabulary costs about 8 layers, so logit gates check only every other block output.
LATE = ",min_point=41,attn_points=0,check_every=2"       # checks after blocks 21, 23, 25, 27
SWEEP = (
    [f"confidence:{t}{LATE}" for t in (0.5, 0.7, 0.85, 0.95)]
    + [f"margin:{t}{LATE}" for t in (0.3, 0.5, 0.7, 0.9)]
    + [f"entropy:{t}{LATE}" for t in (2.0, 1.0, 0.5, 0.2)]
    + [f"patience:{k},min_point=45,attn_points=0" for k in (2, 3, 4)]
    + [f"cosine:{t},min_point=30" for t in (0.9, 0.95, 0.98, 0.99)]
    + [f"fixed:{p}" for p in (47, 51, 55, 57)]
    + ["confidence:0.9,min_point=1"]                     # the naive gate: the LM head at every point
)
QUICK_SWEEP = [f"confidence:0.85{LATE}", "cosine:0.95,min_point=30", "fixed:55"]


def plain_decode(model, prompt_ids, n):
    """Greedy tokens and decode seconds of plain decoding."""
    kv = model.new_kv_cache(1, len(prompt_ids) + n)
    logits = model.forward(prompt_ids, kv_cache=kv)[0, -1]
    tokens, t0 = [int(logits.argmax())], time.perf_counter()
    while len(tokens) < n:
        tokens.append(int(model.forward([tokens[-1]], kv_cache=kv)[0, -1].argmax()))
    return tokens, time.perf_counter() - t0


def gated_decode(model, prompt_ids, n, gate, kv_mode):
    """Greedy tokens, decode seconds and exit stats with a gate."""
    out = minee.generate(model, prompt_ids, n, exit=gate, kv=kv_mode, stop_at_eos=False)
    return out.tokens, out.stats["decode_s"], out.stats


def oracle_points(model, prompt_ids, tokens):
    """Stable exit point of every decoded token (tokens[1:]) from one teacher-forced full pass."""
    ids = list(prompt_ids) + list(tokens)
    _, states = exit_states(model, ids[:-1])                               # (P, T, D)
    steps = slice(len(prompt_ids), len(ids) - 1)                           # positions predicting tokens[1:]
    top1 = np.stack([model.unembed(s[steps]).argmax(-1) for s in states])  # (P, n-1)
    return stable_point(top1)


def oracle_replay(model, prompt_ids, tokens, points, kv_mode):
    """Decode seconds when each step exits at its oracle point, the plain tokens forced."""
    kv = model.new_kv_cache(1, len(prompt_ids) + len(tokens))
    model.forward(prompt_ids, kv_cache=kv)
    t0 = time.perf_counter()
    for token, p in zip(tokens[:-1], points):
        ExitDecoder(model, Gate("fixed", int(p)), kv_mode).step(token, kv)
    return time.perf_counter() - t0


def full_nll(model, prompt_ids, tokens):
    """Mean negative log-likelihood (nats) of the generated tokens under the full model."""
    ids = list(prompt_ids) + list(tokens)
    logp = log_softmax(model.forward(ids[:-1])[0, len(prompt_ids) - 1:])   # (n, V)
    return float(-logp[np.arange(len(tokens)), tokens].mean())


def unit_costs(model, reps=30, extra=None):
    """Median seconds of one attention sub-layer, one FFN sub-layer, one LM head and one plain
    forward of a single token at position 100, and of extra {name: fn(x)} (x (1, 1, D)), interleaved."""
    kv = model.new_kv_cache(1, 128)
    model.forward(np.arange(100), kv_cache=kv)
    x = model.embed_tokens[np.array([[5]])]                                # (1, 1, D)

    def forward():
        kv.length = 100
        model.forward([5], kv_cache=kv)

    fns = {"attn": lambda: model.attn_sublayer(10, x, np.array([[100]]), kv), "mlp": lambda: model.mlp_sublayer(10, x),
           "lm_head": lambda: model.unembed(x), "forward": forward,
           **{name: (lambda fn=fn: fn(x)) for name, fn in (extra or {}).items()}}
    timings = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in timings.items()}


def run(args):
    model = minee.load(args.model)
    L = model.config.n_layers
    prompts = [line for line in (HERE / "prompts.txt").read_text().splitlines() if line.strip()]
    prompts = prompts[:3] if args.quick else prompts
    prompt_ids = [model.tokenizer.encode(p) for p in prompts]
    n = args.new_tokens
    sweep = QUICK_SWEEP if args.quick else SWEEP
    kv_modes = ["copy", "propagate"] if not args.quick else ["copy"]
    print(f"{len(prompts)} prompts x {n} new tokens, {len(sweep)} gate settings x {kv_modes} "
          f"(+ compute for one setting per gate), threads={args.threads}", file=sys.stderr)

    def baseline():
        return [plain_decode(model, ids, n) for ids in prompt_ids]

    base_runs = [baseline()]
    ref = [tokens for tokens, _ in base_runs[0]]

    rows = []
    configs = [(g, kv) for g in sweep for kv in kv_modes]
    configs += [(g, "compute") for g in sweep if g.endswith(("0.85" + LATE, "0.95,min_point=30", "fixed:55"))]
    for i, (spec, kv_mode) in enumerate(configs):
        if i == len(configs) // 2:
            base_runs.append(baseline())
        toks, secs, stats, nlls = [], 0.0, [], []
        for ids, r in zip(prompt_ids, ref):
            t, s, st = gated_decode(model, ids, n, spec, kv_mode)
            toks.append(t)
            secs += s
            stats.append(st)
            nlls.append(full_nll(model, ids, t))
        agree = np.mean([np.mean(np.array(t) == np.array(r)) for t, r in zip(toks, ref)])
        prefix = np.mean([np.cumprod(np.array(t) == np.array(r)).mean() for t, r in zip(toks, ref)])
        rows.append({"gate": spec, "kv": kv_mode, "agreement": float(agree), "identical_prefix": float(prefix),
                     "decode_s": secs,
                     "nll": float(np.mean(nlls)),
                     "mean_exit_depth": float(np.mean([s["mean_exit_depth"] for s in stats])),
                     "mean_blocks_computed": float(np.mean([s["mean_blocks_computed"] for s in stats])),
                     "lm_head_calls_per_token": float(np.mean([s["lm_head_calls_per_token"] for s in stats])),
                     "flops_per_token": float(np.mean([s["flops_per_token"] for s in stats]))})
        print(f"[{i + 1}/{len(configs)}] {spec} kv={kv_mode}: agreement {agree:.3f}, "
              f"exit depth {rows[-1]['mean_exit_depth']:.1f}", file=sys.stderr)
    base_runs.append(baseline())

    plain_s = float(np.median([sum(s for _, s in run_) for run_ in base_runs]))
    plain_nll = float(np.mean([full_nll(model, ids, r) for ids, r in zip(prompt_ids, ref)]))
    for r in rows:
        r["speedup"] = plain_s / r["decode_s"]

    points = [oracle_points(model, ids, r) for ids, r in zip(prompt_ids, ref)]
    oracle = []
    for kv_mode in kv_modes:
        secs = sum(oracle_replay(model, ids, r, p, kv_mode) for ids, r, p in zip(prompt_ids, ref, points))
        all_p = np.concatenate(points)
        oracle.append({"gate": "oracle (replay)", "kv": kv_mode, "agreement": 1.0, "identical_prefix": 1.0,
                       "decode_s": secs,
                       "nll": plain_nll, "mean_exit_depth": float(((all_p + 1) / 2).mean()),
                       "mean_blocks_computed": float(((all_p + 1) / 2).mean()),   # replayed fixed exits
                       "lm_head_calls_per_token": 1.0, "speedup": plain_s / secs,
                       "share_needing_last_point": float((all_p == 2 * L - 1).mean())})
    return {"model": args.model, "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
            "blas": [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()],
            "prompts": len(prompts), "new_tokens": n, "plain_decode_s": plain_s, "plain_nll": plain_nll,
            "plain_decode_s_runs": [sum(s for _, s in run_) for run_ in base_runs],
            "unit_costs_s": unit_costs(model), "oracle": oracle, "rows": rows}


def table(res):
    lines = [f"Plain decoding: {res['plain_decode_s']:.2f} s for {res['prompts']} x {res['new_tokens']} tokens "
             f"(runs {', '.join(f'{s:.2f}' for s in res['plain_decode_s_runs'])}), NLL {res['plain_nll']:.3f}",
             "", "| gate | kv | agreement | identical prefix | full-model NLL | exit depth | blocks computed | "
             "LM-head calls/token | speedup |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["oracle"] + sorted(res["rows"], key=lambda r: -r["agreement"]):
        lines.append(f"| `{r['gate']}` | {r['kv']} | {r['agreement']:.3f} | {r['identical_prefix']:.3f} | {r['nll']:.3f} | "
                     f"{r['mean_exit_depth']:.1f} | {r['mean_blocks_computed']:.1f} | {r['lm_head_calls_per_token']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    u = res["unit_costs_s"]
    lines += ["", f"Unit costs at decode (median): attention sub-layer {u['attn'] * 1e6:.0f} us, FFN sub-layer "
              f"{u['mlp'] * 1e6:.0f} us, LM head {u['lm_head'] * 1e6:.0f} us, plain forward {u['forward'] * 1e3:.1f} ms"]
    return "\n".join(lines)


def plot(res, out):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"copy": "o", "propagate": "s", "compute": "^"}
    kinds = sorted({r["gate"].split(":")[0].split(",")[0] for r in res["rows"]})
    colours = dict(zip(kinds, plt.cm.tab10.colors))
    for r in res["rows"]:
        kind = r["gate"].split(":")[0].split(",")[0]
        ax.scatter(r["speedup"], r["agreement"], marker=markers[r["kv"]], color=colours[kind], alpha=0.8)
    for kind in kinds:
        ax.scatter([], [], color=colours[kind], label=kind)
    for kv, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=f"kv={kv}")
    for o in res["oracle"]:
        ax.scatter(o["speedup"], o["agreement"], marker="*", s=250, color="black",
                   label=f"oracle (kv={o['kv']})" if o is res["oracle"][0] else None)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("measured decode speedup over plain decoding")
    ax.set_ylabel("token agreement with plain greedy decoding")
    ax.set_title(f"Early exit on {res['model']}: {res['prompts']} prompts x {res['new_tokens']} tokens, "
                 f"{res['threads']} thread(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="3 prompts, 3 gate settings: a smoke run")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for early_exit.json/.md/.png")
    args = p.parse_args()
    with threadpool_limits(args.threads):
        res = run(args)
    save_results(res, args.out, "early_exit", table, plot)


def save_results(res, out_dir, name, table, plot):
    """Write NAME.json, NAME.md (table(res)) and NAME.png (plot) into out_dir; print the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(table(res) + "\n")
    plot(res, out / f"{name}.png")
    print(table(res))


if __name__ == "__main__":
    main()
