"""The exact Cayley transform of skew-symmetric blocks, without LAPACK.

    R = (I - S)(I + S)^-1        S [..., b, b] skew-symmetric

(I - S) and (I + S) commute, so R also solves (I + S) R = I - S. That system is solved here by
Gauss-Jordan elimination in plain array operations, without pivoting: every leading principal minor
of I + S is det(I + S_k) for a skew-symmetric S_k, whose eigenvalues are +-i*lambda, so it is a
product of (1 + lambda^2) >= 1 and never vanishes. `jnp.linalg.solve` would call LAPACK, and on the
CPU (jax 0.10.2, 2 cores) one jitted program holding twenty independent `jnp.linalg.solve` calls on
[48, 32, 32] batches never finished, every thread waiting (two finished in 0.6 s): a BOFT or exact-Cayley
OFT step over every layer of SmolLM2 is such a program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def solve_unpivoted(a: jnp.ndarray, rhs: jnp.ndarray) -> jnp.ndarray:
    """x with a x = rhs for batches a [..., b, b], rhs [..., b, c], by Gauss-Jordan without pivoting
    (for matrices whose leading principal minors are far from zero)."""
    b = a.shape[-1]
    augmented = jnp.concatenate([a, rhs], axis=-1)

    def eliminate(k, m):
        pivot_row = m[..., k, :] / m[..., k, k][..., None]
        factors = m[..., :, k]
        m = m - factors[..., :, None] * pivot_row[..., None, :]
        return m.at[..., k, :].set(pivot_row)

    return jax.lax.fori_loop(0, b, eliminate, augmented)[..., b:]


def cayley(s: jnp.ndarray) -> jnp.ndarray:
    """(I - S)(I + S)^-1 for skew-symmetric S [..., b, b]."""
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    return solve_unpivoted(eye + s, jnp.broadcast_to(eye - s, s.shape))
