"""The HTML report's content, read back from the page and checked against the report it was made from.

Every expectation is derived from the input (the report dict, the attention maps), never written out:
the page is parsed with BeautifulSoup and each stage row, token, number and the verdict compared.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bs4 import BeautifulSoup

import compare
from compare import html_figures, layers
from compare.html_report import (
    AttentionMaps,
    render_html,
    source_location,
    stage_anchor,
    write_html,
)
from hfmirror.errors import CompareError
from tests.html_report_data import (
    NAMESPACE,
    TOKENS,
    header_facts,
    page_strips,
    referenced_urls,
    synthetic_attention,
    synthetic_comparison,
    synthetic_report,
    table_rows,
)

MB = 1_000_000


def parse(page: str) -> BeautifulSoup:
    return BeautifulSoup(page, "html.parser")


def sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


REPORTS = {
    "passing": lambda: synthetic_report(2),
    "failing": lambda: synthetic_report(3, bug_at="layer.1.feed_forward"),
    "failing, with next-token measures and its origin": lambda: synthetic_report(
        3, bug_at="layer.2.attention", next_token_and_origin=True
    ),
}


@pytest.fixture(params=list(REPORTS), scope="module")
def report(request: pytest.FixtureRequest) -> dict:
    return REPORTS[request.param]()


# -------------------------------------------------------------------------------------- the table


def test_every_stage_has_a_row_with_its_numbers_as_the_table_shows_them(report: dict) -> None:
    rows = table_rows(parse(render_html(report)))
    assert list(rows) == [stage["name"] for stage in report["stages"]]
    # The stage's own numbers are its carried measurement: labelled so beside the isolated ones.
    carried = "carried "
    for stage in report["stages"]:
        row = rows[stage["name"]]
        assert row["id"] == stage_anchor(stage["name"])
        assert row["shape"] == "×".join(map(str, stage["shape"]))
        assert row[f"{carried}max abs diff"] == sci(stage["max_abs_diff"])
        assert row[f"{carried}mean abs diff"] == sci(stage["mean_abs_diff"])
        assert row[f"{carried}rel error"] == sci(stage["rel_error"])
        assert row[f"{carried}1 − cosine"] == sci(max(1.0 - stage["cosine_similarity"], 0.0))
        assert row[f"{carried}budget used"] == sci(stage["tolerance_used"])
        # float32: the result, and the row's colour, are the stage's own (isolated) error's
        own = stage["isolated"]["passed"]
        assert row["result"].startswith("PASS" if own else "FAIL")
        assert ("carried FAIL" in row["result"]) == (own and not stage["passed"])
        assert ("fail" in row["class"]) == (not own)
        assert ("first" in row["class"]) == (stage["name"] == report["first_failing_stage"])


def test_a_stage_that_fails_only_carried_is_a_pass_in_float32_and_a_fail_in_float64() -> None:
    for dtype in ("float32", "float64"):
        report = synthetic_report(2, carried_drift_at="layer.1.attention", dtype=dtype)
        row = table_rows(parse(render_html(report)))["layer.1.attention"]
        assert not report["stages"][5]["passed"] and report["stages"][5]["isolated"]["passed"]
        if dtype == "float32":
            assert row["result"].split() == ["PASS", "(carried", "FAIL)"] and "pass" in row["class"]
        else:  # in float64 honest carried rounding stays far below the tolerance: this is a bug
            assert row["result"].split() == ["FAIL", "(carried", "FAIL,", "isolated", "PASS)"]
            assert "fail" in row["class"] and "first" in row["class"]


def test_the_nmse_p99_and_isolated_columns_hold_their_values() -> None:
    report = synthetic_report(3, bug_at="layer.2.attention", next_token_and_origin=True)
    rows = table_rows(parse(render_html(report)))
    for stage in report["stages"]:
        row, isolated = rows[stage["name"]], stage["isolated"]
        assert row["carried NMSE"] == sci(stage["nmse"])
        assert row["carried p99 abs diff"] == sci(stage["p99_abs_diff"])
        assert row["isolated max abs diff"] == sci(isolated["max_abs_diff"])
        assert row["isolated 1 − cosine"] == sci(max(1.0 - isolated["cosine_similarity"], 0.0))
        assert row["isolated result"] == ("PASS" if isolated["passed"] else "FAIL")


def test_a_stage_that_could_not_be_measured_shows_dashes_and_its_note() -> None:
    report = synthetic_report(1)
    stage = report["stages"][1]
    note = f"shape [2, 5, 9] != reference {stage['shape']}"
    stage.update(passed=False, max_abs_diff=None, mean_abs_diff=None, rel_error=None)
    stage.update(cosine_similarity=None, tolerance_used=None, note=note)
    stage["isolated"].update(passed=False, max_abs_diff=None, cosine_similarity=None, note=note)
    report.update(passed=False, first_failing_stage=stage["name"])
    row = table_rows(parse(render_html(report)))[stage["name"]]
    numbers = ("max abs diff", "mean abs diff", "rel error", "1 − cosine")
    assert [row[f"carried {c}"] for c in numbers] == ["-"] * 4
    assert [row[c] for c in ("isolated max abs diff", "isolated 1 − cosine")] == ["-"] * 2
    assert row["result"] == f"FAIL ({note})"  # the same note once, not once per measurement


def test_a_stage_only_one_side_produced_has_no_isolated_numbers() -> None:
    report = synthetic_report(1)
    stage = report["stages"][1]
    del stage["isolated"]  # as compare.streaming records a stage the reference does not have
    stage.update(passed=False, max_abs_diff=None, note="the reference has no such stage")
    row = table_rows(parse(render_html(report)))[stage["name"]]
    assert row["isolated max abs diff"] == row["isolated result"] == "-"
    assert row["result"] == "FAIL (the reference has no such stage)" and "fail" in row["class"]


def test_each_stage_shows_where_it_is_computed() -> None:
    report = synthetic_report(2)
    sources = {"embeddings": "compare/bert.py:40", "layer.{i}.attention": "compare/layers.py:158"}
    sources["layer.1.attention"] = "compare/layers.py:999"  # an exact name wins over the pattern
    rows = table_rows(parse(render_html(report, sources=sources)))
    assert rows["embeddings"]["computed in"] == sources["embeddings"]
    assert rows["layer.0.attention"]["computed in"] == sources["layer.{i}.attention"]
    assert rows["layer.1.attention"]["computed in"] == sources["layer.1.attention"]
    assert rows["layer.0.output"]["computed in"] == "-"


def test_source_location_names_the_file_and_the_line_of_the_definition() -> None:
    location = source_location(layers.MultiHeadSelfAttention.forward)
    path, line = location.rsplit(":", 1)
    assert path == "compare/layers.py"
    source_line = (Path(layers.__file__).read_text().splitlines())[int(line) - 1]
    assert source_line.strip().startswith("def forward(")


# ------------------------------------------------------------------------------ header and verdict


def verdict_text(page: str) -> str:
    return parse(page).select_one("#verdict").get_text()


def test_with_isolated_errors_the_verdict_blames_the_first_isolated_failure() -> None:
    report = synthetic_report(3, bug_at="layer.2.attention")
    carried = [s["name"] for s in report["stages"] if not s["passed"]]
    assert report["first_failing_stage"] == "layer.2.attention" and len(carried) > 1
    verdict = verdict_text(render_html(report))
    assert verdict.startswith("FAIL: first failing stage: layer.2.attention ")
    assert f"1 of {len(report['stages'])} stages outside" in verdict and "in isolation" in verdict
    assert f"atol={report['atol']:g}, rtol={report['rtol']:g}" in verdict
    assert f"{len(carried)} carried" in verdict


def test_a_passing_verdict_says_all_stages_match_and_the_largest_difference() -> None:
    report = synthetic_report(2)
    assert report["passed"]
    verdict = verdict_text(render_html(report))
    assert verdict.startswith(f"PASS: all {len(report['stages'])} stages match the reference")
    assert sci(report["max_abs_diff"]) in verdict


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_page_and_the_table_say_the_same_verdict(dtype: str) -> None:
    """Stages that fail only carried: in float32 the verdict is a PASS that counts them (and the page
    says so, not "all stages match" beside red rows); in float64 it is a FAIL that names the first."""
    comparison = synthetic_comparison(2, carried_drift_at="layer.1.attention", dtype=dtype)
    report = comparison.to_dict()
    carried = [s["name"] for s in report["stages"] if not s["passed"]]
    table_verdict = comparison.render_table().splitlines()[-1]
    soup = parse(render_html(report))
    assert soup.select_one("#verdict").get_text() == table_verdict
    if dtype == "float32":
        assert report["passed"] and table_verdict.startswith("PASS")
        assert f"{len(carried)} outside it carried" in table_verdict
        assert "pass" in soup.select_one("#verdict")["class"]
    else:
        assert not report["passed"] and report["first_failing_stage"] == carried[0] == "layer.1.attention"
        assert table_verdict.startswith(f"FAIL: first failing stage: {carried[0]} ")
        assert "in isolation and carried" in table_verdict
        assert "fail" in soup.select_one("#verdict")["class"]


def test_the_page_shows_the_verdict_in_its_colour(report: dict) -> None:
    verdict = parse(render_html(report)).select_one("#verdict")
    assert verdict.get_text().startswith("PASS" if report["passed"] else "FAIL")
    assert ("pass" if report["passed"] else "fail") in verdict["class"]


def test_the_header_shows_model_versions_dtype_tolerances_and_inputs(report: dict) -> None:
    soup = parse(render_html(report))
    facts = header_facts(soup)
    assert report["model"] in soup.select_one("h1").get_text()
    assert facts["reference"] == report["reference"]
    for name, version in report["versions"].items():
        assert f"{name} {version}" in facts["versions"]
    assert facts["dtype"] == report["dtype"]
    assert facts["tolerance"].startswith(f"atol={report['atol']:g}, rtol={report['rtol']:g}")
    assert [li.get_text() for li in soup.select("ol.texts li")] == report["inputs"]["texts"]
    for key in ("source", "batch", "seq_len"):
        assert f"{key}={report['inputs'][key]}" in facts["input"]


def test_the_header_shows_the_repo_commit_and_next_token_measures_when_present() -> None:
    report = synthetic_report(2, next_token_and_origin=True)
    page = render_html(report)
    soup = parse(page)
    facts = header_facts(soup)
    assert report["repo_id"] in facts["model"] and report["commit"] in facts["model"]
    next_token = report["next_token"]  # as ComparisonReport.to_dict() nests it
    assert f"agreement: {next_token['agreement']:.4g}" in facts["next token"]
    assert f"kl_divergence_mean: {next_token['kl_divergence_mean']:.2e}" in facts["next token"]
    assert f"positions: {next_token['positions']}" in facts["next token"]
    # The ids compared (and each position's top-1 token) stay in the JSON: long lists are not for the page.
    assert "input_ids: in the JSON" in facts["input"] and "top1" not in facts
    assert json.dumps(report["inputs"]["input_ids"][0])[1:-1] not in page


# ------------------------------------------------------------------------------------ error chart


def test_the_chart_links_every_point_to_its_row_and_marks_the_first_failure() -> None:
    report = synthetic_report(3, bug_at="layer.1.feed_forward")
    svg = parse(render_html(report)).select_one("#chart svg")
    links = [a["xlink:href"] for a in svg.find_all("a")]
    for stage in report["stages"]:
        # one point carried, one isolated
        assert links.count("#" + stage_anchor(stage["name"])) == 2
    assert f"first failing: {report['first_failing_stage']}" in svg.get_text()
    assert f"atol = {report['atol']:g}" in svg.get_text()


def test_the_chart_marks_failing_points_in_the_failure_colour() -> None:
    report = synthetic_report(3, bug_at="layer.1.feed_forward")
    svg = parse(render_html(report)).select_one("#chart svg")
    failing = {"#" + stage_anchor(s["name"]) for s in report["stages"] if not s["passed"]}

    def coloured_red(link: str) -> bool:
        point = svg.find("a", attrs={"xlink:href": link})
        return html_figures._FAIL_COLOUR in str(point)

    assert failing and all(coloured_red(link) for link in failing)
    assert not any(coloured_red("#" + stage_anchor(s["name"])) for s in report["stages"] if s["passed"])


def test_the_chart_draws_exact_zeros_and_leaves_out_what_was_not_measured() -> None:
    report = synthetic_report(2)
    exact, unmeasured = report["stages"][0], report["stages"][2]
    exact.update(max_abs_diff=0.0, mean_abs_diff=0.0, rel_error=0.0, tolerance_used=0.0)
    exact["isolated"].update(max_abs_diff=0.0, mean_abs_diff=0.0, rel_error=0.0)
    unmeasured.update(
        passed=False, max_abs_diff=None, rel_error=None, note="non-finite values (nan/inf) in ours"
    )
    unmeasured["isolated"].update(passed=False, max_abs_diff=None, rel_error=None)
    report.update(passed=False, first_failing_stage=unmeasured["name"])
    svg = parse(render_html(report)).select_one("#chart svg")
    links = [a["xlink:href"] for a in svg.find_all("a")]
    # drawn carried and isolated (at the floor of the log axis)
    assert links.count("#" + stage_anchor(exact["name"])) == 2
    assert "#" + stage_anchor(unmeasured["name"]) not in links
    assert f"first failing: {unmeasured['name']}" in svg.get_text()


def test_a_report_with_no_stages_says_so_instead_of_drawing() -> None:
    report = synthetic_report(1) | {"stages": [], "passed": False, "max_abs_diff": None}
    report["first_failing_stage"] = None
    soup = parse(render_html(report))
    assert soup.select_one("#verdict").get_text() == "FAIL: no stages were compared"
    assert not soup.select("#chart svg") and not soup.select("table.stages tbody tr")


# -------------------------------------------------------------------------------------- attention


def test_every_token_is_shown_in_order_as_text_never_as_markup() -> None:
    attention = synthetic_attention(2, 3)
    page = render_html(synthetic_report(2), attention=attention)
    soup = parse(page)
    assert [span.get_text() for span in soup.select("#tokens .tok")] == list(attention.tokens)
    assert json.loads(soup.select_one("#attention-data").string)["tokens"] == list(attention.tokens)
    # Tokens such as "<b>" and "</script>" are data: they must not become elements or end a script.
    assert not soup.select("#tokens b") and not soup.select("main b.tok, #tokens script")
    assert page.count("</script>") == len(soup.find_all("script"))


def test_every_layer_and_head_has_its_three_pictures() -> None:
    attention = synthetic_attention(3, 5)
    soup = parse(render_html(synthetic_report(3), attention=attention))
    sections = soup.select("details.layer")
    assert len(sections) == attention.num_layers
    for layer, section in enumerate(sections):
        heads = section.select("button.head")
        assert [int(b["data-head"]) for b in heads] == list(range(attention.ours[layer].shape[0]))
        for button in heads:
            pictures = [m["class"][1] for m in button.select(".map")]
            assert pictures == [f"s{layer}{kind}" for kind in "ord"]  # ours, reference, difference
        assert section.select_one(".kinds a")["href"] == "#" + stage_anchor(f"layer.{layer}.attention")


@pytest.mark.parametrize("causal", [False, True])
def test_the_pictures_hold_each_heads_weights_cell_by_cell(causal: bool) -> None:
    attention = synthetic_attention(2, 3, causal=causal, bug_layer=1)
    page = render_html(synthetic_report(2), attention=attention)
    strips = page_strips(page)
    assert sorted(strips) == sorted(f"s{layer}{kind}" for layer in range(2) for kind in "ord")
    scale = html_figures.probability_scale()
    seq = attention.seq_len
    for layer in range(attention.num_layers):
        for kind, maps in (("o", attention.ours[layer]), ("r", attention.reference[layer])):
            pixels = np.asarray(strips[f"s{layer}{kind}"])  # (T, heads*T) palette indices
            assert pixels.shape == (seq, maps.shape[0] * seq)
            for head in range(maps.shape[0]):
                cells = pixels[:, head * seq : (head + 1) * seq]
                expected = scale.indices(maps[head])
                if causal:  # the masked triangle is transparent (index 0), the rest is the data
                    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
                    assert (cells[future] == 0).all()
                    assert (cells[~future] == expected[~future]).all()
                else:
                    assert (cells == expected).all()


def test_rounding_far_below_the_tolerance_leaves_the_difference_pictures_white() -> None:
    report = synthetic_report(2)
    attention = synthetic_attention(2, 3)  # the reference differs by rounding only (~1e-8)
    largest = max(np.abs(attention.difference(layer)).max() for layer in range(2))
    assert 0 < largest < report["atol"] / 10
    page = render_html(report, attention=attention)
    white = int(html_figures.difference_scale(1.0).indices(np.zeros(1))[0])
    for layer in range(2):  # within a palette step or two of white: 1e-8 on a scale that ends at 1e-5
        assert (np.abs(np.asarray(page_strips(page)[f"s{layer}d"]).astype(int) - white) <= 2).all()
    assert f"difference (full colour: ±{report['atol']:.2e})" in parse(page).select_one(".legends").get_text()


def test_the_difference_picture_shows_where_ours_and_the_reference_differ() -> None:
    attention = synthetic_attention(2, 3, bug_layer=1)
    strips = page_strips(render_html(synthetic_report(2), attention=attention))
    white = html_figures.difference_scale(1.0).indices(np.zeros(1))[0]
    assert (np.asarray(strips["s0d"]) == white).all()  # rounding far below atol: all white
    assert (np.asarray(strips["s1d"]) != white).mean() > 0.5  # a 10% error in the scores: colour


def test_the_large_view_starts_on_the_head_that_differs_most() -> None:
    attention = synthetic_attention(3, 4, bug_layer=2)
    soup = parse(render_html(synthetic_report(3), attention=attention))
    data = json.loads(soup.select_one("#attention-data").string)
    differences = [np.abs(attention.difference(layer)).max(axis=(1, 2)) for layer in range(3)]
    layer, head = np.unravel_index(np.argmax(np.stack(differences)), (3, 4))
    assert data["focus"] == [layer, head]
    assert [d.has_attr("open") for d in soup.select("details.layer")] == [i == layer for i in range(3)]


def test_a_layer_whose_maps_differ_beyond_atol_is_flagged() -> None:
    report = synthetic_report(3)
    attention = synthetic_attention(3, 2, bug_layer=1)
    sections = parse(render_html(report, attention=attention)).select("details.layer")
    for layer, section in enumerate(sections):
        beyond = np.abs(attention.difference(layer)).max() > report["atol"]
        assert ("differs" in section["class"]) == beyond
        assert ("more than atol" in section.summary.get_text()) == beyond
    assert [("differs" in s["class"]) for s in sections] == [False, True, False]


def test_a_causal_model_is_explained_as_causal_and_an_encoder_is_not() -> None:
    report = synthetic_report(1)
    causal = parse(render_html(report, attention=synthetic_attention(1, 2, causal=True)))
    encoder = parse(render_html(report, attention=synthetic_attention(1, 2, causal=False)))
    assert "causal" in causal.select_one("#how-to-read").get_text()
    assert "causal" not in encoder.select_one("#how-to-read").get_text()
    assert causal.select(".swatch.masked") and not encoder.select(".swatch.masked")


def test_a_report_without_attention_maps_says_so() -> None:
    soup = parse(render_html(synthetic_report(1)))
    assert "No attention maps" in soup.select_one("#attention").get_text()
    assert not soup.select("details.layer")


@pytest.mark.parametrize(
    ("ours_shape", "reference_shape", "message"),
    [
        ((2, 11, 11), (2, 11, 10), "layer 0"),
        ((2, 10, 10), (2, 10, 10), f"for {len(TOKENS)} tokens"),
        ((0, 11, 11), (0, 11, 11), "expected (heads"),
    ],
)
def test_attention_maps_of_the_wrong_shape_are_refused(ours_shape, reference_shape, message) -> None:
    with pytest.raises(CompareError, match=re.escape(message)):
        AttentionMaps(
            tokens=TOKENS, ours=[np.zeros(ours_shape)], reference=[np.zeros(reference_shape)], causal=False
        )


def test_attention_maps_with_nan_are_refused() -> None:
    maps = np.full((1, len(TOKENS), len(TOKENS)), 1.0 / len(TOKENS))
    broken = maps.copy()
    broken[0, 3, 4] = np.nan
    with pytest.raises(CompareError, match="layer 1 hold NaN"):
        AttentionMaps(tokens=TOKENS, ours=[maps, maps], reference=[maps, broken], causal=False)


# -------------------------------------------------------------------------- self-contained, small


def test_the_page_references_nothing_outside_itself() -> None:
    report = synthetic_report(2, bug_at="layer.1.attention", next_token_and_origin=True)
    page = render_html(
        report, attention=synthetic_attention(2, 3, causal=True), sources={"embeddings": "x:1"}
    )
    urls = referenced_urls(page)
    assert urls, "the page has pictures and links; finding none means this test reads nothing"
    assert all(url.startswith(("data:", "#")) for url in urls), [
        u[:60] for u in urls if not u.startswith("data:")
    ]
    assert "@import" not in page and "@font-face" not in page
    # No address of any kind but the SVG namespaces (names, never fetched).
    assert not re.search(r"(https?:|ftp:|//[a-z0-9.-]+\.[a-z]{2,}/)", NAMESPACE.sub("", page), re.IGNORECASE)
    policy = parse(page).find("meta", attrs={"http-equiv": "Content-Security-Policy"})["content"]
    assert "default-src 'none'" in policy and "img-src data:" in policy


def test_a_28_layer_16_head_report_stays_under_5_mb() -> None:
    """448 heads x 3 pictures, 32 tokens of random attention (noise is the worst case for PNG)."""
    tokens = [f"tok{i}" for i in range(30)] + ["我", "爱"]
    attention = synthetic_attention(28, 16, tokens, bug_layer=20)
    report = synthetic_report(28, bug_at="layer.20.feed_forward")
    page = render_html(report, attention=attention)
    soup = parse(page)
    # All of it is there: the bound is not met by leaving maps or rows out.
    assert len(soup.select("button.head")) == 28 * 16
    assert len(page_strips(page)) == 28 * 3
    assert len(soup.select("table.stages tbody tr")) == len(report["stages"])
    assert len(page.encode("utf-8")) < 5 * MB


def test_write_html_writes_the_rendered_page(tmp_path: Path) -> None:
    report = synthetic_report(1)
    path = write_html(tmp_path / "report.html", report)
    assert path.read_text(encoding="utf-8") == render_html(report)


def test_without_matplotlib_rendering_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now fails
    monkeypatch.delitem(sys.modules, "compare.html_figures")  # so that it is imported afresh
    monkeypatch.delattr(compare, "html_figures")
    with pytest.raises(CompareError, match=r"needs matplotlib.*hfmirror\[report\]"):
        render_html(synthetic_report(1))


def test_importing_the_renderer_does_not_import_matplotlib() -> None:
    code = "import sys, compare.html_report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
