"""Run our model and the reference on the same input and compare them stage by stage.

Order of work:

1. read config.json, build *our* model on "meta" and check the checkpoint against its weight map
   from the files' headers (malformed checkpoints fail here, with a named tensor, before any data is
   read);
2. build the input: the checkpoint's tokenizer (or ``tokenizer``) on ``texts`` (a padded batch), or
   random ids with a random padding pattern;
3. build the reference (transformers, pinned) on "meta" from its config;
4. compare piece by piece, carried and isolated (compare.streaming): one code path for every size,
   with only one piece's weights in memory at a time;
5. for models with an LM head, compare the next-token predictions (carried logits: what a user of
   our model would get).

With ``keep_attention`` (the HTML report) the attention weights of the first input row are kept too,
cut to the tokens the page draws, so an ordinary run neither keeps nor costs anything for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hfmirror.errors import CompareError, RemoteCodeError
from hfmirror.layout import snapshot_origin

from .architectures import Architecture, prepare_model
from .metrics import next_token_metrics
from .report import AttentionWeights, ComparisonReport
from .streaming import AttentionCut, compare_pieces
from .weights import TensorCache

__all__ = [
    "DEFAULT_TOLERANCES",
    "DTYPES",
    "compare_model_dir",
    "parse_layers",
    "random_inputs",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# (atol, rtol) per dtype. Measured on random models with O(1) activations (see the tests): float32
# rounding reaches ~1e-6 at a 12-layer, 768-wide model, float64 ~1e-14; the smallest deliberate bug in
# the tests (exact vs tanh GELU) moves a stage by ~1e-4. Both defaults sit between, with margin.
DEFAULT_TOLERANCES = {"float32": (1e-5, 1e-5), "float64": (1e-10, 1e-10)}

_ENCODER_POSITIONS = "all (padded keys are masked; padded rows are compared too)"
_DECODER_POSITIONS = (
    "hidden states and logits at every position, padded ones included (a padded position sees only "
    "the real tokens before it, the same way in both); next-token agreement and KL at real positions only"
)


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


@dataclass
class _Input:
    """The batch both models get, and how the report describes it."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, token_type_ids: (B, T)
    description: dict[str, Any]
    note: str | None = None  # said to the user (e.g. why texts were not used)
    labels: list[list[str]] | None = None  # each token as a person reads it, (B, T)


def _tokenized(source: Path, texts: list[str], config: Any) -> tuple[Any, dict[str, Any], str | None]:
    """(compare.reference.Tokenized, description, note); the first None when the tokenizer is custom
    code."""
    from . import reference

    try:
        loaded_tokenizer = reference.load_tokenizer(source)
    except RemoteCodeError as error:
        note = f"{error}: comparing on random token ids instead (pass --tokenizer DIR_OR_REPO to use another)"
        return None, {"texts_not_used": list(texts)}, note
    limit, _ = config.sequence_limit()
    tokenized = reference.tokenize(loaded_tokenizer, texts, max_length=limit, vocab_size=config.vocab_size)
    ids = tokenized.tensors["input_ids"].tolist()
    description = {
        "source": "text",
        "texts": list(texts),
        "tokenizer": str(source),
        "tokens": [loaded_tokenizer.convert_ids_to_tokens(row) for row in ids],  # the tokenizer's pieces
        "token_labels": tokenized.labels,  # as the HTML report shows them
        "token_labels_from": tokenized.labels_from,
    }
    return tokenized, description, None


def _random_id_labels(source: Path, ids: list[list[int]]) -> tuple[list[list[str]], str]:
    """Labels for random ids: decoded by the checkpoint's tokenizer where one loads (without remote
    code), else the ids themselves."""
    from . import reference

    if reference.has_tokenizer(source):
        try:
            return reference.token_labels(reference.load_tokenizer(source), ids), reference.LABELS_DECODED
        except (CompareError, RemoteCodeError):
            pass  # no usable tokenizer: the ids will do
    return reference.token_labels(None, ids), "token ids (no tokenizer to decode them)"


