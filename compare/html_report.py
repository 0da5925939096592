"""The comparison as one self-contained HTML page: the verdict, the error down the depth, the stage
table, and every attention head's map for the first input text, ours beside the reference's.

The page needs nothing but itself: styles, the script and the pictures are inline, fonts are the
browser's own, and a Content-Security-Policy forbids any request (so a mistake here shows up as a
blocked load, not as a silent one). Pictures come from compare.html_figures (matplotlib, the
optional ``report`` extra, imported only when a page is rendered).

What the page is made from (compare.runner's results; nothing here runs a model):

- ``report``: ``ComparisonReport.to_dict()``: per stage its carried measurement and its
  ``isolated`` one; top level ``repo_id`` and ``commit`` when the checkpoint came from a cache, and
  any other number, or dict of numbers (``next_token``: agreement, KL divergence), as a header fact.
- ``attention``: an :class:`AttentionMaps` for the first input text.
- ``sources``: stage name -> where it is computed, as ``"compare/layers.py:123"`` text (see
  :func:`source_location`). A key may use ``{i}`` for the layer number (``"layer.{i}.attention"``).

Typical use, on a finished comparison (``compare_model_dir(..., keep_attention=True,
attention_cells=MAX_DRAWN_CELLS)`` for the maps, as ``hfmirror compare --html`` runs it)::

    from compare.html_report import write_report

    write_report("report.html", report)

or, from the parts: ``write_html("report.html", report.to_dict(), attention=maps, sources=sources)``.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hfmirror.errors import CompareError, StorageError

from .html_attention import AttentionMaps, _e, attention_section
from .report import _cosine_gap, _sci, float64_hint, stage_passes, stage_result, verdict_line

if TYPE_CHECKING:
    from .report import ComparisonReport

__all__ = [
    "AttentionMaps",
    "render_html",
    "source_location",
    "stage_anchor",
    "write_html",
    "write_report",
]

# Top-level keys of ComparisonReport.to_dict() that have a place of their own on the page.
_PLACED_KEYS = {
    "model", "passed", "max_abs_diff", "first_failing_stage", "dtype", "atol", "rtol", "versions",
    "inputs", "reference", "stages", "repo_id", "commit",
}  # fmt: skip


def source_location(obj: Callable[..., Any] | type, *, root: str | Path | None = None) -> str:
    """Where ``obj`` is defined, as ``"compare/layers.py:123"`` (relative to ``root``, default: the
    folder that holds the ``compare`` package), for the stage table's "computed in" column."""
    path = Path(inspect.getsourcefile(obj) or "")
    line = inspect.getsourcelines(obj)[1]
    base = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        shown = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        shown = path.name
    return f"{shown}:{line}"


# ------------------------------------------------------------------------------------------ public


def render_html(
    report: Mapping[str, Any],
    *,
    attention: AttentionMaps | None = None,
    sources: Mapping[str, str] | None = None,
) -> str:
    """The whole page as one string of HTML.

    Raises:
        CompareError: matplotlib (the ``report`` extra) is not installed.
    """
    figures = _import_figures()
    stages = list(report.get("stages") or [])
    sections = [
        _header(report),
        _how_to_read(report, attention),
        _error_chart(report, stages, figures),
        _stage_table(report, stages, sources or {}),
        attention_section(attention, figures, atol=report["atol"], stage_links=_attention_links(stages)),
    ]
    return _page(title=f"hfmirror compare: {report.get('model', '')}", body="\n".join(sections))


def write_html(
    path: str | Path,
    report: Mapping[str, Any],
    *,
    attention: AttentionMaps | None = None,
    sources: Mapping[str, str] | None = None,
) -> Path:
    """Render the page and write it to ``path`` (UTF-8). Returns the path written.

    Raises:
        StorageError: the file could not be written.
    """
    target = Path(path)
    page = render_html(report, attention=attention, sources=sources)
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as error:
        raise StorageError(f"cannot write the HTML report to {target}: {error.strerror or error}") from error
    return target


