"""Which from-scratch implementation goes with which checkpoint: the registry, keyed by model_type.

One :class:`Architecture` entry owns everything about a kind of model: how its config.json is parsed,
our model class, the weight map from our parameters to the checkpoint's tensors, how checkpoint
names vary (task-head prefixes, old names, buffers to ignore), which of our functions computes each
stage (the HTML report names them), and the reference side: which transformers class loads it,
where it computes each stage (a compare.reference_layout ReferenceLayout), and, when transformers
cannot load the checkpoint as it is, the conversion that makes it loadable (Qwen v1). Adding an
architecture is its module plus one entry here.

Only torch is imported; never transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfmirror.errors import UnsupportedModelError

from .bert import BERT_REFERENCE, BERT_STAGE_FUNCTIONS, BertModel, bert_weight_map
from .config import BertConfig, read_config_json
from .gpt2 import GPT2_REFERENCE, GPT2_STAGE_FUNCTIONS, GPT2Config, GPT2Model, gpt2_weight_map
from .llama import LLAMA_REFERENCE, LLAMA_STAGE_FUNCTIONS, LlamaConfig, LlamaModel, llama_weight_map
from .model import TransformerModel
from .qwen import (
    QWEN_IGNORED,
    QWEN_REFERENCE,
    QWEN_STAGE_FUNCTIONS,
    QwenConfig,
    QwenModel,
    qwen2_reference_config,
    qwen2_reference_tensors,
    qwen_weight_map,
)
from .reference_layout import ReferenceConversion, ReferenceLayout
from .roberta import RobertaConfig, RobertaModel
from .weights import CheckpointReader, WeightMap, checkpoint_files, plan_weights, tie_like_transformers

__all__ = [
    "REGISTRY",
    "Architecture",
    "LoadedModel",
    "architecture_for",
    "prepare_model",
    "supported_model_types",
]

_PLAIN_REFERENCE = "transformers {model_class}, eager attention, eval, no_grad"
_OUR_LM_HEAD = "lm_head.weight"  # compare.model.CausalLanguageModel.lm_head


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build, load and check one kind of model."""

    model_type: str  # config.json's "model_type"
    parse_config: Callable[[dict[str, Any]], Any]  # raw config.json -> typed, validated config
    model_class: Callable[..., TransformerModel]  # (config, **options) -> our model
    weight_map: Callable[..., WeightMap]  # (config, **options) -> {our name: checkpoint tensor}
    reference: ReferenceLayout  # where transformers computes each stage
    # Where our code computes each stage (stage name, "{i}" for every layer -> the function), shown
    # in the HTML report's stage table.
    stage_functions: Mapping[str, Callable[..., Any]]
    base_prefix: str = ""  # prefix of the base model's tensors in task checkpoints ("bert.")
    head_prefixes: tuple[str, ...] = ()  # task heads outside what we compare: ignored
    ignored: tuple[str, ...] = ()  # regular expressions: non-learned buffers some checkpoints carry
    legacy_suffixes: dict[str, str] = field(default_factory=dict)  # old name ending -> current one
    # Options that depend on which tensors the checkpoint has (e.g. a pooler or not).
    detect_options: Callable[[set[str]], dict[str, Any]] = lambda names: {}
    # Extra from_pretrained arguments for the reference, from those options.
    reference_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = lambda options: {}
    # Set when transformers cannot load the checkpoint as it is (see compare.qwen).
    conversion: ReferenceConversion | None = None
    uses_token_types: bool = False  # the input carries segment ids (encoders)
    causal: bool = False  # a decoder: each position attends to itself and the positions before it
    # The checkpoint name of the LM head's weight (after canonical_name), for models whose last stage
    # is next-token logits: a checkpoint may store it even when config.json ties it to the
    # embeddings (see compare.weights.tie_like_transformers).
    lm_head: str | None = None

    @property
    def has_lm_head(self) -> bool:
        """Whether the model ends in next-token logits (then next-token agreement is measured)."""
        return self.lm_head is not None

    def canonical_name(self, name: str) -> str | None:
        """A checkpoint tensor name as the weight map spells it, or None for a tensor to ignore."""
        if name.startswith(self.head_prefixes):
            return None  # e.g. cls.predictions.* of BertForPreTraining: not part of the encoder
        name = name.removeprefix(self.base_prefix)
        if any(re.fullmatch(pattern, name) for pattern in self.ignored):
            return None
        for old, new in self.legacy_suffixes.items():
            if name.endswith(old):
                return name[: -len(old)] + new
        return name

    def describe_reference(self) -> str:
        """What the numbers are compared against, in one sentence for the report."""
        if self.conversion is not None:
            return self.conversion.description
        return _PLAIN_REFERENCE.format(model_class=self.reference.model_class)


def _pooler_option(names: set[str]) -> dict[str, Any]:
    # BertForMaskedLM checkpoints have no pooler; BertModel and BertForPreTraining do.
    return {"with_pooler": any(name.startswith("pooler.") for name in names)}


def _pooler_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    return {"add_pooling_layer": options.get("with_pooler", True)}


def _encoder(
    model_type: str, config_class: type, model_class: type, base_prefix: str, heads: tuple
) -> Architecture:
    """BERT and the encoders laid out like it."""
    return Architecture(
        model_type=model_type,
        parse_config=config_class.from_dict,
        model_class=model_class,
        weight_map=bert_weight_map,
        reference=BERT_REFERENCE,
        stage_functions=BERT_STAGE_FUNCTIONS,
        base_prefix=base_prefix,
        head_prefixes=heads,
        ignored=(r"(.*\.)?position_ids", r"(.*\.)?token_type_ids"),
        # TensorFlow-era checkpoints call LayerNorm's scale and shift gamma and beta.
        legacy_suffixes={"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"},
        detect_options=_pooler_option,
        reference_kwargs=_pooler_kwargs,
        uses_token_types=True,
    )


