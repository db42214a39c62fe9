"""Every file minee reads is untrusted: hostile chat templates, safetensors headers, config.json
fields and weight values each end in one clear error naming the file, never code execution,
a huge allocation, a raw NumPy/Python error or a NaN model. Each numbered finding of issue 8
has its tests here, and the findings of issue 18 (a file may not take unbounded time, memory or
disk either) from section 5 on; test_fuzz.py throws random damage at the same code.
"""
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import minee
import weights_tool
from minee.__main__ import main
from minee.convert import GGUFError, gguf_to_hf
from minee.tokenizer import TokenizerError, load_tokenizer
from test_convert import craft_gguf, llama_parts, write_tiny_llama_gguf
from test_fuzz import join_safetensors, split_safetensors

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(layers=2, d_model=16, heads=2, kv_heads=1, ffn=32, vocab=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A valid tiny F32 checkpoint with a 64-word tokenizer (and no chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = weights_tool.make_random_model(tmp_path_factory.mktemp("tiny") / "m", untied=True, **SMALL)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def copy_of(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def with_template(model_dir, template, **special):
    """model_dir with a tokenizer_config.json holding this chat template and special tokens."""
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **special}))
    return model_dir


# ----------------------------------------------------------------------------- 1. chat templates

ESCAPES = [
    "{{ cycler.__init__.__globals__.os.system('touch MARK') }}",                    # the example
    "{{ joiner.__init__.__globals__.os.popen('touch MARK').read() }}",
    "{{ lipsum.__globals__['os'].system('touch MARK') }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARK') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARK') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch MARK') }}",
    "{{ strftime_now.__globals__['__builtins__']['__import__']('os').system('touch MARK') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ (cycler | attr('__init__') | attr('__globals__')).os.system('touch MARK') }}",
    "{{ '{0.__init__.__globals__[os]}'.format(cycler) }}",
    "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
]


@pytest.mark.parametrize("template", ESCAPES, ids=range(len(ESCAPES)))
def test_hostile_chat_template_runs_nothing(tiny, tmp_path, template):
    mark = tmp_path / "pwned"
    path = with_template(copy_of(tiny, tmp_path), template.replace("MARK", str(mark)))
    model = minee.load(path)                         # loading never renders the template
    with pytest.raises(TokenizerError) as e:
        minee.generate(model, "w1 w2", max_new_tokens=2, chat=True)
    assert not mark.exists()
    msg = str(e.value)
    assert msg.startswith(f"the chat template in {path / 'tokenizer_config.json'} ") and "\n" not in msg


def test_hostile_chat_template_through_the_cli(tiny, tmp_path):
    mark = tmp_path / "pwned"
    path = with_template(copy_of(tiny, tmp_path), ESCAPES[0].replace("MARK", str(mark)))
    r = subprocess.run([sys.executable, "-m", "minee", "generate", "--model", str(path), "--prompt", "w1",
                        "--chat", "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT)
    assert not mark.exists()
    assert r.returncode == 2
    assert r.stderr.startswith("minee: error: the chat template in ") and r.stderr.count("\n") == 1
    assert str(path / "tokenizer_config.json") in r.stderr and "sandbox" in r.stderr


@pytest.mark.parametrize("template, words", [
    ("{% for m in messages %}{{ m.content }", ["not valid Jinja", "line 1"]),
    ("{{ messages[0].content / 0 }}", ["failed", "TypeError"]),
    ("{{ 1 / 0 }}", ["failed", "ZeroDivisionError"]),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ["failed", "RecursionError"]),
    ("{{ raise_exception('roles must alternate user/assistant') }}",
     ["refused the conversation: roles must alternate user/assistant"]),
], ids=["syntax", "type", "zero_division", "recursion", "raise_exception"])
def test_broken_chat_template_is_one_clear_error(tiny, tmp_path, template, words):
    path = with_template(copy_of(tiny, tmp_path), template)
    with pytest.raises(TokenizerError) as e:
        minee.load(path).tokenizer.apply_chat_template([{"role": "user", "content": "w1"}])
    for w in words + [str(path / "tokenizer_config.json")]:
        assert w in str(e.value), w
    rc = main(["generate", "--model", str(path), "--prompt", "w1", "--chat", "--max-new-tokens", "2"])
    assert rc == 2


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Answer in one word.  "}, {"role": "user", "content": "Capital of Peru?"},
     {"role": "assistant", "content": "Lima. "}, {"role": "user", "content": "Ünïcödé ✓ <b>&amp;</b> \"q\""}],
]

# Written for these tests in the style of Llama 3's template; it also uses what templates written
# for transformers rely on: special tokens, namespace, {% break %}, trim, raise_exception, tojson.
LLAMA3_STYLE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim %}"
    "{% break %}{% endif %}{% endfor %}"
    "{% if ns.system %}<|start_header_id|>system<|end_header_id|>\n\n{{ ns.system }}<|eot_id|>{% endif %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% else %}{{ eos_token }}{{ messages[-1] | tojson }}{% endif %}"
)


def transformers_render(model_dir, messages, add_generation_prompt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one_turn", "multi_turn"])
def test_smollm2_template_renders_as_transformers(smollm2_dir, messages, add_generation_prompt):
    ours = load_tokenizer(smollm2_dir).apply_chat_template(messages, add_generation_prompt)
    assert ours == transformers_render(smollm2_dir, messages, add_generation_prompt)
    assert ours.startswith("<|im_start|>")


@pytest.fixture(scope="module")
def llama3_style_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2's tokenizer.json with a Llama-3-style template; BOS/EOS given as AddedToken objects."""
    path = tmp_path_factory.mktemp("llama3_style")
    shutil.copy(smollm2_dir / "tokenizer.json", path / "tokenizer.json")
    added = dict(__type="AddedToken", lstrip=False, rstrip=False, normalized=False, single_word=False, special=True)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": LLAMA3_STYLE,
        "bos_token": {"content": "<|begin_of_text|>", **added}, "eos_token": {"content": "<|eot_id|>", **added},
        "pad_token": None}))
    return path


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one_turn", "multi_turn"])
def test_llama3_style_template_renders_as_transformers(llama3_style_dir, messages, add_generation_prompt):
    ours = load_tokenizer(llama3_style_dir).apply_chat_template(messages, add_generation_prompt)
    assert ours == transformers_render(llama3_style_dir, messages, add_generation_prompt)
    assert ours.startswith("<|begin_of_text|>")                          # bos_token reached the template


