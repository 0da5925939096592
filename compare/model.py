"""What every from-scratch model in compare/ looks like, and how it reports its stages.

Every model is three kinds of piece, run in order:

    embeddings  ->  layers[0] -> layers[1] -> ... -> layers[N-1]  ->  final
    (token ids       (each: hidden states in, hidden states out,       (final norm and LM head,
     to vectors)      the same shape (B, T, C))                         or BERT's pooler)

Each piece can be built, loaded and called on its own: a layer takes the hidden states and a small
:class:`Context` built once per input (the attention mask, the positions, the rotary cos/sin), so a
comparison can run one layer at a time and never needs the whole model in memory.

Stages are reported through a :class:`Recorder`. Its contract, used by every forward pass here::

    x = record("attention", x)   # report our tensor for this stage; continue with what comes back

What comes back is the whole idea of the comparison:

* **carried** (the default): our own tensor. The forward pass runs on our numbers from the embeddings
  on, as a user of our model would see it; a stage's error includes everything inherited from earlier.
* **isolated** (``Recorder(substitute=reference_stages)``): the *reference's* tensor for that stage.
  The next component is then fed exactly the input the reference fed its counterpart, so the error it
  shows is its own: a small bug in layer 20 cannot hide behind (or be blamed on) rounding carried from
  the 19 layers before it.

Attention weights (B, nh, T, T) are handed to ``record.attention_weights(...)`` by every attention
module; a recorder keeps them only when asked (``keep_attention=True``), so the ordinary comparison
pays nothing for them.

Only torch is imported here; never transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["NO_RECORDING", "CausalLanguageModel", "Context", "Recorder", "TransformerModel"]


@dataclass
class Context:
    """What every layer needs besides the hidden states, built once per input by ``make_context``.

    ``masks`` maps an attention kind to an additive mask, (B, 1, 1, T) for encoders (padding only) or
    (B, 1, T, T) for decoders (causal and padding): "full", and "sliding" for layers that only look at
    the last ``sliding_window`` positions. ``positions`` are the position ids: (B, T) where they
    depend on the row (RoBERTa's skip padding), else (1, T), the same for every row.
    ``rotary`` is the (cos, sin) pair of rotary position embedding, each (B or 1, T, hd), or None for
    models that add positions at the bottom instead.
    """

    attention_mask: torch.Tensor  # (B, T): 1 for a real token, 0 for padding
    masks: dict[str, torch.Tensor]
    positions: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    token_type_ids: torch.Tensor | None = None  # (B, T), encoders with segments only

    @property
    def mask(self) -> torch.Tensor:
        """The mask of ordinary (full) attention."""
        return self.masks["full"]


class Recorder:
    """Collects each stage's tensor and decides what the forward pass continues with (see the module
    docstring for carried and isolated runs).

    Both are copies: what a stage recorded is what our code produced at that point, and the
    reference's tensor handed to an isolated run is its own, so that a forward pass working in place
    on what it is handed (``x += ...``) changes neither the record nor the reference's stage.

    Args:
        substitute: stage name -> the reference's tensor; None for a carried run.
        keep_attention: keep every layer's attention weights in ``self.attention``.
    """

    def __init__(
        self, *, substitute: Mapping[str, torch.Tensor] | None = None, keep_attention: bool = False
    ) -> None:
        self.stages: dict[str, torch.Tensor] = {}  # stage name -> our tensor, in forward order
        self.attention: dict[str, torch.Tensor] = {}  # "layer.i" -> (B, nh, T, T) attention weights
        self._substitute = substitute
        self.keep_attention = keep_attention
        self._prefix = ""

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Record our ``tensor`` as stage ``name``; return the tensor the forward pass continues with."""
        full_name = self._prefix + name
        self.stages[full_name] = tensor.detach().clone()
        if self._substitute is not None:
            theirs = self._substitute.get(full_name)
            # A shape mismatch is reported by the comparison; continuing with ours keeps the run going.
            if theirs is not None and theirs.shape == tensor.shape:
                return theirs.clone()
        return tensor

    def scoped(self, scope: str) -> Recorder:
        """A recorder for one piece: ``scoped("layer.3")("mlp", x)`` records stage ``layer.3.mlp``."""
        child = Recorder(substitute=self._substitute, keep_attention=self.keep_attention)
        child.stages, child.attention = self.stages, self.attention  # shared with the parent
        child._prefix = f"{self._prefix}{scope}."
        return child

    def attention_weights(self, weights: torch.Tensor) -> None:
        """Called by every attention module with its softmax output (B, nh, T, T)."""
        if self.keep_attention:
            self.attention[self._prefix.rstrip(".")] = weights.detach()


class _NoRecording(Recorder):
    """Keeps nothing and changes nothing: the default when a model is simply run."""

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def scoped(self, scope: str) -> Recorder:
        return self


NO_RECORDING: Recorder = _NoRecording()


class TransformerModel(nn.Module):
    """The shape shared by every model here: ``embeddings``, ``layers``, and the final modules.

    Subclasses define ``make_context``, ``embed`` (records "embeddings") and ``finish`` (records the
    final stages), and set ``final_modules``: the names of the modules that run after the layers, so
    the weights of each piece can be found (and loaded) on their own.
    """

    final_modules: tuple[str, ...] = ()
    embeddings: nn.Module
    layers: nn.ModuleList

    def make_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Context:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, context: Context, record: Recorder) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, x: torch.Tensor, context: Context, record: Recorder) -> Any:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        record: Recorder = NO_RECORDING,
    ) -> Any:
        """Run every piece in order. ``attention_mask`` defaults to all real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        context = self.make_context(input_ids, attention_mask, token_type_ids)
        x = self.embed(input_ids, context, record)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, context, record.scoped(f"layer.{i}"))  # (B, T, C)
        return self.finish(x, context, record)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the parameters (masks and rotary tables are built in it)."""
        return next(self.parameters()).dtype

    def piece_modules(self, piece: str) -> list[tuple[str, nn.Module]]:
        """(parameter-name prefix, module) of each module of ``piece`` ("embeddings", "layer.i",
        "final"), to load that piece's weights alone."""
        if piece == "embeddings":
            return [("embeddings.", self.embeddings)]
        if piece.startswith("layer."):
            index = int(piece.split(".")[1])
            return [(f"layers.{index}.", self.layers[index])]
        modules = [(f"{name}.", getattr(self, name)) for name in self.final_modules]
        return [(prefix, module) for prefix, module in modules if module is not None]


class CausalLanguageModel(TransformerModel):
    """A decoder with its language-modelling head (GPT-2, Llama, Qwen): token ids (B, T) -> logits
    (B, T, V), the scores of every possible next token at every position.

    Subclasses set ``embeddings``, ``layers``, ``final_norm`` and ``lm_head`` (C -> V, no bias), and
    ``make_context``; ``embed`` here looks tokens up only (GPT-2 adds learned positions to it).
    """

    final_modules = ("final_norm", "lm_head")
    final_norm: nn.Module
    lm_head: nn.Linear

    def embed(self, input_ids: torch.Tensor, context: Context, record: Recorder) -> torch.Tensor:
        return record("embeddings", self.embeddings(input_ids))  # (B, T, C)

    def finish(self, x: torch.Tensor, context: Context, record: Recorder) -> torch.Tensor:
        # Pre-LN layers never normalise the residual stream itself, hence one last norm.
        x = record("final_norm", self.final_norm(x))  # (B, T, C)
        return record("logits", self.lm_head(x))  # (B, T, V)
