"""Run our model and the reference on the same input and compare them stage by stage.

Order of work, chosen so that only one model is in memory at a time:

1. read config.json and load *our* model (malformed checkpoints fail here, with a named tensor);
2. build the input: the checkpoint's tokenizer on ``texts`` (a padded batch), or random ids with a
   random padding pattern;
3. run ours, keep its stages, free it;
4. load the reference (transformers, pinned), run it with hooks, keep its stages, free it;
5. compare every stage in forward order (see compare.metrics for the metrics and the pass rule).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from hfmirror.errors import CompareError

from .architectures import load_model
from .metrics import StageResult, compare_tensors
from .report import ComparisonReport

__all__ = ["DEFAULT_TOLERANCES", "DTYPES", "compare_model_dir", "random_inputs"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# (atol, rtol) per dtype. Measured on random BERTs with O(1) activations (see the tests): float32
# rounding reaches ~1e-6 at a 12-layer, 768-wide model, float64 ~1e-14; the smallest deliberate bug in
# the tests (exact vs tanh GELU) moves a stage by ~1e-4. Both defaults sit between, with margin.
DEFAULT_TOLERANCES = {"float32": (1e-5, 1e-5), "float64": (1e-10, 1e-10)}


def random_inputs(
    *, batch: int, seq_len: int, seed: int, vocab_size: int, type_vocab_size: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Random token ids with a random padding pattern, reproducible from ``seed``.

    Row 0 is full length; every other row keeps a random number (1..seq_len) of real tokens and is
    padded with ``pad_token_id`` after them, so the attention mask is exercised. Each row is split at a
    random point into segment 0 and segment 1 (when the model has two token types).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)  # (B, T)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)  # (B,)
    lengths[0] = seq_len
    positions = torch.arange(seq_len)[None, :]  # (1, T)
    attention_mask = (positions < lengths[:, None]).long()  # (B, T): 1 real, 0 padding
    input_ids = torch.where(attention_mask.bool(), input_ids, pad_token_id)
    token_type_ids = torch.zeros_like(input_ids)
    if type_vocab_size > 1:
        splits = (torch.rand(batch, generator=generator) * lengths).long()  # (B,), in [0, length)
        token_type_ids = ((positions >= splits[:, None]) & attention_mask.bool()).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def _our_stages(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stages: dict[str, torch.Tensor] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        stages[name] = tensor.detach()  # fresh tensors, never modified in place afterwards

    with torch.no_grad():
        model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], record=record)
    return stages


def compare_stages(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *, atol: float, rtol: float
) -> list[StageResult]:
    """Compare stage by stage, in our forward order; a stage only one side produced fails."""

    def missing(name: str, tensor: torch.Tensor, note: str) -> StageResult:
        return StageResult(name, False, list(tensor.shape), None, None, None, None, None, note)

    results = []
    for name, tensor in ours.items():
        if name in reference:
            results.append(compare_tensors(name, tensor, reference[name], atol=atol, rtol=rtol))
        else:
            results.append(missing(name, tensor, "the reference has no such stage"))
    for name, tensor in reference.items():
        if name not in ours:
            results.append(missing(name, tensor, "our model did not produce this stage"))
    return results


def compare_model_dir(
    model_dir: str | Path,
    *,
    texts: list[str] | None = None,
    seq_len: int = 16,
    batch: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    atol: float | None = None,
    rtol: float | None = None,
    model_name: str | None = None,
) -> ComparisonReport:
    """Compare our from-scratch model with transformers on the checkpoint in ``model_dir``.

    Args:
        model_dir: a folder with config.json and weights (and a tokenizer, if ``texts`` are given).
        texts: sentences to tokenise as one padded batch; if None or empty, random token ids are used.
        seq_len, batch, seed: shape and seed of the random input (ignored when ``texts`` are given).
        dtype: "float32" or "float64", used by both models.
        atol, rtol: tolerances (default: ``DEFAULT_TOLERANCES[dtype]``).
        model_name: how to name the model in the report (default: ``model_dir``).

    Returns:
        A :class:`ComparisonReport`; ``report.passed`` is False when any stage differs.

    Raises:
        CompareError: bad arguments, no tokenizer for ``texts``, or no usable reference.
        UnsupportedModelError: a model_type we do not implement.
        WeightLoadError: a missing, unexpected or wrongly shaped tensor.
    """
    if dtype not in DTYPES:
        raise CompareError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if seq_len < 1 or batch < 1:
        raise CompareError(f"seq_len and batch must be at least 1 (got seq_len={seq_len}, batch={batch})")
    default_atol, default_rtol = DEFAULT_TOLERANCES[dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    if atol < 0 or rtol < 0:
        raise CompareError("atol and rtol must not be negative")
    torch_dtype = DTYPES[dtype]

    from . import reference  # imports transformers lazily, only when a comparison actually runs

    # 1. Ours first: a malformed checkpoint fails here with the tensor named.
    loaded = load_model(model_dir, dtype=torch_dtype)
    config = loaded.config

    # 2. The input.
    description: dict[str, Any]
    if texts:
        inputs = reference.tokenize(model_dir, texts, max_length=config.max_position_embeddings)
        description = {"source": "text", "texts": list(texts)}
    else:
        if seq_len > config.max_position_embeddings:
            raise CompareError(
                f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        inputs = random_inputs(
            batch=batch,
            seq_len=seq_len,
            seed=seed,
            vocab_size=config.vocab_size,
            type_vocab_size=config.type_vocab_size,
            pad_token_id=config.pad_token_id,
        )
        description = {"source": "random token ids", "seed": seed}
    mask = inputs["attention_mask"]
    description |= {
        "batch": mask.shape[0],
        "seq_len": mask.shape[1],
        "padded_positions": int((mask == 0).sum()),
        "compared_positions": "all (padded keys are masked; padded rows are compared too)",
    }

    # 3. Run ours, then let it go before the reference is loaded.
    ours = _our_stages(loaded.model, inputs)
    model_type = loaded.architecture.model_type
    options = loaded.options
    del loaded
    gc.collect()

    # 4. The reference.
    ref_model = reference.load_reference(model_dir, model_type=model_type, dtype=torch_dtype, options=options)
    theirs = reference.reference_stages(ref_model, model_type, inputs)
    del ref_model
    gc.collect()

    # 5. Compare.
    stages = compare_stages(ours, theirs, atol=atol, rtol=rtol)
    return ComparisonReport.from_stages(
        stages,
        model=model_name or str(model_dir),
        dtype=dtype,
        atol=atol,
        rtol=rtol,
        versions=reference.versions(),
        inputs=description,
    )
