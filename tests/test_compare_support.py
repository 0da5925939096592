"""Test material for the compare tests, and checks that it is what it claims to be.

``tests.support.save_tiny_bert`` saves a freshly initialised BERT: LayerNorm weights all 1, every
bias 0, weights with std 0.02. Such a model hides bugs (a LayerNorm applied twice, a missing bias,
gamma and beta swapped, an activation swapped for a close one). ``save_random_bert`` therefore
re-draws every tensor so that every parameter matters and activations are O(1).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.support import save_tiny_bert

__all__ = ["randomise_weights", "rewrite_safetensors", "save_random_bert", "write_sharded_bin"]


def _redraw(name: str, tensor: torch.Tensor, seed: int) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if name.endswith(("LayerNorm.weight", "LayerNorm.gamma")):
        new = 1.0 + 0.2 * noise  # scales around 1, each feature different
    elif name.endswith(("bias", "LayerNorm.beta")):
        new = 0.1 * noise
    elif "embeddings" in name:
        new = noise
    else:
        new = noise / tensor.shape[-1] ** 0.5  # keeps each Linear's output O(1)
    return new.to(tensor.dtype).contiguous()


def randomise_weights(path: str | Path, *, seed: int = 0) -> Path:
    """Re-draw every floating-point tensor of every weight file in ``path`` (safetensors and .bin).

    Each tensor's values depend only on its name and ``seed``, not on how the checkpoint is sharded.
    """
    path = Path(path)
    for file in sorted(path.glob("*.safetensors")):
        state = load_file(file)
        save_file(
            {name: _redraw(name, t, seed) for name, t in state.items()}, file, metadata={"format": "pt"}
        )
    for file in sorted(path.glob("*.bin")):
        state = torch.load(file, weights_only=True)
        torch.save({name: _redraw(name, t, seed) for name, t in state.items()}, file)
    return path


def save_random_bert(path: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """``save_tiny_bert`` (same keyword arguments), then every weight re-drawn."""
    return randomise_weights(save_tiny_bert(path, seed=seed, **kwargs), seed=seed)


def rewrite_safetensors(path: str | Path, change: Any) -> Path:
    """Apply ``change(state: dict) -> dict`` to ``path/model.safetensors``."""
    file = Path(path) / "model.safetensors"
    state = change(dict(load_file(file)))
    save_file(state, file, metadata={"format": "pt"})
    return Path(path)


def write_sharded_bin(path: str | Path, n_shards: int = 3) -> Path:
    """Turn ``path/pytorch_model.bin`` into ``n_shards`` pickle shards plus pytorch_model.bin.index.json."""
    path = Path(path)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    (path / "pytorch_model.bin").unlink()
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        shard_name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        shard = {name: state[name] for name in names[i::n_shards]}
        torch.save(shard, path / shard_name)
        weight_map |= {name: shard_name for name in shard}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index), encoding="utf-8")
    return path


# ------------------------------------------------------------------------ the material is as claimed


def test_save_random_bert_redraws_every_tensor(tmp_path: Path) -> None:
    plain = load_file(save_tiny_bert(tmp_path / "plain") / "model.safetensors")
    random = load_file(save_random_bert(tmp_path / "random") / "model.safetensors")
    assert plain.keys() == random.keys()
    for name in plain:
        assert random[name].shape == plain[name].shape, name
        assert not torch.equal(random[name], plain[name]), f"{name} was not re-drawn"
    # No LayerNorm left at the identity, no bias left at zero.
    norm_weights = [t for name, t in random.items() if name.endswith("LayerNorm.weight")]
    assert norm_weights and all(t.std() > 0.1 for t in norm_weights)
    biases = [t for name, t in random.items() if name.endswith("bias")]
    assert biases and all(t.abs().max() > 0.01 for t in biases)


def test_randomise_weights_does_not_depend_on_sharding(tmp_path: Path) -> None:
    single = load_file(save_random_bert(tmp_path / "single") / "model.safetensors")
    sharded_dir = save_random_bert(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1
    sharded = {name: t for shard in shards for name, t in load_file(shard).items()}
    assert sharded.keys() == single.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=0)
