"""The LoRA node: `x @ base + scale * dropout(x) @ a @ b`, and what the LoRA family shares.

`LowRankFactors` is the part of every node with factors a [in, r], b [r, out]
and a `scale` (LoRA, LoRA-FA, rsLoRA, PiSSA here; DoRA and Delta-LoRA beside
this module): merging adds `scale * a @ b`.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import struct

from lowrax.errors import LowraxError
from lowrax.core.node import FROZEN, LORA_A, LORA_B, AdapterNode, dropped
from lowrax.core.linear import matmul
from lowrax.adapters.lora.fused import base_plus_low_rank, fused_applies


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor on A @ B: alpha / r, or rank-stabilised alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def low_rank(x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, scale: float = 1.0) -> jnp.ndarray:
    """scale * (x @ a) @ b for x [n, in]; the scale is folded into b's [r, out] copy, not the [n, out] product."""
    return jnp.matmul(jnp.matmul(x, a.astype(x.dtype)), (scale * b).astype(x.dtype))


class LowRankFactors(AdapterNode):
    """What nodes with factors a [in, r], b [r, out] and a `scale` share; merging adds `delta()`."""

    peft_type = "LORA"

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def field_axes(self) -> dict:
        """Every factor-shaped field the family's nodes have (each node uses its own)."""
        return {"a": ("in", "lora_rank"), "anchor_a": ("in", "lora_rank"), "b": ("lora_rank", "out"),
                "anchor_b": ("lora_rank", "out"), "magnitude": ("out",)}

    def delta(self) -> jnp.ndarray:
        """scale * a @ b [in, out], in float32: what merging adds to the base."""
        return self.scale * (self.a.astype(jnp.float32) @ self.b.astype(jnp.float32))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


@struct.dataclass
class LoraKernel(LowRankFactors):
    """A LoRA-adapted kernel: `x @ base + scale * dropout(x) @ a @ b`.

    base [in, out] is frozen; a [in, r] and b [r, out] are trained (LoRA-FA:
    `train_a=False` keeps a frozen at its random init; MiCA: `train_b=False` keeps b
    frozen at its singular vectors). `dropout_key` is None
    except inside a training step, which attaches a fresh key per step
    (`adapters.tree.with_dropout_keys`) so the forward stays a pure function.
    `residual_base` marks a base that holds W minus the adapter's start (the PiSSA,
    OLoRA, CorDA and LoRA-GA inits): such an adapter is exported converted to plain LoRA.
    `rslora` records that `scale` is alpha / sqrt(r), for the PEFT config.
    """

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    train_a: bool = struct.field(pytree_node=False, default=True)
    train_b: bool = struct.field(pytree_node=False, default=True)
    fa_projected_grad: bool = struct.field(pytree_node=False, default=False)
    residual_base: bool = struct.field(pytree_node=False, default=False)
    rslora: bool = struct.field(pytree_node=False, default=False)

    @property
    def exports_from_initial(self) -> bool:
        return self.residual_base

    def field_labels(self) -> dict:
        return {"a": LORA_A if self.train_a else FROZEN, "b": LORA_B if self.train_b else FROZEN}

    def switched_off(self):
        if self.residual_base:
            raise LowraxError("this adapter's base holds W minus the adapter's start (a PiSSA, OLoRA, CorDA or LoRA-GA "
                              "init), so switching the adapter off does not give the pretrained model: convert it "
                              "first (save_peft exports plain LoRA over the original weights)")
        return self.base

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if fused_applies(x, self.base):
            return base_plus_low_rank(x, self.base.astype(x.dtype), self.a.astype(x.dtype),
                                      (self.scale * self.b).astype(x.dtype), self.dropout, self.dropout_key)
        y = matmul(x, self.base)
        return y + low_rank(dropped(x, self.dropout, self.dropout_key), self.a, self.b, self.scale).astype(y.dtype)

    def precondition_grad(self, grad: "LoraKernel") -> "LoraKernel":
        """LoRA-FA's optimizer rule (PEFT's `create_lorafa_optimizer`): with A frozen, B's
        gradient is projected as (A^T A + 1e-8 I)^+ grad_B / s^2, the full-weight gradient's
        best rank-r step."""
        if not self.fa_projected_grad or grad.b is None:
            return grad
        a = self.a.astype(jnp.float32)
        gram_inv = jnp.linalg.pinv(a.T @ a + 1e-8 * jnp.eye(a.shape[1], dtype=jnp.float32))
        return grad.replace(b=((gram_inv @ grad.b.astype(jnp.float32)) / self.scale**2).astype(grad.b.dtype))
