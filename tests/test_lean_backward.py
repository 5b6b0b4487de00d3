"""The lean-backward operations (core.lean_backward): the plain composition's values and gradients,
while keeping fewer arrays for the backward pass."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from lowrax.core import layers
from lowrax.core.dropout import inverted_dropout
from lowrax.core.lean_backward import dropout_then_contract, gated, input_saving, masked_softmax


def plain_masked_softmax(scores, mask):
    return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(scores.dtype).min), axis=-1)


def weighted_sum(fn, weights):
    return lambda *xs: jnp.sum(fn(*xs) * weights)


def test_masked_softmax_matches_the_plain_composition_with_an_all_masked_row():
    keys = jax.random.split(jax.random.key(0), 3)
    scores = jax.random.normal(keys[0], (2, 3, 5, 7))
    mask = jax.random.bernoulli(keys[1], 0.6, (2, 1, 5, 7)).at[0, 0, 2].set(False)  # one row sees nothing
    weights = jax.random.normal(keys[2], scores.shape)
    np.testing.assert_allclose(masked_softmax(scores, mask), plain_masked_softmax(scores, mask), rtol=0, atol=0)
    lean = jax.grad(weighted_sum(masked_softmax, weights))(scores, mask)
    plain = jax.grad(weighted_sum(plain_masked_softmax, weights))(scores, mask)
    np.testing.assert_allclose(lean, plain, atol=1e-6)
    assert not np.any(lean[0, :, 2])  # the masked row's scores get no gradient, as through `where`


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_activations_and_their_gated_products_match_the_plain_functions(name):
    plain = layers._PLAIN_ACTIVATIONS[name]
    keys = jax.random.split(jax.random.key(1), 3)
    x, up, weights = (jax.random.normal(k, (4, 6)) * 3 for k in keys)
    np.testing.assert_allclose(layers.activation(name)(x), plain(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(weighted_sum(layers.activation(name), weights))(x),
                               jax.grad(weighted_sum(plain, weights))(x), rtol=1e-6, atol=1e-7)
    glu, plain_glu = layers.gated_activation(name), lambda g, u: plain(g) * u
    np.testing.assert_allclose(glu(x, up), plain_glu(x, up), rtol=1e-6)
    for lean_grad, plain_grad in zip(jax.grad(weighted_sum(glu, weights), argnums=(0, 1))(x, up),
                                     jax.grad(weighted_sum(plain_glu, weights), argnums=(0, 1))(x, up)):
        np.testing.assert_allclose(lean_grad, plain_grad, rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_keep_their_dtype_through_the_backward():
    x = jax.random.normal(jax.random.key(2), (3, 4)).astype(jnp.bfloat16)
    glu = gated(jax.nn.silu)
    grads = jax.grad(lambda g, u: jnp.sum(glu(g, u).astype(jnp.float32)), argnums=(0, 1))(x, x)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    assert jax.grad(lambda v: jnp.sum(input_saving(jax.nn.gelu)(v).astype(jnp.float32)))(x).dtype == jnp.bfloat16


def residual_bytes(fn, *args) -> int:
    """Bytes of the float32 arrays fn's backward keeps, leaving out its own arguments (read from JAX's
    public `print_saved_residuals` report: one `f32[2,3] why` line per array)."""
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        print_saved_residuals(fn, *args)
    total = 0
    for line in report.getvalue().splitlines():
        found = re.match(r"\s*f32\[([\d,]*)\]\s+(.*)", line)
        if found and "argument" not in found.group(2):
            total += 4 * int(np.prod([int(n) for n in found.group(1).split(",") if n]))
    return total


def test_the_backward_keeps_one_array_where_the_plain_composition_keeps_several():
    scores = jnp.ones((2, 4, 16, 16))
    mask = jnp.ones((2, 1, 16, 16), bool)
    size = scores.size * 4
    assert residual_bytes(plain_masked_softmax, scores, mask) >= 2 * size
    assert residual_bytes(masked_softmax, scores, mask) == size  # the probabilities
    gate = jnp.ones((8, 32))
    assert residual_bytes(lambda g, u: jax.nn.silu(g) * u, gate, gate) > 0
    assert residual_bytes(gated(jax.nn.silu), gate, gate) == 0  # gate and up are the arguments themselves
    assert residual_bytes(input_saving(lambda v: jax.nn.gelu(v, approximate=False)), gate) == 0


@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_attention_dropout_then_values_matches_the_plain_composition(rate):
    """dropout_then_contract draws inverted_dropout's mask: values and gradients equal dropping out the
    probabilities and contracting them with the values (rate 1 drops everything)."""
    keys = jax.random.split(jax.random.key(4), 3)
    probs = jax.nn.softmax(jax.random.normal(keys[0], (2, 3, 2, 16, 20)), -1)
    values = jax.random.normal(keys[1], (2, 20, 3, 8))
    spec = "bkgts,bskd->btkgd"

    def plain(p, v):
        return jnp.einsum(spec, inverted_dropout(p, rate, keys[2]), v)

    def lean(p, v):
        return dropout_then_contract(spec, p, v, rate, keys[2])

    np.testing.assert_allclose(lean(probs, values), plain(probs, values), rtol=1e-6, atol=1e-7)
    loss = lambda fn: lambda p, v: jnp.sum(jnp.sin(fn(p, v)))  # noqa: E731
    for got, want in zip(jax.grad(loss(lean), (0, 1))(probs, values), jax.grad(loss(plain), (0, 1))(probs, values)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
