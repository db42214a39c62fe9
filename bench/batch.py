"""Batched decoding on a real model: tokens/s against the batch size B (plain and with early exit,
with and without compaction of exited rows), the queue (minee.generate_many) against one prompt at a
time, B=1 against the bandwidth ceiling, and what ops.linear's forms cost for each weight shape.

    python bench/batch.py [--threads 1,2] [--batch-sizes 1,2,4,8,16,32,64] [--new-tokens 24]
                          [--queue-prompts 64] [--queue-tokens 48] [--queue-chat] [--repeats 3]
                          [--gate SPEC ...] [--quick] [--out bench/results] [--json]

For each thread count (BLAS pinned with threadpoolctl):
  1. linear: median microseconds of one GEMV per row, one GEMM as x @ W.T and one GEMM as
     (W @ x.T).T for SmolLM2's five weight shapes and M rows; `*` marks what ops.linear runs.
  2. ceiling: BLAS sgemv over a 512 MB matrix (as bench/decode.py measures it) / the weight bytes
     read per decoded token = the B=1 decode tokens/s that streaming the weights allows.
  3. sweep: for each B, B prompts of mixed length (bench/prompts.txt, cycled) decoded together by
     minee's batch loop for --new-tokens greedy tokens: plain, and with each --gate (kv=copy; default
     the README's example gate and a gate that needs no LM head) with and without compaction
     (without: exited rows compute on until the slowest row exits, as minee did before). Interleaved
     (every kind for one B, then the next B; the order reversed every other repeat, A B .. B A,
     so that a drifting load cancels); tokens/s counts the decode
     steps (the tokens after each row's first over the decode seconds); medians over repeats.
  4. parts: one decode step of B = 1, 16 and the largest B rows split into attention, MLP and
     LM head (minima), with the MLPs' GFLOP/s next to a large GEMM's: where the time goes.
  5. queue: --queue-prompts prompts of mixed length (prompts.txt lines alone, then joined in
     twos, threes, ...; with --queue-chat wrapped in the chat template, whose system prompt adds
     ~30 tokens and whose answers end at EOS), up to --queue-tokens tokens each, stopping at EOS:
     minee.generate one by one
     vs minee.generate_many(batch_size=16), in the order A B B A ..., medians; wall-clock seconds
     with prefill.
Progress goes to stderr; the report (markdown, or JSON with --json) to stdout; OUT/batch.json and
the plot of tokens/s against B, OUT/batch.png, are written too.
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import minee                                                                      # noqa: E402
from minee.batch import decode                                                   # noqa: E402
from minee.exits import ExitDecoder                                              # noqa: E402
from decode import BW_MB, busy_cores, loadavg, machine_report, sgemv_read, weight_bytes   # noqa: E402
from linear import FORMS, SHAPES, form_fn, rule_form                              # noqa: E402

README_GATE = "confidence:0.85,min_point=41,attn_points=0,check_every=2"   # the example in README.md
NO_HEAD_GATE = "cosine:0.99,min_point=30"      # needs no LM head to decide; rows exit at different points
QUEUE_BATCH = 16


def log(msg):
    print(f"[batch] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return float(np.median(xs))


def blas_kernel():
    return ", ".join(f"{p['internal_api']} {p['version']} {p.get('architecture')}"
                     for p in threadpool_info() if p["user_api"] == "blas")


# ----------------------------------------------------------------------------- 1. linear per shape

def linear_table(rows_list, reps):
    """Median microseconds of the three forms of x (M, in) @ W.T for every shape and M, interleaved
    in this process (so each runs in the state the others left; bench/linear.py times each form in
    processes of its own)."""
    rng = np.random.default_rng(0)
    out = []
    for name, (o, i) in SHAPES.items():
        W = rng.standard_normal((o, i)).astype(np.float32)
        for M in rows_list:
            x = rng.standard_normal((M, i)).astype(np.float32)
            forms = {form: form_fn(form, x, W) for form in FORMS}
            n = max(2, reps // 8) if o > 10000 else reps
            times = {k: [] for k in forms}
            for _ in range(n):                                       # forms interleaved
                for k, fn in forms.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            row = {"shape": name, "M": M, **{k: 1e6 * median(v) for k, v in times.items()},
                   "rule": rule_form(M)}
            row["best"] = min(forms, key=lambda k: row[k])
            out.append(row)
    return out


# ----------------------------------------------------------------------------- 2. ceiling

def ceiling(model, reps=7):
    """B=1 decode tokens/s allowed by streaming the weights: sgemv bandwidth / weight bytes per token."""
    W = np.full((BW_MB * 2 ** 20 // 4 // 1024, 1024), 1.0, np.float32)
    x, y = np.ones(1024, np.float32), np.empty(W.shape[0], np.float32)
    sgemv_read(W, x, y)
    secs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sgemv_read(W, x, y)
        secs.append(time.perf_counter() - t0)
    bandwidth = W.nbytes / median(secs)
    return {"bandwidth": bandwidth, "weight_bytes": weight_bytes(model)["total"],
            "tok_s": bandwidth / weight_bytes(model)["total"]}


# ----------------------------------------------------------------------------- where a step's time goes

def step_parts(model, B, S=100, reps=5):
    """Milliseconds of one decode step of B rows at position S: one whole forward, and the
    attention and MLP sub-layers (summed over the layers) and the final norm + LM head called
    alone; minima over reps (noise only adds time). GFLOP/s of the MLPs' matrix products."""
    c = model.config
    kv = model.new_kv_cache(B, S + 1)
    kv.length = S                                        # positions 0 .. S-1 hold (zero) keys/values
    tokens = np.arange(B)[:, None] % c.vocab_size        # (B, 1)
    positions = kv.positions(1)                          # (B, 1)
    t = {"forward": [], "attention": [], "mlp": [], "lm_head": []}
    for _ in range(reps):
        kv.length = S
        t0 = time.perf_counter()
        model.forward(tokens, kv_cache=kv)
        t["forward"].append(time.perf_counter() - t0)
        x = model.embed_tokens[tokens]                   # (B, 1, D)
        ta = tm = 0.0
        for l in range(c.n_layers):
            t0 = time.perf_counter()
            x = x + model.attn_sublayer(l, x, positions, kv)
            t1 = time.perf_counter()
            x = x + model.mlp_sublayer(l, x)
            ta, tm = ta + t1 - t0, tm + time.perf_counter() - t1
        t0 = time.perf_counter()
        model.unembed(x)
        t["lm_head"].append(time.perf_counter() - t0)
        t["attention"].append(ta)
        t["mlp"].append(tm)
    ms = {k: 1e3 * min(v) for k, v in t.items()}
    ms["mlp_gflop_s"] = 6 * c.d_model * c.d_ff * c.n_layers * B / (ms["mlp"] / 1e3) / 1e9
    return ms


