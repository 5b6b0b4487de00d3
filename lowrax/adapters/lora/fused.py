"""LoRA's `x @ W + s * dropout(x) @ A @ B` as one matmul, with a backward that keeps x and x @ A.

Written as two matmuls and an add, the sum is never stored: XLA fuses the add into every reader of
the layer's output (the GLU, the attention, the backward pass), and so keeps both matmul outputs
alive where their sum would do. Concatenating `[x, dropout(x) @ A]` against `[W; s * B]` makes the
output one dot's result. On SmolLM2 with LoRA r 16 on every linear layer at 4 x 256 tokens, the
step's compiled temporaries fall from 1.76 to 1.39 GB (`scripts/compile_memory.py lora --batch 4
--seq 256 --lora-forms`; with `--time 8` it alternates the two forms' steps in one process). The custom VJP computes the
gradients the factors need and no more, recomputing the dropout mask from its key rather than
keeping the dropped input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrax.core.dropout import apply_keep_mask, keep_mask
from lowrax.core.linear import matmul_with_extra_columns
from lowrax.core.node import dropped

# The concatenation copies W each call: below this many rows (decoding, small batches), reading W
# twice costs more than the add it saves, and the two-matmul form is used.
FUSED_FROM_ROWS = 256


def fused_applies(x: jnp.ndarray, base) -> bool:
    """Whether `base_plus_low_rank` serves this call: a plain array base and enough rows."""
    return isinstance(base, jax.Array) and base.ndim == 2 and x.ndim == 2 and x.shape[0] >= FUSED_FROM_ROWS


def base_plus_low_rank(x, base, a, b, rate: float = 0.0, key=None):
    """x @ base + dropped(x) @ a @ b for x [n, in], base [in, out], a [in, r], b [r, out] (scale
    folded into b), every array in x's dtype."""
    return _fused(rate, x, base, a, b, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(rate, x, base, a, b, key):
    return _forward(rate, x, base, a, b, key)[0]


def _forward(rate, x, base, a, b, key):
    projected = dropped(x, rate, key) @ a  # [n, r]
    return matmul_with_extra_columns(x, base, projected, b), (x, projected, base, a, b, key)


def _backward(rate, saved, grad):
    x, projected, base, a, b, key = saved
    # the forward's mask, drawn once again for both uses: dropout is x * mask, its own transpose
    keep, scale = keep_mask(x.shape, rate, key)
    masked = (lambda y: y) if keep is None else (lambda y: apply_keep_mask(y, keep, scale))
    grad_projected = grad @ b.T  # [n, r]
    contract_rows = (((0,), (0,)), ((), ()))
    grad_a = jax.lax.dot_general(masked(x), grad_projected, contract_rows)
    grad_b = jax.lax.dot_general(projected, grad, contract_rows)
    # the base's gradient is for callers that differentiate it; a training step does not, and XLA drops it
    grad_base = jax.lax.dot_general(x, grad, contract_rows)
    grad_x = jax.lax.dot_general(grad, base, (((1,), (1,)), ((), ()))) + masked(grad_projected @ a.T)
    return grad_x, grad_base, grad_a, grad_b, None


_fused.defvjp(_forward, _backward)
