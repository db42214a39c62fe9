"""Text generation: sampling, and generate / generate_batch / generate_many on top of the decode
loop of batch.py (prefill each prompt into a KV cache row, then sample one token at a time)."""
from dataclasses import dataclass, field

import numpy as np

from .batch import decode
from .exits import ExitDecoder, ExitStats, check_kv_mode
from .lens import shortcut_label
from .limits import MAX_PROMPT_BYTES, prompt_byte_limit
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
    check_prompt(model, prompt)
    if chat:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        check_prompt(model, prompt, "the prompt as the chat template wrote it")
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give at least one character")
    return ids


def check_prompt(model, text, what="the prompt"):
    """Refuse, before it is tokenized, a text longer than the model could ever use: more bytes than
    its context's tokens can stand for (each at most the vocabulary's longest token), and at most
    MAX_PROMPT_BYTES (limits.prompt_byte_limit). `what` names the text in the error."""
    context = model.config.max_position_embeddings
    size = len(text.encode("utf-8", "surrogatepass"))
    if size <= context:                                  # fits whatever the vocabulary: no need to look at it
        return
    longest = model.tokenizer.max_token_bytes
    limit = prompt_byte_limit(context, longest)
    if size > limit:
        why = (f"its context of {context:,} tokens, each standing for at most {longest} bytes of text"
               if limit < MAX_PROMPT_BYTES else "the most minee tokenizes at once")
        raise ValueError(f"{what} is {size:,} bytes, more than the model can use ({limit:,} bytes: {why}); "
                         "shorten it")


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """One token id from logits (V,): greedy when temperature == 0, else top-k/top-p sampling."""
    if temperature == 0:
        return int(np.argmax(logits))
    rng = np.random.default_rng() if rng is None else rng
    return draw(probabilities(logits, temperature, top_k, top_p), rng)


def draw(probs, rng):
    """One token id drawn from the distribution probs (V,)."""
    return int(rng.choice(len(probs), p=probs))


def probabilities(logits, temperature, top_k=None, top_p=None):
    """The distribution (V,) float64 that sample() draws from at temperature > 0: softmax of
    logits / temperature, cut to the top_k tokens and to the smallest set reaching top_p, renormalized."""
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
    return probs


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


def check_context(model, prompt_tokens, max_new_tokens):
    if prompt_tokens + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.config.max_position_embeddings} positions")


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
             chat=False, stop_at_eos=True, on_text=None, exit=None, kv=None, shortcut=None, hooks=None):
    """Continue `prompt` (text or ids) by up to max_new_tokens tokens; on_text(piece) streams the text.

    exit: a gate (spec string such as "confidence:0.9" or an exits.Gate) to leave the network
    early on every decoded token; kv: how the skipped layers' keys/values are filled
    ("copy", the default with a gate, "propagate" or "compute", see exits.py); shortcut:
    minee.shortcuts.Shortcuts through which an early exit point is decoded (needs exit=). The prompt
    always runs the full model. hooks: {hook name: fn(x, name)} as for Model.forward, called in the
    prompt's pass and in every decode step, early exits included (e.g. an ablation while generating).
    Every argument is checked before on_text is first called.
    """
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, chat,
                          stop_at_eos, on_text, exit, kv, shortcut, hooks)[0]


def generate_batch(model, prompts, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=None,
                   chat=False, stop_at_eos=True, on_text=None, exit=None, kv=None, shortcut=None, hooks=None):
    """generate() for a list of prompts (of any token lengths) decoded together: one Generation per prompt.

    prompts: texts or lists of ids; a 2-D int array (B, T) is B prompts of T ids, one per row.
    Each prompt is prefilled into a KV cache row of its own; then every step decodes the rows
    together (one matrix product per weight), each row at its own position. A row that finishes
    (EOS or max_new_tokens) stops computing; with early exit, a row that exits stops computing
    deeper sub-layers while the others go on. seed: an int s (prompt i samples from its own
    stream, seeded s + i) or one seed per prompt, so result i equals generate(prompts[i],
    seed=that seed) token for token. Each result's stats are its own row's. on_text streams a
    single prompt only. The same as generate_many with batch_size=len(prompts).
    """
    prompts = prompt_list(prompts)
    results = _start(model, prompts, len(prompts), max_new_tokens, temperature, top_k, top_p, seed, chat,
                     stop_at_eos, exit, kv, shortcut, hooks, on_text)
    return list(_in_order(results, len(prompts), progress=False))


