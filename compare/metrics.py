"""How far apart two tensors are, and whether that is within tolerance.

All metrics are computed in float64, so the measurement adds no rounding of its own, a chunk of
elements at a time, so that measuring the logits (B, T, V) costs about one more copy of them, not eight.

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
Where the reference itself produces nan, ours must produce nan at exactly the same elements; the
stage is then measured on the others, and says so in its note. A stage with no finite element
left fails ("not measured"): nothing is known to match. (compare.runner keeps transformers' float64
sliding-window nan out of the inputs: see check_padding.)

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
    a = ours.detach().flatten()
    b = ref.detach().flatten()
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
        return StageResult(name, False, list(ref.shape), None, None, None, None, None, _NOTHING_FINITE)
    sums = _Sums(a.numel(), torch.promote_types(a.dtype, b.dtype))
    for start in range(0, a.numel(), _CHUNK):
        sums.add(a[start : start + _CHUNK], b[start : start + _CHUNK], atol=atol, rtol=rtol)
    return StageResult(
        name=name,
        passed=sums.passed,
        shape=list(ref.shape),
        max_abs_diff=sums.max_abs,
        mean_abs_diff=sums.sum_abs / a.numel(),
        rel_error=_finite_or_none(_ratio(sums.max_abs, sums.scale)),
        cosine_similarity=sums.cosine(),
        tolerance_used=_finite_or_none(sums.tolerance_used),
        note=note,
        nmse=_finite_or_none(_ratio(sums.error_energy, sums.reference_energy)),
        p99_abs_diff=sums.percentile(0.99),
    )


# Why a stage with no finite element fails: nothing was measured, so nothing is known to match.
_NOTHING_FINITE = "not measured: no finite element to compare (nan/inf everywhere, in both)"

# Elements measured at once: a stage can be the logits, (B, T, V) with V ~ 150k, and its float64
# temporaries would otherwise cost several times the logits' own bytes at the peak.
_CHUNK = 1 << 18


def _ratio(part: float, whole: float) -> float:
    """part / whole, where 0 / 0 is 0 (no error of nothing) and x / 0 is inf."""
    return part / whole if whole > 0 else (0.0 if part == 0 else math.inf)


class _Sums:
    """The metrics' running sums and maxima over chunks of the flattened tensors, in float64; keeps
    the element-wise |ours - ref| for the percentile (in the compared dtype: a percentile needs no more
    precision, and it is the one copy of the whole stage that the metrics hold)."""

    def __init__(self, numel: int, dtype: torch.dtype) -> None:
        self.diff = torch.empty(numel, dtype=dtype)
        self.filled = 0
        self.max_abs = self.sum_abs = self.scale = self.tolerance_used = 0.0
        self.dot = self.ours_energy = self.reference_energy = self.error_energy = 0.0
        self.passed = True

    def add(self, ours: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float) -> None:
        a, b = ours.to(torch.float64), ref.to(torch.float64)  # (n,)
        diff = (a - b).abs_()
        self.diff[self.filled : self.filled + a.numel()] = diff
        self.filled += a.numel()
        self.max_abs = max(self.max_abs, diff.max().item())
        self.sum_abs += diff.sum().item()
        self.scale = max(self.scale, b.abs().max().item())
        self.dot += torch.dot(a, b).item()
        self.ours_energy += torch.dot(a, a).item()
        self.reference_energy += torch.dot(b, b).item()
        self.error_energy += torch.dot(diff, diff).item()
        allowed = b.abs().mul_(rtol).add_(atol)  # atol + rtol * |ref|
        self.passed = self.passed and bool((diff <= allowed).all())
        # Where nothing is allowed (atol = 0 and ref = 0), any difference at all uses an infinite budget.
        nothing_allowed = allowed == 0
        ratio = diff / allowed.masked_fill_(nothing_allowed, 1.0)
        ratio.masked_fill_(nothing_allowed & (diff > 0), math.inf).masked_fill_(
            nothing_allowed & (diff == 0), 0.0
        )
        self.tolerance_used = max(self.tolerance_used, ratio.max().item())

    def percentile(self, share: float) -> float:
        """The smallest |ours - ref| that ``share`` of the elements do not exceed. Partitions the kept
        differences in place (numpy's partition needs no copy, torch's kthvalue makes two)."""
        differences = self.diff.numpy()
        k = max(1, math.ceil(share * differences.size)) - 1
        differences.partition(k)
        return float(differences[k])

    def cosine(self) -> float:
        """Of the two flattened tensors (1.0 = same direction)."""
        norms = math.sqrt(self.ours_energy) * math.sqrt(self.reference_energy)
        if norms > 0:
            return self.dot / norms
        return 1.0 if self.ours_energy == self.reference_energy else 0.0  # both zero: same; one: unrelated


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
    # A few positions at a time: the float64 distributions of all of them at once would cost several
    # times the logits' bytes (V can be ~150k).
    vocab = ours.shape[-1]
    at = real.flatten().nonzero().squeeze(1)  # (real positions,): indices into the B x T positions
    rows = max(1, _CHUNK // vocab)
    kl = torch.cat(
        [torch.zeros(0, dtype=torch.float64)]
        + [
            _kl_divergence(ours.reshape(-1, vocab)[chunk], reference.reshape(-1, vocab)[chunk])
            for chunk in at.split(rows)
        ]
    ).clamp(min=0.0)  # (real positions,); tiny negatives are rounding
    positions = int(real.sum())
    return NextTokenMetrics(
        agreement=float((top1_ours == top1_reference)[real].double().mean()) if positions else 1.0,
        kl_divergence_mean=float(kl.mean()) if positions else 0.0,
        kl_divergence_max=float(kl.max()) if positions else 0.0,
        positions=positions,
        top1_ours=top1_ours.tolist(),
        top1_reference=top1_reference.tolist(),
    )


def _kl_divergence(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference || ours) of each row's next-token distribution, in float64: (n, V) -> (n,)."""
    log_p_ours = torch.log_softmax(ours, dim=-1, dtype=torch.float64)
    log_p_reference = torch.log_softmax(reference, dim=-1, dtype=torch.float64)
    return (log_p_reference.exp() * (log_p_reference - log_p_ours)).sum(dim=-1)
