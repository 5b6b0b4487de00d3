"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a direction and a magnitude per output channel:

    W' = m * (W + s A B) / ||W + s A B||_c        (||.||_c: the norm of each output column)

m [out] is trained and starts at ||W + s A B||_c (so W' = W at init). As the paper
suggests (section 4.3) and PEFT does, the norm is treated as a constant: no
gradient flows through it. The forward never forms W + s A B: the column norms
come from ||W||_c^2 + 2 s <W, A B>_c + s^2 ||A B||_c^2, which needs only W^T A
[out, r] and A^T A [r, r].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.adapters.lora.node import LowRankFactors, low_rank
from lowrax.core.node import LORA_A, LORA_B, VECTOR, dropped
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import matmul


def column_norms(w: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, scale: float) -> jnp.ndarray:
    """||w + scale * a @ b|| over the input axis, per output channel: [out], float32.

    w [in, out], a [in, r], b [r, out]; computed without the [in, out] sum."""
    w, a, b = (t.astype(jnp.float32) for t in (w, a, b))
    squared = (jnp.sum(w * w, axis=0)
               + 2.0 * scale * jnp.sum((w.T @ a).T * b, axis=0)
               + scale * scale * jnp.sum(((a.T @ a) @ b) * b, axis=0))
    return jnp.sqrt(jnp.maximum(squared, 0.0))


@struct.dataclass
class DoraKernel(LowRankFactors):
    """A DoRA-adapted kernel: base [in, out] frozen; a [in, r], b [r, out] and the
    magnitude [out] trained. PEFT stores the magnitude as `lora_magnitude_vector`."""

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    magnitude: jnp.ndarray
    dropout_key: Any = None
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    rslora: bool = struct.field(pytree_node=False, default=False)

    def field_labels(self) -> dict:
        return {"a": LORA_A, "b": LORA_B, "magnitude": VECTOR}

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        norms = column_norms(w, self.a, self.b, self.scale)
        return (w + self.delta()) * (self.magnitude.astype(jnp.float32) / norms)[None, :]

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        norms = column_norms(w, self.a, self.b, self.scale)
        return merged * (norms / self.magnitude.astype(jnp.float32))[None, :] - self.delta()

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        """x [n, in] -> [n, out], as PEFT computes it (dropout included)."""
        # An NF4 base is dequantized for the norms tied to this layer's input, as its matmul is:
        # otherwise XLA hoists every layer's copy to the start of the program.
        norms = jax.lax.stop_gradient(column_norms(dense_kernel(self.base, tie_to=x[0, 0]), self.a, self.b, self.scale))
        mag_scale = (self.magnitude.astype(jnp.float32) / norms).astype(x.dtype)
        y = matmul(x, self.base)
        h = dropped(x, self.dropout, self.dropout_key)
        lora = low_rank(h, self.a, self.b, self.scale)
        # Without dropout h is x and this is mag_scale * (x W + s x A B); with dropout PEFT
        # rescales the base path of the dropped input, and so do we.
        base_of_h = y if h is x else matmul(h, self.base)
        return y + ((mag_scale - 1) * base_of_h + mag_scale * lora).astype(y.dtype)
