"""The linear rule, measured: what one GEMV per row and each way of writing the GEMM cost for
SmolLM2's weight shapes and M rows, each form in processes of its own.

    python bench/linear.py [--kernels SkylakeX,Haswell] [--rows 1,2,3,4,6,8,16,64,128]
                           [--rounds 3] [--reps 40] [--json]

Why processes of their own: which GEMM form a process has run decides which pages of OpenBLAS's
packing buffer are mapped, and so what a later product costs (issue 21, bench/README.md). Timing
the forms interleaved in one process measures each in the state the others left. So for every
kernel (OPENBLAS_CORETYPE) and form, a fresh interpreter with 1 BLAS thread times that form alone
over every shape and M (median of --reps calls; the LM head gets fewer); the processes run in
turn (A B C A B C ...) for --rounds rounds, and the report gives the median over rounds with the
spread. A fourth kind of process times (W @ x.T).T after one x @ W.T, which showed the state
effect on an AMD EPYC. The first call of each form in its process is in the JSON too (cold).
`*` marks what ops.linear runs. Progress on stderr, the report on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SHAPES = {"q_proj, o_proj 576x576": (576, 576), "k_proj, v_proj 192x576": (192, 576),
          "gate_proj, up_proj 1536x576": (1536, 576), "down_proj 576x1536": (576, 1536),
          "LM head 49152x576": (49152, 576)}
FORMS = {"gemv_per_row": "GEMV per row", "gemm_x_WT": "GEMM x @ W.T", "gemm_W_xT": "GEMM (W @ x.T).T"}
AFTER = "gemm_W_xT_after_x_WT"         # (W @ x.T).T in a process that ran one x @ W.T first (issue 21)


def log(msg):
    print(f"[linear] {msg}", file=sys.stderr, flush=True)


def form_fn(form, x, W):
    if form == "gemv_per_row":
        return lambda: x[:, None, :] @ W.T
    if form == "gemm_x_WT":
        return lambda: x @ W.T
    return lambda: (W @ x.T).T                               # gemm_W_xT and AFTER


def worker(form, rows, reps):
    """In this process, time one form over every shape and M: {shape: {M: [first call, median]}}."""
    from threadpoolctl import threadpool_info, threadpool_limits
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    out = {"blas": [f"{p['internal_api']} {p['version']} {p.get('architecture')}"
                    for p in threadpool_info() if p["user_api"] == "blas"], "times": {}}
    if form == AFTER:
        np.ones((128, 576), np.float32) @ np.ones((576, 576), np.float32).T
    for name, (o, i) in SHAPES.items():
        W = rng.standard_normal((o, i)).astype(np.float32)
        out["times"][name] = {}
        for M in rows:
            if form == "gemv_per_row" and o > 10000 and M > 16:
                continue                                     # seconds per call, and never the rule
            x = rng.standard_normal((M, i)).astype(np.float32)
            fn = form_fn(form, x, W)
            n = max(3, reps // 8) if o > 10000 else reps
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out["times"][name][M] = [1e6 * times[0], 1e6 * float(np.median(times))]
    return out


def run_worker(kernel, form, args):
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", form, "--rows", args.rows, "--reps", str(args.reps)]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def rule_form(M):
    from minee.ops import GEMM_MIN_ROWS, WIDE_MIN_ROWS
    return "gemv_per_row" if M < GEMM_MIN_ROWS else "gemm_W_xT" if M < WIDE_MIN_ROWS else "gemm_x_WT"


def fmt(us):
    return f"{us / 1000:.1f}k" if us >= 10000 else f"{us:.0f}"


def markdown(res):
    lines = []
    for kernel, k in res["kernels"].items():
        lines += [f"### {kernel} kernels ({', '.join(k['blas'])})", "",
                  "Microseconds per call, median over rounds of the per-process medians: "
                  "GEMV per row / GEMM `x @ W.T` / GEMM `(W @ x.T).T`; `*` = what ops.linear runs.", "",
                  "| shape | " + " | ".join(f"M={M}" for M in res["rows"]) + " |",
                  "|---|" + "---:|" * len(res["rows"])]
        for name in SHAPES:
            cells = []
            for M in res["rows"]:
                parts = []
                for form in FORMS:
                    v = k["median"][form][name].get(str(M))
                    parts.append("-" if v is None else fmt(v) + ("*" if form == rule_form(M) else ""))
                cells.append(" / ".join(parts))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Spread over rounds (max/min of the per-process medians), worst cell per form: "
                  + ", ".join(f"{FORMS[f]} {k['worst_spread'][f]:.2f}" for f in FORMS), "",
                  "State: `(W @ x.T).T` alone / in a process that ran one `x @ W.T` first, per M "
                  "(issue 21: 2.9x with 128 rows on an AMD EPYC VM):", ""]
        for name in SHAPES:
            alone, after = k["median"]["gemm_W_xT"][name], k["median"][AFTER][name]
            lines.append(f"- {name}: " + ", ".join(f"M={M} {alone[M] / after[M]:.2f}"
                                                   for M in map(str, res["rows"]) if M in after))
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="SkylakeX,Haswell", help="OPENBLAS_CORETYPE values to measure")
    p.add_argument("--rows", default="1,2,3,4,6,8,16,64,128", help="M values")
    p.add_argument("--rounds", type=int, default=3, help="processes per kernel and form, in turn")
    p.add_argument("--reps", type=int, default=40, help="calls per cell (the LM head: reps/8, at least 3)")
    p.add_argument("--worker", choices=(*FORMS, AFTER), help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, rows, args.reps)))
        return
    res = {"rows": rows, "rounds": args.rounds, "reps": args.reps, "loadavg_start": os.getloadavg(),
           "kernels": {}}
    runs = {(k, f): [] for k in args.kernels.split(",") for f in (*FORMS, AFTER)}
    for r in range(args.rounds):
        for kernel in args.kernels.split(","):
            for form in (*FORMS, AFTER):
                log(f"round {r + 1}/{args.rounds}: {kernel} {form} (load {os.getloadavg()[0]:.1f})")
                runs[kernel, form].append(run_worker(kernel, form, args))
    for kernel in args.kernels.split(","):
        k = {"blas": runs[kernel, "gemm_x_WT"][0]["blas"], "median": {}, "first": {}, "worst_spread": {}}
        for form in (*FORMS, AFTER):
            rs = runs[kernel, form]
            k["median"][form], k["first"][form], spread = {}, {}, [1.0]
            for name in SHAPES:
                cells = rs[0]["times"][name]
                k["median"][form][name] = {M: float(np.median([x["times"][name][M][1] for x in rs])) for M in cells}
                k["first"][form][name] = {M: float(np.median([x["times"][name][M][0] for x in rs])) for M in cells}
                spread += [max(x["times"][name][M][1] for x in rs) / min(x["times"][name][M][1] for x in rs)
                           for M in cells]
            k["worst_spread"][form] = max(spread)
        res["kernels"][kernel] = k
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res, indent=1) if args.json else markdown(res))


if __name__ == "__main__":
    main()
