"""The attention part of the HTML report: the maps' input type, and the section that shows them.

For the first input text, every layer's every head is shown three times (ours, the reference's,
their difference) as small pictures, and one head at a time large, with the tokens as row (query)
and column (key) labels; compare/html_report.js builds the large view and follows the mouse.

Size and speed at 28 layers x 16 heads (448 heads, 1,344 pictures): each layer's heads are one PNG
strip per kind (see compare.html_figures), written once into a CSS rule; a head's picture is a
window onto its strip. Layers are closed ``<details>`` except the one shown large, so the browser
decodes and draws a layer's pictures only when it is opened.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from hfmirror.errors import CompareError

__all__ = ["MAX_DRAWN_CELLS", "AttentionMaps", "attention_section", "drawn_token_limit"]

# The most (query, key) cells drawn per kind of picture (ours, reference, difference), over all layers
# and heads, so that a page stays under 5 MB even for random attention, the worst case for PNG (the
# tests check a 28-layer, 16-head page, drawn at this budget, against that bound).
MAX_DRAWN_CELLS = 1_300_000


def drawn_token_limit(layers: int, heads: int, cells: int = MAX_DRAWN_CELLS) -> int:
    """The most tokens whose maps fit ``cells``: layers x heads x n^2 <= cells (at least 1)."""
    return max(1, math.isqrt(cells // max(1, layers * heads)))


def _e(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _json_for_script(value: Any) -> str:
    """JSON that cannot end the <script> element it sits in, whatever the tokens contain."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# -------------------------------------------------------------------------------------------- input


@dataclass(frozen=True)
class AttentionMaps:
    """Attention weights for one input text, ours and the reference's, for every layer.

    ``ours[layer]`` and ``reference[layer]`` are arrays of shape (heads, T, T): the softmax output of
    each head, row = query position, column = key position, each row summing to 1. ``tokens`` has
    the T token strings as a person should read them (for byte-level tokenizers, decode each id
    rather than showing the raw ``Ġ``-prefixed pieces) with padding removed: T is the real length of
    the text. ``causal``: the model is a decoder, so a query never looks at a later key.
    """

    tokens: Sequence[str]
    ours: Sequence[np.ndarray]
    reference: Sequence[np.ndarray]
    causal: bool
    text: str | None = None  # the input text itself, shown above the tokens
    notes: tuple[str, ...] = ()  # said under the tokens (e.g. that only the first tokens are drawn)
    first_layer: int = 0  # the model's number of ours[0] (a comparison of layers 20-23 starts at 20)

    def __post_init__(self) -> None:
        # Frozen, so the normalised copies are set through object.__setattr__.
        object.__setattr__(self, "tokens", tuple(str(token) for token in self.tokens))
        object.__setattr__(self, "ours", tuple(np.asarray(a, dtype=np.float64) for a in self.ours))
        object.__setattr__(self, "reference", tuple(np.asarray(a, dtype=np.float64) for a in self.reference))
        _check_attention(self)

    @property
    def num_layers(self) -> int:
        return len(self.ours)

    @property
    def seq_len(self) -> int:
        return len(self.tokens)

    def difference(self, layer: int) -> np.ndarray:
        """ours - reference for one layer, (heads, T, T)."""
        return self.ours[layer] - self.reference[layer]


def _check_attention(maps: AttentionMaps) -> None:
    """Shapes must agree with each other and with the tokens; values must be finite."""
    seq = len(maps.tokens)
    if seq == 0:
        raise CompareError("attention maps need at least one token")
    if len(maps.ours) != len(maps.reference) or not maps.ours:
        raise CompareError(
            f"attention maps: {len(maps.ours)} layers of ours, {len(maps.reference)} of the reference"
        )
    for layer, (ours, theirs) in enumerate(zip(maps.ours, maps.reference, strict=True)):
        if ours.ndim != 3 or ours.shape[0] == 0 or ours.shape[1:] != (seq, seq) or ours.shape != theirs.shape:
            raise CompareError(
                f"attention maps of layer {layer}: ours {list(ours.shape)}, reference {list(theirs.shape)}; "
                f"expected (heads, {seq}, {seq}) for {seq} tokens"
            )
        if not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
            raise CompareError(f"attention maps of layer {layer} hold NaN or infinity")


