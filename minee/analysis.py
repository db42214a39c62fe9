"""The paper's experiments E1-E6 (see docs/paper.md) over a corpus, teacher-forced.

`teacher_forced` runs the model over the corpus in windows and keeps, for every exit point p
and every token n, what a gate could look at (top-1, confidence, margin, entropy, cosine to the
previous state) and the lens's KL to the final distribution. Everything else is cheap array
arithmetic on those (P, N) tables, so each experiment is a short function.
"""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .exits import (KV_MODES, Gate, cosine, default_min_point, first_match_point, patience_runs, stable_point,
                    train_learned_gate)
from .hooks import exit_point_names
from .lens import check_window, decoded_stats, final_distribution, shortcut_label, windows
from .limits import CORPUS_PIECE_CHARS
from .parallel import map_windows
from .shortcuts import Shortcuts, read_npz_array

DEFAULT_CORPUS = Path(__file__).parent / "data" / "corpus.txt"
MODERN_PROSE = Path(__file__).parent / "data" / "modern_prose.txt"     # held-out text for shortcuts (E7)
BUCKETS = ("word_initial", "continuation", "other")


@dataclass
class TeacherForced:
    """Per exit point p and corpus token n (the prediction made at position n)."""
    top1: np.ndarray          # (P, N) lens top-1 id
    confidence: np.ndarray    # (P, N) max probability
    margin: np.ndarray        # (P, N) top-1 minus top-2 probability
    entropy: np.ndarray       # (P, N) nats
    cosine: np.ndarray        # (P, N) cos(h_p, h_{p-1}); h_{-1} is the embedding
    kl: np.ndarray            # (P, N) KL(final || point), nats
    targets: np.ndarray       # (N,) the gold next token
    inputs: np.ndarray        # (N,) the token at position n

    @property
    def final_top1(self):
        return self.top1[-1]

    def features(self, points):
        """Gate features at the given points: name -> (len(points), N)."""
        P = self.top1.shape[0]
        f = {k: getattr(self, k)[points] for k in ("confidence", "margin", "entropy", "cosine", "top1")}
        f["depth"] = np.broadcast_to((np.asarray(points) / (P - 1))[:, None], f["top1"].shape)
        return f


def corpus_file(path=None):
    """The text file a run reads (default: minee's evaluation corpus), checked to exist: the CLI
    calls it before loading a model, so that a mistyped --corpus fails at once."""
    path = Path(path or DEFAULT_CORPUS)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found")
    return path


def corpus_ids(tokenizer, path=None, max_tokens=None, skip=0):
    """Token ids of the evaluation corpus (or any text file): the first max_tokens (None = all)
    after `skip` (e.g. skip the tokens shortcuts were fitted on, to score held-out text). Asking
    for more tokens than the text holds is an error, not a silently longer run.

    A corpus may be long: it is read and tokenized in pieces (corpus_pieces), and reading stops
    as soon as skip + max_tokens tokens are there, so the memory tokenizing takes is one piece's
    however long the file is."""
    path = corpus_file(path)
    if skip < 0:
        raise ValueError(f"skip (--skip-tokens) must be >= 0, got {skip}")
    want = skip + max_tokens if max_tokens is not None and max_tokens >= 2 else None
    parts, n = [np.zeros(0, np.int64)], 0
    for i, piece in enumerate(corpus_pieces(path)):
        parts.append(np.array(tokenizer.encode(piece, add_special_tokens=i == 0), dtype=np.int64))
        n += len(parts[-1])
        if want is not None and n >= want:
            break
    ids = np.concatenate(parts)[skip:]
    holds = f"{len(ids):,} tokens" + (f" after the {skip:,} skipped" if skip else "")
    if max_tokens is not None and not 2 <= max_tokens <= len(ids):
        raise ValueError(f"max_tokens={max_tokens} does not fit the corpus {path.name}, which holds {holds}: "
                         f"use 2 .. {len(ids)}, or all of it (--max-tokens all, max_tokens=None)")
    if len(ids) < 2:
        raise ValueError(f"the corpus {path} holds {holds}; it needs at least 2")
    return ids[:max_tokens]


def corpus_pieces(path):
    """The text of a corpus file in pieces of at most CORPUS_PIECE_CHARS characters, each ending
    after its last line break (cut at the limit only inside a longer line), for tokenizing one at
    a time. Where a piece ends, tokens may differ from tokenizing the whole text at once (a word
    cut in two, a SentencePiece space mark at the piece's start): at most once per piece, never
    in a file shorter than a piece, such as minee's own corpus."""
    rest = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            text = rest + f.read(CORPUS_PIECE_CHARS - len(rest))
            if len(text) < CORPUS_PIECE_CHARS:                  # the end of the file
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1 or len(text)
            yield text[:cut]
            rest = text[cut:]


