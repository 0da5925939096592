"""The from-scratch model against transformers: it matches when right, and fails where broken.

Models are tiny random BERTs whose every weight is re-drawn (tests.test_compare_support), so no
LayerNorm is the identity and no bias is zero. The anti-tautology tests break one thing on purpose
(never in transformers: only in our model, by monkeypatching) and check that the comparison fails at
the stage the bug first touches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compare.bert
import compare.layers
import compare.weights
from compare.architectures import REGISTRY
from compare.bert import BertEncoderLayer
from compare.config import BertConfig
from compare.layers import ACTIVATIONS, add_and_norm
from compare.metrics import compare_tensors
from compare.runner import DEFAULT_TOLERANCES, compare_model_dir, random_inputs
from hfmirror.errors import CompareError, UnsupportedModelError
from tests.test_compare_support import assert_fails_at, load_whole_model, save_random_bert

TEXTS = ["hello world", "the cat sat on the mat", "a dog ran"]

# (name, save_tiny_bert arguments): several widths, odd head counts, activations and eps values.
SHAPES = {
    "h32-4heads-gelu-eps1e-12": dict(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=37,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    ),
    "h30-3heads-gelu_new-eps1e-5": dict(
        hidden_size=30,
        num_attention_heads=3,
        num_hidden_layers=2,
        intermediate_size=50,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
    ),
    "h40-5heads-relu-eps1e-12": dict(
        hidden_size=40,
        num_attention_heads=5,
        num_hidden_layers=3,
        intermediate_size=64,
        hidden_act="relu",
        layer_norm_eps=1e-12,
    ),
    "h24-3heads-gelu_pytorch_tanh": dict(
        hidden_size=24,
        num_attention_heads=3,
        num_hidden_layers=1,
        intermediate_size=40,
        hidden_act="gelu_pytorch_tanh",
    ),
    "h16-1head-silu-eps1e-5": dict(
        hidden_size=16,
        num_attention_heads=1,
        num_hidden_layers=2,
        intermediate_size=20,
        hidden_act="silu",
        layer_norm_eps=1e-5,
    ),
    "h64-4heads-6layers-gelu": dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=6, intermediate_size=256, hidden_act="gelu"
    ),
    "h20-2heads-gelu_fast": dict(
        hidden_size=20,
        num_attention_heads=2,
        num_hidden_layers=1,
        intermediate_size=30,
        hidden_act="gelu_fast",
    ),
}


def expected_stage_names(num_layers: int, *, pooler: bool = True) -> list[str]:
    names = ["embeddings"]
    for i in range(num_layers):
        names += [
            f"layer.{i}.attention",
            f"layer.{i}.attention_add_norm",
            f"layer.{i}.feed_forward",
            f"layer.{i}.output",
        ]
    return names + ["last_hidden_state"] + (["pooler"] if pooler else [])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: save_random_bert(root / name, seed=i, **kwargs)
        for i, (name, kwargs) in enumerate(SHAPES.items())
    }


@pytest.fixture(scope="module")
def bert(models: dict[str, Path]) -> Path:
    """The default test model: 2 layers, 4 heads, exact GELU."""
    return models["h32-4heads-gelu-eps1e-12"]


# ----------------------------------------------------------------------------------------- import hygiene


def test_model_modules_import_torch_only() -> None:
    code = (
        "import sys\n"
        "import compare, compare.layers, compare.config, compare.bert, compare.weights, compare.architectures\n"
        "import compare.metrics, compare.report, compare.runner\n"
        "import compare.model, compare.gpt2, compare.llama, compare.qwen, compare.roberta, compare.reference_layout\n"
        "bad = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
        "assert not bad, bad\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_reads_the_modules_in_the_package_s_order() -> None:
    """One reading order: the package docstring's and the README's name the same modules, in order."""
    import re

    import compare

    docstring = compare.__doc__.split("Reading order:")[1].split("Everything except")[0]
    package = re.findall(r"``compare\.(\w+)``", docstring)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    paragraph = readme.split("Read the code in this order")[1].split("A new architecture")[0]
    named = re.findall(r"`compare/(\w+)\.py`", paragraph)
    assert package and named == ["__init__", *package]  # __init__: where the order is written


# ---------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("source", ["text", "random"])
def test_tiny_berts_match_transformers(models: dict[str, Path], name: str, dtype: str, source: str) -> None:
    texts = TEXTS if source == "text" else None
    report = compare_model_dir(models[name], texts=texts, dtype=dtype, seq_len=12, batch=3, seed=1)
    assert report.passed, report.render_table()
    assert report.first_failing_stage is None
    assert [stage.name for stage in report.stages] == expected_stage_names(SHAPES[name]["num_hidden_layers"])
    assert report.inputs["padded_positions"] > 0, "the batch must contain padding to exercise the mask"
    atol, rtol = DEFAULT_TOLERANCES[dtype]
    assert (report.atol, report.rtol) == (atol, rtol)
    assert report.max_abs_diff is not None
    if dtype == "float64":
        assert report.max_abs_diff < 1e-12  # rounding noise shrinks by ~8 orders of magnitude
    for stage in report.stages:
        assert stage.cosine_similarity is not None and stage.cosine_similarity > 1 - 1e-6, stage


def test_final_outputs_equal_transformers_directly(bert: Path) -> None:
    """Independent of the hooks: our last_hidden_state and pooler vs AutoModel's forward output."""
    from transformers import AutoModel

    inputs = random_inputs(batch=3, seq_len=10, seed=5, vocab_size=45, type_vocab_size=2, pad_token_id=0)
    ours = load_whole_model(bert, dtype=torch.float64).model
    reference = AutoModel.from_pretrained(bert, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden, pooled = ours(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        expected = reference(**inputs)
    torch.testing.assert_close(hidden, expected.last_hidden_state, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pooled, expected.pooler_output, rtol=1e-10, atol=1e-10)
    assert hidden.abs().max() > 0.5  # O(1) activations, not a degenerate model


def test_random_inputs_are_reproducible_and_padded() -> None:
    first = random_inputs(batch=4, seq_len=9, seed=3, vocab_size=50, type_vocab_size=2, pad_token_id=0)
    second = random_inputs(batch=4, seq_len=9, seed=3, vocab_size=50, type_vocab_size=2, pad_token_id=0)
    for key in first:
        assert torch.equal(first[key], second[key])
    mask = first["attention_mask"]
    assert mask[0].all() and mask.sum(dim=1).min() >= 1
    assert torch.equal(first["input_ids"][mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.long))
    assert (first["token_type_ids"][mask == 0] == 0).all()


# ------------------------------------------------------------------------------------- anti-tautology
# Break one piece of *our* model and check the comparison fails exactly where the bug first shows.


def test_dropped_attention_scale_fails_at_attention(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unscaled(query, key, value, mask=None, **options):
        scores = torch.matmul(query, key.transpose(-2, -1))  # the 1/sqrt(d) is missing
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, value), weights

    monkeypatch.setattr(compare.layers, "scaled_dot_product_attention", unscaled)
    assert_fails_at(compare_model_dir(bert), "layer.0.attention")


def test_ignored_padding_mask_fails_at_attention(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        compare.bert,
        "additive_padding_mask",
        lambda attention_mask, dtype: torch.zeros(
            attention_mask.shape[0], 1, 1, attention_mask.shape[1], dtype=dtype
        ),
    )
    assert_fails_at(compare_model_dir(bert, texts=TEXTS), "layer.0.attention")


@pytest.mark.parametrize("wrong", ["relu", "gelu_new"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_swapped_activation_fails_at_feed_forward(
    bert: Path, monkeypatch: pytest.MonkeyPatch, wrong: str, dtype: str
) -> None:
    # gelu_new (the tanh approximation) differs from exact GELU by ~1e-4: a subtle bug must still fail,
    # in float32 and (not being rounding noise) in float64 too.
    monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS[wrong])
    assert_fails_at(compare_model_dir(bert, dtype=dtype), "layer.0.feed_forward")


@pytest.mark.parametrize(
    ("tensor", "stage"),
    [
        ("encoder.layer.0.attention.self.query.weight", "layer.0.attention"),
        ("encoder.layer.1.attention.output.dense.weight", "layer.1.attention"),
        ("pooler.dense.weight", "pooler"),
    ],
)
def test_transposed_weight_fails_where_it_is_used(
    bert: Path, monkeypatch: pytest.MonkeyPatch, tensor: str, stage: str
) -> None:
    original = compare.weights.CheckpointReader.read

    def transposing(self, name):
        value = original(self, name)
        return value.t().contiguous() if name == tensor else value  # square: shapes still fit

    monkeypatch.setattr(compare.weights.CheckpointReader, "read", transposing)
    assert_fails_at(compare_model_dir(bert), stage)


def test_wrong_layer_norm_eps_fails_at_embeddings(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    architecture = REGISTRY["bert"]

    def parse_with_wrong_eps(raw):
        return dataclasses.replace(architecture.parse_config(raw), layer_norm_eps=1e-1)

    monkeypatch.setitem(
        REGISTRY, "bert", dataclasses.replace(architecture, parse_config=parse_with_wrong_eps)
    )
    assert_fails_at(compare_model_dir(bert), "embeddings")


def test_pre_layer_norm_fails_at_first_attention(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class PreLNLayer(BertEncoderLayer):
        """x + sublayer(LayerNorm(x)) instead of BERT's LayerNorm(x + sublayer(x))."""

        def forward(self, x, context, record):
            attention_out = record("attention", self.attention(self.attention_norm(x), context.mask))
            x = record("attention_add_norm", x + attention_out)
            feed_forward_out = record("feed_forward", self.feed_forward(self.feed_forward_norm(x)))
            return record("output", x + feed_forward_out)

    monkeypatch.setattr(compare.bert, "BertEncoderLayer", PreLNLayer)
    # The attention now reads LayerNorm(x) instead of x: the first stage that sees it is the attention.
    assert_fails_at(compare_model_dir(bert), "layer.0.attention")


def test_add_and_norm_is_post_ln() -> None:
    norm = compare.layers.LayerNorm(4, eps=1e-12)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    x, sub = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = torch.nn.functional.layer_norm(x + sub, (4,), norm.weight, norm.bias, eps=1e-12)
    torch.testing.assert_close(add_and_norm(x, sub, norm), expected)


# ----------------------------------------------------------------------------------------- inputs, config


def test_texts_without_tokenizer_is_a_compare_error(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "bert", with_tokenizer=False)
    with pytest.raises(CompareError, match="no tokenizer"):
        compare_model_dir(path, texts=["hello"])
    assert compare_model_dir(path).passed  # random ids need no tokenizer


def test_bad_arguments_are_compare_errors(bert: Path) -> None:
    with pytest.raises(CompareError, match="dtype"):
        compare_model_dir(bert, dtype="float16")
    with pytest.raises(CompareError, match="max_position_embeddings"):
        compare_model_dir(bert, seq_len=65)
    with pytest.raises(CompareError, match="seq_len"):
        compare_model_dir(bert, seq_len=0)


def _write_config(path: Path, **changes) -> Path:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return path


def test_unsupported_model_type_lists_supported(tmp_path: Path) -> None:
    path = _write_config(save_random_bert(tmp_path / "m"), model_type="t5")
    with pytest.raises(UnsupportedModelError, match="'t5'.*supported: bert, gpt2, llama"):
        compare_model_dir(path)


def test_unsupported_activation_lists_supported(tmp_path: Path) -> None:
    path = _write_config(save_random_bert(tmp_path / "m"), hidden_act="mish")
    with pytest.raises(UnsupportedModelError, match="'mish'.*gelu"):
        compare_model_dir(path)


def test_hidden_size_not_divisible_by_heads(tmp_path: Path) -> None:
    path = _write_config(save_random_bert(tmp_path / "m"), num_attention_heads=5)
    with pytest.raises(CompareError, match=r"hidden_size \(32\).*num_attention_heads \(5\)"):
        compare_model_dir(path)


def test_missing_config_is_a_compare_error(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="config.json"):
        compare_model_dir(tmp_path)


def test_config_reads_every_field() -> None:
    raw = {
        "model_type": "bert",
        "vocab_size": 7,
        "hidden_size": 12,
        "num_hidden_layers": 3,
        "num_attention_heads": 3,
        "intermediate_size": 5,
        "hidden_act": "relu",
        "max_position_embeddings": 9,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 2,
    }
    config = BertConfig.from_dict(raw)
    assert dataclasses.asdict(config) == {key: value for key, value in raw.items() if key != "model_type"}
    assert config.head_dim == 4


def test_every_supported_activation_is_implemented() -> None:
    from compare.config import SUPPORTED_ACTIVATIONS

    assert set(SUPPORTED_ACTIVATIONS) == set(ACTIVATIONS)
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS["gelu"](x), torch.nn.functional.gelu(x))
    torch.testing.assert_close(ACTIVATIONS["gelu_new"](x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(ACTIVATIONS["gelu_fast"](x), torch.nn.functional.gelu(x, approximate="tanh"))
    torch.testing.assert_close(ACTIVATIONS["silu"](x), torch.nn.functional.silu(x))
    torch.testing.assert_close(ACTIVATIONS["relu"](x), torch.relu(x))


# ------------------------------------------------------------------------------------------ report, metrics


def test_report_json_and_table(bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = compare_model_dir(bert, model_name="tiny-bert")
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    for key in (
        "model",
        "passed",
        "max_abs_diff",
        "first_failing_stage",
        "stages",
        "versions",
        "dtype",
        "atol",
        "rtol",
        "inputs",
    ):
        assert key in data
    assert data["model"] == "tiny-bert" and data["passed"] is True and data["first_failing_stage"] is None
    assert set(data["versions"]) == {"torch", "transformers", "python"}
    assert data["versions"]["torch"] == torch.__version__
    assert [stage["name"] for stage in data["stages"]] == expected_stage_names(2)
    assert data["max_abs_diff"] == max(stage["max_abs_diff"] for stage in data["stages"])
    table = report.render_table()
    assert table.splitlines()[-1].startswith("PASS")
    assert all(f"{name} " in table for name in expected_stage_names(2))

    monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS["relu"])
    failing = compare_model_dir(bert)
    data = json.loads(json.dumps(failing.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["first_failing_stage"] == "layer.0.feed_forward"
    rows = {
        line.split()[0]: line for line in failing.render_table().splitlines() if line.startswith("layer.")
    }
    assert rows["layer.0.attention_add_norm"].rstrip().endswith("PASS")
    assert rows["layer.0.feed_forward"].rstrip().endswith("FAIL")
    assert (
        failing.render_table().splitlines()[-1].startswith("FAIL: first failing stage: layer.0.feed_forward")
    )


def test_stage_metrics_by_hand() -> None:
    ref = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64)
    ours = ref + torch.tensor([[0.0, 1e-3], [-2e-3, 0.0]], dtype=torch.float64)
    result = compare_tensors("s", ours, ref, atol=1e-3, rtol=0.0)
    assert not result.passed  # 2e-3 > 1e-3
    assert result.max_abs_diff == pytest.approx(2e-3)
    assert result.mean_abs_diff == pytest.approx(3e-3 / 4)
    assert result.rel_error == pytest.approx(2e-3 / 4.0)
    assert result.tolerance_used == pytest.approx(2.0)
    expected_cosine = float(torch.dot(ours.flatten(), ref.flatten()) / (ours.norm() * ref.norm()))
    assert result.cosine_similarity == pytest.approx(expected_cosine)
    assert compare_tensors("s", ours, ref, atol=2.5e-3, rtol=0.0).passed
    assert compare_tensors("s", ours, ref, atol=1e-3, rtol=3e-3).passed  # 2e-3 <= 1e-3 + 3e-3 * 0.5

    mismatch = compare_tensors("s", ours[:, :1], ref, atol=1.0, rtol=1.0)
    assert not mismatch.passed and "shape" in mismatch.note and mismatch.max_abs_diff is None
    nan = compare_tensors("s", torch.full_like(ref, math.nan), ref, atol=1.0, rtol=1.0)
    assert not nan.passed and "nan" in nan.note


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.tuples(st.floats(-10, 10), st.floats(-1e-3, 1e-3)), min_size=1, max_size=20),
    atol=st.sampled_from([0.0, 1e-5, 1e-4]),
    rtol=st.sampled_from([0.0, 1e-5, 1e-4]),
)
def test_pass_rule_is_allclose(values: list[tuple[float, float]], atol: float, rtol: float) -> None:
    ref = torch.tensor([v for v, _ in values], dtype=torch.float64)
    ours = ref + torch.tensor([d for _, d in values], dtype=torch.float64)
    result = compare_tensors("s", ours, ref, atol=atol, rtol=rtol)
    assert result.passed == torch.allclose(ours, ref, rtol=rtol, atol=atol)
    if result.tolerance_used is not None:  # the budget spent is <= 1 exactly when the stage passes
        assert (result.tolerance_used <= 1.0) if result.passed else (result.tolerance_used >= 1.0)
