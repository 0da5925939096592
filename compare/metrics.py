"""How far apart two tensors are, and whether that is within tolerance.

All metrics are computed in float64, so the measurement adds no rounding of its own.

- ``max_abs_diff``: max |ours - ref| over every element.
- ``mean_abs_diff``: mean |ours - ref|.
- ``rel_error``: max |ours - ref| / max |ref| (the worst error, relative to the stage's scale).
- ``cosine_similarity``: of the two tensors flattened into vectors (1.0 = same direction).
- ``tolerance_used``: max over elements of |ours - ref| / (atol + rtol * |ref|). A stage passes when
  this is <= 1, which is exactly ``torch.allclose(ours, ref, rtol, atol)``; it also says how much of
  the tolerance budget was spent (0.01 = a margin of 100x).
- ``nmse``: sum (ours - ref)^2 / sum ref^2, the normalised mean squared error, as llama.cpp's
  conversion checks use it (mse(ref, ours) / mse(ref, 0)).
- ``p99_abs_diff``: the 99th percentile of |ours - ref|: the error of nearly every element, which a
  handful of outliers cannot move (as they move the max).

Each stage is measured twice (compare.model explains how): **carried**, our model run on its own
numbers from the embeddings on (the fields above), and **isolated**, our component fed exactly the
reference's input to it (``isolated``: the same measures, its own error). The verdict follows the
isolated errors: a stage fails because of what it computes, not because of what it inherited.

Every position is compared, padded ones included: both implementations compute padded rows the same
deterministic way (padding is masked as a *key*, not as a query), so they must agree there too.
Where the reference itself produces nan (transformers' float64 runs of sliding-window models: a
padded query whose whole window is padding gets a softmax over -inf only), ours must produce nan
at exactly the same elements; the stage is then measured on the others, and says so in its note.

For models with an LM head, :func:`next_token_metrics` compares what the two would predict, at real
(not padded) positions only: the share of positions where both rank the same token first, and the
KL divergence KL(reference || ours) of the two next-token distributions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["ISOLATED_FIELDS", "NextTokenMetrics", "StageResult", "compare_tensors", "next_token_metrics"]


# The fields of an isolated measurement in the JSON report.
ISOLATED_FIELDS = ("max_abs_diff", "mean_abs_diff", "rel_error", "cosine_similarity", "passed", "note")


@dataclass
class StageResult:
    """One stage's comparison. Metrics are None when they cannot be computed (shape mismatch, absent).

    The fields are the carried measurement; ``isolated`` is the same stage measured with our component
    fed the reference's input (None when not measured).
    """

    name: str
    passed: bool
    shape: list[int]
    max_abs_diff: float | None
    mean_abs_diff: float | None
    rel_error: float | None
    cosine_similarity: float | None
    tolerance_used: float | None
    note: str | None = None
    nmse: float | None = None
    p99_abs_diff: float | None = None
    isolated: StageResult | None = None

    @property
    def verdict_passed(self) -> bool:
        """Whether this stage passes the verdict: its isolated error if measured, else its carried one."""
        return self.isolated.passed if self.isolated is not None else self.passed

    def to_dict(self) -> dict[str, object]:
        fields = {key: value for key, value in asdict(self).items() if key != "isolated"}
        if self.isolated is not None:
            fields["isolated"] = {key: getattr(self.isolated, key) for key in ISOLATED_FIELDS}
        return fields


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def compare_tensors(
    name: str, ours: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float
) -> StageResult:
    """Compare our tensor for one stage with the reference's."""
    if ours.shape != ref.shape:
        return StageResult(
            name=name,
            passed=False,
            shape=list(ref.shape),
            max_abs_diff=None,
            mean_abs_diff=None,
            rel_error=None,
            cosine_similarity=None,
            tolerance_used=None,
            note=f"shape {list(ours.shape)} != reference {list(ref.shape)}",
        )
    a = ours.detach().to(torch.float64).flatten()
    b = ref.detach().to(torch.float64, copy=True).flatten()  # a copy of our own: changed in place below
    finite = torch.isfinite(a)
    note = None
    if not (finite.all() and torch.isfinite(b).all()):
        if not _same_non_finite(a, b):
            where = "the reference" if finite.all() else "ours"
            note = f"non-finite values (nan/inf) in {where}"
            return StageResult(name, False, list(ref.shape), None, None, None, None, None, note)
        # The reference itself gives nan here, and we reproduce it exactly: compare the rest.
        note = f"nan/inf at the same {int((~finite).sum())} elements in both, compared elsewhere"
        a, b = a[finite], b[finite]
    if a.numel() == 0:
        return StageResult(name, True, list(ref.shape), 0.0, 0.0, 0.0, 1.0, 0.0, note or "empty")

    # Written to hold few float64 copies at once: a stage can be the logits, (B, T, V) with V ~ 150k.
    diff = (a - b).abs_()
    max_abs = diff.max().item()
    scale = b.abs().max().item()
    rel_error = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norms = a.norm() * b.norm()
    if norms > 0:
        cosine = (torch.dot(a, b) / norms).item()
    else:
        cosine = 1.0 if a.norm() == b.norm() else 0.0  # both zero vectors: same; one zero: unrelated
    reference_energy = torch.dot(b, b).item()
    error_energy = torch.dot(diff, diff).item()
    nmse = (
        error_energy / reference_energy if reference_energy > 0 else (0.0 if error_energy == 0 else math.inf)
    )
    del a
    allowed = b.abs_().mul_(rtol).add_(atol)  # atol + rtol * |ref|, in b's place
    passed = bool((diff <= allowed).all())
    # Where nothing is allowed (atol = 0 and ref = 0), any difference at all uses an infinite budget.
    nothing_allowed = allowed == 0
    ratio = diff / allowed.masked_fill_(nothing_allowed, 1.0)
    ratio.masked_fill_(nothing_allowed & (diff > 0), math.inf).masked_fill_(
        nothing_allowed & (diff == 0), 0.0
    )
    tolerance_used = ratio.max().item()
    del allowed, ratio, nothing_allowed
    p99 = diff.kthvalue(max(1, math.ceil(0.99 * diff.numel()))).values.item()
    return StageResult(
        name=name,
        passed=passed,
        shape=list(ref.shape),
        max_abs_diff=max_abs,
        mean_abs_diff=diff.mean().item(),
        rel_error=_finite_or_none(rel_error),
        cosine_similarity=cosine,
        tolerance_used=_finite_or_none(tolerance_used),
        note=note,
        nmse=_finite_or_none(nmse),
        p99_abs_diff=p99,
    )


