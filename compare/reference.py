"""The reference side: transformers, pinned so the comparison is honest. The only module that imports it.

Pinned means: ``dtype`` given explicitly (transformers 5 defaults to "auto", i.e. whatever the
checkpoint was saved in), ``attn_implementation="eager"`` (the default SDPA kernel differs from the
textbook formula by rounding, about 5e-4 in float32), ``eval()`` and ``torch.no_grad()``.
Intermediate stages are captured with forward hooks on the transformers modules; each stage name
means the same tensor as in our model's ``record`` calls (see compare.bert).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hfmirror.errors import CompareError

__all__ = ["REFERENCE_HOOKS", "has_tokenizer", "load_reference", "reference_stages", "tokenize", "versions"]

# Files any one of which means the folder carries a tokenizer AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


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


# ------------------------------------------------------------------------------------------ hooks


def _bert_hook_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Our stage names -> the transformers BertModel module whose forward output is that stage."""
    points: list[tuple[str, nn.Module]] = [("embeddings", model.embeddings)]
    for i, layer in enumerate(model.encoder.layer):
        points += [
            (
                f"layer.{i}.attention",
                layer.attention.output.dense,
            ),  # BertSelfOutput.dense: before the residual
            (f"layer.{i}.attention_add_norm", layer.attention.output),  # BertSelfOutput: LayerNorm(x + .)
            (f"layer.{i}.feed_forward", layer.output.dense),  # BertOutput.dense(act(intermediate(x)))
            (f"layer.{i}.output", layer),  # BertLayer
        ]
    return points


def _bert_load_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    return {"add_pooling_layer": options.get("with_pooler", True)}


# model_type -> (where to hook, extra from_pretrained arguments derived from our options).
REFERENCE_HOOKS: dict[
    str, tuple[Callable[[nn.Module], list[tuple[str, nn.Module]]], Callable[[dict[str, Any]], dict[str, Any]]]
] = {
    "bert": (_bert_hook_points, _bert_load_kwargs),
}


# ----------------------------------------------------------------------------------------- loading


def load_reference(
    model_dir: str | Path, *, model_type: str, dtype: torch.dtype, options: dict[str, Any] | None = None
) -> nn.Module:
    """``AutoModel.from_pretrained`` pinned to ``dtype`` and eager attention, in eval mode.

    Raises:
        CompareError: transformers could not load the checkpoint, or left weights randomly
            initialised (a reference that is not the checkpoint would make the comparison meaningless).
    """
    from transformers import AutoModel

    _, load_kwargs = REFERENCE_HOOKS[model_type]
    try:
        with _quiet_transformers():
            model, info = AutoModel.from_pretrained(
                str(model_dir),
                dtype=dtype,
                attn_implementation="eager",
                output_loading_info=True,
                **load_kwargs(options or {}),
            )
    except Exception as error:  # transformers raises many kinds; all mean "no reference"
        raise CompareError(
            f"transformers could not load {model_dir}: {type(error).__name__}: {error}"
        ) from error
    problems = {key: sorted(info.get(key) or []) for key in ("missing_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise CompareError(f"transformers did not load every weight of the reference model: {problems}")
    return model.eval()


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether the folder carries tokenizer files."""
    return any((Path(model_dir) / name).is_file() for name in _TOKENIZER_FILES)


def tokenize(model_dir: str | Path, texts: list[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` with the checkpoint's own tokenizer as one padded batch.

    Returns input_ids, attention_mask and token_type_ids, each (B, T).

    Raises:
        CompareError: the folder has no tokenizer, or it cannot be loaded.
    """
    if not has_tokenizer(model_dir):
        raise CompareError(
            f"--text was given but {model_dir} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "run without texts to compare on random token ids"
        )
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:
        raise CompareError(
            f"cannot load the tokenizer of {model_dir}: {type(error).__name__}: {error}"
        ) from error
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = encoded["input_ids"]
    return {
        "input_ids": input_ids,
        "attention_mask": encoded.get("attention_mask", torch.ones_like(input_ids)),
        "token_type_ids": encoded.get("token_type_ids", torch.zeros_like(input_ids)),
    }


# ----------------------------------------------------------------------------------------- running


def _first_tensor(output: Any) -> torch.Tensor:
    # Some modules return (hidden, attention weights); the stage is the hidden states.
    return output[0] if isinstance(output, tuple) else output


def reference_stages(
    model: nn.Module, model_type: str, inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run the reference once and return every stage's tensor, in forward order."""
    hook_points, _ = REFERENCE_HOOKS[model_type]
    stages: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in hook_points(model):

        def hook(_module: nn.Module, _args: Any, output: Any, name: str = name) -> None:
            stages[name] = _first_tensor(output).detach().clone()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    stages["last_hidden_state"] = outputs.last_hidden_state.detach().clone()
    if getattr(outputs, "pooler_output", None) is not None:
        stages["pooler"] = outputs.pooler_output.detach().clone()
    return stages
