"""Reading checkpoint tensors with our own code and putting them into a from-scratch model.

Formats: ``model.safetensors`` (memory-mapped through ``safe_open``), sharded safetensors with
``model.safetensors.index.json``, and ``pytorch_model.bin`` (single or sharded) read with
``torch.load(weights_only=True)`` only, memory-mapped where the file format allows.

Memory: models are built on the "meta" device (shapes, no storage) and checkpoint tensors are handed
to them with ``load_state_dict(assign=True)``, one piece at a time if need be (the embeddings, one
layer, the final modules: :func:`load_piece`). A :class:`CheckpointReader` reads one tensor at a
time from the memory-mapped files, and a :class:`TensorCache` converts each tensor to the compared
dtype (bfloat16 -> float32, say) once per piece. Before anything is read, :func:`plan_weights` checks every
name, shape and dtype against the weight map from the files' headers, so a malformed checkpoint
fails at once, naming the tensor.

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
    "CheckpointReader",
    "TensorCache",
    "Transposed",
    "WeightMap",
    "checkpoint_files",
    "iter_checkpoint_tensors",
    "load_piece",
    "plan_weights",
    "source_name",
    "tie_like_transformers",
]


@dataclass(frozen=True)
class Transposed:
    """A weight map entry for a checkpoint tensor stored (in, out), as GPT-2's Conv1D layers store it
    (they compute ``x @ W + b``): it is transposed on loading into nn.Linear's (out, in)."""

    name: str


# Our parameter name -> the checkpoint tensor it is read from (by name, or Transposed). Several of our
# parameters may read one tensor (a tied LM head and the token embeddings); they then share it.
WeightMap = dict[str, "str | Transposed"]


def source_name(source: str | Transposed) -> str:
    """The checkpoint tensor name of a weight map entry."""
    return source.name if isinstance(source, Transposed) else source


def tie_like_transformers(weight_map: WeightMap, stored: set[str], *, parameter: str, name: str) -> WeightMap:
    """The weight map of a tied parameter (an LM head tied to the token embeddings) as transformers
    reads the checkpoint at hand: the tie fills in only what the checkpoint does not store.

    ``parameter`` is our tied parameter ("lm_head.weight"), ``name`` the checkpoint name it has when it
    is stored ("lm_head.weight" too), ``stored`` the checkpoint's (canonical) tensor names. When
    config.json ties them, transformers 5 (``PreTrainedModel.tie_weights`` during ``from_pretrained``)
    does this:

    * the checkpoint stores the embeddings only (the usual tied checkpoint): the head is the embedding
      matrix;
    * it stores both (``pytorch_model.bin`` files always hold both, sharing one storage; some
      safetensors files too): if they are equal it ties them, the same numbers; if not it leaves them
      untied, each as stored, and warns. Either way the head computes with the stored head;
    * it stores the head only: the embeddings are tied to the head.

    An untied weight map (``parameter`` reads ``name``), or one without ``parameter``, is returned as
    it is.
    """
    source = weight_map.get(parameter)
    if source is None or source_name(source) == name or name not in stored:
        return weight_map
    tied_to = source_name(source)  # the embedding matrix the map ties the head to
    mapping = dict(weight_map)
    mapping[parameter] = name
    if tied_to not in stored:  # the head only: whatever read the embeddings reads the head
        for ours, theirs in weight_map.items():
            if source_name(theirs) == tied_to:
                mapping[ours] = name
    return mapping


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


class CheckpointReader:
    """The tensors of a checkpoint, by name, read one at a time.

    The files' headers are read up front (names, shapes, dtypes; no data). A tensor read from a
    safetensors file is a view of the memory-mapped file: no copy, and nothing comes from disk until it
    is used. Each read opens the file and closes it again, so the pages of tensors no longer needed
    (the bfloat16 original of a tensor converted to float32, say) leave this process's memory as soon
    as the tensor is dropped. Pickled ``.bin`` checkpoints are memory-mapped where their format
    allows, and kept open until :meth:`release`.

    Raises (on construction):
        WeightLoadError: an unreadable file, or a tensor name found in two files.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self._file_of: dict[str, Path] = {}  # tensor name -> the file holding it
        self._shape: dict[str, tuple[int, ...]] = {}
        self._floating: dict[str, bool] = {}
        self._open_pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.files:
            for name, shape, floating in self._header(path):
                if name in self._file_of:
                    raise WeightLoadError(f"tensor {name!r} appears twice in the checkpoint")
                self._file_of[name], self._shape[name], self._floating[name] = path, shape, floating
        self.release()

    def _header(self, path: Path) -> Iterator[tuple[str, tuple[int, ...], bool]]:
        if path.suffix != ".safetensors":
            for name, tensor in self._pickle(path).items():
                yield name, tuple(tensor.shape), tensor.is_floating_point()
            return
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    yield name, tuple(piece.get_shape()), piece.get_dtype().startswith(("F", "BF"))
        except (SafetensorError, OSError) as error:
            raise WeightLoadError(f"cannot read {path.name}: {error}") from error

    def _pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._open_pickles:
            self._open_pickles[path] = _load_pickle_checkpoint(path)
        return self._open_pickles[path]

    def names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def is_floating_point(self, name: str) -> bool:
        return self._floating[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (its own dtype; memory-mapped where possible)."""
        path = self._file_of[name]
        if path.suffix != ".safetensors":
            return self._pickle(path)[name]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise WeightLoadError(f"cannot read {name!r} from {path.name}: {error}") from error

    def release(self) -> None:
        """Let go of the pickled checkpoints' maps (safetensors files are never left open)."""
        self._open_pickles.clear()


