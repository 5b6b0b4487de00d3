"""LoRA's data-driven inits, CorDA, EVA and LoRA-GA: statistics of calibration batches, then factors.

    calibration = lowrax.lora.calibrate(model, params, cfg, batches)
    params = lowrax.wrap(params, cfg, key, model=model, calibration=calibration)

`calibrate` runs the base model over the batches once and keeps, per targeted kernel:

    corda    the covariance of the kernel's inputs, each row scaled by its largest input (as
             PEFT's `preprocess_corda` hook, one row per sample), averaged over rows
    eva      the inputs' principal components and explained-variance ratios (an exact PCA of
             every calibration token; PEFT's incremental PCA reaches the same directions as it
             converges)
    lora_ga  the gradient of the model's loss with respect to the kernel, averaged over batches

and `starts` turns them into the adapters' starting factors:

    corda    W^T C = U S V^T, V' = C^-1 V: a = V'_r sqrt(S_r / s), b = sqrt(S_r / s) U_r^T over the
             top (ipm) or bottom (kpm) r directions; base = W - s a b
    eva      a = the top components, b = 0; ranks redistributed over the layers by explained
             variance (a layer gets up to rho * r, the total stays sum r; rank 0 leaves it plain)
    lora_ga  G^T = U S V^T: a and b from disjoint halves of the top 2r directions, scaled
             (`stable`: b * out^(1/4) / sqrt(gamma)); base = W - s a b

Inputs are the tokens the attention mask keeps (and for EVA, those the loss mask keeps,
PEFT's `use_label_mask`). Batches are dicts of numpy arrays: input_ids [b, t], optionally
attention_mask and loss_mask [b, t] (LoRA-GA's loss: next-token for a causal LM, or the
`loss_fn` given; `lowrax train` passes its task loss).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.adapters.lora import inits
from lowrax.adapters.lora.node import lora_scale
from lowrax.adapters.targets import pattern_value
from lowrax.core.kernels import dense_kernel, is_kernel_type
from lowrax.core.node import is_adapter, is_node
from lowrax.core.probes import Probe, recording
from lowrax.core.tables import get_path, set_path
from lowrax.errors import LowraxError

DEFAULTS = {"corda_method": "ipm", "eva_rho": 2.0, "eva_whiten": False, "eva_adjust_scaling_factors": True,
            "lora_ga_direction": "ArB2r", "lora_ga_scale": "stable", "lora_ga_stable_gamma": 16.0}


def option(cfg, name: str):
    """An init option's value, or its default when the config leaves it unset."""
    value = getattr(cfg, name)
    return DEFAULTS[name] if value is None else value


@dataclass(frozen=True)
class LoraCalibration:
    """What `calibrate` measured for one init: {module name: {statistic: numpy array}}; or, once
    `resolved` (`initial_factors`), each module's starting factors {"a", "b", "alpha"} themselves."""

    init: str
    statistics: dict[str, dict[str, np.ndarray]]
    rows: int
    tokens: int
    # eva: names whose inputs equal an earlier target's (q, k and v read the same hidden states)
    same_input: dict[str, str] = field(default_factory=dict)
    resolved: bool = False


def initial_factors(params, init: str) -> LoraCalibration:
    """The calibrated adapters of `params` (right after wrap) as a resolved calibration: wrapping the
    same base with it rebuilds the same nodes, rewritten base included, without the data."""
    from lowrax.adapters.wrap import adapter_nodes

    factors = {}
    for name, node in adapter_nodes(params).items():
        rank = node.a.shape[1]
        alpha = node.scale * (rank ** 0.5 if node.rslora else rank)
        factors[name] = {"a": np.asarray(node.a), "b": np.asarray(node.b), "alpha": np.float64(alpha)}
    return LoraCalibration(init, factors, 0, 0, resolved=True)


