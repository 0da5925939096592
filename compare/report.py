"""The result of a comparison: a dataclass, its JSON form, and a readable table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import NextTokenMetrics, StageResult

__all__ = [
    "AttentionWeights",
    "ComparisonReport",
    "carried_must_pass",
    "float64_hint",
    "stage_passes",
    "stage_result",
    "verdict_line",
]

# Input fields too long for the table's one-line summary (they are in the JSON).
_LONG_INPUT_FIELDS = (
    "texts",
    "input_ids",
    "attention_mask",
    "tokens",
    "token_labels",
    "token_labels_from",
    "compared_positions",
)


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _cosine_gap(value: float | None) -> str:
    # 1 - cosine: near-1 cosines all print as 1.0000, their distance from 1 is what tells them apart.
    return "-" if value is None else f"{max(1.0 - value, 0.0):.2e}"


# ----------------------------------------------------------------------------------------- verdict
# The verdict is read from the report's JSON form (ComparisonReport.to_dict()), so that the text table
# and the HTML page (which is rendered from that form) say exactly the same thing.


def carried_must_pass(dtype: str) -> bool:
    """Whether a stage's carried error decides the verdict too, not only its isolated one.

    In float64, honest rounding carried through the whole model stays far below the tolerance
    (~1e-14 against 1e-10), so a carried failure there is a bug. In float32, rounding carried through
    a deep model may honestly exceed the tolerance, so only each stage's own (isolated) error decides.
    """
    return dtype == "float64"


def stage_passes(stage: Mapping[str, Any], dtype: str) -> bool:
    """Whether one stage (its JSON form) passes the verdict: its isolated measurement if it has one,
    else its carried one; in float64 (see :func:`carried_must_pass`) the carried one as well."""
    carried = bool(stage.get("passed"))
    isolated = stage.get("isolated")
    own = bool(isolated.get("passed")) if isinstance(isolated, Mapping) else carried
    return own and (carried or not carried_must_pass(dtype))


def stage_result(stage: Mapping[str, Any], dtype: str) -> str:
    """A stage's result as the table and the page show it: PASS or FAIL by the verdict's measure,
    then, when the carried measurement disagrees with the isolated one, what each says."""
    text = _pass_or_fail(stage_passes(stage, dtype))
    isolated = stage.get("isolated")
    if isinstance(isolated, Mapping) and bool(stage.get("passed")) != bool(isolated.get("passed")):
        carried = f"carried {_pass_or_fail(stage.get('passed'))}"
        text += (
            f" ({carried}, isolated {_pass_or_fail(isolated.get('passed'))})"
            if carried_must_pass(dtype)
            else f" ({carried})"
        )
    notes = [stage.get("note"), isolated.get("note") if isinstance(isolated, Mapping) else None]
    return text + "".join(f" ({note})" for note in dict.fromkeys(note for note in notes if note))


def verdict_line(report: Mapping[str, Any]) -> str:
    """The verdict in one line: PASS with the largest carried difference, or FAIL naming the first
    failing stage, with how many stages fail by the verdict's measure and how many carried."""
    stages = list(report.get("stages") or [])
    if not stages:
        return "FAIL: no stages were compared"
    dtype = report["dtype"]
    tolerance = f"atol={report['atol']:g}, rtol={report['rtol']:g}"
    how = "in isolation and carried" if carried_must_pass(dtype) else "in isolation"
    carried = sum(1 for stage in stages if not stage.get("passed"))
    if report.get("passed"):
        inherited = f", {carried} outside it carried" if carried else ""
        return (
            f"PASS: all {len(stages)} stages match the reference within {tolerance} {how} "
            f"(carried max abs diff {_sci(report.get('max_abs_diff'))}{inherited})"
        )
    failing = sum(1 for stage in stages if not stage_passes(stage, dtype))
    counts = f"{failing} of {len(stages)} stages outside {tolerance} {how}, {carried} carried"
    return f"FAIL: first failing stage: {report.get('first_failing_stage')} ({counts})"


def float64_hint(report: Mapping[str, Any]) -> str | None:
    """In float32, when what a user sees differs (the carried logits are outside the tolerance, or
    the two models' top-1 tokens disagree somewhere): a hint to rerun in float64, where rounding
    cannot explain it. None otherwise."""
    if report["dtype"] != "float32":
        return None
    logits = next((stage for stage in report.get("stages") or [] if stage["name"] == "logits"), None)
    agreement = (report.get("next_token") or {}).get("agreement")
    what = []
    if logits is not None and not logits.get("passed"):
        what.append("the carried logits are outside the tolerance")
    if agreement is not None and agreement < 1:
        what.append(f"the top-1 token agrees at {agreement:.1%} of positions")
    if not what:
        return None
    return (
        f"hint: {' and '.join(what)}; float32 rounding carried through the model can do that. "
        "Rerun with --dtype float64: there the carried error must stay within tolerance too."
    )


