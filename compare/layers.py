"""The building blocks of a transformer, encoder and decoder, each small enough to read in one sitting.

Read top to bottom: activations; LayerNorm and RMSNorm; the masks (padding for encoders, causal for
decoders); how a transformer is told where each token is (three ways); scaled dot-product attention
and the three attention modules built on it (BERT's multi-head attention, Llama's grouped-query
attention with rotary positions, GPT-2's and Qwen's fused-projection attention); the feed-forward
blocks (BERT/GPT-2's and the gated SwiGLU of Llama and Qwen); the residual wiring of a layer (BERT's
post-LN "Add & Norm", and the pre-LN decoder layer). compare.bert, compare.gpt2, compare.llama and
compare.qwen assemble them. Only torch is imported here; never transformers.

Shape names used in comments, with the notation of "Attention Is All You Need" where it has one:

    B    batch
    T    sequence length
    C    hidden size, the width of the residual stream                 (the paper's d_model)
    nh   number of attention (query) heads                             (h)
    hd   width of one head, of its queries, keys and values            (d_k = d_v; d_model / h there,
                                                                        but Qwen3 sets it explicitly)
    nkv  number of key/value heads: nh in the paper, fewer with grouped-query attention
    I    width of the feed-forward block's hidden layer                (d_ff)
    V    vocabulary size
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import RotaryParameters
from .model import NO_RECORDING, Context, Recorder

__all__ = [
    "ACTIVATIONS",
    "FeedForward",
    "FusedQKVAttention",
    "GatedFeedForward",
    "GroupedQueryAttention",
    "LayerNorm",
    "MultiHeadSelfAttention",
    "PreNormDecoderLayer",
    "RMSNorm",
    "add_and_norm",
    "additive_padding_mask",
    "apply_rotary",
    "causal_mask",
    "merge_heads",
    "repeat_kv",
    "rotary_cos_sin",
    "rotary_inverse_frequencies",
    "rotate_half",
    "scaled_dot_product_attention",
    "split_heads",
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


# config.json's ``hidden_act`` (``activation_function`` for GPT-2) -> the function. Keys match
# compare.config.SUPPORTED_ACTIVATIONS.
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


# -------------------------------------------------------------------------------------- normalisation


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


class RMSNorm(nn.Module):
    """Divide each vector by its root mean square, then scale by a learned per-feature weight.

    LayerNorm's other two steps are dropped: it does not subtract the mean (re-centring turned out not
    to matter for training, and skipping it saves a pass over the data) and has no bias. Llama, Mistral
    and Qwen use it before every sub-layer and once more at the end.

    It is computed in float32 whatever the model's dtype, as transformers does: in bfloat16 the sum
    of squares would lose too much precision. transformers does this even in float64 runs, and so do
    we, so that a float64 comparison stays exact (both sides then have float32 precision here).
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)  # (..., C)
        mean_square = h.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
        h = h * torch.rsqrt(mean_square + self.eps)  # (..., C), root mean square now 1
        return self.weight * h.to(dtype)


# ---------------------------------------------------------------------------------------------- masks
# A mask is *added* to the attention scores before softmax: 0 where a query may look at a key, and
# the most negative finite number of the dtype where it may not (as transformers does). softmax then
# gives blocked keys a weight of exactly 0. Not -inf, so that a row whose keys are all blocked (a
# padded query whose sliding window holds only padding) stays finite in the mask's dtype: softmax
# spreads it evenly over every key. One exception, in transformers as here: a float64 mask whose
# scores take their softmax in float32 (the Llama family's, in a float64 run) turns into -inf there,
# and such a row becomes NaN (compare.runner keeps its inputs clear of that case).


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> 0 / finfo(dtype).min."""
    kept = torch.zeros((), dtype=dtype)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, kept, blocked)


def additive_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An encoder's mask: a (B, T) mask of 1 = real token, 0 = padding -> a (B, 1, 1, T) additive mask.

    Every position may look at every real token, before or after it (bidirectional attention).
    """
    return _additive(attention_mask.bool(), dtype)[:, None, None, :]  # (B, 1, 1, T): all heads, all queries


def causal_mask(
    attention_mask: torch.Tensor, dtype: torch.dtype, *, sliding_window: int | None = None
) -> torch.Tensor:
    """A decoder's mask, (B, 1, T, T): a position sees itself and earlier positions only, never padding.

    A decoder is trained to predict the next token at every position at once; if position t could
    look at t + 1 it would simply copy the answer. With ``sliding_window`` (Mistral), it also sees no
    further back than ``sliding_window - 1`` positions.
    """
    seq_len = attention_mask.shape[1]
    query = torch.arange(seq_len)[:, None]  # (T, 1)
    key = torch.arange(seq_len)[None, :]  # (1, T)
    allowed = key <= query  # (T, T), lower triangle: itself and the past
    if sliding_window is not None:
        allowed = allowed & (key > query - sliding_window)  # (T, T), a band below the diagonal
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return _additive(allowed, dtype)


