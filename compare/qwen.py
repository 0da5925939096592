"""Qwen (v1: Qwen/Qwen-7B, Qwen-14B, Qwen-1_8B; ``model_type: "qwen"``) from scratch, read under its
own tensor names.

Qwen v1 is a Llama-style decoder (RMSNorm, rotary positions, a SwiGLU feed-forward block, no
grouped-query attention) saved in a GPT-2-like layout:

    transformer.wte                          token embeddings
    transformer.h.N.ln_1                     RMSNorm before attention
    transformer.h.N.attn.c_attn              C -> 3C with bias: queries, keys, values side by side
    transformer.h.N.attn.c_proj              C -> C, no bias
    transformer.h.N.ln_2                     RMSNorm before the feed-forward block
    transformer.h.N.mlp.{w1, w2, c_proj}     c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 "up"
    transformer.ln_f, lm_head                final RMSNorm; untied LM head

config.json: ``kv_channels`` (head width), ``intermediate_size`` (twice the width of w1 and w2),
``layer_norm_epsilon``, ``rotary_emb_base``, ``rotary_pct`` and ``seq_length``. Its ``use_dynamic_ntk``
and ``use_logn_attn`` only change anything on inputs longer than ``seq_length`` tokens, so longer
inputs are refused.

**The reference.** Qwen's official modelling code is remote code written for transformers < 4.38; it
does not run on transformers 5 (and remote code is never run here). The reference is therefore
transformers' own Qwen2 implementation, loaded from this checkpoint through the conversion at the end
of this module (the one LlamaFactory's ``llamafy_qwen.py`` and TransformerLens use): split ``c_attn``
into q/k/v, ``w2`` -> ``gate_proj``, ``w1`` -> ``up_proj``, ``mlp.c_proj`` -> ``down_proj``, as many key/value
heads as query heads, untied. Our model reads the checkpoint under its own names, without that
conversion, and a test checks it against an original Qwen2 model converted the other way.

Numerics follow the reference: softmax in float32 (Qwen's own code takes it in the model's dtype;
the two agree in float32, and differ only in float64 runs). Only torch is imported; never
transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfmirror.errors import CompareError, UnsupportedModelError

from .config import ConfigFields, RotaryParameters, padding_id
from .layers import (
    FusedQKVAttention,
    GatedFeedForward,
    PreNormDecoderLayer,
    RMSNorm,
    rotary_inverse_frequencies,
)
from .llama import LLAMA_REFERENCE, LLAMA_STAGE_FUNCTIONS, TokenEmbeddings, decoder_context
from .model import CausalLanguageModel, Context

__all__ = [
    "QWEN_REFERENCE",
    "QWEN_STAGE_FUNCTIONS",
    "QwenConfig",
    "QwenModel",
    "qwen2_reference_config",
    "qwen2_reference_tensors",
    "qwen_weight_map",
]


@dataclass(frozen=True)
class QwenConfig:
    """The hyper-parameters of a Qwen v1 model (names follow its config.json)."""

    vocab_size: int = 151936
    hidden_size: int = 4096  # C
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # nh; keys and values have as many heads
    kv_channels: int = 128  # hd
    intermediate_size: int = 22016  # twice I: w1 and w2 are each intermediate_size / 2 wide
    layer_norm_epsilon: float = 1e-6  # RMSNorm's eps
    rotary_emb_base: float = 10000.0  # rotary theta
    seq_length: int = 8192  # the longest input compared (see the module docstring)
    tie_word_embeddings: bool = False
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        """I, the width of w1 and w2."""
        return self.intermediate_size // 2

    def sequence_limit(self) -> tuple[int, str]:
        return (
            self.seq_length,
            "seq_length: beyond it Qwen's dynamic NTK rotary and log-n attention scaling change the result",
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenConfig:
        """Build and validate a config from a parsed config.json.

        Raises:
            UnsupportedModelError: partial rotary (``rotary_pct`` < 1) or biases in c_proj and the
                feed-forward block (``no_bias: false``), which the Qwen2 reference cannot hold.
            CompareError: a missing or inconsistent field.
        """
        fields = ConfigFields(raw)
        if fields.number("rotary_pct", 1.0) != 1.0:
            raise UnsupportedModelError("Qwen with rotary_pct < 1 (partial rotary) is not supported")
        if not fields.boolean("no_bias", True):
            raise UnsupportedModelError("Qwen with no_bias: false is not supported")
        vocab_size = fields.integer("vocab_size")
        config = cls(
            vocab_size=vocab_size,
            hidden_size=fields.integer("hidden_size"),
            num_hidden_layers=fields.integer("num_hidden_layers"),
            num_attention_heads=fields.integer("num_attention_heads"),
            kv_channels=fields.integer("kv_channels"),
            intermediate_size=fields.integer("intermediate_size"),
            layer_norm_epsilon=fields.positive_number("layer_norm_epsilon", cls.layer_norm_epsilon),
            rotary_emb_base=fields.positive_number("rotary_emb_base", cls.rotary_emb_base),
            seq_length=fields.integer("seq_length", aliases=("max_position_embeddings",)),
            tie_word_embeddings=fields.boolean("tie_word_embeddings", False),
            pad_token_id=padding_id(raw, vocab_size),
        )
        if config.kv_channels * config.num_attention_heads != config.hidden_size:
            raise CompareError(
                f"kv_channels ({config.kv_channels}) x num_attention_heads ({config.num_attention_heads}) "
                f"must equal hidden_size ({config.hidden_size}), as in every Qwen v1 model"
            )
        if config.intermediate_size % 2:
            raise CompareError(
                f"intermediate_size ({config.intermediate_size}) must be even (w1 and w2 halve it)"
            )
        return config


def _layer(config: QwenConfig) -> PreNormDecoderLayer:
    return PreNormDecoderLayer(
        attention_norm=RMSNorm(config.hidden_size, config.layer_norm_epsilon),
        attention=FusedQKVAttention(
            config.hidden_size, config.num_attention_heads, out_bias=False, softmax_dtype=torch.float32
        ),
        mlp_norm=RMSNorm(config.hidden_size, config.layer_norm_epsilon),
        mlp=GatedFeedForward(config.hidden_size, config.mlp_width, "silu", bias=False),
    )


class QwenModel(CausalLanguageModel):
    """Qwen v1 with its LM head: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TokenEmbeddings(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_layer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def make_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Context:
        if input_ids.shape[1] > self.config.seq_length:
            raise CompareError(
                f"input of {input_ids.shape[1]} tokens is longer than Qwen's seq_length "
                f"({self.config.seq_length})"
            )
        rotary = RotaryParameters(theta=self.config.rotary_emb_base)
        return decoder_context(
            attention_mask, self.dtype, rotary_inverse_frequencies(self.config.head_dim, rotary)
        )


def qwen_weight_map(config: QwenConfig) -> dict[str, str]:
    """Our parameter name -> Qwen v1's own tensor name (``transformer.`` prefix already removed)."""
    mapping = {
        "embeddings.token.weight": "wte.weight",
        "final_norm.weight": "ln_f.weight",
        "lm_head.weight": "wte.weight" if config.tie_word_embeddings else "lm_head.weight",
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"h.{i}"
        mapping |= {
            f"{ours}.attention_norm.weight": f"{theirs}.ln_1.weight",
            f"{ours}.attention.qkv.weight": f"{theirs}.attn.c_attn.weight",
            f"{ours}.attention.qkv.bias": f"{theirs}.attn.c_attn.bias",
            f"{ours}.attention.out.weight": f"{theirs}.attn.c_proj.weight",
            f"{ours}.mlp_norm.weight": f"{theirs}.ln_2.weight",
            f"{ours}.mlp.gate.weight": f"{theirs}.mlp.w2.weight",  # inside silu
            f"{ours}.mlp.up.weight": f"{theirs}.mlp.w1.weight",
            f"{ours}.mlp.down.weight": f"{theirs}.mlp.c_proj.weight",
        }
    return mapping


# ------------------------------------------------------------------------------ the reference's view
# How transformers' Qwen2ForCausalLM is made to hold this checkpoint (see the module docstring).


def qwen2_reference_config(config: QwenConfig) -> dict[str, Any]:
    """A transformers Qwen2Config (as keyword arguments) with the same computation as ``config``."""
    return {
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,  # no grouped-query attention in Qwen v1
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_length,
        "rms_norm_eps": config.layer_norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_emb_base},
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_sliding_window": False,
    }


# Non-learned buffers some Qwen v1 checkpoints carry (regular expressions, without "transformer."):
# neither side reads them (the registry entry ignores them; the conversion drops them).
QWEN_IGNORED = (r"h\.\d+\.attn\.(masked_bias|rotary_emb\.inv_freq)",)

_QWEN2_NAMES = {  # Qwen v1 name within layer N -> Qwen2's (c_attn is split separately)
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def qwen2_reference_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Qwen v1 checkpoint tensors -> Qwen2ForCausalLM's, one by one (so a layer converts alone).

    Raises:
        CompareError: a tensor this conversion does not know.
    """
    for name, tensor in tensors:
        base = name.removeprefix("transformer.")
        if base == "wte.weight":
            yield "model.embed_tokens.weight", tensor
        elif base == "ln_f.weight":
            yield "model.norm.weight", tensor
        elif base == "lm_head.weight":
            yield "lm_head.weight", tensor
        elif base.startswith("h."):
            _, index, rest = base.split(".", 2)
            layer = f"model.layers.{index}"
            if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
                kind = rest.rsplit(".", 1)[1]
                query, key, value = tensor.chunk(3, dim=0)  # [q | k | v] along the output dimension
                yield from (
                    (f"{layer}.self_attn.{proj}.{kind}", part)
                    for proj, part in (("q_proj", query), ("k_proj", key), ("v_proj", value))
                )
            elif rest in _QWEN2_NAMES:
                yield f"{layer}.{_QWEN2_NAMES[rest]}", tensor
            elif not any(re.fullmatch(pattern, base) for pattern in QWEN_IGNORED):
                raise CompareError(f"no Qwen2 counterpart for tensor {name!r}")
        else:
            raise CompareError(f"no Qwen2 counterpart for tensor {name!r}")


# Where our code computes each stage ("{i}": every layer): Llama's, but for the fused attention.
QWEN_STAGE_FUNCTIONS = LLAMA_STAGE_FUNCTIONS | {"layer.{i}.attention": FusedQKVAttention.forward}

# Qwen2ForCausalLM is laid out like Llama.
QWEN_REFERENCE = LLAMA_REFERENCE
