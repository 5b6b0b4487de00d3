"""Operations whose backward pass keeps only what it needs.

JAX's automatic differentiation keeps every intermediate of a composite operation for the backward
pass: a softmax keeps its masked scores, their exponentials and the probabilities (three arrays of
[b, heads, t, s] a layer); an activation keeps its internal terms (SiLU its sigmoid and products,
GELU its erf). These custom VJPs keep one array each and recompute the cheap elementwise rest in the
backward, which is what fused kernels do: no matmul is recomputed, so this is not rematerialisation.
On SmolLM2 at 4 x 256 tokens they and the fused cross-entropy of `objectives.fused_logps` take a
LoRA step's compiled temporaries from 3.07 to 1.95 GB (`scripts/compile_memory.py lora --batch 4
--seq 256`). Forward values are unchanged: each function computes exactly what the plain
composition does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrax.core.dropout import apply_keep_mask, keep_mask


@jax.custom_vjp
def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """softmax(where(mask, scores, most negative finite)) over the last axis; the backward keeps the
    probabilities only. mask broadcasts against scores."""
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def _masked_softmax_forward(scores, mask):
    probs = masked_softmax(scores, mask)
    return probs, (probs, mask)


def _tied_to_gradient(saved, grad):
    """The residuals and the incoming gradient, through one optimisation barrier, each floating residual
    also made to depend on one element of the gradient (`x + 0 * g`). Without the barrier XLA sees the
    backward's recomputation (silu(gate) ...) as equal to the forward's and merges the two; without
    the dependency XLA:CPU, which lowers barriers before it schedules, may still run every layer's
    recomputation early, and all of them are then alive at once. A NaN or infinite gradient element
    makes the recomputation NaN, as it would make the gradient anyway."""
    saved, grad = jax.lax.optimization_barrier((saved, grad))
    first = jax.tree.leaves(grad)[0].reshape(-1)[0]

    def after_gradient(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        return x + jnp.zeros((), x.dtype) * first.astype(x.dtype)

    return jax.tree.map(after_gradient, saved), grad


def _masked_softmax_backward(saved, grad):
    (probs, mask), grad = _tied_to_gradient(saved, grad)
    grad_scores = probs * (grad - jnp.sum(grad * probs, axis=-1, keepdims=True))
    # A masked score gets no gradient, as through `where` (it matters for an all-masked row only,
    # whose probabilities are uniform rather than 0).
    return jnp.where(mask, grad_scores, jnp.zeros((), grad_scores.dtype)), None


masked_softmax.defvjp(_masked_softmax_forward, _masked_softmax_backward)


def input_saving(fn):
    """fn (elementwise, one array in and out) whose backward keeps only its input and recomputes
    the derivative from it."""

    @jax.custom_vjp
    def lean(x):
        return fn(x)

    def forward(x):
        return fn(x), x

    def backward(x, grad):
        x, grad = _tied_to_gradient(x, grad)
        return jax.vjp(fn, x)[1](grad)

    lean.defvjp(forward, backward)
    return lean


def gated(fn):
    """(gate, up) -> fn(gate) * up (a GLU: SwiGLU, GeGLU) whose backward keeps only gate and up."""

    @jax.custom_vjp
    def lean(gate, up):
        return fn(gate) * up

    def forward(gate, up):
        return fn(gate) * up, (gate, up)

    def backward(saved, grad):
        (gate, up), grad = _tied_to_gradient(saved, grad)
        activated, activation_vjp = jax.vjp(fn, gate)
        return activation_vjp(grad * up)[0], (grad * activated).astype(up.dtype)

    lean.defvjp(forward, backward)
    return lean


def dropout_then_contract(spec: str, probs: jnp.ndarray, values: jnp.ndarray, rate: float, key) -> jnp.ndarray:
    """einsum(spec, dropout(probs), values), as attention applies its dropout before weighting the values;
    the backward keeps probs, values and the boolean keep mask (a byte an element) rather than the
    dropped probabilities as well (four bytes an element). The mask is `inverted_dropout`'s; no key
    (outside a training step) or a zero rate: no dropout."""
    keep, scale = keep_mask(probs.shape, rate, key)
    if keep is None:
        return jnp.einsum(spec, probs, values)
    return _contract_kept(spec, scale, probs, values, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _contract_kept(spec, scale, probs, values, keep):
    return jnp.einsum(spec, apply_keep_mask(probs, keep, scale), values)


def _contract_kept_forward(spec, scale, probs, values, keep):
    return _contract_kept(spec, scale, probs, values, keep), (probs, values, keep)


def _contract_kept_backward(spec, scale, saved, grad):
    (probs, values, keep), grad = _tied_to_gradient(saved, grad)
    _, pull_back = jax.vjp(lambda p, v: jnp.einsum(spec, p, v), apply_keep_mask(probs, keep, scale), values)
    grad_dropped, grad_values = pull_back(grad)
    return apply_keep_mask(grad_dropped, keep, scale), grad_values, None


_contract_kept.defvjp(_contract_kept_forward, _contract_kept_backward)
