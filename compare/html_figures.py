"""The pictures of the HTML report, all drawn by matplotlib: the error chart, colour legends, attention maps.

Imported only when a report is rendered (matplotlib is the optional ``report`` extra). Nothing here
knows about HTML beyond returning SVG text or PNG bytes; compare.html_report lays them out.

Why two formats:

- the error chart is one figure with a few hundred points: SVG, small, sharp at any zoom, and its
  points link to the table rows;
- attention maps are many (ours, the reference's and the difference for every head of every layer):
  as matplotlib figures in SVG, with or without their token labels, a deep model's page would run to
  tens of megabytes. So the maps are PNG, one pixel per (query, key) cell, coloured by matplotlib's
  colour maps and saved as an 8-bit palette image, all of a layer's heads side by side in one strip.
  The page scales the pixels up without smoothing and puts the tokens beside them as HTML text (so
  Chinese tokens need a CJK font in the browser, not in matplotlib). tests/test_html_report.py
  checks that a 28-layer, 16-head page stays under 5 MB.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize, PowerNorm
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "ColourScale",
    "ErrorSeries",
    "attention_strip_png",
    "colour_legend_svg",
    "difference_scale",
    "error_chart_svg",
    "probability_scale",
]

# Palette index 0 is transparent (a cell a causal model may not attend to); 1..255 are colours.
_MASKED_INDEX = 0
_LEVELS = 255

# Colours shared with compare/html_report.css (pass green, fail red), so chart and table agree.
_PASS_COLOUR = "#1a7f37"
_FAIL_COLOUR = "#cf222e"
_ISOLATED_COLOUR = "#8250df"
_TOLERANCE_COLOUR = "#57606a"


# ------------------------------------------------------------------------------------ colour scales


@dataclass(frozen=True)
class ColourScale:
    """A matplotlib colour map with its normalisation, and what the legend should call it."""

    cmap: Colormap
    norm: Normalize
    label: str

    def palette(self) -> np.ndarray:
        """The 256 palette entries as (256, 3) uint8: index 0 unused (transparent), then the levels."""
        colours = self.cmap(np.linspace(0.0, 1.0, _LEVELS))[:, :3]  # (255, 3) floats in [0, 1]
        rgb = np.round(colours * 255).astype(np.uint8)
        return np.concatenate([np.zeros((1, 3), np.uint8), rgb])  # (256, 3)

    def indices(self, values: np.ndarray) -> np.ndarray:
        """Values -> palette indices 1..255 (uint8), clipped to the scale's range."""
        position = np.clip(np.asarray(self.norm(values), dtype=np.float64), 0.0, 1.0)
        return (1 + np.round(position * (_LEVELS - 1))).astype(np.uint8)


def probability_scale() -> ColourScale:
    """Attention weights, 0..1. The square-root scale keeps small weights visible: in a row of 30 keys
    an even spread is ~0.03 each, which a linear scale would paint almost black."""
    return ColourScale(colormaps["viridis"], PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0), "attention weight")


def difference_scale(limit: float) -> ColourScale:
    """ours - reference, symmetric around 0 (white): red where ours is larger, blue where smaller."""
    limit = limit if limit > 0 else 1.0  # an all-zero difference: any range shows it as white
    return ColourScale(colormaps["RdBu_r"], Normalize(vmin=-limit, vmax=limit), "ours - reference")


# -------------------------------------------------------------------------------------- attention


def attention_strip_png(maps: np.ndarray, scale: ColourScale, *, causal: bool) -> bytes:
    """One layer's maps, heads side by side, as a palette PNG with one pixel per (query, key) cell.

    ``maps`` is (heads, T, T): row = query position, column = key position. For a causal model the
    cells above the diagonal (a query looking at a later key, which the mask forbids) are left
    transparent, so the page's background shows the triangle the mask cuts away.
    """
    heads, seq, _ = maps.shape
    indices = scale.indices(maps)  # (heads, T, T) uint8
    if causal:
        future = np.triu(np.ones((seq, seq), dtype=bool), k=1)  # (T, T): key after query
        indices[:, future] = _MASKED_INDEX
    strip = indices.transpose(1, 0, 2).reshape(seq, heads * seq)  # (T, heads*T): head h at columns h*T..
    image = Image.fromarray(np.ascontiguousarray(strip), mode="P")
    image.putpalette(scale.palette().flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="png", optimize=True, transparency=_MASKED_INDEX)
    return buffer.getvalue()


