"""The other families minee loads, each against transformers' own model on a random checkpoint that
transformers built and saved in the test: Mistral, Qwen2, Qwen3, Gemma 3 (text, and the text part
of a multimodal gemma3 checkpoint). Shapes cover GQA and MQA, head_dim != d_model / heads, tied and
untied heads, and sliding windows shorter than the sequence.

Every reference value is computed by transformers from the very checkpoint minee loads.
"""
import json

import numpy as np
import pytest
import torch
import transformers

import minee
from minee.exits import ExitDecoder

TOL = 1e-4          # parity: max |minee - transformers| <= TOL * max |logit|
CACHE_TOL = 1e-5    # minee against itself: same arithmetic up to matmul blocking
SMALL = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=None, bos_token_id=None,
             eos_token_id=None)
T = 14              # positions per test sequence: longer than every sliding window below

CASES = {
    "mistral_window_gqa_hd24": ("mistral", dict(num_key_value_heads=2, head_dim=24, sliding_window=5)),
    "mistral_no_window_mqa_tied": ("mistral", dict(num_key_value_heads=1, sliding_window=None,
                                                   tie_word_embeddings=True)),
    "qwen2_biases_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_sliding_upper_layers": ("qwen2", dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                                                 max_window_layers=1)),
    "qwen3_qk_norm_hd24_mqa": ("qwen3", dict(num_key_value_heads=1, head_dim=24)),
    "qwen3_attention_bias_tied": ("qwen3", dict(num_key_value_heads=2, head_dim=12, attention_bias=True,
                                                tie_word_embeddings=True)),
    "gemma3_text_mixed_windows": ("gemma3_text", dict(
        num_key_value_heads=1, head_dim=24, sliding_window=4, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "gemma3_text_softcap_untied_gqa": ("gemma3_text", dict(
        num_key_value_heads=2, head_dim=16, sliding_window=6, final_logit_softcapping=3.0, attn_logit_softcapping=4.0,
        tie_word_embeddings=False,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    "gemma3_multimodal_text_part": ("gemma3", dict(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                                   layer_types=["sliding_attention", "sliding_attention",
                                                                "full_attention"])),
}
CLASSES = {"mistral": ("MistralConfig", "MistralForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}


def random_family(path, kind, seed=0, std=0.12, **config):
    """Build a random model of this family with transformers, save it to `path`, and return
    transformers' float32 model reloaded from that checkpoint (eager attention). Norm weights:
    1 + noise for the families that scale by w, noise alone for Gemma's 1 + w; biases small."""
    torch.manual_seed(seed)
    config = {**SMALL, **config}
    if kind == "gemma3":                                 # the multimodal checkpoint: a tiny vision tower beside
        vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14)
        hf_config = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**config),
                                              vision_config=vision, mm_tokens_per_image=4, image_token_index=95,
                                              boi_token_index=93, eoi_token_index=94)
        cls = transformers.Gemma3ForConditionalGeneration
    else:
        config_cls, model_cls = CLASSES[kind]
        hf_config, cls = getattr(transformers, config_cls)(**config), getattr(transformers, model_cls)
    hf_config._attn_implementation = "eager"
    model = cls(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                torch.nn.init.normal_(p, std=0.05)
            else:
                torch.nn.init.normal_(p, std=std)
    model.save_pretrained(path)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))).logits.float().numpy()


