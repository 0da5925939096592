"""The decoders (GPT-2, Llama, Mistral, Qwen2, Qwen3, Qwen v1) and RoBERTa against transformers.

Every model is a tiny transformers model made here with non-default settings, every tensor re-drawn
(tests.test_compare_support), compared in float32 and float64. The anti-tautology tests break one
thing in *our* model (by monkeypatching) and check the comparison fails at the stage the bug first
touches. Qwen v1 is checked against an independent truth: a Qwen2 model written in Qwen v1's format by
the test's own conversion, whose original logits ours must reproduce.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import compare.bert
import compare.gpt2
import compare.layers
import compare.llama
import compare.model
import compare.qwen
import compare.roberta
from compare.architectures import REGISTRY, prepare_model, supported_model_types
from compare.layers import ACTIVATIONS, additive_padding_mask, gelu_exact
from compare.model import Recorder
from compare.runner import DEFAULT_TOLERANCES, compare_model_dir, random_inputs
from compare.weights import Transposed
from hfmirror.errors import CompareError, UnsupportedModelError, WeightLoadError
from tests.test_compare_support import (
    WORDS,
    assert_fails_at,
    convert_qwen2_to_qwen_v1,
    load_whole_model,
    remote_code_marker,
    rewrite_safetensors,
    save_random_decoder,
    save_word_tokenizer,
)

TEXTS = ["hello world", "the cat sat on the mat", "你 好 世 界"]

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # short, so that the rescaling touches every frequency
}

# name -> (model_type, config fields): each family with settings away from the defaults.
MODELS = {
    "gpt2-tied": ("gpt2", {}),
    "gpt2-untied-n_inner-layer-scaled": (
        "gpt2",
        dict(
            tie_word_embeddings=False,
            n_inner=50,
            scale_attn_by_inverse_layer_idx=True,
            layer_norm_epsilon=1e-3,
        ),
    ),
    "llama-gqa-biases-head_dim-llama3-tied": (
        "llama",
        dict(
            num_key_value_heads=2,
            attention_bias=True,
            mlp_bias=True,
            head_dim=12,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "llama-3layers-theta1000-gelu-untied": (
        "llama",
        dict(
            num_hidden_layers=3,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            hidden_act="gelu",
            rms_norm_eps=1e-5,
        ),
    ),
    "mistral-gqa4to1-sliding5": ("mistral", dict(num_key_value_heads=1, sliding_window=5)),
    "qwen2-gqa8to2-tied-theta1e6": (
        "qwen2",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    "qwen2-sliding-from-layer1": (
        "qwen2",
        dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3-head_dim16-bias-gqa4to1": ("qwen3", dict(head_dim=16, attention_bias=True, num_key_value_heads=1)),
    "roberta": ("roberta", {}),
    "xlm-roberta": ("xlm-roberta", {}),
}
ENCODERS = ("roberta", "xlm-roberta")


def expected_stages(model_type: str, layers: int) -> list[str]:
    if model_type in ENCODERS:
        per_layer = ["attention", "attention_add_norm", "feed_forward", "output"]
        first, last = ["embeddings"], ["last_hidden_state", "pooler"]
    else:
        per_layer = ["attention", "attention_residual", "mlp", "output"]
        first, last = ["embeddings"], ["final_norm", "logits"]
    return first + [f"layer.{i}.{stage}" for i in range(layers) for stage in per_layer] + last


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {
        name: save_random_decoder(root / name, model_type, seed=i, **fields)
        for i, (name, (model_type, fields)) in enumerate(MODELS.items())
    }


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an original Qwen2 model, the same model written in Qwen v1's format)."""
    root = tmp_path_factory.mktemp("qwen")
    original = save_random_decoder(
        root / "qwen2",
        "qwen2",
        seed=7,
        tokenizer=False,
        num_key_value_heads=4,  # Qwen v1 has no grouped-query attention
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return original, convert_qwen2_to_qwen_v1(original, root / "qwen-v1")


# ---------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("source", ["text", "random"])
def test_every_family_matches_transformers(
    models: dict[str, Path], name: str, dtype: str, source: str
) -> None:
    model_type, fields = MODELS[name]
    report = compare_model_dir(
        models[name], texts=TEXTS if source == "text" else None, dtype=dtype, seq_len=12, batch=3, seed=1
    )
    assert report.passed, report.render_table()
    layers = json.loads((models[name] / "config.json").read_text()).get("num_hidden_layers") or 2
    assert [stage.name for stage in report.stages] == expected_stages(model_type, layers)
    assert report.inputs["source"] == ("text" if source == "text" else "random token ids")
    assert report.inputs["padded_positions"] > 0, "the batch must contain padding to exercise the mask"
    assert report.inputs["seq_len"] > 5 or source == "text"  # longer than the sliding windows
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES[dtype]
    if dtype == "float64":
        assert report.max_abs_diff is not None and report.max_abs_diff < 1e-12
    if model_type in ENCODERS:
        assert report.next_token is None
        return
    assert report.next_token is not None
    assert report.next_token.agreement == 1.0
    assert report.next_token.positions <= sum(map(sum, report.inputs["attention_mask"]))
    assert report.next_token.kl_divergence_max < (1e-9 if dtype == "float32" else 1e-14)
    logits = report.stages[-1]
    assert logits.name == "logits" and logits.shape[-1] == len(WORDS) and logits.max_abs_diff is not None


def test_logits_equal_transformers_directly(models: dict[str, Path]) -> None:
    """Independent of the hooks: our logits vs AutoModelForCausalLM's forward output, per family."""
    from transformers import AutoModelForCausalLM

    inputs = random_inputs(
        batch=3, seq_len=11, seed=4, vocab_size=len(WORDS), type_vocab_size=1, pad_token_id=2
    )
    for name, (model_type, _) in MODELS.items():
        if model_type in ENCODERS:
            continue
        ours = load_whole_model(models[name], dtype=torch.float64).model
        reference = AutoModelForCausalLM.from_pretrained(
            models[name], dtype=torch.float64, attn_implementation="eager"
        ).eval()
        with torch.no_grad():
            logits = ours(inputs["input_ids"], inputs["attention_mask"])
            expected = reference(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits
        torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10, msg=name)
        assert logits.abs().max() > 0.5, f"{name}: O(1) logits, not a degenerate model"


def test_float64_nan_of_the_reference_is_reproduced_exactly(models: dict[str, Path]) -> None:
    """transformers' float64 softmax of a sliding-window layer runs in float32, where the float64 mask
    is -inf: a padded query whose window holds only padding gets nan, which then spreads along its row.
    Ours reproduces that element for element; the stages are measured on the other elements."""
    report = compare_model_dir(
        models["mistral-gqa4to1-sliding5"], dtype="float64", seq_len=12, batch=3, seed=1
    )
    assert report.passed, report.render_table()
    notes = [stage.note for stage in report.stages if stage.note]
    assert notes and all("nan/inf at the same" in note for note in notes)
    assert report.next_token is not None
    assert report.next_token.positions < sum(map(sum, report.inputs["attention_mask"]))
    # In float32 the same input has no nan at all.
    report = compare_model_dir(models["mistral-gqa4to1-sliding5"], seq_len=12, batch=3, seed=1)
    assert report.passed and not any(stage.note for stage in report.stages)


def test_sliding_window_is_applied(models: dict[str, Path]) -> None:
    mistral = load_whole_model(models["mistral-gqa4to1-sliding5"]).model
    context = mistral.make_context(
        torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long), None
    )
    sees = context.masks["sliding"][0, 0] == 0  # (T, T): which keys each query sees
    assert sees[7].tolist() == [False, False, False, True, True, True, True, True]  # itself and 4 before
    assert context.masks["full"][0, 0, 7].eq(0).all()
    qwen = load_whole_model(models["qwen2-sliding-from-layer1"]).model
    assert [layer.attention_kind for layer in qwen.layers] == ["full", "sliding", "sliding"]


