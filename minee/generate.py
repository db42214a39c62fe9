"""Text generation: prefill the prompt into a KV cache, then sample one token at a time."""
import time
from dataclasses import dataclass, field

import numpy as np

from .ops import softmax


@dataclass
class Generation:
    prompt_tokens: list          # ids fed to the model (BOS included if the tokenizer adds it)
    tokens: list                 # generated ids, EOS included when generation stopped on it
    text: str                    # the generated ids decoded ("" without a tokenizer)
    stats: dict = field(default_factory=dict)   # timings, throughput and, with exit=, its costs
    exit_points: list = field(default_factory=list)   # per generated token; 2L-1 = the full model


def encode_prompt(model, prompt, chat=False):
    """Prompt ids from a string (through the tokenizer, optionally the chat template) or a list of ids."""
    if not isinstance(prompt, str):
        return [int(i) for i in model.check_ids(prompt)[0]]
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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class TextStream:
    """Turns a growing list of ids into new text pieces, holding back half-finished UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token):
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):                           # a multi-byte character is incomplete
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


def generate(model, prompt, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=None,
             chat=False, stop_at_eos=True, on_text=None, exit=None, kv="copy"):
    """Continue `prompt` (text or ids) by up to max_new_tokens tokens; on_text(piece) streams the text.

    exit: a gate (spec string such as "confidence:0.9" or an exits.Gate) to leave the network
    early on every decoded token; kv: how the skipped layers' keys/values are filled
    ("copy", "propagate" or "compute", see exits.py). The prompt always runs the full model.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if kv not in ("copy", "propagate", "compute"):
        raise ValueError(f"unknown kv fill {kv!r}; choose from copy, propagate, compute")
    last_point = 2 * model.config.n_layers - 1
    if exit is None:
        decoder, step = None, lambda token, cache: (model.forward([token], kv_cache=cache)[0, -1], last_point)
    else:
        from .exits import ExitDecoder
        decoder = ExitDecoder(model, exit, kv)
        step = decoder.step
    ids = encode_prompt(model, prompt, chat)
    total = len(ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.config.max_position_embeddings} positions")
    rng = np.random.default_rng(seed)
    cache = model.new_kv_cache(1, total)
    stream, tokens, points = TextStream(model.tokenizer), [], [last_point]
    t0 = time.perf_counter()
    logits = model.forward(ids, kv_cache=cache)[0, -1]                       # prefill: (V,)
    t1 = time.perf_counter()
    while True:
        token = sample(logits, temperature, top_k, top_p, rng)
        tokens.append(token)
        if on_text is not None:
            on_text(stream.push(token))
        if len(tokens) == max_new_tokens or (stop_at_eos and token in model.config.eos_token_ids):
            break
        logits, point = step(token, cache)                                     # decode one: (V,)
        points.append(point)
    t2 = time.perf_counter()
    text = model.tokenizer.decode(tokens) if model.tokenizer else ""
    stats = {"prompt_tokens": len(ids), "new_tokens": len(tokens), "prefill_s": t1 - t0,
             "decode_s": t2 - t1, "decode_tokens_per_s": (len(tokens) - 1) / (t2 - t1) if len(tokens) > 1 else None}
    if decoder is not None:
        stats.update(gate=str(decoder.gate), kv=kv, **decoder.stats.summary(model.config))
    return Generation(ids, tokens, text, stats, points)
