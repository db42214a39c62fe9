"""Cost of looking inside: run_with_cache and the full 2L-point logit lens vs one plain forward.

    python bench/lens.py [--model smollm2-135m] [--threads 1] [--tokens 64] [--repeats 7]

Prints medians (interleaved repeats, BLAS threads pinned) of: a plain forward over a prompt,
run_with_cache caching every residual point (2L exit points + resid_pre), and minee.lens.lens
decoding all 2L exit points, with the ratios to the plain forward.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minee                                       # noqa: E402
from minee.lens import lens                        # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    minee.set_threads(args.threads)
    model = minee.load(args.model)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, args.tokens)
    runs = {"forward": lambda: model.forward(ids),
            "run_with_cache (all resid points)": lambda: model.run_with_cache(ids, names="blocks.*.hook_resid_*"),
            "lens (all 2L points, top-5)": lambda: lens(model, ids)}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = np.median(times["forward"])
    print(f"{args.model}, {args.tokens} tokens, {minee.get_threads()} BLAS thread(s), median of {args.repeats}:")
    for name, ts in times.items():
        print(f"  {name:36s} {np.median(ts) * 1e3:8.1f} ms  {np.median(ts) / base:6.2f}x forward")


if __name__ == "__main__":
    main()