def _pass_or_fail(passed: Any) -> str:
    return "PASS" if passed else "FAIL"


@dataclass
class AttentionWeights:
    """The attention weights of the first input row, ours and the reference's, for every compared
    layer: "layer.i" -> (nh, n, n), the first n of the row's real tokens as queries and as keys.

    Row q of head h is the query at position q's weighted look at the keys (it sums to 1 over all
    the keys). ``tokens`` are all the row's real tokens as a person reads them (padding left out);
    n is ``len(tokens)`` or fewer, when the page's size budget capped it (``cells``: the budget,
    the most (query, key) cells drawn per picture kind over all layers and heads).
    ``causal``: a decoder's, where no query looks at a later key.
    """

    ours: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    causal: bool
    tokens: list[str]
    text: str | None = None  # the row's text, when the input was text
    cells: int | None = None

    @property
    def drawn(self) -> int:
        """n, the number of tokens kept (as queries and as keys)."""
        return next(iter(self.ours.values())).shape[-1] if self.ours else 0

    def maps(self) -> Any:
        """The maps as the HTML report takes them (compare.html_attention.AttentionMaps)."""
        from .html_attention import AttentionMaps

        layers = sorted(self.ours, key=lambda name: int(name.split(".")[1]))
        notes = []
        if self.drawn < len(self.tokens):
            heads = next(iter(self.ours.values())).shape[0]
            note = (
                f"The first input has {len(self.tokens)} tokens; the maps show the first {self.drawn}, as "
                f"queries and as keys, so that {len(layers)} layers x {heads} heads keep the page small "
                f"(at most {self.cells:,} cells per kind of picture)."
            )
            if not self.causal:  # a decoder's first n queries see only the first n keys: nothing cut
                note += " A row's drawn weights add up to less than 1: the later keys are not drawn."
            notes.append(note)
        return AttentionMaps(
            tokens=self.tokens[: self.drawn],
            ours=[self.ours[name].double().numpy() for name in layers],  # (nh, n, n) each
            reference=[self.reference[name].double().numpy() for name in layers],
            causal=self.causal,
            text=self.text,
            notes=tuple(notes),
            first_layer=int(layers[0].split(".")[1]) if layers else 0,
        )


