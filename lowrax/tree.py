"""Pure functions over a wrapped parameter tree: split, combine, label, merge, unmerge.

    trainable, frozen = split(params)     # same structure; each half has None where the other has a leaf
    params = combine(trainable, frozen)
    merged = merge(params)                # plain arrays again: base + scale * A @ B (NF4 bases dequantized)
    params = unmerge(merged, params)      # adapters back, base recovered as merged - scale * A @ B

All of them are jit-able and keep sharding (they only restructure or add arrays).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrax.nodes import FullyTrained, LoraKernel

FROZEN, LORA_A, LORA_B, FULL = "frozen", "lora_a", "lora_b", "full"


def _is_node(x: Any) -> bool:
    return isinstance(x, (LoraKernel, FullyTrained))


def labels(params: Any) -> Any:
    """A tree of optax labels with the structure of `params`' array leaves:
    `lora_a`, `lora_b`, `full` (trained in full) or `frozen`."""

    def label(x):
        if isinstance(x, LoraKernel):
            return LoraKernel(base=jax.tree.map(lambda _: FROZEN, x.base), a=LORA_A, b=LORA_B,
                              dropout_key=None, scale=x.scale, dropout=x.dropout)
        if isinstance(x, FullyTrained):
            return FullyTrained(FULL)
        return FROZEN

    return jax.tree.map(label, params, is_leaf=_is_node)


def split(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like params, holding None where a leaf belongs to the other."""
    lab = labels(params)
    trainable = jax.tree.map(lambda x, l: None if l == FROZEN else x, params, lab)
    frozen = jax.tree.map(lambda x, l: x if l == FROZEN else None, params, lab)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`: the leaf from whichever half has one."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def merge(params: Any) -> Any:
    """Plain-array params: every LoRA kernel becomes base + scale * A @ B (in the base's dtype)."""

    def merge_node(x):
        if isinstance(x, LoraKernel):
            base = _dense(x.base)
            return (base.astype(jnp.float32) + x.delta()).astype(base.dtype)
        if isinstance(x, FullyTrained):
            return x.value
        return x

    from lowrax.quant.nf4 import NF4Tensor

    return jax.tree.map(lambda x: _dense(x) if isinstance(x, NF4Tensor) else merge_node(x), params,
                        is_leaf=lambda x: _is_node(x) or isinstance(x, NF4Tensor))


def _dense(base):
    """A kernel as a plain array: NF4 bases are dequantized (to the dtype they were quantized from)."""
    from lowrax.quant.nf4 import NF4Tensor, dequantize

    return dequantize(base) if isinstance(base, NF4Tensor) else base


def unmerge(merged: Any, adapted: Any) -> Any:
    """Put the adapters of `adapted` back over `merged` plain weights: base = merged - scale * A @ B."""

    def unmerge_node(m, x):
        if isinstance(x, LoraKernel):
            base = (m.astype(jnp.float32) - x.delta()).astype(m.dtype)
            return x.replace(base=base)
        if isinstance(x, FullyTrained):
            return FullyTrained(m)
        return m

    return jax.tree.map(unmerge_node, merged, adapted, is_leaf=lambda x: not isinstance(x, dict))


def with_dropout_keys(params: Any, key) -> Any:
    """Give every LoRA node with dropout its own key for this step (a pure function of `key`)."""
    counter = iter(range(1 << 30))

    def attach(x):
        if isinstance(x, LoraKernel) and x.dropout > 0.0:
            return x.replace(dropout_key=jax.random.fold_in(key, next(counter)))
        return x

    return jax.tree.map(attach, params, is_leaf=_is_node)


def count_params(tree: Any) -> int:
    """Number of scalars in the array leaves of a (possibly partial) tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, "size"))