def save_initial_factors(calibration: LoraCalibration, path) -> None:
    """Write a resolved calibration as one safetensors file (atomically: a crash leaves none)."""
    import json
    import os
    from pathlib import Path

    from lowrax.io.safetensors_dir import write_tensor_file

    tensors = {f"{name}.{key}": np.asarray(calibration.statistics[name][key], np.float32)
               for name in calibration.statistics for key in ("a", "b")}
    alphas = {name: float(v["alpha"]) for name, v in calibration.statistics.items()}
    path = Path(path)
    staging = path.with_name(path.name + ".partial")
    write_tensor_file(tensors, staging, metadata={"init": calibration.init, "alphas": json.dumps(alphas)})
    os.replace(staging, path)


def load_initial_factors(path) -> LoraCalibration:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        alphas = json.loads(meta["alphas"])
        factors = {name: {"a": tensors[f"{name}.a"], "b": tensors[f"{name}.b"], "alpha": alpha}
                   for name, alpha in alphas.items()}
        return LoraCalibration(meta["init"], factors, 0, 0, resolved=True)
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise LowraxError(f"{path} is not a LoRA init file lowrax wrote (its calibrated starting factors): {e}") from None


def calibrate(model, params, cfg, batches, *, loss_fn=None, progress: bool = True) -> LoraCalibration:
    """Statistics of `batches` for `cfg.init` (corda, eva or lora_ga) on the kernels `cfg` targets.

    batches: an iterable of dicts {input_ids [b, t], attention_mask?, loss_mask?, labels?} of
    arrays, or one such dict. loss_fn(model, params, batch) -> (loss sum, count, ...): LoRA-GA's
    loss (default for a causal LM: the next-token loss over the loss mask)."""
    from lowrax.adapters.wrap import targeted_modules

    if cfg.init not in inits.CALIBRATED_INITS:
        raise LowraxError(f"calibrate is for the inits that need data ({', '.join(inits.CALIBRATED_INITS)}); "
                          f"this config has init={cfg.init!r}")
    modules, targets = targeted_modules(params, cfg, model.model_type)
    paths = {name: modules[name] for name in targets}
    for name, path in paths.items():
        if is_adapter(get_path(params, path)):
            raise LowraxError(f"{name} already holds an adapter: calibrate the base model's params")
    batches = [batches] if isinstance(batches, dict) else batches
    bar = _progress(progress, cfg.init)
    if cfg.init == "lora_ga":
        result = _gradients(model, params, paths, batches, loss_fn, bar)
    else:
        result = _input_statistics(model, params, paths, batches, cfg, bar)
    if bar is not None:
        bar.close()
    return result


def _progress(enabled: bool, init: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"{init} calibration", unit="batch")


def _checked(batch: Any, index: int) -> dict[str, jnp.ndarray]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise LowraxError(f"calibration batch {index} must be a dict with input_ids [rows, tokens] (and optionally "
                          f"attention_mask, loss_mask, labels), got {type(batch).__name__}")
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise LowraxError(f"calibration batch {index}: input_ids must be a non-empty 2-D integer array [rows, tokens], "
                          f"got {ids.dtype} of shape {ids.shape}")
    out = {k: jnp.asarray(v) for k, v in batch.items()}
    out.setdefault("attention_mask", jnp.ones(ids.shape, jnp.int32))
    for key in ("attention_mask", "loss_mask"):
        if key in out and out[key].shape != ids.shape:
            raise LowraxError(f"calibration batch {index}: {key} has shape {out[key].shape}, expected {ids.shape}")
    return out


def _probed(params, paths: dict[str, tuple]):
    out = jax.tree.map(lambda x: x, params, is_leaf=is_node)
    for name, path in paths.items():
        set_path(out, path, Probe(get_path(params, path), name))
    return out


