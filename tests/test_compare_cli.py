"""``hfmirror compare`` through click's CliRunner, on local folders only (no network)."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from compare.layers import ACTIVATIONS
from hfmirror.compare_command import compare
from hfmirror.errors import UnsupportedModelError, WeightLoadError
from tests.test_compare_support import rewrite_safetensors, save_random_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_bert(tmp_path_factory.mktemp("cli") / "bert")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def compare_cmd() -> click.Command:
    """The bare command, without hfmirror.cli's error handler (which registration wraps around its
    callback), so that errors propagate as exceptions and can be asserted on."""
    command = copy.copy(compare)
    command.callback = inspect.unwrap(compare.callback)
    return command


def hfmirror_cli() -> click.Group:
    """The real ``hfmirror`` group, where ``compare`` is registered with the error handler."""
    from hfmirror.cli import cli

    return cli


def test_importing_the_command_is_light() -> None:
    code = (
        "import sys\n"
        "import hfmirror.compare_command\n"
        "heavy = [m for m in ('torch', 'transformers', 'compare', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_help(runner: CliRunner, compare_cmd: click.Command) -> None:
    result = runner.invoke(compare_cmd, ["--help"])
    assert result.exit_code == 0, result.output
    for option in (
        "--text",
        "--seq-len",
        "--batch",
        "--seed",
        "--dtype",
        "--atol",
        "--rtol",
        "--json",
        "--endpoint",
        "--revision",
        "--token",
        "--cache-dir",
        "--tokenizer",
        "--layers",
        "--stream",
    ):
        assert option in result.output


def test_passing_model_exits_0_with_a_table(
    runner: CliRunner, compare_cmd: click.Command, bert: Path
) -> None:
    result = runner.invoke(compare_cmd, [str(bert), "--text", "hello world", "--text", "the cat sat"])
    assert result.exit_code == 0, result.output
    assert "layer.1.feed_forward" in result.output
    assert result.output.strip().splitlines()[-1].startswith("PASS")


def test_json_output(runner: CliRunner, compare_cmd: click.Command, bert: Path) -> None:
    result = runner.invoke(
        compare, [str(bert), "--json", "--dtype", "float64", "--seq-len", "8", "--batch", "3"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] is True and data["first_failing_stage"] is None
    assert data["model"] == str(bert) and data["dtype"] == "float64"
    assert data["atol"] == 1e-10 and data["rtol"] == 1e-10
    assert data["inputs"]["batch"] == 3 and data["inputs"]["seq_len"] == 8
    assert {"model", "passed", "max_abs_diff", "first_failing_stage", "stages", "versions"} <= set(data)


def test_failing_comparison_exits_1_naming_the_stage(
    runner: CliRunner, compare_cmd: click.Command, bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS["relu"])  # a bug in our model
    result = runner.invoke(compare_cmd, [str(bert)])
    assert result.exit_code == 1, result.output
    assert (
        result.output.strip().splitlines()[-1].startswith("FAIL: first failing stage: layer.0.feed_forward")
    )

    result = runner.invoke(compare_cmd, [str(bert), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["first_failing_stage"] == "layer.0.feed_forward"


def test_registered_in_hfmirror_cli(runner: CliRunner, bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real group and its error handler: 0 when all stages match, 1 when one does not."""
    result = runner.invoke(hfmirror_cli(), ["compare", str(bert), "--seq-len", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("PASS")
    monkeypatch.setitem(ACTIVATIONS, "gelu", ACTIVATIONS["relu"])
    result = runner.invoke(hfmirror_cli(), ["compare", str(bert), "--json"])
    assert result.exit_code == 1, result.output
    assert json.loads(result.output)["first_failing_stage"] == "layer.0.feed_forward"


def test_tolerance_options_are_used(runner: CliRunner, compare_cmd: click.Command, bert: Path) -> None:
    # float32 rounding is not zero, so a zero tolerance must fail and a loose one pass.
    strict = runner.invoke(compare_cmd, [str(bert), "--atol", "0", "--rtol", "0", "--json"])
    assert strict.exit_code == 1, strict.output
    assert json.loads(strict.output)["atol"] == 0.0
    loose = runner.invoke(compare_cmd, [str(bert), "--atol", "1e-3", "--rtol", "0", "--json"])
    assert loose.exit_code == 0, loose.output


def test_unsupported_model_raises(runner: CliRunner, compare_cmd: click.Command, tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "t5")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "t5"}))
    result = runner.invoke(compare_cmd, [str(path)])
    assert isinstance(result.exception, UnsupportedModelError), result.output
    assert "bert" in str(result.exception)

    # Through hfmirror's error handler: one line on stderr and the documented exit code 2.
    result = CliRunner().invoke(hfmirror_cli(), ["compare", str(path)])
    assert result.exit_code == 2, result.output
    assert "hfmirror: error: model_type 't5' is not supported" in result.stderr


def test_weight_error_through_the_handler(compare_cmd: click.Command, tmp_path: Path) -> None:
    name = "pooler.dense.weight"
    path = rewrite_safetensors(
        save_random_bert(tmp_path / "m"), lambda s: {k: v for k, v in s.items() if k != name}
    )
    result = CliRunner().invoke(compare_cmd, [str(path)])
    assert isinstance(result.exception, WeightLoadError) and name in str(result.exception)
    result = CliRunner().invoke(hfmirror_cli(), ["compare", str(path)])
    assert result.exit_code == 2 and name in result.stderr


def test_layers_and_stream_options(runner: CliRunner, bert: Path) -> None:
    result = runner.invoke(hfmirror_cli(), ["compare", str(bert), "--stream", "--layers", "1-1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["layers"] == "1-1" and [s["name"] for s in data["stages"]] == [
        "layer.1.attention",
        "layer.1.attention_add_norm",
        "layer.1.feed_forward",
        "layer.1.output",
        "last_hidden_state",
        "pooler",
    ]
    assert all("isolated" in stage for stage in data["stages"])
    result = CliRunner().invoke(hfmirror_cli(), ["compare", str(bert), "--layers", "0-5"])
    assert result.exit_code == 2 and "--layers 0-5: the model has layers 0-1" in result.stderr
