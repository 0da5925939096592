"""The HTML report in a real browser: Debian's chromium, headless, opening the file from disk.

Driven by selenium through Debian's ``chromium-driver``: the driver is built from the same source
package as the browser, so it always speaks that browser's protocol (Playwright's Python package is
made for a Chromium build of its own, which it downloads, and only "may work" with another one; the
DevTools protocol by hand would be driver code of our own). ``.ci/run`` installs chromium,
chromium-driver and a CJK font.

What a visit records: the browser's log (console messages, uncaught errors, loads that failed or
that the page's Content-Security-Policy refused), every request the page made (from the DevTools
"performance" log), and a screenshot. The last test shows that each of these checks catches the
failure it is there for.
"""

from __future__ import annotations

import io
import json
import subprocess
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from compare.html_report import render_html
from tests.html_report_data import synthetic_attention, synthetic_report

# A real browser starts for this module (seconds before the first test): not in the fast loop.
pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# What this machine's chromium needs to run headless as root in a container, and to stay off the
# network by itself (no component updates, no sync, no first-run pages).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,2000",
]


@dataclass
class Visit:
    """What the browser saw while opening one page."""

    url: str
    log: list[dict]  # the browser log: console-api, javascript, network and security entries
    requests: list[str]  # every URL the page asked for, itself included
    screenshot: np.ndarray  # (height, width, 3) uint8

    @property
    def problems(self) -> list[str]:
        return [entry["message"] for entry in self.log if entry["level"] in ("WARNING", "SEVERE")]

    @property
    def foreign_requests(self) -> list[str]:
        return [url for url in self.requests if url != self.url and not url.startswith("data:")]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: this test needs Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver fonts-wqy-microhei, as .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # A driver path given explicitly: selenium then never runs Selenium Manager (which downloads).
    service = Service(str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def visit(driver: WebDriver, path: Path) -> Visit:
    """Open ``path`` (file://) and return what the browser logged, requested and showed."""
    driver.get_log("browser")  # drop whatever came before this page
    driver.get_log("performance")
    url = path.resolve().as_uri()
    driver.get(url)  # returns after the load event
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.append(message["params"]["request"]["url"])
    # chrome:// pages are the browser's own start page loading in the background, not this page.
    requests = [request for request in requests if not request.startswith("chrome://")]
    screenshot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    return Visit(url=url, log=driver.get_log("browser"), requests=requests, screenshot=screenshot)


def is_blank(pixels: np.ndarray) -> bool:
    """Nearly one colour: a page (or picture) that drew nothing."""
    return float(pixels.astype(np.float64).std()) < 3.0


def element_pixels(driver: WebDriver, css: str) -> np.ndarray:
    element = driver.find_element(By.CSS_SELECTOR, css)
    return np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB"))


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, object]:
    """A small causal model's report with a bug in its last layer, Chinese tokens included."""
    report = synthetic_report(2, bug_at="layer.1.attention", next_token_and_origin=True)
    attention = synthetic_attention(2, 4, causal=True, bug_layer=1)
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(report, attention=attention), encoding="utf-8")
    return path, report, attention


def test_the_page_opens_offline_draws_and_logs_no_error(browser: WebDriver, report_page) -> None:
    path, _, _ = report_page
    seen = visit(browser, path)
    assert seen.problems == []
    assert seen.foreign_requests == []
    assert not is_blank(seen.screenshot)
    assert not is_blank(element_pixels(browser, "#chart svg"))
    assert not is_blank(element_pixels(browser, "#focus .map"))  # the PNG strip decoded and shows


def test_the_large_view_labels_rows_and_columns_with_the_tokens(browser: WebDriver, report_page) -> None:
    path, _, attention = report_page
    visit(browser, path)
    for axis in ("rows", "cols"):
        for labels in browser.find_elements(By.CSS_SELECTOR, f"#focus .{axis}"):
            texts = [
                label.get_attribute("textContent") for label in labels.find_elements(By.CLASS_NAME, "label")
            ]
            assert texts == list(attention.tokens)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#focus .map")) == 3  # ours, reference, difference