def write_report(path: str | Path, report: ComparisonReport) -> Path:
    """The page of a finished comparison: its JSON, its attention maps (when it kept them) and, for
    each stage, where our code computes it (the architecture's ``stage_functions``). Returns the path."""
    sources = {stage: source_location(function) for stage, function in report.stage_functions.items()}
    attention = report.attention.maps() if report.attention is not None else None
    return write_html(path, report.to_dict(), attention=attention, sources=sources)


# ----------------------------------------------------------------------------------------- helpers


def _attention_links(stages: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Layer -> the anchor of its ``layer.{i}.attention`` row, for the layers that have one."""
    links = {}
    for stage in stages:
        match = re.fullmatch(r"layer\.(\d+)\.attention", stage["name"])
        if match:
            links[int(match.group(1))] = stage_anchor(stage["name"])
    return links


def _import_figures() -> ModuleType:
    try:
        from . import html_figures
    except ImportError as error:
        raise CompareError(
            f"the HTML report needs matplotlib ({error.name} is missing): pip install 'hfmirror[report]'"
        ) from error
    return html_figures


def stage_anchor(name: str) -> str:
    """The id of a stage's table row: ``stage-`` and the name with anything unusual replaced."""
    return "stage-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def _source_for(name: str, sources: Mapping[str, str]) -> str | None:
    """The stage's source location: its exact name first, then the name with its layer as ``{i}``."""
    if name in sources:
        return sources[name]
    return sources.get(re.sub(r"^layer\.\d+\.", "layer.{i}.", name))


def _asset(name: str) -> str:
    return resources.files("compare").joinpath(name).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------- page


def _page(*, title: str, body: str) -> str:
    script = _asset("html_report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    # Nothing may be fetched; only our own script (by its hash) may run. Inline styles are allowed
    # because the maps are positioned by style attributes.
    policy = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_asset("html_report.css")}</style>
</head>
<body>
<main>
{body}
</main>
<script>{script}</script>
</body>
</html>
"""


# ----------------------------------------------------------------------------------------- header


def _header(report: Mapping[str, Any]) -> str:
    verdict_class = "pass" if report.get("passed") else "fail"
    facts = [
        ("model", _model_line(report)),
        ("reference", _e(report.get("reference", ""))),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()))),
        ("dtype", _e(report.get("dtype", ""))),
        (
            "tolerance",
            f"atol={report['atol']:g}, rtol={report['rtol']:g}: a stage passes when "
            "|ours − reference| ≤ atol + rtol·|reference| at every element",
        ),
        ("input", _inputs_line(report.get("inputs") or {})),
        *_other_measures(report),
    ]
    rows = "\n".join(f"<dt>{_e(key)}</dt><dd>{value}</dd>" for key, value in facts)
    hint = float64_hint(report)
    return f"""<header>
<h1>hfmirror compare: {_e(report.get("model", ""))}</h1>
<p class="verdict {verdict_class}" id="verdict">{_e(verdict_line(report))}</p>
{f'<p class="hint" id="hint">{_e(hint)}</p>' if hint else ""}
<dl class="facts">
{rows}
</dl>
</header>"""


def _model_line(report: Mapping[str, Any]) -> str:
    line = _e(report.get("model", ""))
    if report.get("repo_id"):
        line += f" (repo <code>{_e(report['repo_id'])}</code>"
        if report.get("commit"):
            line += f" at commit <code>{_e(report['commit'])}</code>"
        line += ")"
    return line


def _inputs_line(inputs: Mapping[str, Any]) -> str:
    """Scalars as key=value; texts listed; long lists (the ids compared) left to the JSON."""
    parts = []
    for key, value in inputs.items():
        if key == "texts":
            continue
        if isinstance(value, list):
            parts.append(f"{_e(key)}: in the JSON")
        else:
            parts.append(f"{_e(key)}={_e(value)}")
    line = ", ".join(parts)
    texts = inputs.get("texts") or []
    if texts:
        items = "".join(f"<li lang='und'>{_e(text)}</li>" for text in texts)
        line += f'<ol class="texts">{items}</ol>'
    return line


def _other_measures(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Top-level numbers the page has no special place for (next-token agreement, KL, ...)."""
    measures = []
    for key, value in report.items():
        if key in _PLACED_KEYS:
            continue
        if isinstance(value, Mapping):
            shown = [f"{_e(k)}: {_e(_format_value(v))}" for k, v in value.items() if _is_scalar(v)]
            if shown:
                measures.append((key.replace("_", " "), ", ".join(shown)))
        elif _is_scalar(value):
            measures.append((key.replace("_", " "), _e(_format_value(value))))
    return measures


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _format_value(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


# ---------------------------------------------------------------------------------- how to read


def _how_to_read(report: Mapping[str, Any], attention: AttentionMaps | None) -> str:
    causal = (
        "<li>This model is <b>causal</b> (a decoder): a token may only look at itself and the tokens "
        "before it, so every map is a lower triangle; the grey cells above the diagonal are the ones "
        "the causal mask forbids.</li>"
        if attention is not None and attention.causal
        else ""
    )
    return f"""<section id="how-to-read">
<h2>How to read this</h2>
<ul>
<li>Our from-scratch model and the <code>transformers</code> reference ran on the same weights and
the same input. A <b>stage</b> is one intermediate result (the embeddings, a layer's attention output,
...). Each stage's difference is measured element by element: a stage passes when
|ours − reference| ≤ atol + rtol·|reference| everywhere (here atol={report["atol"]:g},
rtol={report["rtol"]:g}). Rounding alone gives small differences; a bug gives a jump.</li>
<li><b>Carried</b> error is what you see when our model runs from the start: a stage inherits every
earlier stage's error. <b>Isolated</b> error (when shown) is the stage's own: our component fed the
reference's exact input to it. A real bug shows as a jump in the isolated error at the stage that has
it; honest rounding grows slowly in the carried error and stays small in isolation.</li>
<li>The <b>chart</b> shows the largest difference of each stage down the depth of the model, on a log
scale (each grid line is 10× the one below). Red points are outside the tolerance; click a point to
find its row in the table.</li>
<li>An <b>attention map</b> shows, for one head, how much each token (a row: the <i>query</i>) looks
at every token (a column: the <i>key</i>). A row is a weighted look at the keys: its weights are
≥ 0 and add up to 1, and the head's output for that token is the values mixed with those weights.
Bright cells are large weights.</li>
{causal}
<li>Each head is shown three times: <b>ours</b>, the <b>reference</b>'s, and their <b>difference</b>
(white where they agree; red where ours is larger, blue where it is smaller). Click a head to see it
large, with the tokens beside it; hover a cell to read which query looks at which key.</li>
</ul>
</section>"""


# ------------------------------------------------------------------------------------- error chart


def _error_chart(report: Mapping[str, Any], stages: list[Mapping[str, Any]], figures: ModuleType) -> str:
    if not stages:
        return '<section id="chart"><h2>Error down the depth</h2><p>No stages were compared.</p></section>'
    names = [stage["name"] for stage in stages]
    isolated = [stage.get("isolated") or {} for stage in stages]  # {} for a stage only one side has
    series = [
        figures.ErrorSeries(
            "carried", [s.get("max_abs_diff") for s in stages], [bool(s.get("passed")) for s in stages]
        ),
        figures.ErrorSeries(
            "isolated",
            [i.get("max_abs_diff") for i in isolated],
            [bool(i.get("passed", True)) for i in isolated],
            isolated=True,
        ),
    ]
    svg = figures.error_chart_svg(
        names,
        series,
        atol=report["atol"],
        allowance=[_allowance(stage, report["atol"], report["rtol"]) for stage in stages],
        first_failing=report.get("first_failing_stage"),
        links=["#" + stage_anchor(name) for name in names],
    )
    return f"""<section id="chart">
<h2>Error down the depth</h2>
<figure class="chart">{svg}</figure>
</section>"""


def _allowance(stage: Mapping[str, Any], atol: float, rtol: float) -> float | None:
    """atol + rtol * max|ref|, with max|ref| recovered as max_abs_diff / rel_error; None if unknown."""
    max_abs, rel = stage.get("max_abs_diff"), stage.get("rel_error")
    if max_abs is None or not rel:
        return None
    return atol + rtol * (max_abs / rel)


# ------------------------------------------------------------------------------------- stage table


def _stage_columns() -> list[tuple[str, Callable[[Mapping[str, Any]], str]]]:
    """(header, cell text) per column: the stage's own fields are its carried measurement, then its
    isolated one ("-" for a stage that only one side produced)."""
    return [
        ("shape", lambda s: "×".join(str(n) for n in s.get("shape") or []) or "-"),
        ("carried max abs diff", lambda s: _sci(s.get("max_abs_diff"))),
        ("carried mean abs diff", lambda s: _sci(s.get("mean_abs_diff"))),
        ("carried rel error", lambda s: _sci(s.get("rel_error"))),
        ("carried 1 − cosine", lambda s: _cosine_gap(s.get("cosine_similarity"))),
        ("carried budget used", lambda s: _sci(s.get("tolerance_used"))),
        ("carried NMSE", lambda s: _sci(s.get("nmse"))),
        ("carried p99 abs diff", lambda s: _sci(s.get("p99_abs_diff"))),
        ("isolated max abs diff", lambda s: _sci((s.get("isolated") or {}).get("max_abs_diff"))),
        ("isolated 1 − cosine", lambda s: _cosine_gap((s.get("isolated") or {}).get("cosine_similarity"))),
        ("isolated result", lambda s: _result((s.get("isolated") or {}).get("passed"))),
    ]


def _result(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def _stage_table(
    report: Mapping[str, Any], stages: list[Mapping[str, Any]], sources: Mapping[str, str]
) -> str:
    columns = _stage_columns()
    headers = "".join(f"<th>{_e(title)}</th>" for title, _ in columns)
    first = report.get("first_failing_stage")
    rows = "\n".join(_stage_row(stage, report["dtype"], columns, sources, first) for stage in stages)
    return f"""<section id="stages">
<h2>Stage by stage</h2>
<p>"budget used" is the largest |ours − reference| / (atol + rtol·|reference|): 1 is the limit.
"result" is the stage's verdict (the one at the top of the page). "computed in" is where our model
computes the stage.</p>
<div class="table-wrap"><table class="stages">
<thead><tr><th>stage</th>{headers}<th>result</th><th>computed in</th></tr></thead>
<tbody>
{rows}
</tbody>
</table></div>
</section>"""


def _stage_row(
    stage: Mapping[str, Any],
    dtype: str,
    columns: list[tuple[str, Callable[[Mapping[str, Any]], str]]],
    sources: Mapping[str, str],
    first_failing: str | None,
) -> str:
    name = stage["name"]
    verdict = "pass" if stage_passes(stage, dtype) else "fail"
    classes = [verdict] + (["first"] if name == first_failing else [])
    cells = "".join(f'<td class="num">{_e(cell(stage))}</td>' for _, cell in columns)
    result = stage_result(stage, dtype)
    source = _source_for(name, sources)
    where = f"<code>{_e(source)}</code>" if source else "-"
    return (
        f'<tr id="{_e(stage_anchor(name))}" class="{" ".join(classes)}"><th scope="row">{_e(name)}</th>'
        f'{cells}<td class="result">{_e(result)}</td><td class="source">{where}</td></tr>'
    )
