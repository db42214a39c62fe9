"""Hook points of minee's forward pass, checked against the same quantities in transformers.

The reference side never uses minee: every activation comes from torch forward hooks /
forward pre-hooks on transformers' LlamaForCausalLM running the same weights, on a random
tiny model (built and saved by transformers, loaded by minee) and on SmolLM2-135M.
"""
import numpy as np
import pytest
import torch

import minee
from helpers import random_llama
from minee.hooks import exit_point_names, point_index, point_name

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_LAYERS = 3
PROMPT = "The capital of France is Paris, and the capital of Germany is"
OTHER = "My favourite colour is green, and my favourite animal is the big grey elephant"

# fp32 tolerances on max |minee - torch| / max |torch| per compared tensor. Measured: worst hook
# point ~1.1e-6 on the tiny model, ~1e-5 on SmolLM2 (residual stream up to ~2500 there).
TOL = {"tiny": 1e-5, "smollm2": 1e-4}


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(minee model, transformers model) for a random 3-layer LLaMA written by transformers."""
    out = tmp_path_factory.mktemp("tiny_llama")
    hf = random_llama(out, vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=TINY_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return minee.load(out), hf


@pytest.fixture(params=["tiny", "smollm2"])
def pair(request):
    """(kind, minee model, transformers model, token ids (T,)) for both models."""
    if request.param == "tiny":
        model, hf = request.getfixturevalue("tiny")
        ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 11)
    else:
        model, hf = request.getfixturevalue("smol")
        ids = np.array(model.tokenizer.encode(PROMPT))
    return request.param, model, hf, ids


def other_ids(kind, model, T):
    """A second prompt of exactly T tokens (for patching and batching)."""
    if kind == "tiny":
        return np.random.default_rng(2).integers(0, model.config.vocab_size, T)
    ids = model.tokenizer.encode(OTHER)
    assert len(ids) >= T
    return np.array(ids[:T])


# ----------------------------------------------------------------------------- torch side


def hf_forward(hf, ids, edits=None):
    """Run transformers on ids (T,) or (B, T) and capture every hook point with torch hooks.

    edits: {module path: fn(output) -> output} forward hooks that change the computation.
    Returns (logits (B, T, V), {minee hook name: (B, T, D)}) as NumPy float32.
    """
    ids = torch.as_tensor(np.atleast_2d(ids))
    m = hf.model
    acts, handles = {}, []

    def save(name, pick):
        def hook(module, args, kwargs_or_output, *rest):
            acts[name] = pick(args, kwargs_or_output, *rest).detach().clone()
        return hook

    def first_input(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def out_tensor(output):
        return output[0] if isinstance(output, tuple) else output

    def add(handle):
        handles.append(handle)

    try:
        for path, fn in (edits or {}).items():          # edits run before the capture hooks
            add(hf.get_submodule(path).register_forward_hook(lambda mod, a, out, fn=fn: fn(out)))
        add(m.embed_tokens.register_forward_hook(save("hook_embed", lambda a, out: out)))
        for l, layer in enumerate(m.layers):
            b = f"blocks.{l}."
            add(layer.register_forward_pre_hook(
                save(b + "hook_resid_pre", lambda a, kw: first_input(a, kw)), with_kwargs=True))
            add(layer.self_attn.register_forward_hook(
                save(b + "hook_attn_out", lambda a, out: out_tensor(out))))
            # the input of post_attention_layernorm is HF's own residual + attention output
            add(layer.post_attention_layernorm.register_forward_pre_hook(
                save(b + "hook_resid_mid", lambda a, kw: first_input(a, kw)), with_kwargs=True))
            add(layer.mlp.register_forward_hook(save(b + "hook_mlp_out", lambda a, out: out_tensor(out))))
            add(layer.register_forward_hook(save(b + "hook_resid_post", lambda a, out: out_tensor(out))))
        add(m.norm.register_forward_hook(save("hook_final_norm", lambda a, out: out)))
        with torch.no_grad():
            logits = hf(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), {k: v.numpy() for k, v in acts.items()}


def rel_err(a, b):
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_close(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: max abs diff / max abs value = {err:.3g} > {tol:g}"


# ----------------------------------------------------------------------------- activations


def test_every_hook_point_matches_transformers(pair):
    kind, model, hf, ids = pair
    logits, acts = model.run_with_cache(ids)
    ref_logits, ref = hf_forward(hf, ids)
    assert set(acts) == set(model.hook_names) == set(ref), set(acts) ^ set(ref)
    errs = {}
    for name in model.hook_names:
        assert acts[name].dtype == np.float32, (name, acts[name].dtype)
        assert acts[name].shape == (1, len(ids), model.config.d_model), (name, acts[name].shape)
        errs[name] = rel_err(acts[name], ref[name])
    worst = max(errs, key=errs.get)
    print(f"\n{kind}: worst hook {worst} rel err {errs[worst]:.3g}; "
          f"logits rel err {rel_err(logits, ref_logits):.3g}")
    bad = {n: e for n, e in errs.items() if e > TOL[kind]}
    assert not bad, f"{kind}: hook points differ from transformers: {bad}"
    assert_close(logits, ref_logits, TOL[kind], "logits")


def test_resid_identities_hold_exactly(tiny):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out; blocks chain."""
    model, _ = tiny
    _, acts = model.run_with_cache(np.arange(9))
    for l in range(TINY_LAYERS):
        b = f"blocks.{l}."
        np.testing.assert_array_equal(acts[b + "hook_resid_mid"], acts[b + "hook_resid_pre"] + acts[b + "hook_attn_out"])
        np.testing.assert_array_equal(acts[b + "hook_resid_post"], acts[b + "hook_resid_mid"] + acts[b + "hook_mlp_out"])
        prev = acts["hook_embed"] if l == 0 else acts[f"blocks.{l - 1}.hook_resid_post"]
        np.testing.assert_array_equal(acts[b + "hook_resid_pre"], prev)


