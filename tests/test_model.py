"""Parity of the NumPy forward pass with transformers' LlamaForCausalLM on tiny random checkpoints.

Every reference value here is computed by transformers (torch) from the very checkpoint
minee loads; nothing is produced by minee itself except the values under test.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import minee
from helpers import random_llama

# A tiny GQA LLaMA: 2 layers, D=64, 4 query heads / 2 KV heads (hd=16), F=128, V=256.
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
TOL = 1e-4          # parity: max |minee - transformers| <= TOL * max |logit|
CACHE_TOL = 1e-5    # cached vs uncached minee: same arithmetic up to matmul blocking
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def make_checkpoint(path, dtype=torch.float32, max_shard_size=None, seed=0, std=0.08, **overrides):
    """Save a tiny random LlamaForCausalLM (in `dtype`) to path; return the float32 transformers
    model reloaded from that checkpoint, so the reference sees exactly the rounded weights."""
    return random_llama(path, seed=seed, std=std, dtype=dtype, max_shard_size=max_shard_size,
                        **{**BASE, **overrides})


def reload_reference(path):
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return ref.eval()


def hf_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids, dtype=np.int64))).logits.float().numpy()


def rel_err(got, want):
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


def edit_config(src, dst, edit):
    """Copy checkpoint dir src to dst and apply edit(dict) to its config.json."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """(minee model, transformers reference, checkpoint dir) for the default tiny GQA model."""
    path = tmp_path_factory.mktemp("gqa")
    ref = make_checkpoint(path)
    return minee.load(path), ref, path


# ------------------------------------------------------------------ forward parity

PARITY_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa_untied": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "mqa_tied_3layers": dict(num_key_value_heads=1, tie_word_embeddings=True, num_hidden_layers=3),
    "head_dim_24": dict(head_dim=24),                   # hd != D / H = 16
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "both_biases_mha": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(rope_scaling=LLAMA3, max_position_embeddings=4096),
    "rope_llama3_theta500k": dict(rope_scaling={**LLAMA3, "rope_theta": 500000.0},
                                  max_position_embeddings=4096),
    "float16": dict(dtype=torch.float16),
    "bfloat16": dict(dtype=torch.bfloat16),
    "bfloat16_tied_sharded": dict(dtype=torch.bfloat16, tie_word_embeddings=True, max_shard_size="50KB"),
    "sharded": dict(max_shard_size="50KB"),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(case, tmp_path):
    kwargs = dict(PARITY_CASES[case])
    ref = make_checkpoint(tmp_path, **kwargs)
    if "max_shard_size" in kwargs:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = minee.load(tmp_path)
    ids = random_ids(BASE["vocab_size"], (2, 100))        # 100 positions: RoPE scaling must matter
    want = hf_logits(ref, ids)
    got = model.forward(ids)
    assert got.dtype == np.float32 and got.shape == (2, 100, BASE["vocab_size"])
    err = rel_err(got, want)
    print(f"[parity] {case}: max_abs={np.max(np.abs(got - want)):.2e} rel={err:.2e}")
    assert err <= TOL, f"{case}: relative logits error {err:.2e}"


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, LLAMA3],
                         ids=["linear", "llama3"])
def test_ignoring_rope_scaling_would_fail(scaling, tmp_path):
    """The rope-scaling parity cases can fail: the same weights with plain RoPE are far off."""
    ref = make_checkpoint(tmp_path / "scaled", rope_scaling=scaling, max_position_embeddings=4096)
    plain = edit_config(tmp_path / "scaled", tmp_path / "plain",
                        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    ids = random_ids(BASE["vocab_size"], (1, 100))
    err = rel_err(minee.load(plain).forward(ids), hf_logits(ref, ids))
    print(f"[parity] {scaling['rope_type']} ignored: rel={err:.2e}")
    assert err > 100 * TOL


@pytest.mark.parametrize("style", ["linear_type_key", "llama3_rope_type_key"])
def test_transformers4_style_rope_config(style, tmp_path):
    """Hub checkpoints written by transformers 4 keep `rope_theta` + `rope_scaling` at the top level."""
    scaling = {"type": "linear", "factor": 4.0} if style == "linear_type_key" else LLAMA3
    ref = make_checkpoint(tmp_path / "v5", rope_scaling=dict(scaling), max_position_embeddings=4096)

    def to_v4(cfg):
        cfg.pop("rope_parameters")
        cfg.update(rope_theta=10000.0, rope_scaling=scaling)
    v4 = edit_config(tmp_path / "v5", tmp_path / "v4", to_v4)
    ids = random_ids(BASE["vocab_size"], (1, 100))
    assert rel_err(minee.load(v4).forward(ids), hf_logits(ref, ids)) <= TOL


def test_single_sequence_and_batch_inputs(gqa):
    model, ref, _ = gqa
    ids = random_ids(BASE["vocab_size"], (3, 9), seed=1)
    batched = model.forward(ids)
    assert batched.shape == (3, 9, BASE["vocab_size"]) and batched.dtype == np.float32
    for b in range(3):
        one = model.forward(ids[b])                        # (T,) input
        assert one.shape == (1, 9, BASE["vocab_size"]) and one.dtype == np.float32
        assert rel_err(one[0], batched[b]) <= CACHE_TOL
    assert rel_err(batched, hf_logits(ref, ids)) <= TOL


def test_single_token_input(gqa):
    model, ref, _ = gqa
    got = model.forward([7])
    assert got.shape == (1, 1, BASE["vocab_size"])
    assert rel_err(got, hf_logits(ref, [[7]])) <= TOL


# ------------------------------------------------------------------ weights and dtypes

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_loaded_weights_equal_checkpoint(dtype, tmp_path):
    """Every tensor is widened exactly: equal to torch's own conversion of the stored tensor to float32."""
    make_checkpoint(tmp_path, dtype=dtype, max_shard_size="50KB")
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        stored.update(load_file(f))
    assert {t.dtype for t in stored.values()} == {dtype}
    model = minee.load(tmp_path)
    assert set(model.params) == set(stored)
    for name, tensor in stored.items():
        got = model.params[name]
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, tensor.float().numpy(), err_msg=name)


