"""`combine_adapters`: PEFT's `add_weighted_adapter` for named LoRA adapters.

    params = lowrax.combine_adapters(params, ["a", "b"], [0.7, 0.3], "ab", combination_type="ties", density=0.5)

The same combination types, defaults, new rank and scaling as PEFT 0.21:
- `cat`: the weighted factors side by side (rank: the sum of the ranks); exact.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: A and B combined
  separately by the rule, each weighted by sqrt(|w * scale|) (the sign on A); all ranks equal.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd`: the
  adapters' weight deltas combined by the rule, then truncated to `svd_rank` (default: the
  largest rank) by SVD, optionally clamped at the `svd_clamp` quantile.
The new adapter has lora_alpha = r (scale 1; sqrt(r) when the first adapter uses rsLoRA, as
PEFT's config copy gives) and adapts every kernel any of the combined adapters adapts.
It is an adapter like any other: `set_adapter`, `extract_adapter` to train it, `save_peft`.

DARE drops elements at random: `key` draws the masks; `keep_masks(layer, part, index, shape)`
injects them instead (part "a" [in, r] / "b" [r, out] for the factor-wise types, "delta"
[in, out] for the SVD types; index: the adapter's position in `adapters`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from lowrax.adapters.lora.node import LoraKernel, lora_scale
from lowrax.adapters.named.named import add_adapter, base_params, node_paths
from lowrax.adapters.slots import LoraSlots
from lowrax.core.slot_directory import directory_of
from lowrax.errors import LowraxError
from lowrax.core.tables import set_path
from lowrax.merging import rules

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_TYPES[:1] + ("cat",) + SVD_TYPES[:1] + FACTOR_TYPES[1:] + SVD_TYPES[1:]

KeepMasks = Callable[[str, str, int, tuple], jnp.ndarray]


def _rule(combination_type: str) -> str:
    """The elementwise rule of a combination type (the SVD types: the rule before the SVD)."""
    if combination_type == "svd":
        return rules.LINEAR
    return combination_type.removesuffix("_svd")


def combine_adapters(params: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                     combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                     svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                     majority_sign_method: str = "total", *, key=None, keep_masks: KeepMasks | None = None) -> Any:
    """params with a new named adapter `adapter_name`: the named LoRA adapters `adapters`
    combined with `weights` as PEFT's `add_weighted_adapter` does (see the module docstring)."""
    directory = directory_of(params)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters:
        raise LowraxError("combine_adapters needs at least one adapter name")
    for name in adapters:
        if name not in directory.names():
            raise LowraxError(f"Adapter {name} does not exist (loaded: {', '.join(directory.names()) or 'none'})")
    if len(weights) != len(adapters):
        raise LowraxError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if adapter_name in directory.names():
        raise LowraxError(f"an adapter named {adapter_name!r} is already loaded; delete_adapter it first "
                          "(PEFT's add_weighted_adapter silently keeps the old one)")
    if combination_type not in COMBINATION_TYPES:
        raise LowraxError(f"Invalid combination_type: {combination_type}; expected one of {', '.join(COMBINATION_TYPES)}")
    if len(adapters) == 1:  # as PEFT: one adapter can only be scaled
        combination_type = "linear"
    if svd_driver is not None:
        raise LowraxError(f"svd_driver={svd_driver!r} picks a cuSOLVER routine in torch; lowrax's SVD is XLA's: leave it None")
    if majority_sign_method not in rules.SIGN_METHODS:
        raise LowraxError(f"majority_sign_method must be one of {', '.join(rules.SIGN_METHODS)}, got {majority_sign_method!r}")
    slots = [directory.slot_of(n) for n in adapters]
    layers = _layers(params, slots)  # {path: (slot node, {index in adapters: (a, b, scale)})}
    ranks = [max((f[i][0].shape[1] for _, f in layers.values() if i in f), default=0) for i in range(len(adapters))]
    if combination_type in FACTOR_TYPES:
        check_equal_ranks(dict(zip(adapters, ranks)), combination_type)
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    rule = _rule(combination_type) if combination_type != "cat" else None
    if rule is not None:
        rules.check_density(rule, density)
    if rule in rules.RANDOM and keep_masks is None:
        if key is None:
            raise LowraxError(f"{combination_type} drops elements at random: pass key=jax.random.key(seed)")
        keep_masks = _drawn_masks(key, density)
    first = directory.entry(slots[0])
    scale = lora_scale(new_rank, new_rank, first.rslora)  # PEFT: r = lora_alpha = new rank, use_rslora copied

    tree = base_params(params)
    for path, (node, factors) in layers.items():
        layer = ".".join(path[:-1])
        if combination_type == "cat":
            a, b = _cat(factors, weights, new_rank)
        elif combination_type in FACTOR_TYPES:
            a, b = _factor_wise(rule, layer, factors, weights, density, majority_sign_method, keep_masks)
        else:
            a, b = _svd(rule, layer, factors, weights, new_rank, density, majority_sign_method, keep_masks,
                        svd_clamp, svd_full_matrices)
        set_path(tree, path, LoraKernel(base=node.base, a=a, b=b, scale=scale, dropout=first.dropout,
                                        rslora=first.rslora))
    return add_adapter(params, adapter_name, tree)


