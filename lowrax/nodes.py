"""Parameter-tree node types: what an adapted or fully-trained leaf looks like.

An adapter is a leaf of the parameter tree: wrapping replaces a kernel array
by a registered pytree node that holds the frozen base and the adapter's own
arrays. The tree's names never change, so a pristine checkpoint can always be
loaded and the adapters combined back in.

Every adapter node type (`LoraKernel` here; DoRA, VeRA and Delta-LoRA in
`lowrax.variants`) is registered with `register_adapter` and provides:

    node.field_labels()      optax label of each array field ("frozen", "lora_a", ...)
    node.merge_into(w)       the merged float32 kernel, given the dense float32 base w
    node.unmerge_from(m, w)  the float32 base that merges to m (w: the node's own dense base)

and a projection registered with `ops.register_linear`. Generic tree code
(`lowrax.tree`) only uses this interface.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.ops import matmul, register_linear

# Optax labels of array leaves (see `lowrax.tree.labels`).
FROZEN, LORA_A, LORA_B, VECTOR, FULL, ANCHOR = "frozen", "lora_a", "lora_b", "vector", "full", "anchor"

ADAPTER_TYPES: list[type] = []


def register_adapter(cls: type) -> type:
    """Class decorator: make `cls` an adapter node type known to the generic tree functions."""
    ADAPTER_TYPES.append(cls)
    return cls


def is_adapter(x: Any) -> bool:
    return isinstance(x, tuple(ADAPTER_TYPES))


def is_node(x: Any) -> bool:
    """An adapter node or a fully-trained leaf: the units the tree functions treat whole."""
    return is_adapter(x) or isinstance(x, FullyTrained)


def dropped(x: jnp.ndarray, rate: float, key) -> jnp.ndarray:
    """Inverted dropout of x when a key is attached (training) and rate > 0; x otherwise."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LowRankFactors:
    """What nodes with factors a [in, r], b [r, out] and a `scale` share; merging adds `delta()`."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def delta(self) -> jnp.ndarray:
        """scale * a @ b [in, out], in float32: what merging adds to the base."""
        return self.scale * (self.a.astype(jnp.float32) @ self.b.astype(jnp.float32))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


@register_adapter
@struct.dataclass
class LoraKernel(LowRankFactors):
    """A LoRA-adapted kernel: `x @ base + scale * dropout(x) @ a @ b`.

    base [in, out] is frozen; a [in, r] and b [r, out] are trained (LoRA-FA:
    `train_a=False` keeps a frozen at its random init). `dropout_key` is None
    except inside a training step, which attaches a fresh key per step
    (`tree.with_dropout_keys`) so the forward stays a pure function.
    `pissa_residual` marks a base that holds W minus its top-r singular part
    (PiSSA init): such an adapter is exported converted to plain LoRA.
    """

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    train_a: bool = struct.field(pytree_node=False, default=True)
    fa_projected_grad: bool = struct.field(pytree_node=False, default=False)
    pissa_residual: bool = struct.field(pytree_node=False, default=False)

    def field_labels(self) -> dict:
        return {"a": LORA_A if self.train_a else FROZEN, "b": LORA_B}

    def precondition_grad(self, grad: "LoraKernel") -> "LoraKernel":
        """LoRA-FA's optimizer rule (PEFT's `create_lorafa_optimizer`): with A frozen, B's
        gradient is projected as (A^T A + 1e-8 I)^+ grad_B / s^2, the full-weight gradient's
        best rank-r step."""
        if not self.fa_projected_grad or grad.b is None:
            return grad
        a = self.a.astype(jnp.float32)
        gram_inv = jnp.linalg.pinv(a.T @ a + 1e-8 * jnp.eye(a.shape[1], dtype=jnp.float32))
        return grad.replace(b=((gram_inv @ grad.b.astype(jnp.float32)) / self.scale**2).astype(grad.b.dtype))


@struct.dataclass
class FullyTrained:
    """A leaf trained in full (PEFT's `modules_to_save`, e.g. a classifier head)."""

    value: jnp.ndarray


def low_rank(x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, scale: float = 1.0) -> jnp.ndarray:
    """scale * (x @ a) @ b for x [n, in]; the scale is folded into b's [r, out] copy, not the [n, out] product."""
    return jnp.matmul(jnp.matmul(x, a.astype(x.dtype)), (scale * b).astype(x.dtype))


@register_linear(LoraKernel)
def _lora_linear(x: jnp.ndarray, k: LoraKernel) -> jnp.ndarray:
    """x [n, in] (ops.matmul flattens leading axes) -> [n, out]."""
    y = matmul(x, k.base)
    return y + low_rank(dropped(x, k.dropout, k.dropout_key), k.a, k.b, k.scale).astype(y.dtype)


def resolve(params: Any) -> Any:
    """The tree as model code reads it: `FullyTrained(value)` becomes its value, and nodes
    that use arrays shared across layers (VeRA's projections, stored once at the top of
    the tree) are given them. Runs inside the traced forward, so sharing costs no copy."""
    params = jax.tree.map(lambda x: x.value if isinstance(x, FullyTrained) else x, params,
                          is_leaf=lambda x: isinstance(x, FullyTrained))
    if not isinstance(params, dict):
        return params
    return jax.tree.map(lambda x: x.bind_shared(params) if hasattr(x, "bind_shared") else x, params, is_leaf=is_node)
