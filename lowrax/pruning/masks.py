"""Which weights a pruning method removes: magnitude and Wanda scores, unstructured and N:M.

Everything here works on a weight in torch's layout, `w` [out, in] (the transpose of a
lowrax kernel), and returns `pruned` [out, in], True where a weight is set to zero.
The definitions follow the papers and llmcompressor's implementations:

- magnitude, unstructured: the `int(sparsity * w.size)` smallest |w| of the whole layer
  (a weight tied with the largest of them is pruned too);
- Wanda (Sun et al. 2023): score |w_ij| * ||x_j||_2 (x_j: input feature j over the
  calibration tokens), compared within each output: the `int(sparsity * in)` lowest
  scores of every row (a stable sort breaks ties by position);
- N:M (2:4, 4:8): in every group of M consecutive inputs of an output, the N lowest
  scores are pruned, so exactly M - N of each M weights stay.
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from lowrax.errors import LowraxError

PATTERNS_HELP = "'unstructured' or N:M with 0 < N < M (e.g. '2:4', '4:8')"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """(n, m) of an N:M pattern (n weights pruned in every m), or (0, 0) for unstructured."""
    if pattern == "unstructured":
        return 0, 0
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if match is None:
        raise LowraxError(f"pruning pattern must be {PATTERNS_HELP}; got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise LowraxError(f"pruning pattern must be {PATTERNS_HELP}; got {pattern!r} (N must be between 0 and M)")
    return n, m


def pattern_sparsity(pattern: str, sparsity: float) -> float:
    """The fraction of weights the pattern removes: N/M for N:M, else `sparsity` (checked)."""
    n, m = parse_pattern(pattern)
    if m:
        return n / m
    if not 0.0 <= float(sparsity) < 1.0:
        raise LowraxError(f"pruning sparsity must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_groups(shape_in: int, pattern: str, name: str) -> None:
    _, m = parse_pattern(pattern)
    if m and shape_in % m:
        raise LowraxError(f"{name} has {shape_in} inputs, not a multiple of {m}: {pattern} pruning needs whole groups")


def lowest_in_groups(scores: jnp.ndarray, n: int, m: int) -> jnp.ndarray:
    """True at the n lowest scores of every group of m consecutive entries along the last axis."""
    out, k = scores.shape
    groups = scores.reshape(out, k // m, m)
    ranks = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
    return (ranks < n).reshape(out, k)


def magnitude_pruned(w: jnp.ndarray, sparsity: float, pattern: str = "unstructured") -> jnp.ndarray:
    """The weights magnitude pruning removes from w [out, in]."""
    n, m = parse_pattern(pattern)
    scores = jnp.abs(w.astype(jnp.float32))
    if m:
        return lowest_in_groups(scores, n, m)
    count = int(sparsity * w.size)
    if count == 0:
        return jnp.zeros(w.shape, bool)
    threshold = jnp.sort(scores.reshape(-1))[count - 1]
    return scores <= threshold


def wanda_scores(w: jnp.ndarray, input_sq_norms: jnp.ndarray) -> jnp.ndarray:
    """|w_ij| * ||x_j||: w [out, in], input_sq_norms [in] (squared norms; any common scale)."""
    return jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(input_sq_norms.astype(jnp.float32))[None, :]


def wanda_pruned(w: jnp.ndarray, input_sq_norms: jnp.ndarray, sparsity: float,
                 pattern: str = "unstructured") -> jnp.ndarray:
    """The weights Wanda removes from w [out, in] given the inputs' per-feature squared norms."""
    n, m = parse_pattern(pattern)
    scores = wanda_scores(w, input_sq_norms)
    if m:
        return lowest_in_groups(scores, n, m)
    count = int(w.shape[1] * sparsity)
    ranks = jnp.argsort(jnp.argsort(scores, axis=1, stable=True), axis=1, stable=True)
    return ranks < count