def _row_inputs(recorded, batch, kept):
    """{name: (inputs [b, t, in] float32, token mask [b, t])} from the probes' flat inputs."""
    b, t = batch["input_ids"].shape
    out = {}
    for name, x in recorded:
        if name in out or name not in kept:
            continue
        if x.shape[0] != b * t:
            raise LowraxError(f"{name} sees {x.shape[0]} input rows for a batch of {b} x {t} tokens; the data-driven "
                              "inits calibrate models whose projections see one row per token")
        out[name] = x.astype(jnp.float32).reshape(b, t, -1)
    return out


def _corda_program(model, kept: tuple[str, ...]):
    def statistics(probed, batch):
        with recording() as recorded:
            model.apply(probed, batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"] > 0
        out = {}
        for name, x in _row_inputs(recorded, batch, kept).items():
            # PEFT's hook divides each sample's inputs by |their largest value| (signed max, not max |x|)
            top = jnp.max(jnp.where(mask[:, :, None], x, -jnp.inf), axis=(1, 2))
            xs = jnp.where(mask[:, :, None], x / jnp.abs(top)[:, None, None], 0.0)
            out[name] = {"covariance": jnp.einsum("bti,btj->ij", xs, xs)}
        return out, jnp.sum(jnp.any(mask, axis=1)), jnp.sum(mask)

    return jax.jit(statistics)


def _eva_program(model, kept: tuple[str, ...]):
    def statistics(probed, batch, shifts):
        with recording() as recorded:
            model.apply(probed, batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"] > 0
        if "loss_mask" in batch:
            mask = mask & (batch["loss_mask"] > 0)
        weight = mask.astype(jnp.float32)[:, :, None]
        count = jnp.sum(mask)
        out = {}
        for name, x in _row_inputs(recorded, batch, kept).items():
            shift = shifts[name] if shifts is not None else jnp.sum(x * weight, (0, 1)) / jnp.maximum(count, 1)
            d = (x - shift) * weight  # sums about a shift near the mean keep float32 accurate
            out[name] = {"shift": shift, "sum": jnp.sum(d, (0, 1)), "scatter": jnp.einsum("bti,btj->ij", d, d)}
        return out, jnp.sum(jnp.any(mask, axis=1)), count

    return jax.jit(statistics)


def _input_statistics(model, params, paths, batches, cfg, bar) -> LoraCalibration:
    names = tuple(paths)
    probed = _probed(params, paths)
    totals: dict[str, dict[str, np.ndarray]] = {}
    same_input: dict[str, str] = {}
    rows = tokens = 0
    kept = names
    program = None
    shifts = None
    for index, raw in enumerate(batches):
        batch = _checked(raw, index)
        if program is None:
            program = _corda_program(model, kept) if cfg.init == "corda" else _eva_program(model, kept)
        stats, n_rows, n_tokens = program(probed, batch) if cfg.init == "corda" else program(probed, batch, shifts)
        stats = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
        if index == 0:
            # Kernels fed the same inputs (q, k, v) are measured once, as PEFT's EVA hashes inputs.
            same_input = _equal_inputs(stats, names)
            kept = tuple(n for n in names if n not in same_input)
            program = None
            if cfg.init == "eva":
                shifts = {n: jnp.asarray(stats[n]["shift"], jnp.float32) for n in kept}
        for name in kept:
            for key, value in stats[name].items():
                if key != "shift":
                    totals.setdefault(name, {}).setdefault(key, 0.0)
                    totals[name][key] = totals[name][key] + value
        rows, tokens = rows + int(n_rows), tokens + int(n_tokens)
        if bar is not None:
            bar.update(1)
    if rows == 0:
        raise LowraxError(f"{cfg.init} calibration saw no tokens: give it batches with at least one unmasked token")
    if cfg.init == "corda":
        statistics = {n: {"covariance": totals[n]["covariance"] / rows} for n in kept}
    else:
        statistics = {n: _principal_components(totals[n], tokens, _eva_limit(cfg, n)) for n in kept}
    for name, same in same_input.items():
        statistics[name] = statistics[same]
    return LoraCalibration(cfg.init, statistics, rows, tokens, same_input if cfg.init == "eva" else {})


def _equal_inputs(stats: dict, names: tuple[str, ...]) -> dict[str, str]:
    """{name: the earlier name whose first-batch statistics are bit-equal}."""
    out, seen = {}, {}
    for name in names:
        fingerprint = tuple(np.asarray(v).tobytes() for _, v in sorted(stats[name].items()))
        if fingerprint in seen:
            out[name] = seen[fingerprint]
        else:
            seen[fingerprint] = name
    return out


def _eva_limit(cfg, name: str) -> int:
    """The most components a layer can be given: round(rho * its rank)."""
    return max(1, round(int(pattern_value(name, cfg.rank_pattern, cfg.r)) * option(cfg, "eva_rho")))


def _principal_components(total: dict, count: int, k: int) -> dict[str, np.ndarray]:
    """The inputs' PCA (as PEFT's IncrementalPCA reports it): components [k, in] with each one's
    largest entry positive (its svd_flip), explained-variance ratios [k], singular values [k]."""
    mean_offset = total["sum"] / count
    covariance = total["scatter"] / count - np.outer(mean_offset, mean_offset)  # about the mean, in float64
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order].T
    signs = np.sign(vectors[np.arange(len(vectors)), np.argmax(np.abs(vectors), axis=1)])
    return {"components": (vectors * signs[:, None])[:k], "ratios": (values / values.sum())[:k],
            "singular": np.sqrt(values * count)[:k]}


def next_token_loss(model, params, batch) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of next-token losses over the loss mask, its count): LoRA-GA's default loss for a causal LM
    (the trainer passes its own task loss)."""
    logits = model.apply(params, batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def _gradients(model, params, paths, batches, loss_fn, bar) -> LoraCalibration:
    if loss_fn is None and not model.is_causal_lm:
        raise LowraxError("lora_ga needs the loss whose gradient it follows: for a model that is not a causal LM "
                          "pass calibrate(..., loss_fn=fn) with fn(model, params, batch) -> (loss sum, count)")
    loss_of = loss_fn or next_token_loss
    kernels = {}
    for name, path in paths.items():
        kernel = get_path(params, path)
        if is_kernel_type(kernel):
            raise LowraxError(f"{name} is a {type(kernel).__name__}: LoRA-GA needs full-precision gradients, "
                              "so calibrate before quantizing (as PEFT refuses quantized layers)")
        kernels[name] = kernel

    def mean_loss(ks, batch):
        tree = jax.tree.map(lambda x: x, params, is_leaf=is_node)
        for name, path in paths.items():
            set_path(tree, path, ks[name])
        total, count = loss_of(model, tree, batch)[:2]
        return total / jnp.maximum(count, 1)

    @jax.jit
    def accumulate(summed, ks, batch):
        grads = jax.grad(mean_loss)(ks, batch)
        return jax.tree.map(lambda s, g: s + g.astype(jnp.float32), summed, grads)

    summed = {n: jnp.zeros(k.shape, jnp.float32) for n, k in kernels.items()}
    count = rows = tokens = 0
    for index, raw in enumerate(batches):
        batch = _checked(raw, index)
        if model.is_causal_lm:
            batch.setdefault("loss_mask", batch["attention_mask"])
        summed = accumulate(summed, kernels, batch)
        count += 1
        rows += int(batch["input_ids"].shape[0])
        tokens += int(jnp.sum(batch["attention_mask"] > 0))
        if bar is not None:
            bar.update(1)
    if count == 0:
        raise LowraxError("lora_ga calibration got no batches")
    statistics = {n: {"gradient": np.asarray(g) / count} for n, g in summed.items()}
    return LoraCalibration("lora_ga", statistics, rows, tokens)


# ---- from statistics to starting factors -------------------------------------------------------


@dataclass(frozen=True)
class CalibratedStart(inits.Start):
    alpha: float = 8.0


def starts(bases: dict, cfg, ranks: dict[str, int], alphas: dict[str, float], calibration, key, adapter_dtype):
    """{name: CalibratedStart or None (EVA: no rank)} for a calibrated init; None for the others."""
    if cfg.init not in inits.CALIBRATED_INITS:
        return None
    if calibration is None:
        return None  # build's own error names the missing calibration
    if not isinstance(calibration, LoraCalibration):
        raise LowraxError(f"calibration must be what lowrax.lora.calibrate returns (a LoraCalibration), got "
                          f"{type(calibration).__name__}")
    if calibration.init != cfg.init:
        raise LowraxError(f"this calibration was computed for init {calibration.init!r}, the config has {cfg.init!r}")
    missing = sorted(set(bases) - set(calibration.statistics))
    if missing and not (calibration.resolved and cfg.init == "eva"):  # EVA may leave a layer unadapted
        raise LowraxError(f"the calibration has no statistics for {', '.join(missing[:3])}: calibrate with the same "
                          "config (target_modules) and model as wrap")
    if calibration.resolved:
        return {name: _stored_start(name, base, cfg, calibration.statistics.get(name), adapter_dtype)
                for name, base in bases.items()}
    if cfg.init == "eva":
        ranks, alphas = eva_ranks(cfg, ranks, alphas, calibration, list(bases))
    out = {}
    for i, (name, base) in enumerate(bases.items()):
        r, alpha = ranks[name], alphas[name]
        if r == 0:
            out[name] = None
            continue
        stats = calibration.statistics[name]
        scale = lora_scale(alpha, r, cfg.use_rslora)
        w = dense_kernel(base)
        if cfg.init == "corda":
            start = corda_start(w, stats["covariance"], r, scale, option(cfg, "corda_method"), adapter_dtype)
        elif cfg.init == "eva":
            start = eva_start(w.shape, stats, r, option(cfg, "eva_whiten"), adapter_dtype)
        else:
            start = lora_ga_start(w, stats["gradient"], r, scale, cfg, jax.random.fold_in(key, i), adapter_dtype)
        out[name] = CalibratedStart(start.a, start.b, start.base, alpha=alpha)
    return out


def _stored_start(name: str, base, cfg, stored: dict | None, adapter_dtype) -> CalibratedStart | None:
    if stored is None:
        return None  # EVA gave it no rank
    a, b = (jnp.asarray(stored[k], adapter_dtype) for k in ("a", "b"))
    alpha = float(stored["alpha"])
    if a.shape[0] != base.shape[0] or b.shape[1] != base.shape[1]:
        raise LowraxError(f"the stored start of {name} is {a.shape} x {b.shape}, which does not fit its kernel "
                          f"{base.shape}: the init file belongs to another model")
    if not inits.rewrites_base(cfg.init):
        return CalibratedStart(a, b, None, alpha=alpha)
    scale = lora_scale(alpha, a.shape[1], cfg.use_rslora)
    start = inits.rewritten(dense_kernel(base), a, b, scale, adapter_dtype)
    return CalibratedStart(start.a, start.b, start.base, alpha=alpha)


def corda_start(w, covariance, r: int, scale: float, method: str, adapter_dtype) -> inits.Start:
    """CorDA's factors from the input covariance C [in, in] (damped until it inverts well, as PEFT)."""
    c = np.asarray(covariance, np.float32)
    if not np.all(np.isfinite(c)):
        raise LowraxError("CorDA's input covariance holds inf or nan: check the calibration data")
    eye = np.eye(c.shape[0], dtype=np.float32)
    damp = 0.01
    while True:
        fixed = c + eye * np.float32(np.mean(np.diag(c)) * damp)
        inverse = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inverse - eye) < 0.05:
            break
        damp *= 2
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).T @ jnp.asarray(fixed), full_matrices=False)
    v = (vt @ jnp.asarray(inverse)).T  # [in, k]
    chosen = slice(0, r) if method == "ipm" else slice(s.shape[0] - r, s.shape[0])
    root = jnp.sqrt(s[chosen] / scale)
    return inits.rewritten(w, v[:, chosen] * root[None, :], root[:, None] * u[:, chosen].T, scale, adapter_dtype)


