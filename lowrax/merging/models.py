"""Full-model merging of fine-tuned checkpoints of one architecture, as mergekit (0.1.5) does it.

    merged = lowrax.merge_models(base, [ft_a, ft_b], "ties", weights=[0.6, 0.4], density=0.5)

Every tensor is merged on its own from the task vectors delta_i = model_i - base:
- `task_arithmetic`: base + lambda * sum_i w_i delta_i (normalize: divided by sum_i w_i; default off)
- `ties`: each delta_i keeps its int(density * n) largest magnitudes (at least one); the signs
  elected from the sum of the weighted deltas; the agreeing weighted deltas summed and (normalize,
  default on) divided by the agreeing weights
- `dare_linear` / `dare_ties`: each delta_i keeps elements with probability density, the kept ones
  rescaled to the delta's L1 norm (rescale, default on); then as task arithmetic / TIES (normalize
  default off)
- `linear`: sum_i w_i model_i (normalize, default on: divided by sum_i w_i); no base needed
- `slerp`: spherical interpolation from base (t = 0) to the one model (t = 1), each tensor as one
  vector; linear where the two are (anti)collinear (|cos| > 0.9995)
DARE's masks come from `key`, or from `keep_masks(path, index, shape)` to inject them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lowrax.core.kernels import dense_kernel, is_kernel_type, is_quantized
from lowrax.core.node import is_node
from lowrax.errors import LowraxError
from lowrax.merging.rules import drawn_keep, largest_magnitudes, majority_sign_mask

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
_SPARSIFY = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}
_CONSENSUS = ("ties", "dare_ties")
_DEFAULT_NORMALIZE = {"linear": True, "ties": True}
_DEFAULT_RESCALE = ("dare_linear", "dare_ties")
SLERP_LINEAR_ABOVE = 0.9995  # |cos| above which SLERP interpolates linearly (mergekit's dot_threshold)

KeepMasks = Callable[[str, int, tuple], jnp.ndarray]


def merge_models(base: Any, models: Sequence[Any], method: str = "task_arithmetic", weights: Sequence[float] | None = None,
                 density: float | Sequence[float] = 1.0, normalize: bool | None = None, rescale: bool | None = None,
                 lambda_: float = 1.0, t: float = 0.5, consensus: str = "sum", *, key=None,
                 keep_masks: KeepMasks | None = None, progress: bool = False) -> Any:
    """The merged parameter tree (plain arrays, in base's dtypes) of `models` over `base`
    (see the module docstring); trees from `lowrax.load_pretrained` of one architecture."""
    models = list(models)
    if method not in METHODS:
        raise LowraxError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if not models:
        raise LowraxError("merge_models needs at least one fine-tuned model")
    if method == "slerp":
        if len(models) != 1:
            raise LowraxError(f"slerp interpolates the base and one model, got {len(models)} models")
        if not 0.0 <= t <= 1.0:
            raise LowraxError(f"slerp's t must be in [0, 1] (0: the base, 1: the model), got {t}")
    elif method != "linear" or weights is not None:
        if weights is None:
            raise LowraxError(f"{method} needs weights=, one per model")
        if len(weights) != len(models):
            raise LowraxError(f"give one weight per model: {len(models)} models, {len(weights)} weights")
    if base is None and method != "linear":
        raise LowraxError(f"{method} merges task vectors against a base model: give base=")
    if consensus not in ("sum", "count"):
        raise LowraxError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    densities = [float(density)] * len(models) if isinstance(density, (int, float)) else [float(d) for d in density]
    if len(densities) != len(models):
        raise LowraxError(f"give one density per model (or one for all): {len(models)} models, {len(densities)} densities")
    if method in _SPARSIFY and any(d < 0 for d in densities):
        raise LowraxError(f"density is the fraction of each task vector kept: >= 0, got {densities}")
    if method in ("dare_linear", "dare_ties") and keep_masks is None:
        if key is None:
            raise LowraxError(f"{method} drops elements at random: pass key=jax.random.key(seed)")
        keep_masks = lambda path, i, shape: drawn_keep(key, path, i, densities[i], shape)  # noqa: E731
    normalize = _DEFAULT_NORMALIZE.get(method, False) if normalize is None else normalize
    rescale = (method in _DEFAULT_RESCALE) if rescale is None else rescale
    weights = [1.0] * len(models) if weights is None else [float(w) for w in weights]

    reference = base if base is not None else models[0]
    paths = _check_alike(reference, models if base is not None else models[1:])
    flat = [_flat(m) for m in models]
    flat_base = _flat(base) if base is not None else None
    out = {}
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc=f"merging ({method})", unit="tensor")
    for path in iterator:
        tensors = [f[path] for f in flat]
        dtype = (flat_base or flat[0])[path].dtype
        if method == "slerp":
            merged = slerp(t, flat_base[path], tensors[0])
        elif method == "linear":
            merged = _weighted(tensors, weights, normalize)
        else:
            merged = _task_vectors(method, path, flat_base[path], tensors, weights, densities, normalize, rescale,
                                   lambda_, consensus, keep_masks)
        out[path] = merged.astype(dtype)
    return _unflat(out)


def _flat(tree: Any) -> dict[str, jnp.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: is_node(x) or is_kernel_type(x))[0]
    out = {}
    for path, leaf in leaves:
        name = "/".join(str(p.key) for p in path)
        if is_kernel_type(leaf) and not is_quantized(leaf):  # a pruned kernel: its zeros are weights like any
            leaf = dense_kernel(leaf)
        if is_node(leaf) or is_kernel_type(leaf) or not hasattr(leaf, "dtype"):
            raise LowraxError(f"{name} is {type(leaf).__name__}: merge_models takes plain weights "
                              "(merge adapters in first with lowrax.merge; load NF4 models unquantized)")
        out[name] = leaf
    return out


def _unflat(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def _check_alike(reference: Any, others: list) -> list[str]:
    """The tensor names of `reference`, or an error naming the first tensor another tree lacks or shapes differently."""
    ref = _flat(reference)
    for i, other in enumerate(others):
        theirs = _flat(other)
        for name in sorted(set(ref) ^ set(theirs)):
            where = "the base" if name in ref else f"model {i}"
            raise LowraxError(f"{name} is only in {where}: models merged together must share one architecture")
        for name, value in ref.items():
            if tuple(value.shape) != tuple(theirs[name].shape):
                raise LowraxError(f"{name} has shape {tuple(theirs[name].shape)} in one model and {tuple(value.shape)} "
                                  "in another: models merged together must share one architecture and vocabulary")
    return sorted(ref)


def _weighted(tensors, weights, normalize: bool) -> jnp.ndarray:
    stacked = jnp.stack([x.astype(jnp.float32) for x in tensors])
    w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    total = (stacked * w).sum(axis=0)
    divisor = sum(weights)
    return total / (divisor if abs(divisor) >= 1e-8 else 1.0) if normalize else total


def magnitude_kept(delta: jnp.ndarray, density: float) -> jnp.ndarray:
    """delta with its max(1, int(density * n)) largest magnitudes kept (all of it for density >= 1)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.size == 0:
        return jnp.zeros_like(delta)
    return largest_magnitudes(delta, max(1, int(density * delta.size)))


def l1_rescaled(delta: jnp.ndarray, kept: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
    """kept scaled back to delta's L1 norm (unchanged when either norm is below eps)."""
    before, after = jnp.abs(delta).sum(), jnp.abs(kept).sum()
    return jnp.where((before < eps) | (after < eps), kept, kept * (before / jnp.where(after < eps, 1, after)))


def _task_vectors(method, path, base, tensors, weights, densities, normalize, rescale, lambda_, consensus, keep_masks):
    base32 = base.astype(jnp.float32)
    deltas = []
    for i, (x, d) in enumerate(zip(tensors, densities)):
        delta = x.astype(jnp.float32) - base32
        kind = _SPARSIFY.get(method)
        if kind == "magnitude":
            kept = magnitude_kept(delta, d)
            delta = l1_rescaled(delta, kept) if rescale and d < 1 else kept
        elif kind == "random" and d < 1:
            mask = jnp.asarray(keep_masks(path, i, tuple(delta.shape)), bool)
            if mask.shape != delta.shape:
                raise LowraxError(f"keep mask for {path} (model {i}) has shape {mask.shape}, expected {delta.shape}")
            kept = jnp.where(mask, delta, 0.0)
            delta = l1_rescaled(delta, kept) if rescale else kept
        deltas.append(delta)
    stacked = jnp.stack(deltas)
    w = jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (stacked.ndim - 1))
    weighted = stacked * w
    if method in _CONSENSUS:
        agree = majority_sign_mask(weighted, "total" if consensus == "sum" else "frequency")
        mixed = jnp.where(agree, weighted, 0.0).sum(axis=0)
        divisor = jnp.where(agree, jnp.broadcast_to(w, weighted.shape), 0.0).sum(axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(axis=0)
        divisor = sum(weights)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base32 + mixed


def slerp(t: float, v0: jnp.ndarray, v1: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """Spherical interpolation of two tensors as flat vectors (float32), linear when near-collinear."""
    a, b = v0.astype(jnp.float32).reshape(-1), v1.astype(jnp.float32).reshape(-1)
    na, nb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    na, nb = jnp.where(na > eps, na, 1.0), jnp.where(nb > eps, nb, 1.0)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1.0, 1.0)
    linear = jnp.abs(dot) > SLERP_LINEAR_ABOVE
    theta = jnp.arccos(jnp.where(linear, 0.0, dot))
    sin_theta = jnp.where(linear, 1.0, jnp.sin(theta))
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(v0.shape)