def test_tied_head_is_the_embedding(tmp_path):
    make_checkpoint(tmp_path, tie_word_embeddings=True)
    model = minee.load(tmp_path)
    emb = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"].numpy()
    np.testing.assert_array_equal(model.lm_head, emb)


def test_harmless_extra_tensors_are_ignored(tmp_path):
    """Older checkpoints carry RoPE inv_freq buffers, and some tied ones a copy of the LM head."""
    ref = make_checkpoint(tmp_path, tie_word_embeddings=True)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    for l in range(BASE["num_hidden_layers"]):
        tensors[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, f)
    ids = random_ids(BASE["vocab_size"], (1, 30))
    assert rel_err(minee.load(tmp_path).forward(ids), hf_logits(ref, ids)) <= TOL


def test_no_float64_anywhere(gqa):
    model, _, _ = gqa
    assert all(a.dtype == np.float32 for a in model.params.values())
    ids = random_ids(BASE["vocab_size"], (2, 5), seed=2)
    expected = model.forward(ids)
    for odd in (ids.astype(np.int32), ids.astype(np.uint8), ids.tolist(), ids[0].tolist(),
                np.asarray(ids, order="F")):
        out = model.forward(odd)
        assert out.dtype == np.float32, type(odd)
        assert rel_err(out, expected[: len(out)]) <= CACHE_TOL
    logits, acts = model.run_with_cache(ids)
    assert logits.dtype == np.float32
    assert {name: a.dtype for name, a in acts.items()} == {name: np.float32 for name in model.hook_names}
    assert model.unembed(acts["blocks.0.hook_resid_mid"].astype(np.float64)).dtype == np.float32
    out = model.forward(ids, hooks={"blocks.0.hook_attn_out": lambda x, name: x.astype(np.float64)})
    assert out.dtype == np.float32
    kv = model.new_kv_cache(2, 8)
    model.forward(ids, kv_cache=kv)
    assert kv.keys.dtype == np.float32 and kv.values.dtype == np.float32
    assert model.forward(ids[:, :1].astype(np.int16), kv_cache=kv).dtype == np.float32


