"""The budgets every untrusted input is held to, in one place, and the memory this process may still use.

minee reads files from anywhere: checkpoints, GGUF files, tokenizer files, chat templates, prompts,
corpora, gate and shortcut files. Every reader checks the sizes a file declares against the bytes
that exist and against the budgets below before it allocates or loops, and bounds what it writes
by what it read, so a hostile file is one clear error naming it, never a machine out of memory,
disk or time.

available_memory() is the one answer to "how many bytes may this process still allocate": the
smallest of the memory the machine has free, the process's address-space limit (`ulimit -v`)
and its cgroup's (a container's) limit. The weights check and the KV-cache check both ask it.
"""
import math
import os
from contextlib import contextmanager
from pathlib import Path

try:
    import resource                       # Unix; elsewhere there is no address-space limit to read or set
except ImportError:
    resource = None

# ------------------------------------------------------------------ files read whole
MAX_TEXT_BYTES = 64 << 20        # config.json, the shard index, tokenizer files, chat templates, prompts files
MAX_HEADER_BYTES = 100_000_000   # a safetensors JSON header (the format's own limit)
MAX_GATE_FILE = 1 << 20          # a learned gate file holds a few dozen numbers
MAX_META_CHARS = 1 << 20         # the JSON metadata inside a shortcut file
MAX_NPY_HEADER = 10_000          # an .npy header inside a shortcut file (numpy's own limit, checked before it reads)

# ------------------------------------------------------------------ config.json
# Upper bounds far above any released LLaMA (Llama-3.1-405B: 126 layers, width 16,384, FFN 53,248,
# 128 heads, vocabulary 128,256). They exist so that a number in a file cannot make minee build
# huge tables or allocate before the weights are looked at.
MAX_INT_FIELDS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
    "head_dim": 1024, "max_position_embeddings": 1 << 24, "original_max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24, "max_window_layers": 1024, "query_pre_attn_scalar": 1 << 24,
    "_sliding_window_pattern": 1024,
}

# ------------------------------------------------------------------ GGUF files
MAX_GGUF_TENSORS = 1 << 16       # 1,024 blocks of 9 tensors (the config's limit) fit 7 times over
MAX_GGUF_ARRAY_ITEMS = 1 << 21   # all metadata arrays together; Gemma 3's 262,144-token vocabulary takes 786,432
GGUF_BYTES_PER_ITEM = 1024       # what the gguf package's reader holds per array item (measured: ~900 bytes)
# A conversion writes float32, so each GGUF tensor byte becomes 32 / (bits per weight of its type) / 8
# bytes: F16 2x, Q8_0 3.8x, Q4_1 (SmolLM2) 6.4x, Q4_0 7.1x, Q2_K 12.2x, and IQ1_S, the smallest type
# the gguf package dequantizes (1.5625 bits per weight), 20.5x. Tensors may not share bytes, so a
# conversion never writes more than this many times the GGUF's tensor bytes.
MAX_CONVERSION_GROWTH = 21

# ------------------------------------------------------------------ text fed to the tokenizer
# A prompt can hold no more tokens than the model's context, and no token stands for more bytes than
# the longest token of its vocabulary, so a longer text is refused before it is tokenized (tokenizing
# costs ~2 s and ~200 MB per MB of text). MAX_PROMPT_BYTES caps that bound for long contexts: 32 bytes
# per token over a 131,072-token context.
MAX_PROMPT_BYTES = 4 << 20
CORPUS_PIECE_CHARS = 1 << 20     # a corpus is read and tokenized at most this many characters at a time
TEMPLATE_SECONDS = 2.0           # a chat template renders in milliseconds; this is its budget of time ...
TEMPLATE_MEMORY = 256 << 20      # ... and of memory; its output may not exceed MAX_PROMPT_BYTES characters

# ------------------------------------------------------------------ memory
MEMORY_MARGIN = 64 << 20         # room a big allocation must leave for the work around it (BLAS buffers, activations)

# Where Linux describes this process; tests point these at fake trees.
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


