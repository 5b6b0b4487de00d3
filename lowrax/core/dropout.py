"""The models' own dropout, as transformers applies it in train mode (`hidden_dropout_prob`,
`attention_probs_dropout_prob`, GPT-2's `resid_pdrop` ...), and only in a training step.

A training step puts a PRNG key in the tree under `model_dropout` (`with_model_dropout`); a family
reads it back (`model_dropout_key`) and drops out at its config's sites. Without the key (every
forward outside a training step: evaluation, generation, scoring) the model is deterministic, as
transformers' is in eval mode. Each site draws from its own key folded from the step's, so a step is
a pure function of its key, and recomputing a layer in the backward pass (remat) redraws the same
mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DROPOUT_KEY = "model_dropout"  # the top-level tree entry a training step adds
LAYER_SITES = 1000  # keys below are the model's own sites (embeddings, head); layer i folds in LAYER_SITES + i


def with_model_dropout(params: dict, key) -> dict:
    return {**params, DROPOUT_KEY: key}


def model_dropout_key(params: Any):
    """The training step's dropout key, or None (no dropout) outside a training step."""
    return params.get(DROPOUT_KEY) if isinstance(params, dict) else None


def site_key(key, site: int):
    """The key of one dropout site (or of a layer, whose sites fold in again); None stays None."""
    return None if key is None else jax.random.fold_in(key, site)


def layer_key(key, index: int):
    return site_key(key, LAYER_SITES + index)


def dropped_out(x: jnp.ndarray, rate: float, key, site: int = 0) -> jnp.ndarray:
    """Inverted dropout at one of a model's sites (its key folded from `key`); `x` itself when there is
    no key or the rate is 0."""
    if key is None or not rate:
        return x
    return inverted_dropout(x, rate, jax.random.fold_in(key, site))


RATE_STEPS = 1 << 16  # a dropout rate is rounded to a multiple of 1 / RATE_STEPS


def keep_mask(shape: tuple, rate: float, key) -> tuple[jnp.ndarray | None, float]:
    """(boolean mask of the elements dropout keeps, the scale 1 / P(keep)) for `inverted_dropout`'s draw;
    (None, 1.0) without a key (outside a training step) or when the rate rounds to 0. Each element's
    draw is 16 random bits, two from one 32-bit word."""
    threshold = round(rate * RATE_STEPS)
    if key is None or threshold <= 0:
        return None, 1.0
    if threshold >= RATE_STEPS:
        return jnp.zeros(shape, bool), 0.0
    count = int(np.prod(shape))
    words = jax.random.bits(key, ((count + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:count].reshape(shape)  # no copy
    return halves >= threshold, RATE_STEPS / (RATE_STEPS - threshold)  # the scale keeps the mean


def inverted_dropout(x: jnp.ndarray, rate: float, key) -> jnp.ndarray:
    """Each element of x zeroed with probability `rate` (rounded to a multiple of 1/65536), the rest
    scaled so that the mean is kept. Each element's draw is 16 random bits: half the random bits of
    `jax.random.bernoulli` (a 32-bit float per element), whose generation is a large part of a CPU
    training step with dropout."""
    keep, scale = keep_mask(x.shape, rate, key)
    return x if keep is None else apply_keep_mask(x, keep, scale)


def apply_keep_mask(x: jnp.ndarray, keep: jnp.ndarray, scale: float) -> jnp.ndarray:
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))
