"""The reference, one piece at a time: transformers' own modules, fed the checkpoint's weights piece by
piece, so that a model larger than memory can still be compared.

The whole transformers model is first built on the "meta" device from its config (its classes, its
structure, no storage). Then each piece (the embeddings, one decoder/encoder layer, the final
modules) gets its tensors from the checkpoint, runs exactly as the whole model's forward would run it,
and goes back to "meta". Between the pieces the glue is transformers' own helpers: the mask from
``masking_utils`` (``create_causal_mask``, ``create_sliding_window_causal_mask``,
``create_bidirectional_mask``) and the model's rotary embedding class, called the way each model's
``forward`` calls them (the ``_Steps`` classes below; a test checks that the stages equal those of the
whole model, for every architecture).

The checkpoint is read with transformers' own ``load_state_dict`` (memory-mapped, one file at a time,
only the tensors of the piece kept), not with our compare.weights, so that a mistake in our reading
cannot be shared by both sides; each side also makes its own float32 copy. A parameter of the
transformers model reads the checkpoint tensor whose canonical name (compare.architectures, e.g.
without the ``bert.`` prefix) is its own; a tied LM head reads the embedding matrix, unless the
checkpoint stores the head as well (then, as in from_pretrained, the stored head); for a converted
checkpoint (Qwen v1) the architecture's documented conversion gives the names. Stages are captured
with the same hooks and the same ReferenceLayout as the whole-model reference (compare.reference).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hfmirror.errors import CompareError

from .reference import ReferenceRun, _quiet_transformers, attention_hook, stage_hooks
from .reference_layout import ReferenceLayout

if TYPE_CHECKING:
    from .architectures import Architecture

__all__ = ["StreamedReference"]


# ------------------------------------------------------------------------ how each forward is strung


class _Steps:
    """What a transformers model's ``forward`` does between its pieces, for one family."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the final modules; return the final stages no hook sees."""
        raise NotImplementedError


class _EncoderSteps(_Steps):
    """BertModel / RobertaModel.forward: embeddings, a bidirectional mask, the layers, the pooler."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=model.config, inputs_embeds=embedded, attention_mask=inputs["attention_mask"]
        )

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return layer(hidden, context)

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        if model.pooler is not None:
            model.pooler(hidden)
        return {"last_hidden_state": hidden}  # BertEncoder's output is its last layer's


class _GPT2Steps(_Steps):
    """GPT2Model.forward: token + learned position embeddings, a causal mask, the blocks, ln_f."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        transformer = model.transformer
        ids = inputs["input_ids"]
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        return transformer.drop(transformer.wte(ids) + transformer.wpe(positions))

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(embedded.shape[1]).unsqueeze(0)
        return create_causal_mask(
            config=model.config,
            inputs_embeds=embedded,
            attention_mask=inputs["attention_mask"],
            cache=None,
            position_ids=positions,
        )

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        return layer(hidden, None, context)

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        model.lm_head(model.transformer.ln_f(hidden))
        return {}


class _LlamaSteps(_Steps):
    """LlamaModel / MistralModel / Qwen2Model / Qwen3Model.forward: token embeddings, causal masks
    (sliding-window ones as each model picks them), rotary cos/sin, the layers, the final norm."""

    def embed(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.model.embed_tokens(inputs["input_ids"])

    def context(self, model: nn.Module, embedded: torch.Tensor, inputs: dict[str, torch.Tensor]) -> Any:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        config = model.config
        positions = torch.arange(embedded.shape[1]).unsqueeze(0)
        arguments = {
            "config": config,
            "inputs_embeds": embedded,
            "attention_mask": inputs["attention_mask"],
            "cache": None,
            "position_ids": positions,
        }
        layers = config.num_hidden_layers
        if config.model_type == "mistral":  # one mask for every layer, sliding when the config says so
            mask = (
                create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
            )(**arguments)
            masks = [mask] * layers
        elif "sliding_attention" in (getattr(config, "layer_types", None) or ()):  # Qwen2 / Qwen3
            by_type = {
                "full_attention": create_causal_mask(**arguments),
                "sliding_attention": create_sliding_window_causal_mask(**arguments),
            }
            masks = [by_type[kind] for kind in config.layer_types]
        else:
            masks = [create_causal_mask(**arguments)] * layers
        # The rotary tables are buffers computed at construction: build the model's own class afresh.
        rotary = type(model.model.rotary_emb)(config=config)
        return masks, positions, rotary(embedded, positions)

    def layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, context: Any) -> torch.Tensor:
        masks, positions, position_embeddings = context
        return layer(
            hidden,
            attention_mask=masks[index],
            position_ids=positions,
            position_embeddings=position_embeddings,
        )

    def finish(self, model: nn.Module, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        model.lm_head(model.model.norm(hidden))
        return {}


_STEPS: dict[str, _Steps] = {"encoder": _EncoderSteps(), "gpt2": _GPT2Steps(), "llama": _LlamaSteps()}

# Non-persistent buffers of a piece are not in the checkpoint; these are rebuilt as their modules'
# constructors make them (BertEmbeddings, RobertaEmbeddings).
_BUFFERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "position_ids": lambda meta: torch.arange(meta.shape[-1]).expand(meta.shape),
    "token_type_ids": lambda meta: torch.zeros(meta.shape, dtype=torch.long),
}