# ------------------------------------------------------------------------------------------ section


def _thumbnail_px(seq_len: int) -> int:
    """A head's thumbnail side: whole screen pixels per cell up to ~72 px, at most 96 px."""
    return seq_len * max(1, round(72 / seq_len)) if seq_len <= 96 else 96


def _focus_cell_px(seq_len: int) -> int:
    """Cell size of the large view: about 340 px a map (three fit side by side), 4 to 20 px a cell."""
    return max(4, min(20, 340 // seq_len))


def _difference_limit(attention: AttentionMaps, atol: float) -> float:
    """The difference colour scale's end: the largest |ours - ref| anywhere, but at least atol, so
    that rounding far below the tolerance shows as (almost) white rather than as loud noise."""
    largest = max(float(np.abs(attention.difference(layer)).max()) for layer in range(attention.num_layers))
    return max(largest, atol)


def _head_differences(attention: AttentionMaps) -> list[list[float]]:
    """max |ours - ref| per layer, per head."""
    return [
        np.abs(attention.difference(layer)).max(axis=(1, 2)).tolist() for layer in range(attention.num_layers)
    ]


def attention_section(
    attention: AttentionMaps | None, figures: ModuleType, *, atol: float, stage_links: Mapping[int, str]
) -> str:
    """The page's attention section: tokens, colour legends, the large view, and every layer's heads.

    Args:
        attention: the maps, or None (the section then says there are none).
        figures: compare.html_figures (passed in, so that only rendering imports matplotlib).
        atol: the comparison's absolute tolerance (the difference colour scale never ends below it).
        stage_links: layer -> the page anchor of its attention stage's table row, where there is one.
    """
    if attention is None:
        return (
            '<section id="attention"><h2>Attention</h2>'
            "<p>No attention maps were recorded for this comparison.</p></section>"
        )
    differences = _head_differences(attention)
    focus = _most_different_head(differences)
    probability = figures.probability_scale()
    difference = figures.difference_scale(_difference_limit(attention, atol))
    data = {
        "tokens": list(attention.tokens),
        "causal": attention.causal,
        "heads": [len(row) for row in differences],
        "differences": differences,
        "focus": list(focus),
        "focusCell": _focus_cell_px(attention.seq_len),
        "firstLayer": attention.first_layer,
    }
    layers = "\n".join(
        _layer_section(
            layer,
            differences[layer],
            atol=atol,
            is_open=focus[0] == layer,
            number=attention.first_layer + layer,
            link=stage_links.get(attention.first_layer + layer),
        )
        for layer in range(attention.num_layers)
    )
    return f"""<section id="attention" style="--t:{_thumbnail_px(attention.seq_len)}px">
<h2>Attention, layer by layer</h2>
{_text_and_tokens(attention)}
{_legends(probability, difference, attention.causal, figures)}
<style>{_strip_styles(attention, probability, difference, figures)}</style>
<script type="application/json" id="attention-data">{_json_for_script(data)}</script>
<div id="focus" class="focus" aria-live="polite"></div>
<p class="layer-buttons"><button type="button" id="open-all">open every layer</button>
<button type="button" id="close-all">close every layer</button></p>
{layers}
</section>"""


def _most_different_head(differences: list[list[float]]) -> tuple[int, int]:
    """(layer, head) whose maps differ most from the reference's: the large view's first head."""
    heads = [(layer, head) for layer, row in enumerate(differences) for head in range(len(row))]
    return max(heads, key=lambda lh: differences[lh[0]][lh[1]])


def _text_and_tokens(attention: AttentionMaps) -> str:
    text = f'<p>The first input text: <q lang="und">{_e(attention.text)}</q></p>' if attention.text else ""
    items = "".join(
        f'<li><span class="tok" lang="und">{_e(token)}</span><sub>{index}</sub></li>'
        for index, token in enumerate(attention.tokens)
    )
    notes = "".join(f'<p class="note">{_e(note)}</p>' for note in attention.notes)
    return f"""{text}<p>The rows and columns of every map are these {attention.seq_len} tokens:</p>
<ol class="tokens" id="tokens">{items}</ol>{notes}"""


def _legends(probability: Any, difference: Any, causal: bool, figures: ModuleType) -> str:
    weights = figures.colour_legend_svg(probability, ticks=[0, 0.05, 0.2, 0.5, 1])
    diffs = figures.colour_legend_svg(difference)
    diffs_caption = f"difference (full colour: ±{difference.norm.vmax:.2e})"
    masked = '<p><span class="swatch masked"></span> forbidden by the causal mask</p>' if causal else ""
    return f"""<div class="legends">
{_legend_figure(weights, "colour scale of the attention weights, 0 to 1", "ours and reference")}
{_legend_figure(diffs, "colour scale of ours minus reference", diffs_caption)}
{masked}
</div>"""


def _legend_figure(svg: str, alt: str, caption: str) -> str:
    # As <img>, not inline: each SVG keeps its own ids, so they cannot collide with the chart's.
    source = _data_uri("image/svg+xml", svg.encode("utf-8"))
    return f'<figure><img src="{source}" alt="{_e(alt)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _strip_styles(attention: AttentionMaps, probability: Any, difference: Any, figures: ModuleType) -> str:
    """One CSS rule per layer and kind holding that layer's strip of maps (a PNG, as a data URI).

    Every head's picture is a window onto its layer's strip (background-position), so the bytes are
    on the page once, and the browser decodes a strip only when a layer is opened.
    """
    rules = []
    for layer in range(attention.num_layers):
        for kind, maps, scale in (
            ("o", attention.ours[layer], probability),
            ("r", attention.reference[layer], probability),
            ("d", attention.difference(layer), difference),
        ):
            png = figures.attention_strip_png(maps, scale, causal=attention.causal)
            rules.append(f".s{layer}{kind}{{background-image:url({_data_uri('image/png', png)})}}")
    return "\n".join(rules)


def _layer_section(
    layer: int, differences: list[float], *, atol: float, is_open: bool, number: int, link: str | None
) -> str:
    """One layer's heads, each as three thumbnails (ours, reference, difference); closed unless
    ``is_open``, so a large model's page opens without drawing hundreds of maps. A layer whose maps
    differ by more than atol is flagged in its summary line (a hint where to look, not a verdict:
    the pass rule applies to the stages). ``layer`` is its place on the page, ``number`` the model's."""
    heads = "\n".join(
        _head_button(layer, head, difference, number=number) for head, difference in enumerate(differences)
    )
    largest = max(differences)
    flag = " (more than atol)" if largest > atol else ""
    summary = f"layer {number}: {len(differences)} heads, largest |ours − reference| {largest:.2e}{flag}"
    stage = f' <a href="#{_e(link)}">Its attention stage in the table.</a>' if link else ""
    classes = "layer differs" if flag else "layer"
    return f"""<details class="{classes}" id="attention-layer-{layer}" style="--heads:{len(differences)}"\
{" open" if is_open else ""}>
<summary>{summary}</summary>
<p class="kinds">Each head: ours · reference · difference.{stage}</p>
<div class="heads">
{heads}
</div>
</details>"""


def _head_button(layer: int, head: int, difference: float, *, number: int) -> str:
    maps = "".join(f'<span class="map s{layer}{kind}"></span>' for kind in "ord")
    return (
        f'<button type="button" class="head" data-layer="{layer}" data-head="{head}" style="--h:{head}" '
        f'title="layer {number}, head {head}: max |ours − reference| {difference:.2e}">'
        f'{maps}<span class="head-label">head {head}</span></button>'
    )
