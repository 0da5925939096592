"""The reference side: transformers, pinned so the comparison is honest. The only module that imports it.

Pinned means: ``dtype`` given explicitly (transformers 5 defaults to "auto", i.e. whatever the
checkpoint was saved in), ``attn_implementation="eager"`` (the default SDPA kernel differs from the
textbook formula by rounding, about 5e-4 in float32), ``eval()`` and ``torch.no_grad()``. Remote code
is never run (``trust_remote_code`` stays False).

Intermediate stages are captured with forward hooks on the transformers modules that each
architecture's ReferenceLayout names (compare.bert, compare.gpt2, compare.llama, compare.qwen); each
stage name means the same tensor as in our model's ``record`` calls.

:func:`load_reference` and :func:`reference_stages` run the whole model at once, as ``from_pretrained``
loads it: the comparison itself runs it one piece at a time (compare.reference_stream), and the tests
check that both give the same stages.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hfmirror.errors import CompareError, RemoteCodeError

from .fetch import TOKENIZER_FILES, is_tokenizer_file
from .reference_layout import ReferenceLayout, StagePoint
from .weights import checkpoint_files, iter_checkpoint_tensors

if TYPE_CHECKING:
    from .architectures import Architecture

__all__ = [
    "LABELS_DECODED",
    "LABELS_FROM_OFFSETS",
    "ReferenceRun",
    "Tokenized",
    "attention_hook",
    "has_tokenizer",
    "load_reference",
    "load_tokenizer",
    "reference_stages",
    "stage_hooks",
    "token_labels",
    "tokenize",
    "versions",
]


def versions() -> dict[str, str]:
    """The versions that produced the reference numbers."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars; we check what was loaded ourselves."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------- loading


def load_reference(
    model_dir: str | Path,
    *,
    architecture: Architecture,
    config: Any,
    dtype: torch.dtype,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """The transformers model for the checkpoint in ``model_dir``, pinned to ``dtype`` and eager
    attention, in eval mode: ``from_pretrained`` of the layout's auto class, or, for a checkpoint
    transformers cannot read as it is, of the architecture's documented conversion.

    Raises:
        CompareError: transformers could not load the checkpoint, or left weights randomly
            initialised (a reference that is not the checkpoint would make the comparison meaningless).
    """
    import transformers

    pinned = {"dtype": dtype, "attn_implementation": "eager", "output_loading_info": True}
    try:
        with _quiet_transformers():
            if architecture.conversion is None:
                auto_class = getattr(transformers, architecture.reference.model_class)
                model, info = auto_class.from_pretrained(
                    str(model_dir), **pinned, **architecture.reference_kwargs(options or {})
                )
            else:  # transformers' own loading, of the converted config and tensors
                conversion = architecture.conversion
                model_class = getattr(transformers, conversion.model_class)
                reference_config = transformers.AutoConfig.for_model(**conversion.config(config))
                state = dict(conversion.tensors(iter_checkpoint_tensors(checkpoint_files(model_dir))))
                model, info = model_class.from_pretrained(
                    None, config=reference_config, state_dict=state, **pinned
                )
    except CompareError:
        raise
    except Exception as error:  # transformers raises many kinds; all mean "no reference"
        raise CompareError(
            f"transformers could not load {model_dir}: {type(error).__name__}: {error}"
        ) from error
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise CompareError(f"transformers did not load every weight of the reference model: {problems}")
    return model.eval()


# ---------------------------------------------------------------------------------------- tokenizer


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the folder carries tokenizer files (compare.fetch.TOKENIZER_FILES)."""
    folder = Path(model_dir)
    return folder.is_dir() and any(
        is_tokenizer_file(path.name) for path in folder.iterdir() if path.is_file()
    )


def load_tokenizer(source: str | Path) -> Any:
    """The tokenizer in folder ``source``, loaded without running any code from it.

    Raises:
        CompareError: the folder has no tokenizer, or it cannot be loaded.
        RemoteCodeError: the tokenizer is the repository's own code (Qwen v1's is).
    """
    if not has_tokenizer(source):
        raise CompareError(
            f"--text was given but {source} has no tokenizer files ({', '.join(sorted(TOKENIZER_FILES))}); "
            "run without texts to compare on random token ids"
        )
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except Exception as error:
        if "trust_remote_code" in str(error) or "custom code" in str(error):
            raise RemoteCodeError(f"the tokenizer of {source} is custom code, which is never run") from error
        raise CompareError(
            f"cannot load the tokenizer of {source}: {type(error).__name__}: {error}"
        ) from error


@dataclass
class Tokenized:
    """Texts as the models' input, and each token as a person reads it."""

    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, token_type_ids: each (B, T)
    labels: list[list[str]]  # (B, T) like the ids: see token_labels
    labels_from: str  # how the labels were made, said in the report


