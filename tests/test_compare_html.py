"""``hfmirror compare --html`` on real comparisons, read back against the JSON of the same run.

The models are tiny random transformers models made here: an encoder (BERT, with its WordPiece
tokenizer) and a causal decoder (Qwen2, with a byte-level BPE tokenizer trained here, the kind
GPT-2's and Qwen's are), both fed Chinese text. Each page is written by the CLI (``--json --html``),
parsed with BeautifulSoup and checked: every stage, every token, the verdict, where each stage is
computed, the attention maps against transformers' own, and that it references nothing outside
itself. The browser's view of such a page is in tests/test_html_browser.py.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bs4 import BeautifulSoup
from click.testing import CliRunner

from compare import html_figures
from compare.architectures import REGISTRY
from compare.html_attention import MAX_DRAWN_CELLS, drawn_token_limit
from compare.html_report import source_location, stage_anchor
from compare.reference import LABELS_DECODED, LABELS_FROM_OFFSETS
from hfmirror.cli import cli
from tests.html_report_data import header_facts, page_strips, referenced_urls, table_rows
from tests.support import TINY_VOCAB
from tests.test_compare_support import save_byte_level_tokenizer, save_random_bert, save_random_decoder

REPO = Path(__file__).resolve().parents[1]

# What the byte-level tokenizer is trained on: few merges, so Chinese characters split across tokens.
CORPUS = ["the cat sat on the mat", "hello world", "我爱自然语言处理", "自然语言", "你好世界", "the cats sat"]
TEXTS = {
    "encoder": [
        "hello 世界 the cats",
        "the cat sat on the mat a dog ran",
    ],  # 世 and 界 are [UNK] to this vocabulary
    "decoder": ["我爱自然语言 the cats", "hello world, the cat sat on the mat: 你好世界"],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("html-models")
    decoder = save_random_decoder(
        root / "qwen2", "qwen2", seed=3, tokenizer=False, vocab_size=300, num_hidden_layers=3
    )
    save_byte_level_tokenizer(decoder, CORPUS, vocab_size=300)
    return {"encoder": save_random_bert(root / "bert", num_hidden_layers=3), "decoder": decoder}


def compare_html(model: str | Path, page: Path, *args: str) -> tuple[int, dict, str, str]:
    """``hfmirror compare MODEL --json --html PAGE ARGS``: (exit code, JSON, page, stderr)."""
    result = CliRunner().invoke(cli, ["compare", str(model), "--json", "--html", str(page), *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout), page.read_text(encoding="utf-8"), result.stderr


def sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def real_tokens(data: dict) -> int:
    return sum(data["inputs"]["attention_mask"][0])


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def run(request: pytest.FixtureRequest, models: dict[str, Path], tmp_path_factory) -> tuple:
    """One real comparison with text, written as JSON and as a page by the CLI."""
    kind = request.param
    page = tmp_path_factory.mktemp(f"page-{kind}") / "report.html"
    texts = [arg for text in TEXTS[kind] for arg in ("--text", text)]
    code, data, html, stderr = compare_html(models[kind], page, *texts)
    return kind, models[kind], code, data, html, stderr, page


def test_every_stage_and_the_verdict_are_the_json_s(run) -> None:
    kind, _, code, data, html, stderr, page = run
    assert code == 0 and data["passed"], data["first_failing_stage"]
    assert f"HTML report written to {page}" in stderr
    soup = BeautifulSoup(html, "html.parser")
    rows = table_rows(soup)
    assert list(rows) == [stage["name"] for stage in data["stages"]]
    for stage in data["stages"]:
        row = rows[stage["name"]]
        assert row["id"] == stage_anchor(stage["name"])
        assert row["carried max abs diff"] == sci(stage["max_abs_diff"])
        assert row["carried mean abs diff"] == sci(stage["mean_abs_diff"])
        assert row["carried budget used"] == sci(stage["tolerance_used"])
        assert row["carried NMSE"] == sci(stage["nmse"])
        assert row["carried p99 abs diff"] == sci(stage["p99_abs_diff"])
        assert row["isolated max abs diff"] == sci(stage["isolated"]["max_abs_diff"])
        assert row["isolated result"] == ("PASS" if stage["isolated"]["passed"] else "FAIL")
        # float32: the result is the stage's own (isolated) error's; a carried failure is named
        assert row["result"].startswith("PASS" if stage["isolated"]["passed"] else "FAIL")
        assert ("carried FAIL" in row["result"]) == (stage["isolated"]["passed"] and not stage["passed"])
    verdict = soup.select_one("#verdict")
    assert "pass" in verdict["class"]
    assert verdict.get_text().startswith(f"PASS: all {len(data['stages'])} stages match")
    assert f"carried max abs diff {sci(data['max_abs_diff'])}" in verdict.get_text()
    facts = header_facts(soup)
    assert facts["dtype"] == data["dtype"] == "float32"
    assert facts["tolerance"].startswith(f"atol={data['atol']:g}, rtol={data['rtol']:g}")
    assert facts["reference"] == data["reference"]
    assert all(f"{name} {version}" in facts["versions"] for name, version in data["versions"].items())
    assert [li.get_text() for li in soup.select("ol.texts li")] == TEXTS[kind]


def test_every_token_of_the_first_text_is_shown_as_it_reads(run) -> None:
    kind, _, _, data, html, _, _ = run
    soup = BeautifulSoup(html, "html.parser")
    real = real_tokens(data)
    labels = data["inputs"]["token_labels"][0]
    assert len(labels) == len(data["inputs"]["input_ids"][0]) and real < len(labels)  # padded row
    shown = [span.get_text() for span in soup.select("#tokens .tok")]
    assert shown == labels[:real]  # every real token, no padding
    assert json.loads(soup.select_one("#attention-data").string)["tokens"] == labels[:real]
    assert data["inputs"]["token_labels_from"] == LABELS_FROM_OFFSETS
    # Independently of how they were made: each label is the text itself, or a special token's name;
    # and no character of the text is lost, Chinese included.
    text, pieces = TEXTS[kind][0], data["inputs"]["tokens"][0][:real]
    special = {"[CLS]", "[SEP]", "<|endoftext|>"}
    assert all(label in text or label in special for label in shown), shown
    assert set(text) - {" "} <= set("".join(shown))
    if kind == "decoder":  # byte-level pieces are unreadable (Ġ, mangled bytes); the labels are not
        assert any("Ġ" in piece for piece in pieces) and not any("Ġ" in label for label in shown)
    else:  # [UNK] pieces still show the characters the user typed
        assert pieces.count("[UNK]") == 2 and "世" in shown and "界" in shown


def test_every_layer_and_head_is_drawn_and_the_reference_maps_are_transformers(run) -> None:
    """The reference's pictures hold transformers' own attention weights of the first text, cell by
    cell; a decoder's show its causal triangle."""
    import transformers

    kind, model, _, data, html, _, _ = run
    config = json.loads((model / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    soup = BeautifulSoup(html, "html.parser")
    assert len(soup.select("details.layer")) == layers
    assert len(soup.select("button.head")) == layers * heads
    assert ("causal" in soup.select_one("#how-to-read").get_text()) == (kind == "decoder")

    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    reference = auto.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()
    inputs = {name: torch.tensor(data["inputs"][name]) for name in ("input_ids", "attention_mask")}
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions
    real = real_tokens(data)
    scale = html_figures.probability_scale()
    future = np.triu(np.ones((real, real), dtype=bool), k=1)
    strips = page_strips(html)
    for layer in range(layers):
        pixels = np.asarray(strips[f"s{layer}r"]).astype(int)  # (T, heads * T) palette indices
        assert pixels.shape == (real, heads * real)
        for head in range(heads):
            cells = pixels[:, head * real : (head + 1) * real]
            expected = scale.indices(attentions[layer][0, head, :real, :real].double().numpy()).astype(int)
            if kind == "decoder":  # above the diagonal: transparent, the mask's triangle
                assert (cells[future] == 0).all()
                cells, expected = cells[~future], expected[~future]
            assert np.abs(cells - expected).max() <= 1  # one palette step: rounding at a boundary


# Where a few stages are computed, written out: (file, class, method) of the model's own code.
KNOWN_LOCATIONS = {
    "encoder": {"layer.0.attention": ("compare/layers.py", "MultiHeadSelfAttention", "forward")},
    "decoder": {
        "layer.0.attention": ("compare/layers.py", "GroupedQueryAttention", "forward"),
        "layer.2.mlp": ("compare/layers.py", "GatedFeedForward", "forward"),
    },
}


def enclosing_class(lines: list[str], line: int) -> str | None:
    """The name of the class the (1-based) line is in: the nearest class statement above it."""
    for text in reversed(lines[: line - 1]):
        match = re.match(r"class (\w+)", text)
        if match:
            return match.group(1)
    return None


def test_each_stage_names_the_function_of_ours_that_computes_it(run) -> None:
    """The named line holds the named function (as inspect finds it, not as the page's own mapping
    says), and a few stages are where the model's code computes them."""
    kind, model, _, data, html, _, _ = run
    architecture = REGISTRY[json.loads((model / "config.json").read_text())["model_type"]]
    rows = table_rows(BeautifulSoup(html, "html.parser"))
    for stage in data["stages"]:
        function = architecture.stage_functions[re.sub(r"^layer\.\d+\.", "layer.{i}.", stage["name"])]
        path, line = rows[stage["name"]]["computed in"].rsplit(":", 1)
        assert (REPO / path).resolve() == Path(inspect.getsourcefile(function)).resolve()
        assert int(line) == inspect.getsourcelines(function)[1]
        lines = (REPO / path).read_text().splitlines()
        assert lines[int(line) - 1].lstrip().startswith(f"def {function.__name__}(")
    for name, (path, cls, method) in KNOWN_LOCATIONS[kind].items():
        shown_path, line = rows[name]["computed in"].rsplit(":", 1)
        lines = (REPO / path).read_text().splitlines()
        assert shown_path == path and lines[int(line) - 1].lstrip().startswith(f"def {method}(")
        assert enclosing_class(lines, int(line)) == cls


def test_the_page_references_nothing_outside_itself(run) -> None:
    html = run[4]
    urls = referenced_urls(html)
    assert urls and all(url.startswith(("data:", "#")) for url in urls), [u[:60] for u in urls]
    assert "@import" not in html and "@font-face" not in html


def test_every_architecture_maps_each_of_its_stages_to_a_function_in_compare() -> None:
    """A new architecture brings its own stage functions: the registry entry must name one for every
    stage its layout produces."""
    for model_type, architecture in REGISTRY.items():
        layout = architecture.reference
        stages = [p.stage for p in layout.embeddings] + [f"layer.{{i}}.{p.stage}" for p in layout.layer]
        stages += [p.stage for p in layout.final]
        assert sorted(architecture.stage_functions) == sorted(stages), model_type
        for function in architecture.stage_functions.values():
            assert source_location(function).startswith("compare/"), (model_type, function)


def test_a_model_from_the_cache_is_named_by_its_repo_and_commit(models, serve, tmp_path: Path) -> None:
    root = tmp_path / "served"
    shutil.copytree(models["decoder"], root / "org" / "tiny-qwen2")
    url = serve(root)
    cache = tmp_path / "cache"
    code, data, html, _ = compare_html(
        "org/tiny-qwen2", tmp_path / "r.html", "--endpoint", url, "--cache-dir", str(cache), "--text", "你好"
    )
    assert code == 0
    snapshot = next((cache / "models--org--tiny-qwen2" / "snapshots").iterdir())
    assert (data["repo_id"], data["commit"]) == ("org/tiny-qwen2", snapshot.name)
    assert (cache / "models--org--tiny-qwen2" / "refs" / "main").read_text().strip() == snapshot.name
    model_fact = header_facts(BeautifulSoup(html, "html.parser"))["model"]
    assert "org/tiny-qwen2" in model_fact and snapshot.name in model_fact
    plain = compare_html(models["decoder"], tmp_path / "plain.html")[1]  # a folder of one's own
    assert "repo_id" not in plain and "commit" not in plain


def test_random_ids_are_labelled_decoded_or_by_their_id(models, tmp_path: Path) -> None:
    _, data, html, _ = compare_html(models["encoder"], tmp_path / "r.html", "--seq-len", "7")
    assert (
        data["inputs"]["source"] == "random token ids"
        and data["inputs"]["token_labels_from"] == LABELS_DECODED
    )
    ids, labels = data["inputs"]["input_ids"][0], data["inputs"]["token_labels"][0]
    words = [i for i, token in enumerate(ids) if not TINY_VOCAB[token].startswith(("[", "##"))]
    assert words and all(labels[i] == TINY_VOCAB[ids[i]] for i in words)  # decoded: the word itself
    shown = [span.get_text() for span in BeautifulSoup(html, "html.parser").select("#tokens .tok")]
    assert shown == labels == [label for label in labels if label]  # row 0 of random ids is never padded

    bare = Path(shutil.copytree(models["encoder"], tmp_path / "no-tokenizer"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    _, data, html, _ = compare_html(bare, tmp_path / "bare.html", "--seq-len", "7")
    assert data["inputs"]["token_labels"][0] == [str(i) for i in data["inputs"]["input_ids"][0]]
    shown = [span.get_text() for span in BeautifulSoup(html, "html.parser").select("#tokens .tok")]
    assert shown == data["inputs"]["token_labels"][0]


def test_without_html_no_attention_is_kept_and_no_page_module_is_imported(models) -> None:
    """An ordinary run keeps no attention weights (not even the reference's) and never imports the
    renderer or matplotlib: it runs with matplotlib hidden."""
    code = (
        "import json, sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import compare.reference_stream as stream\n"
        "asked = []\n"
        "layer = stream.StreamedReference.layer\n"
        "def spy(self, *args, keep_attention=False, **kwargs):\n"
        "    asked.append(keep_attention)\n"
        "    return layer(self, *args, keep_attention=keep_attention, **kwargs)\n"
        "stream.StreamedReference.layer = spy\n"
        "from hfmirror.cli import main\n"
        f"sys.argv = ['hfmirror', 'compare', {str(models['decoder'])!r}, '--text', '你好 world']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "print(json.dumps([status, asked, [m in sys.modules for m in ('compare.html_report', 'compare.html_attention')]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    status, asked, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert status == 0, result.stderr
    assert asked == [False] * 3 and imported == [False, False]


@pytest.mark.slow
def test_a_28_layer_16_head_model_s_page_stays_under_5_mb(tmp_path: Path) -> None:
    """A real (random-weight) 28-layer, 16-head decoder on 80 random tokens: the page draws all 448
    heads for as many tokens as the budget allows, says it capped them, and stays under 5 MB."""
    model = save_random_decoder(
        tmp_path / "deep",
        "qwen2",
        tokenizer=False,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=4,
        hidden_size=64,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    page = tmp_path / "deep.html"
    code, data, html, _ = compare_html(model, page, "--seq-len", "80", "--batch", "1")
    assert code == 0 and len(data["stages"]) == 1 + 28 * 4 + 2
    drawn = drawn_token_limit(28, 16)
    assert 28 * 16 * drawn**2 <= MAX_DRAWN_CELLS < 28 * 16 * (drawn + 1) ** 2 and drawn < 80
    soup = BeautifulSoup(html, "html.parser")
    assert len(soup.select("button.head")) == 28 * 16 and len(page_strips(html)) == 28 * 3
    assert [span.get_text() for span in soup.select("#tokens .tok")] == data["inputs"]["token_labels"][0][
        :drawn
    ]
    assert (
        f"has 80 tokens; the maps show the first {drawn}" in soup.select_one("#attention p.note").get_text()
    )
    assert len(table_rows(soup)) == len(data["stages"])
    assert page.stat().st_size < 5_000_000


def test_the_readme_states_the_page_budget_the_code_has() -> None:
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"at most {MAX_DRAWN_CELLS / 1e6:.1f} million cells are drawn" in readme
    assert f"a 28-layer, 16-head model shows the first {drawn_token_limit(28, 16)} tokens" in readme


def test_a_range_of_layers_is_drawn_under_the_model_s_layer_numbers(models, tmp_path: Path) -> None:
    text = TEXTS["decoder"][0]
    _, data, html, _ = compare_html(models["decoder"], tmp_path / "r.html", "--layers", "1-2", "--text", text)
    assert data["layers"] == "1-2"
    sections = BeautifulSoup(html, "html.parser").select("details.layer")
    assert [section.summary.get_text().split(":")[0] for section in sections] == ["layer 1", "layer 2"]
    links = [section.select_one(".kinds a")["href"] for section in sections]
    assert links == ["#" + stage_anchor(f"layer.{i}.attention") for i in (1, 2)]


def test_a_failing_comparison_still_gets_its_page_naming_the_first_failing_stage(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compare.layers import ACTIVATIONS

    monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS["relu"])  # a bug in our encoder's feed-forward
    code, data, html, _ = compare_html(models["encoder"], tmp_path / "r.html", "--text", "hello world")
    assert code == 1 and data["first_failing_stage"] == "layer.0.feed_forward"
    soup = BeautifulSoup(html, "html.parser")
    verdict = soup.select_one("#verdict")
    failing = [stage for stage in data["stages"] if not stage["isolated"]["passed"]]
    assert "fail" in verdict["class"]
    assert verdict.get_text().startswith("FAIL: first failing stage: layer.0.feed_forward ")
    assert f"({len(failing)} of {len(data['stages'])} stages outside" in verdict.get_text()
    assert "first" in table_rows(soup)["layer.0.feed_forward"]["class"]


def test_a_page_that_cannot_be_written_is_refused_before_the_comparison_runs(models, tmp_path: Path) -> None:
    page = tmp_path / "no-such-folder" / "r.html"
    result = CliRunner().invoke(cli, ["compare", str(models["encoder"]), "--html", str(page)])
    assert result.exit_code == 2 and result.stdout == ""  # nothing was compared
    assert "does not exist" in result.stderr and not page.parent.exists()