# ----------------------------------------------------------------------------- selecting points


def test_names_as_list(tiny):
    model, _ = tiny
    ids = np.arange(7)
    full_logits, full = model.run_with_cache(ids)
    names = ["blocks.1.hook_attn_out", "hook_embed", "hook_final_norm"]
    logits, acts = model.run_with_cache(ids, names=names)
    assert set(acts) == set(names)
    for n in names:
        np.testing.assert_array_equal(acts[n], full[n])
    np.testing.assert_array_equal(logits, full_logits)


def test_names_as_glob(tiny):
    model, _ = tiny
    _, acts = model.run_with_cache(np.arange(7), names="blocks.*.hook_resid_mid")
    assert sorted(acts) == sorted(f"blocks.{l}.hook_resid_mid" for l in range(TINY_LAYERS))
    _, acts = model.run_with_cache(np.arange(7), names=["blocks.2.*", "hook_embed"])
    assert sorted(acts) == sorted(["hook_embed"] + [f"blocks.2.{h}" for h in
                                                    ("hook_resid_pre", "hook_attn_out", "hook_resid_mid",
                                                     "hook_mlp_out", "hook_resid_post")])


def test_names_as_predicate(tiny):
    model, _ = tiny
    _, acts = model.run_with_cache(np.arange(7), names=lambda n: n.endswith("hook_mlp_out"))
    assert sorted(acts) == sorted(f"blocks.{l}.hook_mlp_out" for l in range(TINY_LAYERS))
    _, acts = model.run_with_cache(np.arange(7), names=lambda n: False)
    assert acts == {}


@pytest.mark.parametrize("names", ["blocks.7.hook_resid_mid", "blocks.*.hook_resid_middle",
                                   ["hook_embed", "hook_nope"], "resid_post"])
