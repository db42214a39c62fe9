"""The interactive lens page (minee/lens_page.py), checked in a real browser: headless Chromium
driven by selenium, the page opened from a file URL with the network switched off.

What the page shows is compared with the LensResult it was made from; the curves a pinned token
draws are checked against token_trajectory, which computes the full lens distribution by itself.
A word-level tokenizer whose vocabulary holds HTML and script puts hostile strings through the
tokenizer as real tokens and prompt text.
"""
import base64
import json
import re
import shutil
import zlib
from decimal import Decimal
from html.parser import HTMLParser

import numpy as np
import pytest

import minee
import minee.lens
import weights_tool
from helpers import random_shortcuts, word_level_model, words
from minee.__main__ import main
from minee.analysis import MODERN_PROSE, corpus_ids
from minee.lens import lens, token_trajectory
from minee.lens_page import iframe, script_json, visible

HOSTILE = '</script><img src=x onerror="window.__pwned=1">'
VOCAB = ["w0", "w1", "w2", "w3", HOSTILE, "<script>window.__pwned=2</script>", '"><svg onload="window.__pwned=3">',
         "&lt;b&gt;", "{{DATA}}", "{{SCRIPT}}", "line\nbreak", "tab\there", " spaced", "\u2028"]


# ----------------------------------------------------------------------------- the browser