def _make_input(
    model_dir: Path,
    architecture: Architecture,
    config: Any,
    *,
    texts: list[str] | None,
    tokenizer: str | Path | None,
    seq_len: int,
    batch: int,
    seed: int,
    labels: bool,
) -> _Input:
    """The batch: ``texts`` tokenised, or random ids. ``labels``: label random ids too (the HTML
    report shows them; text is always labelled, at no cost)."""
    source = Path(tokenizer) if tokenizer is not None else model_dir
    tokenized, description, note = None, {}, None
    if texts:
        tokenized, description, note = _tokenized(source, texts, config)
    if tokenized is not None:
        tensors, token_labels = tokenized.tensors, tokenized.labels
    else:
        limit, why = config.sequence_limit()
        if seq_len > limit:
            raise CompareError(f"seq_len {seq_len} is longer than the model takes: {limit} ({why})")
        tensors = random_inputs(
            batch=batch,
            seq_len=seq_len,
            seed=seed,
            vocab_size=config.vocab_size,
            type_vocab_size=getattr(config, "type_vocab_size", 1),
            pad_token_id=config.pad_token_id,
        )
        description |= {"source": "random token ids", "seed": seed}
        token_labels = None
        if labels:
            token_labels, labels_from = _random_id_labels(source, tensors["input_ids"].tolist())
            description |= {"token_labels": token_labels, "token_labels_from": labels_from}
    mask = tensors["attention_mask"]
    description |= {
        "batch": mask.shape[0],
        "seq_len": mask.shape[1],
        "padded_positions": int((mask == 0).sum()),
        "compared_positions": _DECODER_POSITIONS if architecture.causal else _ENCODER_POSITIONS,
        "input_ids": tensors["input_ids"].tolist(),
        "attention_mask": mask.tolist(),
    }
    if note:
        description["note"] = note
    return _Input(tensors=tensors, description=description, note=note, labels=token_labels)


