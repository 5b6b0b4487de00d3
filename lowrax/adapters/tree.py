"""Pure functions over a wrapped parameter tree: split, combine, label, merge, unmerge.

    trainable, frozen = split(params)     # same structure; each half has None where the other has a leaf
    params = combine(trainable, frozen)
    merged = merge(params)                # plain arrays again (NF4 bases dequantized)
    params = unmerge(merged, params)      # adapters back over merged weights

All of them are jit-able and keep sharding (they only restructure or add arrays).
They work on every adapter node type through the interface in `lowrax.core.node`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrax.core.slot_directory import SLOTS_KEY
from lowrax.core.node import ANCHOR, FROZEN, FULL, LORA_A, LORA_B, VECTOR, FullyTrained, is_adapter, is_node, resolve
from lowrax.adapters.registry import shared_keys
from lowrax.errors import LowraxError
from lowrax.core.kernels import dense_kernel, is_kernel_type, keep_merged

__all__ = ["FROZEN", "LORA_A", "LORA_B", "VECTOR", "FULL", "ANCHOR", "labels", "split", "combine", "merge",
           "unmerge", "adapters_off", "with_dropout_keys", "count_params", "after_update", "precondition_grads", "penalty"]


def labels(params: Any) -> Any:
    """A tree of optax labels with the structure of `params`' array leaves: `lora_a`,
    `lora_b`, `vector` (DoRA magnitudes, VeRA scalings), `anchor` (carried in the
    trainable half, never given an update: Delta-LoRA's reference product, AdaLoRA's
    allocator state), `singular` (AdaLoRA's singular values),
    `full` (trained in full) or `frozen`."""

    def label(x):
        if is_adapter(x):
            named = x.field_labels()
            return x.replace(**{f: jax.tree.map(lambda _, lab=named.get(f, FROZEN): lab, getattr(x, f))
                                for f in _array_fields(x)})
        if isinstance(x, FullyTrained):
            return FullyTrained(FULL)
        return FROZEN

    return jax.tree.map(label, params, is_leaf=is_node)


def _array_fields(node) -> list[str]:
    return [f.name for f in dataclasses.fields(node) if f.metadata.get("pytree_node", True)]


def split(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen): two trees shaped like params, holding None where a leaf belongs to the other."""
    lab = labels(params)
    trainable = jax.tree.map(lambda x, l: None if l == FROZEN else x, params, lab)
    frozen = jax.tree.map(lambda x, l: x if l == FROZEN else None, params, lab)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `split`: the leaf from whichever half has one."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def without_shared(tree: Any) -> Any:
    """The tree less the top-level arrays adapters share across layers (the methods' `shared_keys`)
    and the named adapters' slot directory."""
    return {k: v for k, v in tree.items() if k not in shared_keys() + (SLOTS_KEY,)} if isinstance(tree, dict) else tree


def adapters_off(params: Any, *, allow_moving_base: bool = False) -> Any:
    """The tree with every adapter switched off: each node replaced by what its method leaves
    in its place (the frozen base kernel, or nothing for adapters that add to the model),
    the same arrays and no copy. Inside a step this is the reference model of preference
    tuning, computed from the weights the policy already holds.

    A fully-trained module (modules_to_save) keeps no original, and Delta-LoRA moves its base
    during training: both are refused (allow_moving_base: accept the latter, for a reference
    taken before the first step)."""

    def off(x):
        if isinstance(x, FullyTrained):
            raise LowraxError("this tree trains a module in full (modules_to_save), which keeps no copy of the "
                              "original, so switching adapters off cannot give the pretrained model")
        if is_adapter(x):
            if x.base_moves and not allow_moving_base:
                raise LowraxError(f"{type(x).__name__} changes its base weights while training, so the adapter-off "
                                  "model is not the model training started from: precompute the reference instead")
            return x.switched_off()
        return x

    out = without_shared(params)  # switched off, no node reads the methods' shared arrays (VB-LoRA's trained bank)
    return jax.tree.map(off, out, is_leaf=is_node)


def _is_adapted_layer(x: Any) -> bool:
    return isinstance(x, dict) and is_adapter(x.get("kernel"))


def _refuse_unmergeable(params: Any) -> None:
    for leaf in jax.tree.leaves(params, is_leaf=is_node):
        if is_adapter(leaf) and not leaf.mergeable:
            reason = getattr(leaf, "unmergeable_reason", "adapters add virtual tokens to the input rather than "
                                                         "change weights")
            raise LowraxError(f"{leaf.peft_type} {reason}, so they cannot be merged: use the run or adapter as it "
                              "is (lowrax generate --adapter)")


def merged_bias(node: Any, layer: dict) -> dict:
    """{"bias": what merging makes of the layer's bias}, or {} for a layer without one; refused where
    the method's merge lives in the bias (BEFT) and the layer has none."""
    if layer.get("bias") is None:
        if node.merges_into_bias:
            raise LowraxError(f"{node.peft_type} trains a bias for a layer of shape {tuple(node.shape)} that has "
                              "no bias of its own to merge it into (PEFT refuses the same): use the adapter unmerged")
        return {}
    return {"bias": node.merge_bias(layer["bias"].astype(jnp.float32)).astype(layer["bias"].dtype)}


def merge(params: Any, keep_sparsity: bool = True) -> Any:
    """Plain-array params: every adapter node becomes its merged kernel (in the base's dtype),
    and the layer's bias what the method makes of it (IA3 scales some).

    keep_sparsity: over a pruned base (a SparseKernel) the merged kernel stays zero at the
    pruned weights (the adapter's delta there is dropped); False merges the delta in full,
    filling them."""
    _refuse_unmergeable(params)

    def merge_leaf(x):
        return dense_kernel(x)

    def merge_layer(layer):
        if not _is_adapted_layer(layer):
            return jax.tree.map(merge_leaf, layer, is_leaf=is_kernel_type)
        node = layer["kernel"]
        base = dense_kernel(node.base)
        merged = node.merge_into(base.astype(jnp.float32))
        if keep_sparsity:
            merged = keep_merged(node.base, merged)
        return dict(layer, kernel=merged.astype(base.dtype), **merged_bias(node, layer))

    return without_shared(jax.tree.map(merge_layer, resolve(params),
                                       is_leaf=lambda x: _is_adapted_layer(x) or is_kernel_type(x)))


def unmerge(merged: Any, adapted: Any) -> Any:
    """Put the adapters of `adapted` back over `merged` plain weights (the inverse of `merge`)."""
    _refuse_unmergeable(adapted)
    bound = resolve(adapted)

    def unmerge_layer(m, x, kept):
        if _is_adapted_layer(x):
            node = x["kernel"]
            w = dense_kernel(node.base).astype(jnp.float32)
            out = dict(kept, kernel=kept["kernel"].replace(
                base=node.unmerge_from(m["kernel"].astype(jnp.float32), w).astype(m["kernel"].dtype)))
            if m.get("bias") is not None:
                out["bias"] = node.unmerge_bias(m["bias"].astype(jnp.float32)).astype(m["bias"].dtype)
            return out
        def restore(mm, kk):
            if isinstance(kk, FullyTrained):
                return FullyTrained(mm)
            return kk.with_value(mm) if getattr(kk, "stands_for_array", False) else mm

        return jax.tree.map(restore, m, kept, is_leaf=lambda v: isinstance(v, FullyTrained))

    # `kept` is the node as stored (shared arrays unbound); `bound` has them for the arithmetic.
    out = jax.tree.map(unmerge_layer, merged, without_shared(bound), without_shared(adapted),
                       is_leaf=lambda x: not isinstance(x, dict) or "kernel" in x)
    if isinstance(adapted, dict):
        out.update({k: adapted[k] for k in shared_keys() + (SLOTS_KEY,) if k in adapted})
    return out


def with_dropout_keys(params: Any, key) -> Any:
    """Give every adapter node with dropout (or that samples noise while training, as PVeRA) its own key
    for this step (a pure function of `key`)."""
    counter = iter(range(1 << 30))

    def attach(x):
        if is_adapter(x) and (getattr(x, "dropout", 0.0) > 0.0 or getattr(x, "samples_in_training", False)):
            return x.replace(dropout_key=jax.random.fold_in(key, next(counter)))
        return x

    return jax.tree.map(attach, params, is_leaf=is_node)


def precondition_grads(grads: Any, params: Any) -> Any:
    """Let adapter nodes rewrite their own gradients before the optimizer sees them
    (LoRA-FA's projected B gradient). grads: the trainable half's gradients; params: the
    whole tree."""

    def visit(g, p):
        if g is not None and hasattr(p, "precondition_grad"):
            return p.precondition_grad(g)
        return g

    return jax.tree.map(visit, grads, params, is_leaf=lambda x: x is None or is_node(x))


def after_update(trainable: Any, step, grads: Any = None) -> Any:
    """Let adapter nodes apply rules outside the gradient step: each node's own
    (`after_update`, Delta-LoRA's anchor), then each node type's rule over all its nodes
    (`after_update_all`, AdaLoRA's rank budget, given the step's `grads`, shaped like
    `trainable`). `step`: optimizer steps done, this update included."""
    trainable = jax.tree.map(lambda x: x.after_update(step) if hasattr(x, "after_update") else x, trainable,
                             is_leaf=is_node)
    leaves, treedef = jax.tree.flatten(trainable, is_leaf=is_node)
    collective = [i for i, x in enumerate(leaves) if hasattr(x, "after_update_all")]
    if not collective:
        return trainable
    if grads is None:
        raise LowraxError(f"{type(leaves[collective[0]]).__name__} updates from the step's gradients: "
                          "pass grads to after_update")
    grad_leaves = treedef.flatten_up_to(grads)
    for kind in {type(leaves[i]) for i in collective}:
        mine = [i for i in collective if type(leaves[i]) is kind]
        for i, node in zip(mine, kind.after_update_all([leaves[i] for i in mine], [grad_leaves[i] for i in mine], step)):
            leaves[i] = node
    return jax.tree.unflatten(treedef, leaves)


def penalty(params: Any) -> jnp.ndarray | None:
    """The regulariser the loss adds for the adapter nodes that define one (`penalty()`):
    their weighted sums over their total count; None when no node has one."""
    terms = [x.penalty() for x in jax.tree.leaves(params, is_leaf=is_node) if hasattr(x, "penalty")]
    if not terms:
        return None
    return sum(t for t, _ in terms) / sum(c for _, c in terms)


def count_params(tree: Any) -> int:
    """Number of scalars in the array leaves of a (possibly partial) tree."""
    return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def count_trained(trainable: Any) -> int:
    """Scalars that receive updates: the trainable half less `anchor` leaves (state, not weights)."""
    lab = labels(trainable)
    return sum(int(x.size) for x, l in zip(jax.tree.leaves(trainable), jax.tree.leaves(lab)) if l != ANCHOR)