def colour_legend_svg(scale: ColourScale, *, ticks: Sequence[float] | None = None) -> str:
    """A small horizontal colour bar for ``scale``, as SVG text."""
    from matplotlib.cm import ScalarMappable

    with _svg_style(salt="legend"):
        figure = Figure(figsize=(3.2, 0.62), layout="constrained")
        axes = figure.add_subplot()
        bar = figure.colorbar(
            ScalarMappable(norm=scale.norm, cmap=scale.cmap), cax=axes, orientation="horizontal"
        )
        if ticks is not None:
            bar.set_ticks(list(ticks))
        bar.ax.tick_params(labelsize=8)
        bar.set_label(scale.label, fontsize=8)
        return _to_svg(figure)


# ------------------------------------------------------------------------------------- error chart


@dataclass(frozen=True)
class ErrorSeries:
    """One line of the error chart: a value per stage (None: not measured), and which stages failed."""

    label: str
    values: list[float | None]
    passed: list[bool]
    isolated: bool = False  # drawn dashed, in its own colour


def error_chart_svg(
    stage_names: list[str],
    series: list[ErrorSeries],
    *,
    atol: float,
    allowance: list[float | None],
    first_failing: str | None,
    links: list[str],
) -> str:
    """Max |ours - ref| per stage on a log scale, down the depth of the model, as SVG text.

    Args:
        stage_names: the x axis, in forward order.
        series: carried (and, when measured, isolated) errors; failing points are drawn red.
        atol: drawn as a horizontal line: anything below it passes whatever |ref| is.
        allowance: per stage, atol + rtol * max|ref| (the most its largest element may differ), drawn
            as a step line; None where unknown.
        first_failing: the stage marked with a vertical line, or None.
        links: per stage, the page anchor its points link to ("#stage-...").
    """
    with _svg_style(salt="chart"):
        width = min(16.0, max(7.5, 4.0 + 0.07 * len(stage_names)))
        figure = Figure(figsize=(width, 3.6), layout="constrained")
        axes = figure.add_subplot()
        floor = _log_floor(series, atol, allowance)
        _shade_layers(axes, stage_names)
        _draw_tolerance(axes, atol, allowance)
        for line in series:
            _draw_series(axes, line, floor, links)
        if first_failing in stage_names:
            _mark_first_failing(axes, stage_names.index(first_failing), first_failing)
        _label_axes(axes, stage_names, floor)
        figure.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
        return _to_svg(figure)


def _log_floor(series: list[ErrorSeries], atol: float, allowance: list[float | None]) -> float:
    """Where exact zeros are drawn: a decade below the smallest positive value on the chart."""
    positive = [v for line in series for v in line.values if v is not None and v > 0]
    positive += [v for v in [atol, *allowance] if v is not None and v > 0]
    return 10 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-12


def _shade_layers(axes: Axes, stage_names: list[str]) -> None:
    """Alternate grey bands behind every other layer, so the eye can count down the depth."""
    for number, (start, end) in enumerate(_layer_spans(stage_names)):
        if number % 2 == 1:
            axes.axvspan(start - 0.5, end + 0.5, color="#f0f0f0", zorder=0, linewidth=0)


def _draw_tolerance(axes: Axes, atol: float, allowance: list[float | None]) -> None:
    if atol > 0:
        axes.axhline(atol, color=_TOLERANCE_COLOUR, linestyle="--", linewidth=1, label=f"atol = {atol:g}")
    if any(value is not None and value > atol for value in allowance):
        xs = np.arange(len(allowance))
        ys = np.array([np.nan if v is None else v for v in allowance], dtype=float)
        label = "atol + rtol·max|ref| (the most any element may differ)"
        axes.step(xs, ys, where="mid", color=_TOLERANCE_COLOUR, linestyle=":", linewidth=1, label=label)