def generate_many(model, prompts, batch_size=16, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None,
                  seed=None, chat=False, stop_at_eos=True, exit=None, kv=None, shortcut=None, hooks=None,
                  progress=None):
    """Decode any number of prompts with at most batch_size rows at once; yields one Generation
    per prompt, in prompt order.

    A queue (minee/batch.py): when a row finishes, its KV cache row takes the next waiting prompt
    right away, so the batch stays full. The arguments are generate's; prompts and seed as in generate_batch
    (prompt i always samples from the same stream, whichever row it lands in), so result i equals
    generate(prompts[i], ...) token for token. progress: a progress bar on stderr (default: when
    there are more prompts than batch_size). Bad arguments and prompts are errors before anything
    is decoded. The KV cache holds batch_size x (longest prompt + max_new_tokens) positions.
    """
    prompts = prompt_list(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    results = _start(model, prompts, batch_size, max_new_tokens, temperature, top_k, top_p, seed, chat,
                     stop_at_eos, exit, kv, shortcut, hooks)
    show = len(prompts) > batch_size if progress is None else progress
    return _in_order(results, len(prompts), show)


def prompt_list(prompts):
    """The prompts as a list of texts or sequences of ids (a 2-D array of ids (B, T): its B rows),
    or a clear error for a single text, a single sequence of ids or no prompt."""
    if isinstance(prompts, str):
        raise ValueError("pass a list of prompts (texts or lists of ids); for one prompt use minee.generate")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass a list with at least one prompt")
    if any(isinstance(p, (int, np.integer)) for p in prompts):
        raise ValueError("prompts holds bare token ids, but each prompt is a text or a list of ids: pass [ids] "
                         "for one prompt (or use minee.generate), or a 2-D array (B, T) for B prompts of T ids")
    return prompts


def _start(model, prompts, batch_size, max_new_tokens, temperature, top_k, top_p, seed, chat, stop_at_eos,
           exit, kv, shortcut, hooks, on_text=None):
    """Check every argument and prompt, then start the decode loop: (prompt index, Generation)
    pairs as prompts finish."""
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
    longest = max(len(i) for i in ids)
    check_context(model, longest, max_new_tokens)
    model.hook_caller(hooks)                                     # unknown hook names fail before any work
    decoder = None if exit is None else ExitDecoder(model, exit, kv, shortcut, hooks)
    stream = TextStream(model.tokenizer)
    on_token = None if on_text is None else (lambda i, token: on_text(stream.push(token)))
    rows = decode(model, ids, batch_size, max_new_tokens,
                  pick=lambda i, logits: sample(logits, temperature, top_k, top_p, rngs[i]),
                  stop_ids=model.config.eos_token_ids if stop_at_eos else (), decoder=decoder, on_token=on_token,
                  hooks=hooks)

    def results():
        for row in rows:
            yield row.index, generation(model, row, decoder)
        if on_text is not None and (tail := stream.finish()):      # a held-back incomplete character
            on_text(tail)
    return results()


def generation(model, row, decoder):
    """The Generation of one finished batch.Row, with its own row's stats."""
    n = len(row.tokens)
    stats = {"prompt_tokens": len(row.ids), "new_tokens": n, "prefill_s": row.prefill_s,
             "decode_s": row.decode_s, "decode_tokens_per_s": (n - 1) / row.decode_s if n > 1 else None}
    if decoder is None:                      # every token after the first: one full pass, S positions attended
        costs = ExitStats()
        costs.full_pass(model.config, len(row.ids) + np.arange(1, n))
        stats.update(costs.summary(model.config))
    else:
        stats.update(gate=str(decoder.gate), kv=decoder.kv_mode,
                     shortcut=decoder.shortcut and shortcut_label(decoder.shortcut),
                     **decoder.stats.subset(row.steps).summary(model.config))
    return Generation(row.ids, row.tokens, generated_text(model, row.tokens), stats, row.points)


def generated_text(model, tokens):
    """The text of generated ids, special tokens such as EOS left out ("" without a tokenizer)."""
    return model.tokenizer.decode(tokens, skip_special_tokens=True) if model.tokenizer else ""


def _in_order(results, n, progress):
    """(prompt index, Generation) pairs as prompts finish -> Generations in prompt order, with a
    progress bar counting finished prompts."""
    from tqdm.auto import tqdm
    ready, next_i = {}, 0
    with tqdm(total=n, desc="generate", unit="prompt", disable=not progress) as bar:
        for i, g in results:
            bar.update(1)
            ready[i] = g
            while next_i in ready:
                yield ready.pop(next_i)
                next_i += 1


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
