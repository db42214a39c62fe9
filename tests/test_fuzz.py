"""Fuzzing the loader: hundreds of seeded corruptions of a tiny checkpoint (and of a tiny GGUF
through convert). Every case must load a model with finite logits or raise one of minee's own
errors; any other exception, a crash, a hang, a huge allocation (the address space is capped)
or NaN logits fails the test, which names the case (kind, seed, base) so make_case rebuilds it.
"""
import collections
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import weights_tool
from test_convert import write_tiny_llama_gguf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the worker relies on fork and RLIMIT_AS as Linux provides them")

HERE = Path(__file__).resolve().parent
MEMORY_CAP = 1 << 30                          # RLIMIT_AS of the process that loads the cases
SEEDS_PER_KIND = 60
ALLOWED = {"load": {"loaded", "WeightsError", "ConfigError"},
           "gguf": {"loaded", "WeightsError", "ConfigError", "GGUFError"}}

# Hostile values for header and config fields: wrong types, signs, sizes, and JSON's odd corners.
HOSTILE = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 2**64 + 1, 10**30, 1.5, -0.0, 1e-40, 1e300, math.nan,
           math.inf, "16", "", True, False, None, [], [1], {}, {"a": 1}]


# ----------------------------------------------------------------------------- safetensors surgery

def split_safetensors(path):
    """(header dict, data bytes) of a .safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(path, header_text, data, length=None):
    """Write header text + data as a .safetensors file (length: a false header length, if given)."""
    blob = header_text.encode()
    blob += b" " * (-len(blob) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def header_field_mutation(header, rng):
    """(new header text, description): one hostile change to the JSON header."""
    names = sorted(k for k in header if k != "__metadata__")
    name = names[rng.integers(len(names))]
    entry = header[name]
    begin, end = entry["data_offsets"]
    other = header[names[rng.integers(len(names))]]["data_offsets"]
    choice = rng.integers(9)
    if choice == 0:
        field = ["dtype", "shape", "data_offsets"][rng.integers(3)]
        value = HOSTILE[rng.integers(len(HOSTILE))]
        entry[field] = value
        what = f"{field} of {name} := {value!r}"
    elif choice == 1:
        value = [["F64"], "F99", "I8", "BF16", "F16", "U8", "BOOL"][rng.integers(7)]
        entry["dtype"] = value
        what = f"dtype of {name} := {value!r}"
    elif choice == 2:
        shape = entry["shape"]
        value = [[2**62, 2**62], [-1] + shape[1:], shape[::-1], shape + [1], [2**40, 2**40, 2**40],
                 [0] * len(shape), [s + 1 for s in shape]][rng.integers(7)]
        entry["shape"] = value
        what = f"shape of {name} := {value}"
    elif choice == 3:
        value = [[-8, end - begin - 8], [end, begin], [0, 2**40], [begin, end + 4], [begin - 4, end - 4],
                 [begin], other, [begin + 0.5, end], [2**64, 2**64 + end - begin]][rng.integers(9)]
        entry["data_offsets"] = value
        what = f"data_offsets of {name} := {value}"
    elif choice == 4:
        value = HOSTILE[rng.integers(len(HOSTILE))]
        header[name] = value
        what = f"entry {name} := {value!r}"
    elif choice == 5:
        field = ["dtype", "shape", "data_offsets"][rng.integers(3)]
        del entry[field]
        what = f"{field} of {name} deleted"
    elif choice == 6:
        del header[name]
        what = f"entry {name} deleted"
    elif choice == 7:
        header["__metadata__"] = HOSTILE[rng.integers(len(HOSTILE))]
        what = f"__metadata__ := {header['__metadata__']!r}"
    else:                                            # text-level: a name twice, deep nesting, a huge number
        text = json.dumps(header)
        twin = names[rng.integers(len(names))]
        return [text.replace(json.dumps(name), json.dumps(twin), 1),
                text.replace(json.dumps(name) + ": {", json.dumps(name) + ": " + "[" * 100_000 + "{", 1),
                text.replace(str(end), "9" * 5000, 1)][rng.integers(3)], f"text edit of {name} (twin {twin})"
    return json.dumps(header), what


def config_field_mutation(config, rng):
    """(new config.json text, description): one hostile value in one field the math reads."""
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings", "attention_bias", "mlp_bias", "eos_token_id", "bos_token_id",
              "model_type", "hidden_act", "sliding_window", "rope_scaling"]
    key = fields[rng.integers(len(fields))]
    value = HOSTILE[rng.integers(len(HOSTILE))]
    if key == "rope_scaling" and rng.integers(2):
        value = {"rope_type": ["linear", "llama3"][rng.integers(2)], "factor": value,
                 "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    if rng.integers(10) == 0:
        config.pop(key, None)
        return json.dumps(config), f"{key} deleted"
    config[key] = value
    return json.dumps(config), f"{key} := {value!r}"


def flip_bytes(data, lo, hi, rng):
    """data with 1-4 bytes in [lo, hi) replaced, half the time by characters that keep JSON readable
    (so numbers and names change rather than the syntax breaking), and where."""
    data = bytearray(data)
    where = sorted(int(p) for p in rng.integers(lo, hi, size=rng.integers(1, 5)))
    for p in where:
        data[p] = int(rng.integers(256)) if rng.integers(2) else b'0123456789-.e"'[rng.integers(14)]
    return bytes(data), where


KINDS = ["header-bytes", "body-bytes", "truncate", "header-field", "config-field", "config-bytes"]


def make_case(kind, seed, base, out):
    """Copy the base checkpoint to out and corrupt it as (kind, seed) says; returns a description."""
    shutil.copytree(base, out)
    rng = np.random.default_rng(seed)
    st, cfg = out / "model.safetensors", out / "config.json"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "header-bytes":
        data, where = flip_bytes(raw, 0, 8 + n, rng)
        st.write_bytes(data)
        return f"bytes {where} of the header"
    if kind == "body-bytes":
        data, where = flip_bytes(raw, 8 + n, len(raw), rng)
        st.write_bytes(data)
        return f"bytes {where} of the tensor data"
    if kind == "truncate":
        size = int(rng.integers(len(raw)))
        st.write_bytes(raw[:size])
        return f"cut to {size} of {len(raw)} bytes"
    if kind == "header-field":
        header, data = split_safetensors(st)
        text, what = header_field_mutation(header, rng)
        length = [None, None, None, 0, n + 8, n - 8, 2**63][rng.integers(7)]
        join_safetensors(st, text, data, length)
        return what + ("" if length is None else f", header length := {length}")
    if kind == "config-field":
        text, what = config_field_mutation(json.loads(cfg.read_text()), rng)
        cfg.write_text(text)
        return what
    text = cfg.read_bytes()
    if rng.integers(2):
        cfg.write_bytes(text[:int(rng.integers(len(text)))])
        return "config.json truncated"
    data, where = flip_bytes(text, 0, len(text), rng)
    cfg.write_bytes(data)
    return f"config.json bytes {where}"


def make_gguf_case(seed, base, out):
    """Corrupt a copy of the tiny GGUF: truncated, metadata bytes or tensor bytes; returns a description."""
    import gguf

    rng = np.random.default_rng(seed)
    raw = base.read_bytes()
    data_start = gguf.GGUFReader(str(base)).data_offset            # metadata before, tensors after
    how = seed % 3
    if how == 0:
        size = int(rng.integers(len(raw)))
        out.write_bytes(raw[:size])
        return f"GGUF cut to {size} of {len(raw)} bytes"
    lo, hi = (0, data_start) if how == 1 else (data_start, len(raw))
    data, where = flip_bytes(raw, lo, hi, rng)
    out.write_bytes(data)
    return f"GGUF bytes {where}"


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny valid checkpoints: untied F32, tied BF16 with llama3 RoPE, tied F16."""
    root = tmp_path_factory.mktemp("fuzz_bases")
    small = dict(layers=2, d_model=16, heads=2, kv_heads=1, ffn=32, vocab=64)
    return [weights_tool.make_random_model(root / "f32", untied=True, **small),
            weights_tool.make_random_model(root / "bf16", dtype="bfloat16", rope_scaling="llama3", **small),
            weights_tool.make_random_model(root / "f16", dtype="float16", seed=1, **small)]