def _draw_series(axes: Axes, line: ErrorSeries, floor: float, links: list[str]) -> None:
    """A line through the measured points; red markers where the stage failed, hollow ones at exact 0."""
    colour = _ISOLATED_COLOUR if line.isolated else "#0969da"
    style = "--" if line.isolated else "-"
    xs = np.arange(len(line.values))
    ys = np.array([np.nan if v is None else max(v, floor) for v in line.values], dtype=float)
    axes.plot(xs, ys, style, color=colour, linewidth=1.2, label=line.label, zorder=3)
    marker = "s" if line.isolated else "o"
    for failed in (False, True):
        chosen = [
            i
            for i, (v, ok) in enumerate(zip(line.values, line.passed, strict=True))
            if v is not None and ok != failed
        ]
        if not chosen:
            continue
        points = axes.scatter(
            xs[chosen],
            ys[chosen],
            marker=marker,
            s=22 if failed else 12,
            color=_FAIL_COLOUR if failed else colour,
            edgecolors="none",
            zorder=4,
            label=f"{line.label}: outside tolerance" if failed else None,
        )
        points.set_urls([links[i] for i in chosen])  # in SVG each point is a link to its table row
    exact = [i for i, v in enumerate(line.values) if v == 0]
    if exact:
        axes.scatter(
            xs[exact], ys[exact], marker=marker, s=30, facecolors="white", edgecolors=colour, zorder=5
        )


def _mark_first_failing(axes: Axes, index: int, name: str) -> None:
    axes.axvline(index, color=_FAIL_COLOUR, linewidth=1.5, zorder=2)
    axes.annotate(
        f"first failing: {name}",
        xy=(index, 0.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, 6),
        textcoords="offset points",
        color=_FAIL_COLOUR,
        fontsize=8,
    )


def _label_axes(axes: Axes, stage_names: list[str], floor: float) -> None:
    axes.set_yscale("log")
    axes.set_ylim(bottom=floor / 2)
    axes.set_xlim(-0.5, len(stage_names) - 0.5)
    axes.set_ylabel("max |ours − reference|", fontsize=9)
    axes.set_xlabel("stage, in forward order (exact zeros drawn hollow at the bottom)", fontsize=9)
    positions, labels = _tick_labels(stage_names)
    axes.set_xticks(positions, labels, rotation=60, ha="right", fontsize=7)
    axes.tick_params(axis="y", labelsize=8)
    axes.grid(axis="y", which="major", color="#d8dee4", linewidth=0.6)


_LAYER_STAGE = re.compile(r"^layer\.(\d+)\.")


def _layer_spans(stage_names: list[str]) -> list[tuple[int, int]]:
    """(first, last) stage index of each layer, in order, from names like ``layer.3.attention``."""
    spans: dict[str, list[int]] = {}
    for index, name in enumerate(stage_names):
        match = _LAYER_STAGE.match(name)
        if match:
            spans.setdefault(match.group(1), []).append(index)
    return [(indices[0], indices[-1]) for indices in spans.values()]


def _tick_labels(stage_names: list[str], most: int = 40) -> tuple[list[float], list[str]]:
    """Every stage that is not inside a layer, plus "layer i" in the middle of each layer's band.

    With many layers only every k-th layer is labelled, so at most ``most`` labels remain.
    """
    spans = _layer_spans(stage_names)
    step = max(1, math.ceil(len(spans) / most))
    ticks = [((start + end) / 2, f"layer {n}") for n, (start, end) in enumerate(spans) if n % step == 0]
    ticks += [(float(i), name) for i, name in enumerate(stage_names) if not _LAYER_STAGE.match(name)]
    ticks.sort()
    return [position for position, _ in ticks], [label for _, label in ticks]


# ------------------------------------------------------------------------------------ SVG plumbing


def _svg_style(*, salt: str) -> contextlib.AbstractContextManager[None]:
    """Text stays text (smaller, selectable, drawn in the browser's fonts) and ids are deterministic.

    Each figure gets its own salt so that the ids of two SVGs on one page never collide.
    """
    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"hfmirror-{salt}"})


def _to_svg(figure: Figure) -> str:
    """The figure as an ``<svg>`` element: no XML prolog or DOCTYPE (it goes inside HTML), no metadata."""
    buffer = io.StringIO()
    figure.savefig(
        buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None}
    )
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
