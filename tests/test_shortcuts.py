"""Linear shortcuts (minee/shortcuts.py) and their use by the lens, the analysis and early exit.

References are computed independently of minee.shortcuts: NumPy's lstsq on the stacked data for
the fit, states taken from the plain forward pass with hooks (run_with_cache) and decoded by hand
as unembed(h_p @ weight[p] + bias[p]), finite differences for the KL gradient, np.load for the file.
"""
import io
import json
import zipfile

import numpy as np
import pytest

import minee
import weights_tool
from helpers import random_shortcuts
from minee import shortcuts
from minee.__main__ import main
from minee.analysis import teacher_forced
from minee.hooks import exit_point_names
from minee.lens import final_distribution, lens, log_softmax
from minee.shortcuts import Shortcuts, ShortcutsError

L, D = 3, 32
P = 2 * L


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sc")
    return weights_tool.make_random_model(out, layers=L, d_model=D, heads=4, kv_heads=2, ffn=64, vocab=96,
                                          std=0.3, seed=3)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return minee.load(tiny_dir)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 96, size=300)


def all_states(model, ids):
    """(P, T, D) exit-point states from one plain forward pass."""
    _, acts = model.run_with_cache(np.asarray(ids)[None], names=exit_point_names(L))
    return np.stack([acts[n][0] for n in exit_point_names(L)])


# ------------------------------------------------------------------ the fit

def test_exact_affine_map_is_recovered():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 500, 16)) * np.array([1, 30])[:, None, None]   # two points, two scales
    A = rng.standard_normal((2, 16, 16))
    c = rng.standard_normal((2, 16))
    for k in range(2):
        Y = X[k] @ A[k] + c[k]
        w, b = shortcuts.solve(shortcuts.state_sums(X[k:k + 1], Y, [k]), ridge=0.0)
        np.testing.assert_allclose(w[0], A[k], rtol=1e-4, atol=1e-4 * np.abs(A[k]).max())
        np.testing.assert_allclose(b[0], c[k], rtol=1e-4, atol=1e-4 * np.abs(c[k]).max())


def test_ridge_pulls_towards_the_identity_as_specified():
    rng = np.random.default_rng(1)
    n, d = 60, 12
    X = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + 2.0
    Y = X @ rng.standard_normal((d, d)) + rng.standard_normal((n, d)) + 1.0
    sums = shortcuts.state_sums(X[None], Y, [0])
    for ridge in (0.01, 0.3):
        w, b = shortcuts.solve(sums, ridge)
        # reference: plain least squares on centred data with sqrt(n lam) I rows asking for W = I
        lam = ridge * X.var(0).sum() / d
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        A = np.vstack([Xc, np.sqrt(n * lam) * np.eye(d)])
        B = np.vstack([Yc, np.sqrt(n * lam) * np.eye(d)])
        ref = np.linalg.lstsq(A, B, rcond=None)[0]
        np.testing.assert_allclose(w[0], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(b[0], Y.mean(0) - X.mean(0) @ ref, rtol=1e-4, atol=1e-4 * np.abs(Y).mean())
    # a huge ridge leaves only the identity and the shift of the means
    w, b = shortcuts.solve(sums, 1e9)
    np.testing.assert_allclose(w[0], np.eye(d), atol=1e-6)
    np.testing.assert_allclose(b[0], Y.mean(0) - X.mean(0), rtol=1e-5, atol=1e-5)
    # more ridge: further from the data, closer to I
    errs = [np.linalg.norm(shortcuts.solve(sums, r)[0][0] - np.eye(d)) for r in (0.0, 0.1, 1.0)]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="ridge"):
        shortcuts.solve(sums, -1.0)


def test_sums_add_up_in_any_order():
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((3, 90, 8)), rng.standard_normal((90, 8))
    whole = shortcuts.state_sums(X, Y, [0, 2, 4])
    parts = [shortcuts.state_sums(X[:, s], Y[s], [0, 2, 4]) for s in (slice(60, 90), slice(0, 25), slice(25, 60))]
    total = parts[0] + parts[1] + parts[2]
    assert total.n == whole.n == 90
    for name in ("sx", "sy", "sxx", "sxy"):
        np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-12, atol=1e-12)


