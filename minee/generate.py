"""Text generation: prefill the prompt into a KV cache, then sample one token at a time."""
import time
from dataclasses import dataclass, field

import numpy as np

from .exits import ExitDecoder, ExitStats, check_kv_mode
from .lens import shortcut_label
from .ops import softmax


@dataclass
class Generation:
    prompt_tokens: list          # ids fed to the model (BOS included if the tokenizer adds it)
    tokens: list                 # generated ids, EOS included when generation stopped on it
    text: str                    # the generated ids decoded, special tokens such as EOS left out ("" without a tokenizer)
    stats: dict = field(default_factory=dict)   # timings, throughput and, with exit=, its costs
    exit_points: list = field(default_factory=list)   # per generated token; 2L-1 = the full model


def encode_prompt(model, prompt, chat=False):
    """Prompt ids from a string (through the tokenizer, optionally the chat template) or a list of ids."""
    if not isinstance(prompt, str):
        ids = model.check_ids(prompt)
        if len(ids) != 1:
            raise ValueError(f"a prompt is one sequence of ids, got a batch of {len(ids)} rows; pass a list of "
                             "prompts to generate_batch, or call generate once per row")
        return [int(i) for i in ids[0]]
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer.json, so it cannot encode text; pass token ids")
    if chat:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give at least one character")
    return ids


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """One token id from logits (V,): greedy when temperature == 0, else top-k/top-p sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    rng = np.random.default_rng() if rng is None else rng
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = softmax(z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]       # mass strictly above each token
        probs[order[before >= top_p]] = 0.0                    # keep the smallest set reaching top_p
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """Every sampling argument checked, so that a bad one fails before any output (NaN included)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p only apply when sampling; set a temperature > 0 (e.g. 0.8) "
                         "or leave them out for greedy decoding")


class TextStream:
    """Turns a growing list of ids into new text pieces, holding back half-finished UTF-8 characters
    until they complete; finish() returns whatever is still held back, so that the pieces add up to
    the decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token):
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):                           # a multi-byte character is incomplete
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def finish(self):
        """The held-back tail (e.g. an incomplete character at the end, decoded as U+FFFD)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.sent = text[self.sent:], len(text)
        return piece


def generate(model, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=None,
             chat=False, stop_at_eos=True, on_text=None, exit=None, kv=None, shortcut=None):
    """Continue `prompt` (text or ids) by up to max_new_tokens tokens; on_text(piece) streams the text.

    exit: a gate (spec string such as "confidence:0.9" or an exits.Gate) to leave the network
    early on every decoded token; kv: how the skipped layers' keys/values are filled
    ("copy", the default with a gate, "propagate" or "compute", see exits.py); shortcut:
    minee.shortcuts.Shortcuts through which an early exit point is decoded (needs exit=). The prompt
    always runs the full model. Every argument is checked before on_text is first called.
    """
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, chat,
                          stop_at_eos, on_text, exit, kv, shortcut)[0]


def generate_batch(model, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=None,
                   chat=False, stop_at_eos=True, on_text=None, exit=None, kv=None, shortcut=None):
    """generate() for B prompts (of any token lengths) at once: one Generation per prompt.

    Each prompt is prefilled into a cache row of its own; then every step decodes all rows
    together (one matmul per weight), each row at its own position. With early exit each row
    exits at its own point; a row that exits is frozen while the others go on. Rows that
    finished (EOS) keep being fed until the last one finishes; the stats count every row of
    every step. seed: an int s (row b samples from its own stream, seeded s + b) or one seed per
    row, so row b equals generate(prompts[b], seed=that row's seed) token for token.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if exit is None and kv is not None:
        raise ValueError(f"kv={kv!r} fills the keys/values of blocks an early exit skips; it needs an exit gate "
                         "(e.g. exit='confidence:0.9'), or leave it out")
    kv = "copy" if kv is None else kv
    check_kv_mode(kv)
    if shortcut is not None and exit is None:
        raise ValueError("a shortcut changes how early exits are decoded; give an exit gate too "
                         "(exit=..., --exit on the command line)")
    if on_text is not None and len(prompts) != 1:
        raise ValueError("on_text streams one sequence; pass a single prompt to stream")
    ids = [encode_prompt(model, p, chat) for p in prompts]
    rngs = [np.random.default_rng(s) for s in row_seeds(seed, len(ids))]
    B, longest = len(ids), max(len(i) for i in ids)
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.config.max_position_embeddings} positions")
    last_point = 2 * model.config.n_layers - 1
    if exit is None:
        decoder, costs = None, ExitStats()

        def step(tokens, cache):
            costs.full_pass(model.config, B, float(cache.lengths.mean()) + 1)
            return model.forward(np.array(tokens)[:, None], kv_cache=cache)[:, -1], np.full(B, last_point)
    else:
        decoder = ExitDecoder(model, exit, kv, shortcut)
        step, costs = decoder.step_batch, decoder.stats
    cache = model.new_kv_cache(B, longest + max_new_tokens)
    stream = TextStream(model.tokenizer)
    tokens, points = [[] for _ in range(B)], [[last_point] for _ in range(B)]
    finished = np.zeros(B, bool)
    t0 = time.perf_counter()
    logits = np.stack([model.forward(i, kv_cache=cache, rows=[b])[0, -1]      # prefill row by row: (B, V)
                       for b, i in enumerate(ids)])
    t1 = time.perf_counter()
    while True:
        for b in np.flatnonzero(~finished):
            tokens[b].append(sample(logits[b], temperature, top_k, top_p, rngs[b]))
            finished[b] = len(tokens[b]) == max_new_tokens or (stop_at_eos and tokens[b][-1] in model.config.eos_token_ids)
        if on_text is not None:
            on_text(stream.push(tokens[0][-1]))
        if finished.all():
            break
        live = ~finished
        logits, exit_points = step([t[-1] for t in tokens], cache)            # decode one position: (B, V)
        for b in np.flatnonzero(live):
            points[b].append(int(exit_points[b]))
    if on_text is not None and (tail := stream.finish()):
        on_text(tail)
    t2 = time.perf_counter()
    n_new = sum(len(t) for t in tokens)
    stats = {"prompt_tokens": sum(len(i) for i in ids), "new_tokens": n_new,
             "prefill_s": t1 - t0, "decode_s": t2 - t1,
             "decode_tokens_per_s": (n_new - B) / (t2 - t1) if n_new > B else None}
    stats.update(costs.summary(model.config))
    if decoder is not None:
        stats.update(gate=str(decoder.gate), kv=kv, shortcut=shortcut and shortcut_label(shortcut))
    def text(t):
        return model.tokenizer.decode(t, skip_special_tokens=True) if model.tokenizer else ""

    return [Generation(i, t, text(t), dict(stats), pts)
            for i, t, pts in zip(ids, tokens, points)]


def row_seeds(seed, B):
    """One seed per row: an int s gives s, s+1, .., s+B-1; a list gives itself; None gives fresh entropy."""
    if seed is None or isinstance(seed, (int, np.integer)):
        seeds = [None if seed is None else int(seed) + b for b in range(B)]
    else:
        seeds = list(seed)
        if len(seeds) != B:
            raise ValueError(f"seed lists one seed per prompt: got {len(seeds)} seeds for {B} prompts")
    bad = [s for s in seeds if s is not None and not (isinstance(s, (int, np.integer)) and s >= 0)]
    if bad:
        raise ValueError(f"seeds must be whole numbers >= 0, got {bad[0]!r}")
    return seeds
