"""Where the reference (transformers) computes each of our stages: plain data, one per architecture.

A :class:`ReferenceLayout` names, for every stage, the transformers submodule whose output (or input)
is that stage, by its attribute path. Per-layer paths are relative to one layer module, so the same
layout serves a whole model (hooks on ``model.layers[i].<path>``) and a single layer run alone.
Each architecture module (compare.bert, compare.gpt2, ...) declares its layout next to its model;
compare.reference is what reads it. Nothing here imports transformers, or even torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["ReferenceConversion", "ReferenceLayout", "StagePoint"]


@dataclass(frozen=True)
class StagePoint:
    """Stage ``stage`` is the output of the submodule at ``path`` ("" = the module itself).

    ``take="input"`` uses the submodule's first input instead: a residual sum that no module returns
    is what the next norm receives. ``optional``: the submodule may be absent (BERT without a pooler).
    """

    stage: str
    path: str
    take: str = "output"  # "output" or "input"
    optional: bool = False


@dataclass(frozen=True)
class ReferenceLayout:
    """How to find our stages in a transformers model.

    Attributes:
        model_class: the transformers auto class to load with ("AutoModel", "AutoModelForCausalLM").
        layers: path of the ModuleList of layers within the model.
        embeddings, final: stages before and after the layers (paths relative to the model).
        layer: the stages of one layer (paths relative to the layer; names without "layer.{i}.").
        attention: path, within a layer, of the attention module whose output is (output, weights).
        steps: how the model's forward strings its pieces together, to run them one at a time
            (compare.reference_stream: "encoder", "gpt2" or "llama").
        embedding_modules, final_modules: paths of the modules holding the weights of the pieces
            before and after the layers.
    """

    model_class: str
    layers: str
    embeddings: tuple[StagePoint, ...]
    layer: tuple[StagePoint, ...]
    final: tuple[StagePoint, ...]
    attention: str
    steps: str
    embedding_modules: tuple[str, ...]
    final_modules: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceConversion:
    """How a checkpoint that transformers cannot load as it is becomes one it can (Qwen v1's).

    Attributes:
        description: what the reference then is, said plainly in every report.
        model_class: the transformers class that holds the converted checkpoint ("Qwen2ForCausalLM").
        config: our typed config -> keyword arguments of a transformers config (with "model_type").
        tensors: the checkpoint's (name, tensor) pairs -> the transformers model's, one by one, so
            that one layer can be converted alone.
    """

    description: str
    model_class: str
    config: Callable[[Any], dict[str, Any]]
    tensors: Callable[[Iterable[tuple[str, Any]]], Iterator[tuple[str, Any]]]