def rel_err(got, want):
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 90, size=shape)


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(case name, minee model, transformers reference) for each case."""
    kind, config = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = random_family(path, kind, **config)
    return request.param, minee.load(path), ref


def test_logits_match_transformers(family):
    case, model, ref = family
    ids = random_ids((2, T))
    got, want = model.forward(ids), hf_logits(ref, ids)
    err = rel_err(got, want)
    print(f"[parity] {case}: rel={err:.2e}")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert err <= TOL, f"{case}: relative logits error {err:.2e}"


def test_config_reads_the_family(family):
    case, model, _ = family
    kind = CASES[case][0]
    c = model.config
    assert c.model_type == kind
    windows = [c.window(l) for l in range(c.n_layers)]
    want = {"mistral_window_gqa_hd24": [5, 5, 5], "qwen2_sliding_upper_layers": [None, 4, 4],
            "gemma3_text_mixed_windows": [4, None, 4], "gemma3_text_softcap_untied_gqa": [None, 6, 6],
            "gemma3_multimodal_text_part": [5, 5, None]}.get(case, [None] * 3)
    assert windows == want
    assert (c.qk_norm, c.post_norms) == (kind in ("qwen3", "gemma3_text", "gemma3"), kind.startswith("gemma3"))


def test_kv_cache_decode_equals_the_full_pass(family):
    """Prefill 5 positions, then one token at a time past every window: each step's logits equal the
    full pass's at that position."""
    _, model, _ = family
    ids = random_ids((1, T), seed=1)
    full = model.forward(ids)[0]
    kv = model.new_kv_cache(1, T)
    steps = [model.forward(ids[:, :5], kv_cache=kv)[0]]
    steps += [model.forward(ids[:, t:t + 1], kv_cache=kv)[0] for t in range(5, T)]
    assert rel_err(np.concatenate(steps), full) <= CACHE_TOL


def test_hook_points_match_transformers_hidden_states(family):
    """hook_embed, each block's output and hook_final_norm against transformers' hidden_states (on
    Gemma the residual stream after each block's post-norms, its embeddings scaled by sqrt(D))."""
    case, model, ref = family
    ids = random_ids((2, T), seed=2)
    _, acts = model.run_with_cache(ids)
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(ids), output_hidden_states=True)
    hs = [h.numpy() for h in out.hidden_states]
    L = model.config.n_layers
    assert len(hs) == L + 1
    assert rel_err(acts["hook_embed"], hs[0]) <= CACHE_TOL
    for l in range(L - 1):
        assert rel_err(acts[f"blocks.{l}.hook_resid_post"], hs[l + 1]) <= TOL, (case, l)
    assert rel_err(acts["hook_final_norm"], hs[L]) <= TOL      # transformers' last entry is post-norm


def test_ragged_batch_equals_each_row_alone(family):
    """Prompts of 3, 9 and 13 tokens (beyond the windows) generate together as they do alone."""
    _, model, _ = family
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 90, n).tolist() for n in (3, 9, 13)]
    together = minee.generate_batch(model, prompts, 6, stop_at_eos=False)
    for prompt, out in zip(prompts, together):
        assert out.tokens == minee.generate(model, prompt, 6, stop_at_eos=False).tokens


def test_early_exit_at_the_last_point_and_speculation_equal_plain_decoding(family):
    """The early-exit decoder and speculative decoding run the same block sequence: exiting only at
    the last point, and verified drafts, give plain greedy decoding's tokens."""
    _, model, _ = family
    prompt = random_ids((T,), seed=4).tolist()
    plain = minee.generate(model, prompt, 8, stop_at_eos=False).tokens
    last = 2 * model.config.n_layers - 1
    assert minee.generate(model, prompt, 8, exit=f"fixed:{last}", stop_at_eos=False).tokens == plain
    assert minee.speculative_generate(model, prompt, 8, draft="fixed:2", k=3, stop_at_eos=False).tokens == plain


def test_the_multimodal_config_is_read_from_its_text_config(tmp_path):
    """A gemma3 config.json with its text part under text_config, the rest refused or ignored."""
    kind, config = CASES["gemma3_multimodal_text_part"]
    random_family(tmp_path, kind, **config)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma3" and "text_config" in saved and "vision_config" in saved
    model = minee.load(tmp_path)
    assert not [n for n in model.params if "vision" in n or "projector" in n]
    assert model.config.d_model == SMALL["hidden_size"]


@pytest.mark.parametrize("case", ["mistral_window_gqa_hd24", "gemma3_text_mixed_windows"])
def test_ignoring_the_sliding_window_would_fail(case, tmp_path):
    """The window cases can fail: the same weights with every layer attending to all positions are far off."""
    kind, config = CASES[case]
    ref = random_family(tmp_path / "windowed", kind, **config)
    cfg = json.loads((tmp_path / "windowed" / "config.json").read_text())
    cfg.update(sliding_window=None) if kind == "mistral" else cfg.update(layer_types=["full_attention"] * 3)
    (tmp_path / "windowed" / "config.json").write_text(json.dumps(cfg))
    ids = random_ids((1, T), seed=5)
    err = rel_err(minee.load(tmp_path / "windowed").forward(ids), hf_logits(ref, ids))
    print(f"[parity] {case} without windows: rel={err:.2e}")
    assert err > 100 * TOL