def check_run_sizes(window, gen_prompts=None, gen_tokens=None):
    """The sizes of an analysis run, checked before any work (None = the scaled default)."""
    check_window(window)
    if gen_prompts is not None and gen_prompts < 0:
        raise ValueError(f"gen_prompts (E5 prompts) must be >= 0 (0 skips E5), got {gen_prompts}")
    if gen_tokens is not None and gen_tokens < 1:
        raise ValueError(f"gen_tokens (tokens generated per E5 prompt) must be >= 1, got {gen_tokens}")


def teacher_forced(model, ids, window=256, context=128, progress=True, shortcut=None, workers=1):
    """Tabulate every exit point over the corpus ids, `window` scored tokens at a time.

    Each window is preceded by up to `context` earlier tokens that the model sees but that are
    not scored, so no prediction is made from a cut-off context. shortcut: decode every point
    through these shortcuts (minee.shortcuts) instead of plainly. workers: processes computing
    windows side by side (minee.parallel; the same table). Returns (table, perplexity).
    """
    if len(ids) < 2:
        raise ValueError(f"teacher forcing needs at least 2 tokens (an input and its next token), got {len(ids)}")
    if shortcut is not None:
        shortcut.check_model(model)
    maps = () if shortcut is None else (shortcut.weight, shortcut.bias)       # arrays travel once per worker
    spans = windows(len(ids) - 1, window, context)                          # every position with a next token
    parts = list(map_windows(window_part, model, spans, np.asarray(ids), *maps, workers=workers,
                             desc="teacher-forced", progress=progress))
    nll = np.concatenate([p.pop("nll") for p in parts])
    table = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
    return TeacherForced(**table), float(np.exp(nll.mean()))


def window_part(model, begin, s, end, ids, *maps):
    """One window's columns of the table, and the NLL of its targets: scored positions s .. end-1,
    seen after positions begin .. s-1. maps: a shortcut's (weight, bias), or nothing."""
    names = ["hook_embed"] + exit_point_names(model.config.n_layers)
    logits, acts = model.run_with_cache(ids[None, begin:end], names=names)
    scored = slice(s - begin, end - begin)                                 # positions s .. end-1
    states = np.stack([acts[n][0, scored] for n in names])                 # (1 + P, T, D)
    final_logits = logits[0, scored]                                       # (T, V)
    final = final_distribution(final_logits)
    stats = decoded_stats(model, states[1:], final, Shortcuts(*maps) if maps else None)
    part = {k: stats[k] for k in ("top1", "confidence", "margin", "entropy", "kl")}
    part["cosine"] = cosine(states[1:], states[:-1])
    targets = ids[s + 1:end + 1]
    part["targets"], part["inputs"] = targets, ids[s:end]
    gold = final_logits[np.arange(len(targets)), targets]                  # (T,)
    part["nll"] = (final["zmax"] - gold) + final["logsum"]                 # -log q(gold)
    return part


# ------------------------------------------------------------------ E1 natural early exit

def e1_natural(tf, perplexity):
    """Per-point agreement/accuracy/KL/entropy, oracle histograms, share needing the last point."""
    P = tf.top1.shape[0]
    stable, first = stable_point(tf.top1), first_match_point(tf.top1)
    return {
        "perplexity": perplexity, "tokens": int(tf.top1.shape[1]), "points": P,
        "agree": (tf.top1 == tf.final_top1).mean(1).tolist(),
        "accuracy": (tf.top1 == tf.targets).mean(1).tolist(),
        "kl": tf.kl.mean(1).tolist(), "entropy": tf.entropy.mean(1).tolist(),
        "final_accuracy": float((tf.final_top1 == tf.targets).mean()),
        "stable_hist": np.bincount(stable, minlength=P).tolist(),
        "first_match_hist": np.bincount(first, minlength=P).tolist(),
        "share_needing_last_point": float((stable == P - 1).mean()),
        "share_needing_last_block": float((stable >= P - 2).mean()),
        "mean_layers_stable": float(((stable + 1) / 2).mean()),
        "mean_layers_first_match": float(((first + 1) / 2).mean()),
        "saving_stable": float(1 - ((stable + 1) / P).mean()),
        "saving_first_match": float(1 - ((first + 1) / P).mean()),
    }