class MemoryLimitError(ValueError):
    """An allocation would not fit in the memory this process may still use."""


def prompt_byte_limit(context, max_token_bytes):
    """The longest text (in UTF-8 bytes) a model with this context and vocabulary could ever use."""
    return min(context * max_token_bytes, MAX_PROMPT_BYTES)


def size_text(n):
    """Bytes as GiB, MiB, KiB or bytes, for error messages."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


# ------------------------------------------------------------------ memory

def available_memory():
    """(bytes, what limits them): how much this process may still allocate, the smallest of the
    memory the machine has free (MemAvailable), the address-space limit (RLIMIT_AS, `ulimit -v`)
    minus what the process maps already, and every enclosing cgroup's limit (v2 memory.max, v1
    memory.limit_in_bytes) minus what it uses. (None, None) where the OS tells none of these."""
    rooms = [_free_memory(), _address_space_room(), *_cgroup_rooms()]
    return min((r for r in rooms if r is not None), default=(None, None))


def check_memory(need, what, fix, error=MemoryLimitError):
    """Raise `error` unless `need` more bytes, and MEMORY_MARGIN besides, can be allocated; the
    message says what needed them, what limits memory and the fix."""
    room, source = available_memory()
    if room is not None and need + MEMORY_MARGIN > room:
        raise error(f"{what} needs {size_text(need)} of memory and {size_text(MEMORY_MARGIN)} to work with, but "
                    f"only {size_text(max(room, 0))} can be allocated ({source}); {fix}")


def out_of_memory_message():
    """What the command lines print for a MemoryError that got past every check."""
    room, source = available_memory()
    left = "" if room is None else f"; {size_text(max(room, 0))} can be allocated now ({source})"
    return f"out of memory{left}: use a smaller model, batch or input, or free memory"


def _free_memory():
    """(MemAvailable, label) on Linux; elsewhere the free (else total) physical memory."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "the machine's available memory, MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE"), "the machine's free memory"
        except (AttributeError, ValueError, OSError):
            continue
    return None


def mapped_bytes():
    """The address space this process maps now (VmSize), or None where /proc does not say."""
    try:
        return int((PROC / "self" / "statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _address_space_room():
    """(RLIMIT_AS minus the address space mapped now, label), or None without such a limit."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    used = mapped_bytes()
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return (soft - used,
            f"the address-space limit RLIMIT_AS (ulimit -v) of {size_text(soft)}, {size_text(used)} mapped")


def _cgroup_rooms():
    """(limit minus usage, label) of this process's cgroup and each cgroup above it that has a memory
    limit, for cgroup v2 (memory.max) and v1 (memory.limit_in_bytes)."""
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not path.startswith("/"):
            continue
        if controllers == "":                                              # v2: "0::/path"
            base, files = CGROUP, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):                           # v1: "4:memory:/path"
            base, files = CGROUP / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for d in [Path(path), *Path(path).parents]:                        # this cgroup, then each parent
            room = _cgroup_room(base / d.relative_to("/"), *files)
            if room is not None:
                rooms.append(room)
    return rooms


def _cgroup_room(d, limit_file, usage_file):
    """(limit minus usage, label) of the cgroup directory d, or None if it sets no limit."""
    try:
        limit, usage = (d / limit_file).read_text().strip(), int((d / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:    # v1 writes "no limit" as ~2**63
        return None
    return (int(limit) - usage,
            f"the cgroup limit {d / limit_file} of {size_text(int(limit))}, {size_text(usage)} in use")


@contextmanager
def address_space(extra):
    """Run the block with this process's address space capped at what it maps now plus `extra` bytes
    (RLIMIT_AS, restored after), so that any allocation past that fails at once with MemoryError
    instead of taking the machine's memory. Where the OS has no such limit (or no /proc), a no-op."""
    used = mapped_bytes()
    if resource is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = min(used + extra, math.inf if hard == resource.RLIM_INFINITY else hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:                    # already at least this tight
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