def test_hooks_fire_in_early_exit_and_speculative_decoding(tmp_path):
    """An ablation given as hooks= changes generate's tokens, and the same ablation gives the same
    tokens when decoding exits at the last point or is verified speculation (the hooks fire there)."""
    kind, config = CASES["gemma3_text_softcap_untied_gqa"]
    random_family(tmp_path, kind, **config)
    model = minee.load(tmp_path)
    prompt = random_ids((T,), seed=6).tolist()
    ablate = {"blocks.0.hook_mlp_out": lambda x, name: np.zeros_like(x)}
    ablated = minee.generate(model, prompt, 8, stop_at_eos=False, hooks=ablate).tokens
    assert ablated[0] == int(model.forward(prompt, hooks=ablate)[0, -1].argmax())
    assert ablated != minee.generate(model, prompt, 8, stop_at_eos=False).tokens
    last = 2 * model.config.n_layers - 1
    assert minee.generate(model, prompt, 8, stop_at_eos=False, hooks=ablate, exit=f"fixed:{last}").tokens == ablated
    assert minee.speculative_generate(model, prompt, 8, draft="fixed:3", k=2, stop_at_eos=False,
                                      hooks=ablate).tokens == ablated
    seen = set()
    ExitDecoder(model, "fixed:2", hooks={"blocks.1.hook_resid_mid": lambda x, name: seen.add(name)}).step(
        5, model.new_kv_cache(1, 4))
    assert seen == {"blocks.1.hook_resid_mid"}


def test_lens_shortcuts_and_teacher_forcing_run_on_every_family(family):
    """The layers on top of the model (lens, shortcut fit, teacher-forced table) need nothing
    family-specific: the lens at the last point is the model's own prediction, a least-squares
    shortcut brings an early state closer to the last one, and the table has one row per point."""
    from minee import shortcuts
    from minee.analysis import teacher_forced
    from minee.lens import lens
    _, model, _ = family
    ids = random_ids((40,), seed=7)
    P = 2 * model.config.n_layers
    res = lens(model, ids[:T], k=3)
    assert res.top_ids.shape == (P, T, 3)
    np.testing.assert_array_equal(res.top_ids[-1, :, 0], model.forward(ids[:T])[0].argmax(-1))
    sc = shortcuts.fit(model, ids, window=16, context=8, progress=False)
    _, acts = model.run_with_cache(ids, names=["blocks.0.hook_resid_mid", f"blocks.{P // 2 - 1}.hook_resid_post"])
    h, last = acts["blocks.0.hook_resid_mid"][0], acts[f"blocks.{P // 2 - 1}.hook_resid_post"][0]
    assert np.linalg.norm(sc.apply(h, 0) - last) < np.linalg.norm(h - last)
    tf, _ = teacher_forced(model, ids, window=16, progress=False)
    assert tf.top1.shape == (P, len(ids) - 1)