LABELS_FROM_OFFSETS = "the text at the fast tokenizer's offsets; special tokens by name"
LABELS_DECODED = "each token id decoded alone; special tokens by name"


def tokenize(tokenizer: Any, texts: list[str], *, max_length: int, vocab_size: int) -> Tokenized:
    """Tokenise ``texts`` as one batch, padded on the right.

    Right padding keeps every real token at the position it has without padding (decoders number
    positions 0 .. T-1 along the row). Decoder tokenizers often have no padding token; the
    end-of-text token stands in (padded positions are masked out of attention).

    Raises:
        CompareError: several texts and no token to pad with, or ids outside the model's vocabulary.
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and len(texts) > 1:
            raise CompareError("the tokenizer has no padding (or end-of-text) token; pass a single --text")
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_offsets_mapping=tokenizer.is_fast,  # slow tokenizers have no offsets
        return_special_tokens_mask=True,
    )
    input_ids = encoded["input_ids"]
    if int(input_ids.max()) >= vocab_size:
        raise CompareError(
            f"the tokenizer produced token id {int(input_ids.max())}, outside the model's vocabulary "
            f"({vocab_size}): is it the checkpoint's tokenizer?"
        )
    tensors = {
        "input_ids": input_ids,
        "attention_mask": encoded.get("attention_mask", torch.ones_like(input_ids)),
        "token_type_ids": encoded.get("token_type_ids", torch.zeros_like(input_ids)),
    }
    if "offset_mapping" not in encoded:
        return Tokenized(tensors, token_labels(tokenizer, input_ids.tolist()), LABELS_DECODED)
    offsets, special = encoded["offset_mapping"].tolist(), encoded["special_tokens_mask"].tolist()
    rows = zip(texts, input_ids.tolist(), offsets, special, strict=True)
    labels = [_labels_at_offsets(tokenizer, *row) for row in rows]
    return Tokenized(tensors, labels, LABELS_FROM_OFFSETS)


# A label of whitespace only would be invisible: its characters are drawn as these symbols.
_VISIBLE_WHITESPACE = str.maketrans({" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"})


def _shown(label: str | None, token_id: int) -> str:
    if not label:
        return str(token_id)
    return label.translate(_VISIBLE_WHITESPACE) if not label.strip() else label


def _labels_at_offsets(
    tokenizer: Any, text: str, ids: list[int], offsets: list[list[int]], special: list[int]
) -> list[str]:
    """Each token's own span of ``text``: what a person reads, whatever the tokenizer's pieces look
    like (``Ġworld`` in byte-level BPE, ``##s`` in WordPiece, lowercased BERT pieces). A byte-level
    token holding part of a character (Chinese characters are three UTF-8 bytes) shows the whole
    character, so two neighbours may show the same one. Special tokens (and padding) have no span:
    they are shown by name; a token with an empty span (a lone space, trimmed) is decoded."""
    labels = []
    for token_id, (start, end), is_special in zip(ids, offsets, special, strict=True):
        if is_special:
            label = tokenizer.convert_ids_to_tokens(token_id)
        elif end > start:
            label = text[start:end]
        else:
            label = tokenizer.decode([token_id])
        labels.append(_shown(label, token_id))
    return labels


def token_labels(tokenizer: Any | None, ids: list[list[int]]) -> list[list[str]]:
    """Each token id as a person reads it, without a text to point into (random ids): decoded alone
    (special tokens by name), or the id itself where there is no tokenizer or the id is not in it."""
    if tokenizer is None:
        return [[str(token_id) for token_id in row] for row in ids]
    specials, known = set(tokenizer.all_special_ids), len(tokenizer)
    return [
        [
            str(token_id)
            if token_id >= known
            else _shown(
                tokenizer.convert_ids_to_tokens(token_id)
                if token_id in specials
                else tokenizer.decode([token_id]),
                token_id,
            )
            for token_id in row
        ]
        for row in ids
    ]


# ----------------------------------------------------------------------------------------- running


@dataclass
class ReferenceRun:
    """What one reference forward pass produced: every stage's tensor (forward order), and each
    layer's attention weights (B, nh, T, T) when asked for."""

    stages: dict[str, torch.Tensor]
    attention: dict[str, torch.Tensor]


def _first_tensor(output: Any) -> torch.Tensor:
    # Attention modules return (output, weights) and some modules a ModelOutput; the stage is the first.
    return output if isinstance(output, torch.Tensor) else output[0]


def _submodule(root: nn.Module, point: StagePoint) -> nn.Module | None:
    try:
        module = root.get_submodule(point.path) if point.path else root
    except AttributeError:
        module = None
    if module is None and not point.optional:
        raise CompareError(f"the reference model has no module {point.path!r} for stage {point.stage!r}")
    return module


@contextlib.contextmanager
def stage_hooks(
    root: nn.Module, points: tuple[StagePoint, ...], prefix: str, stages: dict[str, torch.Tensor]
) -> Iterator[None]:
    """While the block runs, every stage of ``points`` (paths relative to ``root``) that ``root``
    computes is copied into ``stages`` as ``prefix + stage`` (in the order they are computed): the
    submodule's output, or its first input (``take="input"``)."""
    handles = []
    for point in points:
        module = _submodule(root, point)
        if module is None:
            continue  # an optional module (BERT's pooler) this model does not have

        def keep(tensor: torch.Tensor, name: str = prefix + point.stage) -> None:
            stages[name] = tensor.detach().clone()

        if point.take == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, keep=keep: keep(args[0])))
        else:
            handles.append(
                module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(_first_tensor(out)))
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def attention_hook(
    layer: nn.Module, layout: ReferenceLayout, name: str, attention: dict[str, torch.Tensor]
) -> Iterator[None]:
    """While the block runs, the attention weights (B, nh, T, T) of ``layer`` are copied into
    ``attention[name]`` (the attention module returns (output, weights))."""

    def keep(_m: nn.Module, _a: Any, output: Any) -> None:
        attention[name] = output[1].detach().clone()

    handle = layer.get_submodule(layout.attention).register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def reference_stages(
    model: nn.Module,
    layout: ReferenceLayout,
    inputs: dict[str, torch.Tensor],
    *,
    keep_attention: bool = False,
) -> ReferenceRun:
    """Run the reference once and return every stage's tensor (and, if asked, its attention weights)."""
    run = ReferenceRun(stages={}, attention={})
    with contextlib.ExitStack() as hooks:
        hooks.enter_context(stage_hooks(model, layout.embeddings, "", run.stages))
        for i, layer in enumerate(model.get_submodule(layout.layers)):
            hooks.enter_context(stage_hooks(layer, layout.layer, f"layer.{i}.", run.stages))
            if keep_attention:
                hooks.enter_context(attention_hook(layer, layout, f"layer.{i}", run.attention))
        hooks.enter_context(stage_hooks(model, layout.final, "", run.stages))
        with torch.no_grad():
            model(**inputs)
    return run
