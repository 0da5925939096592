"""Where the reference (transformers) computes each of our stages: plain data, one per architecture.

A :class:`ReferenceLayout` names, for every stage, the transformers submodule whose output (or input)
is that stage, by its attribute path. Per-layer paths are relative to one layer module, so the same
layout serves a whole model (hooks on ``model.layers[i].<path>``) and a single layer run alone.
Each architecture module (compare.bert, compare.gpt2, ...) declares its layout next to its model,
with the :class:`ReferenceSteps` that string the transformers model's pieces together the way its
forward does (so a new family is its module plus its registry entry); compare.reference and
compare.reference_stream are what read them. Nothing here imports transformers, or even torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReferenceConversion", "ReferenceLayout", "ReferenceSteps", "StagePoint"]


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


class ReferenceSteps:
    """What a transformers model's ``forward`` does between its pieces, for one family, so that
    compare.reference_stream can run the pieces one at a time exactly as the whole forward would.
    transformers is imported inside the methods, when the reference runs."""

    def embed(self, model: Any, inputs: dict[str, Any]) -> Any:
        """The embeddings' output (B, T, C) for ``inputs`` (input_ids, attention_mask, ...)."""
        raise NotImplementedError

    def context(self, model: Any, embedded: Any, inputs: dict[str, Any]) -> Any:
        """What every layer needs besides its input (masks, rotary tables), made from the embeddings."""
        raise NotImplementedError

    def layer(self, layer: Any, index: int, hidden: Any, context: Any) -> Any:
        """Run layer ``index`` (the module ``layer``) on ``hidden``: its output."""
        raise NotImplementedError

    def finish(self, model: Any, hidden: Any) -> dict[str, Any]:
        """Run the final modules; return the final stages no hook sees."""
        raise NotImplementedError


@dataclass(frozen=True)
class ReferenceLayout:
    """How to find our stages in a transformers model.

    Attributes:
        model_class: the transformers auto class to load with ("AutoModel", "AutoModelForCausalLM").
        layers: path of the ModuleList of layers within the model.
        embeddings, final: stages before and after the layers (paths relative to the model).
        layer: the stages of one layer (paths relative to the layer; names without "layer.{i}.").
        attention: path, within a layer, of the attention module whose output is (output, weights).
        steps: how the model's forward strings its pieces together, to run them one at a time.
        embedding_modules, final_modules: paths of the modules holding the weights of the pieces
            before and after the layers.
        buffers: non-persistent buffers of a piece (not in the checkpoint), by name -> how its
            module's constructor makes it from its "meta" placeholder.
    """

    model_class: str
    layers: str
    embeddings: tuple[StagePoint, ...]
    layer: tuple[StagePoint, ...]
    final: tuple[StagePoint, ...]
    attention: str
    steps: ReferenceSteps
    embedding_modules: tuple[str, ...]
    final_modules: tuple[str, ...]
    buffers: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


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
