"""GPT-2 from scratch: learned positions, pre-LN decoder layers with fused attention, a tied LM head.

Bottom-up: ``GPT2Config`` (config.json -> typed), ``GPT2Embeddings``, the layer (a
compare.layers.PreNormDecoderLayer of LayerNorm, fused-projection causal attention and a GELU
feed-forward block), ``GPT2Model``, ``gpt2_weight_map`` and ``GPT2_REFERENCE``. Only torch is
imported (through compare.layers); transformers only inside ``GPT2Steps``, when the reference runs.

Three things catch out re-implementations (nanoGPT among them):

* The checkpoint's linear layers are Conv1D modules from the original TensorFlow code: their
  weights are stored (in, out) and applied as ``x @ W + b``. nn.Linear stores (out, in), so the weight
  map transposes them, on purpose (:class:`compare.weights.Transposed`).
* ``c_attn`` is one C -> 3C projection holding queries, keys and values side by side.
* The activation is the tanh approximation of GELU (``activation_function: "gelu_new"``), not the
  exact erf form; the two differ by up to ~1e-3, enough to fail a float32 comparison.

Stages: ``embeddings``; per layer ``attention``, ``attention_residual``, ``mlp``, ``output``;
``final_norm``; ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hfmirror.errors import CompareError, UnsupportedModelError

from .config import ConfigFields, check_activation, padding_id
from .layers import FeedForward, FusedQKVAttention, LayerNorm, PreNormDecoderLayer, causal_mask
from .model import CausalLanguageModel, Context, Recorder
from .reference_layout import ReferenceLayout, ReferenceSteps, StagePoint
from .weights import Transposed

__all__ = [
    "GPT2_REFERENCE",
    "GPT2_STAGE_FUNCTIONS",
    "GPT2Config",
    "GPT2Model",
    "GPT2Steps",
    "gpt2_weight_map",
]


@dataclass(frozen=True)
class GPT2Config:
    """The hyper-parameters of GPT-2 (config.json's short names in comments)."""

    vocab_size: int = 50257
    hidden_size: int = 768  # n_embd
    num_hidden_layers: int = 12  # n_layer
    num_attention_heads: int = 12  # n_head
    intermediate_size: int = 3072  # n_inner, or 4 * n_embd when null
    activation: str = "gelu_new"  # activation_function
    layer_norm_eps: float = 1e-5  # layer_norm_epsilon
    max_position_embeddings: int = 1024  # n_positions
    scale_attn_weights: bool = True  # divide attention scores by sqrt(hd)
    scale_attn_by_inverse_layer_idx: bool = False  # and by (layer index + 1)
    tie_word_embeddings: bool = True  # the LM head reuses the token embedding matrix
    pad_token_id: int = 50256  # GPT-2 has no padding token; padded positions are masked anyway

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def sequence_limit(self) -> tuple[int, str]:
        return self.max_position_embeddings, "n_positions"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPT2Config:
        """Build and validate a config from a parsed config.json.

        Raises:
            UnsupportedModelError: cross-attention, or the reordered-and-upcast attention variant.
            CompareError: a missing or inconsistent field.
        """
        if raw.get("add_cross_attention"):
            raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        if raw.get("reorder_and_upcast_attn"):
            raise UnsupportedModelError("GPT-2's reorder_and_upcast_attn variant is not supported")
        fields = ConfigFields(raw)
        hidden_size = fields.integer("n_embd", aliases=("hidden_size",))
        vocab_size = fields.integer("vocab_size")
        config = cls(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=fields.integer("n_layer", aliases=("num_hidden_layers",)),
            num_attention_heads=fields.integer("n_head", aliases=("num_attention_heads",)),
            intermediate_size=fields.integer("n_inner", 4 * hidden_size),
            activation=check_activation(
                fields.string("activation_function", cls.activation), "activation_function"
            ),
            layer_norm_eps=fields.positive_number("layer_norm_epsilon", cls.layer_norm_eps),
            max_position_embeddings=fields.integer("n_positions", aliases=("max_position_embeddings",)),
            scale_attn_weights=fields.boolean("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=fields.boolean("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=fields.boolean("tie_word_embeddings", True),
            pad_token_id=padding_id(raw, vocab_size),
        )
        if config.num_attention_heads == 0 or config.hidden_size % config.num_attention_heads != 0:
            raise CompareError(
                f"n_embd ({config.hidden_size}) must be a multiple of n_head ({config.num_attention_heads})"
            )
        return config


class GPT2Embeddings(nn.Module):
    """Token embedding + learned position embedding (no norm: each layer normalises its own input)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token(input_ids) + self.position(positions)  # (B, T, C) + (1, T, C)


def _layer(config: GPT2Config, index: int) -> PreNormDecoderLayer:
    scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(index + 1)  # deeper layers get softer attention (a GPT-2 training option)
    return PreNormDecoderLayer(
        attention_norm=LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        attention=FusedQKVAttention(
            config.hidden_size, config.num_attention_heads, out_bias=True, scale=scale
        ),
        mlp_norm=LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
        mlp=FeedForward(config.hidden_size, config.intermediate_size, config.activation),
    )


class GPT2Model(CausalLanguageModel):
    """GPT-2 with its language-modelling head: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.embeddings = GPT2Embeddings(config)
        self.layers = nn.ModuleList(_layer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # C -> V

    def make_context(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None
    ) -> Context:
        positions = torch.arange(input_ids.size(1))[None]  # (1, T): 0 .. T-1 in every row
        return Context(
            attention_mask=attention_mask,
            masks={"full": causal_mask(attention_mask, self.dtype)},  # (B, 1, T, T)
            positions=positions,
        )

    def embed(self, input_ids: torch.Tensor, context: Context, record: Recorder) -> torch.Tensor:
        return record("embeddings", self.embeddings(input_ids, context.positions))


def gpt2_weight_map(config: GPT2Config) -> dict[str, str | Transposed]:
    """Our parameter name -> the checkpoint's tensor name (``transformer.`` prefix already removed).

    Conv1D weights are stored (in, out): ``Transposed`` turns them into nn.Linear's (out, in). The
    tied LM head reads the token embedding matrix (GPT-2 checkpoints do not store it twice).
    """
    mapping: dict[str, str | Transposed] = {
        "embeddings.token.weight": "wte.weight",
        "embeddings.position.weight": "wpe.weight",
        "final_norm.weight": "ln_f.weight",
        "final_norm.bias": "ln_f.bias",
        "lm_head.weight": "wte.weight" if config.tie_word_embeddings else "lm_head.weight",
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}", f"h.{i}"
        mapping |= {
            f"{ours}.attention_norm.weight": f"{theirs}.ln_1.weight",
            f"{ours}.attention_norm.bias": f"{theirs}.ln_1.bias",
            f"{ours}.attention.qkv.weight": Transposed(f"{theirs}.attn.c_attn.weight"),
            f"{ours}.attention.qkv.bias": f"{theirs}.attn.c_attn.bias",
            f"{ours}.attention.out.weight": Transposed(f"{theirs}.attn.c_proj.weight"),
            f"{ours}.attention.out.bias": f"{theirs}.attn.c_proj.bias",
            f"{ours}.mlp_norm.weight": f"{theirs}.ln_2.weight",
            f"{ours}.mlp_norm.bias": f"{theirs}.ln_2.bias",
            f"{ours}.mlp.up.weight": Transposed(f"{theirs}.mlp.c_fc.weight"),
            f"{ours}.mlp.up.bias": f"{theirs}.mlp.c_fc.bias",
            f"{ours}.mlp.down.weight": Transposed(f"{theirs}.mlp.c_proj.weight"),
            f"{ours}.mlp.down.bias": f"{theirs}.mlp.c_proj.bias",
        }
    return mapping


# Where our code computes each stage ("{i}": every layer), for the HTML report's stage table.
GPT2_STAGE_FUNCTIONS = {
    "embeddings": GPT2Embeddings.forward,
    "layer.{i}.attention": FusedQKVAttention.forward,
    "layer.{i}.attention_residual": PreNormDecoderLayer.forward,
    "layer.{i}.mlp": FeedForward.forward,
    "layer.{i}.output": PreNormDecoderLayer.forward,
    "final_norm": LayerNorm.forward,
    "logits": CausalLanguageModel.finish,
}


# Where transformers' GPT2LMHeadModel computes each stage. No module returns the embedding sum, but
# the (inactive) dropout right after it does.
class GPT2Steps(ReferenceSteps):
    """GPT2Model.forward: token + learned position embeddings, a causal mask, the blocks, ln_f."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        transformer = model.transformer
        ids = inputs["input_ids"]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return transformer.drop(transformer.wte(ids) + transformer.wpe(positions))

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(embedded.shape[1]).unsqueeze(0)
        return create_causal_mask(
            config=model.config,
            inputs_embeds=embedded,
            attention_mask=inputs["attention_mask"],
            cache=None,
            position_ids=positions,
        )

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return layer(hidden, None, context)

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        model.lm_head(model.transformer.ln_f(hidden))
        return {}


GPT2_REFERENCE = ReferenceLayout(
    model_class="AutoModelForCausalLM",
    layers="transformer.h",
    embeddings=(StagePoint("embeddings", "transformer.drop"),),
    layer=(
        StagePoint("attention", "attn"),  # after c_proj, before the residual
        StagePoint("attention_residual", "ln_2", take="input"),  # x + attention, as ln_2 receives it
        StagePoint("mlp", "mlp"),
        StagePoint("output", ""),
    ),
    final=(StagePoint("final_norm", "transformer.ln_f"), StagePoint("logits", "lm_head")),
    attention="attn",
    steps=GPT2Steps(),
    embedding_modules=("transformer.wte", "transformer.wpe"),
    final_modules=("transformer.ln_f", "lm_head"),
)