def _same_non_finite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are non-finite at exactly the same elements, with the same values there."""
    non_finite = ~torch.isfinite(a)
    if not torch.equal(non_finite, ~torch.isfinite(b)):
        return False
    x, y = a[non_finite], b[non_finite]
    return bool(((x == y) | (x.isnan() & y.isnan())).all())


@dataclass
class NextTokenMetrics:
    """What the two models would predict next, compared at real positions."""

    agreement: float  # share of real positions where both rank the same token first
    kl_divergence_mean: float  # KL(reference || ours) per position, in nats, mean over real positions
    kl_divergence_max: float
    positions: int  # how many real positions were compared
    top1_ours: list[list[int]]  # (B, T): the top-1 token id at every position, padded ones included
    top1_reference: list[list[int]]

    def to_dict(self) -> dict[str, object]:
        return {
            "agreement": self.agreement,
            "kl_divergence_mean": self.kl_divergence_mean,
            "kl_divergence_max": self.kl_divergence_max,
            "positions": self.positions,
            "kl_direction": "KL(reference || ours), nats",
        }


def next_token_metrics(
    ours: torch.Tensor, reference: torch.Tensor, attention_mask: torch.Tensor
) -> NextTokenMetrics:
    """Compare next-token predictions from logits (B, T, V), at the positions ``attention_mask`` keeps
    (and where both are finite)."""
    top1_ours = ours.argmax(dim=-1)  # (B, T)
    top1_reference = reference.argmax(dim=-1)  # (B, T)
    finite = torch.isfinite(ours).all(dim=-1) & torch.isfinite(reference).all(dim=-1)  # (B, T)
    real = attention_mask.bool() & finite  # (B, T); where the reference gives nan, ours must too (stages)
    log_p_ours = torch.log_softmax(ours, dim=-1, dtype=torch.float64)  # (B, T, V)
    log_p_reference = torch.log_softmax(reference, dim=-1, dtype=torch.float64)
    gap = log_p_reference.sub_(log_p_ours)  # log p_ref - log p_ours, in place (V can be ~150k)
    del log_p_ours
    gap.mul_(torch.log_softmax(reference, dim=-1, dtype=torch.float64).exp_())  # p_ref * (...)
    kl = gap.sum(dim=-1)  # (B, T)
    del gap
    kl = kl[real].clamp(min=0.0)  # (real positions,); tiny negatives are rounding
    positions = int(real.sum())
    return NextTokenMetrics(
        agreement=float((top1_ours == top1_reference)[real].double().mean()) if positions else 1.0,
        kl_divergence_mean=float(kl.mean()) if positions else 0.0,
        kl_divergence_max=float(kl.max()) if positions else 0.0,
        positions=positions,
        top1_ours=top1_ours.tolist(),
        top1_reference=top1_reference.tolist(),
    )