def test_fit_over_windows_equals_one_big_solve(model, ids):
    # with context >= the sequence, every window sees the whole prefix: the states equal one pass
    sc = shortcuts.fit(model, ids, ridge=1e-3, window=64, context=400, progress=False)
    states = all_states(model, ids)
    w, b = shortcuts.solve(shortcuts.state_sums(states[:-1], states[-1], range(P - 1)), 1e-3)
    np.testing.assert_allclose(sc.weight[:-1], w, rtol=1e-3, atol=1e-4 * np.abs(w).max())
    np.testing.assert_allclose(sc.bias[:-1], b, rtol=1e-3, atol=1e-4 * np.abs(b).max())
    np.testing.assert_array_equal(sc.weight[-1], np.eye(D))        # the last point maps to itself
    np.testing.assert_array_equal(sc.bias[-1], 0)
    assert sc.weight.dtype == sc.bias.dtype == np.float32
    assert sc.meta["tokens"] == len(ids) and sc.meta["method"] == "lstsq"
    # least squares beats every other affine map on its own tokens, the identity included
    h = states[2]
    assert np.linalg.norm(sc.apply(h, 2) - states[-1]) < 0.9 * np.linalg.norm(h - states[-1])


def test_points_not_fitted_keep_the_identity(model, ids):
    sc = shortcuts.fit(model, ids[:100], points=[3], progress=False)
    for p in (0, 1, 2, 4):
        np.testing.assert_array_equal(sc.weight[p], np.eye(D))
    assert not np.allclose(sc.weight[3], np.eye(D))
    with pytest.raises(ValueError, match="exit points 0 .. 4"):
        shortcuts.fit(model, ids[:100], points=[P - 1], progress=False)


# ------------------------------------------------------------------ KL refinement

def test_kl_gradient_matches_finite_differences(model, ids):
    states = all_states(model, ids[:40]).astype(np.float64)
    x = states[2].astype(np.float32)
    final_logits = model.unembed(states[-1].astype(np.float32))
    q = np.exp(log_softmax(final_logits.astype(np.float64)))
    final = final_distribution(final_logits)
    rng = np.random.default_rng(3)
    w = (np.eye(D) + 0.1 * rng.standard_normal((D, D))).astype(np.float32)
    b = (0.1 * rng.standard_normal(D)).astype(np.float32)
    kl, gw, gb = shortcuts.kl_and_grad(model, x, w, b, final)
    dw, db = rng.standard_normal((D, D)), rng.standard_normal(D)
    eps = 1e-2
    plus = shortcuts.kl_and_grad(model, x, (w + eps * dw).astype(np.float32), (b + eps * db).astype(np.float32), final)[0]
    minus = shortcuts.kl_and_grad(model, x, (w - eps * dw).astype(np.float32), (b - eps * db).astype(np.float32), final)[0]
    numeric = (plus - minus) / (2 * eps)
    analytic = float((gw * dw).sum() + (gb * db).sum())
    assert analytic == pytest.approx(numeric, rel=2e-2)
    # and the KL itself, by hand
    ref = (q * (np.log(q) - log_softmax(model.unembed(x @ w + b).astype(np.float64)))).sum(-1).mean()
    assert kl == pytest.approx(ref, rel=1e-3)


def test_refine_lowers_the_kl(model, ids):
    sc = shortcuts.fit(model, ids, ridge=1.0, progress=False)           # heavy ridge: room to improve
    refined = shortcuts.refine(model, sc, ids, steps=30, batch=64, lr=3e-3, progress=False)
    assert refined.meta["method"] == "kl" and refined.meta["kl_steps"] == 30
    states = all_states(model, ids)
    q = np.exp(log_softmax(model.unembed(states[-1]).astype(np.float64)))

    def kl(s, p):
        return (q * (np.log(q) - log_softmax(model.unembed(s.apply(states[p], p)).astype(np.float64)))).sum(-1).mean()
    for p in (1, 3):
        assert kl(refined, p) < 0.9 * kl(sc, p)
    np.testing.assert_array_equal(refined.weight[-1], np.eye(D))


# ------------------------------------------------------------------ the file