def test_template_raise_exception_matches_transformers(llama3_style_dir):
    from jinja2.exceptions import TemplateError

    bad = [{"role": "tool", "content": "42"}]
    with pytest.raises(TemplateError, match="unknown role tool"):
        transformers_render(llama3_style_dir, bad, True)
    with pytest.raises(TokenizerError, match="refused the conversation: unknown role tool"):
        load_tokenizer(llama3_style_dir).apply_chat_template(bad)


def test_named_chat_templates_use_the_default(tiny, tmp_path):
    """tokenizer_config.json may hold a list of named templates; like transformers, minee uses "default"."""
    path = with_template(copy_of(tiny, tmp_path), [{"name": "tool_use", "template": "T"},
                                                   {"name": "default", "template": "{{ bos_token }}D"}],
                         bos_token="<s>")
    assert load_tokenizer(path).apply_chat_template([{"role": "user", "content": "w1"}]) == "<s>D"


@pytest.mark.parametrize("file, content, words", [
    ("tokenizer_config.json", "{not json", ["tokenizer_config.json", "not valid JSON"]),
    ("tokenizer_config.json", '{"bos_token": 7}', ["bos_token", "tokenizer_config.json", "7"]),
    ("tokenizer_config.json", '{"chat_template": 42}', ["chat_template", "must be a string"]),
    ("tokenizer.json", '{"version": "1.0", "model": 5}', ["tokenizer.json", "cannot be read"]),
], ids=["config_not_json", "special_token_int", "template_not_text", "tokenizer_garbage"])
def test_damaged_tokenizer_files(tiny, tmp_path, file, content, words):
    path = copy_of(tiny, tmp_path)
    (path / file).write_text(content)
    with pytest.raises(TokenizerError) as e:
        minee.load(path)
    for w in words:
        assert w in str(e.value), w
    assert main(["generate", "--model", str(path), "--prompt", "w1", "--max-new-tokens", "1"]) == 2


# ----------------------------------------------------------------------------- 2. safetensors headers

def with_header(model_dir, change):
    """model_dir whose model.safetensors header went through change(header) (which may return text)."""
    st = model_dir / "model.safetensors"
    header, data = split_safetensors(st)
    text = change(header)
    join_safetensors(st, text if isinstance(text, str) else json.dumps(header), data)
    return model_dir


def entry(name="model.norm.weight", **fields):
    def change(header):
        header[name].update(fields)
    return change


def replace(name, value):
    def change(header):
        header[name] = value
    return change


NORM = "model.norm.weight"                  # shape (16,), F32: 64 bytes
HOSTILE_HEADERS = {
    "claims_1TiB": (entry(shape=[2**20, 2**18], data_offsets=[0, 2**40]), ["1099511627776", "data_offsets"]),
    "shape_overflow": (entry(shape=[2**62, 2**62]), ["shape", "takes", "bytes"]),
    "negative_dimension": (entry(shape=[-16]), ["shape [-16]", "whole numbers >= 0"]),
    "entry_not_object": (replace(NORM, [1, 2, 3]), ["[1, 2, 3]", "not an object"]),
    "no_data_offsets": (lambda h: h[NORM].pop("data_offsets"), ["data_offsets None"]),
    "negative_offsets": (entry(data_offsets=[-64, 0]), ["data_offsets [-64, 0]", "whole numbers >= 0"]),
    "unknown_dtype": (entry(dtype="F99"), ["unknown dtype 'F99'", "BF16"]),
    "bool_shape": (entry(shape=[True] * 16), ["shape", "whole numbers"]),
    "offsets_beyond_file": (entry(data_offsets=[10**9, 10**9 + 64]), ["do not lie within"]),
    "overlap": (lambda h: h[NORM].update(data_offsets=h["model.embed_tokens.weight"]["data_offsets"][:1]
                                         + [h["model.embed_tokens.weight"]["data_offsets"][0] + 64]),
                ["overlap", NORM, "model.embed_tokens.weight"]),
    "name_twice": (lambda h: json.dumps(h).replace('"lm_head.weight"', json.dumps(NORM)),
                   ["appears twice", NORM]),
    "deep_nesting": (lambda h: json.dumps(h).replace(json.dumps(NORM) + ": {", json.dumps(NORM) + ": "
                                                     + "[" * 100_000 + "{"), ["bad JSON header"]),
}


@pytest.mark.parametrize("change, words", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_hostile_safetensors_header(tiny, tmp_path, change, words):
    path = with_header(copy_of(tiny, tmp_path), change)
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    msg = str(e.value)
    for w in words + [str(path / "model.safetensors")]:
        assert w in msg, w
    if "bad JSON header" not in msg:                  # JSON that does not parse has no tensor to name
        assert NORM in msg


def test_header_length_over_the_format_limit(tiny, tmp_path):
    path = copy_of(tiny, tmp_path)
    with open(path / "model.safetensors", "r+b") as f:                     # a sparse 200 MB file
        f.write(struct.pack("<Q", 150_000_000))
        f.truncate(200_000_000)
    with pytest.raises(minee.WeightsError, match="header length 150000000 is impossible"):
        minee.load(path)


def test_same_tensor_in_two_shards(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = copy_of(tiny, tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names}, path / "a.safetensors")
    save_file({NORM: np.zeros(16, np.float32)}, path / "b.safetensors")   # would silently replace it
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    for w in [NORM, "a.safetensors", "b.safetensors", "once"]:
        assert w in str(e.value), w


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/dev/zero", "sub/dir.safetensors", "x.bin"])
def test_index_naming_a_shard_outside_the_directory(tiny, tmp_path, shard):
    path = copy_of(tiny, tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {NORM: shard}}))
    with pytest.raises(minee.WeightsError, match="shards must be .safetensors files in"):
        minee.load(path)


