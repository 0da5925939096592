"""Test material for the compare tests, and checks that it is what it claims to be.

``tests.support.save_tiny_bert`` saves a freshly initialised BERT: LayerNorm weights all 1, every
bias 0, weights with std 0.02. Such a model hides bugs (a LayerNorm applied twice, a missing bias,
gamma and beta swapped, an activation swapped for a close one). ``save_random_bert`` therefore
re-draws every tensor so that every parameter matters and activations are O(1);
``save_random_decoder`` does the same for tiny GPT-2, Llama, Mistral, Qwen2, Qwen3 and RoBERTa
models made with transformers, and ``convert_qwen2_to_qwen_v1`` writes a Qwen2 model in Qwen v1's
format, from the facts of that format alone (not with compare.qwen's code).
"""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.support import save_tiny_bert

__all__ = [
    "assert_fails_at",
    "convert_qwen2_to_qwen_v1",
    "load_whole_model",
    "randomise_weights",
    "rewrite_safetensors",
    "save_random_bert",
    "save_byte_level_tokenizer",
    "save_random_decoder",
    "save_word_tokenizer",
    "write_sharded_bin",
]

# GPT-2's Conv1D weights are stored (in, out): their fan-in is the first dimension.
_CONV1D_WEIGHT = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _is_norm_weight(name: str, tensor: torch.Tensor) -> bool:
    if name.endswith(("LayerNorm.weight", "LayerNorm.gamma")):
        return True
    last = name.rsplit(".", 2)[-2] if "." in name else name
    return tensor.dim() == 1 and name.endswith(".weight") and ("norm" in last or last.startswith("ln_"))


def _redraw(name: str, tensor: torch.Tensor, seed: int, *, conv1d: bool = False) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if _is_norm_weight(name, tensor):
        new = 1.0 + 0.2 * noise  # scales around 1, each feature different
    elif name.endswith(("bias", "LayerNorm.beta")):
        new = 0.1 * noise
    elif "embeddings" in name or "embed_tokens" in name or name.endswith(("wte.weight", "wpe.weight")):
        new = noise
    else:
        fan_in = tensor.shape[0] if conv1d and _CONV1D_WEIGHT.search(name) else tensor.shape[-1]
        new = noise / fan_in**0.5  # keeps each Linear's output O(1)
    return new.to(tensor.dtype).contiguous()


def randomise_weights(path: str | Path, *, seed: int = 0) -> Path:
    """Re-draw every floating-point tensor of every weight file in ``path`` (safetensors and .bin).

    Each tensor's values depend only on its name and ``seed``, not on how the checkpoint is sharded.
    """
    path = Path(path)
    conv1d = json.loads((path / "config.json").read_text()).get("model_type") == "gpt2"
    for file in sorted(path.glob("*.safetensors")):
        state = load_file(file)
        redrawn = {name: _redraw(name, t, seed, conv1d=conv1d) for name, t in state.items()}
        save_file(redrawn, file, metadata={"format": "pt"})
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


# Tiny config of each family; tests override fields. Vocabulary: the word tokenizer's (below).
WORDS = ["[UNK]", "<pad>", "<|endoftext|>", "<s>", "</s>"] + (
    "hello world the cat sat on mat a dog ran is good 你 好 世 界 我 们 中 文".split()
)
_TINY_DECODERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # model_type: (config class, model class, config fields)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=40,
        ),
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaModel",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=66,
            type_vocab_size=1,
            pad_token_id=1,
        ),
    ),
    "xlm-roberta": (
        "XLMRobertaConfig",
        "XLMRobertaModel",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=66,
            type_vocab_size=1,
            pad_token_id=1,
        ),
    ),
}