def test_save_load_round_trip(model, tmp_path):
    sc = random_shortcuts(model)
    path = tmp_path / "sc.npz"
    sc.save(path)
    with np.load(path, allow_pickle=False) as z:                        # the documented layout
        assert z["weight"].dtype == z["bias"].dtype == np.float32
        assert z["weight"].shape == (P, D, D) and z["bias"].shape == (P, D)
        np.testing.assert_array_equal(z["weight"], sc.weight)
        assert json.loads(str(z["meta"]))["fingerprint"] == sc.meta["fingerprint"]
    back = shortcuts.load(path, model)
    np.testing.assert_array_equal(back.weight, sc.weight)
    np.testing.assert_array_equal(back.bias, sc.bias)
    assert back.meta == sc.meta
    other = tmp_path / "name_without_suffix"                            # saved under exactly that name
    sc.save(other)
    assert other.is_file()


def test_shortcuts_of_another_model_are_refused(model, tmp_path):
    other = minee.load(weights_tool.make_random_model(tmp_path / "other", layers=L, d_model=D, heads=4,
                                                      kv_heads=2, ffn=64, vocab=96, std=0.3, seed=4))
    sc = shortcuts.fit(other, np.arange(50), progress=False)
    sc.save(tmp_path / "other.npz")
    with pytest.raises(ShortcutsError, match="fitted on another model.*fingerprint"):
        shortcuts.load(tmp_path / "other.npz", model)
    with pytest.raises(ShortcutsError, match="another model"):
        lens(model, [1, 2, 3], shortcut=sc)
    with pytest.raises(ShortcutsError, match="another model"):
        minee.generate(model, [1, 2, 3], 2, exit="fixed:2", shortcut=sc)


def no_model_work(model, monkeypatch):
    """Any forward pass from now on fails the test: arguments must be refused before one."""
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("the model ran before the error"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), r"window \(tokens scored per forward pass\) must be a whole number >= 1, got 0"),
    (dict(window=-5), "window .* must be a whole number >= 1, got -5"),
    (dict(window=2.5), "window .* must be a whole number >= 1, got 2.5"),
    (dict(context=-3), r"context \(earlier tokens each window sees\) must be a whole number >= 0, got -3"),
    (dict(ridge=float("nan")), r"ridge \(--ridge\) must be a finite number >= 0 .*got nan"),
    (dict(ridge=float("inf")), "ridge .* must be a finite number >= 0 .*got inf"),
    (dict(ridge=-1.0), "ridge .* must be a finite number >= 0 .*got -1.0"),
    (dict(ids=[5]), "fitting needs at least 2 tokens, got 1"),
])
def test_bad_fit_arguments_are_refused_before_the_model_runs(model, ids, monkeypatch, kwargs, message):
    no_model_work(model, monkeypatch)
    kwargs = {"ids": ids[:100], **kwargs}
    with pytest.raises(ValueError, match=message):
        shortcuts.fit(model, progress=False, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=[5]), r"teacher forcing needs at least 2 tokens \(an input and its next token\), got 1"),
    (dict(window=0), "window .* must be a whole number >= 1, got 0"),
    (dict(context=-1), "context .* must be a whole number >= 0, got -1"),
])
def test_bad_teacher_forced_arguments_are_refused_before_the_model_runs(model, ids, monkeypatch, kwargs, message):
    no_model_work(model, monkeypatch)
    kwargs = {"ids": ids[:100], **kwargs}
    with pytest.raises(ValueError, match=message):
        teacher_forced(model, progress=False, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "window (tokens scored per forward pass) must be a whole number >= 1, got 0"),
    (["--window", "-5"], "window (tokens scored per forward pass) must be a whole number >= 1, got -5"),
    (["--ridge", "nan"], "ridge (--ridge) must be a finite number >= 0"),
    (["--ridge", "inf"], "ridge (--ridge) must be a finite number >= 0"),
])
def test_cli_fit_refuses_bad_sizes_before_loading_the_model(tmp_path, capsys, args, message):
    """The model named does not exist: the argument's error comes first, so nothing was loaded."""
    rc = main(["shortcuts", "fit", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "sc.npz"), *args])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err
    assert not (tmp_path / "sc.npz").exists()


def write_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def meta_with(arrays, **changes):
    """The meta array of `arrays` with some fields changed."""
    return np.array(json.dumps({**json.loads(str(arrays["meta"])), **changes}))