@pytest.mark.parametrize("value, dtype", [(np.nan, "F32"), (np.inf, "F32"), (1e30, "F32"), (-7e4, "F32"),
                                          (np.inf, "F16"), (np.nan, "BF16")])
def test_nan_inf_and_absurd_weights_are_refused(tiny, tmp_path, value, dtype):
    """One damaged value would turn every logit into NaN (or inf); the loader refuses it."""
    from safetensors.numpy import load_file

    from minee.convert import f32_to_bf16, write_safetensors
    path = copy_of(tiny, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    cast = {"F32": lambda a: a, "F16": lambda a: a.astype(np.float16), "BF16": f32_to_bf16}[dtype]
    write_safetensors(path / "model.safetensors", [(n, dtype, a.shape) for n, a in tensors.items()],
                      (cast(a) for a in tensors.values()))
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    for w in ["model.layers.1.mlp.up_proj.weight", "model.safetensors", "NaN, Inf", "65504"]:
        assert w in str(e.value), w


def test_largest_allowed_weight_still_loads(tiny, tmp_path):
    """The bound is float16's range: a checkpoint at its edge loads."""
    from safetensors.numpy import load_file, save_file

    path = copy_of(tiny, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = -65504.0
    save_file(tensors, path / "model.safetensors")
    assert minee.load(path).params["model.layers.1.mlp.up_proj.weight"][3, 5] == -65504.0


def test_shapes_are_checked_before_any_tensor_is_read(tiny, tmp_path, monkeypatch):
    import minee.weights

    reads = []
    monkeypatch.setattr(minee.weights, "read_tensor", lambda *a: reads.append(a))
    path = with_header(copy_of(tiny, tmp_path), entry("model.layers.1.mlp.down_proj.weight", dtype="I32"))
    with pytest.raises(minee.WeightsError, match="dtype I32; minee reads F32, F16, BF16"):
        minee.load(path)
    assert reads == []


def test_model_too_big_for_memory_is_refused_before_allocating(tiny, monkeypatch, capsys):
    import minee.limits
    import minee.weights

    monkeypatch.setattr(minee.limits, "available_memory", lambda: (10_000, "a test's limit"))
    monkeypatch.setattr(minee.weights, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(minee.WeightsError) as e:
        minee.load(tiny)
    need = 4 * minee.load_config(tiny).n_params
    assert need < 1 << 20 and (f"needs {need / 1024:.1f} KiB of memory and 64.0 MiB to work with, but only 9.8 KiB "
                               "can be allocated (a test's limit)") in str(e.value)
    assert main(["generate", "--model", str(tiny), "--prompt", "w1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minee: error: the model in") and err.count("\n") == 1


def test_available_memory_is_plausible():
    import os

    from minee.limits import available_memory
    (free, source), total = available_memory(), os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total and source


# ----------------------------------------------------------------------------- 3. config.json

def config_with(model_dir, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


HOSTILE_CONFIGS = {
    "heads_0": ({"num_attention_heads": 0}, ["num_attention_heads", "got 0"]),
    "layers_1e8": ({"num_hidden_layers": 10**8}, ["num_hidden_layers", "1,024", "100000000"]),
    "linear_factor_0": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, ["factor", "got 0"]),
    "eps_negative": ({"rms_norm_eps": -1}, ["rms_norm_eps", "got -1"]),
    "head_dim_odd": ({"head_dim": 7}, ["head_dim", "7", "even"]),
    "hidden_size_string": ({"hidden_size": "16"}, ["hidden_size", "'16'"]),
    "kv_heads_0": ({"num_key_value_heads": 0}, ["num_key_value_heads", "got 0"]),
    "theta_nan": ({"rope_theta": float("nan")}, ["rope_theta", "nan"]),
    "theta_below_1": ({"rope_theta": 1e-300}, ["rope_theta", "1e-300"]),
    "vocab_bool": ({"vocab_size": True}, ["vocab_size", "True"]),
    "vocab_huge": ({"vocab_size": 2**40}, ["vocab_size", str(2**40)]),
    "ffn_float": ({"intermediate_size": 32.0}, ["intermediate_size", "32.0"]),
    "tie_string": ({"tie_word_embeddings": "false"}, ["tie_word_embeddings", "'false'"]),
    "eos_string": ({"eos_token_id": "2"}, ["eos_token_id", "'2'"]),
    "llama3_low_above_high": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
                              ["high_freq_factor", "low_freq_factor", "greater"]),
    "rope_scaling_list": ({"rope_scaling": ["linear", 2.0]}, ["rope_scaling", "object"]),
    "max_positions_0": ({"max_position_embeddings": 0}, ["max_position_embeddings", "got 0"]),
    "default_head_dim_0": ({"head_dim": None, "num_attention_heads": 32, "num_key_value_heads": 32},
                           ["hidden_size 16 // num_attention_heads 32", "0", "even"]),
}


@pytest.mark.parametrize("changes, words", HOSTILE_CONFIGS.values(), ids=HOSTILE_CONFIGS.keys())
def test_hostile_config_field(tiny, tmp_path, changes, words):
    path = config_with(copy_of(tiny, tmp_path), **changes)
    with pytest.raises(minee.ConfigError) as e:
        minee.load(path)
    for w in words + [str(path / "config.json")]:
        assert w in str(e.value), w


@pytest.mark.parametrize("content, words", [("{", ["not valid JSON"]), ("[1, 2]", ["list", "not an object"]),
                                            (b"\xff\xfe{}", ["not UTF-8"])], ids=["truncated", "list", "binary"])
def test_config_json_not_an_object(tiny, tmp_path, content, words):
    path = copy_of(tiny, tmp_path)
    getattr(path / "config.json", "write_bytes" if isinstance(content, bytes) else "write_text")(content)
    with pytest.raises(minee.ConfigError) as e:
        minee.load(path)
    for w in words + [str(path / "config.json")]:
        assert w in str(e.value), w


def test_odd_but_valid_config_values_load_with_finite_logits(tiny, tmp_path):
    """The bounds refuse nonsense only: extreme but meaningful settings still give a working model."""
    path = config_with(copy_of(tiny, tmp_path), rms_norm_eps=1.0, rope_theta=1e30,
                       rope_scaling={"rope_type": "linear", "factor": 1e6}, max_position_embeddings=1 << 24)
    logits = minee.load(path).forward(np.arange(40) % 64)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


# ----------------------------------------------------------------------------- the command lines

def test_cli_damaged_checkpoint_is_one_line_exit_2(tiny, tmp_path):
    path = with_header(copy_of(tiny, tmp_path), entry(shape=[2**62, 2**62]))
    r = subprocess.run([sys.executable, "-m", "minee", "generate", "--model", str(path), "--prompt", "w1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("minee: error: tensor model.norm.weight in ") and r.stderr.count("\n") == 1


def weights_tool_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "weights_tool.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["truncated", "negative_offsets", "bad_config"])
def test_inspect_reports_damaged_files(tiny, tmp_path, damage):
    path = copy_of(tiny, tmp_path)
    st = path / "model.safetensors"
    if damage == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif damage == "negative_offsets":
        with_header(path, entry(data_offsets=[-64, 0]))
    else:
        config_with(path, num_attention_heads=0)
    for target in ([path, st] if damage != "bad_config" else [path]):
        r = weights_tool_cli("inspect", target)
        assert r.returncode == 2 and r.stdout == "", (target, r.stdout)
        assert r.stderr.startswith("weights_tool.py: error: ") and r.stderr.count("\n") == 1
        assert str(path) in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama_gguf(path, L=1, D=32, H=4, KV=2, F=64)
    return path


@pytest.mark.parametrize("cut", [100, 3000, -5000], ids=["in_magic_header", "in_metadata", "in_tensors"])
def test_truncated_gguf_is_one_gguf_error(tiny_gguf, tmp_path, cut):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:cut])
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    assert str(e.value).startswith(str(bad)) and str(e.value).count(str(bad)) == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    for cmd in (["convert", bad, tmp_path / "out2"], ["inspect", bad]):
        r = weights_tool_cli(*cmd)
        assert r.returncode == 2 and r.stderr.startswith(f"weights_tool.py: error: {bad}"), r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.count(str(bad)) == 1


def test_gguf_with_nan_weights_is_refused_at_conversion(tiny_gguf, tmp_path):
    import gguf

    norm = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == "output_norm.weight")
    raw = bytearray(tiny_gguf.read_bytes())
    raw[norm.data_offset + 8:norm.data_offset + 12] = b"\xff\xff\xff\x7f"           # one float32 NaN
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"{bad}: tensor output_norm.weight holds NaN")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_gguf_chat_template_is_copied_and_sandboxed(tiny_gguf, tmp_path):
    """convert keeps a GGUF's chat template; a hostile one runs nothing when minee renders it."""
    mark = tmp_path / "pwned"
    hostile = tmp_path / "hostile.gguf"
    write_tiny_llama_gguf(hostile, L=1, D=32, H=4, KV=2, F=64, chat_template=ESCAPES[0].replace("MARK", str(mark)))
    out = gguf_to_hf(hostile, tmp_path / "hf", progress=False)
    assert "__globals__" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    with pytest.raises(TokenizerError, match="sandbox"):
        minee.generate(minee.load(out), "hello", max_new_tokens=1, chat=True)
    assert not mark.exists()


# ----------------------------------------------------------------------------- analyze --reuse table

class _Pickled:
    """An object whose unpickling would create a file: what a hostile .npz could carry."""
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (Path(self.mark),))


