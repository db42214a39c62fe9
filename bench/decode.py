"""Prefill and decode speed of minee against transformers (torch, CPU, float32) on the same model.

    python bench/decode.py [--threads 1] [--prompt-len 128] [--new-tokens 64] [--repeats 5]
                           [--cold-repeats 3] [--model smollm2-135m] [--hf-attn sdpa] [--budget 150] [--json]

What it does, in one process so machine noise hits both engines alike:
  1. pins thread counts: threadpoolctl.threadpool_limits(n) for NumPy's BLAS (and any OpenMP
     pool), torch.set_num_threads(n) for torch; prints the BLAS libraries it found.
  2. loads the model twice: minee.load(dir) and AutoModelForCausalLM.from_pretrained(dir,
     gguf_file=<the .gguf in dir>) (or from the HF files in dir when there is no .gguf).
  3. per repeat, minee then transformers (A, B, A, B, ...): prefill a fixed random prompt into a
     fresh KV cache, then --new-tokens greedy single-token steps through the cache. Each step is
     timed (forward + argmax). Medians over repeats.
  4. memory-bandwidth ceiling: decode reads every weight once per token (30 layers + LM head,
     ~538 MB for SmolLM2-135M in float32), so tokens/s <= bandwidth / weight bytes. Bandwidth is
     measured here with the same thread count: BLAS sgemv over a 512 MB matrix (a pure read
     stream, the access pattern of decode), sampled before, between and after the runs; np.add,
     copy and torch.mv (torch's own BLAS) for reference.
  5. where minee's decode step goes: attention sub-layers, MLP sub-layers, LM head, the rest,
     timed by calling model.attn_sublayer / model.mlp_sublayer / model.unembed on a decode step;
     the rest is a forward with those stubbed out (minee itself is never modified).
  6. sanity check: both engines' greedy tokens must agree (text prompt and the random prompt).
  7. cold prefill: a new interpreter per measurement loads one engine (untimed; minee's without
     importing torch, as `python -m minee generate` runs) and times its first prefill of the same
     prompt, then a second one; minee, transformers, minee, ... (--cold-repeats each), medians.
     minee's processes also report the peak memory loading took (VmHWM over the resident size
     before), in float32 model sizes.
     A process's first products can cost more than later ones (OpenBLAS maps its packing buffer
     on first use; issue 21), and every CLI call is a fresh process.
  The BLAS library, version and CPU kernel each process ran (threadpoolctl) are in the report.

Progress goes to stderr; the report (markdown, or JSON with --json) to stdout.
"""
import argparse
import copy
import datetime
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SANITY_PROMPT = "The capital of France is"
SANITY_TOKENS = 8          # greedy tokens compared on the text prompt
AGREE_FIRST = 5            # "first few tokens" of the random-prompt runs that must match
BW_MB = 512                # size of each bandwidth-test array


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64)))


# ----------------------------------------------------------------------------- environment

def blas_report(threadpool_info):
    """The thread pools threadpoolctl sees (NumPy's BLAS, torch's OpenMP) + torch's own BLAS."""
    import torch
    pools = [{k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version", "architecture",
                                    "threading_layer", "num_threads", "filepath")}
             for p in threadpool_info()]
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    torch_blas = found.group(1) if found else "unknown"
    mkl = re.search(r"Math Kernel Library Version (\S+)", torch.__config__.parallel_info())
    if mkl:
        torch_blas += f" {mkl.group(1)}"
    return {"threadpools": pools, "torch_blas": torch_blas,
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads()}


def machine_report():
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:                              # "always [madvise] never": NumPy's huge pages need madvise or always
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        thp = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit, "transparent_hugepage": thp,
            # NumPy advises huge pages for arrays >= 4 MB unless this is 0 (slow first forwards, README)
            "NUMPY_MADVISE_HUGEPAGE": os.environ.get("NUMPY_MADVISE_HUGEPAGE")}


