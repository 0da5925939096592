"""Which from-scratch implementation goes with which checkpoint: the registry, keyed by model_type.

Adding an architecture (RoBERTa, GPT-2, Llama...) means writing its module (config parser, model,
weight map, like compare.bert) and one ``Architecture`` entry here, plus its hook points in
compare.reference. Nothing else changes. Only torch is imported; never transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfmirror.errors import UnsupportedModelError

from .bert import BertModel, bert_weight_map
from .config import BertConfig, read_config_json
from .weights import checkpoint_files, checkpoint_tensor_names, load_weights

__all__ = [
    "REGISTRY",
    "Architecture",
    "LoadedModel",
    "architecture_for",
    "load_model",
    "supported_model_types",
]


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build one kind of model from a checkpoint folder."""

    model_type: str  # config.json's "model_type"
    parse_config: Callable[[dict[str, Any]], Any]  # raw config.json -> typed, validated config
    model_class: Callable[..., nn.Module]  # (config, **options) -> model
    weight_map: Callable[..., dict[str, str]]  # (config, **options) -> {our name: checkpoint name}
    base_prefix: str  # prefix of the base model's tensors in task checkpoints ("bert.")
    head_prefixes: tuple[str, ...] = ()  # task heads outside the base model: ignored
    buffer_names: tuple[str, ...] = ()  # non-learned buffers some checkpoints carry: ignored
    legacy_suffixes: dict[str, str] = field(default_factory=dict)  # old name ending -> current one
    # Options that depend on which tensors the checkpoint has (e.g. a pooler or not).
    detect_options: Callable[[set[str]], dict[str, Any]] = lambda names: {}

    def canonical_name(self, name: str) -> str | None:
        """A checkpoint tensor name as the weight map spells it, or None for a tensor to ignore."""
        if name.startswith(self.head_prefixes):
            return None  # e.g. cls.predictions.* of BertForPreTraining: not part of the encoder
        name = name.removeprefix(self.base_prefix)
        if name.rsplit(".", 1)[-1] in self.buffer_names:
            return None
        for old, new in self.legacy_suffixes.items():
            if name.endswith(old):
                return name[: -len(old)] + new
        return name


def _bert_options(names: set[str]) -> dict[str, Any]:
    # BertForMaskedLM checkpoints have no pooler; BertModel and BertForPreTraining do.
    return {"with_pooler": any(name.startswith("pooler.") for name in names)}


REGISTRY: dict[str, Architecture] = {
    "bert": Architecture(
        model_type="bert",
        parse_config=BertConfig.from_dict,
        model_class=BertModel,
        weight_map=bert_weight_map,
        base_prefix="bert.",
        head_prefixes=("cls.", "classifier.", "qa_outputs."),
        buffer_names=("position_ids", "token_type_ids"),
        # TensorFlow-era checkpoints call LayerNorm's scale and shift gamma and beta.
        legacy_suffixes={"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"},
        detect_options=_bert_options,
    ),
}


def supported_model_types() -> list[str]:
    """The model_type values with a from-scratch implementation."""
    return sorted(REGISTRY)


def architecture_for(raw_config: dict[str, Any]) -> Architecture:
    """The registry entry for a parsed config.json.

    Raises:
        UnsupportedModelError: its model_type has no implementation; the message lists those that do.
    """
    model_type = raw_config.get("model_type")
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return REGISTRY[model_type]


@dataclass
class LoadedModel:
    """A from-scratch model with its weights, and what it was built from."""

    model: nn.Module
    config: Any
    architecture: Architecture
    options: dict[str, Any]


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Build our implementation of the checkpoint in ``model_dir`` and load its weights, in eval mode.

    Raises:
        CompareError: no or malformed config.json.
        UnsupportedModelError: a model_type (or variant) we do not implement.
        WeightLoadError: a missing, unexpected or wrongly shaped tensor.
    """
    raw_config = read_config_json(model_dir)
    architecture = architecture_for(raw_config)
    config = architecture.parse_config(raw_config)
    files = checkpoint_files(model_dir)
    names = {architecture.canonical_name(name) for name in checkpoint_tensor_names(files)}
    options = architecture.detect_options({name for name in names if name is not None})

    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        model = architecture.model_class(config, **options)
    weight_map = architecture.weight_map(config, **options)
    load_weights(model, files, weight_map, rename=architecture.canonical_name, dtype=dtype)
    model.requires_grad_(False)
    return LoadedModel(model=model.eval(), config=config, architecture=architecture, options=options)