# ------------------------------------------------------------------ KV cache

def test_prefill_then_decode_equals_full_forward(gqa):
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (1, 40), seed=3)
    full = model.forward(ids)
    kv = model.new_kv_cache(1, 40)
    steps = [model.forward(ids[:, :12], kv_cache=kv)]
    for t in range(12, 40):
        steps.append(model.forward(ids[:, t:t + 1], kv_cache=kv))
    assert kv.length == 40
    assert rel_err(np.concatenate(steps, axis=1), full) <= CACHE_TOL


def test_uneven_chunks_equal_full_forward(gqa):
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (1, 40), seed=4)
    full = model.forward(ids)
    kv = model.new_kv_cache(1, 64)                       # larger than needed: unused tail must not leak
    chunks, start = [], 0
    for size in (1, 7, 3, 12, 1, 2, 9, 5):
        chunks.append(model.forward(ids[:, start:start + size], kv_cache=kv))
        start += size
    assert start == 40 and kv.length == 40
    assert rel_err(np.concatenate(chunks, axis=1), full) <= CACHE_TOL


def test_last_only_gives_the_last_positions_logits_and_the_same_cache(gqa):
    """Prefilling with last_only=True: logits (B, 1, V) of the last position, the same cache."""
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (2, 9), seed=8)
    kv_all, kv_last = model.new_kv_cache(2, 12), model.new_kv_cache(2, 12)
    full = model.forward(ids, kv_cache=kv_all)
    last = model.forward(ids, kv_cache=kv_last, last_only=True)
    assert last.shape == (2, 1, BASE["vocab_size"])
    assert rel_err(last, full[:, -1:]) <= CACHE_TOL
    np.testing.assert_array_equal(kv_last.keys, kv_all.keys)
    assert kv_last.lengths.tolist() == kv_all.lengths.tolist() == [9, 9]


def test_batched_cache_equals_each_row_alone(gqa):
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (2, 20), seed=5)
    kv = model.new_kv_cache(2, 20)
    batched = [model.forward(ids[:, :8], kv_cache=kv)] + [
        model.forward(ids[:, t:t + 1], kv_cache=kv) for t in range(8, 20)]
    batched = np.concatenate(batched, axis=1)
    for b in range(2):
        kv1 = model.new_kv_cache(1, 20)
        alone = [model.forward(ids[b, :8], kv_cache=kv1)] + [
            model.forward(ids[b, t:t + 1], kv_cache=kv1) for t in range(8, 20)]
        assert rel_err(np.concatenate(alone, axis=1)[0], batched[b]) <= CACHE_TOL


def test_cached_decode_matches_transformers_generation(gqa):
    """Step-by-step logits of transformers' own cached greedy generation equal minee's cached decode."""
    model, ref, _ = gqa
    prompt = random_ids(BASE["vocab_size"], (1, 11), seed=6)
    n = 15
    with torch.no_grad():
        out = ref.generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, prompt.shape[1]:].numpy()
    assert len(new) == n == len(out.logits)
    kv = model.new_kv_cache(1, prompt.shape[1] + n)
    logits = model.forward(prompt, kv_cache=kv)[0, -1]
    errs = []
    for step in range(n):
        want = out.logits[step][0].float().numpy()
        errs.append(rel_err(logits, want))
        assert int(np.argmax(logits)) == int(new[step])
        logits = model.forward([int(new[step])], kv_cache=kv)[0, -1]
    print(f"[parity] cached decode vs transformers generate: rel={max(errs):.2e}")
    assert max(errs) <= TOL