# ------------------------------------------------------------------------------------------ positions
# Attention by itself is blind to order: shuffle the tokens and every output is shuffled the same way.
# Three ways of telling a transformer where each token is:
#
# 1. Sinusoidal (the original paper): a fixed vector PE[pos, 2i] = sin(pos / 10000^(2i/d_model)),
#    PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model)) is *added* to each token's embedding, once, at the
#    bottom. No parameters; a wave of a different wavelength per feature pair.
# 2. Learned (BERT, RoBERTa, GPT-2): a table of ``max_position_embeddings`` trained vectors, also
#    added once at the bottom (compare.bert, compare.gpt2). The model cannot read past its table.
# 3. Rotary (Llama, Mistral, Qwen): nothing is added to the embeddings. Instead, inside every
#    attention layer, each query and key is *rotated*, feature pair by feature pair, by an angle
#    proportional to its position (the paper's sinusoid frequencies, reused as rotation speeds). The
#    dot product of a query at position m with a key at position n then depends only on m - n: the
#    attention sees relative positions, and the residual stream carries no position at all.


def rotary_inverse_frequencies(head_dim: int, rotary: RotaryParameters) -> torch.Tensor:
    """How fast each feature pair turns, in radians per position: (hd/2,), float32.

    ``theta ** (-2i / hd)`` for pair i (see compare.config.RotaryParameters), computed in float32 as
    transformers does in every dtype, so the angles, and therefore float64 comparisons, agree exactly.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim  # (hd/2,)
    inverse_frequencies = 1.0 / (rotary.theta**exponents)  # (hd/2,), from 1 down to about 1/theta
    if rotary.rope_type == "llama3":
        inverse_frequencies = _llama3_frequencies(inverse_frequencies, rotary)
    return inverse_frequencies


def _llama3_frequencies(inverse_frequencies: torch.Tensor, rotary: RotaryParameters) -> torch.Tensor:
    """Llama 3.1's rescaling: pairs with wavelengths beyond the pre-training context turn ``factor``
    times slower; short wavelengths stay; those in between are blended smoothly."""
    context = rotary.original_max_position_embeddings
    low_freq_wavelength = context / rotary.low_freq_factor  # longer than this: slowed down
    high_freq_wavelength = context / rotary.high_freq_factor  # shorter than this: unchanged
    wavelength = 2 * math.pi / inverse_frequencies  # (hd/2,), positions per full turn
    scaled = torch.where(
        wavelength > low_freq_wavelength, inverse_frequencies / rotary.factor, inverse_frequencies
    )
    smooth = (context / wavelength - rotary.low_freq_factor) / (
        rotary.high_freq_factor - rotary.low_freq_factor
    )  # (hd/2,), 0 at the low-frequency end, 1 at the high one
    blended = (1 - smooth) * scaled / rotary.factor + smooth * scaled
    in_between = ~(wavelength < high_freq_wavelength) * ~(wavelength > low_freq_wavelength)
    return torch.where(in_between, blended, scaled)


def rotary_cos_sin(
    positions: torch.Tensor, inverse_frequencies: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of every position: (cos, sin), each (B or 1, T, hd), from position ids (B or 1, T).

    Angles are computed in float32 (as transformers does), then cast to the model's dtype. Each angle
    appears twice, ``cat(angles, angles)``, because of the layout :func:`rotate_half` uses.
    """
    angles = positions[..., None].to(torch.float32) * inverse_frequencies  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): features j and j + hd/2 share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1), where x1 and x2 are the two halves of the last dimension.

    This is the layout of transformers (and of Llama's converted checkpoints): feature j is paired with
    feature j + hd/2, not with its neighbour j + 1 as in the RoFormer paper's interleaved layout. Both
    describe the same rotation of differently ordered features; which one a checkpoint needs depends
    on how its q and k projections were trained (or permuted on conversion).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., hd/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., hd)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys (B, heads, T, hd) by their positions' angles.

    For a pair (a, b) = (x[j], x[j + hd/2]) at angle t this is the 2-D rotation
    (a cos t - b sin t, b cos t + a sin t), written for all pairs at once.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): the same angles for every head
    return x * cos + rotate_half(x) * sin  # (B, heads, T, hd)


