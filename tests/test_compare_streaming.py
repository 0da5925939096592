"""The comparison one layer at a time: the streamed reference is the whole model's, each stage's own
(isolated) error is told apart from what it inherited (carried), and memory does not grow with depth.

Models are tiny transformers models with every tensor re-drawn (tests.test_compare_support).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compare.gpt2
import compare.layers
import compare.reference_stream
import compare.streaming
import compare.weights
from compare.architectures import prepare_model
from compare.metrics import ISOLATED_FIELDS, compare_tensors
from compare.reference import load_reference, reference_stages
from compare.reference_stream import StreamedReference
from compare.runner import compare_model_dir, random_inputs
from hfmirror.errors import CompareError
from tests.test_compare_support import (
    assert_fails_at,
    convert_qwen2_to_qwen_v1,
    rewrite_safetensors,
    save_random_bert,
    save_random_decoder,
)

REPO = Path(__file__).resolve().parents[1]


def _gamma_beta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
        for name, t in state.items()
    }


@pytest.fixture(scope="module")
def every_architecture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint of every supported model_type (and of BERT's naming variants)."""
    root = tmp_path_factory.mktemp("streaming")
    models = {
        "bert": save_random_bert(root / "bert", with_tokenizer=False),
        "bert-pretraining-gamma-beta": rewrite_safetensors(
            save_random_bert(root / "bert-pt", architecture="BertForPreTraining", with_tokenizer=False),
            _gamma_beta,
        ),
        "bert-masked-lm": save_random_bert(
            root / "bert-mlm", architecture="BertForMaskedLM", with_tokenizer=False
        ),
        "roberta": save_random_decoder(root / "roberta", "roberta", tokenizer=False),
        "xlm-roberta": save_random_decoder(root / "xlm-roberta", "xlm-roberta", tokenizer=False),
        "gpt2": save_random_decoder(
            root / "gpt2", "gpt2", tokenizer=False, scale_attn_by_inverse_layer_idx=True
        ),
        "gpt2-untied": save_random_decoder(
            root / "gpt2-untied", "gpt2", tokenizer=False, tie_word_embeddings=False
        ),
        "llama": save_random_decoder(
            root / "llama",
            "llama",
            tokenizer=False,
            num_key_value_heads=2,
            head_dim=12,
            tie_word_embeddings=True,
        ),
        "mistral": save_random_decoder(root / "mistral", "mistral", tokenizer=False, sliding_window=4),
        "qwen2": save_random_decoder(
            root / "qwen2",
            "qwen2",
            tokenizer=False,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        "qwen3": save_random_decoder(root / "qwen3", "qwen3", tokenizer=False, attention_bias=True),
    }
    original = save_random_decoder(root / "qwen2-mha", "qwen2", tokenizer=False, num_key_value_heads=4)
    models["qwen"] = convert_qwen2_to_qwen_v1(original, root / "qwen")
    return models


@pytest.fixture(scope="module")
def deep_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """28 layers, 64 wide: float32 rounding carried through the depth exceeds the tolerance."""
    return save_random_decoder(
        tmp_path_factory.mktemp("deep") / "gpt2", "gpt2", tokenizer=False, n_layer=28, n_embd=64, n_head=4
    )


# ------------------------------------------------------------------------- the streamed reference


@pytest.mark.parametrize(
    "name",
    [
        "bert",
        "bert-pretraining-gamma-beta",
        "bert-masked-lm",
        "roberta",
        "xlm-roberta",
        "gpt2",
        "gpt2-untied",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen",
    ],
)
def test_streamed_reference_equals_the_whole_model(every_architecture: dict[str, Path], name: str) -> None:
    """Streaming cannot quietly change what "reference" means: piece by piece, transformers' own
    modules give the stages (and attention weights) its whole model gives, for every architecture."""
    path = every_architecture[name]
    prepared = prepare_model(path, dtype=torch.float32)
    architecture = prepared.architecture
    inputs = random_inputs(
        batch=3,
        seq_len=9,
        seed=2,
        vocab_size=prepared.config.vocab_size,
        type_vocab_size=getattr(prepared.config, "type_vocab_size", 1),
        pad_token_id=prepared.config.pad_token_id,
    )
    if not architecture.uses_token_types:
        del inputs["token_type_ids"]
    whole_model = load_reference(
        path, architecture=architecture, config=prepared.config, dtype=torch.float32, options=prepared.options
    )
    whole = reference_stages(whole_model, architecture.reference, inputs, keep_attention=True)
    streamed = StreamedReference(
        path,
        architecture=architecture,
        config=prepared.config,
        dtype=torch.float32,
        files=prepared.reader.files,
        options=prepared.options,
    ).stages(inputs, keep_attention=True)
    assert list(streamed.stages) == list(whole.stages)
    assert len(streamed.stages) > 6 and list(streamed.attention) == list(whole.attention)
    for stage, tensor in whole.stages.items():
        torch.testing.assert_close(streamed.stages[stage], tensor, rtol=1e-6, atol=1e-6, msg=stage)
    for layer, weights in whole.attention.items():
        torch.testing.assert_close(streamed.attention[layer], weights, rtol=1e-6, atol=1e-6, msg=layer)


def test_streamed_reference_reads_the_checkpoint_itself(every_architecture, monkeypatch) -> None:
    """A mistake in our reading is ours alone: with every tensor our reader returns doubled, the
    comparison fails at the first stage, while the reference (transformers' own loader) is unchanged."""
    original = compare.weights.CheckpointReader.read
    monkeypatch.setattr(compare.weights.CheckpointReader, "read", lambda self, name: 2 * original(self, name))
    assert_fails_at(compare_model_dir(every_architecture["llama"]), "embeddings")


def test_one_piece_per_side_holds_weights_at_a_time(every_architecture, monkeypatch) -> None:
    loaded_ours: list[str] = []
    loaded_theirs: list[tuple[str, ...]] = []
    holding = {"ours": 0, "theirs": 0}
    peak = {"ours": 0, "theirs": 0}

    def tracked(original, side, log):
        def wrapper(self, what, *args):
            log.append(what)
            holding[side] += 1
            peak[side] = max(peak[side], holding[side])
            try:
                with original(self, what, *args):
                    yield
            finally:
                holding[side] -= 1

        return compare.streaming.contextmanager(wrapper)

    monkeypatch.setattr(
        compare.streaming._OurPieces,
        "loaded",
        tracked(compare.streaming._OurPieces.loaded, "ours", loaded_ours),
    )
    monkeypatch.setattr(
        StreamedReference, "_loaded", tracked(StreamedReference._loaded, "theirs", loaded_theirs)
    )
    report = compare_model_dir(every_architecture["qwen2"])
    assert report.passed
    assert loaded_ours == ["embeddings", "layer.0", "layer.1", "layer.2", "final"]
    assert len(loaded_theirs) == 5 and peak == {"ours": 1, "theirs": 1}
    assert [piece["piece"] for piece in report.timing["pieces"]] == loaded_ours


# --------------------------------------------------------------------------------- carried and isolated


@pytest.mark.slow
def test_honest_deep_model_passes_in_isolation(deep_gpt2: Path) -> None:
    report = compare_model_dir(deep_gpt2, seq_len=16, batch=3)
    assert report.passed, report.render_table()
    assert report.first_failing_stage is None and len(report.stages) == 1 + 28 * 4 + 2
    # The point of isolation: carried through 28 layers, honest float32 rounding exceeds the
    # tolerance (this model is wide and deep enough for that), yet no stage is blamed.
    assert report.carried_failing_stages, "expected carried rounding to exceed the tolerance somewhere"
    last = {stage.name: stage for stage in report.stages}["layer.27.output"]
    assert last.isolated is not None and last.isolated.max_abs_diff < last.max_abs_diff
    assert (
        report.verdict().startswith("PASS: all 115 stages match") and "outside it carried" in report.verdict()
    )


def _exact_gelu_in_layer(bad: int):
    original = compare.gpt2._layer

    def layer(config, index):
        built = original(config, index)
        if index == bad:
            built.mlp.activation = compare.layers.gelu_exact  # tanh GELU expected: a ~1e-4 slip
        return built

    return layer


@pytest.mark.slow
@pytest.mark.parametrize("bad", [0, 13, 27])
def test_a_gelu_sized_bug_in_one_layer_is_blamed_on_it(deep_gpt2: Path, monkeypatch, bad: int) -> None:
    monkeypatch.setattr(compare.gpt2, "_layer", _exact_gelu_in_layer(bad))
    report = compare_model_dir(deep_gpt2, seq_len=16, batch=3)
    assert_fails_at(report, f"layer.{bad}.mlp")
    stages = {stage.name: stage for stage in report.stages}
    later = [name for name in stages if name.startswith("layer.") and int(name.split(".")[1]) > bad]
    later += ["final_norm", "logits"]
    assert all(stages[name].isolated.passed for name in later), "later layers do their own work right"
    assert report.failing_stages == [f"layer.{bad}.mlp"]
    assert not stages["logits"].passed, "carried, the slip reaches the logits"
    assert not stages[f"layer.{bad}.output"].passed and stages[f"layer.{bad}.output"].isolated.passed


@pytest.mark.slow
def test_a_bug_in_the_reference_layer_is_blamed_on_it(deep_gpt2: Path, monkeypatch) -> None:
    """The same, planted on the other side: transformers' layer 20 uses exact GELU."""
    original = StreamedReference.layer

    def layer(self, index, *args, **kwargs):
        if index == 20:
            self.model.transformer.h[20].mlp.act = torch.nn.GELU()  # exact erf form
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(StreamedReference, "layer", layer)
    report = compare_model_dir(deep_gpt2, seq_len=16, batch=3)
    assert_fails_at(report, "layer.20.mlp")
    stages = {stage.name: stage for stage in report.stages}
    assert report.failing_stages == ["layer.20.mlp"]
    assert not stages["layer.21.output"].passed and stages["layer.21.output"].isolated.passed


@pytest.mark.slow
def test_layers_range(deep_gpt2: Path, monkeypatch) -> None:
    report = compare_model_dir(deep_gpt2, seq_len=8, layers="12-14")
    assert report.passed and report.layers == "12-14"
    assert [stage.name for stage in report.stages] == [
        f"layer.{i}.{stage}"
        for i in (12, 13, 14)
        for stage in ("attention", "attention_residual", "mlp", "output")
    ]
    first = report.stages[0]  # fed the reference's output of layer 11, carried and isolated alike
    assert first.max_abs_diff == first.isolated.max_abs_diff
    assert [piece["piece"] for piece in report.timing["pieces"]] == ["layer.12", "layer.13", "layer.14"]
    assert "layers:    12-14 only" in report.render_table()
    last = compare_model_dir(deep_gpt2, seq_len=8, layers="27")
    assert [stage.name for stage in last.stages][-2:] == [
        "final_norm",
        "logits",
    ] and last.next_token is not None
    monkeypatch.setattr(compare.gpt2, "_layer", _exact_gelu_in_layer(13))
    assert_fails_at(compare_model_dir(deep_gpt2, seq_len=8, layers="13-14"), "layer.13.mlp")
    for bad in ("14-12", "0-28", "x"):
        with pytest.raises(CompareError, match="--layers"):
            compare_model_dir(deep_gpt2, layers=bad)


def test_report_json_has_carried_and_isolated(every_architecture, monkeypatch) -> None:
    monkeypatch.setattr(
        compare.layers.GatedFeedForward, "forward", lambda self, x: self.down(self.up(x) * self.up(x))
    )
    report = compare_model_dir(every_architecture["qwen3"], seq_len=6)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False and data["first_failing_stage"] == "layer.0.mlp"
    for stage in data["stages"]:
        assert set(stage["isolated"]) == set(ISOLATED_FIELDS)
        assert {"name", "passed", "max_abs_diff", "nmse", "p99_abs_diff", "tolerance_used"} <= set(stage)
    stages = {stage["name"]: stage for stage in data["stages"]}
    assert (
        stages["layer.1.attention"]["passed"] is False and stages["layer.1.attention"]["isolated"]["passed"]
    )
    # The total covers every piece's loading and running (and the inputs, the reader, ...) besides.
    pieces = data["timing"]["pieces"]
    assert data["timing"]["total_seconds"] >= sum(p["reference_seconds"] + p["ours_seconds"] for p in pieces)
    assert [piece["piece"] for piece in data["timing"]["pieces"]] == [
        "embeddings",
        "layer.0",
        "layer.1",
        "final",
    ]
    table = report.render_table()
    assert "isolated max" in table and "(carried FAIL)" in table


def test_nmse_and_p99_by_hand() -> None:
    ref = torch.arange(1.0, 201.0, dtype=torch.float64)  # 1 .. 200
    errors = torch.zeros(200, dtype=torch.float64)
    errors[:2] = 1.0  # two outliers: the 99th percentile does not see them
    errors[2:] = 1e-3
    ours, before = ref + errors, ref.clone()
    result = compare_tensors("s", ours, ref, atol=0.0, rtol=0.0)
    assert torch.equal(ref, before) and torch.equal(ours, before + errors), "the inputs are left as they were"
    assert result.nmse == pytest.approx((2 * 1.0 + 198 * 1e-6) / float((ref**2).sum()))
    assert result.p99_abs_diff == pytest.approx(1e-3) and result.max_abs_diff == pytest.approx(1.0)
    assert compare_tensors("z", torch.zeros(3), torch.zeros(3), atol=0, rtol=0).nmse == 0.0
    assert math.isclose(
        compare_tensors("one", torch.tensor([2.0]), torch.tensor([1.0]), atol=0, rtol=0).nmse, 1.0
    )


# ----------------------------------------------------------------------------------------------- memory


# Runs `hfmirror compare ARGS` and prints the process's own peak RSS (VmHWM) as it exits. Read inside
# the process: a child's ru_maxrss would start from this (large) test process's, inherited at fork.
_MEASURED_COMPARE = """
import atexit, sys
def report():
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK", peak.split()[1], file=sys.stderr)
atexit.register(report)
from hfmirror.cli import cli
cli(["compare", *sys.argv[1:]])
"""


def _peak_rss_mib(model_dir: Path) -> float:
    """Peak RSS of ``hfmirror compare`` on ``model_dir``, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-c", _MEASURED_COMPARE, str(model_dir), "--seq-len", "8", "--batch", "1"]
    result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = next(line for line in result.stderr.splitlines() if line.startswith("PEAK "))
    return int(peak.split()[1]) / 1024  # KiB


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    """Two Llama-shaped models of one width, 2 and 12 layers (bfloat16 on disk, compared in float32):
    held whole, the deeper one would need 10 x 51 MB more per side; streamed, about nothing more."""
    import transformers

    layer_mib = 0.0
    peaks = {}
    for layers in (2, 12):
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        layer_mib = sum(p.numel() for p in model.model.layers[0].parameters()) * 4 / 2**20  # float32
        model.save_pretrained(tmp_path / f"llama-{layers}")
        del model
        peaks[layers] = _peak_rss_mib(tmp_path / f"llama-{layers}")
    growth = peaks[12] - peaks[2]
    assert layer_mib > 45
    assert growth < 2 * layer_mib, (
        f"peak RSS {peaks}: grew {growth:.0f} MiB for 10 more layers of {layer_mib:.0f} MiB"
    )