def save_word_tokenizer(path: str | Path, *, pad: bool = False) -> Path:
    """A whitespace word-level tokenizer over ``WORDS`` (tokenizer.json), with an end-of-text token
    and, if ``pad``, a padding token (decoder tokenizers often have none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "[UNK]", "eos_token": "<|endoftext|>"} | ({"pad_token": "<pad>"} if pad else {})
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(path)
    return Path(path)


def save_byte_level_tokenizer(path: str | Path, corpus: list[str], *, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (the kind GPT-2's and Qwen's are) trained here on ``corpus``, saved
    with ``save_pretrained``. Few merges: Chinese characters (three UTF-8 bytes each) are split
    across tokens, and words carry their leading space as ``Ġ``, as in the real ones."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    tokenizer.train_from_iterator(
        corpus * 5,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tokenizer, eos_token="<|endoftext|>")
    wrapped.save_pretrained(path)
    return Path(path)


def save_random_decoder(
    path: str | Path, model_type: str, *, seed: int = 0, tokenizer: bool = True, **config_fields: Any
) -> Path:
    """Save a tiny transformers model of ``model_type`` (fields overridable), every tensor re-drawn.

    Decoders are saved with their LM head (``*ForCausalLM``), encoders as base models.
    """
    import transformers

    config_class, model_class, defaults = _TINY_DECODERS[model_type]
    fields = {"vocab_size": len(WORDS), "bos_token_id": 3, "eos_token_id": 2} | defaults | config_fields
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        fields.setdefault("max_position_embeddings", 64)
    config = getattr(transformers, config_class)(**fields)
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).eval().save_pretrained(path)
    if tokenizer:
        save_word_tokenizer(path, pad=model_type in ("roberta", "xlm-roberta"))
    return randomise_weights(path, seed=seed)


def convert_qwen2_to_qwen_v1(qwen2_dir: str | Path, path: str | Path) -> Path:
    """Write the Qwen2 model in ``qwen2_dir`` (no grouped-query attention, no tying) in Qwen v1's format.

    The facts used: ``transformer.wte``; per layer ``ln_1``, ``attn.c_attn`` = [q; k; v] stacked along
    the output dimension (weights and biases), ``attn.c_proj`` = o_proj, ``ln_2``, ``mlp.w1`` = up,
    ``mlp.w2`` = gate, ``mlp.c_proj`` = down; ``transformer.ln_f``; ``lm_head``. config.json as Qwen-7B's.
    The tokenizer is "remote code" that would leave a file behind if it were ever run.
    """
    qwen2_dir, path = Path(qwen2_dir), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = json.loads((qwen2_dir / "config.json").read_text())
    assert (
        source["num_key_value_heads"] == source["num_attention_heads"] and not source["tie_word_embeddings"]
    )
    state = load_file(qwen2_dir / "model.safetensors")
    out: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["model.embed_tokens.weight"],
        "transformer.ln_f.weight": state["model.norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(source["num_hidden_layers"]):
        theirs, ours = f"model.layers.{i}", f"transformer.h.{i}"
        attention = f"{theirs}.self_attn"
        for kind in ("weight", "bias"):
            out[f"{ours}.attn.c_attn.{kind}"] = torch.cat(
                [state[f"{attention}.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
        out |= {
            f"{ours}.ln_1.weight": state[f"{theirs}.input_layernorm.weight"],
            f"{ours}.attn.c_proj.weight": state[f"{attention}.o_proj.weight"],
            f"{ours}.ln_2.weight": state[f"{theirs}.post_attention_layernorm.weight"],
            f"{ours}.mlp.w1.weight": state[f"{theirs}.mlp.up_proj.weight"],
            f"{ours}.mlp.w2.weight": state[f"{theirs}.mlp.gate_proj.weight"],
            f"{ours}.mlp.c_proj.weight": state[f"{theirs}.mlp.down_proj.weight"],
        }
    save_file(
        {k: v.contiguous() for k, v in out.items()}, path / "model.safetensors", metadata={"format": "pt"}
    )
    heads = source["num_attention_heads"]
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": source["hidden_size"],
        "intermediate_size": 2 * source["intermediate_size"],
        "kv_channels": source["hidden_size"] // heads,
        "layer_norm_epsilon": source["rms_norm_eps"],
        "max_position_embeddings": 64,
        "no_bias": True,
        "num_attention_heads": heads,
        "num_hidden_layers": source["num_hidden_layers"],
        "rotary_emb_base": source["rope_parameters"]["rope_theta"],
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 64,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": source["vocab_size"],
        "bf16": False,
        "fp16": False,
        "fp32": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = {
        "model_max_length": 64,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    marker = path.parent / f"{path.name}.REMOTE-CODE-RAN"
    (path / "tokenization_qwen.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (path / "qwen.tiktoken").write_text("aGVsbG8= 0\n")
    return path


def assert_fails_at(report: Any, stage: str) -> None:
    """The comparison failed, first at ``stage``; every stage before it passed; the verdict says so."""
    assert not report.passed, report.render_table()
    assert report.first_failing_stage == stage, report.render_table()
    names = [s.name for s in report.stages]
    assert all(s.verdict_passed for s in report.stages[: names.index(stage)]), (
        "stages before the bug must pass"
    )
    assert f"first failing stage: {stage}" in report.render_table().splitlines()[-1]


def load_whole_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """Our model of the checkpoint, every piece holding its weights at once, in eval mode.

    The comparison holds one piece at a time; tests that run our model whole (against transformers'
    own forward, or to read its parameters) load all its pieces the same way: compare.weights's
    load_piece, by the plan prepare_model checked.
    """
    from compare.architectures import prepare_model
    from compare.weights import TensorCache, load_piece

    loaded = prepare_model(model_dir, dtype=dtype)
    tensors = TensorCache(loaded.reader, dtype)
    pieces = ["embeddings", *(f"layer.{i}" for i in range(len(loaded.model.layers))), "final"]
    for piece in pieces:
        for prefix, module in loaded.model.piece_modules(piece):
            load_piece(module, prefix, loaded.plan, loaded.weight_map, tensors)
    tensors.clear()  # the parameters keep what they hold
    return loaded


def remote_code_marker(qwen_v1_dir: str | Path) -> Path:
    """The file ``convert_qwen2_to_qwen_v1``'s tokenizer code would create if it ever ran."""
    path = Path(qwen_v1_dir)
    return path.parent / f"{path.name}.REMOTE-CODE-RAN"


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