# ------------------------------------------------------------------------------------- anti-tautology


def _interleaved_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoFormer paper's layout: feature 2j paired with 2j + 1 (wrong for these checkpoints)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


@pytest.mark.parametrize("name", ["llama-gqa-biases-head_dim-llama3-tied", "qwen2-gqa8to2-tied-theta1e6"])
def test_interleaved_rotary_fails_at_attention(models, monkeypatch, name) -> None:
    monkeypatch.setattr(compare.layers, "rotate_half", _interleaved_rotate_half)
    assert_fails_at(compare_model_dir(models[name]), "layer.0.attention")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wrong_rope_theta_fails_at_attention(models, monkeypatch, dtype) -> None:
    architecture = REGISTRY["qwen2"]

    def parse_with_llama_theta(raw):  # Qwen2's 1e6 read as Llama 2's 10000
        config = architecture.parse_config(raw)
        return dataclasses.replace(config, rotary=dataclasses.replace(config.rotary, theta=10000.0))

    monkeypatch.setitem(
        REGISTRY, "qwen2", dataclasses.replace(architecture, parse_config=parse_with_llama_theta)
    )
    assert_fails_at(
        compare_model_dir(models["qwen2-gqa8to2-tied-theta1e6"], dtype=dtype), "layer.0.attention"
    )


