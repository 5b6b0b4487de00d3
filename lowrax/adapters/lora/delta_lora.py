"""Delta-LoRA (Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the
Delta of Low-Rank Matrices").

After every optimizer step t >= K the frozen base moves by the change of the
adapter's product, scaled as the adapter is:

    W <- W + lambda * s * (A' B' - A B)

Summed over steps K..T-1 this telescopes to W_T = W_0 + lambda * s * (A_T B_T - A_K B_K),
so lowrax keeps W_0 untouched and stores the anchor (A_K, B_K): an r-rank pair, not a
full-size weight, with no gradient and no optimizer state. Until step K the anchor
follows (A, B), so the moved part is zero; from K on it stays. The forward
computes the moved base factored, without materialising any [in, out] matrix:

    y = x W_0 + s (x A) B + stop_gradient(lambda * s ((x A) B - (x A_K) B_K))

The moved part carries no gradient: W is updated by the rule, not by its gradient.
The paper drops dropout on the low-rank path; so does this node.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.lora.node import LoraKernel, LowRankFactors, low_rank
from lowrax.core.node import ANCHOR, LORA_A, LORA_B
from lowrax.core.linear import matmul

DEFAULT_LAMBDA = 0.5
DEFAULT_START_STEP = 0


@struct.dataclass
class DeltaLoraKernel(LowRankFactors):
    """base [in, out]: W_0, frozen; a [in, r], b [r, out] trained; anchor_a, anchor_b:
    the product's value at step K (labelled `anchor`: carried with the trainable half,
    never updated by the optimizer)."""

    base_moves = True  # W += lambda * (A'B' - AB) after every step

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    anchor_a: jnp.ndarray
    anchor_b: jnp.ndarray
    scale: float = struct.field(pytree_node=False, default=1.0)
    delta_lambda: float = struct.field(pytree_node=False, default=DEFAULT_LAMBDA)
    start_step: int = struct.field(pytree_node=False, default=DEFAULT_START_STEP)
    rslora: bool = struct.field(pytree_node=False, default=False)

    def field_labels(self) -> dict:
        return {"a": LORA_A, "b": LORA_B, "anchor_a": ANCHOR, "anchor_b": ANCHOR}

    def base_shift(self) -> jnp.ndarray:
        """How far the rule has moved W from W_0: lambda * s * (A B - A_K B_K), float32 [in, out]."""
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        return self.delta_lambda * self.scale * (f32(self.a) @ f32(self.b) - f32(self.anchor_a) @ f32(self.anchor_b))

    def delta(self) -> jnp.ndarray:
        """What merging adds to W_0: the base's shift plus the adapter, float32 [in, out]."""
        return self.base_shift() + LowRankFactors.delta(self)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        current = low_rank(x, self.a, self.b)
        shift = self.delta_lambda * self.scale * (current - low_rank(x, self.anchor_a, self.anchor_b))
        return y + (self.scale * current + jax.lax.stop_gradient(shift)).astype(y.dtype)

    def after_update(self, step) -> "DeltaLoraKernel":
        """After optimizer step number `step` (1-based): before K steps are done the anchor
        follows the adapter, so the base has not moved; afterwards it stays."""
        follow = step <= self.start_step
        return self.replace(anchor_a=jnp.where(follow, self.a, self.anchor_a),
                            anchor_b=jnp.where(follow, self.b, self.anchor_b))


def as_plain_lora(k: DeltaLoraKernel):
    """The same function as a rank-2r LoRA over W_0, which PEFT loads: W_0 + s [A, A_K] [(1+l) B; -l B_K]."""
    a = jnp.concatenate([k.a, k.anchor_a], axis=1)
    b = jnp.concatenate([(1.0 + k.delta_lambda) * k.b, -k.delta_lambda * k.anchor_b], axis=0)
    return LoraKernel(base=k.base, a=a, b=b, scale=k.scale, rslora=k.rslora)