def eva_start(shape: tuple, stats: dict, r: int, whiten: bool, adapter_dtype) -> inits.Start:
    components = np.asarray(stats["components"][:r], np.float32)
    if whiten:
        components = components / np.sqrt(stats["singular"][:r]).astype(np.float32)[:, None]
    return inits.Start(jnp.asarray(components.T, adapter_dtype), jnp.zeros((r, shape[1]), adapter_dtype))


def eva_ranks(cfg, ranks: dict, alphas: dict, calibration: LoraCalibration, names: list[str]) -> tuple[dict, dict]:
    """EVA's rank redistribution (PEFT's `_get_rank_distribution`): the budget sum r goes to the
    components with the largest explained-variance ratios, a layer taking at most round(rho * r)."""
    rho = option(cfg, "eva_rho")
    same = {n: s for n, s in calibration.same_input.items() if n in ranks and s in ranks}
    limit = {n: round(ranks[n] * rho) for n in names}
    for name, first in same.items():
        group = [n for n in names if same.get(n, n) == first]
        for n in group:
            limit[n] = max(limit[m] for m in group)
    order = [n for n in names if n not in same] + [n for n in names if n in same]
    pairs = [(n, ratio) for n in order for ratio in calibration.statistics[n]["ratios"][:limit[n]]]
    budget = sum(ranks.values())
    ranked = sorted(range(len(pairs)), key=lambda i: -pairs[i][1])  # stable: ties keep their order
    counts = Counter(pairs[i][0] for i in ranked[:budget])
    new_ranks = {n: counts.get(n, 0) for n in names}
    for name, first in same.items():
        if new_ranks[first] < new_ranks[name]:
            new_ranks[first], new_ranks[name] = new_ranks[name], new_ranks[first]
    new_alphas = dict(alphas)
    if option(cfg, "eva_adjust_scaling_factors"):
        new_alphas = {n: alphas[n] * new_ranks[n] / ranks[n] if new_ranks[n] not in (0, ranks[n]) else alphas[n]
                      for n in names}
    return new_ranks, new_alphas


