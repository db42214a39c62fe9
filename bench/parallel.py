"""Teacher-forced windows on N worker processes (minee/parallel.py): measured tokens/s and a cost model.

    python bench/parallel.py [--model smollm2-135m] [--tokens 1024] [--window 256] [--workers 1,2]
                             [--repeats 2] [--json]

1. Measures the parts of the cost model:
   - start(N): N cold joblib workers starting, importing minee and getting the model (timed as N
     one-token windows on N fresh workers): what a run with N workers pays once;
   - window: the 1-worker runs' seconds per window (1 BLAS thread), turned into seconds on an idle
     core by the share of the CPU the run had (below);
   - result: one window's result pickled and unpickled (what travels back per window), and its size.
2. Runs analysis.teacher_forced over the same tokens with each worker count, interleaved
   (1, 2, 1, 2, ...), every run cold (loky's workers are shut down before it, so it pays the
   start), and checks that every run gives the same table.
3. Predicts each run: T(1) = W * window / s(1), T(N) = start(N) + ceil(W / N) * (window / s(N) +
   result), where s(k) is the share of a core each of our k processes gets. Linux shares the CPU
   between scheduling groups: sessions when sched_autogroup is on (a shell and the workers it
   starts are one group), else processes. With g other groups busy (each using at least a quarter
   of a core in the second before the run) on c cores, a group gets c / (g + 1) cores, so
   s(k) = min(k, c / (g + 1)) / k with autogroup, and min(1, c / (g + k)) without. On an idle
   machine (g = 0) s(k) = 1 for k <= c.

Report: tokens/s per worker count (medians), the speedup over 1 worker, the prediction at the load
of those runs and on idle cores, the load, and the CPU / BLAS kernel.
"""
import argparse
import json
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minee                                                          # noqa: E402
from minee.analysis import TeacherForced, corpus_ids, teacher_forced, window_part   # noqa: E402
from minee.lens import windows                                        # noqa: E402
from minee.parallel import map_windows                                # noqa: E402
from decode import loadavg, machine_report                           # noqa: E402

def blas():
    """NumPy's BLAS library, version and CPU kernel (e.g. OpenBLAS 0.3.31 SkylakeX)."""
    pool = next((p for p in threadpool_info() if p["user_api"] == "blas"), {})
    return f"{pool.get('internal_api')} {pool.get('version')} {pool.get('architecture')}"


def autogroup():
    """Does the kernel share the CPU between sessions (sched_autogroup) rather than processes?"""
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def busy_groups(seconds=1.0):
    """Other scheduling groups (sessions with autogroup, else processes) that used at least a
    quarter of a core over `seconds`, from /proc/*/stat."""
    by_session = autogroup()

    def group(proc):
        return (proc / "autogroup").read_text().split()[0] if by_session else proc.name

    def cpu_ticks():
        ticks = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                key = group(proc)
            except (OSError, IndexError):
                continue
            ticks[key] = ticks.get(key, 0) + int(fields[11]) + int(fields[12])      # utime + stime
        return ticks
    before = cpu_ticks()
    time.sleep(seconds)
    after = cpu_ticks()
    mine = group(Path("/proc/self"))
    used = {k: (t - before.get(k, t)) / os.sysconf("SC_CLK_TCK") / seconds for k, t in after.items()}
    return sum(1 for k, cores in used.items() if k != mine and cores >= 0.25)


def share(k, busy):
    """The share of a core each of our k CPU-bound processes gets while `busy` other groups are busy."""
    cores = os.cpu_count()
    if autogroup():
        return min(k, cores / (busy + 1)) / k
    return min(1.0, cores / (busy + k))


def start_seconds(model, ids, workers, repeats=2):
    """Wall time for `workers` fresh joblib workers to start, import minee, get the model and
    compute a one-token window each: what a run with that many workers pays once."""
    times = []
    for _ in range(repeats):
        shut_down_workers()
        t0 = time.perf_counter()
        list(map_windows(window_part, model, [(0, 0, 1)] * workers, ids, workers=workers, progress=False))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def result_seconds(model, ids, span):
    """(seconds to pickle + unpickle one window's result, its bytes): what travels back per window."""
    blob = pickle.dumps(window_part(model, *span, ids), protocol=pickle.HIGHEST_PROTOCOL)
    t0 = time.perf_counter()
    pickle.loads(pickle.dumps(pickle.loads(blob), protocol=pickle.HIGHEST_PROTOCOL))
    return time.perf_counter() - t0, len(blob)


def shut_down_workers():
    """Stop loky's reusable workers, so the next run starts (and gets the model) afresh."""
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)


def timed_run(model, ids, window, workers):
    """(seconds, table, worker restarts loky warned about) of one cold teacher_forced run."""
    shut_down_workers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        tf, _ = teacher_forced(model, ids, window=window, progress=False, workers=workers)
        seconds = time.perf_counter() - t0
    restarts = sum("worker stopped" in str(w.message) for w in caught)
    return seconds, tf, restarts


