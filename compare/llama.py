"""The Llama family from scratch: Llama, Mistral, Qwen2 and Qwen3, one module driven by config.json.

All four are the same decoder: token embeddings (no positions added), pre-LN layers of RMSNorm,
grouped-query attention with rotary positions and a SwiGLU feed-forward block, a final RMSNorm and an
LM head. What differs is read from config.json (and a few per-family rules, in ``FAMILIES``):

===========  ===============================  ==========  ================================
family       biases                           q/k norm    sliding window
===========  ===============================  ==========  ================================
llama        ``attention_bias`` (q, k, v, o),  no          no
             ``mlp_bias``
mistral      none                             no          ``sliding_window``, every layer
qwen2        q, k, v (never o)                no          ``use_sliding_window``: layers from
                                                          ``max_window_layers`` on
qwen3        ``attention_bias`` (q, k, v, o)   yes         as qwen2
===========  ===============================  ==========  ================================

plus, for all: the number of key/value heads (grouped-query attention), an explicit ``head_dim``
(Qwen3's differs from hidden/heads), the rotary base ``rope_theta`` and "llama3" rope scaling, and a
tied or untied LM head. Bottom-up: ``LlamaConfig``, ``TokenEmbeddings``, ``LlamaModel``,
``llama_weight_map``, ``LLAMA_REFERENCE``. Only torch is imported; transformers only inside
``LlamaSteps``, when the reference runs.

Stages: ``embeddings``; per layer ``attention``, ``attention_residual``, ``mlp``, ``output``;
``final_norm``; ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hfmirror.errors import CompareError, UnsupportedModelError

from .config import ConfigFields, RotaryParameters, check_activation, padding_id
from .layers import (
    GatedFeedForward,
    GroupedQueryAttention,
    PreNormDecoderLayer,
    RMSNorm,
    causal_mask,
    rotary_cos_sin,
    rotary_inverse_frequencies,
)
from .model import CausalLanguageModel, Context
from .reference_layout import ReferenceLayout, ReferenceSteps, StagePoint

__all__ = [
    "FAMILIES",
    "LLAMA_REFERENCE",
    "LLAMA_STAGE_FUNCTIONS",
    "LlamaConfig",
    "LlamaModel",
    "LlamaSteps",
    "TokenEmbeddings",
    "decoder_context",
    "llama_weight_map",
]


@dataclass(frozen=True)
class _Family:
    """What a model_type fixes that config.json does not say."""

    bias_rule: str  # "config" (attention_bias, mlp_bias), "qkv" (q, k, v only) or "none"
    qk_norm: bool = False
    sliding: str = "none"  # "none", "all" (Mistral) or "from_max_window_layers" (Qwen)
    default_head_dim: int | None = None  # when config.json has none; else hidden/heads


FAMILIES: dict[str, _Family] = {
    "llama": _Family(bias_rule="config"),
    "mistral": _Family(bias_rule="none", sliding="all"),
    "qwen2": _Family(bias_rule="qkv", sliding="from_max_window_layers"),
    "qwen3": _Family(
        bias_rule="config", qk_norm=True, sliding="from_max_window_layers", default_head_dim=128
    ),
}

# config.json's layer_types -> our attention kinds (the keys of Context.masks).
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of a Llama-family decoder (names follow config.json)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096  # C
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # nh, query heads
    num_key_value_heads: int = 32  # nkv: nh / nkv query heads share each key/value head
    head_dim: int = 128  # hd; usually hidden/heads, set explicitly by Qwen3
    intermediate_size: int = 11008  # I, the SwiGLU width
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rotary: RotaryParameters = field(default_factory=RotaryParameters)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on every query and key head
    sliding_window: int | None = None  # sliding layers see this many positions, themselves included
    layer_types: tuple[str, ...] = ()  # per layer: "full" or "sliding"
    tie_word_embeddings: bool = False
    pad_token_id: int = 0  # the id padded positions get (masked anyway)

    def sequence_limit(self) -> tuple[int, str]:
        return self.max_position_embeddings, "max_position_embeddings"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        """Build and validate a config from a parsed config.json of a llama/mistral/qwen2/qwen3 model.

        Raises:
            UnsupportedModelError: a rope type, activation or layer type we do not implement.
            CompareError: a missing or inconsistent field.
        """
        model_type = raw.get("model_type", "llama")
        family = FAMILIES[model_type]
        fields = ConfigFields(raw)
        hidden_size = fields.integer("hidden_size")
        heads = fields.integer("num_attention_heads")
        if heads == 0:
            raise CompareError("num_attention_heads must be positive")
        kv_heads = fields.integer("num_key_value_heads", heads)
        if kv_heads == 0 or heads % kv_heads != 0:
            raise CompareError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}): "
                "each key/value head serves an equal group of query heads"
            )
        head_dim = fields.integer("head_dim", family.default_head_dim or hidden_size // heads)
        max_positions = fields.integer("max_position_embeddings")
        layers = fields.integer("num_hidden_layers")
        attention_bias = fields.boolean("attention_bias", False)
        qkv_bias, out_bias, mlp_bias = {
            "config": (attention_bias, attention_bias, fields.boolean("mlp_bias", False)),
            "qkv": (True, False, False),
            "none": (False, False, False),
        }[family.bias_rule]
        sliding_window, layer_types = _sliding_layers(raw, family, layers)
        vocab_size = fields.integer("vocab_size")
        return cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=fields.integer("intermediate_size"),
            hidden_act=check_activation(fields.string("hidden_act", "silu")),
            rms_norm_eps=fields.positive_number("rms_norm_eps", cls.rms_norm_eps),
            max_position_embeddings=max_positions,
            rotary=RotaryParameters.from_config(raw, max_position_embeddings=max_positions),
            qkv_bias=qkv_bias,
            out_bias=out_bias,
            mlp_bias=mlp_bias,
            qk_norm=family.qk_norm,
            sliding_window=sliding_window,
            layer_types=layer_types,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
            pad_token_id=padding_id(raw, vocab_size),
        )


def _sliding_layers(raw: dict[str, Any], family: _Family, layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding window or None, each layer's attention kind), by the family's rule."""
    fields = ConfigFields(raw)
    # Absent means transformers' default of 4096; null means no window.
    window = fields.optional_integer("sliding_window") if "sliding_window" in raw else 4096
    window = window or None
    if family.sliding == "all":  # Mistral: every layer, whenever sliding_window is set
        return window, ("sliding" if window else "full",) * layers
    if family.sliding == "from_max_window_layers" and fields.boolean("use_sliding_window", False):
        if window:
            named = raw.get("layer_types")
            if named is None:  # as transformers derives it
                first = fields.integer("max_window_layers", 28)
                named = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
            if not isinstance(named, list) or len(named) != layers:
                raise CompareError(f"layer_types must list one type per layer ({layers}), got {named!r}")
            unknown = sorted({str(kind) for kind in named} - set(_LAYER_TYPES))
            if unknown:
                raise UnsupportedModelError(f"layer type(s) {', '.join(unknown)} are not supported")
            return window, tuple(_LAYER_TYPES[kind] for kind in named)
    return None, ("full",) * layers


