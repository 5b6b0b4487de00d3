"""Torch's default initialisations, as the adapter methods' PEFT counterparts use them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kaiming_uniform(key, shape: tuple[int, ...], torch_fan_in: int, dtype=jnp.float32) -> jnp.ndarray:
    """PEFT's `kaiming_uniform_(a=sqrt(5))` (also torch's default for nn.Linear weights and
    biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in of the torch tensor."""
    bound = 1.0 / math.sqrt(torch_fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def torch_linear(key, d_in: int, d_out: int, dtype=jnp.float32) -> dict:
    """A torch nn.Linear(d_in, d_out) as initialised by torch, as {"kernel" [in, out], "bias" [out]}."""
    k_w, k_b = jax.random.split(key)
    return {"kernel": kaiming_uniform(k_w, (d_in, d_out), d_in, dtype), "bias": kaiming_uniform(k_b, (d_out,), d_in, dtype)}