# ------------------------------------------------------------------------------------------ attention


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softmax_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) V: each query takes a weighted average of the values, weighted by
    how well it matches each key. Returns (output (B, nh, T, hd), attention weights (B, nh, T, T)).

    Dividing by sqrt(d) keeps the dot products' spread independent of the head width, so softmax
    does not saturate for wide heads (``scale`` overrides it; GPT-2 can scale by layer too). Inputs
    are (B, nh, T, hd); ``mask`` is added to the scores. ``softmax_dtype``: Llama-family models take
    the softmax in float32, BERT and GPT-2 in the input's dtype. That matters in 16-bit runs:
    bfloat16 has float32's range but 8 bits of precision, too few for the exponentials and their
    sum (and float16 overflows beyond 65504).
    """
    scale = query.size(-1) ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # (B, nh, T, T)
    if mask is not None:
        scores = scores + mask  # blocked keys -> about -3.4e38 (float32), i.e. weight 0 after softmax
    weights = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(
        value.dtype
    )  # (B, nh, T, T), rows sum to 1
    return torch.matmul(weights, value), weights  # (B, nh, T, hd)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, heads * hd) -> (B, heads, T, hd): each head gets its own slice of the features."""
    batch, seq, width = x.shape
    return x.view(batch, seq, n_heads, width // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, hd) -> (B, T, heads * hd): the heads' outputs side by side again."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).contiguous().view(batch, seq, heads * head_dim)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, T, hd) -> (B, nkv * n_rep, T, hd): share each key/value head with ``n_rep`` query heads.

    Key/value head k serves the *contiguous* group of query heads k * n_rep ... (k + 1) * n_rep - 1
    (head order k0 k0 k1 k1, not k0 k1 k0 k1), which is how the checkpoints were trained.
    """
    if n_rep == 1:
        return x
    batch, kv_heads, seq, head_dim = x.shape
    x = x[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)  # (B, nkv, n_rep, T, hd), no copy
    return x.reshape(batch, kv_heads * n_rep, seq, head_dim)  # (B, nh, T, hd)


class MultiHeadSelfAttention(nn.Module):
    """Several attention "heads" side by side, each looking at its own slice of the hidden vector
    (BERT, RoBERTa: every position may look at every other).

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

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, record: Recorder = NO_RECORDING
    ) -> torch.Tensor:
        # x: (B, T, C)
        query = split_heads(self.query(x), self.n_heads)  # (B, nh, T, hd)
        key = split_heads(self.key(x), self.n_heads)  # (B, nh, T, hd)
        value = split_heads(self.value(x), self.n_heads)  # (B, nh, T, hd)
        context, weights = scaled_dot_product_attention(query, key, value, mask)  # (B, nh, T, hd)
        record.attention_weights(weights)
        return self.out(merge_heads(context))  # (B, T, C)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention of the Llama family: rotary positions and grouped-query attention.

    1. project to queries (nh heads) and to keys and values (nkv <= nh heads: each key/value head is
       shared by a group of nh / nkv query heads, which shrinks the key/value cache nh / nkv times);
    2. Qwen3 only: RMSNorm each query and key head over its hd features;
    3. rotate queries and keys by their positions (rotary embedding);
    4. repeat each key/value head for its group, attend (causal mask), merge, project with ``out``.

    The paper's multi-head attention is the special case nkv = nh.
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        out_bias: bool,
        qk_norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.query = nn.Linear(hidden_size, n_heads * head_dim, bias=qkv_bias)  # C -> nh * hd
        self.key = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)  # C -> nkv * hd
        self.value = nn.Linear(hidden_size, n_kv_heads * head_dim, bias=qkv_bias)  # C -> nkv * hd
        self.out = nn.Linear(n_heads * head_dim, hidden_size, bias=out_bias)  # nh * hd -> C
        self.query_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.key_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        record: Recorder = NO_RECORDING,
    ) -> torch.Tensor:
        # x: (B, T, C); mask: (B, 1, T, T) additive; rotary: (cos, sin), each (B or 1, T, hd)
        query = split_heads(self.query(x), self.n_heads)  # (B, nh, T, hd)
        key = split_heads(self.key(x), self.n_kv_heads)  # (B, nkv, T, hd)
        value = split_heads(self.value(x), self.n_kv_heads)  # (B, nkv, T, hd)
        if self.query_norm is not None and self.key_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)  # per head, over hd
        assert rotary is not None, "Llama-family attention needs the rotary (cos, sin) of the context"
        cos, sin = rotary
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        group = self.n_heads // self.n_kv_heads
        key, value = repeat_kv(key, group), repeat_kv(value, group)  # (B, nh, T, hd)
        context, weights = scaled_dot_product_attention(
            query, key, value, mask, softmax_dtype=torch.float32
        )  # (B, nh, T, hd)
        record.attention_weights(weights)
        return self.out(merge_heads(context))  # (B, T, C)


