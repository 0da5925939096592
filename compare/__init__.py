"""A transformer encoder written from scratch, loaded with a real checkpoint's weights, and checked
stage by stage against the ``transformers`` library.

The point is code you can read and trust: each piece of the transformer (embeddings, scaled
dot-product attention, multi-head attention, the feed-forward block, residual + LayerNorm) is a few
lines of plain torch, and a comparison shows that, fed the same weights and input, it produces the
same numbers as transformers at every stage, or names the first stage where it does not.

Reading order:

1. ``compare.layers``        the building blocks: activations, LayerNorm, the padding mask, scaled
                             dot-product attention, multi-head attention, feed-forward, Add & Norm.
2. ``compare.config``        config.json -> a typed, validated ``BertConfig``.
3. ``compare.bert``          BERT assembled from the blocks, and its explicit weight map.
4. ``compare.weights``       reading safetensors / pytorch_model.bin (sharded or not) into the model.
5. ``compare.architectures`` the registry: model_type -> (config parser, model class, weight map).
6. ``compare.reference``     transformers, pinned (dtype, eager attention, eval), with forward hooks.
7. ``compare.metrics``       how two tensors are compared, and the pass rule.
8. ``compare.report``        ``ComparisonReport``: JSON and a readable table.
9. ``compare.runner``        ``compare_model_dir``: everything above, in order.

Modules 1-5 import torch only, never transformers. Typical use::

    from compare.runner import compare_model_dir

    report = compare_model_dir("path/to/bert", texts=["the cat sat on the mat", "hello"])
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