def lora_ga_start(w, gradient, r: int, scale: float, cfg, key, adapter_dtype) -> inits.Start:
    """LoRA-GA's factors from the averaged gradient G [in, out] (exact SVD where PEFT sketches one)."""
    g = jnp.asarray(gradient, jnp.float32).T  # PEFT's (out, in)
    u, s, vt = jnp.linalg.svd(g, full_matrices=False)
    u, s, vt = u[:, :2 * r], s[:2 * r], vt[:2 * r]
    direction = option(cfg, "lora_ga_direction")
    if direction == "ArBr":
        a_rows, b_cols = np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_rows, b_cols = np.arange(r, 2 * r), np.arange(r)
    elif direction == "ArB2r":
        a_rows, b_cols = np.arange(r), np.arange(r, 2 * r)
    else:  # random: one random half for both
        a_rows = b_cols = np.asarray(jax.random.permutation(key, 2 * r)[:r])
    lora_a = vt[a_rows]  # (r, in)
    s_b = s[b_cols]
    lora_b = u[:, b_cols] * s_b[None, :]  # (out, r)
    mode = option(cfg, "lora_ga_scale")
    if mode == "stable":
        lora_b = lora_b * (g.shape[0] ** 0.25 / option(cfg, "lora_ga_stable_gamma") ** 0.5)
    elif mode == "weight_svd":
        top = jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)[0]
        lora_b = jnp.where(s_b[0] > 0, lora_b * top / s_b[0], lora_b)
    elif mode == "gd_scale":
        lora_a, lora_b = lora_a / scale, lora_b / scale
    return inits.rewritten(w, lora_a.T, lora_b.T, scale, adapter_dtype)
