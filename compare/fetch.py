"""What ``hfmirror compare REPO_ID`` downloads, and in which order.

A model repository often carries the same weights many times over: bert-base-uncased has them as
safetensors, ``pytorch_model.bin``, TensorFlow (``tf_model.h5``), Flax (``flax_model.msgpack``), Rust
(``rust_model.ot``), ONNX and CoreML, 2.5 GB where the comparison reads 440 MB. So the steps are:

1. list the repository (one request; nothing is downloaded);
2. fetch ``config.json`` and refuse a model type without a from-scratch implementation, before any
   weight is fetched;
3. fetch one weight format, in the order :mod:`compare.weights` reads them: ``model.safetensors``,
   else the safetensors shards its index names, else ``pytorch_model.bin``, else its shards;
4. and the tokenizer files (``--text`` needs them), nothing else.

Steps 2 and 3 read the commit step 1 saw; the last download asks for the revision by name again, so
that ``refs/<revision>`` is recorded and a later run finds the snapshot offline.

Only the standard library and hfmirror are imported at module level: choosing files needs no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hfmirror.errors import CompareError, HfMirrorError, WeightLoadError
from hfmirror.paths import validate_relative_path

__all__ = [
    "TOKENIZER_FILES",
    "WEIGHT_FILES",
    "CheckpointFiles",
    "choose_files",
    "fetch_checkpoint",
    "fetch_tokenizer",
    "is_tokenizer_file",
    "shard_names",
]

# (single file, index of its shards), in order of preference, like transformers: safetensors first,
# the pickle format as a fallback.
WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# What AutoTokenizer may read: the fast tokenizer, its settings, and the vocabularies of the slow ones
# (WordPiece, BPE, SentencePiece; tiktoken's are any "*.tiktoken"). The one list: what is fetched for
# a checkpoint or for --tokenizer REPO, and what counts as a tokenizer in a folder.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)


def is_tokenizer_file(name: str) -> bool:
    """Whether a file name (no folder) is one AutoTokenizer may read."""
    return name in TOKENIZER_FILES or name.endswith(".tiktoken")


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of a repository the comparison needs (besides config.json)."""

    weights: str  # one weights file, or the index that names the shards
    sharded: bool  # True if ``weights`` is an index: its shards are known once it is fetched
    tokenizer: tuple[str, ...]


def choose_files(names: Iterable[str]) -> CheckpointFiles:
    """From a repository's file names, the one weight format to fetch and the tokenizer files.

    Only files at the top of the repository count: copies in folders (``onnx/``, ``coreml/``,
    ``original/``) are other formats or other checkpoints.

    Raises:
        WeightLoadError: no weights in a format compare can read (naming what the repository has).
    """
    top = sorted(name for name in names if "/" not in name)
    present = set(top)
    tokenizer = _tokenizer_files(top)
    for single, index in WEIGHT_FILES:
        if single in present:
            return CheckpointFiles(single, False, tokenizer)
        if index in present:
            return CheckpointFiles(index, True, tokenizer)
    readable = ", ".join(name for pair in WEIGHT_FILES for name in pair)
    shown = ", ".join(top[:12]) + (", ..." if len(top) > 12 else "")
    raise WeightLoadError(f"no weights compare can read ({readable}); the repository has: {shown}")


def _tokenizer_files(names: Iterable[str]) -> tuple[str, ...]:
    """The tokenizer files among a repository's file names (at its top only, as for the weights)."""
    return tuple(sorted(name for name in names if "/" not in name and is_tokenizer_file(name)))


def shard_names(index_path: Path) -> list[str]:
    """The shard files a ``*.index.json`` names, each checked to be a plain relative path.

    Raises:
        WeightLoadError: an unreadable index, or a shard name that would leave the folder.
    """
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        names = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise WeightLoadError(f"cannot read the shard index {index_path.name}: {error}") from error
    for name in names:
        try:
            validate_relative_path(name)
        except HfMirrorError as error:
            raise WeightLoadError(f"{index_path.name} names an unsafe shard: {error}") from error
    return names


def fetch_checkpoint(
    repo_id: str,
    *,
    revision: str,
    endpoints: list[str] | None,
    token: str | None,
    cache_dir: str | None,
    progress: bool,
) -> Path:
    """Download what comparing ``repo_id`` needs (see the module docstring); return the snapshot folder.

    Raises:
        CompareError: no config.json in the repository.
        UnsupportedModelError: its model_type has no implementation (nothing but config.json fetched).
        CompareError: a config.json our implementation cannot use (likewise).
        WeightLoadError: no weights in a readable format, or an unreadable shard index.
        Any error of :func:`hfmirror.download.download`.
    """
    from hfmirror.download import download

    from .architectures import architecture_for
    from .config import read_config_json

    def fetch(names: list[str] | None, at: str, **options):
        return download(
            repo_id,
            filenames=names,
            revision=at,
            endpoints=endpoints,
            token=token,
            cache_dir=cache_dir,
            progress=progress,
            **options,
        )

    plan = fetch(None, revision, dry_run=True)
    names = [f.path for f in plan.files]
    if "config.json" not in names:
        raise CompareError(f"{repo_id} has no config.json: it is not a transformers model repository")
    raw_config = read_config_json(fetch(["config.json"], plan.commit).path)
    architecture_for(raw_config).parse_config(raw_config)  # unsupported or malformed: before any weight
    chosen = choose_files(names)
    weights = [chosen.weights]
    if chosen.sharded:
        index = fetch([chosen.weights], plan.commit).path / chosen.weights
        weights += shard_names(index)
    return fetch(["config.json", *weights, *chosen.tokenizer], revision).path


def fetch_tokenizer(
    repo_id: str,
    *,
    endpoints: list[str] | None,
    token: str | None,
    cache_dir: str | None,
    progress: bool,
) -> Path:
    """Download the tokenizer files of ``repo_id`` (``--tokenizer REPO``), not its weights or anything
    else; return the snapshot folder.

    Raises:
        CompareError: the repository has no tokenizer files.
        Any error of :func:`hfmirror.download.download`.
    """
    from hfmirror.download import download

    options = {"endpoints": endpoints, "token": token, "cache_dir": cache_dir, "progress": progress}
    plan = download(repo_id, dry_run=True, **options)
    names = _tokenizer_files(f.path for f in plan.files)
    if not names:
        raise CompareError(f"{repo_id} has no tokenizer files ({', '.join(sorted(TOKENIZER_FILES))})")
    return download(repo_id, filenames=list(names), **options).path
