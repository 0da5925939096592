"""Synthetic material for the HTML report's tests (comparison reports and attention maps), and
helpers that read a page back.

The reports are made by the real code (``compare.metrics.compare_tensors`` on random tensors, then
``ComparisonReport.from_stages``), so their shape is exactly what the comparison produces. Attention
maps are softmaxes of random scores.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import torch
from bs4 import BeautifulSoup
from PIL import Image

from compare.html_report import AttentionMaps
from compare.metrics import NextTokenMetrics, compare_tensors
from compare.report import ComparisonReport

ATOL = RTOL = 1e-5

# Tokens a page must show as they are: Chinese, a leading space, word pieces, and markup that must
# stay text (a token is data from a tokenizer file, not HTML).
TOKENS = ["[CLS]", "我", "爱", "自然", "语言", " the", "cat", "##s", "<b>&amp;</b>", "</script>", "[SEP]"]
TEXT = "我爱自然语言 the cats <b>&amp;</b></script>"

BERT_LAYER_STAGES = ("attention", "attention_add_norm", "feed_forward", "output")


def stage_names(num_layers: int) -> list[str]:
    """Stage names in forward order, as compare.bert records them."""
    layers = [f"layer.{i}.{stage}" for i in range(num_layers) for stage in BERT_LAYER_STAGES]
    return ["embeddings", *layers, "last_hidden_state", "pooler"]


def synthetic_comparison(
    num_layers: int = 2,
    *,
    bug_at: str | None = None,
    carried_drift_at: str | None = None,
    next_token_and_origin: bool = False,
    dtype: str = "float32",
    seed: int = 0,
) -> ComparisonReport:
    """A comparison of ``num_layers`` BERT-style layers, every stage O(1) with float32-sized rounding
    noise, built as the comparison builds one (StageResult per stage, ``ComparisonReport.from_stages``).

    ``bug_at``: from this stage on, ours is off by ~1e-3 (carried); in isolation only that stage is.
    ``carried_drift_at``: from this stage on, ours is off by ~1e-3 carried only: in isolation it is not.
    ``next_token_and_origin``: next-token measures, the ids compared and the repo the checkpoint came from.
    """
    generator = torch.Generator().manual_seed(seed)
    names = stage_names(num_layers)
    bug_index = names.index(bug_at) if bug_at is not None else len(names)
    drift_index = names.index(carried_drift_at) if carried_drift_at is not None else len(names)
    stages = []
    for index, name in enumerate(names):
        reference = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
        noise = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64) * 1e-7 * (1 + index)
        bug = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64) * 1e-3
        carried = reference + noise + (bug if index >= min(bug_index, drift_index) else 0)
        alone = reference + noise / (1 + index) + (bug if index == bug_index else 0)
        stage = compare_tensors(name, carried, reference, atol=ATOL, rtol=RTOL)
        stage.isolated = compare_tensors(name, alone, reference, atol=ATOL, rtol=RTOL)
        stages.append(stage)
    inputs: dict[str, Any] = {"source": "text", "texts": [TEXT, "a second text"], "batch": 2}
    inputs["seq_len"] = len(TOKENS)
    extra: dict[str, Any] = {}
    if next_token_and_origin:
        ids = torch.randint(0, 100, (2, len(TOKENS)), generator=generator).tolist()
        inputs |= {"input_ids": ids, "attention_mask": [[1] * len(TOKENS)] * 2}
        extra["next_token"] = NextTokenMetrics(
            agreement=0.9375,
            kl_divergence_mean=3.25e-9,
            kl_divergence_max=1.5e-8,
            positions=2 * len(TOKENS),
            top1_ours=ids,
            top1_reference=ids,
        )
        extra |= {"repo_id": "tiny/bert-synthetic", "commit": "0123456789abcdef0123456789abcdef01234567"}
    return ComparisonReport.from_stages(
        stages,
        model="tiny/bert-synthetic",
        dtype=dtype,
        atol=ATOL,
        rtol=RTOL,
        versions={"torch": "2.13.0", "transformers": "5.24.0", "python": "3.11.2"},
        reference="transformers AutoModel, eager attention, eval, no_grad, run one piece at a time",
        inputs=inputs,
        **extra,
    )


def synthetic_report(num_layers: int = 2, **options: Any) -> dict[str, Any]:
    """:func:`synthetic_comparison`'s JSON form, what the page is rendered from."""
    return synthetic_comparison(num_layers, **options).to_dict()


def synthetic_attention(
    num_layers: int = 2,
    heads: int = 4,
    tokens: list[str] | None = None,
    *,
    causal: bool = False,
    bug_layer: int | None = None,
    seed: int = 0,
) -> AttentionMaps:
    """Softmaxes of random scores; the reference's differ by rounding-sized noise, or, in
    ``bug_layer``, by scores scaled 10% wrong (as a wrong 1/sqrt(d) would)."""
    tokens = list(TOKENS if tokens is None else tokens)
    seq = len(tokens)
    rng = np.random.default_rng(seed)
    ours, reference = [], []
    for layer in range(num_layers):
        scores = rng.normal(scale=2.0, size=(heads, seq, seq))  # (heads, T, T)
        their_scores = scores * (1.1 if layer == bug_layer else 1.0) + rng.normal(
            scale=1e-7, size=scores.shape
        )
        ours.append(_softmax(scores, causal))
        reference.append(_softmax(their_scores, causal))
    return AttentionMaps(tokens=tokens, ours=ours, reference=reference, causal=causal, text=TEXT)


def _softmax(scores: np.ndarray, causal: bool) -> np.ndarray:
    seq = scores.shape[-1]
    if causal:
        future = np.triu(np.ones((seq, seq), dtype=bool), k=1)  # (T, T): a key after its query
        scores = np.where(future, -np.inf, scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)  # rows sum to 1


# ------------------------------------------------------------------------------- reading a page


def table_rows(soup: BeautifulSoup) -> dict[str, dict[str, str]]:
    """stage name -> {column header: cell text}, from the stage table."""
    table = soup.select_one("table.stages")
    headers = [th.get_text() for th in table.select("thead th")]
    rows = {}
    for tr in table.select("tbody tr"):
        cells = [cell.get_text() for cell in tr.find_all(["th", "td"])]
        rows[cells[0]] = dict(zip(headers, cells, strict=True)) | {"id": tr["id"], "class": tr["class"]}
    return rows


def header_facts(soup: BeautifulSoup) -> dict[str, str]:
    """The header's facts list: label -> text."""
    labels, values = soup.select("dl.facts dt"), soup.select("dl.facts dd")
    return {dt.get_text(): dd.get_text() for dt, dd in zip(labels, values, strict=True)}


NAMESPACE = re.compile(r'\sxmlns(:\w+)?="http://www\.w3\.org/[^"]*"')


def referenced_urls(page: str) -> list[str]:
    """Every src/href/url() target, also inside the SVG pictures carried as data URIs."""
    texts = [page] + [
        base64.b64decode(data).decode("utf-8")
        for data in re.findall(r"data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)", page)
    ]
    urls = []
    for text in texts:
        urls += re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
        urls += re.findall(r"""url\(\s*["']?([^"')]*)""", text)
    return urls


def page_strips(page: str) -> dict[str, Image.Image]:
    """CSS class -> the PNG strip its rule holds."""
    rules = re.findall(
        r"\.(s\d+[ord])\{background-image:url\(data:image/png;base64,([A-Za-z0-9+/=]+)\)\}", page
    )
    return {name: Image.open(io.BytesIO(base64.b64decode(data))) for name, data in rules}
