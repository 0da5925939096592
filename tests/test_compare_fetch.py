"""``hfmirror compare REPO_ID`` fetches config.json first, then one weight format and the tokenizer.

The choice of files is a pure function, checked on the real file lists of well-known repositories;
the order and the bytes fetched are checked against a served copy that carries every format (the
server's request records say exactly which files were asked for).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from compare.fetch import choose_files
from hfmirror.cli import cli
from hfmirror.errors import WeightLoadError
from hfmirror.server.app import ServerThread, create_app
from hfmirror.server.faults import FaultInjector, FaultPlan
from tests.support import make_repo, save_tiny_bert
from tests.test_compare_support import write_sharded_bin

# The top of `bert-base-uncased` on the Hub: the weights in seven formats, 2.5 GB in all.
BERT_BASE_UNCASED = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "coreml/fill-mask/float32_model.mlpackage/Data/com.apple.CoreML/model.mlmodel",
    "coreml/fill-mask/float32_model.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
    "coreml/fill-mask/float32_model.mlpackage/Manifest.json",
    "flax_model.msgpack",
    "model.onnx",
    "model.safetensors",
    "pytorch_model.bin",
    "rust_model.ot",
    "tf_model.h5",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
]
# `Qwen/Qwen2.5-7B`: sharded safetensors with their index, a BPE tokenizer.
QWEN2_5_7B = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    "merges.txt",
    *[f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)],
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]
# `Qwen/Qwen-7B` (the first Qwen): custom code and a tiktoken vocabulary.
QWEN_7B = [
    "LICENSE",
    "NOTICE",
    "README.md",
    "assets/logo.jpg",
    "config.json",
    "configuration_qwen.py",
    "cpp_kernels.py",
    "generation_config.json",
    *[f"model-{i:05d}-of-00008.safetensors" for i in range(1, 9)],
    "model.safetensors.index.json",
    "modeling_qwen.py",
    "qwen.tiktoken",
    "qwen_generation_utils.py",
    "tokenization_qwen.py",
    "tokenizer_config.json",
]
# An older repository with only the pickle format, sharded, and a GGUF-only one.
PICKLE_SHARDED = [
    "config.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "tokenizer.model",
    "special_tokens_map.json",
]


def test_bert_base_uncased_gets_safetensors_and_its_tokenizer_only() -> None:
    chosen = choose_files(BERT_BASE_UNCASED)
    assert (chosen.weights, chosen.sharded) == ("model.safetensors", False)
    assert chosen.tokenizer == ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def test_sharded_safetensors_come_through_their_index() -> None:
    chosen = choose_files(QWEN2_5_7B)
    assert (chosen.weights, chosen.sharded) == ("model.safetensors.index.json", True)
    assert chosen.tokenizer == ("merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json")
    chosen = choose_files(QWEN_7B)
    assert (chosen.weights, chosen.sharded) == ("model.safetensors.index.json", True)
    assert chosen.tokenizer == ("qwen.tiktoken", "tokenizer_config.json")  # no code, no assets


def test_the_pickle_format_only_when_there_is_no_safetensors() -> None:
    chosen = choose_files(PICKLE_SHARDED)
    assert (chosen.weights, chosen.sharded) == ("pytorch_model.bin.index.json", True)
    assert chosen.tokenizer == ("special_tokens_map.json", "tokenizer.model")
    assert choose_files(["config.json", "pytorch_model.bin", "tf_model.h5"]).weights == "pytorch_model.bin"
    # Weights in a folder are another checkpoint (onnx/, original/), not ours to read.
    with pytest.raises(WeightLoadError, match="the repository has: config.json, model.gguf"):
        choose_files(["config.json", "model.gguf", "onnx/model.onnx", "original/model.safetensors"])


# ------------------------------------------------------------------------------ through the mirror

DECOYS = ("tf_model.h5", "flax_model.msgpack", "rust_model.ot", "model.onnx", "coreml/weight.bin")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FaultPlan, Path]]:
    """A mirror of its own (so its records are only this module's) with repos in every layout."""
    root = tmp_path_factory.mktemp("compare-fetch-root")
    everything = save_tiny_bert(root / "org" / "all-formats", architecture="BertForMaskedLM")
    make_repo(root, "org/all-formats", {name: 3000 for name in (*DECOYS, "pytorch_model.bin")})
    sharded = save_tiny_bert(root / "org" / "sharded", max_shard_size="20KB")
    stale = {"model-00099-of-00099.safetensors": 3000, "pytorch_model.bin": 3000}  # not in the index
    make_repo(root, "org/sharded", {**stale, "tf_model.h5": 3000})
    pickled = write_sharded_bin(save_tiny_bert(root / "org" / "pickled", safe_serialization=False))
    make_repo(root, "org/pickled", {"tf_model.h5": 3000})
    t5 = make_repo(root, "org/not-bert", {"model.safetensors": 50_000, "tokenizer.json": b"{}"})
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 2}))
    words = save_tiny_bert(root / "org" / "tokenizer-donor")  # a model repo: its tokenizer is wanted
    make_repo(root, "org/tokenizer-donor", {"notes.txt": b"not a tokenizer", "data.json": b"{}"})
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= {p.name for p in words.iterdir()}
    gpt = make_repo(root, "org/bad-gpt2", {"model.safetensors": 50_000, "tokenizer.json": b"{}"})
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))  # no n_embd
    assert (
        len(list(sharded.glob("model-*.safetensors"))) > 2
        and (pickled / "pytorch_model.bin.index.json").exists()
    )
    assert (everything / "model.safetensors").exists()
    plan = FaultPlan()
    inner = create_app(root, state_dir=tmp_path_factory.mktemp("compare-fetch-state"))
    thread = ServerThread(FaultInjector(inner, plan)).start()
    try:
        yield thread.url, plan, root
    finally:
        thread.stop()
        inner.state.checksums.close()


