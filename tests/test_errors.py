"""Every way a user can get it wrong gets a clear error naming the problem (and the way out)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import minee
from minee.__main__ import main

V, MAX_POS = 128, 64
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A valid tiny float32 checkpoint written by transformers (no tokenizer.json)."""
    path = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BASE)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(good_dir):
    return minee.load(good_dir)


def copy_of(good_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good_dir, dst)
    return dst


def config_dir(tmp_path, **changes):
    """A directory holding only a config.json: the valid tiny config with `changes` (None deletes a key)."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **BASE}
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


# ------------------------------------------------------------------ config.json

def test_valid_config_dir_gets_past_the_config(tmp_path):
    """Control for the config tests below: the unchanged config fails only later, on the missing weights."""
    with pytest.raises(FileNotFoundError, match="safetensors"):
        minee.load(config_dir(tmp_path))


@pytest.mark.parametrize("changes, words", [
    ({"model_type": "gpt2"}, ["model_type", "gpt2", "llama"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu", "silu"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     ["yarn", "default", "linear", "llama3"]),
    ({"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     ["dynamic", "linear", "llama3"]),
    ({"sliding_window": 4096}, ["sliding_window"]),
    ({"num_attention_heads": 4, "num_key_value_heads": 3},
     ["num_attention_heads (4)", "num_key_value_heads (3)", "multiple"]),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}},
     ["llama3", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}}, ["linear", "factor"]),
], ids=["gpt2", "gelu", "yarn", "dynamic", "sliding_window", "heads_not_multiple", "llama3_incomplete",
        "linear_no_factor"])
def test_unsupported_config(tmp_path, changes, words):
    with pytest.raises(minee.ConfigError) as e:
        minee.load(config_dir(tmp_path, **changes))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size"])
def test_missing_required_field(tmp_path, field):
    with pytest.raises(minee.ConfigError, match=field):
        minee.load(config_dir(tmp_path, **{field: None}))


def test_no_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        minee.load(tmp_path)
    assert "config.json" in str(e.value) and str(tmp_path) in str(e.value)


# ------------------------------------------------------------------ weights

def test_all_checkpoint_problems_in_one_error(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]                              # missing
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((3, 3), np.float32)  # unexpected
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)  # wrong: (16, 32)
    tensors["model.norm.weight"] = np.ones(31, np.float32)                          # wrong: (32,)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    msg = str(e.value)
    for w in ["missing tensor model.layers.1.mlp.up_proj.weight", "(64, 32)",
              "unexpected tensor model.layers.0.self_attn.extra.weight",
              "model.layers.0.self_attn.k_proj.weight: shape (8, 32)", "(16, 32)",
              "model.norm.weight: shape (31,)", "config.json"]:
        assert w in msg, w


def test_untied_config_without_lm_head(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(minee.WeightsError, match="missing tensor lm_head.weight"):
        minee.load(path)


@pytest.mark.parametrize("dtype, tag", [(np.float64, "F64"), (np.int8, "I8")])
def test_unsupported_tensor_dtype(good_dir, tmp_path, dtype, tag):
    path = copy_of(good_dir, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"] = tensors["model.layers.0.mlp.gate_proj.weight"].astype(dtype)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    msg = str(e.value)
    for w in ["model.layers.0.mlp.gate_proj.weight", tag, "F32", "F16", "BF16"]:
        assert w in msg, w


def test_no_safetensors(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        minee.load(path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)


def test_index_names_missing_shard(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BASE)).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    minee.load(tmp_path)                                   # complete: loads
    (tmp_path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        minee.load(tmp_path)
    assert shards[1] in str(e.value) and shards[0] not in str(e.value)


def test_truncated_safetensors(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    (path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(minee.WeightsError, match="not a safetensors file"):
        minee.load(path)


def test_git_lfs_pointer_instead_of_weights(good_dir, tmp_path):
    """A clone without `git lfs pull` leaves ~130-byte text pointers where the weights should be."""
    path = copy_of(good_dir, tmp_path)
    (path / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")
    with pytest.raises(minee.WeightsError) as e:
        minee.load(path)
    assert "model.safetensors" in str(e.value) and "git lfs pull" in str(e.value)


# ------------------------------------------------------------------ forward

@pytest.mark.parametrize("bad", [-1, V, V + 1000])
def test_token_id_out_of_range(model, bad):
    with pytest.raises(ValueError) as e:
        model.forward([1, 2, bad, 3])
    msg = str(e.value)
    assert str(bad) in msg and str(V) in msg and f"0 .. {V - 1}" in msg


def test_float_ids(model):
    with pytest.raises(TypeError, match="integers.*float"):
        model.forward(np.array([1.0, 2.0]))


@pytest.mark.parametrize("empty", [np.zeros((0,), np.int64), np.zeros((2, 0), np.int64), []],
                         ids=["int_array", "batch_of_empty", "python_list"])
def test_empty_sequence(model, empty):
    with pytest.raises(ValueError) as e:
        model.forward(empty)
    assert "T >= 1" in str(e.value)


def test_3d_ids(model):
    with pytest.raises(ValueError) as e:
        model.forward(np.zeros((1, 2, 3), np.int64))
    assert "(1, 2, 3)" in str(e.value) and "(B, T)" in str(e.value)


def test_kv_cache_overflow_on_prefill(model):
    kv = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError) as e:
        model.forward([1, 2, 3, 4, 5], kv_cache=kv)
    assert "max_len" in str(e.value) and "4" in str(e.value)
    assert kv.length == 0


def test_kv_cache_overflow_on_decode_leaves_cache_usable(model):
    kv = model.new_kv_cache(1, 5)
    model.forward([1, 2, 3, 4], kv_cache=kv)
    with pytest.raises(ValueError, match="max_len"):
        model.forward([5, 6], kv_cache=kv)
    assert kv.length == 4
    last = model.forward([5], kv_cache=kv)                   # the cache still works after the error
    full = model.forward([1, 2, 3, 4, 5])[0, -1]
    assert np.abs(last[0, -1] - full).max() <= 1e-5 * np.abs(full).max()


def test_kv_cache_batch_mismatch(model):
    kv = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError) as e:
        model.forward([1, 2, 3], kv_cache=kv)
    assert "batch size 1" in str(e.value) and "2" in str(e.value) and "new_kv_cache" in str(e.value)


def test_kv_cache_larger_than_memory_is_refused(model):
    """A small model with a large cache died with a raw _ArrayMemoryError: the cache is now counted
    against the memory this process may still use (minee.limits.available_memory), like the weights."""
    with pytest.raises(ValueError) as e:
        model.new_kv_cache(1, 10**9)                  # keys and values: 2 x 4 bytes x 2 layers x 2 heads x 8 = 256 GB
    msg = str(e.value)
    assert msg.startswith("a KV cache of 1 row(s) x 1,000,000,000 positions needs 238.4 GiB of memory and 64.0 MiB "
                          "to work with, but only ") and "can be allocated (" in msg
    assert "fewer positions (max_len" in msg


def test_caches_that_generate_makes_are_checked(model, monkeypatch):
    import minee.limits

    monkeypatch.setattr(minee.limits, "available_memory", lambda: ((64 << 20) + 4096, "a test's limit"))
    with pytest.raises(ValueError, match=r"^a KV cache of 3 row\(s\) x 6 positions needs 4.5 KiB of memory and 64.0 "
                                         r"MiB to work with, but only 64.0 MiB can be allocated \(a test's limit\)"):
        minee.generate_batch(model, [[1, 2], [3], [4]], 4)
    monkeypatch.setattr(minee.limits, "available_memory", lambda: ((64 << 20) + 1000, "a test's limit"))
    with pytest.raises(ValueError, match=r"^a KV cache of 1 row\(s\) x 5 positions needs 1.2 KiB .* "
                                         r"\(a test's limit\)"):
        minee.speculative_generate(model, [1, 2], 3, draft="fixed:1", k=2)


def test_unknown_hook_name(model):
    with pytest.raises(KeyError) as e:
        model.forward([1, 2], hooks={"blocks.0.hook_resid_typo": lambda x, n: None})
    assert "blocks.0.hook_resid_typo" in str(e.value) and "hook_names" in str(e.value)
    with pytest.raises(KeyError, match="blocks.9"):
        model.forward([1, 2], hooks={"blocks.9.hook_resid_post": lambda x, n: None})   # only 2 layers


def test_hook_returning_wrong_shape(model):
    with pytest.raises(ValueError) as e:
        model.forward([1, 2, 3], hooks={"blocks.1.hook_mlp_out": lambda x, n: x[..., :-1]})
    msg = str(e.value)
    assert "blocks.1.hook_mlp_out" in msg and "(1, 3, 31)" in msg and "(1, 3, 32)" in msg


def test_run_with_cache_unknown_pattern(model):
    with pytest.raises(KeyError, match="blocks.\\*.hook_nothing"):
        model.run_with_cache([1, 2], names=["blocks.*.hook_nothing"])


# ------------------------------------------------------------------ generate

@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), ["max_new_tokens", ">= 1", "0"]),
    (dict(max_new_tokens=-3), ["max_new_tokens", "-3"]),
    (dict(temperature=-0.5), ["temperature", ">= 0", "-0.5"]),
    (dict(temperature=1.0, top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(temperature=1.0, top_p=1.5), ["top_p", "(0, 1]", "1.5"]),
    (dict(temperature=1.0, top_k=0), ["top_k", ">= 1"]),
], ids=["max_new_tokens_0", "max_new_tokens_negative", "temperature", "top_p_0", "top_p_1.5", "top_k_0"])
def test_bad_generate_arguments(model, kwargs, words):
    with pytest.raises(ValueError) as e:
        minee.generate(model, [1, 2, 3], **{"max_new_tokens": 4, **kwargs})
    for w in words:
        assert w in str(e.value), w


def test_text_prompt_without_tokenizer(model):
    assert model.tokenizer is None
    with pytest.raises(ValueError) as e:
        minee.generate(model, "hello", max_new_tokens=2)
    assert "tokenizer" in str(e.value) and "token ids" in str(e.value)


def test_generate_beyond_context(model):
    prompt = list(range(10))
    minee.generate(model, prompt, max_new_tokens=MAX_POS - 10)        # exactly fits
    with pytest.raises(ValueError) as e:
        minee.generate(model, prompt, max_new_tokens=MAX_POS - 9)
    msg = str(e.value)
    assert "10" in msg and str(MAX_POS - 9) in msg and str(MAX_POS) in msg and "max_new_tokens" in msg


def test_generate_empty_prompt(model):
    with pytest.raises(ValueError, match="T >= 1"):
        minee.generate(model, [], max_new_tokens=2)


def test_cli_text_prompt_without_tokenizer(good_dir, capsys):
    rc = main(["generate", "--model", str(good_dir), "--prompt", "hello", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "tokenizer.json" in err and "Traceback" not in err


# ------------------------------------------------------------------ minee.load

def test_load_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError) as e:
        minee.load(missing)
    assert str(missing) in str(e.value)


def test_load_unknown_name():
    with pytest.raises(FileNotFoundError) as e:
        minee.load("no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-model-xyz" in msg and "smollm2-135m" in msg          # lists the names it knows