def _layers(params, slots: list[int]) -> dict:
    """For each kernel some of the adapters adapt: its slot node and {position: (a, b, scale)}."""
    out = {}
    for path, node in node_paths(params).items():
        if not isinstance(node, LoraSlots):
            continue
        ranks = jax.device_get(node.rank)
        factors = {i: (node.a[:, s, : int(ranks[s])], node.b[s, : int(ranks[s])], float(node.scale[s]))
                   for i, s in enumerate(slots) if ranks[s] > 0}
        if factors:
            out[path] = (node, factors)
    return out


def _drawn_masks(key, density: float) -> KeepMasks:
    """Bernoulli(density) keep masks, one independent draw per (layer, part, adapter)."""
    return lambda layer, part, index, shape: rules.drawn_keep(key, f"{layer}/{part}", index, density, shape)


def _cat(factors: dict, weights, new_rank: int):
    order = sorted(factors)
    a = jnp.concatenate([factors[i][0] * (weights[i] * factors[i][2]) for i in order], axis=1)
    b = jnp.concatenate([factors[i][1] for i in order], axis=0)
    pad = new_rank - a.shape[1]
    return jnp.pad(a, ((0, 0), (0, pad))), jnp.pad(b, ((0, pad), (0, 0)))


def _masks(keep_masks, layer: str, part: str, order, shape) -> list | None:
    if keep_masks is None:
        return None
    masks = []
    for i in order:
        mask = jnp.asarray(keep_masks(layer, part, i, shape), bool)
        if mask.shape != tuple(shape):
            raise LowraxError(f"keep mask for {layer} {part} (adapter {i}) has shape {mask.shape}, expected {tuple(shape)}")
        masks.append(mask)
    return masks


def check_equal_ranks(ranks: dict, combination_type: str) -> None:
    """The factor-wise types combine A and B entry by entry: every adapter needs the same rank (PEFT's rule)."""
    if combination_type in FACTOR_TYPES and len(set(ranks.values())) > 1:
        raise LowraxError(f"All adapters must have the same r value when using combination_type {combination_type} "
                          f"(ranks: {ranks}); use cat or an svd type")


def _factor_wise(rule, layer, factors: dict, weights, density, sign_method, keep_masks):
    """A and B combined separately, each weighted by sqrt(|w * scale|), the sign on A (PEFT)."""
    order = sorted(factors)
    signed = [weights[i] * factors[i][2] for i in order]
    w_a = [math.sqrt(abs(w)) * (1 if w >= 0 else -1) for w in signed]
    w_b = [math.sqrt(abs(w)) for w in signed]
    out = []
    for part, idx, w in (("a", 0, w_a), ("b", 1, w_b)):
        tensors = [factors[i][idx] for i in order]
        keep = _masks(keep_masks, layer, part, order, tensors[0].shape) if rule in rules.RANDOM else None
        out.append(rules.combine(rule, tensors, w, density, sign_method, keep))
    return out[0], out[1]