@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Chromium with the network switched off, one for the whole session."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("the browser tests need Chromium and its driver (Debian: apt-get install chromium "
                    f"chromium-driver); found chromium={chromium}, chromedriver={chromedriver}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_network_conditions(offline=True, latency=0, throughput=0)
    yield driver
    driver.quit()


def by(css):
    from selenium.webdriver.common.by import By
    return By.CSS_SELECTOR, css


def open_page(browser, path):
    """Load a page from its file URL, offline, and wait until its grid is drawn."""
    browser.get_log("browser")                            # forget earlier pages' messages
    browser.get(path.as_uri())
    wait_for_grid(browser)
    assert browser.execute_script("return navigator.onLine") is False


def wait_for_grid(browser):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.querySelector('.grid .cell')"))


def console_errors(browser):
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def hover(browser, p, t, lens_index=0):
    """Point at cell (p, t) of a lens; returns the cell and the tooltip's [(token, probability)] as shown."""
    from selenium.webdriver.common.action_chains import ActionChains
    cell = browser.find_element(*by(f'.grid[data-lens="{lens_index}"] .cell[data-p="{p}"][data-t="{t}"]'))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", cell)
    ActionChains(browser).move_to_element(cell).perform()
    return cell, tooltip(browser)


def tooltip(browser):
    return [(row.find_element(*by(".tip-token")).text, row.find_element(*by(".tip-prob")).text)
            for row in browser.find_elements(*by(".tip .tip-row"))]


def pin(browser, cell, rank):
    """Hold the cell's list (click) and click its token `rank` (0 = top)."""
    if "locked" not in cell.get_attribute("class"):
        cell.click()
    browser.find_elements(*by(".tip .tip-row"))[rank].click()


def shows(printed, value, rel=0.0):
    """A probability printed as a percentage (e.g. '42.3%', '1.20e-7%') is `value` rounded to the
    digits printed (give or take `rel` of it, for values the page holds rounded)."""
    number = Decimal(printed.removesuffix("%"))
    unit = float(Decimal(1).scaleb(number.as_tuple().exponent))
    return abs(float(number) - 100 * float(value)) <= unit / 2 * (1 + 1e-9) + rel * 100 * float(value)


def expected_top(result, p, t):
    return [(visible(result.texts[i]) if result.texts else f"#{i}", prob)
            for i, prob in zip(result.top_ids[p, t].tolist(), result.top_probs[p, t])]


def assert_tooltip_is_top_k(shown, result, p, t):
    expected = expected_top(result, p, t)
    assert [token for token, _ in shown] == [token for token, _ in expected]
    for (_, printed), (token, prob) in zip(shown, expected):
        assert shows(printed, prob), (token, printed, prob)


def prob_curves(browser):
    """The probability chart's curves read back from the SVG: [(P,) values], mapped through the
    chart's own 0% and 100% grid lines."""
    chart = browser.find_elements(*by(".charts svg"))[0]
    lines = chart.find_elements(*by("line.gridline"))
    y0, y1 = float(lines[0].get_attribute("y1")), float(lines[-1].get_attribute("y1"))   # 0% and 100%
    curves = []
    for line in chart.find_elements(*by("polyline.curve")):
        ys = [float(xy.split(",")[1]) for xy in line.get_attribute("points").split()]
        curves.append((y0 - np.array(ys)) / (y0 - y1))
    return curves


def readout(browser, point, P):
    """Point at exit point `point` on the probability chart: the readout under the charts, as
    (the point's label, [(token, probability, rank) of each pin])."""
    from selenium.webdriver.common.action_chains import ActionChains
    chart = browser.find_elements(*by(".charts svg"))[0]
    line = chart.find_element(*by("line.gridline"))
    left, right = float(line.get_attribute("x1")), float(line.get_attribute("x2"))
    x = left + point / (P - 1) * (right - left) - float(chart.get_attribute("width")) / 2   # from the centre
    ActionChains(browser).move_to_element_with_offset(chart, round(x), 0).perform()
    label, *pins = [e.text for e in browser.find_elements(*by(".readout span"))]
    return label, [re.fullmatch(r"(.+) (\S+%), rank (\S+)", pin).groups() for pin in pins]


def column(result, t, token):
    """The index of `token` in position t's followed tokens."""
    return result.curve_ids[t].tolist().index(token)


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def smol_lens(smollm2_dir):
    """SmolLM2's lens of 64 tokens of real prose: the 60 x 64 page of the issue."""
    model = minee.load(smollm2_dir)
    return model, lens(model, corpus_ids(model.tokenizer, MODERN_PROSE, max_tokens=64))


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory):
    """A tiny random model whose word-level vocabulary holds HTML, script and page markers: the prompt
    '|'-separated words, so every one of them is a token of the prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    path = tmp_path_factory.mktemp("hostile")
    weights_tool.make_random_model(path, layers=3, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=len(VOCAB),
                                   untied=True, std=0.3, seed=4, tokenizer=False)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Split("|", "removed")
    tok.save(str(path / "tokenizer.json"))
    return minee.load(path)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    return minee.load(word_level_model(tmp_path_factory.mktemp("words")))


# ----------------------------------------------------------------------------- the data behind the page

def test_token_curves_are_each_tokens_full_lens_trajectory(word_model, monkeypatch):
    """For every position, the followed tokens are exactly those in its top-k at some point, and each
    one's probability and rank at every point are those token_trajectory computes from the full
    distribution. Cells decoded 3 at a time give the same arrays as all at once."""
    ids = np.random.default_rng(2).integers(0, 120, 11).tolist()
    result = lens(word_model, ids, k=4)
    P, T, _ = result.top_ids.shape
    for t in range(T):
        n = int((result.curve_ids[t] >= 0).sum())
        followed = result.curve_ids[t, :n]
        assert set(followed.tolist()) == set(result.top_ids[:, t].ravel().tolist())
        assert (result.curve_ids[t, n:] == -1).all() and (result.curve_ranks[:, t, n:] == -1).all()
        traj = token_trajectory(word_model, ids, followed.tolist(), position=t)
        np.testing.assert_allclose(result.curve_probs[:, t, :n], traj.prob.T, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(result.curve_ranks[:, t, :n], traj.rank.T)
    monkeypatch.setattr(minee.lens, "LOGITS_BUDGET", 3 * word_model.config.vocab_size * 4)   # 3 cells at a time
    grouped = lens(word_model, ids, k=4)
    for name in ("top_ids", "curve_ids", "curve_ranks"):
        np.testing.assert_array_equal(getattr(grouped, name), getattr(result, name))
    # a GEMM of other rows rounds each logit differently (its sums run in another order): a few float32 eps
    np.testing.assert_allclose(grouped.curve_probs, result.curve_probs, rtol=1e-5, atol=0)
    assert result.texts == {i: f"w{i}" for i in set(ids) | set(result.curve_ids[result.curve_ids >= 0].tolist())}


def test_visible_shows_every_character():
    assert visible(" Paris") == "␣Paris"
    assert visible("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert visible("\x00\x7f\u200b\u2028\u00a0\ufeff") == "\\x00\\x7f\\u200b\\u2028\\xa0\\ufeff"
    assert visible("é日本\ufffd") == "é日本\ufffd"
    assert visible("") == "∅"
    assert visible(HOSTILE) == '</script><img␣src=x␣onerror="window.__pwned=1">'


def test_script_json_cannot_end_its_element():
    data = {"t": "</script><!-- & \u2028 \u2029 é", "n": [1, 2.5]}
    text = script_json(data)
    assert not set(text) & set("<>&\u2028\u2029") and text.isascii()
    assert json.loads(text) == data


def page_data(page):
    """The JSON inside a page's data element."""
    tag = '<script type="application/json" id="lens-data">'
    start = page.index(tag) + len(tag)
    return json.loads(page[start:page.index("</script>", start)])