def test_rows_of_different_lengths_match_transformers_with_padding(gqa):
    """Three prompts of lengths 5, 11, 8 prefilled into their own cache rows, then decoded together,
    each row at its own position: the logits equal transformers on the left-padded batch with an
    attention mask and explicit position ids (its way of running rows of different lengths)."""
    model, ref, _ = gqa
    lengths, n = [5, 11, 8], 6
    rows = [random_ids(BASE["vocab_size"], (k + n,), seed=20 + k) for k in lengths]
    kv = model.new_kv_cache(3, max(lengths) + n)
    got = [np.stack([model.forward(r[:k], kv_cache=kv, rows=[b])[0, -1]
                     for b, (r, k) in enumerate(zip(rows, lengths))])]
    assert kv.lengths.tolist() == lengths
    for t in range(n - 1):
        step = np.array([r[k + t] for r, k in zip(rows, lengths)])[:, None]
        got.append(model.forward(step, kv_cache=kv)[:, -1])
    assert kv.lengths.tolist() == [k + n - 1 for k in lengths]

    width = max(lengths) + n - 1
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for b, (r, k) in enumerate(zip(rows, lengths)):
        ids[b, width - (k + n - 1):] = r[:k + n - 1]
        mask[b, width - (k + n - 1):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                   position_ids=torch.as_tensor(positions)).logits.float().numpy()
    for t, logits in enumerate(got):                    # step t predicts after k + t tokens of row b
        for b, k in enumerate(lengths):
            col = width - (k + n - 1) + k + t - 1
            assert rel_err(logits[b], want[b, col]) <= TOL


def test_a_row_can_be_rolled_back_and_refilled(gqa):
    """Setting a row's length back forgets its later positions: decoding again from there, or
    prefilling another prompt into the row, equals a fresh cache; the other row is untouched."""
    model, _, _ = gqa
    a, b, c = (random_ids(BASE["vocab_size"], (12,), seed=s) for s in (30, 31, 32))
    kv = model.new_kv_cache(2, 16)
    model.forward(a[:9], kv_cache=kv, rows=[0])
    model.forward(b[:4], kv_cache=kv, rows=[1])
    model.forward(np.array([[a[9]], [b[4]]]), kv_cache=kv)
    kv.lengths[0] = 6                                               # roll row 0 back to 6 positions
    again = model.forward(a[6:9], kv_cache=kv, rows=[0])[0]
    assert rel_err(again, model.forward(a[:9])[0, 6:]) <= CACHE_TOL
    kv.lengths[0] = 0                                               # refill row 0 with another prompt
    refilled = model.forward(c[:7], kv_cache=kv, rows=[0])[0]
    assert rel_err(refilled, model.forward(c[:7])[0]) <= CACHE_TOL
    row1 = model.forward(np.array([[c[7]], [b[5]]]), kv_cache=kv)[1, 0]
    assert rel_err(row1, model.forward(b[:6])[0, -1]) <= CACHE_TOL
    with pytest.raises(ValueError, match="different lengths"):
        kv.length


@pytest.mark.parametrize("rows, ids, match", [
    ([0, 0], [[1], [2]], r"rows \[0, 0\] name a row twice"),
    ([-1], [[1]], "row -1 is not a row of this KV cache, which has 2"),
    ([2], [[1]], "row 2 is not a row of this KV cache, which has 2"),
    ([0.5], [[1]], "rows must be a list of row numbers"),
    ([[0]], [[1]], "rows must be a list of row numbers"),
    ([True], [[1]], "rows must be a list of row numbers"),
])
def test_bad_cache_rows_are_refused_before_anything_is_written(gqa, rows, ids, match):
    model, _, _ = gqa
    kv = model.new_kv_cache(2, 8)
    with pytest.raises(ValueError, match=match + ".*pass rows= as distinct cache rows 0 .. 1"):
        model.forward(np.array(ids), kv_cache=kv, rows=rows)
    assert kv.lengths.tolist() == [0, 0] and not kv.keys.any() and not kv.values.any()


