"""Checkpoint formats and naming variants load into our model; malformed ones fail naming the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compare.architectures import REGISTRY
from compare.runner import compare_model_dir
from compare.weights import checkpoint_files
from hfmirror.errors import CompareError, WeightLoadError
from tests.test_compare_support import (
    load_whole_model,
    rewrite_safetensors,
    save_random_bert,
    write_sharded_bin,
)

LAYERS = 2


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whatever its format (read with the test's own code)."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state |= load_file(file)
    for file in sorted(path.glob("*.bin")):
        state |= torch.load(file, weights_only=True)
    return state


def _assert_parameters_are_the_checkpoint(path: Path, prefix: str = "") -> None:
    """Through the explicit weight map, every parameter equals its checkpoint tensor bit for bit."""
    loaded = load_whole_model(path, dtype=torch.float32)
    state = _checkpoint_state(path)
    weight_map = REGISTRY["bert"].weight_map(loaded.config, **loaded.options)
    parameters = dict(loaded.model.named_parameters())
    assert set(parameters) == set(weight_map)
    for ours, theirs in weight_map.items():
        assert torch.equal(parameters[ours], state[prefix + theirs]), ours
        assert parameters[ours].device.type == "cpu"


# ----------------------------------------------------------------------------------------------- variants


def test_bert_for_pretraining_checkpoint(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", architecture="BertForPreTraining")
    names = _checkpoint_state(path)
    assert any(name.startswith("cls.") for name in names) and all(
        name.startswith(("bert.", "cls.")) for name in names
    )
    _assert_parameters_are_the_checkpoint(path, prefix="bert.")
    report = compare_model_dir(path, texts=["the cat sat on the mat", "hello"])
    assert report.passed, report.render_table()
    assert report.stages[-1].name == "pooler"


def test_bert_for_masked_lm_checkpoint_has_no_pooler(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", architecture="BertForMaskedLM")
    assert not any("pooler" in name for name in _checkpoint_state(path))
    loaded = load_whole_model(path)
    assert loaded.options == {"with_pooler": False} and loaded.model.pooler is None
    report = compare_model_dir(path)
    assert report.passed, report.render_table()
    assert [stage.name for stage in report.stages][-1] == "last_hidden_state"


def test_gamma_beta_layer_norm_names(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", architecture="BertForPreTraining")
    original = _checkpoint_state(path)

    def rename(state):
        return {
            name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
            for name, t in state.items()
        }

    rewrite_safetensors(path, rename)
    assert any(name.endswith("LayerNorm.gamma") for name in _checkpoint_state(path))
    loaded = load_whole_model(path)
    # gamma -> weight and beta -> bias, not the other way round (the random draws differ).
    torch.testing.assert_close(
        loaded.model.embeddings.norm.weight, original["bert.embeddings.LayerNorm.weight"]
    )
    torch.testing.assert_close(loaded.model.embeddings.norm.bias, original["bert.embeddings.LayerNorm.bias"])
    torch.testing.assert_close(
        loaded.model.layers[1].feed_forward_norm.weight,
        original["bert.encoder.layer.1.output.LayerNorm.weight"],
    )
    report = compare_model_dir(path)
    assert report.passed, report.render_table()


def test_position_ids_buffer_is_ignored(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m")
    rewrite_safetensors(path, lambda state: state | {"embeddings.position_ids": torch.arange(64)[None]})
    _assert_parameters_are_the_checkpoint(path)


def test_pytorch_model_bin(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", safe_serialization=False)
    assert [f.name for f in checkpoint_files(path)] == ["pytorch_model.bin"]
    _assert_parameters_are_the_checkpoint(path)
    assert compare_model_dir(path, dtype="float64").passed


def test_sharded_safetensors(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", max_shard_size="20KB")
    files = checkpoint_files(path)
    assert len(files) > 1 and (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    _assert_parameters_are_the_checkpoint(path)
    report = compare_model_dir(path, texts=["a dog ran", "the cat sat on the mat"])
    assert report.passed, report.render_table()


def test_sharded_pytorch_model_bin(tmp_path: Path) -> None:
    path = write_sharded_bin(save_random_bert(tmp_path / "m", safe_serialization=False), n_shards=3)
    assert len(checkpoint_files(path)) == 3
    _assert_parameters_are_the_checkpoint(path)
    assert compare_model_dir(path).passed


def test_float64_parameters(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m")
    model = load_whole_model(path, dtype=torch.float64).model
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- malformed


def test_missing_tensor(tmp_path: Path) -> None:
    name = "encoder.layer.1.intermediate.dense.bias"
    path = rewrite_safetensors(
        save_random_bert(tmp_path / "m"), lambda s: {k: v for k, v in s.items() if k != name}
    )
    with pytest.raises(WeightLoadError, match=f"missing.*'{name}'"):
        load_whole_model(path)
    with pytest.raises(WeightLoadError, match=name):  # the comparison fails the same way, before transformers
        compare_model_dir(path)


def test_unexpected_tensor(tmp_path: Path) -> None:
    name = "encoder.layer.0.attention.self.extra.weight"
    path = rewrite_safetensors(save_random_bert(tmp_path / "m"), lambda s: s | {name: torch.zeros(3)})
    with pytest.raises(WeightLoadError, match=f"unexpected tensor '{name}'"):
        load_whole_model(path)


def test_wrongly_shaped_tensor(tmp_path: Path) -> None:
    name = "encoder.layer.0.intermediate.dense.weight"  # (37, 32) in the default tiny BERT
    path = rewrite_safetensors(save_random_bert(tmp_path / "m"), lambda s: s | {name: torch.zeros(36, 32)})
    with pytest.raises(WeightLoadError, match=rf"'{name}' has shape \(36, 32\), expected \(37, 32\)"):
        load_whole_model(path)


def test_duplicated_tensor_under_both_names(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m")
    rewrite_safetensors(path, lambda s: s | {"bert.pooler.dense.bias": s["pooler.dense.bias"].clone()})
    with pytest.raises(WeightLoadError, match="pooler.dense.bias.*twice"):
        load_whole_model(path)


class NotATensor:
    """Anything a pickle could carry that is not plain data."""


def test_pickle_with_an_object_is_refused(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", safe_serialization=False)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save(state | {"evil": NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(WeightLoadError, match=r"weights_only=True.*Unsupported global.*NotATensor"):
        load_whole_model(path)


def test_pickle_with_a_non_tensor_value(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", safe_serialization=False)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save(state | {"step": 3}, path / "pytorch_model.bin")
    with pytest.raises(WeightLoadError, match="'step' is a int, not a tensor"):
        load_whole_model(path)


def test_no_weights(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no weights"):
        load_whole_model(path)


def test_shard_missing_from_disk(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", max_shard_size="20KB")
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightLoadError, match=shard.name):
        load_whole_model(path)


def test_unsafe_shard_name_in_index(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m", max_shard_size="20KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match="unsafe shard"):
        load_whole_model(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = save_random_bert(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        load_whole_model(path)


def test_weight_load_error_is_a_compare_error() -> None:
    assert issubclass(WeightLoadError, CompareError)