def good_arrays(model):
    sc = random_shortcuts(model)
    return {"weight": sc.weight, "bias": sc.bias, "meta": np.array(json.dumps(sc.meta))}


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("bias"), "field 'bias' is missing"),
    (lambda a: a.update(weight=a["weight"].astype(np.float64)), "field 'weight' is float64"),
    (lambda a: a.update(weight=a["weight"][:-1]), r"field 'weight' is float32 \(5, 32, 32\); this model needs"),
    (lambda a: a.update(bias=np.where(np.arange(D) == 3, np.nan, a["bias"]).astype(np.float32)), "NaN or infinite"),
    (lambda a: a.update(meta=np.array("{not json")), "field 'meta' is not valid JSON"),
    (lambda a: a.update(meta=np.array(json.dumps({"fingerprint": "x"}))), "meta field 'tokens'"),
    (lambda a: a.update(meta=np.array([1, 2])), "field 'meta' must be one JSON string"),
    (lambda a: a.update(weight=np.array([object()], dtype=object)), "field 'weight' is object"),
    (lambda a: a["weight"][-1].__imul__(2), r"map of the last point \(5\) must be the identity"),
    (lambda a: a["bias"][-1].__iadd__(0.5), r"map of the last point \(5\) must be the identity"),
    (lambda a: a.update(meta=meta_with(a, points=[0, 5])), r"meta field 'points' must be a list of exit points "
                                                         r"0 \.\. 4 \(the last point's map is the identity\), got"),
    (lambda a: a.update(meta=meta_with(a, points=[])), "meta field 'points' must be a list of exit points"),
    (lambda a: a.update(meta=meta_with(a, points=[True])), "meta field 'points' must be a list of exit points"),
])
def test_bad_files_are_clear_errors(model, tmp_path, change, message):
    arrays = good_arrays(model)
    change(arrays)
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ShortcutsError, match=message) as e:
        shortcuts.load(path, model)
    assert str(path) in str(e.value)


def test_points_the_loader_accepts_are_points_refine_accepts(model, ids, tmp_path):
    """A file whose points include the last point was accepted by load, then refused by refine."""
    arrays = good_arrays(model)
    arrays["meta"] = meta_with(arrays, points=[P - 2])
    sc = shortcuts.load(write_npz(tmp_path / "ok.npz", **arrays), model)
    refined = shortcuts.refine(model, sc, ids, steps=1, tokens=16, window=16, progress=False)
    assert refined.meta["kl_points"] == [P - 2]


@pytest.mark.parametrize("change, message", [
    (lambda sc: Shortcuts(sc.weight[:-1], sc.bias[:-1], sc.meta), r"weight is float32 \(5, 32, 32\); this model "
                                                                  r"needs float32 \(6, 32, 32\)"),
    (lambda sc: Shortcuts(sc.weight, sc.bias[:, :-1], sc.meta), r"bias is float32 \(6, 31\); this model needs"),
    (lambda sc: Shortcuts(sc.weight.astype(np.float64), sc.bias, sc.meta), "weight is float64"),
    (lambda sc: Shortcuts(sc.weight * 1.5, sc.bias, sc.meta), r"map of the last point \(5\) must be the identity"),
])
def test_in_memory_shortcuts_that_do_not_fit_the_model_are_refused(model, change, message):
    """By check_model, so by every use (the lens, generate, teacher forcing), not by an IndexError later."""
    sc = change(random_shortcuts(model))
    with pytest.raises(ShortcutsError, match=message):
        sc.check_model(model)
    with pytest.raises(ShortcutsError, match=message):
        lens(model, [1, 2, 3], shortcut=sc)
    with pytest.raises(ShortcutsError, match=message):
        minee.generate(model, [1, 2, 3], 2, exit="fixed:2", shortcut=sc)


def test_files_that_are_not_shortcuts(model, tmp_path):
    with pytest.raises(ShortcutsError, match="not found.*shortcuts fit"):
        shortcuts.load(tmp_path / "missing.npz", model)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ShortcutsError, match="not a .npz archive"):
        shortcuts.load(tmp_path / "text.npz", model)