@dataclass
class ComparisonReport:
    """Our implementation vs the reference, stage by stage.

    Each stage is measured carried and isolated (see compare.metrics). ``passed`` is True when every
    stage passes :func:`stage_passes`: within tolerance in isolation (carried for a stage only one
    side produced; in float64 carried too); ``first_failing_stage`` names the earliest stage (in
    forward order) that does not: where to start looking for the bug.
    ``max_abs_diff`` is the largest carried difference: what a user of our model would see.
    """

    model: str
    passed: bool
    max_abs_diff: float | None  # over every stage; None if no stage could be measured
    first_failing_stage: str | None
    stages: list[StageResult]
    dtype: str
    atol: float
    rtol: float
    versions: dict[str, str]
    reference: str  # what the numbers were compared against (Architecture.describe_reference)
    inputs: dict[str, Any] = field(default_factory=dict)  # what was fed in (source, shape, padding)
    next_token: NextTokenMetrics | None = None  # models with an LM head only
    attention: AttentionWeights | None = None  # only when asked for (not part of the JSON)
    timing: dict[str, Any] | None = None  # total seconds, and seconds and parameters per piece
    layers: str | None = None  # the range of layers compared ("3-7"), when not all of them
    repo_id: str | None = None  # where the checkpoint came from, when it is a snapshot of a cache
    commit: str | None = None
    # Where our code computes each stage ("{i}": every layer), from the architecture (not in the JSON).
    stage_functions: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    @classmethod
    def from_stages(cls, stages: list[StageResult], **fields: Any) -> ComparisonReport:
        """Build a report, deriving the verdict fields from the stage results."""
        dtype = fields["dtype"]
        failing = [stage.name for stage in stages if not stage_passes(stage.to_dict(), dtype)]
        measured = [stage.max_abs_diff for stage in stages if stage.max_abs_diff is not None]
        return cls(
            passed=bool(stages) and not failing,
            max_abs_diff=max(measured) if measured else None,
            first_failing_stage=failing[0] if failing else None,
            stages=stages,
            **fields,
        )

    @property
    def failing_stages(self) -> list[str]:
        """Stages that fail the verdict (:func:`stage_passes`)."""
        return [stage.name for stage in self.stages if not stage_passes(stage.to_dict(), self.dtype)]

    @property
    def carried_failing_stages(self) -> list[str]:
        return [stage.name for stage in self.stages if not stage.passed]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (no NaN or infinity: unmeasurable values are None)."""
        return {
            "model": self.model,
            **({"repo_id": self.repo_id} if self.repo_id is not None else {}),
            **({"commit": self.commit} if self.commit is not None else {}),
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "first_failing_stage": self.first_failing_stage,
            "dtype": self.dtype,
            "atol": self.atol,
            "rtol": self.rtol,
            "versions": dict(self.versions),
            "inputs": dict(self.inputs),
            "reference": self.reference,
            "stages": [stage.to_dict() for stage in self.stages],
            **self._next_token_fields(),
            **({"timing": self.timing} if self.timing is not None else {}),
            **({"layers": self.layers} if self.layers is not None else {}),
        }

    def _next_token_fields(self) -> dict[str, Any]:
        if self.next_token is None:
            return {}
        return {
            "next_token": self.next_token.to_dict(),
            "top1": {"ours": self.next_token.top1_ours, "reference": self.next_token.top1_reference},
        }

    def verdict(self) -> str:
        """One line: PASS, or FAIL naming the first failing stage (:func:`verdict_line`)."""
        return verdict_line(self.to_dict())

    def hint(self) -> str | None:
        """A float32 run's hint to rerun in float64 (:func:`float64_hint`), or None."""
        return float64_hint(self.to_dict())

    def render_table(self) -> str:
        """An aligned text table, one row per stage, with a final verdict line."""
        headers = [
            "stage",
            "max abs diff",
            "mean abs diff",
            "rel error",
            "1 - cosine",
            "nmse",
            "p99 abs diff",
        ]
        headers += ["budget used", "isolated max", "isolated budget", "result"]

        rows = []
        for stage in self.stages:
            row = [
                stage.name,
                _sci(stage.max_abs_diff),
                _sci(stage.mean_abs_diff),
                _sci(stage.rel_error),
                _cosine_gap(stage.cosine_similarity),
                _sci(stage.nmse),
                _sci(stage.p99_abs_diff),
                _sci(stage.tolerance_used),
            ]
            alone = stage.isolated  # None for a stage only one side produced
            row += [_sci(alone.max_abs_diff), _sci(alone.tolerance_used)] if alone else ["-", "-"]
            rows.append([*row, stage_result(stage.to_dict(), self.dtype)])
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers) - 1)]

        def line(cells: list[str]) -> str:
            # Name left-aligned, numbers right-aligned, result last (free width).
            parts = [cells[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(cells[1:-1], widths[1:], strict=True)
            ]
            return "  ".join([*parts, cells[-1]]).rstrip()

        inputs = ", ".join(
            f"{key}={value}" for key, value in self.inputs.items() if key not in _LONG_INPUT_FIELDS
        )
        versions = ", ".join(f"{key} {value}" for key, value in self.versions.items())
        origin = f" (repo {self.repo_id} at commit {self.commit})" if self.repo_id and self.commit else ""
        out = [
            f"model:     {self.model}{origin}",
            f"reference: {self.reference} ({versions})",
            f"dtype:     {self.dtype}  atol={self.atol:g}  rtol={self.rtol:g}  "
            "(a stage passes when |ours - ref| <= atol + rtol * |ref| everywhere;",
            "           'budget used' is the largest |ours - ref| / (atol + rtol * |ref|): 1 is the limit)",
            f"input:     {inputs}",
        ]
        decides = "both" if carried_must_pass(self.dtype) else "the isolated error (float32)"
        out.append(
            "measured:  carried (our model on its own numbers from the embeddings on) and isolated "
            f"(each component fed the reference's input); the result follows {decides}"
        )
        if self.layers is not None:
            out.append(f"layers:    {self.layers} only (the reference's output feeds the first of them)")
        if "compared_positions" in self.inputs:
            out.append(f"compared:  {self.inputs['compared_positions']}")
        out += [
            "",
            line(headers),
            line(["-" * w for w in widths] + ["-" * len(headers[-1])]),
            *(line(row) for row in rows),
            "",
        ]
        if self.next_token is not None:
            metrics = self.next_token
            out.append(
                f"next token: the top-1 token agrees at {metrics.agreement:.1%} of {metrics.positions} real "
                f"positions; KL(reference || ours) mean {_sci(metrics.kl_divergence_mean)}, "
                f"max {_sci(metrics.kl_divergence_max)} nats"
            )
        data = self.to_dict()
        hint = float64_hint(data)
        if hint is not None:
            out.append(hint)
        out.append(verdict_line(data))  # last: the line to read
        return "\n".join(out)