def unpacked(b64, dtype):
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype)


def test_page_data_unpacks_to_the_lens(word_model):
    """The packed arrays of the page decode to the LensResult: each cell's top-k tokens and
    probabilities exactly, each curve's probability within 0.05% and its rank exactly."""
    ids = list(range(1, 30, 3))
    result = lens(word_model, ids)
    data = page_data(result.to_html(metric="kl"))
    P, T, k = result.top_ids.shape
    (L,) = data["lenses"]
    assert data["metric"] == "kl" and L["label"] == "plain lens" and data["points"] == result.labels
    table = dict(zip(data["ids"], data["texts"]))
    assert [table[data["ids"][i]] for i in data["inputs"]] == [f"w{i}" for i in ids]
    rows = np.array(L["tokens"])
    top = unpacked(L["top"], "<u2").reshape(P, T, k) + np.array(L["offsets"][:-1])[None, :, None]
    np.testing.assert_array_equal(np.array(data["ids"])[rows[top]], result.top_ids)
    np.testing.assert_array_equal(unpacked(L["top_probs"], "<f4").reshape(P, T, k), result.top_probs)
    np.testing.assert_array_equal(unpacked(L["metrics"]["entropy"], "<f4").reshape(P, T), result.metrics["entropy"])
    followed = result.curve_ids >= 0
    probs = np.exp(-unpacked(L["logp"], "<u2").reshape(-1, P).astype(float) / data["logp_scale"])   # (N, P)
    np.testing.assert_allclose(probs, result.curve_probs.transpose(1, 2, 0)[followed], rtol=5e-4, atol=1e-28)
    ranks = unpacked(L["rank"], "<u2").reshape(-1, P)
    assert ranks.max() < data["rank_exact"]                                                 # vocab 120: exact
    np.testing.assert_array_equal(ranks, result.curve_ranks.transpose(1, 2, 0)[followed])


def test_pages_refuse_what_they_cannot_show(word_model):
    a, b = lens(word_model, [1, 2, 3]), lens(word_model, [1, 2, 4])
    with pytest.raises(ValueError, match="same sequence"):
        a.to_html(shortcut=b)
    with pytest.raises(ValueError, match="unknown metric 'colour'.*final_prob"):
        a.to_html(metric="colour")


def test_repr_html_is_the_page_in_an_isolated_iframe(hostile_model):
    """A notebook shows the page in a sandboxed iframe whose srcdoc, read back by an HTML parser,
    is the page itself, hostile tokens included."""
    result = lens(hostile_model, hostile_model.tokenizer.encode("|".join(VOCAB)))

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found = []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, dict(attrs)))

    parser = Tags()
    parser.feed(result._repr_html_())
    assert [tag for tag, _ in parser.found] == ["div", "iframe"]
    attrs = parser.found[1][1]
    assert attrs["sandbox"] == "allow-scripts"
    assert attrs["srcdoc"] == result.to_html()


def test_show_displays_both_lenses_in_the_notebook(word_model, monkeypatch):
    import IPython.display
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    ids = [5, 6, 7]
    plain, through = lens(word_model, ids), lens(word_model, ids, shortcut=random_shortcuts(word_model))
    plain.show(shortcut=through, metric="kl")
    (html_object,) = shown
    assert html_object.data == iframe(plain.to_html(shortcut=through, metric="kl"), len(plain.points))
    assert [L["label"] for L in page_data(plain.to_html(shortcut=through))["lenses"]] == ["plain lens", through.shortcut]


# ----------------------------------------------------------------------------- in the browser

