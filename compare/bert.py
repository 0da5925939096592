"""BERT from scratch: embeddings, a stack of post-LN encoder layers, and the pooler.

Bottom-up: ``BertEmbeddings``, ``BertEncoderLayer``, ``BertPooler``, ``BertModel``, and finally
``bert_weight_map``: the explicit table from our parameter names to the checkpoint's tensor names.
Only torch is imported (through compare.layers); never transformers.

Every forward pass can report its intermediate tensors ("stages") through a ``record(name, tensor)``
callback; compare.runner uses that to line them up with the reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import BertConfig
from .layers import FeedForward, LayerNorm, MultiHeadSelfAttention, add_and_norm, additive_padding_mask

__all__ = ["BertEmbeddings", "BertEncoderLayer", "BertModel", "BertPooler", "Recorder", "bert_weight_map"]

# Called with (stage name, tensor) at each stage of the forward pass.
Recorder = Callable[[str, torch.Tensor], None]


def _ignore(name: str, tensor: torch.Tensor) -> None:
    """The default recorder: keep nothing."""


class BertEmbeddings(nn.Module):
    """A token's starting vector: what it is + where it is + which segment it is in, normalised.

    Three lookup tables are summed (the transformer has no notion of order, so position is added in
    as a learned vector), then LayerNorm. Dropout is omitted: we only ever evaluate.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.size(1)
        positions = torch.arange(seq_len, device=input_ids.device)  # (T,): 0, 1, ..., T-1
        x = self.token(input_ids) + self.token_type(token_type_ids)  # (B, T, C)
        x = x + self.position(positions)  # (B, T, C) + (T, C), broadcast over the batch
        return self.norm(x)  # (B, T, C)


class BertEncoderLayer(nn.Module):
    """One encoder layer: self-attention, then a feed-forward block, each wrapped in Add & Norm.

    x -> attention -> LayerNorm(x + .) -> feed_forward -> LayerNorm(. + .)   (post-LN)
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(config.hidden_size, config.num_attention_heads)
        self.attention_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.feed_forward_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, record: Recorder = _ignore) -> torch.Tensor:
        # x: (B, T, C); mask: (B, 1, 1, T) additive
        attention_out = self.attention(x, mask)  # (B, T, C), after the output projection
        record("attention", attention_out)
        x = add_and_norm(x, attention_out, self.attention_norm)  # (B, T, C)
        record("attention_add_norm", x)
        feed_forward_out = self.feed_forward(x)  # (B, T, C)
        record("feed_forward", feed_forward_out)
        x = add_and_norm(x, feed_forward_out, self.feed_forward_norm)  # (B, T, C)
        record("output", x)
        return x


class BertPooler(nn.Module):
    """A whole-sequence vector for classification: tanh(dense(h[:, 0])), the [CLS] position."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first_token = hidden[:, 0]  # (B, C)
        return torch.tanh(self.dense(first_token))  # (B, C)


class BertModel(nn.Module):
    """The BERT encoder: embeddings, ``num_hidden_layers`` encoder layers, and (optionally) the pooler.

    Checkpoints saved from BertForMaskedLM have no pooler weights, hence ``with_pooler``.
    """

    def __init__(self, config: BertConfig, *, with_pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if with_pooler else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        record: Recorder = _ignore,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (last_hidden_state (B, T, C), pooled output (B, C) or None).

        ``attention_mask`` is (B, T) with 1 for real tokens and 0 for padding (default: all 1);
        ``token_type_ids`` default to all 0 (one segment).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        dtype = self.embeddings.token.weight.dtype

        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        record("embeddings", x)
        mask = additive_padding_mask(attention_mask, dtype)  # (B, 1, 1, T)
        for i, layer in enumerate(self.layers):

            def record_layer(name: str, tensor: torch.Tensor, i: int = i) -> None:
                record(f"layer.{i}.{name}", tensor)

            x = layer(x, mask, record_layer)
        record("last_hidden_state", x)
        pooled = None
        if self.pooler is not None:
            pooled = self.pooler(x)
            record("pooler", pooled)
        return x, pooled


def bert_weight_map(config: BertConfig, *, with_pooler: bool = True) -> dict[str, str]:
    """Our parameter name -> the checkpoint's tensor name (as saved by transformers' BertModel).

    The checkpoint names come from the original TensorFlow code: ``attention.self`` holds Q/K/V,
    ``attention.output`` the output projection and its LayerNorm, ``intermediate`` and ``output``
    the two halves of the feed-forward block. The ``bert.`` prefix and old ``gamma``/``beta``
    names are dealt with in compare.weights before this map is consulted.
    """
    mapping = {
        "embeddings.token.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"encoder.layer.{i}"
        for kind in ("weight", "bias"):
            mapping |= {
                f"{ours}.attention.query.{kind}": f"{theirs}.attention.self.query.{kind}",
                f"{ours}.attention.key.{kind}": f"{theirs}.attention.self.key.{kind}",
                f"{ours}.attention.value.{kind}": f"{theirs}.attention.self.value.{kind}",
                f"{ours}.attention.out.{kind}": f"{theirs}.attention.output.dense.{kind}",
                f"{ours}.attention_norm.{kind}": f"{theirs}.attention.output.LayerNorm.{kind}",
                f"{ours}.feed_forward.up.{kind}": f"{theirs}.intermediate.dense.{kind}",
                f"{ours}.feed_forward.down.{kind}": f"{theirs}.output.dense.{kind}",
                f"{ours}.feed_forward_norm.{kind}": f"{theirs}.output.LayerNorm.{kind}",
            }
    if with_pooler:
        mapping |= {"pooler.dense.weight": "pooler.dense.weight", "pooler.dense.bias": "pooler.dense.bias"}
    return mapping