def _svd(rule, layer, factors: dict, weights, new_rank, density, sign_method, keep_masks, clamp, full_matrices):
    """The weight deltas combined by `rule`, then the best rank-`new_rank` factors (PEFT's
    orientation: the SVD of the [out, in] delta, U * S to B, Vh to A)."""
    order = sorted(factors)
    if rule == rules.LINEAR:  # the weighted sum of low-rank deltas is itself low-rank: factor it without forming it
        a_cat = jnp.concatenate([factors[i][0].astype(jnp.float32) * (weights[i] * factors[i][2]) for i in order], 1)
        b_cat = jnp.concatenate([factors[i][1].astype(jnp.float32) for i in order], axis=0)
        u, vh = _low_rank_svd_factors(a_cat, b_cat, new_rank, clamp)
    else:
        deltas = [f[2] * (f[0].astype(jnp.float32) @ f[1].astype(jnp.float32)) for f in (factors[i] for i in order)]
        keep = _masks(keep_masks, layer, "delta", order, deltas[0].shape) if rule in rules.RANDOM else None
        delta = rules.combine(rule, deltas, [weights[i] for i in order], density, sign_method, keep)
        u, vh = svd_factors(delta.T, new_rank, clamp, full_matrices)
    a, b = vh.T, u.T
    pad = new_rank - a.shape[1]  # a kernel smaller than the rank
    return jnp.pad(a, ((0, 0), (0, pad))), jnp.pad(b, ((0, pad), (0, 0)))


def svd_factors(delta_t: jnp.ndarray, rank: int, clamp: float | None = None, full_matrices: bool = True):
    """(U * S [out, rank], Vh [rank, in]) of a delta [out, in], both clipped to +-(the `clamp`
    quantile of their joined values) when clamp is given (PEFT's rule, after kohya-ss).

    The SVD leaves each singular pair's sign free and libraries choose differently, so a
    clamped result matches another library's only where their choices agree; the unclamped
    product U * S @ Vh does not depend on them. full_matrices is accepted for PEFT's signature:
    the leading vectors, and so the result, are the same either way."""
    return _svd_factors(delta_t, rank, clamp)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _low_rank_svd_factors(a: jnp.ndarray, b: jnp.ndarray, rank: int, clamp: float | None):
    """svd_factors of (a @ b).T for a [in, k], b [k, out] with k small: QR of both factors and the
    SVD of the k x k core, the same singular triplets at a fraction of a full SVD's cost."""
    qa, ra = jnp.linalg.qr(a)  # a = qa @ ra
    qb, rb = jnp.linalg.qr(b.T)  # b.T = qb @ rb, so (a @ b).T = qb @ (rb @ ra.T) @ qa.T
    uc, s, vch = jnp.linalg.svd(rb @ ra.T, full_matrices=False)
    return _clamped((qb @ uc)[:, :rank] * s[:rank], (vch @ qa.T)[:rank], clamp)


def _clamped(u, vh, clamp):
    if clamp is not None:
        high = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -high, high), jnp.clip(vh, -high, high)
    return u, vh


@functools.partial(jax.jit, static_argnums=(1, 2))
def _svd_factors(delta_t: jnp.ndarray, rank: int, clamp: float | None):
    # The reduced SVD: its leading `rank` vectors are the full one's, without computing the
    # [max(out, in)]^2 basis the truncation throws away (PEFT's svd_full_matrices changes
    # only that cost). Compiled once per kernel shape, not dispatched op by op per kernel.
    u, s, vh = jnp.linalg.svd(delta_t, full_matrices=False)
    return _clamped(u[:, :rank] * s[:rank], vh[:rank], clamp)
