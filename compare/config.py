"""Reading a checkpoint's ``config.json`` with our own code, into a typed dataclass.

Everything the from-scratch model needs to know about its shape comes from here: nothing is
hard-coded to bert-base. Validation happens at parse time, so a bad config fails with one clear
message before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmirror.errors import CompareError, UnsupportedModelError

__all__ = ["SUPPORTED_ACTIVATIONS", "BertConfig", "read_config_json"]

# The names ``hidden_act`` may take in a BERT config.json that compare.layers implements.
# Kept here (not imported from layers) so that parsing a config does not need torch.
SUPPORTED_ACTIVATIONS = (
    "gelu",  # exact GELU: x * Phi(x), with the Gaussian CDF written via erf
    "gelu_new",  # tanh approximation (GPT-2's)
    "gelu_pytorch_tanh",  # the same tanh approximation, computed by torch's fused kernel
    "gelu_fast",  # the tanh approximation written with a pre-multiplied constant
    "relu",
    "silu",
    "swish",  # another name for silu
    "tanh",
)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a checkpoint folder.

    Raises:
        CompareError: the file is missing or is not a JSON object.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CompareError(f"no config.json in {model_dir}: is this a model folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CompareError(f"cannot read {path}: {error}") from error
    if not isinstance(raw, dict):
        raise CompareError(f"{path} is not a JSON object")
    return raw


@dataclass(frozen=True)
class BertConfig:
    """The hyper-parameters of a BERT encoder (names follow config.json)."""

    vocab_size: int = 30522  # rows of the token embedding table
    hidden_size: int = 768  # width of every residual-stream vector
    num_hidden_layers: int = 12  # encoder layers stacked on top of each other
    num_attention_heads: int = 12  # hidden_size is split evenly across the heads
    intermediate_size: int = 3072  # width of the feed-forward block's hidden layer (usually 4x)
    hidden_act: str = "gelu"  # activation inside the feed-forward block
    max_position_embeddings: int = 512  # longest sequence the learned positions cover
    type_vocab_size: int = 2  # segment ids ("sentence A" / "sentence B")
    layer_norm_eps: float = 1e-12  # added to the variance inside every LayerNorm
    pad_token_id: int = 0  # id of [PAD]; padded positions are masked out of attention

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BertConfig:
        """Build and validate a config from a parsed config.json.

        Raises:
            UnsupportedModelError: a BERT variant we do not implement (decoder, relative positions,
                an unknown activation).
            CompareError: a field is missing or inconsistent (e.g. hidden_size not divisible by heads).
        """
        # Variants of BERT that change the computation: refuse them rather than compute something else.
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise UnsupportedModelError(
                f"position_embedding_type {position_type!r} is not supported (only 'absolute')"
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise UnsupportedModelError(
                "BERT used as a decoder (is_decoder / cross-attention) is not supported"
            )
        hidden_act = raw.get("hidden_act", cls.hidden_act)
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act {hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )

        def integer(name: str, default: int | None = None) -> int:
            value = raw.get(name)
            value = default if value is None else value  # absent or null: the default, if there is one
            if value is None:
                raise CompareError(f"config.json has no {name!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CompareError(
                    f"config.json field {name!r} must be a non-negative integer, got {value!r}"
                )
            return value

        config = cls(
            vocab_size=integer("vocab_size"),
            hidden_size=integer("hidden_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=integer("num_attention_heads"),
            intermediate_size=integer("intermediate_size"),
            hidden_act=hidden_act,
            max_position_embeddings=integer("max_position_embeddings", cls.max_position_embeddings),
            type_vocab_size=integer("type_vocab_size", cls.type_vocab_size),
            layer_norm_eps=float(raw.get("layer_norm_eps", cls.layer_norm_eps)),
            pad_token_id=integer("pad_token_id", cls.pad_token_id),
        )
        if config.num_attention_heads == 0 or config.hidden_size % config.num_attention_heads != 0:
            raise CompareError(
                f"hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                f"({config.num_attention_heads}): each head gets an equal slice of the hidden vector"
            )
        if config.layer_norm_eps <= 0:
            raise CompareError(f"layer_norm_eps must be positive, got {config.layer_norm_eps}")
        return config