def test_smollm2_page_hover_pin_and_size(browser, smol_lens, tmp_path):
    """The 60-point x 64-token page of a real prompt: at most 1 MB; no console error; a hovered
    cell lists the lens's top-5 with their probabilities; clicked tokens draw their curves across
    all points (one, then two), and the curves are the token's trajectory through the full lens."""
    model, result = smol_lens
    assert result.top_ids.shape == (60, 64, 5)
    path = result.save_html(tmp_path / "smollm2_60x64.html", title="SmolLM2-135M, 64 tokens of prose")
    assert path.stat().st_size <= 1_000_000, path.stat().st_size
    open_page(browser, path)
    assert browser.execute_script("return document.querySelectorAll('.grid .cell').length") == 60 * 64
    p, t = 44, 40
    cell, shown = hover(browser, p, t)
    assert_tooltip_is_top_k(shown, result, p, t)
    assert not browser.find_elements(*by("polyline.curve"))
    pin(browser, cell, 0)
    assert len(browser.find_elements(*by("polyline.curve"))) == 2           # probability and rank
    pin(browser, cell, 1)
    assert len(browser.find_elements(*by("polyline.curve"))) == 4
    assert len(browser.find_elements(*by(".pins .pin"))) == 2
    tokens = result.top_ids[p, t, :2].tolist()
    traj = token_trajectory(model, result.ids, tokens, position=t)
    for curve, prob in zip(prob_curves(browser), traj.prob):
        np.testing.assert_allclose(curve, prob, atol=2e-3)                     # 0.1 px of a 174 px chart
    for point in (3, 30, 59):                                 # the values read at a point: the curves hold
        label, pins = readout(browser, point, P=60)          # -ln p to 1/1000 nat, ranks from 32768 on to 0.05%
        assert label == f"{result.labels[point]}:"
        for (token, printed, rank), i, prob, exact in zip(pins, tokens, traj.prob[:, point], traj.rank[:, point]):
            assert token == visible(result.texts[i]) and shows(printed, prob, rel=5e-4), (token, printed, prob)
            assert rank == str(exact) if exact < 32768 else abs(int(rank.lstrip("≈")) / exact - 1) < 3e-4
    browser.save_screenshot(str(tmp_path / "smollm2_60x64.png"))
    assert (tmp_path / "smollm2_60x64.png").stat().st_size > 50_000
    assert console_errors(browser) == []


def test_hostile_tokens_show_as_text_and_run_nothing(browser, hostile_model, tmp_path):
    """Tokens and prompt text that are HTML and script show as their text; nothing they hold runs or
    becomes an element, on the page and in the notebook's iframe."""
    ids = hostile_model.tokenizer.encode("|".join(VOCAB))
    assert ids == list(range(len(VOCAB)))                                   # every hostile word is a token
    result = lens(hostile_model, ids, k=5)
    path = result.save_html(tmp_path / "hostile.html", title=HOSTILE)
    inputs = [visible(s) for s in VOCAB]

    def check_page(title):
        assert browser.execute_script("return window.__pwned") is None
        assert browser.execute_script("return document.scripts.length") == 2          # the page's own
        assert browser.find_elements(*by("img, svg, iframe, object, embed")) == []
        assert [e.text for e in browser.find_elements(*by(".grid .input"))] == inputs
        assert browser.find_element(*by("h1")).text == title == browser.execute_script("return document.title")
        p, t = np.argwhere(result.top_ids == VOCAB.index(HOSTILE))[0, :2].tolist()
        cell, shown = hover(browser, p, t)
        assert visible(HOSTILE) in [token for token, _ in shown]
        assert_tooltip_is_top_k(shown, result, p, t)
        pin(browser, cell, [token for token, _ in shown].index(visible(HOSTILE)))
        assert browser.find_element(*by(".pins .pin .token")).text == visible(HOSTILE)
        assert browser.execute_script("return window.__pwned") is None

    open_page(browser, path)
    check_page(HOSTILE)
    browser.save_screenshot(str(tmp_path / "hostile.png"))
    assert console_errors(browser) == []
    notebook = tmp_path / "notebook.html"
    notebook.write_text(f"<!DOCTYPE html><html><body>{result._repr_html_()}</body></html>", encoding="utf-8")
    browser.get(notebook.as_uri())
    browser.switch_to.frame(browser.find_element(*by("iframe")))
    try:
        wait_for_grid(browser)
        check_page("minee logit lens")
    finally:
        browser.switch_to.default_content()
    assert browser.execute_script("return window.__pwned") is None
    assert console_errors(browser) == []


