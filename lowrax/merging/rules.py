"""How task tensors are combined elementwise: task arithmetic, magnitude pruning, TIES and DARE,
as PEFT's `peft.utils.merge_utils` defines them (Yadav et al. 2023; Yu et al. 2023).

Every rule takes the task tensors of one parameter (same shape), one weight each, and for
DARE the kept elements (`keep`, one boolean mask per tensor), so a caller can draw them
from a PRNG key or inject them. jit-able and shape-static given `density` (outside a trace,
magnitude pruning selects on the host, in linear time).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError

LINEAR, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE = "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"
RULES = (LINEAR, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE)
NEEDS_DENSITY = (TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE)
RANDOM = (DARE_LINEAR, DARE_TIES)
SIGN_METHODS = ("total", "frequency")


def check_density(rule: str, density) -> None:
    if rule not in NEEDS_DENSITY:
        return
    if density is None:
        raise LowraxError(f"combination type {rule} prunes task tensors: give density= (the fraction kept, in [0, 1])")
    if density < 0:
        raise LowraxError(f"density must be >= 0 (the fraction of values kept), got {density}")


def largest_magnitudes(t: jnp.ndarray, k: int) -> jnp.ndarray:
    """t with only its k largest-magnitude elements kept (k >= 1; ties broken arbitrarily, as topk's)."""
    flat = t.reshape(-1)
    if isinstance(t, jax.core.Tracer):
        _, top = jax.lax.top_k(jnp.abs(flat), k)
    else:  # a linear-time selection on the host: XLA's top_k sorts (0.35 s for a 576 x 1536 delta)
        top = np.argpartition(-np.abs(np.asarray(flat)), k - 1)[:k]
    return (flat * jnp.zeros(t.size, t.dtype).at[top].set(1)).reshape(t.shape)


def magnitude_pruned(t: jnp.ndarray, density: float) -> jnp.ndarray:
    """t with all but its int(density * size) largest-magnitude elements set to 0."""
    k = int(density * t.size)
    return jnp.zeros_like(t) if k == 0 else largest_magnitudes(t, k)


def random_pruned(t: jnp.ndarray, density: float, keep: jnp.ndarray) -> jnp.ndarray:
    """DARE: the kept elements rescaled by 1 / density (so the expectation is t), the rest 0."""
    return jnp.where(keep, t, 0).astype(t.dtype) / density


def majority_sign_mask(stacked: jnp.ndarray, method: str) -> jnp.ndarray:
    """Where each task's sign agrees with the elected sign (the sign of the total, or of the
    count of signs), elected positive on a tie."""
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == jnp.where(magnitude >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(weighted: jnp.ndarray, agree: jnp.ndarray) -> jnp.ndarray:
    """The mean of the agreeing tasks' values (0 where none agrees)."""
    total = jnp.where(agree, weighted, 0).sum(axis=0)
    return total / jnp.maximum(agree.sum(axis=0), 1).astype(total.dtype)


def combine(rule: str, tensors: Sequence[jnp.ndarray], weights: Sequence[float], density: float | None = None,
            majority_sign_method: str = "total", keep: Sequence[jnp.ndarray] | None = None) -> jnp.ndarray:
    """One parameter's task tensors combined by `rule` with one weight each."""
    if rule not in RULES:
        raise LowraxError(f"unknown combination rule {rule!r}; expected one of {', '.join(RULES)}")
    if majority_sign_method not in SIGN_METHODS:
        raise LowraxError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {majority_sign_method!r}")
    check_density(rule, density)
    tensors = list(tensors)
    if rule in NEEDS_DENSITY and density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned", stacklevel=2)
    elif rule in (TIES, MAGNITUDE_PRUNE):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif rule in RANDOM:
        if keep is None or len(keep) != len(tensors):
            raise LowraxError(f"{rule} needs one keep mask per task tensor")
        tensors = [random_pruned(t, density, k) for t, k in zip(tensors, keep)]
    stacked = jnp.stack(tensors)
    w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if rule in (TIES, DARE_TIES):
        return disjoint_merge(stacked * w, majority_sign_mask(stacked, majority_sign_method))
    return (stacked * w).sum(axis=0)


def drawn_keep(key, name: str, index: int, density: float, shape) -> jnp.ndarray:
    """DARE's Bernoulli(density) keep mask for task tensor `index` of parameter `name`: one
    independent, reproducible draw per (name, index) from `key`."""
    h = 2166136261  # FNV-1a: a hash of the name that, unlike str's, is the same in every process
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) % (1 << 31)
    return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, h), index), density, shape)
