"""The comparison, one piece at a time: embeddings, then each layer, then the final modules.

For every piece:

1. the reference's piece gets its tensors (read by transformers' own loader) and runs on the
   reference's own input (compare.reference_stream), giving the reference's stages and its output,
   which becomes the next piece's input; then it lets go of its tensors;
2. our piece gets its tensors (read by compare.weights: memory-mapped, converted to the compared
   dtype once);
3. our piece runs twice: **isolated**, fed the reference's input, with a Recorder that substitutes
   the reference's tensor at every stage (so each component sees exactly what its counterpart saw),
   and **carried**, fed our own output of the previous piece;
4. both are compared with the reference's stages, and everything the piece held is freed.

So memory does not grow with depth: at any time it holds the runtime, one piece's weights (the
reference's piece is freed before ours is loaded, so the largest piece is held once, plus its
bfloat16 pages while it is converted), and the activations of a few stages (the logits, B x T x V,
are the largest; compare.metrics measures them a chunk at a time); the stage results kept are a few
numbers each. When
attention weights are asked for (the HTML report draws them), each layer's are cut at once to the
one input row and the tokens that are drawn (an :class:`AttentionCut`), so they too stay small.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import StageResult, compare_tensors
from .model import Recorder, TransformerModel
from .reference_stream import StreamedReference
from .weights import TensorCache, WeightMap, load_piece

__all__ = ["AttentionCut", "PieceTiming", "StreamedRun", "compare_pieces"]


@dataclass
class PieceTiming:
    """How long one piece took, and how big it is (the figures benchmarks extrapolate from)."""

    piece: str
    parameters: int  # our parameters in this piece
    reference_seconds: float  # loading and running the reference's piece
    ours_seconds: float  # loading our piece and running it twice (isolated and carried)

    def to_dict(self) -> dict[str, Any]:
        return {
            "piece": self.piece,
            "parameters": self.parameters,
            "reference_seconds": self.reference_seconds,
            "ours_seconds": self.ours_seconds,
        }


@dataclass(frozen=True)
class AttentionCut:
    """Which attention weights a comparison keeps: the first ``tokens`` queries and keys of input row
    ``row``. A layer's weights are (B, nh, T, T); the report draws one row, so keeping every row of
    every layer of a deep model would cost B x T^2 / tokens^2 times the memory for nothing."""

    row: int
    tokens: int

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, T) -> a copy of (nh, tokens, tokens), so the whole tensor can be freed."""
        return weights[self.row, :, : self.tokens, : self.tokens].clone()


@dataclass
class StreamedRun:
    """What a layer-by-layer comparison produced."""

    stages: list[StageResult] = field(default_factory=list)  # carried, each with its isolated result
    logits: tuple[torch.Tensor, torch.Tensor] | None = None  # (ours carried, reference), LM heads only
    # "layer.i" -> (nh, n, n): the attention weights an AttentionCut keeps, when asked for. Ours are
    # the isolated run's (the layer fed the reference's input), so that where they differ from the
    # reference's it is that layer's own doing, not drift carried from the layers before it.
    attention_ours: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_reference: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: list[PieceTiming] = field(default_factory=list)


def _compare(
    carried: dict[str, torch.Tensor],
    isolated: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    *,
    atol: float,
    rtol: float,
) -> list[StageResult]:
    """Each of our stages, carried and isolated, against the reference's (and any stage only one
    side produced, as a failure)."""
    results = []
    for name in [*carried, *(name for name in reference if name not in carried)]:
        if name not in carried or name not in reference:
            shape = list((carried.get(name) if name in carried else reference[name]).shape)
            note = (
                "the reference has no such stage"
                if name in carried
                else "our model did not produce this stage"
            )
            results.append(StageResult(name, False, shape, None, None, None, None, None, note))
            continue
        result = compare_tensors(name, carried[name], reference[name], atol=atol, rtol=rtol)
        result.isolated = compare_tensors(name, isolated[name], reference[name], atol=atol, rtol=rtol)
        results.append(result)
    return results