def test_plain_and_shortcut_lens_on_one_page(browser, word_model, tmp_path):
    """With a shortcut lens, a toggle shows either grid; tokens pinned from both are drawn together;
    the colour follows the metric picked."""
    from selenium.webdriver.support.ui import Select
    ids = list(range(3, 100, 7))
    sc = random_shortcuts(word_model)
    plain, through = lens(word_model, ids), lens(word_model, ids, shortcut=sc)
    assert (plain.top_ids != through.top_ids).any()
    path = plain.save_html(tmp_path / "both.html", shortcut=through, metric="final_prob")
    open_page(browser, path)
    assert [e.text for e in browser.find_elements(*by(".lens-choice label"))] == ["plain lens", through.shortcut]
    p, t = 3, 5
    cell, shown = hover(browser, p, t)
    assert_tooltip_is_top_k(shown, plain, p, t)
    pin(browser, cell, 0)
    browser.find_elements(*by(".lens-choice input"))[1].click()
    cell, shown = hover(browser, p, t, lens_index=1)
    assert_tooltip_is_top_k(shown, through, p, t)
    pin(browser, cell, 0)
    labels = [e.text for e in browser.find_elements(*by(".pins .pin"))]
    assert len(labels) == 2 and "plain lens" in labels[0] and through.shortcut in labels[1]
    for curve, result in zip(prob_curves(browser), (plain, through)):
        token = result.top_ids[p, t, 0]
        np.testing.assert_allclose(curve, result.curve_probs[:, t, column(result, t, token)], atol=2e-3)

    def brightness(metric, p, t):               # of cell (p, t) of the shortcut lens, coloured by metric
        Select(browser.find_element(*by(".metric"))).select_by_value(metric)
        cell = browser.find_element(*by(f'.grid[data-lens="1"] .cell[data-p="{p}"][data-t="{t}"]'))
        rgb = cell.value_of_css_property("background-color").removeprefix("rgba(").removeprefix("rgb(")
        return sum(int(c) for c in rgb.rstrip(")").split(",")[:3])

    for metric, sign in (("final_prob", 1), ("entropy", -1)):          # viridis: bright = high; entropy reversed
        values = through.metrics[metric]
        hi, lo = np.unravel_index(values.argmax(), values.shape), np.unravel_index(values.argmin(), values.shape)
        assert sign * (brightness(metric, *hi) - brightness(metric, *lo)) > 30, metric
    browser.save_screenshot(str(tmp_path / "both.png"))
    assert console_errors(browser) == []


def test_shortcut_lens_alone_and_without_a_tokenizer(browser, tmp_path):
    """A shortcut lens on its own names its shortcut; a model without a tokenizer shows token ids."""
    path = tmp_path / "no_tok"
    weights_tool.make_random_model(path, layers=2, d_model=32, heads=4, kv_heads=2, ffn=64, vocab=50, std=0.3)
    model = minee.load(path)
    assert model.tokenizer is None
    ids = [5, 9, 13, 2]
    through = lens(model, ids, shortcut=random_shortcuts(model))
    open_page(browser, through.save_html(tmp_path / "alone.html"))
    assert browser.find_element(*by(".lens-choice")).text == through.shortcut
    assert [e.text for e in browser.find_elements(*by(".grid .input"))] == [f"#{i}" for i in ids]
    _, shown = hover(browser, 1, 2)
    assert_tooltip_is_top_k(shown, through, 1, 2)
    assert console_errors(browser) == []


# ----------------------------------------------------------------------------- the command line

def test_cli_html_writes_the_page_with_both_lenses(tmp_path, capsys):
    model_dir = word_level_model(tmp_path / "model")
    model = minee.load(model_dir)
    sc = random_shortcuts(model)
    sc.save(tmp_path / "sc.npz")
    prompt = words([4, 8, 15, 16, 23, 42])
    rc = main(["lens", "--model", str(model_dir), "--prompt", prompt, "--html", str(tmp_path / "lens.html"),
               "--metric", "kl"])
    out = capsys.readouterr()
    assert rc == 0 and "interactive page written to" in out.err
    data = page_data((tmp_path / "lens.html").read_text(encoding="utf-8"))
    assert [L["label"] for L in data["lenses"]] == ["plain lens"] and data["metric"] == "kl"
    rc = main(["lens", "--model", str(model_dir), "--prompt", prompt, "--html", str(tmp_path / "both.html"),
               "--shortcut", str(tmp_path / "sc.npz"), "--json"])
    out = capsys.readouterr()
    assert rc == 0 and json.loads(out.out)["page"] == str(tmp_path / "both.html")
    data = page_data((tmp_path / "both.html").read_text(encoding="utf-8"))
    through = lens(model, [4, 8, 15, 16, 23, 42], shortcut=minee.shortcuts.load(tmp_path / "sc.npz", model))
    assert [L["label"] for L in data["lenses"]] == ["plain lens", through.shortcut]
    P, T, k = through.top_ids.shape
    L = data["lenses"][1]
    top = unpacked(L["top"], "<u2").reshape(P, T, k) + np.array(L["offsets"][:-1])[None, :, None]
    np.testing.assert_array_equal(np.array(data["ids"])[np.array(L["tokens"])[top]], through.top_ids)


@pytest.mark.parametrize("where", ["/nonexistent-dir/lens.html", "DIRECTORY"])
def test_cli_html_bad_path_is_one_line_before_any_work(tmp_path, capsys, where):
    """Checked before the model loads: the model named here does not even exist."""
    where = str(tmp_path) if where == "DIRECTORY" else where
    rc = main(["lens", "--model", str(tmp_path / "no-model"), "--prompt", "w1", "--html", where])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    (line,) = out.err.strip().splitlines()
    assert line.startswith("minee: error: cannot write") and where in line