class FusedQKVAttention(nn.Module):
    """Causal self-attention with queries, keys and values from one fused projection (GPT-2, Qwen v1).

    ``qkv`` maps C -> 3C: its output is [queries | keys | values] side by side, in that order, so one
    matrix multiplication serves all three; the rest is multi-head attention (GPT-2: positions were
    added at the bottom; Qwen v1: queries and keys are rotated, ``rotary``).
    """

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        *,
        out_bias: bool,
        scale: float | None = None,
        softmax_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        assert hidden_size % n_heads == 0, "hidden_size must split evenly across heads"
        self.n_heads = n_heads
        self.scale = scale
        self.softmax_dtype = softmax_dtype
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # C -> 3C: [q | k | v]
        self.out = nn.Linear(hidden_size, hidden_size, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        record: Recorder = NO_RECORDING,
    ) -> torch.Tensor:
        # x: (B, T, C); mask: (B, 1, T, T) additive
        hidden_size = x.shape[-1]
        query, key, value = self.qkv(x).split(hidden_size, dim=-1)  # 3 x (B, T, C)
        query, key, value = (split_heads(t, self.n_heads) for t in (query, key, value))  # (B, nh, T, hd)
        if rotary is not None:
            cos, sin = rotary
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        context, weights = scaled_dot_product_attention(
            query, key, value, mask, scale=self.scale, softmax_dtype=self.softmax_dtype
        )  # (B, nh, T, hd)
        record.attention_weights(weights)
        return self.out(merge_heads(context))  # (B, T, C)


# ------------------------------------------------------------------------------------- feed-forward


class FeedForward(nn.Module):
    """The position-wise feed-forward block: widen, apply a non-linearity, narrow back (BERT, GPT-2).

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


class GatedFeedForward(nn.Module):
    """SwiGLU, the gated feed-forward block of Llama, Mistral and Qwen: down(silu(gate(x)) * up(x)).

    Two parallel projections widen the vector: ``up`` carries the content and ``gate``, through the
    activation, decides feature by feature how much of it passes. With three matrices instead of two,
    I is usually about 8/3 C instead of 4 C, for the same number of parameters.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, *, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=bias)  # C -> I
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias)  # C -> I
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)  # I -> C
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.activation(self.gate(x)) * self.up(x)  # (B, T, I)
        return self.down(hidden)  # (B, T, C)


# ---------------------------------------------------------------------------------- residual wiring


def add_and_norm(residual: torch.Tensor, sublayer_output: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
    """The "Add & Norm" around every sub-layer, post-LN as in the original transformer and BERT:
    LayerNorm(x + sublayer(x)).

    (Pre-LN models such as GPT-2 and Llama instead compute x + sublayer(norm(x)): see
    :class:`PreNormDecoderLayer`.)
    """
    return norm(residual + sublayer_output)


class PreNormDecoderLayer(nn.Module):
    """One decoder layer, pre-LN (GPT-2, Llama, Mistral, Qwen): normalise, transform, add back.

        x -> x + attention(norm(x)) -> x + mlp(norm(x))

    Unlike BERT's post-LN layer, the residual stream x itself is never normalised inside the layers:
    each sub-layer reads a normalised copy and adds its result back. Deep stacks train more stably
    this way, which is why a final norm is needed after the last layer.

    ``attention_kind`` picks the layer's mask in the context: "full", or "sliding" for Mistral/Qwen
    sliding-window layers.
    """

    def __init__(
        self,
        attention_norm: nn.Module,
        attention: nn.Module,
        mlp_norm: nn.Module,
        mlp: nn.Module,
        *,
        attention_kind: str = "full",
    ) -> None:
        super().__init__()
        self.attention_norm = attention_norm
        self.attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.attention_kind = attention_kind

    def forward(self, x: torch.Tensor, context: Context, record: Recorder = NO_RECORDING) -> torch.Tensor:
        # x: (B, T, C), the residual stream
        mask = context.masks[self.attention_kind]  # (B, 1, T, T)
        attention_out = self.attention(self.attention_norm(x), mask, context.rotary, record)  # (B, T, C)
        attention_out = record("attention", attention_out)
        x = record("attention_residual", x + attention_out)  # (B, T, C)
        mlp_out = record("mlp", self.mlp(self.mlp_norm(x)))  # (B, T, C)
        return record("output", x + mlp_out)  # (B, T, C)