def test_a_huge_declared_shape_is_refused_before_reading(model, tmp_path):
    # a header that claims 10^12 floats, followed by no data: must not allocate, must name the field
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10 ** 6, 10 ** 6)})
    arrays = good_arrays(model)
    path = write_npz(tmp_path / "huge.npz", bias=arrays["bias"], meta=arrays["meta"])
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("weight.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
    with pytest.raises(ShortcutsError, match=r"field 'weight' is float32 \(1000000, 1000000\)"):
        shortcuts.load(path, model)


# ------------------------------------------------------------------ the lens through a shortcut

def test_lens_through_a_shortcut_is_unembed_of_the_map_by_hand(model, ids):
    sc = random_shortcuts(model)
    seq = ids[:20]
    res = lens(model, seq, k=3, shortcut=sc)
    states = all_states(model, seq).astype(np.float64)
    final = np.exp(log_softmax(model.unembed(states[-1].astype(np.float32)).astype(np.float64)))
    for p in range(P):
        mapped = states[p] @ sc.weight[p].astype(np.float64) + sc.bias[p]
        logits = model.unembed(mapped.astype(np.float32)).astype(np.float64)
        np.testing.assert_array_equal(res.top_ids[p, :, 0], logits.argmax(-1))
        logp = log_softmax(logits)
        kl = (final * (np.log(final) - logp)).sum(-1)
        np.testing.assert_allclose(res.metrics["kl"][p], kl, rtol=1e-3, atol=1e-4 * max(1.0, kl.max()))
    plain = lens(model, seq, k=3)
    assert (plain.top_ids[:-1, :, 0] != res.top_ids[:-1, :, 0]).mean() > 0.2   # it did change something
    np.testing.assert_array_equal(plain.top_ids[-1], res.top_ids[-1])          # identity at the last point
    assert res.shortcut.startswith("shortcut") and plain.shortcut is None


def test_analysis_table_through_a_shortcut(model, ids):
    sc = random_shortcuts(model)
    tf, _ = teacher_forced(model, ids[:60], window=16, context=64, progress=False, shortcut=sc)
    states = all_states(model, ids[:59])
    for p in (0, 3):
        np.testing.assert_array_equal(tf.top1[p], model.unembed(sc.apply(states[p], p)).argmax(-1))


# ------------------------------------------------------------------ early exit through a shortcut

def test_early_exit_through_a_shortcut_gives_the_shortcut_lens_top1(model):
    sc = random_shortcuts(model, scale=0.5)
    prompt, n = [5, 17, 40, 2, 66], 12
    gate = "confidence:0.2,min_point=1"
    out = minee.generate(model, prompt, n, exit=gate, kv="compute", shortcut=sc)
    seq = prompt + out.tokens
    states = all_states(model, seq[:-1])
    exits = out.exit_points[1:]                       # the first token comes from the full prompt pass
    assert len(set(exits)) > 1, "the gate should exit at different points on this model"
    for j, p in enumerate(exits):
        pos = len(prompt) + j                         # the position that produced token j + 1
        probs = [np.exp(log_softmax(model.unembed(sc.apply(states[c, pos], c)))) for c in range(1, P - 1)]
        first = next((c for c, pr in zip(range(1, P - 1), probs) if pr.max() >= 0.2), P - 1)
        assert p == first                              # the gate read the shortcut's probabilities
        assert out.tokens[j + 1] == model.unembed(sc.apply(states[p, pos], p)).argmax()


def test_the_shortcut_product_is_counted(model):
    ident = Shortcuts(*shortcuts.identity(model), random_shortcuts(model).meta)
    plain = minee.generate(model, [5, 17, 40], 6, exit="fixed:2", kv="compute")
    through = minee.generate(model, [5, 17, 40], 6, exit="fixed:2", kv="compute", shortcut=ident)
    assert through.tokens == plain.tokens                                    # identity maps change nothing
    # every decode step exits at point 2 and pays one D x D product on top of the same work
    extra = through.stats["flops_per_token"] - plain.stats["flops_per_token"]
    assert extra == pytest.approx(2 * D * D, rel=1e-9)
    assert through.stats["shortcut_calls_per_token"] == 1
    assert plain.stats["shortcut_calls_per_token"] == 0
    with pytest.raises(ValueError, match="give an exit gate"):
        minee.generate(model, [5, 17, 40], 2, shortcut=ident)


# ------------------------------------------------------------------ the command line

def test_cli_fit_then_use(tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "sc.npz"
    rc = main(["shortcuts", "fit", "--model", str(tiny_with_tokenizer), "--out", str(out), "--max-tokens", "300",
               "--skip-tokens", "100", "--kl-steps", "2", "--kl-tokens", "64", "--kl-batch", "16", "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == 300 and info["method"] == "kl"
    model = minee.load(tiny_with_tokenizer)
    sc = shortcuts.load(out, model)
    assert sc.meta["kl_steps"] == 2
    rc = main(["lens", "--model", str(tiny_with_tokenizer), "--prompt", "The capital of France is",
               "--shortcut", str(out), "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    ids = model.tokenizer.encode("The capital of France is")
    assert data["through_shortcut"]["top_ids"] == lens(model, ids, shortcut=sc).top_ids.tolist()
    assert data["top_ids"] == lens(model, ids).top_ids.tolist()
    rc = main(["generate", "--model", str(tiny_with_tokenizer), "--prompt", "Hello", "--max-new-tokens", "3",
               "--exit", "fixed:1", "--shortcut", str(out), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["stats"]["shortcut"].startswith("shortcut (kl")


def test_cli_errors_are_one_line(tiny_with_tokenizer, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    for argv, message in [
        (["generate", "--prompt", "Hi", "--shortcut", str(bad)], "give an --exit or --speculative gate too"),
        (["lens", "--prompt", "Hi", "--shortcut", str(bad)], "not a .npz archive"),
        (["shortcuts", "fit", "--out", str(tmp_path / "no" / "sc.npz")], "directory does not exist"),
        (["shortcuts", "fit", "--out", str(tmp_path / "sc.npz"), "--ridge", "-1"], "--ridge"),
        (["shortcuts", "fit", "--out", str(tmp_path / "sc.npz"), "--skip-tokens", "10000000"], "after the 10,000,000 skipped"),
    ]:
        rc = main(argv[:1] + ["--model", str(tiny_with_tokenizer)] + argv[1:] if argv[0] != "shortcuts"
                  else argv[:2] + ["--model", str(tiny_with_tokenizer)] + argv[2:])
        err = capsys.readouterr()
        assert rc == 2 and err.out == ""
        assert message in err.err and err.err.count("\n") == 1


def test_figures_show_plain_and_shortcut_side_by_side(model, ids, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minee.lens import corpus_lens
    from minee.plots import plot_lens, plot_point_curves

    class Tok:                                          # the tiny model has no tokenizer
        def decode(self, ids):
            return f"t{ids[0]}"
    sc = random_shortcuts(model)
    plain, through = lens(model, ids[:6], k=1), lens(model, ids[:6], k=1, shortcut=sc)
    fig = plot_lens(plain, Tok(), metric="kl", out=tmp_path / "lens.png", shortcut=through)
    left, right = [ax for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(left.images[0].get_array(), plain.metrics["kl"])
    np.testing.assert_array_equal(right.images[0].get_array(), through.metrics["kl"])
    assert left.images[0].get_clim() == right.images[0].get_clim()       # one colour scale for both
    assert right.texts[0].get_text() == f"t{through.top_ids[0, 0, 0]}"
    a, b = corpus_lens(model, ids[:65], progress=False), corpus_lens(model, ids[:65], progress=False, shortcut=sc)
    fig = plot_point_curves(a, tmp_path / "curves.png", shortcut=b)
    agree_panel = fig.axes[0]
    assert [line.get_label() for line in agree_panel.lines] == ["plain lens", "shortcut"]
    np.testing.assert_allclose(agree_panel.lines[1].get_ydata(), b["agree"])
    assert (tmp_path / "lens.png").stat().st_size > 5000 and (tmp_path / "curves.png").stat().st_size > 5000
    plt.close("all")


def test_reused_tables_are_told_apart_by_shortcut(model, ids, tmp_path):
    from minee.analysis import cached_table
    path, seq = tmp_path / "t.npz", ids[:40]
    a, b = random_shortcuts(model, seed=1), random_shortcuts(model, seed=2)
    tf_a, _ = cached_table(model, path, seq, 16, reuse=True, progress=False, shortcut=a)
    again, _ = cached_table(model, path, seq, 16, reuse=True, progress=False, shortcut=a)
    np.testing.assert_array_equal(again.top1, tf_a.top1)
    tf_b, _ = cached_table(model, path, seq, 16, reuse=True, progress=False, shortcut=b)   # recomputed
    states = all_states(model, seq[:-1])
    np.testing.assert_array_equal(tf_b.top1[2], model.unembed(b.apply(states[2], 2)).argmax(-1))
    plain, _ = cached_table(model, path, seq, 16, reuse=True, progress=False)
    np.testing.assert_array_equal(plain.top1[2], model.unembed(states[2]).argmax(-1))