def busy_cores(seconds=1.0):
    """Cores kept busy by other processes, from /proc/stat over `seconds` while this one sleeps."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]                           # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def loadavg():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


# ----------------------------------------------------------------------------- loading

def load_hf(model_dir, hf_attn):
    """transformers' model from the .gguf in model_dir (as the tests load it), else its HF files."""
    import torch
    from transformers import AutoModelForCausalLM
    ggufs = sorted(model_dir.glob("*.gguf"))
    kwargs = dict(dtype=torch.float32, attn_implementation=hf_attn)
    if ggufs:
        kwargs["gguf_file"] = ggufs[0].name
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs).eval()
    assert next(hf.parameters()).dtype == torch.float32
    return hf, ggufs[0].name if ggufs else "safetensors"


def load_models(src, hf_attn):
    import minee
    model_dir = minee.resolve(src)
    t = time.perf_counter()
    mm = minee.load(model_dir)
    minee_load_s = time.perf_counter() - t
    t = time.perf_counter()
    hf, hf_from = load_hf(model_dir, hf_attn)
    hf_load_s = time.perf_counter() - t
    source = {"dir": str(model_dir), "transformers_from": hf_from,
              "minee_load_s": minee_load_s, "transformers_load_s": hf_load_s,
              "transformers_attn_implementation": hf.config._attn_implementation}
    return mm, hf, source


def prompt_ids(vocab_size, args):
    return np.random.default_rng(args.seed).integers(0, vocab_size, size=args.prompt_len).astype(np.int64)


def blas_kernels(threadpool_info):
    """'openblas 0.3.31 Haswell x1': each BLAS library threadpoolctl finds, its version, CPU kernel, threads."""
    return ", ".join(f"{p['internal_api']} {p['version']} {p.get('architecture')} x{p['num_threads']}"
                     for p in threadpool_info() if p["user_api"] == "blas") or "none found"


# ----------------------------------------------------------------------------- one timed run each

def run_minee(model, ids, n_new):
    """Prefill ids into a fresh cache, then n_new greedy single-token steps. Times in seconds."""
    kv = model.new_kv_cache(1, len(ids) + n_new + 1)
    t0 = time.perf_counter()
    logits = model.forward(ids, kv_cache=kv)[0, -1]
    tok = int(np.argmax(logits))
    prefill = time.perf_counter() - t0
    tokens, steps = [tok], []
    for _ in range(n_new):
        t0 = time.perf_counter()
        tok = int(np.argmax(model.forward(np.array([tok]), kv_cache=kv)[0, -1]))
        steps.append(time.perf_counter() - t0)
        tokens.append(tok)
    return {"prefill_s": prefill, "step_s": steps, "tokens": tokens, "last_prefill_logits": logits}


def _cache_kwarg(model):
    """transformers 5.x renamed `past_key_values` to `cache` (the old name warns); use what forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_hf(model, ids, n_new):
    import torch
    key = _cache_kwarg(model)
    with torch.inference_mode():
        x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        prefill = time.perf_counter() - t0
        logits = out.logits[0, -1].float().numpy().copy()
        past = getattr(out, key)
        tokens, steps = [tok], []
        for _ in range(n_new):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{key: past})
            tok = int(out.logits[0, -1].argmax())
            past = getattr(out, key)
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
    return {"prefill_s": prefill, "step_s": steps, "tokens": tokens, "last_prefill_logits": logits}


def cold_worker(engine, args):
    """In this fresh interpreter: load one engine (untimed), time its first prefill, then a second."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import minee
    model_dir = minee.resolve(args.model)
    load_peak = None
    if engine == "minee":                                   # no torch in this process, as in minee's CLI
        minee.set_threads(args.threads)
        before = status_kb("VmRSS:")
        model = minee.load(model_dir)
        fp32 = sum(a.nbytes for a in model.params.values())
        load_peak = (status_kb("VmHWM:") - before) * 1024 / fp32    # what loading held, in float32 model sizes
        ids, run = prompt_ids(model.config.vocab_size, args), run_minee
    else:
        import torch
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
        model = load_hf(model_dir, args.hf_attn)[0]
        ids, run = prompt_ids(model.config.vocab_size, args), run_hf
    first = run(model, ids, 0)["prefill_s"]
    second = run(model, ids, 0)["prefill_s"]
    blas = (blas_kernels(threadpool_info) if engine == "minee"
            else f"torch {blas_report(threadpool_info)['torch_blas']} x{args.threads}")
    return {"first_s": first, "second_s": second, "blas": blas, "load_peak": load_peak}