def big_gemm_rate(n=1024, reps=5):
    """GFLOP/s of one large square matrix product: what the BLAS reaches when it is not starved."""
    a = np.ones((n, n), np.float32)
    a @ a
    secs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        secs.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(secs) / 1e9


# ----------------------------------------------------------------------------- 3. batch sweep

class RideAlong(ExitDecoder):
    """Early exit without compaction, for comparison: rows that exited keep computing (unused)
    until the batch's slowest row exits, as minee did before."""

    def computing(self, done):
        return np.arange(len(done)) if not done.all() else np.flatnonzero(~done)


def decode_rate(model, ids, n, decoder):
    """Decode tokens/s (steps after each row's first token) of the rows ids decoded together by
    minee's batch loop, greedy, n tokens each (no EOS)."""
    rows = list(decode(model, ids, len(ids), n, pick=lambda i, logits: int(logits.argmax()), decoder=decoder))
    return len(ids) * (n - 1) / max(r.decode_s for r in rows)


def sweep(model, prompts, sizes, n, gates, repeats):
    """Tokens/s for every B: plain, and each gate (kv=copy) with and without compaction."""
    kinds = {"plain": lambda: None}
    for g in gates:
        kinds[g] = lambda g=g: ExitDecoder(model, g, "copy")
        kinds[f"{g} (no compaction)"] = lambda g=g: RideAlong(model, g, "copy")
    runs = {(B, k): [] for B in sizes for k in kinds}
    stats = {}
    for r in range(repeats):
        for B in sizes:
            ids = [model.tokenizer.encode(prompts[b % len(prompts)]) for b in range(B)]
            order = list(kinds.items()) if r % 2 == 0 else list(kinds.items())[::-1]   # A B .. B A: drift cancels
            for k, make in order:                                      # interleaved: every kind, then the next B
                decoder = make()
                runs[B, k].append(decode_rate(model, ids, n, decoder))
                if decoder is not None:
                    stats[B, k] = decoder.stats.summary(model.config)
            log(f"repeat {r + 1}/{repeats} B={B}: " + ", ".join(f"{short(k)} {runs[B, k][-1]:.1f}" for k in kinds)
                + f" tokens/s (loadavg {loadavg()})")
    return [{"B": B, "tok_s": {k: median(runs[B, k]) for k in kinds}, "runs": {k: runs[B, k] for k in kinds},
             "exit_stats": {k: stats[B, k] for k in kinds if k != "plain"}} for B in sizes]


