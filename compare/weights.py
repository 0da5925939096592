"""Reading checkpoint tensors with our own code and putting them into a from-scratch model.

Formats: ``model.safetensors`` (memory-mapped through ``safe_open``), sharded safetensors with
``model.safetensors.index.json``, and ``pytorch_model.bin`` (single or sharded) read with
``torch.load(weights_only=True)`` only, memory-mapped where the file format allows.

Memory: the model is built on the "meta" device (shapes, no storage) and each checkpoint tensor is
handed to it with ``load_state_dict(assign=True)``; shards are read one after the other. So the
weights exist once, plus at most one tensor in flight when a dtype conversion is needed.

Only torch and safetensors are imported here; never transformers.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from hfmirror.errors import WeightLoadError

from .fetch import WEIGHT_FILES, shard_names

__all__ = [
    "Transposed",
    "WeightMap",
    "checkpoint_files",
    "checkpoint_tensor_names",
    "iter_checkpoint_tensors",
    "load_weights",
    "source_name",
    "split_by_piece",
]


@dataclass(frozen=True)
class Transposed:
    """A weight map entry for a checkpoint tensor stored (in, out), as GPT-2's Conv1D layers store it
    (they compute ``x @ W + b``): it is transposed on loading into nn.Linear's (out, in)."""

    name: str


# Our parameter name -> the checkpoint tensor it is read from (by name, or Transposed). Several of our
# parameters may read one tensor (a tied LM head and the token embeddings); they then share it.
WeightMap = dict[str, "str | Transposed"]


def split_by_piece(weight_map: WeightMap, pieces: dict[str, tuple[str, ...]]) -> dict[str, WeightMap]:
    """The weight map of each piece of a model (``TransformerModel.piece_prefixes()``), so that the
    tensors of one piece (the embeddings, layer i, the final modules) can be found and loaded alone."""
    return {
        piece: {ours: source for ours, source in weight_map.items() if ours.startswith(prefixes)}
        for piece, prefixes in pieces.items()
    }


def source_name(source: str | Transposed) -> str:
    """The checkpoint tensor name of a weight map entry."""
    return source.name if isinstance(source, Transposed) else source


# In order of preference, like transformers: safetensors first, the pickle format as a fallback.
_SINGLE_FILES = tuple(single for single, _ in WEIGHT_FILES)
_INDEX_FILES = tuple(index for _, index in WEIGHT_FILES)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder: one file, or every shard named by an index.

    Raises:
        WeightLoadError: no weights file, an unreadable index, or a shard the index names is missing.
    """
    model_dir = Path(model_dir)
    for single, index in zip(_SINGLE_FILES, _INDEX_FILES, strict=True):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            return _shards_from_index(model_dir, model_dir / index)
    raise WeightLoadError(
        f"no weights in {model_dir}: expected one of {', '.join(_SINGLE_FILES + _INDEX_FILES)}"
    )


def _shards_from_index(model_dir: Path, index_path: Path) -> list[Path]:
    shards = []
    for name in shard_names(index_path):
        shard = model_dir / name
        if not shard.is_file():
            raise WeightLoadError(f"shard {name!r} listed in {index_path.name} is missing")
        shards.append(shard)
    return shards


def _reason(error: BaseException) -> str:
    """The informative line of torch.load's (long, multi-line) error message."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(error).__name__


def _load_pickle_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers, never arbitrary objects."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # The legacy (pre-zip) format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightLoadError(
            f"{path.name} could not be loaded as plain tensors (torch.load with weights_only=True "
            f"refused it): {_reason(error)}"
        ) from error
    if not isinstance(state, dict):
        raise WeightLoadError(f"{path.name} holds a {type(state).__name__}, not a dict of tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WeightLoadError(f"{path.name}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every file, one file at a time."""
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as error:
                raise WeightLoadError(f"cannot read {path.name}: {error}") from error
        else:
            state = _load_pickle_checkpoint(path)
            while state:  # hand tensors over one by one so the dict does not keep them alive
                name = next(iter(state))
                yield name, state.pop(name)


def checkpoint_tensor_names(files: list[Path]) -> set[str]:
    """Every tensor name in the checkpoint, reading as little as possible (safetensors: the header)."""
    names: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    names.update(f.keys())
            except (SafetensorError, OSError) as error:
                raise WeightLoadError(f"cannot read {path.name}: {error}") from error
        else:
            names.update(_load_pickle_checkpoint(path))  # memory-mapped: names without reading the data
    return names


def load_weights(
    model: nn.Module,
    files: list[Path],
    weight_map: WeightMap,
    *,
    rename: Callable[[str], str | None],
    dtype: torch.dtype,
) -> nn.Module:
    """Fill ``model``'s parameters from checkpoint ``files`` through an explicit ``weight_map``.

    Args:
        model: a model whose parameters are exactly the keys of ``weight_map`` (may be on "meta").
        files: the checkpoint files (see :func:`checkpoint_files`).
        weight_map: our parameter name -> the checkpoint tensor (after ``rename``), see :data:`WeightMap`.
        rename: checkpoint name -> canonical name, or None for a tensor to ignore (e.g. a task head).
        dtype: the floating-point dtype to store parameters in.

    Returns:
        ``model``, with every parameter assigned.

    Raises:
        WeightLoadError: a tensor that is missing, unexpected, duplicated or has the wrong shape;
            the message names it.
    """
    expected = {name: tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    if set(expected) != set(weight_map):  # a bug in the weight map, not in the checkpoint
        raise AssertionError(
            f"weight map does not match the model: {sorted(set(expected) ^ set(weight_map))}"
        )
    readers: dict[str, list[str]] = {}  # checkpoint name -> our parameters read from it
    for ours, source in weight_map.items():
        readers.setdefault(source_name(source), []).append(ours)

    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for raw_name, tensor in iter_checkpoint_tensors(files):
        name = rename(raw_name)
        if name is None:
            continue
        if name not in readers:
            raise WeightLoadError(f"unexpected tensor {raw_name!r} in the checkpoint (no parameter for it)")
        if name in seen:
            raise WeightLoadError(f"tensor {raw_name!r} appears twice in the checkpoint")
        seen.add(name)
        if not tensor.is_floating_point():
            raise WeightLoadError(f"tensor {raw_name!r} has dtype {tensor.dtype}, expected floating point")
        converted = tensor.to(dtype)  # no copy when the dtype already matches
        for ours in readers[name]:
            state[ours] = _fitted(raw_name, converted, weight_map[ours], expected[ours])

    missing = sorted({source_name(weight_map[ours]) for ours in weight_map if ours not in state})
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"missing tensor(s) in the checkpoint: {shown}{more}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _fitted(
    raw_name: str, tensor: torch.Tensor, source: str | Transposed, expected: tuple[int, ...]
) -> torch.Tensor:
    """``tensor`` in the layout of its parameter (transposed if the map says so), shape-checked."""
    transposed = isinstance(source, Transposed)
    stored = expected[::-1] if transposed else expected
    if tuple(tensor.shape) != stored:
        layout = " (stored (in, out) and transposed on loading)" if transposed else ""
        raise WeightLoadError(
            f"tensor {raw_name!r} has shape {tuple(tensor.shape)}, expected {stored}{layout} "
            "(from config.json)"
        )
    return tensor.t().contiguous() if transposed else tensor
