"""The building blocks of a transformer encoder, each small enough to read in one sitting.

Read top to bottom: activations, LayerNorm, the padding mask, scaled dot-product attention,
multi-head attention, the feed-forward block, and the residual "Add & Norm" sub-layer. compare.bert
assembles them into BERT. Only torch is imported here; never transformers.

Shape names used in comments: B batch, T sequence length, C hidden size (= n_heads * head_dim),
nh number of heads, hd head dim, I intermediate (feed-forward) size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "FeedForward",
    "LayerNorm",
    "MultiHeadSelfAttention",
    "add_and_norm",
    "additive_padding_mask",
    "scaled_dot_product_attention",
]


# ----------------------------------------------------------------------------------------- activations


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU: x weighted by the probability that a standard normal is below x, x * Phi(x)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU used by GPT-2 ("gelu_new") and torch's approximate="tanh"."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_fast(x: torch.Tensor) -> torch.Tensor:
    """The same tanh approximation, written with sqrt(2/pi) pre-computed ("gelu_fast")."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(0, x)."""
    return torch.clamp(x, min=0)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


# config.json's ``hidden_act`` -> the function. Keys match compare.config.SUPPORTED_ACTIVATIONS.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_fast,
    "relu": relu,
    "silu": silu,
    "swish": silu,
    "tanh": torch.tanh,
}


# ------------------------------------------------------------------------------------------ LayerNorm


class LayerNorm(nn.Module):
    """Normalise each vector to mean 0 and variance 1 over its features, then scale and shift.

    ``weight`` (gamma in old checkpoints) and ``bias`` (beta) are learned per feature; ``eps`` keeps
    the division finite for a constant vector.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
        variance = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1), biased like the paper's
        normalised = (x - mean) / torch.sqrt(variance + self.eps)  # (..., C)
        return normalised * self.weight + self.bias


# ------------------------------------------------------------------------------------------ attention


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a (B, T) mask of 1 = real token, 0 = padding into a (B, 1, 1, T) additive mask.

    Kept keys get 0 and padded keys the most negative finite number of ``dtype`` (as transformers
    does; not -inf, so a row can never become all -inf and softmax never returns NaN). Added to the
    attention scores it makes softmax give padded keys a weight of exactly 0.
    """
    kept = torch.zeros((), dtype=dtype)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    mask = torch.where(attention_mask.bool(), kept, blocked)  # (B, T)
    return mask[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and query positions


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V: each query takes a weighted average of the values, weighted by
    how well it matches each key.

    Dividing by sqrt(d) keeps the dot products' spread independent of the head width, so softmax
    does not saturate for wide heads. Inputs are (B, nh, T, hd); ``mask`` is added to the scores.
    """
    head_dim = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))  # (B, nh, T, T)
    if mask is not None:
        scores = scores + mask  # padded keys -> about -3.4e38 (float32), i.e. weight 0 after softmax
    weights = torch.softmax(scores, dim=-1)  # (B, nh, T, T), each row sums to 1
    return torch.matmul(weights, value)  # (B, nh, T, hd)


class MultiHeadSelfAttention(nn.Module):
    """Several attention "heads" side by side, each looking at its own slice of the hidden vector.

    1. project the input to queries, keys and values (one Linear each, all heads at once);
    2. split the hidden dimension into heads;
    3. attend within each head (scaled dot-product attention);
    4. merge the heads back into one vector per position;
    5. mix the heads with the output projection ``out``.
    """

    def __init__(self, hidden_size: int, n_heads: int) -> None:
        super().__init__()
        assert hidden_size % n_heads == 0, "hidden_size must split evenly across heads"
        self.n_heads = n_heads
        self.head_dim = hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, nh, T, hd)."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nh, T, hd) -> (B, T, C): the heads' outputs side by side again."""
        batch, _, seq, _ = x.shape
        return x.transpose(1, 2).contiguous().view(batch, seq, self.n_heads * self.head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, C)
        query = self.split_heads(self.query(x))  # (B, nh, T, hd)
        key = self.split_heads(self.key(x))  # (B, nh, T, hd)
        value = self.split_heads(self.value(x))  # (B, nh, T, hd)
        context = scaled_dot_product_attention(query, key, value, mask)  # (B, nh, T, hd)
        context = self.merge_heads(context)  # (B, T, C)
        return self.out(context)  # (B, T, C)


# ------------------------------------------------------------------------------------- feed-forward


class FeedForward(nn.Module):
    """The position-wise feed-forward block: widen, apply a non-linearity, narrow back.

    The same two Linear layers are applied to every position independently (no mixing across
    positions happens here; that is attention's job).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)  # C -> I
        self.down = nn.Linear(intermediate_size, hidden_size)  # I -> C
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.up(x))  # (B, T, I)
        return self.down(hidden)  # (B, T, C)


# ------------------------------------------------------------------------------------- Add & Norm


def add_and_norm(residual: torch.Tensor, sublayer_output: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
    """The "Add & Norm" around every sub-layer, post-LN as in the original transformer and BERT:
    LayerNorm(x + sublayer(x)).

    (Pre-LN models such as GPT-2 and Llama instead compute x + sublayer(LayerNorm(x)).)
    """
    return norm(residual + sublayer_output)
