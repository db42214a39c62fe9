"""Self-speculative decoding: early exit drafts tokens, the rest of the network checks them, and
the output is exactly the full model's.

Early exit alone changes the text (bench/README.md). Here the early exit only proposes: the full
model has the last word on every token, as in LayerSkip (Elhoushi et al. 2024) and Draft & Verify
(Zhang et al. 2023), with the acceptance rule of speculative sampling (Leviathan et al. 2023;
Chen et al. 2023). It pays because decoding reads every weight once per pass: sending k+1 tokens
through the last blocks together costs much less than k+1 passes.

One cycle, with the cache holding positions 0 .. n-1 and `last` the newest token (not in it yet):

  draft     feed last, d1 .. d(k-1) at positions n .. n+k-1 through the early-exit decoder: each
            runs the sub-layers up to its exit point (the draft gate's) and is decoded there into
            the next draft d1 .. dk. The blocks a draft runs write the keys/values that the full
            model would write there (same prefix, same computation), so they are never recomputed.
  verify    the k+1 rows (inputs last, d1 .. dk) go on from their states through the remaining
            sub-layers in one pass, then the LM head: the full model's logits at positions n .. n+k.
  accept    greedy: the drafts up to the first that differs from the full model's argmax, then the
            full model's own token (a correction, or a bonus token after dk): 1 .. k+1 new tokens.
            Sampling: accept_sampled, so that every token is distributed as the full model's.
  roll back the cache keeps the positions of last and the accepted drafts; the later positions are
            forgotten (setting the length back is enough: the next cycle overwrites them).

Drafts that exit at different points (a gate): beyond its exit point a draft leaves the deeper
blocks' keys/values to the KV fill (a copy, exits.py), so a later draft that goes deeper attends to
copies, not to what the full model computes. A draft's state is therefore exact only up to the
earliest exit point among itself and the drafts before it, start_j = min(p_0 .. p_j). Verification
starts each row after its own start_j, from the state it recorded there, and recomputes (and
rewrites the keys/values of) the sub-layers from there on. With a fixed exit point p every start is
p and nothing is recomputed. The last row (input dk) was never drafted: it starts at its embedding.
"""
import time
from dataclasses import dataclass, field

import numpy as np

from .exits import ExitDecoder, default_min_point, parse_gate
from .generate import (Generation, TextStream, check_context, check_sampling, draw, encode_prompt, generated_text,
                       probabilities, sample)
from .lens import shortcut_label

DEFAULT_K = 4                 # tokens drafted per cycle


class DraftDecoder(ExitDecoder):
    """The early-exit decoder that drafts run through.

    draft_step() also returns the residual after every sub-layer the step ran, (p+1, D):
    verification starts from one of them. With a fixed exit point it skips the KV fill of the
    deeper blocks, which no draft reads and verification writes.
    """
    trace = None

    def draft_step(self, token, kv):
        """One draft position: (logits (V,), exit point p, states (p+1, D) after sub-layers 0 .. p)."""
        self.trace = []
        logits, point = self.step(token, kv)
        states, self.trace = np.concatenate(self.trace)[:, 0], None         # (p+1, D)
        return logits, point, states

    def sublayer(self, p, x, positions, kv, rows=None):
        x = super().sublayer(p, x, positions, kv, rows)
        if self.trace is not None:
            self.trace.append(x)                                             # (1, 1, D)
        return x

    def fill_skipped(self, points, states, positions, kv, rows):
        if self.gate.kind != "fixed":
            super().fill_skipped(points, states, positions, kv, rows)