def fetched(plan: FaultPlan) -> list[str]:
    """The files whose bytes were asked for, in order."""
    return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in plan.requests("*/resolve/*", "GET")]


def compare(url: str, repo_id: str, cache: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["compare", repo_id, "--endpoint", url, "--cache-dir", str(cache), *extra]
    )
    return result.exit_code, result.output


def test_config_first_then_safetensors_and_tokenizer_not_the_other_formats(mirror, tmp_path: Path) -> None:
    url, plan, root = mirror
    plan.reset()
    code, output = compare(url, "org/all-formats", tmp_path, "--text", "hello world", "--token", "t0k")
    assert code == 0, output
    assert "PASS: all" in output
    got = fetched(plan)
    assert got[0] == "config.json"
    tokenizer = ["tokenizer.json", "tokenizer_config.json"]  # what transformers saved for it
    assert all((root / "org/all-formats" / name).is_file() for name in tokenizer)
    assert sorted(got) == sorted(["config.json", "model.safetensors", *tokenizer])
    assert all(r.headers.get("authorization") == "Bearer t0k" for r in plan.requests("*", "GET"))
    snapshot = next((tmp_path / "models--org--all-formats" / "snapshots").iterdir())
    assert not any((snapshot / name).exists() for name in (*DECOYS, "pytorch_model.bin"))
    assert (tmp_path / "models--org--all-formats" / "refs" / "main").is_file()


def test_shards_come_from_the_index_and_nothing_else(mirror, tmp_path: Path) -> None:
    url, plan, root = mirror
    plan.reset()
    code, output = compare(url, "org/sharded", tmp_path)
    assert code == 0, output
    index = json.loads((root / "org/sharded/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    weights = [name for name in fetched(plan) if "safetensors" in name or name.endswith((".bin", ".h5"))]
    # The index, then exactly its shards (fetched in parallel, so in any order).
    assert weights[0] == "model.safetensors.index.json" and sorted(weights[1:]) == shards


def test_sharded_pickles_when_there_is_no_safetensors(mirror, tmp_path: Path) -> None:
    url, plan, root = mirror
    plan.reset()
    code, output = compare(url, "org/pickled", tmp_path, "--revision", "main")
    assert code == 0, output
    weights = [
        name for name in fetched(plan) if name.endswith((".bin", ".json", ".h5")) and "token" not in name
    ]
    assert weights[:2] == ["config.json", "pytorch_model.bin.index.json"] and "tf_model.h5" not in weights
    assert len([w for w in weights if w.endswith(".bin")]) == 3


def test_an_unsupported_model_type_is_refused_before_any_weight(mirror, tmp_path: Path) -> None:
    url, plan, _ = mirror
    plan.reset()
    code, output = compare(url, "org/not-bert", tmp_path)
    assert code == 2 and "model_type 't5' is not supported" in output
    assert fetched(plan) == ["config.json"]
    assert not any(p.name == "model.safetensors" for p in tmp_path.rglob("*"))
    assert os.path.isdir(tmp_path / "models--org--not-bert")  # (the config was fetched into the cache)


def test_a_config_our_model_cannot_use_is_refused_before_any_weight(mirror, tmp_path: Path) -> None:
    url, plan, _ = mirror
    plan.reset()
    code, output = compare(url, "org/bad-gpt2", tmp_path)
    assert code == 2 and "n_embd" in output, output
    assert fetched(plan) == ["config.json"]


def test_a_tokenizer_repo_gives_its_tokenizer_files_only(mirror, tmp_path: Path) -> None:
    """--tokenizer REPO fetches what AutoTokenizer reads (the same list a checkpoint's tokenizer is
    chosen by), not the repo's config, weights or other files."""
    url, plan, root = mirror
    plan.reset()
    code, output = compare(
        url, "org/all-formats", tmp_path, "--text", "hello world", "--tokenizer", "org/tokenizer-donor"
    )
    assert code == 0, output
    donor = root / "org/tokenizer-donor"
    wanted = sorted(choose_files([p.name for p in donor.iterdir()]).tokenizer)
    assert wanted and "config.json" not in wanted and "notes.txt" not in wanted
    donated = [r.path for r in plan.requests("*/tokenizer-donor/resolve/*", "GET")]
    assert sorted(path.rsplit("/", 1)[1] for path in donated) == wanted


def test_every_tokenizer_file_counts_as_a_tokenizer(tmp_path: Path) -> None:
    from compare.fetch import TOKENIZER_FILES
    from compare.reference import has_tokenizer

    for name in [*TOKENIZER_FILES, "qwen.tiktoken"]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text("x")
        assert has_tokenizer(folder), name  # e.g. a SentencePiece model alone: spiece.model
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "config.json").write_text("{}")
    assert not has_tokenizer(tmp_path / "weights-only")
