"""Adapters over a rewritten base, exported as plain LoRA over the original weights.

The PiSSA, OLoRA, CorDA and LoRA-GA inits move the adapter's start (a0, b0) out of the
base: base = W - s a0 b0. After training, base + s a b = W + s (a b - a0 b0)
= W + s [a, a0] [b; -b0]: a rank-2r LoRA over W with the same scale, which is how PEFT
exports them (`path_initial_model_for_weight_conversion`).
"""

from __future__ import annotations

import jax.numpy as jnp

from lowrax.adapters.lora.node import LoraKernel


def to_plain_lora(trained: LoraKernel, initial: LoraKernel, original_base) -> LoraKernel:
    """The trained adapter as a rank-2r LoRA over the original (un-rewritten) base."""
    a = jnp.concatenate([trained.a, initial.a.astype(trained.a.dtype)], axis=1)
    b = jnp.concatenate([trained.b, -initial.b.astype(trained.b.dtype)], axis=0)
    return LoraKernel(base=original_base, a=a, b=b, scale=trained.scale, dropout=trained.dropout,
                      rslora=trained.rslora)