# ------------------------------------------------------------------ E2 gates

def gate_exits(gate, tf):
    """Exit point (N,) of every token under a gate, and LM-head checks (N,) it spent deciding."""
    P, N = tf.top1.shape
    if gate.kind == "oracle":
        return stable_point(tf.top1), np.zeros(N)
    cand = np.array([p for p in gate.candidates(P) if p < P - 1], dtype=int)    # fixed:P-1 checks nothing
    if len(cand) == 0:
        return np.full(N, P - 1), np.zeros(N)
    f = tf.features(cand)
    f["run"] = patience_runs(f["top1"], np.ones(len(cand), bool))
    decide = np.asarray(gate.decide(f), dtype=bool)                        # (C, N)
    hit = decide.any(0)
    idx = np.argmax(decide, 0)                                             # first candidate that exits
    exits = np.where(hit, cand[idx], P - 1)
    checks = np.where(hit, idx + 1, len(cand)) if gate.needs_logits else np.zeros(N)
    return exits, checks


def gate_report(gate, tf, mask=None):
    """Gate accuracy (exit = stable oracle), exit error, mean exit depth (blocks), LM-head checks."""
    exits, checks = gate_exits(gate, tf)
    stable, first = stable_point(tf.top1), first_match_point(tf.top1)
    m = np.ones(len(exits), bool) if mask is None else mask
    wrong = tf.top1[exits, np.arange(len(exits))] != tf.final_top1
    return {"gate": str(gate), "accuracy": float((exits == stable)[m].mean()),
            "accuracy_first_match": float((exits == first)[m].mean()),
            "exit_error": float(wrong[m].mean()), "mean_exit_depth": float(((exits + 1) / 2)[m].mean()),
            "lm_head_checks": float(checks[m].mean())}