def status_kb(key):
    """A /proc/self/status figure in kB (VmRSS: resident now, VmHWM: the peak so far)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))


def run_cold(engine, args):
    cmd = [sys.executable, __file__, "--cold-worker", engine, "--model", args.model, "--threads",
           str(args.threads), "--prompt-len", str(args.prompt_len), "--seed", str(args.seed),
           "--hf-attn", args.hf_attn]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"cold {engine} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def summarize_cold(runs, prompt_len):
    return {"prefill_tok_s": prompt_len / median([r["first_s"] for r in runs]),
            "second_prefill_tok_s": prompt_len / median([r["second_s"] for r in runs]),
            "first_s": [r["first_s"] for r in runs], "second_s": [r["second_s"] for r in runs],
            "blas": sorted({r["blas"] for r in runs}),
            "load_peak": max((r["load_peak"] for r in runs if r["load_peak"] is not None), default=None)}


def summarize(runs, prompt_len):
    prefill = [r["prefill_s"] for r in runs]
    decode = [sum(r["step_s"]) for r in runs]
    n = len(runs[0]["step_s"])
    steps = [s for r in runs for s in r["step_s"]]
    return {"prefill_tok_s": prompt_len / median(prefill), "prefill_s": prefill,
            "decode_tok_s": n / median(decode), "decode_s": decode,
            "decode_ms_per_token": 1e3 * median(decode) / n,
            "decode_step_ms_p10_p50_p90": [1e3 * float(np.percentile(steps, p)) for p in (10, 50, 90)],
            "decode_tok_s_per_repeat": [n / d for d in decode],
            "prefill_tok_s_per_repeat": [prompt_len / p for p in prefill]}


# ----------------------------------------------------------------------------- bandwidth

def weight_bytes(model):
    """Bytes of float32 weights read per decoded token, split by where decode reads them."""
    p = model.params
    layers = {"attn": 0, "mlp": 0}
    for name, a in p.items():
        if name.startswith("model.layers."):
            key = "mlp" if (".mlp." in name or "post_attention_layernorm" in name) else "attn"
            layers[key] += a.nbytes
    head = model.lm_head.nbytes + model.final_norm.nbytes        # tied: the embedding, counted once
    return {"attn": layers["attn"], "mlp": layers["mlp"], "lm_head": head,
            "total": layers["attn"] + layers["mlp"] + head}


def kv_bytes_per_token(model, positions):
    """Bytes of K and V read by one decode step attending to `positions` positions."""
    c = model.config
    return 2 * c.n_layers * c.n_kv_heads * positions * c.head_dim * 4


def sgemv_read(W, x, y):
    """One BLAS sgemv y = W @ x: a pure read stream of W, the access pattern of decode."""
    np.dot(W, x, out=y)


class Bandwidth:
    """Streaming bandwidth with the current thread settings, over arrays of BW_MB each.

    Sampled before the timed runs, after each repeat (sgemv/torch.mv only) and after: the median
    over all samples is the ceiling, so it sees the same machine noise as the runs.
    """

    def __init__(self, threads):
        n = BW_MB * 2 ** 20 // 4
        self.threads = threads
        self.a = np.full(n, 1.0, np.float32)
        self.b = np.full(n, 2.0, np.float32)
        self.c = np.empty(n, np.float32)                     # written once below: pages are mapped
        self.c[:] = 0
        self.W = self.a.reshape(-1, 1024)                    # (131072, 1024) matrix for sgemv
        self.x = np.ones(1024, np.float32)
        self.y = np.empty(self.W.shape[0], np.float32)
        self.pool = ThreadPoolExecutor(threads)
        import torch
        self.Wt, self.xt, self.yt = (torch.from_numpy(a) for a in (self.W, self.x, self.y))   # shared memory
        self.samples = {"sgemv_read": [], "add_3x": [], "copy_2x": [], "torch_mv_read": []}

    def _par(self, fn, *arrays):
        """fn over `threads` contiguous chunks of the arrays, in parallel (ufuncs release the GIL)."""
        parts = [np.array_split(a, self.threads) for a in arrays]
        list(self.pool.map(lambda args: fn(*args), zip(*parts)))

    def measure(self, reps=7, only=None):
        import torch
        nbytes = self.a.nbytes
        tests = {"sgemv_read": (lambda: sgemv_read(self.W, self.x, self.y), nbytes),
                 "add_3x": (lambda: self._par(lambda a, b, c: np.add(a, b, out=c), self.a, self.b, self.c),
                            3 * nbytes),
                 "copy_2x": (lambda: self._par(np.copyto, self.c, self.a), 2 * nbytes),
                 "torch_mv_read": (lambda: torch.mv(self.Wt, self.xt, out=self.yt), nbytes)}
        for name, (fn, moved) in tests.items():
            if only and name not in only:
                continue
            fn()
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                self.samples[name].append(moved / (time.perf_counter() - t0))

    def result(self):
        out = {name: median(v) for name, v in self.samples.items()}
        out["ceiling_source"] = "sgemv_read"
        out["ceiling"] = out["sgemv_read"]
        return out

    def close(self):
        self.pool.shutdown()
        del self.a, self.b, self.c, self.W, self.Wt, self.xt, self.yt


# ----------------------------------------------------------------------------- minee breakdown

def skeleton(model):
    """A shallow copy of the model whose forward does everything except the heavy parts.

    Its attention/MLP sub-layers return zeros and its LM head has one row, so timing its forward
    measures the rest directly: id checks, embedding lookup, hook calls, residual adds, final norm,
    cache bookkeeping (the Python around the math). The real model is untouched.
    """
    sk = copy.copy(model)
    zeros = np.zeros((1, 1, model.config.d_model), np.float32)
    sk.attn_sublayer = lambda l, x, positions, kv_cache=None, rows=None: zeros
    sk.mlp_sublayer = lambda l, x: zeros
    sk.lm_head = model.lm_head[:1]
    return sk


def breakdown(model, ids, reps, deadline=float("inf")):
    """ms of one minee decode step by part, at position len(ids), timed through the model's methods.

    Each rep times: one real model.forward (total); the same step rebuilt from model.attn_sublayer,
    model.mlp_sublayer (summed over layers) and model.unembed (final norm + LM head); and the
    skeleton forward (the rest). Medians and minima over reps (the minimum is the better estimate
    of the intrinsic cost on a busy machine: noise only adds time).
    """
    L = model.config.n_layers
    kv = model.new_kv_cache(1, len(ids) + 1)
    model.forward(ids, kv_cache=kv)
    start = kv.length
    positions = np.array([[start]])                      # (1, 1)
    tok = np.array([[int(ids[-1])]])
    sk = skeleton(model)
    t = {"total": [], "attention": [], "mlp": [], "lm_head": [], "rest": []}
    for rep in range(reps):
        if rep >= 3 and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        model.forward(tok, kv_cache=kv)
        t["total"].append(time.perf_counter() - t0)
        kv.length = start                                    # same position again next time
        x = model.embed_tokens[tok]                          # (1, 1, D)
        ta = tm = 0.0
        for l in range(L):
            t0 = time.perf_counter()
            a = model.attn_sublayer(l, x, positions, kv)
            t1 = time.perf_counter()
            x = x + a
            t2 = time.perf_counter()
            m = model.mlp_sublayer(l, x)
            t3 = time.perf_counter()
            x = x + m
            ta += t1 - t0
            tm += t3 - t2
        t0 = time.perf_counter()
        model.unembed(x)
        t["lm_head"].append(time.perf_counter() - t0)
        t["attention"].append(ta)
        t["mlp"].append(tm)
        t0 = time.perf_counter()
        sk.forward(tok, kv_cache=kv)
        t["rest"].append(time.perf_counter() - t0)
        kv.length = start
    out = {}
    for stat, fn in (("median", median), ("min", min)):
        ms = {k: 1e3 * fn(v) for k, v in t.items()}
        ms["unaccounted"] = ms["total"] - sum(ms[k] for k in ("attention", "mlp", "lm_head", "rest"))
        out[stat] = ms
    out["reps"] = len(t["total"])
    return out, start


# ----------------------------------------------------------------------------- sanity

def sanity(mm, hf):
    """Greedy tokens of both engines on a text prompt (needs minee's tokenizer)."""
    if mm.tokenizer is None:
        return None
    ids = mm.tokenizer.encode(SANITY_PROMPT)
    a = run_minee(mm, ids, SANITY_TOKENS - 1)["tokens"]
    b = run_hf(hf, ids, SANITY_TOKENS - 1)["tokens"]
    return {"prompt": SANITY_PROMPT, "minee": a, "transformers": b, "agree": a == b,
            "minee_text": mm.tokenizer.decode(a), "transformers_text": mm.tokenizer.decode(b)}


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------- report

def _fmt(x):
    return "?" if x is None else f"{x:.1f}"


def cold_rows(r):
    if "cold" not in r:
        return []
    m, h = r["cold"]["minee"], r["cold"]["transformers"]
    return [f"| prefill tokens/s, cold (first forward of a fresh process; {len(m['first_s'])} each) | "
            f"{m['prefill_tok_s']:.1f} | {h['prefill_tok_s']:.1f} | {r['ratios']['cold_prefill']:.2f} |",
            f"| prefill tokens/s, second forward of those processes | {m['second_prefill_tok_s']:.1f} | "
            f"{h['second_prefill_tok_s']:.1f} | "
            f"{m['second_prefill_tok_s'] / h['second_prefill_tok_s']:.2f} |",
            f"| minee prefill, warm / cold | {r['minee']['prefill_tok_s'] / m['prefill_tok_s']:.2f} | | |",
            f"| BLAS in the cold processes | {', '.join(m['blas'])} | {', '.join(h['blas'])} | |",
            f"| minee's peak memory while loading, in float32 model sizes (max of the cold processes) | "
            f"{m['load_peak']:.2f} | | |"]


def markdown(r):
    a, s = r["args"], r["settings"]
    m, h = r["minee"], r["transformers"]
    bw, wb = r["bandwidth"], r["weight_bytes"]
    lines = [f"## minee vs transformers: {r['date']}",
             "",
             f"model `{a['model']}` ({r['model']['params_M']:.1f}M params, {r['model']['layers']} layers), "
             f"float32; transformers {s['transformers']} from {r['source']['transformers_from']} "
             f"(attn={r['source']['transformers_attn_implementation']}), torch {s['torch']}, "
             f"numpy {s['numpy']}",
             f"threads {a['threads']}: NumPy BLAS {s['numpy_blas']}; torch BLAS {s['torch_blas']} "
             f"(torch threads {r['env']['torch_num_threads']}); CPU {r['machine']['cpu']} x{r['machine']['cores']}; "
             f"loadavg {r['loadavg_start']} -> {r['loadavg_end']}; cores busy with other work before/after "
             f"{_fmt(r.get('busy_cores_start'))}/{_fmt(r.get('busy_cores_end'))}",
             f"prompt {a['prompt_len']} random token ids (seed {a['seed']}), {a['new_tokens']} greedy decode "
             f"steps, {r['repeats_done']} interleaved repeats, medians",
             "",
             "| | minee | transformers | minee / transformers |",
             "|---|---:|---:|---:|",
             f"| prefill tokens/s, warm | {m['prefill_tok_s']:.1f} | {h['prefill_tok_s']:.1f} | "
             f"{m['prefill_tok_s'] / h['prefill_tok_s']:.2f} |",
             *cold_rows(r),
             f"| decode tokens/s | {m['decode_tok_s']:.1f} | {h['decode_tok_s']:.1f} | "
             f"{m['decode_tok_s'] / h['decode_tok_s']:.2f} |",
             f"| decode ms/token | {m['decode_ms_per_token']:.2f} | {h['decode_ms_per_token']:.2f} | "
             f"{m['decode_ms_per_token'] / h['decode_ms_per_token']:.2f} |",
             "| decode step ms p10/p50/p90 | " + "/".join(f"{x:.1f}" for x in m["decode_step_ms_p10_p50_p90"])
             + " | " + "/".join(f"{x:.1f}" for x in h["decode_step_ms_p10_p50_p90"]) + " | |",
             f"| decode tokens/s, each repeat | {', '.join(f'{x:.1f}' for x in m['decode_tok_s_per_repeat'])} | "
             f"{', '.join(f'{x:.1f}' for x in h['decode_tok_s_per_repeat'])} | |",
             f"| fraction of bandwidth ceiling | {m['ceiling_fraction']:.0%} | {h['ceiling_fraction']:.0%} | |",
             "",
             "Bandwidth ceiling for decode (weights read once per token):",
             "",
             "| | value |",
             "|---|---:|",
             f"| weight bytes / token (layers + LM head, tied head once) | {wb['total'] / 1e6:.1f} MB "
             f"(attn {wb['attn'] / 1e6:.1f}, mlp {wb['mlp'] / 1e6:.1f}, head {wb['lm_head'] / 1e6:.1f}) |",
             f"| + KV cache read / token (mean over decode) | {r['kv_bytes_per_token_mean'] / 1e6:.1f} MB |",
             f"| measured bandwidth, sgemv read ({BW_MB} MB, {a['threads']} thr) = ceiling | "
             f"{bw['sgemv_read'] / 1e9:.1f} GB/s |",
             f"| for reference: np.add (3 arrays) / copy (2 arrays), {a['threads']} Python thr | "
             f"{bw['add_3x'] / 1e9:.1f} / {bw['copy_2x'] / 1e9:.1f} GB/s |",
             f"| for reference: torch.mv read (torch's BLAS, {a['threads']} thr) | "
             f"{bw['torch_mv_read'] / 1e9:.1f} GB/s |",
             f"| ceiling decode tokens/s (bandwidth / weight bytes) | {r['ceiling_tok_s']:.1f} |",
             f"| minee achieved | {m['achieved_bytes_s'] / 1e9:.1f} GB/s = "
             f"{m['ceiling_fraction']:.0%} of ceiling |",
             f"| transformers achieved | {h['achieved_bytes_s'] / 1e9:.1f} GB/s = "
             f"{h['ceiling_fraction']:.0%} of ceiling |",
             "",
             f"Where minee's decode step goes (position {r['breakdown_position']}, "
             f"{r['breakdown_reps']} steps; rest = the same forward with the sub-layers and LM head stubbed out):",
             "",
             "| part | ms/token, median | share | ms/token, min | weight-streaming bound ms |",
             "|---|---:|---:|---:|---:|"]
    med, low = r["breakdown_ms"]["median"], r["breakdown_ms"]["min"]
    bound = {"attention": wb["attn"], "mlp": wb["mlp"], "lm_head": wb["lm_head"], "total": wb["total"]}
    for part in ("attention", "mlp", "lm_head", "rest", "unaccounted", "total"):
        b = f"{1e3 * bound[part] / bw['ceiling']:.2f}" if part in bound else ""
        label = "total (one model.forward)" if part == "total" else part
        lo = "" if part == "unaccounted" else f"{low[part]:.2f}"
        lines.append(f"| {label} | {med[part]:.2f} | {med[part] / med['total']:.0%} | {lo} | {b} |")
    busy = max(x for x in (r.get("busy_cores_start"), r.get("busy_cores_end"), 0) if x is not None)
    if busy + a["threads"] > r["machine"]["cores"] + 0.3:
        lines += ["", f"NOTE: the machine was busy (other processes kept {busy:.1f} of {r['machine']['cores']} "
                      f"cores busy just before/after the run, and it used {a['threads']} thread(s)): "
                      "absolute numbers are depressed and "
                      "noisy; the interleaved ratios are the more robust result."]
    sv, ag = r["sanity"], r["agreement"]
    lines += ["", "Sanity check (greedy):"]
    if sv:
        lines.append(f"- {sv['prompt']!r}: minee {sv['minee_text']!r} / transformers "
                     f"{sv['transformers_text']!r} -> {'AGREE' if sv['agree'] else 'DIFFER'} "
                     f"({sv['minee']} vs {sv['transformers']})")
    lines.append(f"- random prompt: first {ag['first_k']} tokens {'AGREE' if ag['first_k_agree'] else 'DIFFER'}; "
                 f"common prefix {ag['common_prefix']}/{ag['n_tokens']} tokens; prefill last-position "
                 f"logits max |diff| {ag['prefill_logits_max_abs_diff']:.2e}; runs deterministic: "
                 f"{ag['deterministic']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for prefill (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per engine (default 5)")
    p.add_argument("--model", default="smollm2-135m", help="known name or HF-style directory")
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"),
                   help="transformers attention implementation (default sdpa, its default on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--breakdown-reps", type=int, default=20, help="decode steps timed for the breakdown")
    p.add_argument("--budget", type=float, default=150.0,
                   help="stop starting new repeats after this many seconds of timed runs, and cut the "
                        "breakdown short 30 s later (default 150; keeps a run under ~5 min on a busy machine)")
    p.add_argument("--cold-repeats", type=int, default=3,
                   help="fresh processes per engine timing their first prefill (default 3; 0: none)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.add_argument("--cold-worker", choices=("minee", "transformers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_repeats < 0:
        p.error("--cold-repeats must be >= 0")
    for k in ("threads", "prompt_len", "new_tokens", "repeats", "breakdown_reps"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cold_worker:
        print(json.dumps(cold_worker(args.cold_worker, args)))
        return 0
    import torch
    import transformers
    from threadpoolctl import threadpool_info, threadpool_limits

    limiter = threadpool_limits(limits=args.threads)         # noqa: F841  kept for the whole run
    torch.set_num_threads(args.threads)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start, busy_start = loadavg(), busy_cores()

    log(f"loading {args.model} in minee and transformers ...")
    mm, hf, source = load_models(args.model, args.hf_attn)
    threadpool_limits(limits=args.threads)                   # also cover pools loaded by the imports
    torch.set_num_threads(args.threads)
    env = blas_report(threadpool_info)
    blas = [p for p in env["threadpools"] if p["user_api"] == "blas"]
    numpy_blas = ", ".join(f"{p['internal_api']} {p['version']} {p['architecture']} "
                           f"{p.get('threading_layer')} x{p['num_threads']}" for p in blas) or "none found"
    log(f"threads {args.threads}: NumPy BLAS {numpy_blas}; torch BLAS {env['torch_blas']} "
        f"x{env['torch_num_threads']}")
    for p in env["threadpools"]:
        log(f"  threadpool {p['user_api']}/{p['internal_api']} {p['prefix']} threads={p['num_threads']} "
            f"arch={p.get('architecture')} {p['filepath']}")

    c = mm.config
    max_pos = min(c.max_position_embeddings, hf.config.max_position_embeddings)
    if args.prompt_len + args.new_tokens + 1 > max_pos:
        raise SystemExit(f"prompt-len + new-tokens exceeds the model's {max_pos} positions")
    ids = prompt_ids(c.vocab_size, args)

    log("bandwidth (before) ...")
    bw = Bandwidth(args.threads)
    bw.measure()

    log("warm-up + sanity check ...")
    short = ids[:min(16, len(ids))]
    run_minee(mm, short, 4)
    run_hf(hf, short, 4)
    sane = sanity(mm, hf)

    runs = {"minee": [], "transformers": []}
    t_start = time.perf_counter()
    for r in range(args.repeats):
        if r and time.perf_counter() - t_start > args.budget:
            log(f"WARNING: stopping after {r} repeats: over the --budget of {args.budget:.0f} s "
                "(a busy machine? see loadavg)")
            break
        runs["minee"].append(run_minee(mm, ids, args.new_tokens))
        runs["transformers"].append(run_hf(hf, ids, args.new_tokens))
        m, h = runs["minee"][-1], runs["transformers"][-1]
        log(f"repeat {r + 1}/{args.repeats}: decode minee {args.new_tokens / sum(m['step_s']):.1f} tok/s, "
            f"transformers {args.new_tokens / sum(h['step_s']):.1f} tok/s; prefill minee "
            f"{args.prompt_len / m['prefill_s']:.0f}, transformers {args.prompt_len / h['prefill_s']:.0f} tok/s "
            f"(loadavg {loadavg()})")
        bw.measure(reps=2, only=("sgemv_read", "torch_mv_read"))   # bandwidth under the same noise

    cold = {"minee": [], "transformers": []}
    for r in range(args.cold_repeats):
        for engine in cold:
            log(f"cold prefill {r + 1}/{args.cold_repeats}: {engine} in a fresh process ...")
            cold[engine].append(run_cold(engine, args))

    log("minee decode breakdown ...")
    bd, position = breakdown(mm, np.concatenate([ids, runs["minee"][0]["tokens"][:args.new_tokens // 2]]),
                             args.breakdown_reps, deadline=t_start + args.budget + 30)

    log("bandwidth (after) ...")
    bw.measure()
    bandwidth = bw.result()
    bw.close()

    wb = weight_bytes(mm)
    kv_mean = float(np.mean([kv_bytes_per_token(mm, args.prompt_len + 1 + i) for i in range(args.new_tokens)]))
    result = {"date": date, "args": vars(args), "repeats_done": len(runs["minee"]),
              "machine": machine_report(), "env": env, "source": source,
              "settings": {"numpy": np.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "numpy_blas": numpy_blas,
                           "torch_blas": env["torch_blas"]},
              "model": {"params_M": c.n_params / 1e6, "layers": c.n_layers, "d_model": c.d_model,
                        "vocab": c.vocab_size},
              "weight_bytes": wb, "kv_bytes_per_token_mean": kv_mean,
              "bandwidth": bandwidth, "bandwidth_samples": bw.samples,
              "ceiling_tok_s": bandwidth["ceiling"] / wb["total"],
              "breakdown_ms": bd, "breakdown_position": position, "breakdown_reps": bd["reps"],
              "sanity": sane}
    for name in runs:
        s = summarize(runs[name], args.prompt_len)
        s["achieved_bytes_s"] = s["decode_tok_s"] * wb["total"]
        s["ceiling_fraction"] = s["achieved_bytes_s"] / bandwidth["ceiling"]
        s["tokens"] = runs[name][0]["tokens"]
        result[name] = s
    ta, tb = result["minee"]["tokens"], result["transformers"]["tokens"]
    k = min(AGREE_FIRST, len(ta))
    result["agreement"] = {
        "first_k": k, "first_k_agree": ta[:k] == tb[:k], "common_prefix": common_prefix(ta, tb),
        "n_tokens": len(ta),
        "deterministic": all(r["tokens"] == ta for r in runs["minee"])
        and all(r["tokens"] == tb for r in runs["transformers"]),
        "prefill_logits_max_abs_diff": float(np.max(np.abs(
            runs["minee"][0]["last_prefill_logits"] - runs["transformers"][0]["last_prefill_logits"])))}
    result["ratios"] = {"prefill": result["minee"]["prefill_tok_s"] / result["transformers"]["prefill_tok_s"],
                        "decode": result["minee"]["decode_tok_s"] / result["transformers"]["decode_tok_s"]}
    if args.cold_repeats:
        result["cold"] = {name: summarize_cold(cold[name], args.prompt_len) for name in cold}
        result["ratios"]["cold_prefill"] = (result["cold"]["minee"]["prefill_tok_s"]
                                            / result["cold"]["transformers"]["prefill_tok_s"])
    result["loadavg_start"], result["loadavg_end"] = load_start, loadavg()
    result["busy_cores_start"], result["busy_cores_end"] = busy_start, busy_cores()

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result))
    ok = result["agreement"]["first_k_agree"] and (sane is None or sane["agree"])
    if not ok:
        log("WARNING: minee and transformers greedy tokens disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
