"""Fuzzing the loader: hundreds of seeded corruptions of a tiny checkpoint, of a tiny GGUF
through convert (its bytes, and the counts, lengths, types, dimensions and offsets of its header
and tensor table), and hostile chat templates. Every case must load a model with finite logits
(or render) or raise one of minee's own errors; any other exception, a crash, a hang (each case
has a time limit), a huge allocation (the address space is capped) or NaN logits fails the test,
which names the case (kind, seed, base) so make_case rebuilds it. The counts per outcome are
printed (pytest -s).
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
from test_convert import craft_gguf, llama_parts, write_tiny_llama_gguf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the worker relies on fork and RLIMIT_AS as Linux provides them")

HERE = Path(__file__).resolve().parent
MEMORY_CAP = 1 << 30                          # RLIMIT_AS of the process that loads the cases
SEEDS_PER_KIND = 60
ALLOWED = {"load": {"loaded", "WeightsError", "ConfigError"},
           "gguf": {"loaded", "WeightsError", "ConfigError", "GGUFError"},
           "template": {"rendered", "TokenizerError"}}
TEMPLATE_CASES = 48
TEMPLATE_SECONDS = 5              # a template case's time limit (its budget in the worker: 0.25 s)

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


# ----------------------------------------------------------------------------- GGUF header surgery

GGUF_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_fields(raw):
    """[(offset, struct code, what)] of every count, length, type, dimension and offset in the
    header of the valid GGUF `raw`, and of its number-valued metadata: where a hostile file lies.
    Written apart from minee's own walk over the header (check_gguf_layout), which it tests."""
    fields, at = [], 4

    def field(code, what):
        nonlocal at
        fields.append((at, code, what))
        at += struct.calcsize(code)
        return struct.unpack_from("<" + code, raw, at - struct.calcsize(code))[0]

    def string(what, record=True):
        nonlocal at
        if record:
            n = field("Q", f"length of {what}")
        else:
            n = struct.unpack_from("<Q", raw, at)[0]
            at += 8
        at += n
        return raw[at - n:at].decode()

    field("I", "version")
    n_tensors, n_meta = field("Q", "tensor count"), field("Q", "metadata count")
    for _ in range(n_meta):
        key = string("a key")
        kind = field("I", f"type of {key}")
        if kind == 9:
            item, count = field("I", f"item type of {key}"), field("Q", f"length of {key}")
            for i in range(count):
                if item == 8:
                    string(f"{key}[{i}]", record=i < 3)
                else:
                    at += struct.calcsize(GGUF_CODES[item])
        elif kind == 8:
            string(key)
        else:
            field(GGUF_CODES[kind], f"value of {key}")
    for _ in range(n_tensors):
        name = string("a tensor name")
        for d in range(field("I", f"dimension count of {name}")):
            field("Q", f"dimension {d} of {name}")
        field("I", f"type of {name}")
        field("Q", f"offset of {name}")
    return fields


def hostile_number(code, old, rng):
    """A hostile value for a header field of this struct code (old: its true value), as bytes."""
    if code in "fd":
        return struct.pack("<" + code, [math.nan, math.inf, -1.0, 0.0, 1e30, 1e-30][rng.integers(6)])
    size = struct.calcsize(code)
    values = [0, 1, 3, 5, 9, 13, 99, old - 1, old + 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]
    value = values[rng.integers(len(values))] % (1 << 8 * size)
    return value.to_bytes(size, "little")


def make_gguf_structure_case(seed, base, out):
    """Copy the valid GGUF `base` with one number of its header replaced by a hostile one; returns a description."""
    rng = np.random.default_rng(seed)
    raw = bytearray(base.read_bytes())
    at, code, what = (fields := gguf_fields(bytes(raw)))[rng.integers(len(fields))]
    old = struct.unpack_from("<" + code, raw, at)[0]
    new = hostile_number(code, int(old) if code not in "fd" else 0, rng)
    raw[at:at + len(new)] = new
    out.write_bytes(bytes(raw))
    return f"{what} at byte {at}: {old!r} -> {struct.unpack('<' + code, new)[0]!r}"


# ----------------------------------------------------------------------------- hostile chat templates

GROW = ["ns.s + ns.s", "ns.s ~ ns.s", "[ns.s, ns.s] | join", "ns.s * 2", "ns.s.replace('a', ns.s)",
        "'%s%s' % (ns.s, ns.s)", "ns.s | center(ns.s | length * 2)", "'{}{}'.format(ns.s, ns.s)",
        "ns.s + [ns.s] if false else ns.s * 3", "(ns.s | list) | join('') * 2"]
