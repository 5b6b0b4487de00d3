"""The reduced Q of a tall matrix's QR decomposition, by Householder reflections as LAPACK's geqrf and
orgqr compute it (so its column signs are torch's and numpy's), in plain jnp operations.

Used inside training steps (DeFT's orthogonal projector): a jitted program with many LAPACK custom
calls can hang on the CPU (see core/cayley.py), and r reflections of an [n, r] matrix are cheap.
"""

from __future__ import annotations

import jax.numpy as jnp


def reduced_q(p: jnp.ndarray) -> jnp.ndarray:
    """Q [n, r] with orthonormal columns and p = Q R (R upper triangular), for p [n, r], n >= r, float32.

    Column j's reflector is LAPACK's (dlarfg): beta = -sign(alpha) * ||column below and at j||, so R's
    diagonal holds the betas; a column that is already zero below its diagonal is left alone (tau 0)."""
    n, r = p.shape
    a = p.astype(jnp.float32)
    vs, taus = [], []
    rows = jnp.arange(n)
    for j in range(r):
        column = a[:, j]
        alpha = column[j]
        below = jnp.where(rows > j, column, 0.0)
        xnorm = jnp.sqrt(jnp.sum(below * below))
        norm = jnp.sqrt(alpha * alpha + xnorm * xnorm)
        beta = -jnp.where(alpha >= 0, 1.0, -1.0) * norm
        trivial = xnorm == 0.0
        safe_beta = jnp.where(trivial, 1.0, beta)
        tau = jnp.where(trivial, 0.0, (beta - alpha) / safe_beta)
        scale = jnp.where(trivial, 0.0, 1.0 / jnp.where(trivial, 1.0, alpha - beta))
        v = jnp.where(rows == j, 1.0, below * scale)  # v_j = 1, zero above j
        a = a - tau * jnp.outer(v, v @ a)  # H_j = I - tau v v^T applied to the remaining columns
        vs.append(v)
        taus.append(tau)
    q = jnp.eye(n, r, dtype=jnp.float32)
    for v, tau in zip(reversed(vs), reversed(taus)):  # Q = H_0 ... H_{r-1} applied to I[:, :r]
        q = q - tau * jnp.outer(v, v @ q)
    return q
