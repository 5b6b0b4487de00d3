"""PiSSA initialisation (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
Vectors Adaptation of Large Language Models").

The adapter starts as the top-r singular part of W and the frozen base holds the
rest: with W = U S V^T (W [in, out]), S_r = S[:r] / s,

    a = U_r sqrt(S_r)   [in, r]      b = sqrt(S_r) V_r^T   [r, out]      base = W - s a b

so the model is unchanged at init. Trained (a, b) are exported as plain LoRA over
the original W, as PEFT documents (`path_initial_model_for_weight_conversion`):
W_res + s a b = W + s (a b - a0 b0) = W + s [a, a0] [b; -b0], a rank-2r adapter
with the same scale.
"""

from __future__ import annotations

import jax.numpy as jnp

from lowrax.adapters.lora.node import LoraKernel


def pissa_init(w: jnp.ndarray, r: int, scale: float, adapter_dtype=jnp.float32):
    """(a [in, r], b [r, out], residual [in, out] in w's dtype) for the float kernel w."""
    w32 = w.astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(w32, full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r]
    residual = (w32 - scale * (a @ b)).astype(w.dtype)
    return a.astype(adapter_dtype), b.astype(adapter_dtype), residual


def to_plain_lora(trained: LoraKernel, initial: LoraKernel, original_base) -> LoraKernel:
    """The trained PiSSA adapter as a rank-2r LoRA over the original (un-residualised) base."""
    a = jnp.concatenate([trained.a, initial.a.astype(trained.a.dtype)], axis=1)
    b = jnp.concatenate([trained.b, -initial.b.astype(trained.b.dtype)], axis=0)
    return LoraKernel(base=original_base, a=a, b=b, scale=trained.scale, dropout=trained.dropout,
                      rslora=trained.rslora)