class TokenEmbeddings(nn.Module):
    """Only what each token is: rotary models add no position here (it is applied inside attention)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token(input_ids)  # (B, T) -> (B, T, C)


def decoder_context(
    attention_mask: torch.Tensor,
    dtype: torch.dtype,
    inverse_frequencies: torch.Tensor,
    *,
    sliding_window: int | None = None,
) -> Context:
    """The context of a rotary decoder: causal masks (full, and sliding if asked) and rotary cos/sin.

    Positions are 0 .. T-1 in every row, as transformers' forward uses when not given position ids:
    with padding on the right, every real token gets the position it would have without padding.
    """
    positions = torch.arange(attention_mask.shape[1])[None]  # (1, T)
    masks = {"full": causal_mask(attention_mask, dtype)}  # (B, 1, T, T)
    if sliding_window is not None:
        masks["sliding"] = causal_mask(attention_mask, dtype, sliding_window=sliding_window)
    rotary = rotary_cos_sin(positions, inverse_frequencies, dtype)  # 2 x (1, T, hd)
    return Context(attention_mask=attention_mask, masks=masks, positions=positions, rotary=rotary)


def _layer(config: LlamaConfig, index: int) -> PreNormDecoderLayer:
    return PreNormDecoderLayer(
        attention_norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        attention=GroupedQueryAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            qkv_bias=config.qkv_bias,
            out_bias=config.out_bias,
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
        ),
        mlp_norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        mlp=GatedFeedForward(
            config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias
        ),
        attention_kind=config.layer_types[index],
    )


class LlamaModel(CausalLanguageModel):
    """A Llama-family decoder with its LM head: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TokenEmbeddings(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # C -> V

    def make_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Context:
        return decoder_context(
            attention_mask,
            self.dtype,
            rotary_inverse_frequencies(self.config.head_dim, self.config.rotary),
            sliding_window=self.config.sliding_window,
        )


def llama_weight_map(config: LlamaConfig) -> dict[str, str]:
    """Our parameter name -> the checkpoint's tensor name (``model.`` prefix already removed)."""
    mapping = {
        "embeddings.token.weight": "embed_tokens.weight",
        "final_norm.weight": "norm.weight",
        "lm_head.weight": "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight",
    }
    projections = [("query", "q_proj", config.qkv_bias), ("key", "k_proj", config.qkv_bias)]
    projections += [("value", "v_proj", config.qkv_bias), ("out", "o_proj", config.out_bias)]
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"layers.{i}"
        mapping[f"{ours}.attention_norm.weight"] = f"{theirs}.input_layernorm.weight"
        mapping[f"{ours}.mlp_norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for our_name, their_name, bias in projections:
            mapping[f"{ours}.attention.{our_name}.weight"] = f"{theirs}.self_attn.{their_name}.weight"
            if bias:
                mapping[f"{ours}.attention.{our_name}.bias"] = f"{theirs}.self_attn.{their_name}.bias"
        if config.qk_norm:
            mapping[f"{ours}.attention.query_norm.weight"] = f"{theirs}.self_attn.q_norm.weight"
            mapping[f"{ours}.attention.key_norm.weight"] = f"{theirs}.self_attn.k_norm.weight"
        for our_name, their_name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            mapping[f"{ours}.mlp.{our_name}.weight"] = f"{theirs}.mlp.{their_name}.weight"
            if config.mlp_bias:
                mapping[f"{ours}.mlp.{our_name}.bias"] = f"{theirs}.mlp.{their_name}.bias"
    return mapping


# Where our code computes each stage ("{i}": every layer), for the HTML report's stage table.
LLAMA_STAGE_FUNCTIONS = {
    "embeddings": TokenEmbeddings.forward,
    "layer.{i}.attention": GroupedQueryAttention.forward,
    "layer.{i}.attention_residual": PreNormDecoderLayer.forward,
    "layer.{i}.mlp": GatedFeedForward.forward,
    "layer.{i}.output": PreNormDecoderLayer.forward,
    "final_norm": RMSNorm.forward,
    "logits": CausalLanguageModel.finish,
}


# Where transformers' LlamaForCausalLM (and Mistral's, Qwen2's, Qwen3's, laid out the same) computes
# each stage.
class LlamaSteps(ReferenceSteps):
    """LlamaModel / MistralModel / Qwen2Model / Qwen3Model.forward: token embeddings, causal masks
    (sliding-window ones as each model picks them), rotary cos/sin, the layers, the final norm."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.model.embed_tokens(inputs["input_ids"])

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = model.config
        positions = torch.arange(embedded.shape[1]).unsqueeze(0)
        arguments = {
            "config": config,
            "inputs_embeds": embedded,
            "attention_mask": inputs["attention_mask"],
            "cache": None,
            "position_ids": positions,
        }
        kinds = self.mask_kinds(config)
        made = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        by_kind = {kind: made[kind](**arguments) for kind in set(kinds)}
        # The rotary tables are buffers computed at construction: build the model's own class afresh.
        rotary = type(model.model.rotary_emb)(config=config)
        return [by_kind[kind] for kind in kinds], positions, rotary(embedded, positions)

    @staticmethod
    def mask_kinds(config: Any) -> list[str]:
        """Each layer's mask, as each model's forward picks it: Qwen2 and Qwen3 by ``layer_types``;
        Mistral (no layer_types) one for every layer, sliding when ``sliding_window`` is set; Llama
        (neither) full."""
        if getattr(config, "layer_types", None):
            return list(config.layer_types)
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        masks, positions, position_embeddings = context
        return layer(
            hidden,
            attention_mask=masks[index],
            position_ids=positions,
            position_embeddings=position_embeddings,
        )

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        model.lm_head(model.model.norm(hidden))
        return {}


LLAMA_REFERENCE = ReferenceLayout(
    model_class="AutoModelForCausalLM",
    layers="model.layers",
    embeddings=(StagePoint("embeddings", "model.embed_tokens"),),
    layer=(
        StagePoint("attention", "self_attn"),  # after o_proj, before the residual
        StagePoint("attention_residual", "post_attention_layernorm", take="input"),
        StagePoint("mlp", "mlp"),
        StagePoint("output", ""),
    ),
    final=(StagePoint("final_norm", "model.norm"), StagePoint("logits", "lm_head")),
    attention="self_attn",
    steps=LlamaSteps(),
    embedding_modules=("model.embed_tokens",),
    final_modules=("model.norm", "lm_head"),
)