# ----------------------------------------------------------------------------------------- reference


class StreamedReference:
    """transformers' model for ``model_dir``, run one piece at a time (see the module docstring).

    Raises (on construction):
        CompareError: transformers cannot build the model, or a parameter of it has no tensor in the
            checkpoint.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        architecture: Architecture,
        config: Any,
        dtype: torch.dtype,
        files: list[Path],
        options: dict[str, Any] | None = None,
    ) -> None:
        import transformers
        from transformers.modeling_utils import load_state_dict

        self.layout: ReferenceLayout = architecture.reference
        self.steps = _STEPS[self.layout.steps]
        conversion = architecture.conversion
        try:
            with _quiet_transformers():
                if conversion is None:
                    reference_config = transformers.AutoConfig.from_pretrained(
                        str(model_dir), trust_remote_code=False
                    )
                else:
                    reference_config = transformers.AutoConfig.for_model(**conversion.config(config))
                auto_class = getattr(transformers, self.layout.model_class)
                with torch.device("meta"):  # the structure only; each piece gets its tensors when it runs
                    self.model = auto_class.from_config(
                        reference_config,
                        attn_implementation="eager",
                        dtype=dtype,
                        **architecture.reference_kwargs(options or {}),
                    ).eval()
        except Exception as error:
            raise CompareError(
                f"transformers could not build the model of {model_dir}: {type(error).__name__}: {error}"
            ) from error
        self.dtype = dtype
        self._load_state_dict = load_state_dict
        self._headers = {path: load_state_dict(str(path), map_location="meta") for path in files}  # no data
        self._file_of = {name: path for path, header in self._headers.items() for name in header}
        self._sources = self._find_sources(architecture)

    def _find_sources(
        self, architecture: Architecture
    ) -> dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """Parameter name -> (checkpoint tensor name, how to turn that tensor into the parameter)."""
        found: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
        conversion = architecture.conversion
        if conversion is not None:
            for raw, meta in ((raw, self._headers[path][raw]) for raw, path in self._file_of.items()):
                for name, _ in conversion.tensors([(raw, meta)]):
                    found[name] = (
                        raw,
                        lambda t, raw=raw, name=name: dict(conversion.tensors([(raw, t)]))[name],
                    )
        else:
            by_canonical = {architecture.canonical_name(raw): raw for raw in self._file_of}
            for name, _ in self.model.named_parameters(remove_duplicate=False):
                raw = by_canonical.get(architecture.canonical_name(name))
                if raw is not None:
                    found[name] = (raw, lambda t: t)
        # Tied parameters (an LM head and the token embeddings), as from_pretrained ties them: only
        # what the checkpoint does not store is filled in from the other. A head stored beside the
        # embeddings was found above and is used as stored (transformers unties a stored head that
        # differs, and ties an equal one: the same numbers); a checkpoint storing the head alone
        # gives the embeddings the head's tensor (transformers' "swap").
        for tied, source in getattr(self.model, "all_tied_weights_keys", {}).items():
            if tied not in found and source in found:
                found[tied] = found[source]
            elif source not in found and tied in found:
                found[source] = found[tied]
        missing = [
            name for name, _ in self.model.named_parameters(remove_duplicate=False) if name not in found
        ]
        if missing:
            raise CompareError(
                f"the reference's parameter(s) {', '.join(missing[:5])} have no tensor in the checkpoint"
            )
        return found

    # ---------------------------------------------------------------------------------- the pieces

    def _read(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors ``names``, converted to the compared dtype, read with transformers'
        ``load_state_dict`` one file at a time (the rest of each file is dropped at once)."""
        tensors = {}
        for path in dict.fromkeys(self._file_of[name] for name in names):
            state = self._load_state_dict(str(path))  # memory-mapped: nothing read until used
            tensors |= {name: state[name].to(self.dtype) for name in names if name in state}
            del state
        return tensors

    @contextlib.contextmanager
    def _loaded(self, paths: tuple[str, ...]) -> Iterator[None]:
        """The modules at ``paths`` hold their checkpoint tensors while the block runs, then go back
        to "meta" (so their memory is freed)."""
        present = []
        for path in paths:
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                continue  # an optional module (BERT's pooler) this checkpoint does not have
            if module is not None:
                present.append((path, module))
        wanted = {
            full: source
            for full, source in self._sources.items()
            if any(full.startswith(f"{p}.") for p, _ in present)
        }
        tensors = self._read({raw for raw, _ in wanted.values()})
        for path, module in present:
            prefix = f"{path}."
            state = {
                full[len(prefix) :]: convert(tensors[raw])
                for full, (raw, convert) in wanted.items()
                if full.startswith(prefix)
            }
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as error:
                raise CompareError(f"the checkpoint does not fit the reference's {path}: {error}") from error
            for name, buffer in list(module.named_buffers()):
                if buffer.is_meta:
                    self._rebuild_buffer(module, path, name, buffer)
        del tensors  # the modules hold what they need
        try:
            yield
        finally:
            for _, module in present:
                module.to("meta")

    @staticmethod
    def _rebuild_buffer(module: nn.Module, path: str, name: str, meta: torch.Tensor) -> None:
        owner_path, _, short = name.rpartition(".")
        if short not in _BUFFERS:
            raise CompareError(f"cannot rebuild the buffer {path}.{name} of the reference")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner._buffers[short] = _BUFFERS[short](meta)

    def embeddings(
        self, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """Run the embeddings: (their output, the context every layer needs, their stages)."""
        stages: dict[str, torch.Tensor] = {}
        with (
            self._loaded(self.layout.embedding_modules),
            stage_hooks(self.model, self.layout.embeddings, "", stages),
            torch.no_grad(),
        ):
            hidden = self.steps.embed(self.model, inputs)
            context = self.steps.context(self.model, hidden, inputs)
        return hidden.detach(), context, stages

    def layer(
        self,
        index: int,
        hidden: torch.Tensor,
        context: Any,
        *,
        keep_attention: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Run layer ``index`` on ``hidden``: (its output, its stages, its attention weights if asked)."""
        path = f"{self.layout.layers}.{index}"
        layer = self.model.get_submodule(path)
        stages: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as hooks:
            hooks.enter_context(self._loaded((path,)))
            hooks.enter_context(stage_hooks(layer, self.layout.layer, f"layer.{index}.", stages))
            if keep_attention:
                hooks.enter_context(attention_hook(layer, self.layout, "weights", weights))
            with torch.no_grad():
                output = self.steps.layer(layer, index, hidden, context)
        return output.detach(), stages, weights.get("weights")

    def final(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the final modules on the last layer's output: their stages."""
        stages: dict[str, torch.Tensor] = {}
        with (
            self._loaded(self.layout.final_modules),
            stage_hooks(self.model, self.layout.final, "", stages),
            torch.no_grad(),
        ):
            stages |= self.steps.finish(self.model, hidden)
        order = [point.stage for point in self.layout.final]
        return {name: stages[name] for name in order if name in stages}

    def stages(self, inputs: dict[str, torch.Tensor], *, keep_attention: bool = False) -> ReferenceRun:
        """Every stage of one forward pass, run piece by piece (what compare.reference.reference_stages
        gives for the whole model at once)."""
        run = ReferenceRun(stages={}, attention={})
        hidden, context, run.stages = self.embeddings(inputs)
        for index in range(len(self.model.get_submodule(self.layout.layers))):
            hidden, stages, weights = self.layer(index, hidden, context, keep_attention=keep_attention)
            run.stages |= stages
            if weights is not None:
                run.attention[f"layer.{index}"] = weights
        run.stages |= self.final(hidden)
        return run
