"""Batched decoding with a queue: many prompts through one KV cache of `batch_size` rows (slots).

Each step decodes the live rows together, so every weight is read once for all of them (one GEMM
per weight, see ops.linear), each row at its own position. A row that finishes (EOS or
max_new_tokens) stops computing, and its slot takes the next waiting prompt: the slot's length
goes back to 0 and the prompt is prefilled into it (continuous batching, as serving engines do).
generate, generate_batch and generate_many (generate.py) all run this one loop.
"""
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Row:
    """One prompt on its way through the queue."""
    index: int                  # its place in the list of prompts
    ids: list                   # the prompt's token ids
    tokens: list = field(default_factory=list)     # generated ids
    points: list = field(default_factory=list)     # exit point of each generated id (2L-1 = the full model)
    steps: list = field(default_factory=list)      # its tokens' entries in the decoder's ExitStats
    prefill_s: float = 0.0
    decode_s: float = 0.0       # time of the decode steps it took part in (with sampling)


def decode(model, prompts, batch_size, max_new_tokens, pick, stop_ids=(), decoder=None, on_token=None, hooks=None):
    """Decode every prompt (lists of token ids) with at most batch_size live rows; yield each Row
    as it finishes, which is not necessarily in prompt order.

    pick(i, logits (V,)) -> the next token of prompt i. A row finishes after max_new_tokens
    tokens or on a token in stop_ids. decoder: an exits.ExitDecoder for early exit, or None for
    the full model. on_token(i, token) is called with every new token. hooks: Model.forward's, for
    the prefills and the plain decode steps (an early-exit decoder carries its own).
    """
    slots = [None] * min(batch_size, len(prompts))              # the Row each cache row holds
    kv = model.new_kv_cache(len(slots), max(len(p) for p in prompts) + max_new_tokens)
    waiting = deque(Row(i, ids) for i, ids in enumerate(prompts))
    full_model = 2 * model.config.n_layers - 1                  # the exit point of a plain forward

    def take(s, logits, point):
        """Slot s's next token from its logits (V,); True when its row is finished."""
        row = slots[s]
        row.tokens.append(pick(row.index, logits))
        row.points.append(point)
        if on_token is not None:
            on_token(row.index, row.tokens[-1])
        return len(row.tokens) == max_new_tokens or row.tokens[-1] in stop_ids

    while True:
        finished = []
        for s in range(len(slots)):                             # free slots take waiting prompts
            while slots[s] is None and waiting:
                slots[s] = row = waiting.popleft()
                t0 = time.perf_counter()
                kv.lengths[s] = 0                               # forget the slot's previous prompt
                logits = model.forward(row.ids, kv_cache=kv, rows=[s], hooks=hooks, last_only=True)[0, -1]   # prefill: (V,)
                if take(s, logits, full_model):
                    finished.append(row)
                    slots[s] = None
                row.prefill_s = time.perf_counter() - t0
        yield from finished
        live = [s for s, row in enumerate(slots) if row is not None]
        if not live:
            return
        t0 = time.perf_counter()
        tokens = [slots[s].tokens[-1] for s in live]
        if decoder is None:
            logits = model.forward(np.array(tokens)[:, None], kv_cache=kv, rows=live, hooks=hooks)[:, -1]   # (n, V)
            points = np.full(len(live), full_model)
        else:
            logits, points = decoder.step_batch(tokens, kv, live)                               # (n, V), (n,)
            first = len(decoder.stats.points) - len(live)       # this step's entries in the ExitStats
            for j, s in enumerate(live):
                slots[s].steps.append(first + j)
        ends = []
        for j, s in enumerate(live):                            # sample each row's next token
            if take(s, logits[j], int(points[j])):
                ends.append(s)
        dt = time.perf_counter() - t0
        for s in live:
            slots[s].decode_s += dt
        for s in ends:
            yield slots[s]
            slots[s] = None