def parse_layers(text: str, num_layers: int) -> tuple[int, int]:
    """ "A-B" (or "A") -> (A, B), checked against the model's ``num_layers``.

    Raises:
        CompareError: not a range of existing layers.
    """
    first, _, last = text.partition("-")
    try:
        bounds = (int(first), int(last or first))
    except ValueError:
        raise CompareError(f"--layers takes A-B (e.g. 3-7), got {text!r}") from None
    if not 0 <= bounds[0] <= bounds[1] < num_layers:
        raise CompareError(f"--layers {text}: the model has layers 0-{num_layers - 1}")
    return bounds


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
    tokenizer: str | Path | None = None,
    keep_attention: bool = False,
    attention_cells: int | None = None,
    on_note: Any = None,
    layers: str | None = None,
) -> ComparisonReport:
    """Compare our from-scratch model with transformers on the checkpoint in ``model_dir``.

    Args:
        model_dir: a folder with config.json and weights (and a tokenizer, if ``texts`` are given).
        texts: sentences to tokenise as one padded batch; if None or empty, random token ids are used.
        seq_len, batch, seed: shape and seed of the random input (ignored when ``texts`` are used).
        dtype: "float32" or "float64", used by both models.
        atol, rtol: tolerances (default: ``DEFAULT_TOLERANCES[dtype]``).
        model_name: how to name the model in the report (default: ``model_dir``).
        tokenizer: a folder whose tokenizer to use instead of the checkpoint's.
        keep_attention: also keep every compared layer's attention weights, ours and the
            reference's, for the first input row and its real tokens only (``report.attention``,
            what the HTML report draws), and label the tokens of random ids.
        attention_cells: with ``keep_attention``, keep only as many of the row's first tokens as fit
            this many (query, key) cells over all layers and heads (the HTML page's size budget,
            compare.html_attention.MAX_DRAWN_CELLS); None keeps them all.
        on_note: called with a one-line note the user should see (e.g. texts not used), if given.
        layers: "A-B" to compare layers A to B only (the reference's output of layer A - 1 feeds
            layer A, carried and isolated alike).

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
    model_dir = Path(model_dir)
    origin = snapshot_origin(model_dir)  # (repo id, commit) of a snapshot of a cache, else None
    began = time.perf_counter()

    from . import reference  # imports transformers lazily, only when a comparison actually runs
    from .reference_stream import StreamedReference

    # 1. Ours, on "meta": a malformed checkpoint fails here with the tensor named.
    prepared = prepare_model(model_dir, dtype=torch_dtype)
    architecture, config, reader = prepared.architecture, prepared.config, prepared.reader
    bounds = parse_layers(layers, len(prepared.model.layers)) if layers else None

    # 2. The input.
    batch_input = _make_input(
        model_dir,
        architecture,
        config,
        texts=texts,
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch=batch,
        seed=seed,
        labels=keep_attention,
    )
    if batch_input.note and on_note is not None:
        on_note(batch_input.note)
    inputs = batch_input.tensors
    reference_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if architecture.uses_token_types:
        reference_inputs["token_type_ids"] = inputs["token_type_ids"]

    # 3. and 4. The reference, and the comparison, piece by piece.
    streamed = StreamedReference(
        model_dir,
        architecture=architecture,
        config=config,
        dtype=torch_dtype,
        files=reader.files,
        options=prepared.options,
    )
    run = compare_pieces(
        prepared.model,
        streamed,
        TensorCache(reader, torch_dtype),
        plan=prepared.plan,
        weight_map=prepared.weight_map,
        inputs=inputs,
        reference_inputs=reference_inputs,
        atol=atol,
        rtol=rtol,
        layers=bounds,
        attention=_attention_cut(inputs, config, bounds, len(prepared.model.layers), attention_cells)
        if keep_attention
        else None,
    )

    # 5. What the two would predict next.
    next_token = None
    if architecture.has_lm_head and run.logits is not None and run.logits[0].shape == run.logits[1].shape:
        next_token = next_token_metrics(*run.logits, inputs["attention_mask"])
    return ComparisonReport.from_stages(
        run.stages,
        model=model_name or str(model_dir),
        dtype=dtype,
        atol=atol,
        rtol=rtol,
        versions=reference.versions(),
        inputs=batch_input.description,
        reference=architecture.describe_reference() + ", run one piece at a time",
        next_token=next_token,
        attention=(
            _attention_weights(run, batch_input, causal=architecture.causal, cells=attention_cells)
            if keep_attention
            else None
        ),
        timing={
            "total_seconds": time.perf_counter() - began,
            "pieces": [timing.to_dict() for timing in run.timings],
        },
        layers=layers,
        repo_id=origin[0] if origin else None,
        commit=origin[1] if origin else None,
        stage_functions=architecture.stage_functions,
    )


def _attention_cut(
    inputs: dict[str, torch.Tensor],
    config: Any,
    bounds: tuple[int, int] | None,
    num_layers: int,
    cells: int | None,
) -> AttentionCut:
    """The first row's real tokens (right padding: they come first), at most as many as fit ``cells``."""
    real = int(inputs["attention_mask"][0].sum())
    first, last = bounds if bounds is not None else (0, num_layers - 1)
    if cells is None:
        return AttentionCut(row=0, tokens=real)
    from .html_attention import drawn_token_limit  # the page's rule: layers x heads x n^2 <= cells

    most = drawn_token_limit(last - first + 1, config.num_attention_heads, cells)
    return AttentionCut(row=0, tokens=min(real, most))


def _attention_weights(run: Any, batch_input: _Input, *, causal: bool, cells: int | None) -> AttentionWeights:
    """The kept attention weights with the first row's real tokens as a person reads them."""
    real = int(batch_input.tensors["attention_mask"][0].sum())
    ids = batch_input.tensors["input_ids"][0, :real].tolist()
    labels = batch_input.labels[0][:real] if batch_input.labels else [str(token_id) for token_id in ids]
    texts = batch_input.description.get("texts")
    return AttentionWeights(
        ours=run.attention_ours,
        reference=run.attention_reference,
        causal=causal,
        tokens=labels,
        text=texts[0] if texts else None,
        cells=cells,
    )
