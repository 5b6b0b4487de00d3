"""The dense projection: blocked accumulation on CPU, and a plain backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrax.core import linear as ops


def _operands(k: int, rows: int = 24):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, 40)) / np.sqrt(k)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


@pytest.mark.parametrize("k, rows, dots", [
    (2 * ops.ACCUMULATION_BLOCK, 24, 1),  # few rows, two equal blocks: one batched dot
    (2 * ops.ACCUMULATION_BLOCK, ops.BATCHED_BLOCKS_BELOW_ROWS, 2),  # many rows: two sliced dots
    (3 * ops.ACCUMULATION_BLOCK + 5, 24, 4),  # 2309 is prime: four sliced dots
])
def test_blocked_matmul_equals_the_product(k, rows, dots):
    x, w = _operands(k, rows)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    blocked = np.asarray(jax.jit(ops.dense_matmul)(x, w), np.float64)
    assert np.abs(blocked - exact).max() <= 1e-5
    assert jax.jit(ops.dense_matmul).lower(x, w).as_text().count("dot_general") == dots


def test_short_contractions_stay_one_dot():
    x, w = _operands(ops.ACCUMULATION_BLOCK)
    assert jax.jit(ops.dense_matmul).lower(x, w).as_text().count("dot_general") == 1


@pytest.mark.parametrize("k", [2 * ops.ACCUMULATION_BLOCK, 2 * ops.ACCUMULATION_BLOCK + 1])
def test_blocked_matmul_gradients_equal_the_plain_ones(k):
    x, w = _operands(k)
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((24, 40)), jnp.float32)

    def loss(matmul):
        return lambda x, w: jnp.sum(matmul(x, w) * probe)

    ours = jax.grad(loss(ops.dense_matmul), argnums=(0, 1))(x, w)
    plain = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
    # The same products, but XLA may order the two graphs' float32 sums differently (it did on
    # one CI machine: 6 of 61440 elements 1.8e-6 apart, a few ulps of terms of magnitude ~5 that
    # cancel to 0.1-0.7); a wrong gradient would be off by orders of magnitude more.
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)


def test_bfloat16_stays_one_dot():
    x, w = _operands(2 * ops.ACCUMULATION_BLOCK)
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert jax.jit(ops.dense_matmul).lower(x, w).as_text().count("dot_general") == 1