class TensorCache:
    """Checkpoint tensors converted to ``dtype``, each once, for whoever reads it in one piece (a tied
    LM head and the token embeddings share one copy)."""

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype) -> None:
        self.reader, self.dtype = reader, dtype
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            self._tensors[name] = self.reader.read(name).to(self.dtype)  # no copy if the dtype matches
        return self._tensors[name]

    def clear(self) -> None:
        """Forget the tensors and release the files (see CheckpointReader.release)."""
        self._tensors.clear()
        self.reader.release()


def plan_weights(
    reader: CheckpointReader,
    weight_map: WeightMap,
    shapes: dict[str, tuple[int, ...]],
    *,
    rename: Callable[[str], str | None],
) -> dict[str, str]:
    """Check the checkpoint against the weight map from its headers alone; return, for each of our
    parameters, the name of the checkpoint tensor it is read from.

    Args:
        reader: the checkpoint.
        weight_map: our parameter name -> the checkpoint tensor (after ``rename``), see :data:`WeightMap`.
        shapes: our parameter name -> its shape (from the model, which may be on "meta").
        rename: checkpoint name -> canonical name, or None for a tensor to ignore (e.g. a task head).

    Raises:
        WeightLoadError: a tensor that is missing, unexpected, duplicated, not floating point or has
            the wrong shape; the message names it.
    """
    if set(shapes) != set(weight_map):  # a bug in the weight map, not in the checkpoint
        raise AssertionError(f"weight map does not match the model: {sorted(set(shapes) ^ set(weight_map))}")
    readers: dict[str, list[str]] = {}  # canonical checkpoint name -> our parameters read from it
    for ours, source in weight_map.items():
        readers.setdefault(source_name(source), []).append(ours)

    plan: dict[str, str] = {}
    found: set[str] = set()
    for raw_name in reader.names():
        name = rename(raw_name)
        if name is None:
            continue
        if name not in readers:
            raise WeightLoadError(f"unexpected tensor {raw_name!r} in the checkpoint (no parameter for it)")
        if name in found:
            raise WeightLoadError(f"tensor {raw_name!r} appears twice in the checkpoint")
        found.add(name)
        if not reader.is_floating_point(raw_name):
            raise WeightLoadError(f"tensor {raw_name!r} is not floating point")
        for ours in readers[name]:
            _check_shape(raw_name, reader.shape(raw_name), weight_map[ours], shapes[ours])
            plan[ours] = raw_name

    missing = sorted({source_name(weight_map[ours]) for ours in weight_map if ours not in plan})
    if missing:
        shown = ", ".join(repr(name) for name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"missing tensor(s) in the checkpoint: {shown}{more}")
    return plan


def _check_shape(
    raw_name: str, shape: tuple[int, ...], source: str | Transposed, expected: tuple[int, ...]
) -> None:
    transposed = isinstance(source, Transposed)
    stored = expected[::-1] if transposed else expected
    if shape != stored:
        layout = " (stored (in, out) and transposed on loading)" if transposed else ""
        raise WeightLoadError(
            f"tensor {raw_name!r} has shape {shape}, expected {stored}{layout} (from config.json)"
        )


def load_piece(
    module: nn.Module,
    prefix: str,
    plan: dict[str, str],
    weight_map: WeightMap,
    tensors: TensorCache,
) -> nn.Module:
    """Give ``module`` (our parameters named ``prefix`` + its own names; "" for a whole model) its
    tensors, by the ``plan`` of :func:`plan_weights`, transposing where the weight map says so."""
    state = {}
    for ours, raw_name in plan.items():
        if ours.startswith(prefix):
            tensor = tensors.get(raw_name)
            state[ours[len(prefix) :]] = (
                tensor.t().contiguous() if isinstance(weight_map[ours], Transposed) else tensor
            )
    module.load_state_dict(state, strict=True, assign=True)
    return module
