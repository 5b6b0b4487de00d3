"""LoRA as one concatenated matmul (`adapters.lora.fused`): the same values and gradients as
`x @ W + dropout(x) @ A @ B` written out, and what it saves in a compiled backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrax.adapters.lora import fused
from lowrax.adapters.lora.node import LoraKernel
from lowrax.core.lean_backward import gated
from lowrax.core.linear import ACCUMULATION_BLOCK
from lowrax.core.node import dropped


def operands(rows: int, n_in: int, n_out: int = 48, rank: int = 4, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 4)
    shapes = ((rows, n_in), (n_in, n_out), (n_in, rank), (rank, n_out))
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


def written_out(rate, key):
    return lambda x, w, a, b: x @ w + dropped(x, rate, key) @ a @ b


def through_fused(rate, key):
    return lambda x, w, a, b: fused.base_plus_low_rank(x, w, a, b, rate, key)


def loss_of(fn):
    return lambda *args: jnp.sum(jnp.tanh(fn(*args)))


# 64 inputs: one block; 2 * ACCUMULATION_BLOCK: the CPU's blocked float32 sum, the low-rank
# columns joining the last block
@pytest.mark.parametrize("n_in", [64, 2 * ACCUMULATION_BLOCK])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_values_and_gradients_equal_the_written_out_form(n_in, rate):
    key = jax.random.key(7) if rate else None
    args = operands(300, n_in)
    np.testing.assert_allclose(through_fused(rate, key)(*args), written_out(rate, key)(*args), rtol=2e-5, atol=2e-4)
    expected = jax.grad(loss_of(written_out(rate, key)), argnums=(0, 1, 2, 3))(*args)
    got = jax.grad(loss_of(through_fused(rate, key)), argnums=(0, 1, 2, 3))(*args)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(e))))


def test_equal_to_rounding_in_float64():
    with jax.enable_x64(True):
        key = jax.random.key(3)
        args = operands(260, 2 * ACCUMULATION_BLOCK, dtype=jnp.float64)
        np.testing.assert_allclose(through_fused(0.25, key)(*args), written_out(0.25, key)(*args), rtol=1e-12)
        expected = jax.grad(loss_of(written_out(0.25, key)), argnums=(0, 1, 2, 3))(*args)
        got = jax.grad(loss_of(through_fused(0.25, key)), argnums=(0, 1, 2, 3))(*args)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_the_node_uses_it_from_the_row_threshold_on(monkeypatch):
    x, w, a, b = operands(fused.FUSED_FROM_ROWS, 64)
    node = LoraKernel(base=w, a=a, b=b, scale=2.0)
    calls = []
    original = fused.base_plus_low_rank
    monkeypatch.setattr("lowrax.adapters.lora.node.base_plus_low_rank",
                        lambda *args: calls.append(args[0].shape[0]) or original(*args))
    for rows in (fused.FUSED_FROM_ROWS - 1, fused.FUSED_FROM_ROWS):
        np.testing.assert_allclose(node.apply(x[:rows]), x[:rows] @ w + 2.0 * (x[:rows] @ a) @ b, rtol=2e-5, atol=2e-4)
    assert calls == [fused.FUSED_FROM_ROWS]


def test_a_gated_mlp_keeps_less_for_its_backward():
    """Gate and up projections with LoRA feeding a SwiGLU: written out, XLA fuses each add into the
    GLU's forward and backward and keeps both matmul outputs of each projection; fused, their sums."""
    rows, n_in, hidden = 1024, 64, 512
    keys = jax.random.split(jax.random.key(1), 7)
    x = jax.random.normal(keys[0], (rows, n_in))
    frozen = [jax.random.normal(keys[1], (n_in, hidden)), jax.random.normal(keys[2], (n_in, hidden))]
    factors = [jax.random.normal(keys[3], (n_in, 8)), jax.random.normal(keys[4], (8, hidden)),
               jax.random.normal(keys[5], (n_in, 8)), jax.random.normal(keys[6], (8, hidden))]
    glu = gated(jax.nn.silu)

    def temporaries(project):
        def loss(factors, frozen, x):
            gate = project(x, frozen[0], factors[0], factors[1])
            up = project(x, frozen[1], factors[2], factors[3])
            return jnp.sum(glu(gate, up) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(factors, frozen, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, one_matmul = temporaries(written_out(0.0, None)), temporaries(through_fused(0.0, None))
    assert one_matmul <= plain - rows * hidden * 4, (one_matmul, plain)  # at least one [rows, hidden] array less