def test_chinese_tokens_are_drawn_with_a_cjk_font(browser: WebDriver, report_page) -> None:
    """A CJK glyph is one em wide; the box drawn for a missing glyph is about a third of that."""
    path, _, attention = report_page
    visit(browser, path)
    measured = browser.execute_script(
        "return [...document.querySelectorAll('#tokens .tok')].map(e => "
        "[e.textContent, e.getBoundingClientRect().width, parseFloat(getComputedStyle(e).fontSize)])"
    )
    chinese = [(text, width, size) for text, width, size in measured if all(_is_wide(c) for c in text)]
    assert [text for text, _, _ in chinese] == [t for t in attention.tokens if t and all(map(_is_wide, t))]
    assert chinese, "the test data must hold Chinese tokens"
    for text, width, size in chinese:
        assert 0.9 <= width / (len(text) * size) <= 1.1, (text, width, size)


def _is_wide(character: str) -> bool:
    return unicodedata.east_asian_width(character) == "W"


def test_clicking_a_head_shows_it_large_and_hovering_names_query_and_key(
    browser: WebDriver, report_page
) -> None:
    path, _, attention = report_page
    visit(browser, path)
    layer, head = 0, 2  # the page opens on layer 1 (where the maps differ): pick one elsewhere
    browser.find_element(By.CSS_SELECTOR, f"#attention-layer-{layer} > summary").click()
    browser.find_element(By.CSS_SELECTOR, f'button.head[data-layer="{layer}"][data-head="{head}"]').click()
    title = browser.find_element(By.CSS_SELECTOR, "#focus .focus-title").text
    assert title.startswith(f"Layer {layer}, head {head}")
    ours = browser.find_element(By.CSS_SELECTOR, "#focus .map")
    assert f"s{layer}o" in ours.get_attribute("class").split()

    query, key = attention.seq_len - 1, 1
    cell = ours.size["width"] / attention.seq_len
    offset_x = (key + 0.5) * cell - ours.size["width"] / 2  # selenium offsets are from the centre
    offset_y = (query + 0.5) * cell - ours.size["height"] / 2
    ActionChains(browser).move_to_element_with_offset(ours, int(offset_x), int(offset_y)).perform()
    hover = browser.find_element(By.CSS_SELECTOR, "#focus .hover").text
    assert f"query {query} “{attention.tokens[query]}”" in hover
    assert f"key {key} “{attention.tokens[key]}”" in hover
    highlighted = browser.find_elements(By.CSS_SELECTOR, "#focus .rows .label.hi")
    assert [label.get_attribute("textContent") for label in highlighted] == [attention.tokens[query]] * 3


def test_the_large_view_names_layers_by_the_model_s_numbers(browser: WebDriver, tmp_path: Path) -> None:
    """A comparison of layers 5-6 only: the page's first map is the model's layer 5."""
    import dataclasses

    attention = dataclasses.replace(synthetic_attention(2, 3, causal=True, bug_layer=1), first_layer=5)
    path = tmp_path / "range.html"
    path.write_text(render_html(synthetic_report(7), attention=attention), encoding="utf-8")
    visit(browser, path)
    assert browser.find_element(By.CSS_SELECTOR, "#focus .focus-title").text.startswith("Layer 6, head")
    browser.find_element(By.CSS_SELECTOR, "#attention-layer-0 > summary").click()
    browser.find_element(By.CSS_SELECTOR, 'button.head[data-layer="0"][data-head="1"]').click()
    assert browser.find_element(By.CSS_SELECTOR, "#focus .focus-title").text.startswith("Layer 5, head 1")


