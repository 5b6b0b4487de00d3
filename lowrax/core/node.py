"""What an adapter node is: the interface every adapter method's node types implement.

An adapter is a leaf of the parameter tree: wrapping replaces a kernel array by
a node (a `flax.struct.dataclass`) that holds the frozen `base` and the
adapter's own arrays. The tree's names never change, so a pristine checkpoint
can always be loaded and the adapters combined back in. Generic code (the tree
functions, the train step, the optimizer, sharding, PEFT I/O) sees a node only
through `AdapterNode`'s methods below; it never names a node type.

Subclassing `AdapterNode` registers the type (`is_adapter`). Model code reaches
a node through `models.linear.linear(x, layer)`, which calls `node.project(x,
bias)` on the layer's flattened input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.core.dropout import inverted_dropout
from lowrax.errors import LowraxError

# Optax labels of array leaves (see `adapters.tree.labels`): the optimizer groups by them.
FROZEN, LORA_A, LORA_B, VECTOR, FULL, ANCHOR = "frozen", "lora_a", "lora_b", "vector", "full", "anchor"
FACTOR = "factor"  # a factor of another method's weight delta (LoHa, LoKr): the base learning rate
ROTATION = "rotation"  # the parameters of a learned rotation (OFT): the base learning rate
PROMPT = "prompt"  # a prompt-learning adapter's table and encoder: the base learning rate
SINGULAR = "singular"  # AdaLoRA's singular values: 1-D here, a matrix (r, 1) to PEFT's LoRA+ grouping

ADAPTER_TYPES: list[type] = []


class AdapterNode:
    """Base class of adapter node types. A node has a `base` field (the frozen kernel
    [in, out], a plain array or an NF4 node) and its own array fields.

    Required of a subclass:
        field_labels()             {field name: optax label} of its trained fields (the rest are FROZEN)
        field_axes()               {field name: logical axes} of its array fields other than `base`, in
                                   the adapted kernel's terms "in", "out" and "lora_rank", or None (replicated)
        apply(x)                   x [n, in] -> [n, out]: the adapted `x @ kernel`, without the bias
        merge_into(w)              the merged float32 kernel, given the dense float32 base w
        unmerge_from(m, w)         the float32 base that merges to m (w: the node's own dense base)
        peft_type                  class attribute: the PEFT format that writes it ("LORA", "IA3", ...)

    Optional, with defaults here:
        project(x, bias)           the layer's output (methods that scale the bias too override it)
        merge_bias / unmerge_bias  what merging does to the layer's bias
        merges_into_bias           True when merging needs the layer's own bias (BEFT's trained bias):
                                   merging a layer without one is refused
        rides_along                True for a node another method's PEFT file can carry (trainable
                                   tokens beside LoRA: its format's `write_carried` / `read_carried`)
        dropout, dropout_key       a node with `dropout > 0` is given a fresh key each training step
        precondition_grad(g)       rewrite the node's own gradient before the optimizer (LoRA-FA)
        after_update(step)         a rule applied after each optimizer step (Delta-LoRA)
        after_update_all(nodes, grads, step)
                                   classmethod: a rule over every node of the type at once, given
                                   the step's gradients (AdaLoRA's global rank budget)
        penalty()                  (weighted sum, count): a regulariser the loss adds as the sum over
                                   nodes divided by the total count (AdaLoRA's orthogonality term)
        bind_shared(params)        fetch arrays shared across layers from the whole tree (VeRA)
        exports_from_initial       True when PEFT export needs the adapter as initialised (PiSSA)
        mergeable                  False for adapters that live in the input, not the weights
        stands_for_array           True for a node in place of a plain array other than a kernel
                                   (LN tuning, trainable tokens): model code reads its `value`, which
                                   is also what merging leaves; `linear` never sees it; such a node
                                   has `with_value(array)`: itself trained to give that value (unmerge)
        switched_off()             what the tree holds in the node's place with the adapter off
                                   (a reference model: DPO): the frozen `base`, or None for an
                                   adapter that adds to the model rather than replacing a weight
        base_moves                 True when training changes `base` itself (Delta-LoRA), so the
                                   adapter-off model is not the model training started from
    """

    peft_type: str = ""
    exports_from_initial: bool = False
    stands_for_array: bool = False
    mergeable: bool = True  # False: the adapter is not in the weights (prompt learning); merge refuses
    base_moves: bool = False
    merges_into_bias: bool = False
    rides_along: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ADAPTER_TYPES.append(cls)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.base.shape)

    def field_labels(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must declare field_labels()")

    def field_axes(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must declare field_axes()")

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement apply(x)")

    def project(self, x: jnp.ndarray, bias: jnp.ndarray | None) -> jnp.ndarray:
        y = self.apply(x)
        return y if bias is None else y + bias.astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def switched_off(self) -> Any:
        return self.base

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged")

    def merge_bias(self, bias: jnp.ndarray) -> jnp.ndarray:
        return bias

    def unmerge_bias(self, merged_bias: jnp.ndarray) -> jnp.ndarray:
        return merged_bias


def shared_entry(params: dict, key: str, what: str) -> Any:
    """params[key], the arrays a method shares across layers (for a node's `bind_shared`), or an error
    naming them: `what` they are, as in "a VeRA kernel needs the shared projections"."""
    value = params.get(key)
    if value is None:
        raise LowraxError(f"{what} at params[{key!r}], which are missing")
    return value


# The top-level tree key of a prompt-learning adapter (PEFT's attribute name): a node with
# `num_virtual_tokens`, `prompt_embeddings()` ([v, hidden] to put before the input's word
# embeddings, or None) and `prefix_key_values()` (per layer (k, v) [v, kv_heads, head_dim] to
# put before the attention's keys and values, or None). `models.base.CausalLM` reads it.
VIRTUAL_TOKENS_KEY = "prompt_encoder"


def virtual_tokens(params: Any):
    """The prompt-learning node of a (resolved) tree, or None."""
    return params.get(VIRTUAL_TOKENS_KEY) if isinstance(params, dict) else None


def is_adapter(x: Any) -> bool:
    return isinstance(x, AdapterNode)


@struct.dataclass
class FullyTrained:
    """A leaf trained in full (PEFT's `modules_to_save`, e.g. a classifier head)."""

    value: jnp.ndarray


def unwrapped(x: Any) -> Any:
    """The array of a leaf that may be wrapped as FullyTrained (a method's shared trained arrays)."""
    return x.value if isinstance(x, FullyTrained) else x


def is_node(x: Any) -> bool:
    """An adapter node or a fully-trained leaf: the units the tree functions treat whole."""
    return is_adapter(x) or isinstance(x, FullyTrained)


def dropped(x: jnp.ndarray, rate: float, key) -> jnp.ndarray:
    """Inverted dropout of x when a key is attached (training) and rate > 0; x otherwise."""
    if rate <= 0.0 or key is None:
        return x
    return inverted_dropout(x, rate, key)


def resolve(params: Any) -> Any:
    """The tree as model code reads it: `FullyTrained(value)` and nodes that stand for an
    array become their value, and nodes that use arrays shared across layers (stored once
    at the top of the tree) are given them. Runs inside the traced forward, so sharing
    costs no copy. A node standing for an array is read in its base's dtype (its trained
    value may be kept in float32 over a bfloat16 model)."""

    def read(x):
        if isinstance(x, FullyTrained):
            return x.value
        if getattr(x, "stands_for_array", False):
            return x.value if x.base is None else x.value.astype(x.base.dtype)
        return x

    params = jax.tree.map(read, params, is_leaf=is_node)
    if not isinstance(params, dict):
        return params
    return jax.tree.map(lambda x: x.bind_shared(params) if hasattr(x, "bind_shared") else x, params, is_leaf=is_node)
