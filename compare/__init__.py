"""Transformers written from scratch, loaded with a real checkpoint's weights, and checked stage by
stage against the ``transformers`` library: BERT, RoBERTa/XLM-RoBERTa, GPT-2, the Llama family
(Llama, Mistral, Qwen2, Qwen3) and Qwen v1.

The point is code you can read and trust: each piece of the transformer (embeddings, attention in
its variants, the feed-forward blocks, the norms, the residual wiring) is a few lines of plain torch,
and a comparison shows that, fed the same weights and input, it produces the same numbers as
transformers at every stage, or names the first stage where it does not.

Reading order:

1. ``compare.model``            the shape every model shares (embeddings -> layers -> final), the
                                per-input Context, and the Recorder that reports stages.
2. ``compare.layers``           the building blocks: activations, LayerNorm and RMSNorm, masks, the
                                three ways of giving positions, rotary embedding, attention (multi-head,
                                grouped-query, fused), feed-forward and SwiGLU, the residual wiring.
3. ``compare.config``           config.json -> typed, validated fields (and BERT's config).
4. the models, each with its config, weight map and where transformers computes each stage:
   ``compare.bert``             BERT;
   ``compare.roberta``          RoBERTa's positions;
   ``compare.gpt2``             GPT-2;
   ``compare.llama``            Llama, Mistral, Qwen2, Qwen3 (one module);
   ``compare.qwen``             Qwen v1, and its conversion for the reference.
5. ``compare.weights``          reading safetensors / pytorch_model.bin (sharded or not) into the model.
6. ``compare.architectures``    the registry: model_type -> everything about that architecture.
7. ``compare.reference``        transformers, pinned (dtype, eager attention, eval), with forward hooks
                                at the places each architecture's ReferenceLayout names; the tokenizer.
8. ``compare.reference_stream`` the same transformers model, run one piece at a time.
9. ``compare.metrics``          how two tensors are compared, the pass rule, NMSE and p99, next-token
                                agreement and KL.
10. ``compare.streaming``       the comparison piece by piece: each stage carried and isolated.
11. ``compare.report``          ``ComparisonReport``: the verdict, JSON and a readable table.
12. ``compare.runner``          ``compare_model_dir``: everything above, in order.
13. ``compare.html_report``     the report as one page (with ``compare.html_attention`` and
                                ``compare.html_figures``, which draw it).

Everything except compare.reference, compare.reference_stream, compare.streaming and compare.runner
imports torch only, never transformers (and those import it only when a comparison runs).
Typical use::

    from compare.runner import compare_model_dir

    report = compare_model_dir("path/to/model", texts=["the cat sat on the mat", "hello"])
    print(report.render_table())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["compare_model_dir"]

if TYPE_CHECKING:
    from .runner import compare_model_dir


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one module (say compare.layers) does not import the reference side.
    if name == "compare_model_dir":
        from .runner import compare_model_dir

        return compare_model_dir
    raise AttributeError(f"module 'compare' has no attribute {name!r}")