@pytest.mark.parametrize("name", ["llama-3layers-theta1000-gelu-untied", "gpt2-tied"])
def test_missing_causal_mask_fails_at_attention(models, monkeypatch, name) -> None:
    def padding_only(attention_mask, dtype, *, sliding_window=None):
        return additive_padding_mask(attention_mask, dtype)  # every position sees the future too

    monkeypatch.setattr(compare.llama, "causal_mask", padding_only)
    monkeypatch.setattr(compare.gpt2, "causal_mask", padding_only)
    assert_fails_at(compare_model_dir(models[name]), "layer.0.attention")


def test_ignored_sliding_window_fails_at_attention(models, monkeypatch) -> None:
    monkeypatch.setattr(
        compare.llama,
        "causal_mask",
        lambda attention_mask, dtype, *, sliding_window=None: compare.layers.causal_mask(
            attention_mask, dtype
        ),
    )
    assert_fails_at(compare_model_dir(models["mistral-gqa4to1-sliding5"], seq_len=12), "layer.0.attention")


def test_kv_heads_repeated_in_the_wrong_order_fail_at_attention(models, monkeypatch) -> None:
    # k0 k1 k0 k1 instead of k0 k0 k1 k1: every key/value head serves the wrong query heads.
    monkeypatch.setattr(compare.layers, "repeat_kv", lambda x, n_rep: x.repeat(1, n_rep, 1, 1))
    assert_fails_at(compare_model_dir(models["qwen2-gqa8to2-tied-theta1e6"]), "layer.0.attention")


def test_rms_norm_that_subtracts_the_mean_fails_at_attention(models, monkeypatch) -> None:
    def layer_norm_like(self, x):
        h = x.to(torch.float32)
        h = h - h.mean(dim=-1, keepdim=True)  # RMSNorm does not re-centre
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    monkeypatch.setattr(compare.layers.RMSNorm, "forward", layer_norm_like)
    # The first RMSNorm is the one before layer 0's attention; the embeddings are untouched.
    assert_fails_at(compare_model_dir(models["llama-3layers-theta1000-gelu-untied"]), "layer.0.attention")


def test_gate_and_up_swapped_fail_at_mlp(models, monkeypatch) -> None:
    def swapped(self, x):
        return self.down(self.activation(self.up(x)) * self.gate(x))

    monkeypatch.setattr(compare.layers.GatedFeedForward, "forward", swapped)
    assert_fails_at(compare_model_dir(models["qwen3-head_dim16-bias-gqa4to1"]), "layer.0.mlp")