def test_a_28_layer_16_head_page_opens_without_errors(browser: WebDriver, tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(30)] + ["我", "爱"]
    attention = synthetic_attention(28, 16, tokens, causal=True, bug_layer=20)
    report = synthetic_report(28, bug_at="layer.20.feed_forward")
    path = tmp_path / "large.html"
    path.write_text(render_html(report, attention=attention), encoding="utf-8")
    seen = visit(browser, path)
    assert seen.problems == [] and seen.foreign_requests == []
    assert not is_blank(element_pixels(browser, "#focus .map"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "button.head")) == 28 * 16


@pytest.fixture(scope="module")
def real_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A real comparison's page, written by ``hfmirror compare --html``: a tiny random decoder with a
    byte-level BPE tokenizer trained here, on Chinese and English text."""
    from click.testing import CliRunner

    from hfmirror.cli import cli
    from tests.test_compare_html import CORPUS, TEXTS
    from tests.test_compare_support import save_byte_level_tokenizer, save_random_decoder

    root = tmp_path_factory.mktemp("real-page")
    model = save_random_decoder(root / "qwen2", "qwen2", tokenizer=False, vocab_size=300)
    save_byte_level_tokenizer(model, CORPUS, vocab_size=300)
    page = root / "report.html"
    texts = [arg for text in TEXTS["decoder"] for arg in ("--text", text)]
    result = CliRunner().invoke(cli, ["compare", str(model), "--json", "--html", str(page), *texts])
    assert result.exit_code == 0, result.output
    return page, json.loads(result.stdout)


def test_a_real_comparisons_page_opens_offline_draws_and_logs_no_error(browser: WebDriver, real_page) -> None:
    path, data = real_page
    seen = visit(browser, path)
    assert seen.problems == []
    assert seen.foreign_requests == []
    assert not is_blank(seen.screenshot)
    assert not is_blank(element_pixels(browser, "#chart svg"))
    assert not is_blank(element_pixels(browser, "#focus .map"))
    real = sum(data["inputs"]["attention_mask"][0])
    tokens = data["inputs"]["token_labels"][0][:real]
    for labels in browser.find_elements(By.CSS_SELECTOR, "#focus .rows"):
        texts = [label.get_attribute("textContent") for label in labels.find_elements(By.CLASS_NAME, "label")]
        assert texts == tokens
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#tokens .tok')].map(e => e.getBoundingClientRect().width)"
    )
    assert len(shown) == real and min(shown) > 0  # every token drawn, the Chinese ones too


# ----------------------------------------------------------------- the checks catch what they guard


def _with_remote_font(page: str) -> str:
    return page.replace(
        "</style>",
        "body{font-family:x;}@font-face{font-family:x;src:url(http://127.0.0.1:9/x.woff2)}</style>",
        1,
    )


def _without_policy(page: str) -> str:
    start = page.index('<meta http-equiv="Content-Security-Policy"')
    return page[:start] + page[page.index(">", start) + 1 :]


BROKEN_PAGES = {
    # A web font slipped into our page: the page's policy refuses it, and says so in the log.
    "remote font": (lambda page: _with_remote_font(page), "problems"),
    # The same without the policy: the browser asks for it, and the request is seen.
    "remote font, no policy": (lambda page: _with_remote_font(_without_policy(page)), "foreign_requests"),
    "script error": (
        lambda page: "<!DOCTYPE html><p>text</p><script>undefinedFunction()</script>",
        "problems",
    ),
    "blank": (lambda page: "<!DOCTYPE html><body style='background:#fff'></body>", "blank"),
}


@pytest.mark.parametrize("case", list(BROKEN_PAGES))
def test_each_check_catches_the_failure_it_guards(
    browser: WebDriver, report_page, tmp_path: Path, case: str
) -> None:
    path, _, _ = report_page
    make, caught_by = BROKEN_PAGES[case]
    broken = tmp_path / "broken.html"
    broken.write_text(make(path.read_text(encoding="utf-8")), encoding="utf-8")
    seen = visit(browser, broken)
    if caught_by == "blank":
        assert is_blank(seen.screenshot)
    else:
        assert getattr(seen, caught_by), f"{case}: not caught; log {seen.log}, requests {seen.requests}"