def test_reused_analysis_table_is_checked(tmp_path):
    """analyze --reuse reads teacher_forced.npz back: damage, other shapes or a pickle mean recompute."""
    from minee.analysis import TeacherForced, load_table, save_table

    ids, P, N = np.arange(11), 4, 10
    tf = TeacherForced(**{k: np.zeros((P, N)) for k in TeacherForced.__dataclass_fields__})
    tf.targets, tf.inputs = ids[1:], ids[:-1]
    good = tmp_path / "good.npz"
    save_table(good, tf, 3.5, ids, window=8)
    table, ppl = load_table(good, ids, 8, P)
    assert ppl == 3.5 and np.array_equal(table.targets, ids[1:])
    assert load_table(good, ids, 8, P + 2) == (None, None)                   # another model's table
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:200])
    assert load_table(bad, ids, 8, P) == (None, None)
    mark = tmp_path / "pwned"
    np.savez(bad, window=8, ids=ids, perplexity=1.0, top1=np.array([_Pickled(mark)], dtype=object))
    assert load_table(bad, ids, 8, P) == (None, None) and not mark.exists()
    bad.write_bytes(damaged_member(good, "kl.npy"))      # save_table compresses: damaged deflate data (issue 18)
    assert load_table(bad, ids, 8, P) == (None, None)
    members = {m: zipfile.ZipFile(good).read(m) for m in zipfile.ZipFile(good).namelist()}
    with zipfile.ZipFile(bad, "w") as z:                # a member declaring 8 TB, holding nothing
        for name, data in members.items():
            header = np.lib.format.header_data_from_array_1_0(np.zeros(0)) | {"shape": (10**6, 10**6)}
            with z.open(name, "w") as f:
                if name == "kl.npy":
                    np.lib.format.write_array_header_1_0(f, header)
                else:
                    f.write(data)
    assert load_table(bad, ids, 8, P) == (None, None)


