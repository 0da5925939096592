"""RoBERTa and XLM-RoBERTa from scratch: BERT, with positions counted from ``padding_idx + 1``.

The layers, the pooler and the weight names are BERT's (compare.bert); what differs is how position
ids are made (fairseq's convention, kept by the checkpoints): real tokens are numbered
``pad_token_id + 1, pad_token_id + 2, ...`` in order, skipping padding, and padding keeps
``pad_token_id`` itself. So a sentence reads the same positions whatever padding surrounds it, and
the longest input is ``max_position_embeddings - pad_token_id - 1`` tokens (512 for roberta-base's
514 positions). There is one token type. Checkpoints of RobertaForMaskedLM carry a ``roberta.``
prefix and an ``lm_head``. Only torch is imported; never transformers.
"""

from __future__ import annotations

import torch

from .bert import BertModel
from .config import BertConfig

__all__ = ["RobertaConfig", "RobertaModel", "roberta_positions"]


class RobertaConfig(BertConfig):
    """BERT's hyper-parameters; the position table also covers the ``pad_token_id + 1`` offset."""

    def sequence_limit(self) -> tuple[int, str]:
        return (
            self.max_position_embeddings - self.pad_token_id - 1,
            "max_position_embeddings - pad_token_id - 1",
        )


def roberta_positions(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, T) position ids: ``pad_token_id + 1, + 2, ...`` over real tokens, ``pad_token_id`` on padding."""
    is_token = (input_ids != pad_token_id).long()  # (B, T): 1 real, 0 padding
    return torch.cumsum(is_token, dim=1) * is_token + pad_token_id  # (B, T)


class RobertaModel(BertModel):
    """BERT with RoBERTa's position ids."""

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return roberta_positions(input_ids, self.config.pad_token_id)  # (B, T)