def predict(parts, n_windows, workers, busy=0):
    """Predicted seconds for `workers` processes: their start (if workers > 1), then the windows each
    computes one after another, slowed to its share of a core while `busy` other groups are busy."""
    if workers == 1:
        return n_windows * parts["window_idle_s"] / share(1, busy)
    per_window = parts["window_idle_s"] / share(workers, busy) + parts["result_s"]
    return parts["start_s"][str(workers)] + math.ceil(n_windows / workers) * per_window


def same_table(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in TeacherForced.__dataclass_fields__)


def run(args):
    minee.set_threads(1)
    model = minee.load(args.model)
    ids = corpus_ids(model.tokenizer, max_tokens=args.tokens + 1)       # tokens predictions
    spans = windows(len(ids) - 1, args.window)
    counts = [int(n) for n in args.workers.split(",")]
    res = {"model": args.model, "tokens": len(ids) - 1, "window": args.window, "windows": len(spans),
           "machine": machine_report(), "blas": blas(), "autogroup": autogroup(), "loadavg_start": loadavg(),
           "runs": []}
    print(f"[bench] {res['tokens']} tokens in {len(spans)} windows of {args.window}; measuring the parts",
          file=sys.stderr)
    r, size = result_seconds(model, ids, spans[len(spans) // 2])                  # a window with context
    res["parts"] = {"result_s": r, "result_bytes": size,
                    "start_s": {str(n): start_seconds(model, ids, n) for n in counts if n > 1}}
    reference = None
    for rep in range(args.repeats):
        for n in counts:
            busy = busy_groups()
            seconds, tf, restarts = timed_run(model, ids, args.window, n)
            reference = tf if reference is None else reference
            res["runs"].append({"repeat": rep, "workers": n, "seconds": seconds, "busy_groups": busy,
                                "loadavg": loadavg(), "worker_restarts": restarts,
                                "same_table": same_table(reference, tf)})
            print(f"[bench] repeat {rep} workers {n}: {seconds:.1f} s ({res['tokens'] / seconds:.1f} tokens/s), "
                  f"{busy} other busy groups", file=sys.stderr)
    res["loadavg_end"] = loadavg()
    serial = [r for r in res["runs"] if r["workers"] == 1]
    res["parts"]["window_idle_s"] = float(np.median([r["seconds"] / len(spans) * share(1, r["busy_groups"])
                                                     for r in serial]))
    res["summary"] = summarize(res, counts)
    return res


def summarize(res, counts):
    """Per worker count: median seconds, tokens/s, speedup over 1 worker, and the cost model's
    prediction (the median over runs, each at the load measured before it) and on idle cores."""
    rows, W, parts = [], res["windows"], res["parts"]
    base = np.median([r["seconds"] for r in res["runs"] if r["workers"] == 1])
    for n in counts:
        runs = [r for r in res["runs"] if r["workers"] == n]
        seconds = float(np.median([r["seconds"] for r in runs]))
        rows.append({"workers": n, "seconds": seconds, "tokens_per_s": res["tokens"] / seconds,
                     "speedup": float(base / seconds), "busy_groups": [r["busy_groups"] for r in runs],
                     "predicted_s_at_load": float(np.median([predict(parts, W, n, r["busy_groups"])
                                                             for r in runs])),
                     "predicted_speedup_idle": predict(parts, W, 1) / predict(parts, W, n),
                     "all_same_table": all(r["same_table"] for r in runs),
                     "worker_restarts": sum(r["worker_restarts"] for r in runs)})
    return rows


def markdown(res):
    p, m = res["parts"], res["machine"]
    lines = [f"{res['model']}, {res['tokens']} tokens in {res['windows']} windows of {res['window']}, "
             f"1 BLAS thread per process; {m['cpu']}, {m['cores']} cores, {res['blas']}; "
             f"loadavg {res['loadavg_start']} -> {res['loadavg_end']}; CPU shared between "
             f"{'sessions (sched_autogroup)' if res['autogroup'] else 'processes'}",
             "parts: start (cold workers: spawn, import, load) " +
             ", ".join(f"{n} workers {s:.2f} s" for n, s in p["start_s"].items()) +
             f"; one window {p['window_idle_s']:.2f} s on an idle core (from the 1-worker runs); "
             f"result {p['result_bytes'] / 1e6:.2f} MB, pickled + unpickled in {p['result_s'] * 1e3:.1f} ms",
             "",
             "| workers | other busy groups, per run | median s | tokens/s | speedup | predicted s at that load "
             "| predicted speedup on idle cores | same table | worker restarts |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in res["summary"]:
        lines.append(f"| {r['workers']} | {', '.join(map(str, r['busy_groups']))} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['predicted_s_at_load']:.1f} | {r['predicted_speedup_idle']:.2f}x | "
                     f"{r['all_same_table']} | {r['worker_restarts']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens (default 1024: 4 windows of 256)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated, 1 first (the baseline)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of markdown")
    args = p.parse_args()
    if not args.workers.startswith("1,"):
        p.error("--workers must start with 1, the baseline (e.g. 1,2 or 1,2,4)")
    res = run(args)
    print(json.dumps(res, indent=1) if args.json else markdown(res))


if __name__ == "__main__":
    main()
