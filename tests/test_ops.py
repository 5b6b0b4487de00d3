"""The dense projection: blocked accumulation on CPU, and a plain backward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from lowrax import ops


def _operands(k: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, k)).astype(np.float32)
    w = (rng.standard_normal((k, 40)) / np.sqrt(k)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def test_blocked_matmul_equals_the_product():
    x, w = _operands(3 * ops.ACCUMULATION_BLOCK + 5)  # four blocks, uneven last one
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    blocked = np.asarray(jax.jit(ops.dense_matmul)(x, w), np.float64)
    assert np.abs(blocked - exact).max() <= 1e-5
    assert jax.jit(ops.dense_matmul).lower(x, w).as_text().count("dot_general") == 4


def test_short_contractions_stay_one_dot():
    x, w = _operands(ops.ACCUMULATION_BLOCK)
    assert jax.jit(ops.dense_matmul).lower(x, w).as_text().count("dot_general") == 1


def test_blocked_matmul_gradients_equal_the_plain_ones():
    x, w = _operands(2 * ops.ACCUMULATION_BLOCK + 1)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((24, 40)), jnp.float32)

    def loss(matmul):
        return lambda x, w: jnp.sum(matmul(x, w) * probe)

    ours = jax.grad(loss(ops.dense_matmul), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