# ----------------------------------------------------------------------------- 4. queue

def queue_prompts(lines, count):
    """count prompts of mixed length: the lines alone, then joined in twos, then threes, ..."""
    out, k = [], 1
    while len(out) < count:
        out += [" ".join(lines[(i + j) % len(lines)] for j in range(k)) for i in range(len(lines))]
        k += 1
    return out[:count]


def queue(model, prompts, n, repeats, chat):
    kw = dict(max_new_tokens=n, chat=chat)
    times = {"one_by_one": [], "queue": []}
    outs = {}
    runs = {"one_by_one": lambda: [minee.generate(model, p, **kw) for p in prompts],
            "queue": lambda: list(minee.generate_many(model, prompts, QUEUE_BATCH, progress=False, **kw))}
    for r in range(repeats):
        for k in (("one_by_one", "queue") if r % 2 == 0 else ("queue", "one_by_one")):   # A B B A ...
            t0 = time.perf_counter()
            outs[k] = runs[k]()
            times[k].append(time.perf_counter() - t0)
        log(f"queue repeat {r + 1}/{repeats}: one by one {times['one_by_one'][-1]:.1f} s, "
            f"queue {times['queue'][-1]:.1f} s (loadavg {loadavg()})")
    lengths = [len(o.tokens) for o in outs["queue"]]
    prefill = {k: sum(o.stats["prefill_s"] for o in v) for k, v in outs.items()}    # of the last repeat
    return {"prompts": len(prompts), "chat": chat, "batch_size": QUEUE_BATCH, "max_new_tokens": n, "prefill_s": prefill,
            "prompt_tokens": [len(o.prompt_tokens) for o in outs["queue"]], "new_tokens": lengths,
            "one_by_one_s": median(times["one_by_one"]), "queue_s": median(times["queue"]),
            "one_by_one_runs": times["one_by_one"], "queue_runs": times["queue"],
            "ratio": median(times["one_by_one"]) / median(times["queue"]),
            "identical_outputs": sum(a.tokens == b.tokens for a, b in zip(outs["queue"], outs["one_by_one"]))}


# ----------------------------------------------------------------------------- report

def goals(res):
    """Each goal of the issue: (text, measured, met)."""
    out = []
    for t in res["threads"]:
        rows = {r["B"]: r["tok_s"] for r in t["sweep"]}
        if 1 in rows and 16 in rows:
            x = rows[16]["plain"] / rows[1]["plain"]
            out.append((f"{t['threads']} thr: B=16 plain >= 8x B=1", f"{x:.1f}x", x >= 8))
        if t.get("queue"):
            x = t["queue"]["ratio"]
            out.append((f"{t['threads']} thr: queue over {t['queue']['prompts']} prompts >= 6x one by one",
                        f"{x:.1f}x", x >= 6))
        if 1 in rows:
            x = rows[1]["plain"] / t["ceiling"]["tok_s"]
            out.append((f"{t['threads']} thr: B=1 decode >= 85% of the bandwidth ceiling", f"{x:.0%}", x >= 0.85))
        if README_GATE in t["sweep"][0]["tok_s"]:
            worst = min(rows, key=lambda B: rows[B][README_GATE] / rows[B]["plain"])
            x = rows[worst][README_GATE] / rows[worst]["plain"]
            out.append((f"{t['threads']} thr: README gate not slower than plain at any B",
                        f"worst {x:.2f}x at B={worst}", x >= 1))
    return out


def short(kind):
    """A column label: the gate without its options, e.g. `confidence:0.85` (no compaction)."""
    gate, _, rest = kind.partition(" ")
    return kind if kind == "plain" else f"`{gate.split(',')[0]}` {rest}".strip()