# ----------------------------------------------------------------------------- 5. GGUF headers (issue 18)

def capped(args, cap=1 << 30, timeout=60, **env):
    """`python ARGS` in a child process under a memory cap (RLIMIT_AS) and a time limit, so that a
    reader that runs away fails the test rather than taking the machine."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", **env}
    try:
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"python {' '.join(map(str, args))} ran for more than {timeout} s")


def test_gguf_array_longer_than_the_file_is_refused_before_reading(tmp_path):
    """The issue's 3 KB GGUF whose last array declares 2**40 items: the gguf package's reader looped
    past the end of the file, growing by ~45 MB/s, in minee.load, inspect and convert."""
    meta = llama_parts()[0][:8] + [("x.last", ("array", "i32", 2**40), list(range(600)))]
    bad = craft_gguf(tmp_path / "overrun.gguf", meta, [], alignment=1)
    assert bad.stat().st_size < 3000
    want = f"{bad}: metadata array x.last declares 1,099,511,627,776 items; minee reads at most 2,097,152"
    cache = {"MINEE_CACHE": str(tmp_path / "cache")}
    r = capped(["-c", f"import minee; minee.load({str(bad)!r})"], **cache)
    assert r.stderr.splitlines()[-1] == f"minee.convert.GGUFError: {want} array items in all"
    runs = [("weights_tool.py", [ROOT / "weights_tool.py", "inspect", bad]),
            ("weights_tool.py", [ROOT / "weights_tool.py", "convert", bad, tmp_path / "o"]),
            ("minee", ["-m", "minee", "generate", "--model", bad, "--prompt", "hi"])]
    for prog, args in runs:
        r = capped(args, **cache)
        assert r.returncode == 2 and r.stdout == "", (args, r.stderr[-500:])
        assert r.stderr == f"{prog}: error: {want} array items in all\n"
    assert not (tmp_path / "o").exists()


def _tensor(name="t.weight", dims=(8,), ggml_type=0, offset=0):
    return (name, dims, ggml_type, offset)


GGUF_LIES = {      # (metadata, tensors, counts) -> words of the error
    "metadata_count": ([], [], (0, 2**40), ["declares 1,099,511,627,776 metadata entries, more than its"]),
    "string_length": ([("x.s", 8, struct.pack("<Q", 2**40) + b"abc")], [], None,
                      ["x.s at byte", "needs 1,099,511,627,776 bytes, but the file ends"]),
    "string_array_count": ([("x.a", ("array", "str", 2**40), ["a", "b"])], [], None,
                           ["metadata array x.a declares 1,099,511,627,776 items"]),
    "nested_array": ([("x.n", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))], [], None,
                     ["x.n holds items of type 9"]),
    "unknown_type": ([("x.u", 13, b"\0" * 8)], [], None, ["x.u has the unknown type 13"]),
    "alignment": ([("general.alignment", "u32", 3)], [], None, ["general.alignment must be a uint32 power of two"]),
    "key_not_utf8": ([(b"\xff\xfe", "u32", 1)], [], None, ["a metadata key at byte 32 is not UTF-8"]),
    "tensor_count": ([], [_tensor()], (2**40, 0), ["declares 1,099,511,627,776 tensors"]),
    "five_dims": ([], [_tensor(dims=(1, 1, 1, 1, 8))], None, ["tensor t.weight has 5 dimensions"]),
    "huge_dims": ([], [_tensor(dims=(2**32, 2**32))], None, ["t.weight: its 73,786,976,294,838,206,464 bytes"]),
    "unknown_tensor_type": ([], [_tensor(ggml_type=99)], None, ["tensor t.weight has the unknown type 99"]),
    "offset_beyond_file": ([], [_tensor(offset=2**40)], None, ["lie beyond the file's 32 bytes of tensor data"]),
    "offset_unaligned": ([], [_tensor(offset=4)], None, ["starts at offset 4, not a multiple of the alignment 32"]),
    "overlap": ([], [_tensor("a.weight"), _tensor("b.weight", offset=0)], None, ["a.weight and b.weight share bytes"]),
    "partial_block": ([], [_tensor(dims=(33,), ggml_type=2)], None, ["Q4_0 stores blocks of 32 values"]),
}


@pytest.mark.parametrize("meta, tensors, counts, words", GGUF_LIES.values(), ids=GGUF_LIES.keys())
def test_gguf_header_that_lies_is_one_clear_error(tmp_path, meta, tensors, counts, words):
    bad = craft_gguf(tmp_path / "bad.gguf", meta, tensors, b"\0" * 32, counts)
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    for w in [str(bad)] + words:
        assert w in str(e.value), w
    assert not (tmp_path / "out").exists()


def test_gguf_tensors_sharing_their_data_are_refused(tmp_path):
    """The issue's GGUF whose 250 blocks point at one block's data converted 2.8 MB into 1.05 GB."""
    bad = craft_gguf(tmp_path / "shared.gguf", *llama_parts(L=40, shared=True))
    with pytest.raises(GGUFError, match=f"^{bad}: tensors blk.0.attn_norm.weight and blk.1.attn_norm.weight "
                                        "share bytes"):
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_gguf_block_count_is_checked_before_converting(tmp_path, monkeypatch):
    import gguf

    meta, tensors, data = llama_parts(L=1)
    meta = [(k, kind, 250 if k == "llama.block_count" else v) for k, kind, v in meta]
    bad = craft_gguf(tmp_path / "blocks.gguf", meta, tensors, data)
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("a tensor was converted"))
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(bad, tmp_path / "out", progress=False)
    assert str(e.value).startswith(f"{bad}: its tensors do not match its metadata: missing tensor "
                                   "model.layers.1.input_layernorm.weight (32,);")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 6. chat templates within budget

MEMORY, TIME = "needed more than 256.0 MiB of memory", "ran for more than 2 s"
BUDGET_TEMPLATES = {      # name -> (template, what may stop it: growth in a loop meets either budget first)
    "doubling": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                 "{% endfor %}{{ ns.s | length }}", (MEMORY, TIME)),
    "doubling_by_join": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] "
                         "| join %}{% endfor %}{{ ns.s | length }}", (MEMORY, TIME)),
    "nested_loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x", (TIME,)),
    "lipsum": ("{{ lipsum(n=10**7) | length }}", (MEMORY, TIME)),
    "multiply": ("{{ 'a' * 10**10 }}", ("repeated a sequence of 1 items 10,000,000,000 times",)),
    "power": ("{{ 10 ** (10 ** 10) }}", ("raised 10 to the power 10000000000, a number of more than a million bits",)),
    "replace": ("{% set s = 'a' * 100000 %}{{ s.replace('a', s) | length }}", (MEMORY,)),
    "format_width": ("{{ '%0999999999d' % 1 }}", (MEMORY,)),
    "output_flood": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                     ("wrote more than 4,194,304 characters, more than any prompt may hold",)),
}
RENDER_ALL = """
import json, sys, time
from minee.tokenizer import TokenizerError, render_chat_template
for name, (template, _) in json.loads(sys.argv[1]).items():
    t0 = time.monotonic()
    try:
        outcome = "rendered " + render_chat_template(template, "T.jinja", messages=[{"role": "user", "content": "hi"}])
    except TokenizerError as e:
        outcome = str(e)
    print(json.dumps([name, outcome, time.monotonic() - t0]), flush=True)
