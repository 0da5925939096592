"""Reading a checkpoint's ``config.json`` with our own code, into typed dataclasses.

Everything a from-scratch model needs to know about its shape comes from config.json: nothing is
hard-coded to bert-base or Llama-7B. Validation happens at parse time, so a bad config fails with one
clear message before any weight is read. This module holds the shared field readers, the rotary
settings and BERT's config; each decoder's config sits with its model (compare.gpt2, compare.llama,
compare.qwen). No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfmirror.errors import CompareError, UnsupportedModelError

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "BertConfig",
    "ConfigFields",
    "RotaryParameters",
    "check_activation",
    "padding_id",
    "read_config_json",
]

# The activation names (``hidden_act``, GPT-2's ``activation_function``) compare.layers implements.
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


class ConfigFields:
    """Typed, validated reads of config.json fields, with one clear message for each kind of mistake."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def _value(self, names: tuple[str, ...], default: Any) -> tuple[str, Any]:
        # The first of ``names`` present and not null wins (GPT-2 spells hidden_size "n_embd").
        for name in names:
            if self.raw.get(name) is not None:
                return name, self.raw[name]
        if default is None:
            raise CompareError(f"config.json has no {names[0]!r}")
        return names[0], default

    def integer(self, name: str, default: int | None = None, *, aliases: tuple[str, ...] = ()) -> int:
        """A non-negative integer (``default`` when absent or null; no default: required)."""
        name, value = self._value((name, *aliases), default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CompareError(f"config.json field {name!r} must be a non-negative integer, got {value!r}")
        return value

    def optional_integer(self, name: str) -> int | None:
        """A non-negative integer, or None when absent or null."""
        return None if self.raw.get(name) is None else self.integer(name)

    def number(self, name: str, default: float | None = None, *, aliases: tuple[str, ...] = ()) -> float:
        """A finite number."""
        name, value = self._value((name, *aliases), default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise CompareError(f"config.json field {name!r} must be a number, got {value!r}")
        return float(value)

    def positive_number(self, name: str, default: float | None = None, **kwargs: Any) -> float:
        value = self.number(name, default, **kwargs)
        if value <= 0:
            raise CompareError(f"config.json field {name!r} must be positive, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise CompareError(f"config.json field {name!r} must be true or false, got {value!r}")
        return value

    def string(self, name: str, default: str, *, aliases: tuple[str, ...] = ()) -> str:
        name, value = self._value((name, *aliases), default)
        if not isinstance(value, str):
            raise CompareError(f"config.json field {name!r} must be a string, got {value!r}")
        return value


def padding_id(raw: dict[str, Any], vocab_size: int) -> int:
    """The token id to pad a batch with: ``pad_token_id``, else ``eos_token_id``, else 0.

    Decoders often have no padding token; any id in the vocabulary will do, as padded positions are
    masked out of attention (a list of eos ids: the first).
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = raw.get(name)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size:
            return value
    return 0


def check_activation(name: str, field: str = "hidden_act") -> str:
    """``name`` if compare.layers implements it.

    Raises:
        UnsupportedModelError: it does not; the message lists those that are.
    """
    if name not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{field} {name!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    return name


# Rotary position embedding variants compare.layers implements ("rope_type" in config.json).
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class RotaryParameters:
    """How rotary position embedding turns each pair of features (config.json's rope settings).

    Pair i of a head (features i and i + hd/2) turns by ``position * theta ** (-2i / hd)`` radians:
    the first pairs spin fast (fine detail about nearby tokens), the last ones slowly (coarse, long
    range). ``theta`` is the base of that geometric series (10000 in the RoFormer paper and Llama 2,
    500000 in Llama 3, 1000000 in Qwen2). "llama3" then slows the slowest pairs down further by
    ``factor``, blending smoothly between ``high_freq_factor`` and ``low_freq_factor`` wavelengths, so a
    model trained on ``original_max_position_embeddings`` tokens can read longer inputs.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0  # llama3 only: how much the low frequencies are slowed down
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only: the pre-training context length

    @classmethod
    def from_config(cls, raw: dict[str, Any], *, max_position_embeddings: int) -> RotaryParameters:
        """Read rope settings as transformers 5 does: ``rope_parameters`` (or the older ``rope_scaling``),
        with ``rope_theta`` inside it or, in older configs, at the top level.

        Raises:
            UnsupportedModelError: a rope_type other than "default" and "llama3", per-layer rope
                settings, or partial rotary.
            CompareError: a malformed value.
        """
        settings = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(settings, dict):
            raise CompareError(f"config.json field 'rope_parameters' must be an object, got {settings!r}")
        if any(isinstance(value, dict) for value in settings.values()):
            raise UnsupportedModelError("rope settings that differ per layer type are not supported")
        rope_type = settings.get("rope_type", settings.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        partial = settings.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise UnsupportedModelError(f"partial_rotary_factor {partial!r} is not supported (only 1.0)")
        merged = {"rope_theta": raw.get("rope_theta")} | {k: v for k, v in settings.items() if v is not None}
        fields = ConfigFields(merged)
        theta = fields.positive_number("rope_theta", cls.theta)
        if rope_type == "default":
            return cls(theta=theta)
        parameters = cls(
            theta=theta,
            rope_type=rope_type,
            factor=fields.positive_number("factor"),
            low_freq_factor=fields.positive_number("low_freq_factor"),
            high_freq_factor=fields.positive_number("high_freq_factor"),
            original_max_position_embeddings=fields.integer(
                "original_max_position_embeddings", max_position_embeddings
            ),
        )
        if parameters.high_freq_factor <= parameters.low_freq_factor:
            raise CompareError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        return parameters


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

    def sequence_limit(self) -> tuple[int, str]:
        """The longest input, and where that limit comes from."""
        return self.max_position_embeddings, "max_position_embeddings"

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
        hidden_act = check_activation(raw.get("hidden_act", cls.hidden_act))

        fields = ConfigFields(raw)
        integer = fields.integer

        config = cls(
            vocab_size=integer("vocab_size"),
            hidden_size=integer("hidden_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=integer("num_attention_heads"),
            intermediate_size=integer("intermediate_size"),
            hidden_act=hidden_act,
            max_position_embeddings=integer("max_position_embeddings", cls.max_position_embeddings),
            type_vocab_size=integer("type_vocab_size", cls.type_vocab_size),
            layer_norm_eps=fields.number("layer_norm_eps", cls.layer_norm_eps),
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