def markdown(res):
    a = res["args"]
    lines = [f"## minee batched decoding: {res['date']}", "",
             f"model `{a['model']}`, CPU {res['machine']['cpu']} x{res['machine']['cores']}, BLAS {res['blas']}, "
             f"numpy {np.__version__}; loadavg {res['loadavg_start']} -> {res['loadavg_end']}, cores busy with "
             f"other work before/after {res['busy_start']:.1f}/{res['busy_end']:.1f}; "
             f"{a['repeats']} interleaved repeats, medians; gates (kv=copy): "
             + ", ".join(f"`{g}`" for g in a["gate"]), ""]
    for t in res["threads"]:
        c = t["ceiling"]
        lines += [f"### {t['threads']} BLAS thread(s)", "",
                  f"Bandwidth (sgemv, {BW_MB} MB) {c['bandwidth'] / 1e9:.1f} GB/s / {c['weight_bytes'] / 1e6:.0f} MB "
                  f"per token = ceiling {c['tok_s']:.1f} tokens/s at B=1.", "",
                  f"Decode tokens/s, {a['new_tokens']} new tokens per row, B prompts of mixed length "
                  "(exit: kv=copy; in brackets tokens/s relative to plain at the same B):", "",
                  "| B | " + " | ".join(short(k) for k in t["sweep"][0]["tok_s"]) + " | plain vs B=1 |",
                  "|---:|" + "---:|" * (len(t["sweep"][0]["tok_s"]) + 1)]
        base = t["sweep"][0]["tok_s"]["plain"]
        for r in t["sweep"]:
            plain = r["tok_s"]["plain"]
            cells = [f"{v:.1f}" + ("" if k == "plain" else f" ({v / plain:.2f})") for k, v in r["tok_s"].items()]
            lines.append(f"| {r['B']} | " + " | ".join(cells) + f" | {plain / base:.1f}x |")
        lines += ["", "Exit statistics per token at the largest B (layers used = exit depth; blocks computed "
                      "= what ran for the token; LM heads = vocabulary projections):", "",
                  "| gate | layers used | blocks computed | LM heads |", "|---|---:|---:|---:|"]
        for k, st in t["sweep"][-1]["exit_stats"].items():
            lines.append(f"| `{k}` | {st['mean_exit_depth']:.1f} | {st['mean_blocks_computed']:.1f} | "
                         f"{st['lm_head_calls_per_token']:.1f} |")
        q = t.get("queue")
        if q:
            lines += ["", f"Queue: {q['prompts']} {'chat ' * q['chat']}prompts of {min(q['prompt_tokens'])}-{max(q['prompt_tokens'])} "
                          f"tokens, {sum(q['new_tokens'])} new tokens ({min(q['new_tokens'])}-{max(q['new_tokens'])} "
                          f"per prompt, EOS or {q['max_new_tokens']}): one by one {q['one_by_one_s']:.1f} s, "
                          f"generate_many(batch_size={q['batch_size']}) {q['queue_s']:.1f} s = **{q['ratio']:.1f}x**; "
                          f"{q['identical_outputs']}/{q['prompts']} outputs identical. Prefilling the prompts took "
                          f"{q['prefill_s']['one_by_one']:.1f} s one by one and {q['prefill_s']['queue']:.1f} s in "
                          "the queue (each prompt is prefilled alone in both)."]
        lines += ["", f"Where one decode step's time goes (position 100; ms, minima of 5; the sub-layers summed over "
                      f"the layers; a large 1024x1024 GEMM runs at {t['big_gemm_gflop_s']:.0f} GFLOP/s here):", "",
                  "| B | whole forward | attention | MLP | final norm + LM head | MLP GFLOP/s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for B, p in t["parts"].items():
            lines.append(f"| {B} | {p['forward']:.1f} | {p['attention']:.1f} | {p['mlp']:.1f} | {p['lm_head']:.1f} | "
                         f"{p['mlp_gflop_s']:.0f} |")
        lines += ["", "ops.linear per shape, microseconds (M rows; `*` = what ops.linear runs):", "",
                  "| shape | M | GEMV per row | GEMM x @ W.T | GEMM (W @ x.T).T |", "|---|---:|---:|---:|---:|"]
        for r in t["linear"]:
            cells = [f"{r[k]:.0f}{'*' if r['rule'] == k else ''}" for k in ("gemv_per_row", "gemm_x_WT", "gemm_W_xT")]
            lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {m} | {'yes' if ok else '**no**'} |" for g, m, ok in goals(res)]
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, colour in zip(res["threads"], ("tab:blue", "tab:orange", "tab:green")):
        B = [r["B"] for r in t["sweep"]]
        kinds = [k for k in t["sweep"][0]["tok_s"] if "no compaction" not in k]     # those are in the table
        for k, style in zip(kinds, ("o-", "s--", "^:", "v-.", "D-")):
            ax.plot(B, [r["tok_s"][k] for r in t["sweep"]], style, color=colour,
                    label=f"{short(k).replace('`', '')}, {t['threads']} thr")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B (rows decoded together)")
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"{res['args']['model']}: {res['args']['new_tokens']} greedy tokens per row, exit with kv=copy",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", default="1,2", help="comma-separated BLAS thread counts (default 1,2)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,8,16,32,64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per row in the sweep (default 24)")
    p.add_argument("--queue-prompts", type=int, default=None, help="prompts in the queue run (default 64; 0 = skip)")
    p.add_argument("--queue-tokens", type=int, default=None, help="max new tokens per queued prompt (default 48)")
    p.add_argument("--queue-chat", action="store_true",
                   help="wrap the queued prompts in the chat template (longer prompts, answers end at EOS)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repeats (default 3; the queue runs min(repeats, 2))")
    p.add_argument("--gate", action="append", default=None,
                   help=f"early-exit gate, repeatable (default {README_GATE}, the README's example, and "
                        f"{NO_HEAD_GATE}); each is also run without compaction")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: B 1,4,16, 8 tokens, 16 queued prompts of 16 tokens, 1 repeat (as defaults)")
    p.add_argument("--out", default=str(HERE / "results"), help="directory for batch.png and batch.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of markdown")
    args = p.parse_args(argv)
    args.gate = args.gate or [README_GATE, NO_HEAD_GATE]
    defaults = (dict(batch_sizes="1,4,16", new_tokens=8, queue_prompts=16, queue_tokens=16, repeats=1) if args.quick
                else dict(batch_sizes="1,2,4,8,16,32,64", new_tokens=24, queue_prompts=64, queue_tokens=48, repeats=3))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.thread_list = [int(t) for t in args.threads.split(",")]
        args.sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error("--threads and --batch-sizes take comma-separated whole numbers, e.g. 1,2")
    if min(args.thread_list + args.sizes + [args.repeats, args.queue_tokens]) < 1 or args.new_tokens < 2 \
            or args.queue_prompts < 0:
        p.error("thread counts, batch sizes, --repeats and --queue-tokens must be >= 1, --new-tokens >= 2, "
                "--queue-prompts >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    model = minee.load(args.model)
    lines = [line for line in (HERE / "prompts.txt").read_text().splitlines() if line.strip()]
    res = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "args": {k: v for k, v in vars(args).items() if k not in ("thread_list", "sizes")},
           "machine": machine_report(), "loadavg_start": loadavg(), "busy_start": busy_cores() or 0.0,
           "threads": []}
    for threads in args.thread_list:
        with threadpool_limits(threads):
            res["blas"] = blas_kernel()
            log(f"{threads} thread(s), {res['blas']}: linear per shape ...")
            t = {"threads": threads,
                 "linear": linear_table([1, 2, 4, 8, 16] if args.quick else [1, 2, 3, 4, 6, 8, 16, 64],
                                        reps=10 if args.quick else 40)}
            log("bandwidth ceiling ...")
            t["ceiling"] = ceiling(model)
            log("batch sweep ...")
            t["sweep"] = sweep(model, lines, args.sizes, args.new_tokens, args.gate, args.repeats)
            log("where a step's time goes ...")
            t["big_gemm_gflop_s"] = big_gemm_rate()
            t["parts"] = {B: step_parts(model, B) for B in sorted({1, 16, max(args.sizes)})}
            if args.queue_prompts:
                t["queue"] = queue(model, queue_prompts(lines, args.queue_prompts), args.queue_tokens,
                                   min(args.repeats, 2), args.queue_chat)
            res["threads"].append(t)
    res["loadavg_end"], res["busy_end"] = loadavg(), busy_cores() or 0.0
    res["goals"] = [{"goal": g, "measured": m, "met": ok} for g, m, ok in goals(res)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(res, out / "batch.png")
    (out / "batch.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1) if args.json else markdown(res))


if __name__ == "__main__":
    main()