def test_unknown_names_raise_keyerror(tiny, names):
    model, _ = tiny
    with pytest.raises(KeyError) as e:
        model.run_with_cache(np.arange(5), names=names)
    bad = names if isinstance(names, str) else names[1]
    msg = str(e.value)
    assert bad in msg and "hook_resid" in msg, msg       # names the culprit and shows valid names


def test_forward_rejects_unknown_hook(tiny):
    model, _ = tiny
    with pytest.raises(KeyError, match="blocks.3.hook_resid_post"):
        model.forward(np.arange(5), hooks={"blocks.3.hook_resid_post": lambda x, n: None})


def test_hook_gets_its_name_and_none_keeps_value(tiny):
    model, _ = tiny
    seen = []
    logits = model.forward(np.arange(6), hooks={n: lambda x, n: seen.append(n) for n in model.hook_names})
    assert seen == model.hook_names                              # every point, in forward order
    np.testing.assert_array_equal(logits, model.forward(np.arange(6)))


def test_hook_with_wrong_shape_raises(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="shape"):
        model.forward(np.arange(6), hooks={"blocks.0.hook_attn_out": lambda x, n: x[:, :-1]})


# ----------------------------------------------------------------------------- interventions


def test_zero_attention_output_matches_torch(pair):
    kind, model, hf, ids = pair
    clean = model.forward(ids)
    logits = model.forward(ids, hooks={"blocks.1.hook_attn_out": lambda x, n: np.zeros_like(x)})
    ref, ref_acts = hf_forward(hf, ids, edits={
        "model.layers.1.self_attn": lambda out: (torch.zeros_like(out[0]), *out[1:])})
    assert np.abs(logits - clean).max() > 1e-2 * np.abs(clean).max(), "ablation changed nothing"
    assert np.abs(ref_acts["blocks.1.hook_attn_out"]).max() == 0
    assert_close(logits, ref, TOL[kind], "logits with block 1 attention zeroed")


def test_patch_one_position_matches_torch(pair):
    kind, model, hf, ids = pair
    T, pos = len(ids), 3
    src = other_ids(kind, model, T)
    _, src_acts = model.run_with_cache(src, names=["blocks.0.hook_resid_post"])
    _, src_ref = hf_forward(hf, src)
    patch, patch_ref = src_acts["blocks.0.hook_resid_post"][0, pos], src_ref["blocks.0.hook_resid_post"][0, pos]

    def minee_patch(x, name):
        x = x.copy()
        x[:, pos] = patch
        return x

    def torch_patch(out):
        out = out.clone()
        out[:, pos] = torch.from_numpy(patch_ref)
        return out

    clean = model.forward(ids)
    logits = model.forward(ids, hooks={"blocks.0.hook_resid_post": minee_patch})
    ref, _ = hf_forward(hf, ids, edits={"model.layers.0": torch_patch})
    np.testing.assert_array_equal(logits[:, :pos], clean[:, :pos])   # causal: earlier positions untouched
    assert np.abs(logits[:, pos:] - clean[:, pos:]).max() > 1e-2 * np.abs(clean).max(), "patch changed nothing"
    assert_close(logits, ref, TOL[kind], "logits with position 3 patched")