class _OurPieces:
    """Our model on "meta", whose pieces get their tensors only while they run."""

    def __init__(self, model: TransformerModel, plan: dict[str, str], weight_map: WeightMap) -> None:
        self.model, self.plan, self.weight_map = model, plan, weight_map

    def parameters(self, piece: str) -> int:
        return sum(p.numel() for _, module in self.model.piece_modules(piece) for p in module.parameters())

    @contextmanager
    def loaded(self, piece: str, tensors: TensorCache) -> Iterator[None]:
        """``piece`` holds its tensors (and autograd is off) while the block runs."""
        modules = self.model.piece_modules(piece)
        for prefix, module in modules:
            load_piece(module, prefix, self.plan, self.weight_map, tensors)
        try:
            with torch.no_grad():
                yield
        finally:
            for _, module in modules:
                module.to("meta")  # frees the piece's tensors (the cache still holds the shared ones)


def compare_pieces(
    ours: TransformerModel,
    reference: StreamedReference,
    tensors: TensorCache,
    *,
    plan: dict[str, str],
    weight_map: WeightMap,
    inputs: dict[str, torch.Tensor],
    reference_inputs: dict[str, torch.Tensor],
    atol: float,
    rtol: float,
    layers: tuple[int, int] | None = None,
    attention: AttentionCut | None = None,
) -> StreamedRun:
    """Compare ``ours`` with ``reference`` piece by piece (see the module docstring).

    ``layers``: (first, last) to compare only layers first..last (inclusive); the reference runs the
    layers before them to produce their input, and the embeddings and final stages are compared only
    when the range starts at the first layer, or ends at the last.

    ``attention``: keep that cut of every compared layer's attention weights, ours (isolated) and the
    reference's; None (the default) keeps none, and costs nothing.
    """
    pieces = _OurPieces(ours, plan, weight_map)
    run = StreamedRun()
    first, last = layers if layers is not None else (0, len(ours.layers) - 1)
    token_types = inputs["token_type_ids"] if "token_type_ids" in reference_inputs else None
    context = ours.make_context(inputs["input_ids"], inputs["attention_mask"], token_types)

    def measured(piece: str, began: float, middle: float) -> None:
        run.timings.append(
            PieceTiming(piece, pieces.parameters(piece), middle - began, time.perf_counter() - middle)
        )

    # 1. The embeddings. Their input is the token ids, the same on both sides: carried is isolated.
    began = time.perf_counter()
    hidden, reference_context, theirs = reference.embeddings(reference_inputs)
    middle = time.perf_counter()
    carried = None  # our own output of the last piece run, what the next one is fed when carried
    if first == 0:
        record = Recorder()
        with pieces.loaded("embeddings", tensors):
            carried = ours.embed(inputs["input_ids"], context, record)
        run.stages += _compare(record.stages, record.stages, theirs, atol=atol, rtol=rtol)
        measured("embeddings", began, middle)
    tensors.clear()

    # 2. The layers: the reference's, then ours isolated (on the reference's input) and carried.
    for index in range(last + 1):
        began = time.perf_counter()
        keep_attention = attention is not None and index >= first
        output, theirs, their_weights = reference.layer(
            index, hidden, reference_context, keep_attention=keep_attention
        )
        middle = time.perf_counter()
        if index >= first:
            isolated = Recorder(substitute=theirs, keep_attention=keep_attention)
            record = Recorder()
            with pieces.loaded(f"layer.{index}", tensors):
                layer = ours.layers[index]
                layer(hidden, context, isolated.scoped(f"layer.{index}"))
                carried = layer(
                    hidden if carried is None else carried, context, record.scoped(f"layer.{index}")
                )
            run.stages += _compare(record.stages, isolated.stages, theirs, atol=atol, rtol=rtol)
            if attention is not None and their_weights is not None:
                for name, weights in isolated.attention.items():
                    run.attention_ours[name] = attention(weights)
                run.attention_reference[f"layer.{index}"] = attention(their_weights)
            measured(f"layer.{index}", began, middle)
        tensors.clear()
        hidden = output  # the reference's output: the next layer's input, for both runs of ours

    # 3. The final modules, only if the last layer was compared.
    if last == len(ours.layers) - 1:
        began = time.perf_counter()
        theirs = reference.final(hidden)
        middle = time.perf_counter()
        isolated, record = Recorder(substitute=theirs), Recorder()
        with pieces.loaded("final", tensors):
            ours.finish(hidden, context, isolated)
            ours.finish(hidden if carried is None else carried, context, record)
        run.stages += _compare(record.stages, isolated.stages, theirs, atol=atol, rtol=rtol)
        if "logits" in record.stages and "logits" in theirs:
            run.logits = (record.stages["logits"], theirs["logits"])
        measured("final", began, middle)
        tensors.clear()
    return run