def run_worker(cases):
    """Outcomes {id: (outcome, detail)} of the cases, from one memory-capped worker process."""
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_worker.py"), str(MEMORY_CAP)],
                          input="".join(json.dumps(c) + "\n" for c in cases), capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent), "OPENBLAS_NUM_THREADS": "1"},
                          timeout=600)
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(cases), f"the worker stopped early:\n{proc.stderr[-3000:]}"
    return {r["id"]: (r["outcome"], r["detail"]) for r in results}


def test_fuzz_corrupted_checkpoints_and_ggufs(bases, tmp_path):
    cases, allowed = [], {}
    for k, kind in enumerate(KINDS):
        for s in range(SEEDS_PER_KIND):
            seed = 1000 * k + s
            base = bases[seed % len(bases)]
            out = tmp_path / f"{kind}-{seed}"
            case_id = f"{kind} seed={seed} base={base.name}: {make_case(kind, seed, base, out)}"
            cases.append({"id": case_id, "path": str(out)})
            allowed[case_id] = ALLOWED["load"]
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf, L=1, D=32, H=4, KV=2, F=64)
    for seed in range(SEEDS_PER_KIND):
        out = tmp_path / f"gguf-{seed}.gguf"
        case_id = f"gguf seed={seed}: {make_gguf_case(seed, gguf, out)}"
        cases.append({"id": case_id, "gguf": str(out), "path": str(tmp_path / f"gguf-{seed}")})
        allowed[case_id] = ALLOWED["gguf"]

    outcomes = run_worker(cases)
    counts = collections.Counter(outcome for outcome, _ in outcomes.values())
    print(f"\n{len(cases)} fuzz cases: " + ", ".join(f"{o} {n}" for o, n in counts.most_common()))
    failures = [f"{i}\n    -> {o}: {d}" for i, (o, d) in outcomes.items() if o not in allowed[i]]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    assert counts["loaded"] > 0 and counts["WeightsError"] > 0 and counts["ConfigError"] > 0
    assert counts["GGUFError"] > 0