def test_steering_with_kv_cache_equals_full_forward(pair):
    """Prefill + one-token decode steps with a steering hook == one full forward with it == torch."""
    kind, model, hf, ids = pair
    D, T, T0 = model.config.d_model, len(ids), 5
    rng = np.random.default_rng(3)
    v = rng.standard_normal(D).astype(np.float32)
    v *= 0.5 * np.abs(model.run_with_cache(ids, names=["blocks.0.hook_resid_post"])[1]
                      ["blocks.0.hook_resid_post"]).max() / np.abs(v).max()
    shapes = []

    def steer(x, name):
        shapes.append(x.shape)
        return x + v

    hooks = {"blocks.0.hook_resid_post": steer}
    full = model.forward(ids, hooks=hooks)
    kv = model.new_kv_cache(1, T + 2)
    steps = [model.forward(ids[:T0], kv_cache=kv, hooks=hooks)]
    for t in range(T0, T):
        steps.append(model.forward(ids[t:t + 1], kv_cache=kv, hooks=hooks))
    cached = np.concatenate(steps, axis=1)
    assert kv.length == T
    assert shapes[1:] == [(1, T0, D)] + [(1, 1, D)] * (T - T0)
    assert_close(cached, full, 1e-5, "cached steered decode vs full steered forward")
    ref, _ = hf_forward(hf, ids, edits={"model.layers.0": lambda out: out + torch.from_numpy(v)})
    assert np.abs(full - model.forward(ids)).max() > 1e-2 * np.abs(full).max(), "steering changed nothing"
    assert_close(full, ref, TOL[kind], "steered logits vs torch")


def test_batch_of_two_with_hooks(pair):
    """B=2: activations equal transformers' batch, and a hook editing one row leaves the other alone."""
    kind, model, hf, ids = pair
    batch = np.stack([ids, other_ids(kind, model, len(ids))])          # (2, T)
    logits, acts = model.run_with_cache(batch)
    ref_logits, ref = hf_forward(hf, batch)
    for name in model.hook_names:
        assert_close(acts[name], ref[name], TOL[kind], f"B=2 {name}")
    assert_close(logits, ref_logits, TOL[kind], "B=2 logits")

    def zero_row1(x, name):
        x = x.copy()
        x[1] = 0
        return x

    hooked = model.forward(batch, hooks={"blocks.1.hook_attn_out": zero_row1})
    row1_alone = model.forward(batch[1], hooks={"blocks.1.hook_attn_out": lambda x, n: np.zeros_like(x)})
    assert_close(hooked[0], logits[0], 1e-6, "untouched row")
    assert_close(hooked[1], row1_alone[0], 1e-5, "edited row vs the same edit on B=1")
    ref_hooked, _ = hf_forward(hf, batch, edits={
        "model.layers.1.self_attn": lambda out: (out[0] * torch.tensor([1.0, 0.0])[:, None, None], *out[1:])})
    assert_close(hooked, ref_hooked, TOL[kind], "B=2 row ablation vs torch")


# ----------------------------------------------------------------------------- exit points


@pytest.mark.parametrize("n_layers", [1, 3, 30])
def test_exit_point_numbering_round_trips(n_layers):
    names = exit_point_names(n_layers)
    assert len(names) == 2 * n_layers
    for p, name in enumerate(names):
        l = p // 2
        assert name == (f"blocks.{l}.hook_resid_mid" if p % 2 == 0 else f"blocks.{l}.hook_resid_post")
        assert point_name(p) == name
        assert point_index(name) == p
    # the exit points are hook points, in forward order
    order = minee.hook_names(n_layers)
    positions = [order.index(n) for n in names]
    assert positions == sorted(positions)


def test_exit_point_examples():
    assert point_name(0) == "blocks.0.hook_resid_mid"
    assert point_name(1) == "blocks.0.hook_resid_post"
    assert point_name(58) == "blocks.29.hook_resid_mid"
    assert point_name(59) == "blocks.29.hook_resid_post"
    assert point_index("blocks.12.hook_resid_mid") == 24
    assert point_index("blocks.12.hook_resid_post") == 25


@pytest.mark.parametrize("name", ["hook_embed", "hook_final_norm", "blocks.0.hook_resid_pre",
                                  "blocks.0.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.2.resid_mid",
                                  "layers.2.hook_resid_mid", "blocks.2.hook_resid_mid.x",
                                  "blocks.x.hook_resid_mid", "blocks.-1.hook_resid_post"])
def test_non_exit_names_raise(name):
    with pytest.raises(KeyError):
        point_index(name)