def draft_decoder(model, draft, k, shortcut=None, hooks=None):
    """A DraftDecoder for the draft gate spec (None: fixed at the start of the network's last third,
    exits.default_min_point; drafts decoded through the shortcut, if any, with the hooks of
    Model.forward), once draft and k are checked (errors name the fix)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (tokens drafted per cycle) must be a whole number >= 1, got {k!r}")
    gate = parse_gate(f"fixed:{default_min_point(2 * model.config.n_layers)}" if draft is None else draft)
    if gate.kind == "oracle":
        raise ValueError("the oracle gate runs the full model to find its exit point, so it cannot "
                         "draft; draft with fixed:P or a gate such as confidence:0.9")
    return DraftDecoder(model, gate, "copy", shortcut, hooks)


@dataclass
class SpeculativeStats:
    """Counts per position j = 1 .. k of a draft, accumulated over cycles, and the time spent.
    They describe the tokens emitted: a cycle cut at EOS counts the drafts up to the EOS only."""
    k: int
    cycles: int = 0
    tokens: int = 0                 # emitted by the cycles
    draft_s: float = 0.0
    verify_s: float = 0.0           # verification pass, acceptance and rollback
    drafted: np.ndarray = field(init=False)     # (k,) drafts made at position j
    compared: np.ndarray = field(init=False)    # (k,) of them compared with the full model (all before j accepted)
    accepted: np.ndarray = field(init=False)    # (k,) of them accepted

    def __post_init__(self):
        self.drafted, self.compared, self.accepted = (np.zeros(self.k, np.int64) for _ in range(3))

    def add(self, n_drafts, n_accepted, n_tokens):
        """One cycle that made n_drafts drafts, accepted the first n_accepted and emitted n_tokens."""
        self.cycles += 1
        self.tokens += n_tokens
        self.drafted[:n_drafts] += 1
        self.compared[:min(n_accepted + 1, n_drafts)] += 1
        self.accepted[:n_accepted] += 1

    def summary(self):
        drafted, accepted = int(self.drafted.sum()), int(self.accepted.sum())
        by_position = [float(a / c) if c else None for a, c in zip(self.accepted, self.compared)]
        return {"cycles": self.cycles, "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else None,
                "acceptance_by_position": by_position, "compared_by_position": self.compared.tolist(),
                "tokens_per_cycle": self.tokens / self.cycles if self.cycles else None,
                "draft_s": self.draft_s, "verify_s": self.verify_s}


# ------------------------------------------------------------------ one cycle

def draft(decoder, kv, last, k, temperature=0.0, top_k=None, top_p=None, rng=None):
    """k draft tokens after `last`, fed at positions kv.length .. (advancing the cache by k).

    Returns the drafts (k,), their distributions q (k, V) (None when greedy), exit points (k,),
    and for verification the k+1 rows' states (k+1, D) and start points (k+1,): row j's state
    after point starts[j] (-1: the embedding)."""
    drafts, qs, points, states, starts = [], [], [], [], []
    start, token = decoder.n_points - 1, last
    for _ in range(k):
        logits, p, trace = decoder.draft_step(token, kv)                    # trace (p+1, D)
        start = min(start, p)                                               # exact up to here
        if temperature == 0:
            token = sample(logits)
        else:
            qs.append(probabilities(logits, temperature, top_k, top_p))     # (V,)
            token = draw(qs[-1], rng)
        drafts.append(token)
        points.append(p)
        states.append(trace[start])
        starts.append(start)
    states.append(decoder.hook("hook_embed", decoder.model.embed(np.array([[token]])))[0, 0])   # the last row: input dk
    starts.append(-1)
    return drafts, (np.array(qs) if qs else None), points, np.stack(states), np.array(starts)


def verify(decoder, states, starts, n, kv):
    """The full model's logits (R, V) at positions n .. n+R-1 for R rows whose residual after point
    starts[r] is states[r] (R, D). Each sub-layer runs once for all rows past their start, writing
    their keys/values; the others already hold theirs from drafting."""
    x = states[None].copy()                                                 # (1, R, D)
    positions = n + np.arange(len(starts))[None]                            # (1, R)
    for p in range(int(starts.min()) + 1, decoder.n_points):
        rows = np.flatnonzero(starts < p)
        x[:, rows] = decoder.sublayer(p, x[:, rows], positions[:, rows], kv)
    return decoder.model.unembed(x[0])                                      # (R, V)


def accept_greedy(drafts, logits):
    """(accepted drafts, the full model's next token): drafts up to the first that is not the argmax
    of the logits (k+1, V) at its position, then the argmax there."""
    target = logits.argmax(-1)                                              # (k+1,)
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return a, int(target[a])


def accept_sampled(drafts, q, logits, temperature, top_k, top_p, rng):
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

    With p_j the full model's distribution at draft j's position (the same temperature, top_k and
    top_p processing as q_j, the draft's): keep draft d_j with probability min(1, p_j(d_j)/q_j(d_j));
    at the first rejection draw the next token from max(p_j - q_j, 0), renormalized; after k
    acceptances draw a bonus token from p_{k+1}. Each new token is then distributed exactly as p.
    Returns (accepted drafts, the next token)."""
    for j, d in enumerate(drafts):
        p = probabilities(logits[j], temperature, top_k, top_p)             # (V,)
        if rng.random() * q[j, d] < p[d]:                                   # u < p(d)/q(d); q(d) > 0
            continue
        rest = np.maximum(p - q[j], 0.0)                                    # > 0 somewhere, as p(d) < q(d)
        return j, draw(rest / rest.sum(), rng)
    p = probabilities(logits[len(drafts)], temperature, top_k, top_p)
    return len(drafts), draw(p, rng)


def speculate(decoder, kv, last, k, temperature=0.0, top_k=None, top_p=None, rng=None, stats=None, stop_ids=()):
    """One draft-verify cycle after token `last`, which the cache kv (one row of n positions) does
    not hold yet.

    Returns the new tokens (the accepted drafts, then the full model's next token: 1 .. k+1 of
    them; cut after the first accepted draft in stop_ids, such as EOS) and the exit point each
    came from (its draft's, or the last point). The cache then holds n + len(tokens) positions,
    exactly what plain decoding of the same tokens would hold. stats count what was emitted: the
    drafts after a cut are left out. k = 0 is one plain decoding step."""
    n, t0 = kv.length, time.perf_counter()
    drafts, q, points, states, starts = draft(decoder, kv, last, k, temperature, top_k, top_p, rng)
    t1 = time.perf_counter()
    logits = verify(decoder, states, starts, n, kv)                         # (k+1, V)
    if temperature == 0:
        a, token = accept_greedy(drafts, logits)
    else:
        a, token = accept_sampled(drafts, q, logits, temperature, top_k, top_p, rng)
    new, new_points = drafts[:a] + [token], points[:a] + [decoder.n_points - 1]
    stop = next((j for j in range(a) if drafts[j] in stop_ids), None)      # an accepted draft ends generation
    if stop is not None:                                                    # the drafts after it leave the stats
        decoder.stats = decoder.stats.subset(range(len(decoder.stats.points) - (k - stop - 1)))
        k = a = stop + 1
        new, new_points = new[:a], new_points[:a]
    kv.length = n + len(new)                                                # forget the rejected positions
    if stats is not None:
        stats.add(k, a, len(new))
        stats.draft_s += t1 - t0
        stats.verify_s += time.perf_counter() - t1
    return new, new_points


# ------------------------------------------------------------------ generation

def speculative_generate(model, prompt, max_new_tokens=32, draft=None, k=DEFAULT_K, shortcut=None,
                         temperature=0.0, seed=None, top_k=None, top_p=None, chat=False, stop_at_eos=True,
                         on_text=None, hooks=None):
    """Continue `prompt` (text or ids) like minee.generate, drafting k tokens per cycle by early
    exit (draft: a gate spec, e.g. "fixed:39" = after block 19's FFN; None: fixed at the start of
    the network's last third, point 39 of SmolLM2's 60) and keeping only what the full model
    confirms. shortcut (minee.shortcuts.Shortcuts): decode the drafts through its affine maps;
    verification still continues from the exit states themselves. hooks: as for generate, called
    in the prefill, the drafts and the verification.

    Greedy (temperature 0), the tokens are minee.generate's. Sampling draws every token from
    exactly the distribution generate samples from, though not the same tokens for a seed (the
    random numbers are used differently). stats adds to generate's: draft, k, shortcut, cycles,
    drafted, accepted, acceptance_rate (accepted / drafted), acceptance_by_position (at draft
    position j, the share accepted of the drafts compared, i.e. those whose earlier drafts were all
    accepted) and compared_by_position (how many were compared), tokens_per_cycle (tokens emitted
    per cycle, the first token, which the prompt's pass gives, left out), mean_draft_point, draft_s
    and verify_s (seconds drafting and verifying). The counts describe what was emitted: drafts made
    after an accepted EOS are not counted. exit_points: the draft point of each accepted draft, the
    last point for the full model's tokens.
    """
    decoder = draft_decoder(model, draft, k, shortcut, hooks)
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = encode_prompt(model, prompt, chat)
    check_context(model, len(ids), max_new_tokens)
    rng = np.random.default_rng(seed)
    cache = model.new_kv_cache(1, len(ids) + max_new_tokens)
    stream, stats, eos = TextStream(model.tokenizer), SpeculativeStats(k), model.config.eos_token_ids
    tokens, points = [], []

    def emit(token, point):
        """Append one token; False once generation is over."""
        tokens.append(token)
        points.append(point)
        if on_text is not None:
            on_text(stream.push(token))
        return len(tokens) < max_new_tokens and not (stop_at_eos and token in eos)

    t0 = time.perf_counter()
    logits = model.forward(ids, kv_cache=cache, hooks=hooks, last_only=True)[0, -1]     # prefill: (V,)
    t1 = time.perf_counter()
    going = emit(sample(logits, temperature, top_k, top_p, rng), decoder.n_points - 1)
    while going:
        budget = max_new_tokens - len(tokens)                               # a cycle adds up to k+1
        new, new_points = speculate(decoder, cache, tokens[-1], min(k, budget - 1), temperature,
                                    top_k, top_p, rng, stats, eos if stop_at_eos else ())
        for token, point in zip(new, new_points):                          # in the budget, EOS only last
            going = emit(token, point)
    if on_text is not None and (tail := stream.finish()):                  # a held-back incomplete character
        on_text(tail)
    t2 = time.perf_counter()
    n_new = len(tokens)
    out = {"prompt_tokens": len(ids), "new_tokens": n_new, "prefill_s": t1 - t0, "decode_s": t2 - t1,
           "decode_tokens_per_s": (n_new - 1) / (t2 - t1) if n_new > 1 else None,
           "draft": str(decoder.gate), "k": k, "shortcut": shortcut and shortcut_label(shortcut),
           **stats.summary(), "mean_draft_point": decoder.stats.summary(model.config)["mean_exit_point"]}
    return Generation(ids, tokens, generated_text(model, tokens), out, points)