def test_cache_reset_starts_over(gqa):
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (1, 10), seed=7)
    kv = model.new_kv_cache(1, 10)
    first = model.forward(ids, kv_cache=kv)
    kv.reset()
    again = model.forward(ids, kv_cache=kv)
    assert rel_err(again, first) <= CACHE_TOL


# ------------------------------------------------------------------ hooks and unembed

def test_unembed_of_final_residual_equals_logits(gqa):
    model, ref, _ = gqa
    ids = random_ids(BASE["vocab_size"], (2, 12), seed=8)
    logits, acts = model.run_with_cache(ids)
    L = model.config.n_layers
    assert rel_err(model.unembed(acts[f"blocks.{L - 1}.hook_resid_post"]), logits) <= CACHE_TOL
    assert rel_err(logits, hf_logits(ref, ids)) <= TOL


def test_hook_points_match_transformers_hidden_states(gqa):
    """hook_embed / resid_pre / resid_post / final_norm against transformers' hidden_states."""
    model, ref, _ = gqa
    ids = random_ids(BASE["vocab_size"], (2, 12), seed=9)
    _, acts = model.run_with_cache(ids)
    assert list(acts) == model.hook_names
    with torch.no_grad():
        hs = [h.numpy() for h in ref(torch.as_tensor(ids), output_hidden_states=True).hidden_states]
    L = model.config.n_layers
    assert len(hs) == L + 1
    assert rel_err(acts["hook_embed"], hs[0]) == 0.0
    for l in range(L):
        assert acts[f"blocks.{l}.hook_resid_pre"].shape == (2, 12, BASE["hidden_size"])
        assert rel_err(acts[f"blocks.{l}.hook_resid_pre"], hs[l]) <= TOL
        if l < L - 1:
            assert rel_err(acts[f"blocks.{l}.hook_resid_post"], hs[l + 1]) <= TOL
    assert rel_err(acts["hook_final_norm"], hs[L]) <= TOL      # transformers' last entry is post-norm


def test_replacing_hook_matches_ablated_transformers(gqa):
    """A hook returning zeros for layer 0's MLP output == transformers with that MLP's down_proj zeroed."""
    model, _, path = gqa
    ids = random_ids(BASE["vocab_size"], (1, 16), seed=10)
    got = model.forward(ids, hooks={"blocks.0.hook_mlp_out": lambda x, name: np.zeros_like(x)})
    ablated = reload_reference(path)
    with torch.no_grad():
        ablated.model.layers[0].mlp.down_proj.weight.zero_()
    want = hf_logits(ablated, ids)
    assert rel_err(got, want) <= TOL
    assert rel_err(model.forward(ids), want) > 100 * TOL       # the ablation changed something


def test_observing_hooks_do_not_change_logits(gqa):
    model, _, _ = gqa
    ids = random_ids(BASE["vocab_size"], (1, 8), seed=11)
    seen = []
    hooks = {name: (lambda x, name: seen.append(name)) for name in model.hook_names}
    np.testing.assert_array_equal(model.forward(ids, hooks=hooks), model.forward(ids))
    assert seen == model.hook_names


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peak_memory_stays_near_the_float32_size(tmp_path, dtype):
    """Loading holds the float32 model plus at most one raw tensor: peak <= 1.3x the float32 size."""
    import subprocess
    import sys

    import weights_tool
    weights_tool.make_random_model(tmp_path, layers=4, d_model=512, heads=8, kv_heads=4, ffn=2048,
                                   vocab=32000, untied=True, dtype=dtype)
    fp32_bytes = 4 * minee.load_config(tmp_path).n_params
    probe = ("import minee, resource\n"
             "def kb(key):\n"
             "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
             "base = kb('VmRSS:')\n"
             f"minee.load({str(tmp_path)!r})\n"
             "print(base, kb('VmHWM:'))\n")
    base, peak = map(int, subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         check=True).stdout.split())
    assert (peak - base) * 1024 <= 1.3 * fp32_bytes, (peak - base) * 1024 / fp32_bytes