SIZES = ["3", "64", "100000", "10**9", "10**12"]
EXPRESSIONS = ["'a' * N", "N ** N", "10 ** (N)", "range(N) | list | length", "lipsum(n=N) | length",
               "('%0' ~ N ~ 'd') | format(1)", "'a'.ljust(N)", "' ' | indent(N)", "'x y' | wordwrap(N)",
               "(range(100) | list) * N", "messages[0].content * N", "('{:>' ~ N ~ '}').format(1)",
               "range(N) | sum", "(range(1000) | list | map('string') | join) | length * N"]


def make_template(seed):
    """A chat template built by seed from what makes templates grow or loop: a string doubled in a
    loop, nested loops, one huge expression, deep recursion."""
    rng = np.random.default_rng(seed)
    pick = lambda options: options[rng.integers(len(options))]             # noqa: E731
    shape = seed % 4
    if shape == 0:
        return ("{% set ns = namespace(s='ab') %}{% for i in range(" + pick(SIZES[:3]) + ") %}{% set ns.s = "
                + pick(GROW) + " %}{% endfor %}{{ " + pick(["ns.s | length", "ns.s", "ns.s[:10]"]) + " }}")
    if shape == 1:
        depth, body = 1 + rng.integers(3), pick(["", "x", "{{ i }}", "{{ messages[0].content * 100 }}"])
        loops = "".join("{% for i" + str(d) + " in range(" + pick(SIZES[:3]) + ") %}" for d in range(depth))
        return loops + body.replace("i }}", "i0 }}") + "{% endfor %}" * depth
    if shape == 2:
        return "{{ " + pick(EXPRESSIONS).replace("N", pick(SIZES)) + " }}"
    return ("{% macro f(n) %}{{ f(n + 1) if n < " + pick(SIZES) + " else n }}{{ 'x' * n }}{% endmacro %}"
            "{{ f(0) | length }}")


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


def template_outcome(outcome, detail):
    """What happened to a template, in a few words: rendered, stopped by which budget, failed how."""
    if ": it " in detail:
        return "stopped: " + " ".join(detail.split(": it ", 1)[1].split()[:3])
    if " failed: " in detail:
        return "failed: " + detail.split(" failed: ", 1)[1].split(":")[0]
    return outcome if outcome == "rendered" else detail.split(".jinja ", 1)[-1][:30]


def test_fuzz_corrupted_checkpoints_ggufs_and_templates(bases, tmp_path):
    cases, allowed = [], {}

    def add(kind, case_id, **case):
        cases.append({"id": case_id, **case})
        allowed[case_id] = ALLOWED[kind]

    for k, kind in enumerate(KINDS):
        for s in range(SEEDS_PER_KIND):
            seed = 1000 * k + s
            base = bases[seed % len(bases)]
            out = tmp_path / f"{kind}-{seed}"
            add("load", f"{kind} seed={seed} base={base.name}: {make_case(kind, seed, base, out)}", path=str(out))
    gguf = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf, L=1, D=32, H=4, KV=2, F=64)
    for seed in range(SEEDS_PER_KIND):
        out = tmp_path / f"gguf-{seed}.gguf"
        add("gguf", f"gguf seed={seed}: {make_gguf_case(seed, gguf, out)}", gguf=str(out),
            path=str(tmp_path / f"gguf-{seed}"))
    crafted = craft_gguf(tmp_path / "crafted.gguf", *llama_parts())
    for seed in range(2 * SEEDS_PER_KIND):
        out = tmp_path / f"gguf-header-{seed}.gguf"
        add("gguf", f"gguf-header seed={seed}: {make_gguf_structure_case(seed, crafted, out)}", gguf=str(out),
            path=str(tmp_path / f"gguf-header-{seed}"))
    for seed in range(TEMPLATE_CASES):
        template = make_template(seed)
        add("template", f"template seed={seed}: {template}", template=template, seconds=TEMPLATE_SECONDS)

    outcomes = run_worker(cases)
    counts = collections.Counter((c["id"].split(" ", 1)[0], o) for c, (o, _) in zip(cases, outcomes.values()))
    templates = collections.Counter(template_outcome(o, d) for i, (o, d) in outcomes.items()
                                    if i.startswith("template"))
    print(f"\n{len(cases)} fuzz cases: " + ", ".join(f"{kind} {o} {n}" for (kind, o), n in sorted(counts.items())))
    print("templates: " + ", ".join(f"{o} {n}" for o, n in templates.most_common()))
    failures = [f"{i}\n    -> {o}: {d}" for i, (o, d) in outcomes.items() if o not in allowed[i]]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
    kinds = {kind: collections.Counter() for kind, _ in counts}
    for (kind, o), n in counts.items():
        kinds[kind][o] += n
    assert kinds["header-field"]["loaded"] > 0 and kinds["header-field"]["WeightsError"] > 0
    assert kinds["config-field"]["ConfigError"] > 0 and kinds["gguf"]["GGUFError"] > 0
    assert kinds["gguf-header"]["GGUFError"] > 0 and kinds["template"]["TokenizerError"] > 0