# VmHWM, the peak of this process's own memory: ru_maxrss would also count the parent's peak (Linux
# carries it over fork and exec), so a large pytest process would fail the test.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps(["peak RSS MB", peak_kb / 1024, 0]))
"""


def test_chat_templates_render_within_a_budget():
    """The sandbox stops code, not growth or loops: a template that doubles a string reached 4.5 GB in
    10 s, nested loops ran for minutes. Each now stops within its budget with one clear error."""
    templates = {**BUDGET_TEMPLATES, "fine": ("{{ messages[0].content }} ok", ("rendered hi ok",))}
    r = capped(["-c", RENDER_ALL, json.dumps(templates)], cap=3 << 30, timeout=120)
    results = {name: (outcome, seconds) for name, outcome, seconds in map(json.loads, r.stdout.splitlines())}
    assert set(results) == {*templates, "peak RSS MB"}, r.stderr[-2000:]
    for name, (_, reasons) in templates.items():
        outcome, seconds = results[name]
        stopped = "" if name == "fine" else "the chat template in T.jinja was stopped: it "
        assert outcome in [stopped + reason for reason in reasons] and seconds < 5, (name, outcome, seconds)
    assert results["peak RSS MB"][0] < 1024


def test_cli_template_over_budget_is_one_line(tiny, tmp_path):
    path = with_template(copy_of(tiny, tmp_path), BUDGET_TEMPLATES["doubling"][0])
    t0 = time.monotonic()
    r = capped(["-m", "minee", "generate", "--model", path, "--prompt", "w1", "--chat"], cap=3 << 30)
    assert r.returncode == 2 and r.stdout == "" and time.monotonic() - t0 < 30
    assert r.stderr in [f"minee: error: the chat template in {path / 'tokenizer_config.json'} was stopped: it "
                        f"{reason}\n" for reason in (MEMORY, TIME)]


# ----------------------------------------------------------------------------- 7. prompts and corpora

def no_tokenizing(monkeypatch):
    monkeypatch.setattr(minee.tokenizer.Tokenizer, "encode", lambda *a, **k: pytest.fail("the text was tokenized"))


def test_prompt_longer_than_the_model_can_use_is_refused_before_tokenizing(tiny, monkeypatch):
    """A 20 MB prompt took 39 s and 4.6 GB to tokenize before its length was checked. The tiny
    model's context holds 2,048 tokens of at most 3 bytes ('w63'): 6,144 bytes."""
    model = minee.load(tiny)
    no_tokenizing(monkeypatch)
    want = ("the prompt is 9,000 bytes, more than the model can use (6,144 bytes: its context of 2,048 tokens, "
            "each standing for at most 3 bytes of text); shorten it")
    for run in (lambda: minee.generate(model, "w1 " * 3000, 2),
                lambda: minee.generate(model, "w1 " * 3000, 2, chat=True),
                lambda: minee.generate_many(model, ["w1 " * 3000, "w1"], 2),
                lambda: minee.speculative_generate(model, "w1 " * 3000, 2, draft="fixed:1")):
        with pytest.raises(ValueError) as e:
            run()
        assert str(e.value) == want


def test_prompts_file_line_too_long_is_refused_before_tokenizing(tiny, tmp_path, monkeypatch, capsys):
    f = tmp_path / "p.txt"
    f.write_text("w1 w2\n" + "w3 " * 3000 + "\n")
    no_tokenizing(monkeypatch)
    assert main(["generate", "--model", str(tiny), "--prompts-file", str(f)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"minee: error: the prompt on line 2 of prompts file {f} is 9,000 bytes, more than the model can use "
        "(6,144 bytes: its context of 2,048 tokens, each standing for at most 3 bytes of text); shorten it\n")
    f.write_text("w1\n" + "w3 " * (1 << 21) + "\n")                       # 6 MiB: refused while reading
    monkeypatch.setattr(minee, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "--model", str(tiny), "--prompts-file", str(f)]) == 2
    assert capsys.readouterr().err == (f"minee: error: prompts file {f}, line 2: 6,291,456 bytes; a prompt may hold "
                                       "at most 4,194,304\n")


