"""The AdaLoRA node: `x @ base + scale * ((dropout(x) @ (P * e)) @ Q)`, an SVD-shaped delta.

P [in, r] and Q [r, out] play the singular vectors (PEFT's `lora_A` (r, in) and `lora_B`
(out, r), transposed), e [r] the singular values (PEFT's `lora_E` (r, 1)). The scale is
alpha / (init_r + 1e-5) and stays so when ranks are pruned, as PEFT's `ranknum` does.

The node also carries the rank allocator's state for its triplets, labelled `anchor`
(in the trainable half, so checkpoints keep it; never given an optimizer update):
the smoothed sensitivity and uncertainty of every entry of P, e and Q, and `kept`, the
triplets the last allocation kept (1) or pruned (0). `budget.allocate` updates them
after each optimizer step, for all AdaLoRA nodes at once (the budget is global).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import struct

from lowrax.adapters.lora.node import low_rank
from lowrax.core.node import ANCHOR, LORA_A, LORA_B, SINGULAR, AdapterNode, dropped
from lowrax.core.linear import matmul

RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


@dataclass(frozen=True)
class Schedule:
    """The rank allocator's settings (the same on every node of one adapter)."""

    target_r: int
    tinit: int
    tfinal: int
    deltaT: int
    beta1: float
    beta2: float
    total_step: int
    orth_reg_weight: float


STATE_FIELDS = ("ipt_a", "ipt_e", "ipt_b", "unc_a", "unc_e", "unc_b", "kept")


@struct.dataclass
class AdaLoraKernel(AdapterNode):
    base: Any
    a: jnp.ndarray  # P [in, r]
    e: jnp.ndarray  # singular values [r]
    b: jnp.ndarray  # Q [r, out]
    ipt_a: jnp.ndarray  # smoothed sensitivity of each entry of a, e, b (float32, their shapes)
    ipt_e: jnp.ndarray
    ipt_b: jnp.ndarray
    unc_a: jnp.ndarray  # smoothed uncertainty of the same entries
    unc_e: jnp.ndarray
    unc_b: jnp.ndarray
    kept: jnp.ndarray  # [r] float32: 1 where the last allocation kept the triplet
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    schedule: Schedule | None = struct.field(pytree_node=False, default=None)
    peft_type = "ADALORA"

    @property
    def rank(self) -> int:
        """init_r: the triplets this node has room for (pruned ones hold e = 0)."""
        return self.e.shape[0]

    def field_labels(self) -> dict:
        return {"a": LORA_A, "e": SINGULAR, "b": LORA_B, **{f: ANCHOR for f in STATE_FIELDS}}

    def field_axes(self) -> dict:
        rank_only = ("lora_rank",)
        return {"a": ("in", "lora_rank"), "e": rank_only, "b": ("lora_rank", "out"),
                "ipt_a": ("in", "lora_rank"), "unc_a": ("in", "lora_rank"), "ipt_e": rank_only, "unc_e": rank_only,
                "ipt_b": ("lora_rank", "out"), "unc_b": ("lora_rank", "out"), "kept": rank_only}

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        return y + low_rank(dropped(x, self.dropout, self.dropout_key), self.a * self.e, self.b, self.scale).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        """scale * (P * e) @ Q [in, out], float32: what merging adds to the base."""
        f32 = jnp.float32
        return self.scale * ((self.a.astype(f32) * self.e.astype(f32)) @ self.b.astype(f32))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()

    def penalty(self) -> tuple[jnp.ndarray, int]:
        """(weighted sum, count) of this node's share of PEFT's orthogonality penalty:
        ||P^T P - I||_F + ||Q Q^T - I||_F, two matrices. The loss adds the weighted mean over
        every such matrix of the model (`adapters.tree.penalty`)."""
        eye = jnp.eye(self.rank, dtype=jnp.float32)
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        frobenius = lambda m: jnp.sqrt(jnp.sum(m * m))  # noqa: E731
        return self.schedule.orth_reg_weight * (frobenius(a.T @ a - eye) + frobenius(b @ b.T - eye)), 2

    @classmethod
    def after_update_all(cls, nodes: list["AdaLoraKernel"], grads: list, step) -> list["AdaLoraKernel"]:
        from lowrax.adapters.adalora.budget import allocate

        return allocate(nodes, grads, step)
