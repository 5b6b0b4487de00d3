"""Parameter-tree node types: what an adapted or fully-trained leaf looks like.

An adapter is a leaf of the parameter tree: wrapping replaces a kernel array
by a registered pytree node that holds the frozen base and the adapter's own
arrays. The tree's names never change, so a pristine checkpoint can always be
loaded and the adapters combined back in.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.ops import register_linear


@struct.dataclass
class LoraKernel:
    """A LoRA-adapted kernel: `x @ base + scale * dropout(x) @ a @ b`.

    base [in, out] is frozen; a [in, r] and b [r, out] are trained. `dropout_key`
    is None except inside a training step, which attaches a fresh key per step
    (`with_dropout_keys`) so the forward stays a pure function.
    """

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def delta(self) -> jnp.ndarray:
        """scale * a @ b [in, out], in float32: what merging adds to the base."""
        return self.scale * (self.a.astype(jnp.float32) @ self.b.astype(jnp.float32))


@struct.dataclass
class FullyTrained:
    """A leaf trained in full (PEFT's `modules_to_save`, e.g. a classifier head)."""

    value: jnp.ndarray


@register_linear(LoraKernel)
def _lora_linear(x: jnp.ndarray, k: LoraKernel) -> jnp.ndarray:
    """x [n, in] (ops.matmul flattens leading axes) -> [n, out]."""
    from lowrax.ops import matmul

    y = matmul(x, k.base)
    h = x
    if k.dropout > 0.0 and k.dropout_key is not None:
        keep = jax.random.bernoulli(k.dropout_key, 1.0 - k.dropout, x.shape)
        h = jnp.where(keep, x / (1.0 - k.dropout), 0).astype(x.dtype)
    # The scale is folded into B's [r, out] copy rather than applied to the [n, out] product.
    low_rank = jnp.matmul(jnp.matmul(h, k.a.astype(x.dtype)), (k.scale * k.b).astype(x.dtype))
    return y + low_rank.astype(y.dtype)


def is_node(x: Any) -> bool:
    return isinstance(x, (LoraKernel, FullyTrained))


def unwrap_fully_trained(params: Any) -> Any:
    """Replace every `FullyTrained(value)` by its value, for model code that reads arrays."""
    return jax.tree.map(lambda x: x.value if isinstance(x, FullyTrained) else x, params,
                        is_leaf=lambda x: isinstance(x, FullyTrained))
