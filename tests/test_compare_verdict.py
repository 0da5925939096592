"""The verdict's rules, on stage results made by the real measurement (compare_tensors): which
measurement decides (isolated; in float64 carried too), and the float32 hint to rerun in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bs4 import BeautifulSoup
from click.testing import CliRunner

from compare.html_report import render_html
from compare.metrics import NextTokenMetrics, StageResult, compare_tensors
from compare.report import ComparisonReport
from hfmirror.cli import cli
from tests.test_compare_support import save_random_decoder

ATOL = RTOL = 1e-10


def stage(name: str, *, carried_off: float = 0.0, isolated_off: float = 0.0) -> StageResult:
    """A stage whose carried and isolated outputs are off the reference by the given amounts."""
    reference = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(2, 3, 4)
    result = compare_tensors(name, reference + carried_off, reference, atol=ATOL, rtol=RTOL)
    result.isolated = compare_tensors(name, reference + isolated_off, reference, atol=ATOL, rtol=RTOL)
    return result


def comparison(stages: list[StageResult], dtype: str, next_token: NextTokenMetrics | None = None):
    return ComparisonReport.from_stages(
        stages,
        model="tiny",
        dtype=dtype,
        atol=ATOL,
        rtol=RTOL,
        versions={},
        reference="transformers",
        next_token=next_token,
    )


def agreement(share: float) -> NextTokenMetrics:
    return NextTokenMetrics(share, 0.0, 0.0, 4, [[0]], [[0]])


def carried_drift() -> list[StageResult]:
    """Embeddings exact; from layer.0.mlp on, the carried error is outside tolerance, the isolated not."""
    return [
        stage("embeddings"),
        stage("layer.0.attention", carried_off=1e-12),
        stage("layer.0.mlp", carried_off=1e-6),
        stage("logits", carried_off=1e-5),
    ]


def test_in_float32_a_carried_only_failure_passes_and_is_counted() -> None:
    report = comparison(carried_drift(), "float32")
    assert report.passed and report.first_failing_stage is None and report.failing_stages == []
    assert report.carried_failing_stages == ["layer.0.mlp", "logits"]
    assert report.verdict().startswith("PASS: all 4 stages match the reference")
    assert "in isolation" in report.verdict() and "2 outside it carried" in report.verdict()


def test_in_float64_carried_stages_must_pass_too() -> None:
    report = comparison(carried_drift(), "float64")
    assert not report.passed and report.first_failing_stage == "layer.0.mlp"
    assert report.failing_stages == ["layer.0.mlp", "logits"]
    assert report.verdict() == (
        "FAIL: first failing stage: layer.0.mlp (2 of 4 stages outside atol=1e-10, rtol=1e-10 in "
        "isolation and carried, 2 carried)"
    )
    assert report.to_dict()["passed"] is False
    rows = {line.split()[0]: line for line in report.render_table().splitlines() if line.startswith("layer.")}
    assert rows["layer.0.mlp"].endswith("FAIL (carried FAIL, isolated PASS)")
    assert rows["layer.0.attention"].endswith("PASS")


def test_in_float64_a_run_that_passes_carried_and_isolated_passes() -> None:
    report = comparison([stage("embeddings"), stage("logits", carried_off=1e-12)], "float64")
    assert report.passed and report.verdict().startswith("PASS: all 2 stages match")


@pytest.mark.parametrize(
    ("stages", "next_token", "says"),
    [
        (carried_drift(), agreement(1.0), "the carried logits are outside the tolerance"),
        ([stage("embeddings"), stage("logits")], agreement(0.75), "the top-1 token agrees at 75.0%"),
    ],
)
def test_a_float32_run_whose_output_differs_hints_to_rerun_in_float64(stages, next_token, says) -> None:
    report = comparison(stages, "float32", next_token)
    assert report.passed  # the hint is about what a user sees, not the verdict
    table = report.render_table().splitlines()
    assert table[-1] == report.verdict()  # the verdict stays the last line, the hint just above it
    assert table[-2].startswith(f"hint: {says}") and "--dtype float64" in table[-2]
    page = BeautifulSoup(render_html(report.to_dict()), "html.parser")
    assert page.select_one("#hint").get_text() == table[-2]  # the page says it under the verdict


def test_no_hint_when_the_output_agrees_or_the_run_is_float64() -> None:
    agreeing = comparison([stage("embeddings"), stage("logits")], "float32", agreement(1.0))
    assert agreeing.hint() is None and "--dtype float64" not in agreeing.render_table()
    assert agreeing.render_table().splitlines()[-1] == agreeing.verdict()
    assert not BeautifulSoup(render_html(agreeing.to_dict()), "html.parser").select("#hint")
    in_float64 = comparison(carried_drift(), "float64", agreement(0.5))
    assert in_float64.hint() is None and "--dtype float64" not in in_float64.render_table()


def test_the_cli_prints_the_hint_beside_the_json(tmp_path: Path) -> None:
    """A real float32 run with a tolerance no float32 rounding meets: the carried logits fail."""
    model = save_random_decoder(tmp_path / "qwen2", "qwen2", num_hidden_layers=1)
    args = ["compare", str(model), "--json", "--seq-len", "6", "--atol", "1e-12", "--rtol", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "hint: the carried logits are outside the tolerance" in result.stderr
    assert "--dtype float64" in result.stderr and "hint:" not in result.stdout


def test_the_readme_states_the_float64_tolerance_and_verdict_the_code_has() -> None:
    from compare.runner import DEFAULT_TOLERANCES

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    atol = DEFAULT_TOLERANCES["float64"][0]
    assert f"default float64 tolerance is {atol:g}" in readme
    assert f"far below the float64 tolerance ({atol:g})" in readme
    assert "In float64 the carried error must pass too" in readme