def default_gate_sweep(n_points, min_point=None):
    """Threshold sweeps for every gate kind, candidate points from min_point (default: the last
    third of the network)."""
    late = {"min_point": default_min_point(n_points) if min_point is None else min_point}
    checks = len(Gate("cosine", 0.9, **late).candidates(n_points))          # patience needs K checked points
    sweeps = [Gate("confidence", t, **late) for t in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    sweeps += [Gate("margin", t, **late) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    sweeps += [Gate("entropy", t, **late) for t in (3.0, 2.0, 1.0, 0.5, 0.2, 0.05)]
    sweeps += [Gate("patience", k, **late) for k in (2, 3, 4, 6, 8) if k <= checks]
    sweeps += [Gate("cosine", t, **late) for t in (0.8, 0.9, 0.95, 0.98, 0.99, 0.995)]
    sweeps += [Gate("fixed", p) for p in range(n_points // 2, n_points, max(1, n_points // 12))]
    return sweeps + [Gate("oracle")]


def e2_gates(tf, gates):
    return [gate_report(g, tf) for g in gates]


# ------------------------------------------------------------------ E3 sub-words

def subword_buckets(tokenizer, inputs, targets):
    """Bucket (N,) of each target: 0 word-initial, 1 continuation of the previous token's word, 2 other.

    A target is a word start when its vocabulary string begins with a word-start marker (Ġ for
    byte-level BPE, ▁ for SentencePiece) or follows a token whose text does not end in a letter;
    it continues a word when it is glued (no marker) to a token ending in a letter.
    """
    ids = np.unique(np.concatenate([inputs, targets]))
    raw = {int(i): tokenizer.hf.id_to_token(int(i)) or "" for i in ids}      # e.g. "Ġworld"
    text = {int(i): tokenizer.decode([int(i)]) for i in ids}                # e.g. " world"
    out = np.empty(len(targets), dtype=np.int8)
    for n, (prev, tgt) in enumerate(zip(inputs.tolist(), targets.tolist())):
        if not text[tgt].strip()[:1].isalpha():
            out[n] = 2
        elif raw[tgt][:1] in ("Ġ", "▁") or not text[prev][-1:].isalpha():
            out[n] = 0
        else:
            out[n] = 1
    return out


def e3_subword(tf, buckets, gates):
    P = tf.top1.shape[0]
    stable, first = stable_point(tf.top1), first_match_point(tf.top1)
    res = {}
    for b, name in enumerate(BUCKETS):
        m = buckets == b
        if not m.any():
            continue
        res[name] = {"tokens": int(m.sum()), "mean_stable_point": float(stable[m].mean()),
                     "mean_first_match_point": float(first[m].mean()),
                     "share_needing_last_point": float((stable[m] == P - 1).mean()),
                     "stable_hist": np.bincount(stable[m], minlength=P).tolist(),
                     "gates": [gate_report(g, tf, m) for g in gates]}
    return res


# ------------------------------------------------------------------ E4 sub-layers

def e4_sublayer(tf):
    """How often the optimal exit is an attention half-block (even point) rather than a block output."""
    P = tf.top1.shape[0]
    stable, first = stable_point(tf.top1), first_match_point(tf.top1)
    blocks_only = 2 * stable_point(tf.top1[1::2]) + 1                 # oracle restricted to block outputs
    return {"stable_at_attention": float((stable % 2 == 0).mean()),
            "first_match_at_attention": float((first % 2 == 0).mean()),
            "mean_layers_stable_sublayer": float(((stable + 1) / 2).mean()),
            "mean_layers_stable_blocks_only": float(((blocks_only + 1) / 2).mean()),
            "stable_hist_attention": np.bincount(stable[stable % 2 == 0] // 2, minlength=P // 2).tolist(),
            "stable_hist_block": np.bincount(stable[stable % 2 == 1] // 2, minlength=P // 2).tolist()}


# ------------------------------------------------------------------ E5 generation with KV fill

def e5_size(n_tokens, prompts=None, new_tokens=None):
    """E5's (prompts, tokens generated per prompt): as given, else scaled with the corpus tokens in
    use so that a small run stays small: 2 x 16 for 256 tokens, 8 x 48 from 4,096 tokens on. (An
    oracle token costs several plain ones: it decodes many exit points to find its stable one.)"""
    prompts = min(8, max(2, n_tokens // 512)) if prompts is None else prompts
    new_tokens = min(48, max(16, n_tokens // 16)) if new_tokens is None else new_tokens
    return prompts, new_tokens


def e5_prompts(ids, n, length=32):
    """n prompts of `length` tokens, evenly spaced over the corpus ids."""
    starts = np.linspace(0, max(len(ids) - length, 0), n).astype(int)
    return [ids[s:s + length].tolist() for s in starts]


def e5_generation(model, prompts, new_tokens=48, gate="oracle", kv_modes=KV_MODES, shortcut=None, progress=False):
    """Agreement with plain greedy decoding at each generated position, per KV fill strategy
    (exits decoded through `shortcut` if given). One progress bar counts the generated tokens of
    the plain runs and of every KV mode."""
    from tqdm.auto import tqdm

    from .generate import generate
    desc = "E5 generation" + (" (shortcut)" if shortcut is not None else "")
    with tqdm(total=(1 + len(kv_modes)) * len(prompts) * new_tokens, desc=desc, unit="token",
              disable=not progress) as bar:
        def gen(p, **kw):
            out = generate(model, p, new_tokens, stop_at_eos=False, **kw)
            bar.update(len(out.tokens))
            return out

        ref = [gen(p).tokens for p in prompts]
        res = {"gate": str(gate), "prompts": len(prompts), "new_tokens": new_tokens}
        for kv in kv_modes:
            outs = [gen(p, exit=gate, kv=kv, shortcut=shortcut) for p in prompts]
            same = np.array([np.array(r.tokens) == np.array(t) for r, t in zip(outs, ref)])   # (prompts, n)
            res[kv] = {"agreement_by_position": same.mean(0).tolist(),
                       "identical_prefix_by_position": np.cumprod(same, axis=1).mean(0).tolist(),
                       "agreement": float(same.mean()),
                       "mean_exit_depth": float(np.mean([r.stats["mean_exit_depth"] for r in outs])),
                       "mean_blocks_computed": float(np.mean([r.stats["mean_blocks_computed"] for r in outs]))}
    return res


# ------------------------------------------------------------------ E6 the learned gate

def gate_training_data(tf, points=None):
    """(features name -> (M,), labels (M,)) over the given points: label 1 where exiting is safe
    (the point is at or after the token's stable oracle point)."""
    P = tf.top1.shape[0]
    points = np.arange(P - 1) if points is None else np.asarray(points)
    f = tf.features(points)
    labels = points[:, None] >= stable_point(tf.top1)[None, :]
    keep = ("confidence", "margin", "entropy", "cosine", "depth")
    return {k: np.asarray(f[k], np.float64).ravel() for k in keep}, labels.ravel()


def split(tf, frac=0.5):
    """Two TeacherForced tables: the first frac of the tokens and the rest."""
    cut = int(tf.top1.shape[1] * frac)
    fields = TeacherForced.__dataclass_fields__
    return (TeacherForced(**{k: getattr(tf, k)[..., :cut] for k in fields}),
            TeacherForced(**{k: getattr(tf, k)[..., cut:] for k in fields}))


def e6_learned(tf, min_point=None, thresholds=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98)):
    """Train the logistic gate on the first half of the corpus, compare with confidence on the second."""
    P = tf.top1.shape[0]
    min_point = default_min_point(P) if min_point is None else min_point
    train, test = split(tf)
    feats, labels = gate_training_data(train, np.arange(min_point, P - 1))
    params = train_learned_gate(feats, labels)
    learned = [gate_report(Gate("learned", {**params, "threshold": t, "path": f"(trained, t={t})"},
                                min_point=min_point), test) for t in thresholds]
    confidence = [gate_report(Gate("confidence", t, min_point=min_point), test) for t in thresholds]
    return {"train_tokens": int(train.top1.shape[1]), "test_tokens": int(test.top1.shape[1]),
            "min_point": int(min_point), "thresholds": list(thresholds),
            "params": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()},
            "learned": learned, "confidence": confidence}


# ------------------------------------------------------------------ everything, to files

def analyze(model, out_dir, corpus=None, max_tokens=4096, window=256, gen_prompts=None, gen_tokens=None,
            gen_gate="oracle", progress=True, reuse=False, skip_tokens=0, shortcut=None, workers=1):
    """Run E1-E6 on the corpus and write analysis.json, one PNG per experiment and the
    teacher-forced table (teacher_forced.npz) into out_dir. The corpus tokens are the first
    max_tokens (None = all) after skip_tokens. gen_prompts x gen_tokens: E5's generation (None =
    scaled with the tokens, see e5_size; 0 prompts skips E5). reuse: take the table from a
    previous run in out_dir if it was made from the same tokens and window. shortcut
    (minee.shortcuts): also run E1, E2 and E5 through it (res["shortcut"]); the figures then show
    both side by side. workers: processes computing the teacher-forced windows side by side
    (minee.parallel; E5's generation stays here). Every stage shows a progress bar (progress=True)."""
    import json

    from tqdm.auto import tqdm
    check_run_sizes(window, gen_prompts, gen_tokens)
    if shortcut is not None:
        shortcut.check_model(model)
    ids = corpus_ids(model.tokenizer, corpus, max_tokens, skip_tokens)
    gen_prompts, gen_tokens = e5_size(len(ids), gen_prompts, gen_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf, ppl = cached_table(model, out / "teacher_forced.npz", ids, window, reuse, progress, workers=workers)
    P = tf.top1.shape[0]
    gates = default_gate_sweep(P)
    e3_gates = [g for g in gates if str(g) in (str(Gate("confidence", 0.9, min_point=default_min_point(P))), "oracle")]
    prompts = e5_prompts(ids, gen_prompts)
    res = {"model": model.source, "corpus": str(corpus or DEFAULT_CORPUS), "skip_tokens": skip_tokens,
           "window": window, "head_cost_in_layers": head_cost_in_layers(model.config)}
    experiments = {
        "e1": lambda: e1_natural(tf, ppl),
        "e2": lambda: e2_gates(tf, gates),
        "e3": lambda: e3_subword(tf, subword_buckets(model.tokenizer, tf.inputs, tf.targets), e3_gates),
        "e4": lambda: e4_sublayer(tf),
        "e6": lambda: e6_learned(tf),
    }
    for name in tqdm(experiments, desc="E1-E4, E6", unit="experiment", disable=not progress):
        res[name] = experiments[name]()
    res["e5"] = e5_generation(model, prompts, gen_tokens, gen_gate, progress=progress) if gen_prompts else None
    if shortcut is not None:
        tf_sc, _ = cached_table(model, out / "teacher_forced_shortcut.npz", ids, window, reuse, progress, shortcut,
                                workers)
        res["shortcut"] = {
            "label": shortcut_label(shortcut), "meta": shortcut.meta,
            "e1": e1_natural(tf_sc, ppl),
            "e2": e2_gates(tf_sc, shortcut_gate_sweep(P)),
            "e5": (e5_generation(model, prompts, gen_tokens, gen_gate, shortcut=shortcut, progress=progress)
                   if gen_prompts else None)}
    (out / "analysis.json").write_text(json.dumps(res, indent=1))
    write_figures(res, split(tf)[1], out, progress)
    return res


def write_figures(res, held_out, out, progress=True):
    """One PNG per experiment of an analyze() result into out (held_out: E6's test table, for the
    oracle); E1 and E2 also show the shortcut's results if the run had one."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from . import plots
    e1, sc = res["e1"], res.get("shortcut")
    figures = [
        ("e1_lens_curves.png", lambda f: plots.plot_point_curves(
            e1, f, title=f"Logit lens over {e1['tokens']} corpus tokens (perplexity {e1['perplexity']:.1f})",
            shortcut=sc and sc["e1"])),
        ("e1_oracle_hist.png", lambda f: plots.plot_oracle_hist(e1, f, shortcut=sc and sc["e1"])),
        ("e2_gates.png", lambda f: plots.plot_gate_pareto(res["e2"], f, shortcut=sc and sc["e2"])),
        ("e3_subword.png", lambda f: plots.plot_subword(res["e3"], f)),
        ("e4_sublayer.png", lambda f: plots.plot_sublayer(res["e4"], f)),
        ("e5_generation.png", lambda f: plots.plot_generation(res["e5"], f)) if res["e5"] else None,
        ("e6_learned.png", lambda f: plots.plot_gate_pareto(
            res["e6"]["learned"] + res["e6"]["confidence"] + [gate_report(Gate("oracle"), held_out)], f,
            title="Learned gate vs confidence on held-out tokens")),
    ]
    for name, draw in tqdm([f for f in figures if f], desc="figures", unit="figure", disable=not progress):
        draw(out / name)
        plt.close("all")


def shortcut_gate_sweep(n_points):
    """The default sweep, plus the same gates checking from a third of the way in: through a
    shortcut, middle points become worth checking."""
    gates = default_gate_sweep(n_points) + default_gate_sweep(n_points, min_point=n_points // 3 - 1)
    return list({str(g): g for g in gates}.values())


def cached_table(model, path, ids, window, reuse, progress, shortcut=None, workers=1):
    """teacher_forced() of ids, read from `path` if reuse and it was saved for the same ids, window
    and shortcut (written there otherwise). Returns (table, perplexity)."""
    key = "plain" if shortcut is None else shortcut.digest()
    tf, ppl = load_table(path, ids, window, 2 * model.config.n_layers, key) if reuse else (None, None)
    if tf is None:
        tf, ppl = teacher_forced(model, ids, window=window, progress=progress, shortcut=shortcut, workers=workers)
        save_table(path, tf, ppl, ids, window, key)
    return tf, ppl


def save_table(path, tf, perplexity, ids, window, key="plain"):
    np.savez_compressed(path, perplexity=perplexity, ids=ids, window=window, key=key,
                        **{k: getattr(tf, k) for k in TeacherForced.__dataclass_fields__})


def load_table(path, ids, window, n_points, key="plain"):
    """(table, perplexity) saved by save_table for these ids, window, n_points exit points and key
    ("plain" or a shortcut's digest), else (None, None): a missing, damaged or foreign file is
    recomputed. Every array's header is checked before it is read (shortcuts.read_npz_array), so a
    damaged or hostile file allocates nothing it declares, and nothing is unpickled."""
    N = len(ids) - 1                                                   # predictions in the table
    shapes = {k: (n_points, N) for k in TeacherForced.__dataclass_fields__} | {"targets": (N,), "inputs": (N,)}
    expected = {"window": (), "perplexity": (), "key": (), "ids": (N + 1,), **shapes}

    def check(want):
        return lambda shape, dtype: None if shape == want and (dtype.kind in "iuf" or (
            dtype.kind == "U" and dtype.itemsize <= 4096)) else "is not what save_table writes"
    try:
        with zipfile.ZipFile(path) as zf:
            z = {k: read_npz_array(zf, path, k, check(want), ValueError) for k, want in expected.items()}
    except (OSError, ValueError, zipfile.BadZipFile):                  # missing, damaged or foreign: recompute
        return None, None
    if int(z["window"]) != window or not np.array_equal(z["ids"], ids) or str(z["key"]) != key:
        return None, None
    return TeacherForced(**{k: z[k] for k in shapes}), float(z["perplexity"])


def head_cost_in_layers(config):
    """How many transformer blocks one full-vocabulary LM head costs (FLOPs)."""
    from .exits import flops
    f = flops(config, 0)
    return f["lm_head"] / (f["attn"] + f["mlp"])