def test_kl_gradient_through_the_soft_capped_head(tmp_path):
    """The shortcut refinement's hand-written gradient goes through Gemma's (1 + w) final norm and the
    logit soft-capping: it matches finite differences of its own KL, and that KL matches the KL
    of model.unembed computed the long way."""
    from minee import shortcuts
    from minee.lens import final_distribution, log_softmax
    kind, config = CASES["gemma3_text_softcap_untied_gqa"]
    random_family(tmp_path, kind, **config)
    model = minee.load(tmp_path)
    assert model.config.final_softcap == 3.0 and model.config.norm_offset == 1.0
    _, acts = model.run_with_cache(random_ids((1, 30), seed=8), names=["blocks.0.hook_resid_post",
                                                                          "blocks.2.hook_resid_post"])
    x, last = acts["blocks.0.hook_resid_post"][0], acts["blocks.2.hook_resid_post"][0]
    final = final_distribution(model.unembed(last))                   # q (n, V) and sum q log q, float32
    q = final["q"].astype(np.float64)
    D = model.config.d_model
    rng = np.random.default_rng(3)
    w = (np.eye(D) + 0.1 * rng.standard_normal((D, D))).astype(np.float32)
    b = (0.1 * rng.standard_normal(D)).astype(np.float32)
    kl, gw, gb = shortcuts.kl_and_grad(model, x, w, b, final)
    dw, db, eps = rng.standard_normal((D, D)), rng.standard_normal(D), 1e-2
    plus = shortcuts.kl_and_grad(model, x, (w + eps * dw).astype(np.float32), (b + eps * db).astype(np.float32), final)[0]
    minus = shortcuts.kl_and_grad(model, x, (w - eps * dw).astype(np.float32), (b - eps * db).astype(np.float32), final)[0]
    assert float((gw * dw).sum() + (gb * db).sum()) == pytest.approx((plus - minus) / (2 * eps), rel=2e-2)
    ref = (q * (np.log(q) - log_softmax(model.unembed(x @ w + b).astype(np.float64)))).sum(-1).mean()
    assert kl == pytest.approx(ref, rel=1e-3)


GEMMA_CONFIG = dict(SMALL, model_type="gemma3_text", num_key_value_heads=1, head_dim=16)


@pytest.mark.parametrize("changes, words", [
    (dict(use_bidirectional_attention=True), ["use_bidirectional_attention", "causal"]),
    (dict(hidden_activation="silu"), ["hidden_activation", "silu", "gelu_pytorch_tanh"]),
    (dict(layer_types=["full_attention", "sliding_attention"]), ["layer_types", "3 entries"]),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), ["layer_types", "chunked"]),
    (dict(sliding_window=0), ["sliding_window", "got 0"]),
    (dict(query_pre_attn_scalar=-2), ["query_pre_attn_scalar", "got -2"]),
    (dict(final_logit_softcapping=float("nan")), ["final_logit_softcapping", "nan"]),
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}), ["yarn", "linear", "llama3"]),
    (dict(partial_rotary_factor=0.5), ["partial_rotary_factor", "0.5"]),
    (dict(model_type="gemma2"), ["model_type", "gemma2", "gemma3_text", "qwen3"]),
    (dict(model_type="qwen2", hidden_act="gelu"), ["hidden_act", "gelu", "silu"]),
    (dict(model_type="gemma3", text_config=None), ["text_config"]),
], ids=["bidirectional", "activation", "layer_types_short", "layer_types_unknown", "window_0", "scalar",
        "softcap_nan", "yarn", "partial_rotary", "gemma2", "qwen_gelu", "gemma3_no_text_config"])
def test_what_a_family_cannot_honour_is_an_error_naming_the_field(tmp_path, changes, words):
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA_CONFIG, **changes}))
    with pytest.raises(minee.ConfigError) as e:
        minee.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_families_fill_in_what_their_config_class_assumes():
    """Fields left out of config.json mean what transformers' config class of that family says."""
    from minee.config import config_from_hf
    base = {k: SMALL[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads")}
    for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text"):
        ours = config_from_hf({**base, "model_type": kind})
        ref = transformers.AutoConfig.for_model(kind, **base)
        assert ours.head_dim == (getattr(ref, "head_dim", None) or SMALL["hidden_size"] // 4), kind
        assert ours.max_position_embeddings == ref.max_position_embeddings, kind
        assert ours.tie_word_embeddings == ref.tie_word_embeddings, kind
        assert ours.norm_eps == ref.rms_norm_eps, kind
        windows = [ours.window(l) for l in range(3)]
        ref_types = getattr(ref, "layer_types", None) or ["full_attention"] * 3
        ref_window = getattr(ref, "sliding_window", None)
        if kind == "mistral":                                # every layer slides when the window is set
            ref_types = ["sliding_attention" if ref_window else "full_attention"] * 3
        assert windows == [ref_window if t == "sliding_attention" else None for t in ref_types], kind
        theta = ref.rope_parameters.get("full_attention", ref.rope_parameters)["rope_theta"]
        assert ours.rope_theta == theta, kind
