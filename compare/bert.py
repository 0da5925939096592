"""BERT from scratch: embeddings, a stack of post-LN encoder layers, and the pooler.

Bottom-up: ``BertEmbeddings``, ``BertEncoderLayer``, ``BertPooler``, ``BertModel``, then
``bert_weight_map`` (the explicit table from our parameter names to the checkpoint's tensor names)
and ``BERT_REFERENCE`` (where transformers' BertModel computes each stage). Only torch is imported
(through compare.layers); never transformers.

Stages, in forward order: ``embeddings``; per layer ``layer.{i}.attention`` (after the output
projection), ``layer.{i}.attention_add_norm``, ``layer.{i}.feed_forward``, ``layer.{i}.output``;
``last_hidden_state``; ``pooler`` (see compare.model for how stages are recorded).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import BertConfig
from .layers import FeedForward, LayerNorm, MultiHeadSelfAttention, add_and_norm, additive_padding_mask
from .model import NO_RECORDING, Context, Recorder, TransformerModel
from .reference_layout import ReferenceLayout, StagePoint

__all__ = [
    "BERT_REFERENCE",
    "BERT_STAGE_FUNCTIONS",
    "BertEmbeddings",
    "BertEncoderLayer",
    "BertModel",
    "BertPooler",
    "bert_weight_map",
]


class BertEmbeddings(nn.Module):
    """A token's starting vector: what it is + where it is + which segment it is in, normalised.

    Three lookup tables are summed (the transformer has no notion of order, so position is added in
    as a learned vector: see "positions" in compare.layers), then LayerNorm. Dropout is omitted: we
    only ever evaluate.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        # input_ids, token_type_ids: (B, T); positions: (B, T) or (1, T)
        x = self.token(input_ids) + self.token_type(token_type_ids)  # (B, T, C)
        x = x + self.position(positions)  # (B, T, C) + (B or 1, T, C)
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

    def forward(self, x: torch.Tensor, context: Context, record: Recorder = NO_RECORDING) -> torch.Tensor:
        # x: (B, T, C); context.mask: (B, 1, 1, T) additive
        attention_out = record("attention", self.attention(x, context.mask, record))  # (B, T, C)
        x = record("attention_add_norm", add_and_norm(x, attention_out, self.attention_norm))  # (B, T, C)
        feed_forward_out = record("feed_forward", self.feed_forward(x))  # (B, T, C)
        return record("output", add_and_norm(x, feed_forward_out, self.feed_forward_norm))  # (B, T, C)


class BertPooler(nn.Module):
    """A whole-sequence vector for classification: tanh(dense(h[:, 0])), the [CLS] position."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        first_token = hidden[:, 0]  # (B, C)
        return torch.tanh(self.dense(first_token))  # (B, C)


class BertModel(TransformerModel):
    """The BERT encoder: embeddings, ``num_hidden_layers`` encoder layers, and (optionally) the pooler.

    Checkpoints saved from BertForMaskedLM have no pooler weights, hence ``with_pooler``.
    """

    final_modules = ("pooler",)

    def __init__(self, config: BertConfig, *, with_pooler: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if with_pooler else None

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Position ids: 0, 1, ..., T-1 for every row, padding or not."""
        return torch.arange(input_ids.size(1))[None]  # (1, T), broadcast over the batch

    def make_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Context:
        """``token_type_ids`` default to all 0 (one segment)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = additive_padding_mask(attention_mask, self.dtype)  # (B, 1, 1, T)
        return Context(
            attention_mask=attention_mask,
            masks={"full": mask},
            positions=self.positions(input_ids),
            token_type_ids=token_type_ids,
        )

    def embed(self, input_ids: torch.Tensor, context: Context, record: Recorder) -> torch.Tensor:
        assert context.token_type_ids is not None
        return record("embeddings", self.embeddings(input_ids, context.token_type_ids, context.positions))

    def finish(
        self, x: torch.Tensor, context: Context, record: Recorder
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (last_hidden_state (B, T, C), pooled output (B, C) or None)."""
        x = record("last_hidden_state", x)
        pooled = None
        if self.pooler is not None:
            pooled = record("pooler", self.pooler(x))
        return x, pooled


def bert_weight_map(config: BertConfig, *, with_pooler: bool = True) -> dict[str, str]:
    """Our parameter name -> the checkpoint's tensor name (as saved by transformers' BertModel).

    The checkpoint names come from the original TensorFlow code: ``attention.self`` holds Q/K/V,
    ``attention.output`` the output projection and its LayerNorm, ``intermediate`` and ``output``
    the two halves of the feed-forward block. The ``bert.`` prefix and old ``gamma``/``beta``
    names are dealt with (compare.architectures) before this map is consulted.
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


# Where our code computes each stage ("{i}": every layer), for the HTML report's stage table.
BERT_STAGE_FUNCTIONS = {
    "embeddings": BertEmbeddings.forward,
    "layer.{i}.attention": MultiHeadSelfAttention.forward,
    "layer.{i}.attention_add_norm": add_and_norm,
    "layer.{i}.feed_forward": FeedForward.forward,
    "layer.{i}.output": add_and_norm,
    "last_hidden_state": BertModel.finish,
    "pooler": BertPooler.forward,
}

# Where transformers' BertModel (and RobertaModel, laid out the same) computes each of our stages.
BERT_REFERENCE = ReferenceLayout(
    model_class="AutoModel",
    layers="encoder.layer",
    embeddings=(StagePoint("embeddings", "embeddings"),),
    layer=(
        StagePoint("attention", "attention.output.dense"),  # BertSelfOutput.dense: before the residual
        StagePoint("attention_add_norm", "attention.output"),  # BertSelfOutput: LayerNorm(x + .)
        StagePoint("feed_forward", "output.dense"),  # BertOutput.dense(act(intermediate(x)))
        StagePoint("output", ""),  # the BertLayer itself
    ),
    final=(
        StagePoint("last_hidden_state", "encoder"),
        StagePoint("pooler", "pooler", optional=True),
    ),
    attention="attention.self",  # returns (context, attention weights)
    steps="encoder",
    embedding_modules=("embeddings",),
    final_modules=("pooler",),
)
