"""A thin wrapper over a Hugging Face `tokenizers.Tokenizer` read from tokenizer.json.

Special tokens such as BOS are added exactly as the tokenizer.json's post-processor says,
which is how the model was trained to see its input.

A chat template is a Jinja program shipped inside the checkpoint, so it is untrusted code: it
runs in Jinja's immutable sandbox, as transformers runs it, where reaching for Python internals
is refused, and within a budget of time, memory and output (limits.py), which the sandbox alone
does not give. Whatever goes wrong in a template becomes one TokenizerError naming its file.
"""
import functools
import gc
import json
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .config import model_file, read_json, read_text
from .limits import MAX_PROMPT_BYTES, TEMPLATE_MEMORY, TEMPLATE_SECONDS, address_space, size_text

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")   # what templates may use


class TokenizerError(ValueError):
    """tokenizer.json, tokenizer_config.json or the chat template in it cannot be used."""


class Tokenizer:
    def __init__(self, hf, chat_template=None, special_tokens=None, template_file=None):
        self.hf = hf                                   # the tokenizers.Tokenizer
        self.chat_template = chat_template             # Jinja source, or None
        self.special_tokens = special_tokens or {}     # e.g. {"bos_token": "<|im_start|>"}
        self.template_file = template_file             # where the template came from, for errors
        self.vocab_size = self.hf.get_vocab_size()

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for (the longest token, decoded): a text of n bytes
        is at least n / max_token_bytes tokens, whitespace and unknown characters aside."""
        pieces = self.hf.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max([1] + [len(p.encode()) for p in pieces])

    def token_strings(self, ids) -> list:
        """Each id's text on its own (what a lens plot labels a cell with)."""
        return [self.hf.decode([int(i)]) for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        """The prompt text for [{"role": ..., "content": ...}], from the model's Jinja chat template."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (chat_template in tokenizer_config.json); "
                                 "pass a plain prompt without --chat")
        return render_chat_template(self.chat_template, self.template_file, messages=messages,
                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size})"


def render_chat_template(template, source, **variables) -> str:
    """Render an untrusted chat template the way transformers' apply_chat_template does.

    Jinja's ImmutableSandboxedEnvironment refuses attribute access to Python internals
    (`cycler.__init__.__globals__` ...) and changes to lists and dicts; loopcontrols gives
    {% break %}; raise_exception, strftime_now and a tojson that keeps non-ASCII text are
    the helpers templates written for transformers call. The sandbox stops code, not loops or
    growth, so rendering also has a budget (_budget): TEMPLATE_SECONDS of time, TEMPLATE_MEMORY of
    memory, an output of at most MAX_PROMPT_BYTES characters, and * and ** checked before they run.
    Any failure is a TokenizerError.
    """
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):                  # how a template refuses a conversation
        raise TokenizerError(f"the chat template in {source} refused the conversation: {message}")

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = _tojson
    try:
        with _budget():
            return _render(env, template, variables)
    except TokenizerError:
        raise
    except _OverBudget as e:
        stopped = str(e)
    except MemoryError:
        stopped = f"needed more than {size_text(TEMPLATE_MEMORY)} of memory"
    except jinja2.exceptions.SecurityError as e:
        raise TokenizerError(f"the chat template in {source} was stopped by the sandbox, where templates "
                             f"may only read the conversation: {e}") from None
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template in {source} is not valid Jinja: {e.message} "
                             f"(template line {e.lineno})") from None
    except Exception as e:                 # the template is untrusted code: any error in it is its own
        raise TokenizerError(f"the chat template in {source} failed: {type(e).__name__}: {e}") from None
    # What the stopped template built is held by reference cycles (its frames and their traceback):
    # free it now, or the next rendering in this process would start that much higher.
    gc.collect()
    raise TokenizerError(f"the chat template in {source} was stopped: it {stopped}")


class _OverBudget(BaseException):
    """A template ran out of its budget. A BaseException, so that no `except Exception` on the way
    (in Jinja's code or the template's) can swallow it."""


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with * and ** checked before they run (which also keeps Jinja from
    computing them while it compiles the template): 'a' * 10**10 or 10 ** (10 ** 10) is a single
    operation that takes the machine's memory or time before any other check could see it."""
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_PROMPT_BYTES:
                raise _OverBudget(f"repeated a sequence of {len(seq):,} items {n:,} times")
        if (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                and right * abs(left).bit_length() > 1 << 20):
            raise _OverBudget(f"raised {left} to the power {right}, a number of more than a million bits")
        return super().call_binop(context, operator, left, right)


def _render(env, template, variables):
    """The template's output, stopped as soon as it is longer than MAX_PROMPT_BYTES characters."""
    out, size = [], 0
    for chunk in env.from_string(template).generate(**variables):
        size += len(chunk)
        if size > MAX_PROMPT_BYTES:
            raise _OverBudget(f"wrote more than {MAX_PROMPT_BYTES:,} characters, more than any prompt may hold")
        out.append(chunk)
    return "".join(out)


@contextmanager
def _budget():
    """Run the block for at most TEMPLATE_SECONDS, checked at every line of Python it runs (a trace
    function), with at most TEMPLATE_MEMORY more memory (limits.address_space: past it, every
    allocation fails with MemoryError, however the template grows its strings)."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise _OverBudget(f"ran for more than {TEMPLATE_SECONDS:g} s")
        return check

    with address_space(TEMPLATE_MEMORY):          # outermost: its limit is restored after the tracer is gone
        previous = sys.gettrace()
        sys.settrace(check)
        try:
            yield
        finally:
            sys.settrace(previous)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON as transformers' templates expect it: non-ASCII kept, no HTML escaping (Jinja's own escapes)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value, key, source):
    """A special token from tokenizer_config.json: a string, or {"content": ...} (transformers' AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{key} in {source} must be a string or an object with a \"content\" "
                             f"string, got {value!r:.60}")
    return value


def _chat_template(cfg, model_dir, cfg_path):
    """(template source, the file it came from) or (None, None)."""
    template = cfg.get("chat_template")
    if isinstance(template, list):                 # named templates: [{"name": "default", "template": ...}]
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"chat_template in {cfg_path} must be a string, got {type(template).__name__}")
    if template is not None:
        return template, cfg_path
    jinja = model_file(model_dir, "chat_template.jinja", TokenizerError)    # newer HF checkpoints keep it here
    if jinja is not None:
        return read_text(jinja, TokenizerError), jinja
    return None, None


def load_tokenizer(model_dir):
    """The directory's tokenizer, or None if it has no tokenizer.json. Its files are regular files
    inside the model's directory (config.model_file), each at most MAX_TEXT_BYTES."""
    model_dir = Path(model_dir)
    path = model_file(model_dir, "tokenizer.json", TokenizerError)
    if path is None:
        return None
    text = read_text(path, TokenizerError)
    try:
        hf = _HFTokenizer.from_str(text)
    except Exception as e:                 # the tokenizers library raises a bare Exception for a bad file
        raise TokenizerError(f"{path} cannot be read by the tokenizers library: {e}") from None
    cfg_path = model_file(model_dir, "tokenizer_config.json", TokenizerError)
    cfg = {} if cfg_path is None else read_json(cfg_path, TokenizerError)
    special = {key: _token_text(cfg.get(key), key, cfg_path) for key in SPECIAL_TOKENS}
    template, source = _chat_template(cfg, model_dir, cfg_path)
    return Tokenizer(hf, template, {k: v for k, v in special.items() if v is not None}, source)