def test_long_corpus_is_read_and_tokenized_in_pieces(tiny, tmp_path, monkeypatch):
    """analyze, train-gate and shortcuts fit tokenized a corpus whole: a 100 MB file took 20 GB."""
    from minee import analysis
    from minee.limits import CORPUS_PIECE_CHARS

    model = minee.load(tiny)
    line = " ".join(f"w{i % 64}" for i in range(1000)) + "\n"
    corpus = tmp_path / "big.txt"
    corpus.write_text(line * (3 * CORPUS_PIECE_CHARS // len(line)))              # ~3 MB
    real, seen = minee.tokenizer.Tokenizer.encode, []
    monkeypatch.setattr(minee.tokenizer.Tokenizer, "encode", lambda self, text, **k: seen.append(len(text))
                        or real(self, text, **k))
    ids = analysis.corpus_ids(model.tokenizer, corpus)
    assert len(seen) >= 3 and max(seen) <= CORPUS_PIECE_CHARS
    np.testing.assert_array_equal(ids, real(model.tokenizer, corpus.read_text()))   # the tokens of the whole text
    seen.clear()
    assert len(analysis.corpus_ids(model.tokenizer, corpus, max_tokens=100)) == 100 and len(seen) == 1


# ----------------------------------------------------------------------------- 8. shortcut and gate files

def shortcut_file(model, path, method=zipfile.ZIP_STORED):
    """A valid shortcut file (the identity maps) for `model`, its members stored with `method`."""
    from minee.loading import fingerprint
    from minee.shortcuts import Shortcuts, identity

    P = 2 * model.config.n_layers
    Shortcuts(*identity(model), {"fingerprint": fingerprint(model), "tokens": 0, "ridge": 0.0, "method": "lstsq",
                                 "points": list(range(P))}).save(path)
    members = {m: zipfile.ZipFile(path).read(m) for m in zipfile.ZipFile(path).namelist()}
    with zipfile.ZipFile(path, "w", method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def damaged_member(path, name):
    """The bytes of the zip file `path` with 8 bytes in the middle of member `name`'s compressed data
    overwritten: a decompressor's own error (zlib.error, LZMAError, ...) on reading it."""
    raw = bytearray(Path(path).read_bytes())
    info = zipfile.ZipFile(path).getinfo(name)
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)   # the member's local header
    middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    raw[middle:middle + 8] = b"\xff" * 8
    return bytes(raw)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2],
                         ids=["deflate", "lzma", "bzip2"])