def test_gpt2_conv1d_not_transposed_fails(models, monkeypatch) -> None:
    architecture = REGISTRY["gpt2"]

    def untransposed(only: str):
        def weight_map(config):
            return {
                ours: source.name if isinstance(source, Transposed) and only in source.name else source
                for ours, source in architecture.weight_map(config).items()
            }

        return weight_map

    # The square c_proj of the attention still fits, so only the numbers are wrong.
    monkeypatch.setitem(
        REGISTRY, "gpt2", dataclasses.replace(architecture, weight_map=untransposed("attn.c_proj"))
    )
    assert_fails_at(compare_model_dir(models["gpt2-tied"]), "layer.0.attention")
    # c_attn (C, 3C) read without transposing cannot even be loaded; the error names the tensor.
    monkeypatch.setitem(
        REGISTRY, "gpt2", dataclasses.replace(architecture, weight_map=untransposed("c_attn"))
    )
    with pytest.raises(
        WeightLoadError, match=r"h\.0\.attn\.c_attn\.weight' has shape \(32, 96\), expected \(96, 32\)"
    ):
        load_whole_model(models["gpt2-tied"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_gelu_instead_of_tanh_fails_at_mlp(models, monkeypatch, dtype) -> None:
    # GPT-2's "gelu_new" is the tanh form; the exact erf form differs by up to ~1e-3 (nanoGPT's slip).
    monkeypatch.setitem(ACTIVATIONS, "gelu_new", gelu_exact)
    assert_fails_at(compare_model_dir(models["gpt2-untied-n_inner-layer-scaled"], dtype=dtype), "layer.0.mlp")


def test_roberta_positions_from_zero_fail_at_embeddings(models, monkeypatch) -> None:
    monkeypatch.setattr(compare.roberta.RobertaModel, "positions", compare.bert.BertModel.positions)
    assert_fails_at(compare_model_dir(models["roberta"], texts=TEXTS), "embeddings")


# ----------------------------------------------------------------------------------------------- Qwen v1


def test_qwen_v1_equals_the_original_qwen2_model(qwen_pair: tuple[Path, Path]) -> None:
    """The independent truth: a mistake shared by our reader and the reference's conversion cannot hide."""
    from transformers import AutoModelForCausalLM

    original, qwen = qwen_pair
    inputs = random_inputs(
        batch=3, seq_len=10, seed=2, vocab_size=len(WORDS), type_vocab_size=1, pad_token_id=2
    )
    ours = load_whole_model(qwen, dtype=torch.float64).model
    truth = AutoModelForCausalLM.from_pretrained(
        original, dtype=torch.float64, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = ours(inputs["input_ids"], inputs["attention_mask"])
        expected = truth(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert logits.abs().max() > 0.5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_qwen_v1_matches_its_converted_reference(qwen_pair: tuple[Path, Path], dtype: str) -> None:
    _, qwen = qwen_pair
    report = compare_model_dir(qwen, dtype=dtype, seq_len=12, batch=3)
    assert report.passed, report.render_table()
    assert [stage.name for stage in report.stages] == expected_stages("qwen", 2)
    assert "Qwen2ForCausalLM" in report.reference and "conversion" in report.reference
    assert "Qwen2ForCausalLM" in report.render_table() and report.to_dict()["reference"] == report.reference
    assert report.next_token is not None and report.next_token.agreement == 1.0


def test_qwen_v1_buffers_saved_beside_the_weights_are_ignored_by_both_sides(qwen_pair, tmp_path) -> None:
    """Old Qwen v1 checkpoints carry masked_bias and rotary_emb.inv_freq: our model and the
    conversion for the reference both leave them out (one list, compare.qwen.QWEN_IGNORED)."""
    import shutil

    path = Path(shutil.copytree(qwen_pair[1], tmp_path / "qwen-v1-buffers"))

    def with_buffers(state):
        for i in range(2):
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
            state[f"transformer.h.{i}.attn.rotary_emb.inv_freq"] = torch.rand(4)
        return state

    rewrite_safetensors(path, with_buffers)
    report = compare_model_dir(path, seq_len=6)
    assert report.passed, report.render_table()


def test_qwen_v1_w1_and_w2_swapped_fail_at_mlp(qwen_pair, monkeypatch) -> None:
    architecture = REGISTRY["qwen"]
    swap = {"mlp.w1": "mlp.w2", "mlp.w2": "mlp.w1"}

    def swapped_map(config):
        return {
            ours: next((theirs.replace(a, b) for a, b in swap.items() if a in theirs), theirs)
            for ours, theirs in architecture.weight_map(config).items()
        }

    monkeypatch.setitem(REGISTRY, "qwen", dataclasses.replace(architecture, weight_map=swapped_map))
    assert_fails_at(compare_model_dir(qwen_pair[1]), "layer.0.mlp")


def test_qwen_v1_conversion_mistake_in_the_reference_is_caught(qwen_pair, monkeypatch) -> None:
    """A wrong reference conversion fails the comparison, while our reader still equals the truth."""
    monkeypatch.setitem(compare.qwen._QWEN2_NAMES, "mlp.w1.weight", "mlp.gate_proj.weight")
    monkeypatch.setitem(compare.qwen._QWEN2_NAMES, "mlp.w2.weight", "mlp.up_proj.weight")
    assert_fails_at(compare_model_dir(qwen_pair[1]), "layer.0.mlp")


def test_qwen_v1_tokenizer_is_remote_code_and_never_run(qwen_pair, tmp_path: Path) -> None:
    _, qwen = qwen_pair
    notes: list[str] = []
    report = compare_model_dir(qwen, texts=["hello world"], on_note=notes.append)
    assert report.passed, report.render_table()
    assert report.inputs["source"] == "random token ids" and report.inputs["texts_not_used"] == [
        "hello world"
    ]
    assert len(notes) == 1 and "custom code, which is never run" in notes[0] and "--tokenizer" in notes[0]
    assert report.inputs["note"] == notes[0]
    assert not remote_code_marker(qwen).exists()
    # --tokenizer: another tokenizer's ids are used.
    tokenizer = save_word_tokenizer(tmp_path / "tokenizer")
    report = compare_model_dir(qwen, texts=["hello world", "the cat"], tokenizer=tokenizer)
    assert report.passed and report.inputs["source"] == "text"
    assert report.inputs["tokens"][0] == ["hello", "world"] and report.inputs["input_ids"][0] == [5, 6]
    assert report.inputs["attention_mask"] == [[1, 1], [1, 1]]


def test_qwen_v1_refuses_inputs_longer_than_seq_length(qwen_pair) -> None:
    with pytest.raises(CompareError, match="seq_len 65 is longer than the model takes: 64 .seq_length"):
        compare_model_dir(qwen_pair[1], seq_len=65)


# ------------------------------------------------------------------------------------ inputs and report


def test_decoder_text_is_padded_on_the_right_with_eos(models: dict[str, Path]) -> None:
    report = compare_model_dir(
        models["llama-3layers-theta1000-gelu-untied"], texts=["hello world", "the cat sat"]
    )
    assert report.passed
    assert report.inputs["input_ids"] == [[5, 6, 2], [7, 8, 9]]  # <|endoftext|> (2) pads on the right
    assert report.inputs["attention_mask"] == [[1, 1, 0], [1, 1, 1]]
    assert report.inputs["tokens"][1] == ["the", "cat", "sat"]
    assert report.next_token is not None and report.next_token.positions == 5


def test_decoder_report_json(models: dict[str, Path]) -> None:
    report = compare_model_dir(
        models["qwen2-gqa8to2-tied-theta1e6"], seq_len=7, batch=3, model_name="tiny-qwen2"
    )
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    for key in ("model", "passed", "max_abs_diff", "first_failing_stage", "stages", "versions", "inputs"):
        assert key in data
    ids, mask = data["inputs"]["input_ids"], data["inputs"]["attention_mask"]
    assert len(ids) == 3 and all(len(row) == 7 for row in ids) and len(mask) == 3
    assert data["top1"]["ours"] == data["top1"]["reference"]
    assert [len(row) for row in data["top1"]["ours"]] == [7, 7, 7]
    assert all(0 <= token < len(WORDS) for row in data["top1"]["ours"] for token in row)
    assert data["next_token"]["agreement"] == 1.0 and data["next_token"]["positions"] == sum(map(sum, mask))
    assert data["next_token"]["kl_divergence_max"] < 1e-9
    assert "padded ones included" in data["inputs"]["compared_positions"]
    table = report.render_table()
    assert "next token: the top-1 token agrees at 100.0%" in table and "compared:" in table
    assert "input_ids" not in table  # the ids are in the JSON, not the one-line summary


def test_top1_disagreement_is_reported(models: dict[str, Path], monkeypatch) -> None:
    finish = compare.llama.LlamaModel.finish

    def noisy_logits(self, x, context, record):
        noise = 5 * torch.randn(
            x.shape[:-1] + (self.config.vocab_size,), generator=torch.Generator().manual_seed(0)
        )
        return finish(self, x, context, lambda name, t: record(name, t + noise if name == "logits" else t))

    monkeypatch.setattr(compare.llama.LlamaModel, "finish", noisy_logits)
    report = compare_model_dir(models["qwen2-gqa8to2-tied-theta1e6"], seq_len=10, batch=3)
    assert not report.passed and report.next_token is not None
    assert report.next_token.agreement < 1.0 and report.next_token.kl_divergence_mean > 1e-3
    assert report.to_dict()["top1"]["ours"] != report.to_dict()["top1"]["reference"]


def _whole_model_attention(path: Path, inputs: dict) -> dict[str, torch.Tensor]:
    """transformers' own attention weights, (B, nh, T, T) per layer, from its whole model."""
    from compare.reference import load_reference, reference_stages

    prepared = prepare_model(path)
    architecture = prepared.architecture
    model = load_reference(
        path, architecture=architecture, config=prepared.config, dtype=torch.float32, options=prepared.options
    )
    if not architecture.uses_token_types:
        inputs = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    return reference_stages(model, architecture.reference, inputs, keep_attention=True).attention


@pytest.mark.parametrize("name", ["qwen3-head_dim16-bias-gqa4to1", "gpt2-tied", "roberta"])
def test_attention_weights_of_the_first_row_ours_and_reference(models: dict[str, Path], name: str) -> None:
    report = compare_model_dir(models[name], seq_len=9, batch=2, keep_attention=True)
    assert report.passed and report.attention is not None
    ours, theirs = report.attention.ours, report.attention.reference
    layers, heads = 2, 4
    assert list(ours) == list(theirs) == [f"layer.{i}" for i in range(layers)]
    ids = torch.tensor(report.inputs["input_ids"])
    mask = torch.tensor(report.inputs["attention_mask"])
    assert int(mask[0].sum()) == 9  # random ids: the first row is never padded
    whole = _whole_model_attention(models[name], {"input_ids": ids, "attention_mask": mask})
    for key in ours:
        assert ours[key].shape == theirs[key].shape == (heads, 9, 9)  # one row kept, not the batch
        torch.testing.assert_close(theirs[key], whole[key][0], rtol=0, atol=1e-7)
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[key].sum(-1), torch.ones(heads, 9))  # each row is a distribution
        if name != "roberta":  # a decoder's triangle: nothing above the diagonal
            assert (ours[key].triu(diagonal=1) == 0).all()
    assert report.attention.tokens == report.inputs["token_labels"][0]
    assert compare_model_dir(models[name]).attention is None  # only when asked


def test_attention_weights_for_the_html_report(models: dict[str, Path]) -> None:
    """The first text's real tokens only (padding left out), labelled as they read; capped to the
    page's budget of cells when asked."""
    texts = ["hello world", "the cat sat on"]
    report = compare_model_dir(models["gpt2-tied"], texts=texts, keep_attention=True)
    assert report.attention is not None and report.attention.causal
    maps = report.attention.maps()
    assert maps.tokens == ("hello", "world") and maps.text == "hello world" and not maps.notes
    assert maps.num_layers == 2 and maps.causal and maps.ours[1].shape == (4, 2, 2)
    ids, mask = torch.tensor(report.inputs["input_ids"]), torch.tensor(report.inputs["attention_mask"])
    assert mask[0].tolist() == [1, 1, 0, 0]  # "hello world" is padded to 4 tokens
    whole = _whole_model_attention(models["gpt2-tied"], {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(torch.from_numpy(maps.reference[1]), whole["layer.1"][0, :, :2, :2].double())

    # 2 layers x 4 heads x n^2 <= 8 cells: one token is drawn, and the page will say so.
    capped = compare_model_dir(models["gpt2-tied"], texts=texts, keep_attention=True, attention_cells=8)
    assert capped.attention is not None and capped.attention.tokens == ["hello", "world"]
    maps = capped.attention.maps()
    assert maps.tokens == ("hello",) and maps.ours[0].shape == (4, 1, 1)
    assert len(maps.notes) == 1 and "has 2 tokens; the maps show the first 1" in maps.notes[0]


# ------------------------------------------------------------------------------------ building blocks


def test_recorder_carries_ours_or_isolates_with_theirs() -> None:
    ours, theirs = torch.ones(2), torch.zeros(2)
    carried = Recorder()
    assert carried.scoped("layer.0")("mlp", ours) is ours and list(carried.stages) == ["layer.0.mlp"]
    isolated = Recorder(substitute={"layer.0.mlp": theirs})
    assert torch.equal(isolated.scoped("layer.0")("mlp", ours), theirs)
    assert torch.equal(isolated.stages["layer.0.mlp"], ours)  # what is recorded is always ours
    assert isolated("other", ours) is ours  # no reference tensor: continue with ours
    assert isolated("layer.0.mlp", torch.ones(3)).shape == (3,)  # a shape mismatch is not substituted
    isolated.scoped("layer.1").attention_weights(ours)
    assert isolated.attention == {}
    kept = Recorder(keep_attention=True)
    kept.scoped("layer.1").attention_weights(ours)
    assert list(kept.attention) == ["layer.1"]


def test_what_a_stage_recorded_cannot_be_changed_in_place_afterwards() -> None:
    """A forward pass may work in place on what ``record`` hands back: neither the reference's tensor
    it was handed (isolated) nor our recorded stage may change with it."""
    ours, theirs = torch.ones(2), torch.zeros(2)
    isolated = Recorder(substitute={"mlp": theirs})
    isolated("mlp", ours).add_(5)
    assert torch.equal(theirs, torch.zeros(2)) and torch.equal(isolated.stages["mlp"], torch.ones(2))
    carried = Recorder()
    carried("mlp", ours).add_(5)
    assert torch.equal(carried.stages["mlp"], torch.ones(2))


def test_in_place_work_after_a_stage_is_blamed_on_the_next_stage(models, monkeypatch) -> None:
    """Our layer doubles its MLP output in place after recording it (a bug in the residual sum): the
    MLP stage itself is right, in both runs; the layer's output is wrong. Were the recorded tensors
    (or the reference's, handed to the isolated run) changed by the in-place work, the blame would
    land on the MLP."""

    def doubled_in_place(self, x, context, record=compare.model.NO_RECORDING):
        mask = context.masks[self.attention_kind]
        attention_out = record(
            "attention", self.attention(self.attention_norm(x), mask, context.rotary, record)
        )
        x = record("attention_residual", x + attention_out)
        mlp_out = record("mlp", self.mlp(self.mlp_norm(x)))
        mlp_out.mul_(2)
        return record("output", x + mlp_out)

    monkeypatch.setattr(compare.layers.PreNormDecoderLayer, "forward", doubled_in_place)
    report = compare_model_dir(models["qwen2-gqa8to2-tied-theta1e6"], dtype="float64")
    assert_fails_at(report, "layer.0.output")
    mlp = {stage.name: stage for stage in report.stages}["layer.0.mlp"]
    assert mlp.passed and mlp.isolated.passed


def test_rotary_rotates_pairs_and_keeps_relative_position() -> None:
    from compare.config import RotaryParameters

    inverse = compare.layers.rotary_inverse_frequencies(8, RotaryParameters(theta=100.0))
    torch.testing.assert_close(inverse, torch.tensor([1.0, 100**-0.25, 100**-0.5, 100**-0.75]))
    cos, sin = compare.layers.rotary_cos_sin(torch.arange(6)[None], inverse, torch.float64)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    rotated = [
        compare.layers.apply_rotary(q.expand(1, 1, 6, 8), cos, sin),
        compare.layers.apply_rotary(k.expand(1, 1, 6, 8), cos, sin),
    ]
    scores = rotated[0][0, 0] @ rotated[1][0, 0].T  # (6, 6)
    torch.testing.assert_close(scores[3, 1], scores[5, 3])  # the score depends on m - n only
    assert torch.allclose(rotated[0].norm(dim=-1), q.norm(dim=-1).expand(1, 1, 6))  # a rotation


def test_pieces_partition_the_weight_map(models: dict[str, Path]) -> None:
    """Each of our parameters belongs to exactly one piece (the embeddings, one layer, the final
    modules), by the module prefixes the comparison loads each piece with."""
    for name in ("gpt2-tied", "llama-gqa-biases-head_dim-llama3-tied", "roberta"):
        prepared = prepare_model(models[name])
        pieces = ["embeddings", "layer.0", "layer.1", "final"]
        owners: dict[str, list[str]] = {}
        for piece in pieces:
            prefixes = tuple(prefix for prefix, _ in prepared.model.piece_modules(piece))
            for parameter in prepared.plan:
                if parameter.startswith(prefixes):
                    owners.setdefault(parameter, []).append(piece)
        assert set(owners) == set(prepared.weight_map), name  # every parameter is in a piece
        assert all(len(found) == 1 for found in owners.values()), name  # and in one only
        assert {p for p, found in owners.items() if found == ["layer.1"]} == {
            p for p in prepared.weight_map if p.startswith("layers.1.")
        }


def test_gpt2_hub_layout_loads(models: dict[str, Path], tmp_path: Path) -> None:
    """The hub's gpt2: no ``transformer.`` prefix, and the causal-mask buffers saved beside the weights."""
    import shutil

    path = Path(shutil.copytree(models["gpt2-tied"], tmp_path / "gpt2"))

    def hub_layout(state):
        state = {name.removeprefix("transformer."): tensor for name, tensor in state.items()}
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return state

    rewrite_safetensors(path, hub_layout)
    report = compare_model_dir(path, dtype="float64")
    assert report.passed, report.render_table()


TIED = {"gpt2-tied": "transformer.wte.weight", "qwen2-gqa8to2-tied-theta1e6": "model.embed_tokens.weight"}


def _stored_head(case: str, embeddings: str):
    """How a checkpoint whose config.json ties the LM head to the embeddings may store them."""

    def change(state: dict) -> dict:
        if case == "both, equal":
            state["lm_head.weight"] = state[embeddings].clone()
        elif case == "both, different":
            state["lm_head.weight"] = 0.5 * state[embeddings] + 0.1
        else:  # "head only"
            state["lm_head.weight"] = state.pop(embeddings)
        return state

    return change


@pytest.mark.parametrize("name", list(TIED))
@pytest.mark.parametrize("case", ["both, equal", "both, different", "head only"])
def test_a_tied_head_stored_in_the_checkpoint_is_read_as_transformers_reads_it(
    models: dict[str, Path], tmp_path: Path, name: str, case: str
) -> None:
    """config.json ties the head, the checkpoint stores it anyway: transformers uses the stored head
    (untied if it differs), or ties the embeddings to a head stored alone. Ours and the streamed
    reference must read it the same way, and the streamed reference must be from_pretrained's."""
    import shutil

    import transformers
    from safetensors.torch import load_file

    from compare.reference import load_reference, reference_stages
    from compare.reference_stream import StreamedReference

    path = rewrite_safetensors(
        shutil.copytree(models[name], tmp_path / "tied"), _stored_head(case, TIED[name])
    )
    assert json.loads((path / "config.json").read_text()).get("tie_word_embeddings", True)
    report = compare_model_dir(path, dtype="float64")
    assert report.passed, report.render_table()

    prepared = prepare_model(path, dtype=torch.float64)
    inputs = random_inputs(
        batch=2, seq_len=6, seed=1, vocab_size=len(WORDS), type_vocab_size=1, pad_token_id=2
    )
    del inputs["token_type_ids"]
    options = dict(architecture=prepared.architecture, config=prepared.config, dtype=torch.float64)
    whole_model = load_reference(path, **options, options=prepared.options)
    whole = reference_stages(whole_model, prepared.architecture.reference, inputs)
    streamed = StreamedReference(
        path, **options, files=prepared.reader.files, options=prepared.options
    ).stages(inputs)
    torch.testing.assert_close(streamed.stages["logits"], whole.stages["logits"], rtol=0, atol=1e-12)
    # What from_pretrained did, read off the model it loaded: the stored head is the head.
    stored = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    head = stored.get_output_embeddings().weight
    assert torch.equal(head, load_file(path / "model.safetensors")["lm_head.weight"].double())
    assert (head is stored.get_input_embeddings().weight) == (case != "both, different")


def test_a_tied_checkpoint_in_the_pickle_format_holds_both_names(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """``torch.save(model.state_dict())`` of a tied model writes the head and the embeddings, sharing
    one storage, as old pytorch_model.bin checkpoints do."""
    import shutil

    import transformers

    path = Path(shutil.copytree(models["gpt2-tied"], tmp_path / "gpt2-bin"))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert "lm_head.weight" in torch.load(path / "pytorch_model.bin", weights_only=True)
    report = compare_model_dir(path)
    assert report.passed, report.render_table()


# ------------------------------------------------------------------------------------------ config


def _with_config(path: Path, tmp_path: Path, **changes) -> Path:
    import shutil

    copy = Path(shutil.copytree(path, tmp_path / path.name))
    config = json.loads((copy / "config.json").read_text()) | changes
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("name", "changes", "error", "message"),
    [
        (
            "llama-3layers-theta1000-gelu-untied",
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
            UnsupportedModelError,
            "rope_type 'yarn' is not supported; supported: default, llama3",
        ),
        (
            "llama-3layers-theta1000-gelu-untied",
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            UnsupportedModelError,
            "partial_rotary_factor 0.5",
        ),
        (
            "llama-3layers-theta1000-gelu-untied",
            {"num_key_value_heads": 3},
            CompareError,
            r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)",
        ),
        (
            "llama-3layers-theta1000-gelu-untied",
            {"hidden_act": "mish"},
            UnsupportedModelError,
            "hidden_act 'mish'",
        ),
        ("gpt2-tied", {"reorder_and_upcast_attn": True}, UnsupportedModelError, "reorder_and_upcast_attn"),
        (
            "gpt2-tied",
            {"activation_function": "quick_gelu"},
            UnsupportedModelError,
            "activation_function 'quick_gelu'",
        ),
    ],
)
def test_unsupported_variants_are_named(models, tmp_path, name, changes, error, message) -> None:
    with pytest.raises(error, match=message):
        compare_model_dir(_with_config(models[name], tmp_path, **changes))


def test_old_style_rope_config_is_read(models, tmp_path) -> None:
    """Older configs keep rope_theta at the top level and call rope_parameters rope_scaling."""
    path = _with_config(models["llama-3layers-theta1000-gelu-untied"], tmp_path, rope_theta=1000.0)
    config = json.loads((path / "config.json").read_text())
    del config["rope_parameters"]
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_whole_model(path)
    assert loaded.config.rotary.theta == 1000.0 and loaded.config.rotary.rope_type == "default"
    assert compare_model_dir(path).passed


def test_qwen_v1_variants_are_refused(qwen_pair, tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match="rotary_pct"):
        compare_model_dir(_with_config(qwen_pair[1], tmp_path / "a", rotary_pct=0.5))
    with pytest.raises(CompareError, match=r"kv_channels \(4\) x num_attention_heads \(4\) must equal"):
        compare_model_dir(_with_config(qwen_pair[1], tmp_path / "b", kv_channels=4))


def test_every_model_type_is_listed_in_help_and_readme() -> None:
    from click.testing import CliRunner

    from hfmirror.compare_command import SUPPORTED_MODEL_TYPES, compare

    assert list(SUPPORTED_MODEL_TYPES) == supported_model_types()
    help_text = " ".join(CliRunner().invoke(compare, ["--help"]).output.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraphs = [" ".join(p.split()) for p in readme.split("\n\n")]
    supported_line = next(p for p in paragraphs if p.startswith("Supported model types:"))
    for model_type in supported_model_types():
        assert model_type in help_text, model_type
        assert f"`{model_type}`" in supported_line, model_type
