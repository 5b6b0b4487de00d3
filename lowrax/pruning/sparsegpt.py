"""SparseGPT (Frantar & Alistarh 2023): prune one layer and update its remaining weights so the
layer's output on the calibration inputs changes as little as possible.

Given the layer's weight w [out, in] and H = 2 X^T X over its calibration inputs X [tokens, in],
the columns are visited left to right in blocks. Each pruned weight's error is spread over the
weights of later columns through the upper Cholesky factor U of H^-1 (the optimal brain
surgeon update, made cheap by visiting columns in a fixed order): inside a block column by
column, and once per block for all later columns as one matrix product.

The mask is chosen as the paper and llmcompressor choose it: unstructured, at each block's
start over the block's weights by w^2 / U_jj^2 (every weight at or below the value ranked
`int(size * sparsity)` is pruned); N:M, at the start of each group of M columns from the
weights as they are by then, the N lowest w^2 / U_jj^2 of every row. H is dampened by
`dampening` times its mean diagonal, and inputs that never fire (H_jj = 0) have their
weights zeroed. Numerics follow llmcompressor's float32 implementation step by step
(tests/test_pruning.py compares the results with it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lowrax.pruning.masks import lowest_in_groups

DEFAULT_BLOCKSIZE = 128
DEFAULT_DAMPENING = 0.01


def inverse_hessian_factor(h: jnp.ndarray, dampening) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(U, dead): U the upper Cholesky factor of (H + damping)^-1, dead the inputs with H_jj = 0.
    A Hessian that is not positive definite even so gives U = I (as llmcompressor, which warns):
    the pruning then falls back to magnitude order without updates."""
    size = h.shape[0]
    eye = jnp.eye(size, dtype=jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    h = h + dampening * jnp.mean(jnp.diag(h)) * eye
    lower = jnp.linalg.cholesky(h)
    inverse = jax.scipy.linalg.cho_solve((lower, True), eye)
    upper = jnp.triu(jnp.linalg.cholesky(inverse).T)
    return jnp.where(jnp.all(jnp.isfinite(upper)), upper, eye), dead


@functools.partial(jax.jit, static_argnames=("sparsity", "n", "m", "blocksize"))
def sparsegpt(w: jnp.ndarray, h: jnp.ndarray, dampening=DEFAULT_DAMPENING, *, sparsity: float, n: int = 0, m: int = 0,
              blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(pruned weight [out, in], pruned mask [out, in], loss) for w [out, in] and H [in, in].

    n, m: N:M pruning (n of every m consecutive inputs per output), or 0, 0 for unstructured
    at `sparsity`. loss: sum over pruned weights of w^2 / U_jj^2 / 2, the layer's squared
    reconstruction error as the update estimates it."""
    w = w.astype(jnp.float32)
    upper, dead = inverse_hessian_factor(h.astype(jnp.float32), dampening)
    w = jnp.where(dead[None, :], 0.0, w)
    rows, cols = w.shape
    pruned_all, loss = [], jnp.zeros((), jnp.float32)
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block, pruned, block_loss, errors = _prune_block(w[:, start:stop], upper[start:stop, start:stop],
                                                         sparsity, n, m)
        w = w.at[:, start:stop].set(block)
        if stop < cols:
            w = w.at[:, stop:].add(-(errors @ upper[start:stop, stop:]))
        pruned_all.append(pruned)
        loss = loss + block_loss
    return w, jnp.concatenate(pruned_all, axis=1), loss


def _prune_block(w1, u1, sparsity, n, m):
    """One block of columns: (its pruned values, mask, loss, per-column scaled errors)."""
    rows, count = w1.shape
    diag = jnp.diag(u1)
    if m == 0:
        scores = w1**2 / diag[None, :] ** 2
        threshold = jnp.sort(scores.reshape(-1))[int(scores.size * sparsity)]
        mask = scores <= threshold
    else:
        mask = jnp.zeros(w1.shape, bool)
    columns = jnp.arange(count)

    def column(i, carry):
        w1, q1, errors, mask, losses = carry
        if m:
            group = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2 / jax.lax.dynamic_slice(diag, (i,), (m,))[None] ** 2
            chosen = jax.lax.dynamic_update_slice(mask, lowest_in_groups(group, n, m), (0, i))
            mask = jnp.where(i % m == 0, chosen, mask)
        current = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        d = u1[i, i]
        q = jnp.where(jax.lax.dynamic_index_in_dim(mask, i, axis=1, keepdims=False), 0.0, current)
        error = (current - q) / d
        losses = losses + (current - q) ** 2 / d**2
        w1 = w1 - error[:, None] * jnp.where(columns >= i, u1[i], 0.0)[None, :]
        q1 = jax.lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
        errors = jax.lax.dynamic_update_index_in_dim(errors, error, i, axis=1)
        return w1, q1, errors, mask, losses

    init = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), mask, jnp.zeros((rows,), jnp.float32))
    _, q1, errors, mask, losses = jax.lax.fori_loop(0, count, column, init)
    return q1, mask, jnp.sum(losses) / 2, errors