def test_damaged_compressed_shortcut_file_is_one_clear_error(tiny, tmp_path, capsys, method):
    from minee.shortcuts import ShortcutsError, load

    model = minee.load(tiny)
    path = shortcut_file(model, tmp_path / "sc.npz", method)
    path.write_bytes(damaged_member(path, "weight.npy"))
    with pytest.raises(ShortcutsError) as e:
        load(path, model)
    assert str(e.value).startswith(f"shortcut file {path}: field 'weight' cannot be read (")
    assert main(["generate", "--model", str(tiny), "--prompt", "w1", "--exit", "fixed:1", "--shortcut", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minee: error: shortcut file {path}: field 'weight' cannot be read") and err.count("\n") == 1


def test_shortcut_file_npy_header_is_read_within_its_limit(tiny, tmp_path):
    """A deflated weight.npy whose header declares (and holds) 800 MB: numpy reads a header's
    declared length before checking it; minee reads at most MAX_NPY_HEADER bytes of it."""
    model = minee.load(tiny)
    path = shortcut_file(model, tmp_path / "sc.npz")
    members = {m: zipfile.ZipFile(path).read(m) for m in zipfile.ZipFile(path).namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            if name != "weight.npy":
                z.writestr(name, data)
        with z.open("weight.npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", 800_000_000))
            for _ in range(800_000_000 // (16 << 20) + 1):
                f.write(bytes(16 << 20))
    r = capped(["-c", f"import minee; minee.shortcuts.load({str(path)!r}, minee.load({str(tiny)!r}))"], cap=700 << 20)
    assert r.stderr.splitlines()[-1].startswith(f"minee.shortcuts.ShortcutsError: shortcut file {path}: field "
                                                "'weight' cannot be read (ValueError: EOF"), r.stderr[-1000:]


GATE = '{"features": ["confidence"], "mean": [MEAN], "std": [0.2], "w": [1.0], "b": B, "threshold": 0.8}'


@pytest.mark.parametrize("mean, b, words", [
    ("0.5", "1" + "0" * 400, "field 'b' must be a finite number"),
    ("1" + "0" * 400, "0.0", "field 'mean' must be 1 finite numbers"),
    ("0.5", "1" + "0" * 4999, "is not valid JSON (Exceeds the limit (4300 digits)"),
], ids=["401_digits_b", "401_digits_mean", "5000_digits"])
def test_gate_file_with_huge_numbers_is_one_clear_error(tiny, tmp_path, capsys, mean, b, words):
    from minee.exits import load_learned_gate

    path = tmp_path / "gate.json"
    path.write_text(GATE.replace("MEAN", mean).replace("B", b))
    with pytest.raises(ValueError) as e:
        load_learned_gate(path)
    assert f"learned gate file {path}" in str(e.value) and words in str(e.value)
    assert main(["generate", "--model", str(tiny), "--prompt", "w1", "--exit", f"learned:{path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"minee: error: learned gate file {path}") and words in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- 9. memory: the limit in force

def test_available_memory_reads_the_address_space_limit():
    code = ("from minee.limits import available_memory, mapped_bytes; room, source = available_memory(); "
            "print(room + mapped_bytes(), source)")
    r = capped(["-c", code], cap=3 << 30)
    total, source = r.stdout.split(" ", 1)
    assert abs(int(total) - (3 << 30)) < 1 << 20, r.stdout       # room = the limit minus what is mapped
    assert source.startswith("the address-space limit RLIMIT_AS (ulimit -v) of 3.0 GiB")


def fake_linux(tmp_path, monkeypatch, cgroup_line, files):
    """minee.limits reading a fake /proc (8 GB available, no RLIMIT_AS) and a fake /sys/fs/cgroup."""
    import minee.limits

    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    (proc / "self" / "statm").write_text("1000 500 0 0 0 0 0\n")
    (proc / "self" / "cgroup").write_text(cgroup_line)
    for name, text in files.items():
        (cgroup / name).parent.mkdir(parents=True, exist_ok=True)
        (cgroup / name).write_text(text)
    monkeypatch.setattr(minee.limits, "PROC", proc)
    monkeypatch.setattr(minee.limits, "CGROUP", cgroup)
    monkeypatch.setattr(minee.limits, "_address_space_room", lambda: None)
    return cgroup


@pytest.mark.parametrize("cgroup_line, files, binding", [
    ("0::/user.slice/job\n",                                         # v2: the parent's limit binds
     {"user.slice/job/memory.max": "max\n", "user.slice/job/memory.current": "1073741824\n",
      "user.slice/memory.max": "1610612736\n", "user.slice/memory.current": "1342177280\n"},
     "user.slice/memory.max"),
    ("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",     # v1 (a hybrid system): "no limit" is ~2**63
     {"memory/docker/abc/memory.limit_in_bytes": "1073741824\n",
      "memory/docker/abc/memory.usage_in_bytes": "805306368\n",
      "memory/docker/memory.limit_in_bytes": "9223372036854771712\n", "memory/docker/memory.usage_in_bytes": "5\n"},
     "memory/docker/abc/memory.limit_in_bytes"),
], ids=["v2", "v1"])
def test_available_memory_reads_the_cgroup_limit(tmp_path, monkeypatch, cgroup_line, files, binding):
    from minee.limits import available_memory

    cgroup = fake_linux(tmp_path, monkeypatch, cgroup_line, files)
    room, source = available_memory()
    assert room == 256 << 20 and source.startswith(f"the cgroup limit {cgroup / binding} of ")
    for name in [n for n in files if n.endswith(("max", "limit_in_bytes"))]:
        (cgroup / name).unlink()
    assert available_memory() == (8000000 * 1024, "the machine's available memory, MemAvailable")


# ----------------------------------------------------------------------------- 10. files outside the model's tree

MOVED = {"config.json": minee.ConfigError, "model.safetensors": minee.WeightsError, "tokenizer.json": TokenizerError,
         "tokenizer_config.json": TokenizerError, "chat_template.jinja": TokenizerError}


@pytest.mark.parametrize("name", MOVED)
def test_model_files_linked_from_outside_its_directory_are_refused(tiny, tmp_path, name):
    """A chat_template.jinja linked to a file elsewhere on the machine was read and rendered into
    the prompt; every file a model directory points to must lie inside it."""
    path = copy_of(tiny, tmp_path)
    (path / "tokenizer_config.json").write_text("{}")
    (path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(path / name, outside / name)
    (path / name).symlink_to(outside / name)
    with pytest.raises(MOVED[name]) as e:
        minee.load(path)
    assert str(e.value) == (f"{path / name} links to {outside.resolve() / name}, outside the model's directory "
                            f"{path.resolve()}; minee reads a model's files only from inside it (copy the file in if "
                            "you trust it)")
    r = subprocess.run([sys.executable, "-m", "minee", "generate", "--model", str(path), "--prompt", "w1", "--chat"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == f"minee: error: {e.value}\n"


def test_shard_linked_from_outside_is_refused(tiny, tmp_path):
    from minee.weights import read_header

    path = copy_of(tiny, tmp_path)
    shard = "model-00001-of-00001.safetensors"
    (path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (path / shard).symlink_to(tmp_path / "elsewhere.safetensors")
    names = read_header(tmp_path / "elsewhere.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    with pytest.raises(minee.WeightsError, match=f"{shard} links to .*, outside the model's directory"):
        minee.load(path)


def test_hugging_face_cache_snapshot_links_into_its_own_blobs(tiny, tmp_path):
    """A snapshot's files are links into ../../blobs/ of its own models--ORG--NAME directory: inside."""
    import hashlib

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(tiny.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / blob)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    np.testing.assert_array_equal(minee.load(snapshot).forward([1, 2, 3]), minee.load(tiny).forward([1, 2, 3]))
    other = tmp_path / "hub" / "models--evil--x" / "blobs"
    other.mkdir(parents=True)
    (other / "t").write_text("SECRET {{ messages[0].content }}")
    (snapshot / "chat_template.jinja").symlink_to(Path("..", "..", "..", "models--evil--x", "blobs", "t"))
    with pytest.raises(TokenizerError, match=f"outside the model's directory {repo.resolve()}"):
        minee.load(snapshot)


def test_templates_stopped_one_after_another_do_not_add_up():
    """What a stopped template built sits in reference cycles (its frames); unless freed at once, the
    next rendering in the same process starts that much higher, and the memory budget compounds."""
    doubling = BUDGET_TEMPLATES["doubling_by_join"][0]
    r = capped(["-c", RENDER_ALL, json.dumps({f"doubling {i}": (doubling, ()) for i in range(10)})],
               cap=3 << 30, timeout=120)
    results = {name: outcome for name, outcome, _ in map(json.loads, r.stdout.splitlines())}
    assert all(results[f"doubling {i}"].startswith("the chat template in T.jinja was stopped") for i in range(10))
    assert results["peak RSS MB"] < 512, r.stderr[-2000:]