def _llama_family(model_type: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        parse_config=LlamaConfig.from_dict,
        model_class=LlamaModel,
        weight_map=llama_weight_map,
        reference=LLAMA_REFERENCE,
        stage_functions=LLAMA_STAGE_FUNCTIONS,
        base_prefix="model.",
        head_prefixes=("score.",),
        ignored=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),  # old checkpoints saved it
        causal=True,
        lm_head="lm_head.weight",
    )


QWEN_CONVERSION = ReferenceConversion(
    description=(
        "transformers Qwen2ForCausalLM (eager attention, eval, no_grad) holding this Qwen v1 checkpoint "
        "through compare.qwen's conversion (c_attn split into q/k/v; w2 -> gate_proj, w1 -> up_proj, "
        "c_proj -> down_proj): Qwen's own modelling code is remote code for transformers < 4.38 and "
        "does not run on transformers 5"
    ),
    model_class="Qwen2ForCausalLM",
    config=qwen2_reference_config,
    tensors=qwen2_reference_tensors,
)

REGISTRY: dict[str, Architecture] = {
    "bert": _encoder("bert", BertConfig, BertModel, "bert.", ("cls.", "classifier.", "qa_outputs.")),
    "roberta": _encoder(
        "roberta", RobertaConfig, RobertaModel, "roberta.", ("lm_head.", "classifier.", "qa_outputs.")
    ),
    "xlm-roberta": _encoder(
        "xlm-roberta", RobertaConfig, RobertaModel, "roberta.", ("lm_head.", "classifier.", "qa_outputs.")
    ),
    "gpt2": Architecture(
        model_type="gpt2",
        parse_config=GPT2Config.from_dict,
        model_class=GPT2Model,
        weight_map=gpt2_weight_map,
        reference=GPT2_REFERENCE,
        stage_functions=GPT2_STAGE_FUNCTIONS,
        base_prefix="transformer.",
        head_prefixes=("score.", "multiple_choice_head."),
        # The causal mask, saved as a buffer by old versions of transformers (the hub's gpt2 has it).
        ignored=(r"h\.\d+\.attn\.(bias|masked_bias)",),
        causal=True,
        lm_head="lm_head.weight",
    ),
    **{model_type: _llama_family(model_type) for model_type in ("llama", "mistral", "qwen2", "qwen3")},
    "qwen": Architecture(
        model_type="qwen",
        parse_config=QwenConfig.from_dict,
        model_class=QwenModel,
        weight_map=qwen_weight_map,
        reference=QWEN_REFERENCE,
        stage_functions=QWEN_STAGE_FUNCTIONS,
        base_prefix="transformer.",
        ignored=QWEN_IGNORED,
        conversion=QWEN_CONVERSION,
        causal=True,
        lm_head="lm_head.weight",
    ),
}


def supported_model_types() -> list[str]:
    """The model_type values with a from-scratch implementation."""
    return sorted(REGISTRY)


def architecture_for(raw_config: dict[str, Any]) -> Architecture:
    """The registry entry for a parsed config.json.

    Raises:
        UnsupportedModelError: its model_type has no implementation; the message lists those that do.
    """
    model_type = raw_config.get("model_type")
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return REGISTRY[model_type]


@dataclass
class LoadedModel:
    """A from-scratch model, what it was built from, and how its weights are read.

    Made by :func:`prepare_model`, the model is on the "meta" device (shapes only); its pieces get
    their weights as they are needed (compare.weights.load_piece, by ``plan``).
    """

    model: TransformerModel
    config: Any
    architecture: Architecture
    options: dict[str, Any]
    reader: CheckpointReader  # the checkpoint's weight files (reader.files), read one tensor at a time
    weight_map: WeightMap = field(default_factory=dict)
    plan: dict[str, str] = field(default_factory=dict)  # our parameter -> checkpoint tensor name


def prepare_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Our implementation of the checkpoint in ``model_dir``, on "meta", with the checkpoint checked
    against its weight map (names, shapes, dtypes, from the files' headers; no data read yet).

    Raises:
        CompareError: no or malformed config.json.
        UnsupportedModelError: a model_type (or variant) we do not implement.
        WeightLoadError: a missing, unexpected or wrongly shaped tensor.
    """
    raw_config = read_config_json(model_dir)
    architecture = architecture_for(raw_config)
    config = architecture.parse_config(raw_config)
    reader = CheckpointReader(checkpoint_files(model_dir))
    names = {name for name in map(architecture.canonical_name, reader.names()) if name is not None}
    options = architecture.detect_options(names)

    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        model = architecture.model_class(config, **options).to(dtype)
    model.requires_grad_(False)
    weight_map = architecture.weight_map(config, **options)
    if architecture.lm_head is not None:
        weight_map = tie_like_transformers(
            weight_map, names, parameter=_OUR_LM_HEAD, name=architecture.lm_head
        )
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    plan = plan_weights(reader, weight_map, shapes, rename=architecture.canonical_name)
    return LoadedModel(
        model=model.eval(),
        config=config,
        architecture=architecture,
        options=options,
        reader=reader,
        weight_map=weight_map,
        plan=plan,
    )
