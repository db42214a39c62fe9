"""Early exit through linear shortcuts: agreement with plain greedy decoding vs measured speedup.

For every setting (a gate, a KV fill, decoded plainly or through the shortcut) the script decodes
--new-tokens greedy tokens for each of the first --prompts prompts of bench/prompts.txt, and
times it interleaved with plain decoding: plain, setting, plain, setting ... (--repeats times).
The speedup is the median plain time over the median setting time, so both see the same machine
load. The shortcut's extra D x D product per decoded state is in the measured time and in the
FLOP count.

Rows:
- `fixed:P` exits, plain lens vs through the shortcut (the LM head is needed once anyway);
- logit gates checking a few points, plain vs shortcut;
- the oracle, replayed: each token exits at its stable point (through the shortcut: the stable
  point of the shortcut lens), the plain tokens forced, so agreement is 100% and the time real;
- the KV-state choice: kv=propagate filling the skipped blocks from the exit state h_p (what
  minee does) or from the mapped state h_p @ W + b (`propagate (mapped)`), with the oracle gate
  (as in E5) and a gate whose exits vary: with a fixed exit the deeper blocks never run again,
  so their keys/values are never read.

    python bench/shortcuts.py --shortcut FILE [--threads 1] [--prompts 6] [--new-tokens 32]
                              [--repeats 2] [--out bench/results]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import minee                                                      # noqa: E402
from early_exit import full_nll, plain_decode, save_results, unit_costs   # noqa: E402
from minee.exits import ExitDecoder, stable_point                 # noqa: E402
from minee.lens import exit_states, point_logits                  # noqa: E402

HERE = Path(__file__).resolve().parent

FIXED = [f"fixed:{p}" for p in (29, 39, 45, 51)]
SPARSE = ",attn_points=0,check_every=4"                   # candidates: blocks 17, 21, 25 from min_point 29
GATES = [f"confidence:0.5,min_point=29{SPARSE}", f"margin:0.4,min_point=29{SPARSE}"]


class MappedKV(ExitDecoder):
    """kv=propagate from the mapped state h_p @ W + b instead of the exit state h_p (the road not taken)."""

    def fill_skipped(self, points, states, pos, kv):
        early = points < self.n_points - 1
        mapped = states.copy()
        mapped[early] = self.shortcut.apply(states[early], points[early])
        super().fill_skipped(points, mapped, pos, kv)


def decode(model, prompt_ids, n, gate, kv_mode, shortcut=None, decoder_class=ExitDecoder):
    """Greedy tokens, decode seconds and exit stats of early-exit decoding."""
    dec = decoder_class(model, gate, kv_mode, shortcut)
    kv = model.new_kv_cache(1, len(prompt_ids) + n)
    tokens = [int(model.forward(prompt_ids, kv_cache=kv)[0, -1].argmax())]
    t0 = time.perf_counter()
    while len(tokens) < n:
        logits, _ = dec.step(tokens[-1], kv)
        tokens.append(int(logits.argmax()))
    return tokens, time.perf_counter() - t0, dec.stats.summary(model.config)


def oracle_points(model, prompt_ids, tokens, shortcut):
    """Stable exit point of every decoded token (tokens[1:]), through the shortcut if given."""
    ids = list(prompt_ids) + list(tokens)
    _, states = exit_states(model, ids[:-1])                               # (P, T, D)
    steps = states[:, len(prompt_ids):]                                    # positions predicting tokens[1:]
    return stable_point(point_logits(model, steps, slice(None), shortcut).argmax(-1))


def replay(model, prompt_ids, tokens, points, kv_mode, shortcut=None):
    """Decode seconds when each step exits at its oracle point, the plain tokens forced; the stats
    an ideal gate would have (one LM head per token)."""
    decoders = {int(p): ExitDecoder(model, f"fixed:{int(p)}", kv_mode, shortcut) for p in set(points)}
    kv = model.new_kv_cache(1, len(prompt_ids) + len(tokens))
    model.forward(prompt_ids, kv_cache=kv)
    t0 = time.perf_counter()
    for token, p in zip(tokens[:-1], points):
        decoders[int(p)].step(token, kv)
    secs = time.perf_counter() - t0
    return list(tokens), secs, {"mean_exit_depth": float(((points + 1) / 2).mean()),
                                "lm_head_calls_per_token": 1.0, "flops_per_token": float("nan")}


def settings(quick):
    fixed, gates = (FIXED[::2], GATES[:1]) if quick else (FIXED, GATES)
    rows = []
    for spec in fixed + gates:
        rows += [(spec, "copy", False, "exit"), (spec, "copy", True, "exit")]
    # Which state fills the skipped blocks' K/V. With a fixed exit no later token runs the deeper
    # blocks, so the fill never matters; the oracle gate (exits vary, decided from the running
    # pass as in E5; its time is not meaningful) and a gate with varying exits show it.
    for spec in ("oracle", gates[0]):
        rows += [(spec, "propagate", True, "exit"), (spec, "propagate", True, "mapped")]
    return rows


def run(args):
    model = minee.load(args.model)
    shortcut = minee.shortcuts.load(args.shortcut, model)
    prompts = [line for line in (HERE / "prompts.txt").read_text().splitlines() if line.strip()][:args.prompts]
    prompt_ids = [model.tokenizer.encode(p) for p in prompts]
    n = args.new_tokens
    ref, _ = zip(*[plain_decode(model, ids, n) for ids in prompt_ids])
    oracle = {sc: [oracle_points(model, ids, r, shortcut if sc else None) for ids, r in zip(prompt_ids, ref)]
              for sc in (False, True)}

    def timed(fn):
        """(result of the last run, median plain seconds, median seconds) over interleaved repeats."""
        plain, mine = [], []
        for _ in range(args.repeats):
            plain.append(sum(plain_decode(model, ids, n)[1] for ids in prompt_ids))
            out = [fn(ids, r, i) for i, (ids, r) in enumerate(zip(prompt_ids, ref))]
            mine.append(sum(o[1] for o in out))
        return out, float(np.median(plain)), float(np.median(mine))

    rows = []
    configs = [("oracle (replay)", kv, sc, "exit") for sc in (False, True) for kv in ("copy", "propagate")]
    configs += settings(args.quick)
    for i, (spec, kv_mode, sc, state) in enumerate(configs):
        use = shortcut if sc else None
        if spec == "oracle (replay)":
            def fn(ids, r, k):
                return replay(model, ids, r, oracle[sc][k], kv_mode, use)
        else:
            cls = MappedKV if state == "mapped" else ExitDecoder
            def fn(ids, r, k):
                return decode(model, ids, n, spec, kv_mode, use, cls)
        out, plain_s, s = timed(fn)
        toks = [o[0] for o in out]
        same = [np.array(t) == np.array(r) for t, r in zip(toks, ref)]
        stats = [o[2] for o in out]
        rows.append({"gate": spec, "kv": kv_mode + (" (mapped)" if state == "mapped" else ""),
                     "shortcut": sc, "agreement": float(np.mean([m.mean() for m in same])),
                     "identical_prefix": float(np.mean([np.cumprod(m).mean() for m in same])),
                     "nll": float(np.mean([full_nll(model, ids, t) for ids, t in zip(prompt_ids, toks)])),
                     "mean_exit_depth": float(np.mean([st["mean_exit_depth"] for st in stats])),
                     "lm_head_calls_per_token": float(np.mean([st["lm_head_calls_per_token"] for st in stats])),
                     "flops_per_token": float(np.mean([st["flops_per_token"] for st in stats])),
                     "plain_s": plain_s, "decode_s": s, "speedup": plain_s / s})
        r = rows[-1]
        print(f"[{i + 1}/{len(configs)}] {spec} kv={r['kv']} shortcut={sc}: agreement {r['agreement']:.3f}, "
              f"exit depth {r['mean_exit_depth']:.1f}, speedup {r['speedup']:.2f}x", file=sys.stderr)
    costs = unit_costs(model, reps=50, extra={"shortcut": lambda x: shortcut.apply(x, 29)})
    return {"model": args.model, "shortcut": args.shortcut, "shortcut_meta": shortcut.meta, "unit_costs_s": costs,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
            "blas": [(i["internal_api"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()],
            "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
            "prompts": len(prompts), "new_tokens": n, "repeats": args.repeats, "rows": rows}


def table(res):
    lines = [f"{res['prompts']} prompts x {res['new_tokens']} tokens, {res['repeats']} interleaved repeats, "
             f"{res['threads']} thread(s), {res['blas']}, load {res['loadavg']}", "",
             "| gate | kv | shortcut | agreement | identical prefix | full-model NLL | exit depth | LM-head calls/token | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| `{r['gate']}` | {r['kv']} | {'yes' if r['shortcut'] else 'no'} | {r['agreement']:.3f} | "
                     f"{r['identical_prefix']:.3f} | {r['nll']:.3f} | {r['mean_exit_depth']:.1f} | "
                     f"{r['lm_head_calls_per_token']:.1f} | {r['speedup']:.2f}x |")
    u = res["unit_costs_s"]
    lines += ["", f"Unit costs at decode (median of 50, interleaved): attention sub-layer {u['attn'] * 1e6:.0f} us, "
              f"FFN sub-layer {u['mlp'] * 1e6:.0f} us, LM head {u['lm_head'] * 1e6:.0f} us, "
              f"shortcut map {u['shortcut'] * 1e6:.0f} us"]
    return "\n".join(lines)


def row_kind(row):
    """'fixed', 'oracle' or 'gate': how a row's exit point is chosen."""
    return next((k for k in ("fixed", "oracle") if row["gate"].startswith(k)), "gate")


def plot(res, out):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for sc, colour in ((False, "C0"), (True, "C3")):
        label = "through the shortcut" if sc else "plain lens"
        for kind, marker in (("fixed", "o"), ("oracle", "*"), ("gate", "s")):
            pts = [(r["speedup"], r["agreement"]) for r in res["rows"]
                   if r["shortcut"] == sc and r["kv"] == "copy" and row_kind(r) == kind]
            if pts:
                pts.sort()
                ax.plot(*zip(*pts), marker=marker, ms=12 if kind == "oracle" else 6, color=colour,
                        ls="-" if kind == "fixed" else "none", label=f"{kind}, {label}")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("measured decode speedup over plain decoding (kv=copy)")
    ax.set_ylabel("token agreement with plain greedy decoding")
    ax.set_title(f"Early exit with and without linear shortcuts: {res['prompts']} prompts x "
                 f"{res['new_tokens']} tokens, {res['threads']} thread(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shortcut", required=True, help="shortcut file from `python -m minee shortcuts fit`")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer settings: a smoke run")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for shortcuts.json/.md/.png")
    args = p.parse_args()
    with threadpool_limits(args.threads):
        res = run(args)
    save_results(res, args.out, "shortcuts", table, plot)


if __name__ == "__main__":
    main()
