"""Test material made on the spot: tiny random-initialised models and small repos on disk.

Nothing here touches the network. Models are real ``transformers`` models saved with
``save_pretrained``, so the files (safetensors, config.json, tokenizer.json) are the real formats.
transformers and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

# A word-piece vocabulary small enough to read, large enough for sentences in tests.
TINY_VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + ["hello", "world", "the", "cat", "##s", "sat", "on", "mat", "a", "dog", "ran", "is", "good", "##ing"]
)


def save_tiny_bert(
    path: str | os.PathLike[str],
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 37,
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-12,
    max_position_embeddings: int = 64,
    type_vocab_size: int = 2,
    seed: int = 0,
    with_tokenizer: bool = True,
    architecture: str = "BertModel",
    safe_serialization: bool = True,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Save a tiny random-initialised BERT (weights, config and optionally a tokenizer) to ``path``.

    ``architecture`` is ``"BertModel"`` (no prefix) or ``"BertForPreTraining"`` / ``"BertForMaskedLM"``
    (``bert.`` prefix and ``cls.*`` heads, like bert-base-uncased).
    """
    import torch
    import transformers

    path = Path(path)
    config = transformers.BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=type_vocab_size,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    if not safe_serialization:
        # transformers 5 always writes safetensors; write the legacy pickle format ourselves.
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    else:
        model.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(TINY_VOCAB)})
        tokenizer.save_pretrained(path)
    return path


def write_random_file(path: str | os.PathLike[str], size: int, *, seed: int = 0) -> Path:
    """Write ``size`` pseudo-random bytes (deterministic for a seed) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            block = min(remaining, 1 << 20)
            f.write(rng.randbytes(block))
            remaining -= block
    return path


def make_repo(
    root: str | os.PathLike[str], repo_id: str, files: dict[str, bytes | int], *, repo_type: str = "model"
) -> Path:
    """Create a plain-tree repo under a served ``root``.

    ``files`` maps a relative path to its content (bytes) or to a size (int: random bytes of that size,
    seeded by the path so the same call makes the same bytes).
    """
    base = Path(root) / ("datasets" if repo_type == "dataset" else "") / repo_id
    for name, content in files.items():
        target = base / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            write_random_file(target, content, seed=zlib.crc32(name.encode()))
        else:
            target.write_bytes(content)
    return base


def download_command(url: str, repo_id: str, cache: str | os.PathLike[str], *extra: str) -> list[str]:
    """The command line of ``hfmirror download`` from ``url`` into ``cache``, run as users run it."""
    command = [sys.executable, "-m", "hfmirror", "download", repo_id, "--endpoint", url]
    return [*command, "--cache-dir", str(cache), *extra]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m hfmirror ARGS`` in a subprocess (what users run), with ``env`` added to ours."""
    return subprocess.run(
        [sys.executable, "-m", "hfmirror", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def files_under(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (links followed) by relative path, skipping dot-folders."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")[:-1]):
            found[rel] = path.read_bytes()
    return found


def range_start(header: str | None) -> int:
    """Where a request's ``Range: bytes=a-b`` starts (0 without one), as the fault server records it."""
    return int(header.split("=")[1].split("-")[0]) if header else 0
