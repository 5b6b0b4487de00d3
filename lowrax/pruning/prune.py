"""`lowrax.prune`: one-shot pruning of every transformer layer's linear weights.

    pruned, report = lowrax.prune(params, model, calibration_ids, method="sparsegpt", sparsity=0.5)
    pruned, report = lowrax.prune(params, model, calibration_ids, method="wanda", pattern="2:4")
    pruned, report = lowrax.prune(params, model, method="magnitude", sparsity=0.25)   # no data needed

Each pruned kernel becomes a `SparseKernel` (the zeroed weight and its mask), so LoRA over the
pruned base trains as over any base, and saving or merging can keep the sparsity. Only the
linear layers inside the transformer layers are pruned (embeddings and output heads stay
dense, as in the papers).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.node import is_node
from lowrax.adapters.targets import linear_modules
from lowrax.errors import LowraxError
from lowrax.core import tables
from lowrax.core.kernels import is_kernel_type
from lowrax.pruning import calibrate, masks
from lowrax.sparse.kernel import sparse_kernel
from lowrax.pruning.sparsegpt import DEFAULT_BLOCKSIZE, DEFAULT_DAMPENING, sparsegpt

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


def prune(params: Any, model, calibration_ids=None, method: str = "sparsegpt", sparsity: float = 0.5,
          pattern: str = "unstructured", *, attention_mask=None, chunk_rows: int = 8,
          blocksize: int = DEFAULT_BLOCKSIZE, dampening: float = DEFAULT_DAMPENING, ignore: tuple = (),
          measure_error: bool = True, progress: bool = True) -> tuple[Any, dict]:
    """(params with each pruned kernel a SparseKernel, report).

    method: "magnitude" (|w| over the layer), "wanda" (|w| * input norm, per output) or
    "sparsegpt" (masks by the inverse Hessian, remaining weights updated). sparsity: the
    fraction removed when pattern is "unstructured"; an N:M pattern ("2:4", "4:8") removes N
    of every M consecutive input weights of each output instead. calibration_ids [rows, tokens]
    (with attention_mask, 0 at padding): the activations Wanda and SparseGPT need, flowing
    layer by layer through the already-pruned layers, `chunk_rows` rows at a time; with them
    every method's report also gives each layer's relative reconstruction error
    ||X W - X W'|| / ||X W|| on its calibration inputs X. blocksize, dampening: SparseGPT's
    columns per lazy update and Hessian dampening (fraction of its mean diagonal). ignore:
    substrings of module names to leave dense. measure_error=False skips the error report (and,
    for magnitude and Wanda, the Hessians it needs: faster).

    report: {"method", "pattern", "sparsity" (of the pruned layers' weights), "model_sparsity"
    (of every weight), "layers": {module: {"sparsity", "relative_error"?, "loss"? (SparseGPT's
    own estimate), "seconds"}}, "calibration": {"rows", "tokens"}, "seconds"}.
    """
    _check_arguments(params, model, calibration_ids, method, chunk_rows)
    n, m = masks.parse_pattern(pattern)
    fraction = masks.pattern_sparsity(pattern, sparsity)
    ids, weights = _calibration(calibration_ids, attention_mask)
    kernels = _kernel_paths(params)
    started = time.perf_counter()
    report_layers: dict = {}
    replacements: dict[tuple, Any] = {}
    chunks = [(ids[i:i + chunk_rows], weights[i:i + chunk_rows]) for i in range(0, ids.shape[0], chunk_rows)]
    replays: list = [None] * len(chunks)
    measure = calibration_ids is not None
    bar = _progress(progress, getattr(model.config, "num_layers", None), method)
    for layer in itertools.count():
        first = calibrate.layer_call(model, params, *_padded(chunks[0], chunk_rows), layer, replays[0])
        if first is None:
            break
        layer_params = first.params
        del first  # each chunk's inputs are rebuilt when needed: the device holds one chunk at a time

        def chunk_calls():
            for k, chunk in enumerate(chunks):
                yield k, chunk, calibrate.layer_call(model, params, *_padded(chunk, chunk_rows), layer, replays[k])

        names = {id(leaf): kernels[id(leaf)] for leaf in jax.tree.leaves(layer_params) if id(leaf) in kernels}
        names = {i: p for i, p in names.items() if not any(s in ".".join(p[:-1]) for s in ignore)}
        # probes are named within the layer, so every layer shares one compiled statistics program
        within = _names_within(layer_params, names)
        running = calibrate.RunningStatistics()
        if measure:
            for _, (chunk_ids, chunk_weights), call in chunk_calls():
                calibrate.layer_statistics(call, calibrate.with_probes(call.params, within),
                                           _padded_weights(chunk_weights, chunk_rows), running,
                                           rows=int(chunk_ids.shape[0]),
                                           want_hessian=method == "sparsegpt" or measure_error)
            running.rename({within[i]: ".".join(path[:-1]) for i, path in names.items()})
        pruned_here = {}
        for leaf in jax.tree.leaves(layer_params):
            if id(leaf) in names:
                name = ".".join(names[id(leaf)][:-1])
                if bar is not None:
                    bar.set_postfix_str(name, refresh=True)
                new, report_layers[name] = _timed_prune(leaf, name, method, pattern, fraction, running, blocksize,
                                                        dampening)
                pruned_here[id(leaf)] = replacements[names[id(leaf)]] = new
        for k, _, call in chunk_calls():  # without data: one placeholder row, to find the next layer
            pruned_params = jax.tree.map(lambda x: pruned_here.get(id(x), x), call.params)
            replays[k] = calibrate.host(calibrate.run_layer(call, pruned_params))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not replacements:
        raise LowraxError("no linear layer was pruned: the model has no transformer layers with linear kernels, "
                          f"or `ignore` ({ignore}) left none")
    out = _replaced(params, replacements)
    return out, _report(method, pattern, fraction, params, replacements, report_layers, ids, weights, measure,
                        time.perf_counter() - started)


def _prune_kernel(kernel, method, fraction, n, m, running, name, blocksize, dampening):
    """(SparseKernel, per-layer stats) for one kernel [in, out]."""
    w = kernel.T.astype(jnp.float32)  # torch's (out, in): the methods compare along inputs
    stats: dict = {}
    if method == "magnitude":
        pruned = masks.magnitude_pruned(w, fraction, _pattern_of(n, m))
        new_w = jnp.where(pruned, 0.0, w)
    elif method == "wanda":
        pruned = masks.wanda_pruned(w, running.sq_norms[name], fraction, _pattern_of(n, m))
        new_w = jnp.where(pruned, 0.0, w)
    else:
        new_w, pruned, loss = sparsegpt(w, running.hessian[name], dampening, sparsity=fraction, n=n, m=m,
                                        blocksize=blocksize)
        stats["loss"] = float(loss)
    if name in running.hessian:
        stats["relative_error"] = float(relative_error(w, new_w, running.hessian[name]))
    stats["sparsity"] = float(jnp.mean(pruned.astype(jnp.float32)))
    return sparse_kernel(new_w.T.astype(kernel.dtype), ~pruned.T, _pattern_of(n, m)), stats


@jax.jit
def relative_error(w: jnp.ndarray, pruned_w: jnp.ndarray, hessian: jnp.ndarray) -> jnp.ndarray:
    """||X W^T - X W'^T|| / ||X W^T|| from H proportional to X^T X (w, pruned_w [out, in])."""
    diff = w - pruned_w
    return jnp.sqrt(jnp.sum((diff @ hessian) * diff) / jnp.maximum(jnp.sum((w @ hessian) * w), 1e-30))


def _pattern_of(n: int, m: int) -> str:
    return f"{n}:{m}" if m else "unstructured"


def _check_arguments(params, model, calibration_ids, method: str, chunk_rows) -> None:
    if method not in METHODS:
        raise LowraxError(f"pruning method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise LowraxError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if model.is_seq2seq or model.is_image_model:
        raise LowraxError(f"pruning runs layer by layer through one stack on token rows (decoder LMs and text "
                          f"encoders); {model.model_type} is not supported")
    if method in CALIBRATED and calibration_ids is None:
        raise LowraxError(f"{method} pruning needs calibration_ids: token ids [rows, tokens] of text like the "
                          "model's (lowrax prune uses the embedded text set by default)")
    _refuse_wrapped(params)


def _timed_prune(kernel, name: str, method: str, pattern: str, fraction: float, running, blocksize: int,
                 dampening: float):
    """(the pruned SparseKernel, its report entry with the seconds it took)."""
    n, m = masks.parse_pattern(pattern)
    masks.check_groups(kernel.shape[0], pattern, name)
    tick = time.perf_counter()
    new, stats = _prune_kernel(kernel, method, fraction, n, m, running, name, blocksize, dampening)
    jax.block_until_ready(new.kernel)
    stats["seconds"] = round(time.perf_counter() - tick, 4)
    return new, stats


def _refuse_wrapped(params: Any) -> None:
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: is_node(x) or is_kernel_type(x)):
        if is_node(leaf):
            raise LowraxError("prune the base model before adding adapters: these params hold "
                              f"{type(leaf).__name__} nodes (prune, then lowrax.wrap the pruned params)")
        if is_kernel_type(leaf):
            raise LowraxError(f"these params hold {type(leaf).__name__} kernels: prune a model in full precision "
                              "(load it without quantization, prune, then quantize the pruned params)")


def _names_within(layer_params: Any, names: dict[int, tuple]) -> dict[int, str]:
    """id -> dotted module name inside the layer's own tree, for the kernels named in `names`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(layer_params)[0]:
        if id(leaf) in names:
            out[id(leaf)] = ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path[:-1])
    return out


def _kernel_paths(params: Any) -> dict[int, tuple]:
    """id of every linear kernel array -> its tree path (the layer-wise driver meets kernels by identity)."""
    return {id(tables.get_path(params, path)): path for path in linear_modules(params).values()}


def _calibration(calibration_ids, attention_mask):
    """(ids [rows, tokens] int32, token weights [rows, tokens] float32); a single token without data."""
    if calibration_ids is None:
        return np.zeros((1, 2), np.int32), np.ones((1, 2), np.float32)
    ids = np.asarray(calibration_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise LowraxError(f"calibration_ids must be integer token ids [rows, tokens]; got shape {ids.shape}, "
                          f"dtype {ids.dtype}")
    if attention_mask is None:
        return ids.astype(np.int32), np.ones(ids.shape, np.float32)
    mask = np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise LowraxError(f"attention_mask has shape {mask.shape}; calibration_ids have {ids.shape}")
    return ids.astype(np.int32), mask.astype(np.float32)


def _padded(chunk, rows: int):
    """A chunk grown to `rows` rows by repeating its last (so every chunk compiles alike)."""
    ids, weights = chunk
    extra = rows - ids.shape[0]
    if extra > 0:
        ids = np.concatenate([ids, np.repeat(ids[-1:], extra, axis=0)])
        weights = np.concatenate([weights, np.repeat(weights[-1:], extra, axis=0)])
    return jnp.asarray(ids), jnp.asarray(weights.astype(np.int32))


def _padded_weights(weights, rows: int) -> jnp.ndarray:
    """Token weights flattened in the layer's row order; added rows weigh nothing."""
    extra = rows - weights.shape[0]
    if extra > 0:
        weights = np.concatenate([weights, np.zeros((extra,) + weights.shape[1:], weights.dtype)])
    return jnp.asarray(weights.reshape(-1))


def _replaced(params: Any, replacements: dict[tuple, Any]) -> Any:
    out = jax.tree.map(lambda x: x, params)  # fresh containers; arrays shared
    for path, value in replacements.items():
        tables.set_path(out, path, value)
    return out


def _report(method, pattern, fraction, params, replacements, layers, ids, weights, measured, seconds) -> dict:
    pruned_zeros = sum(int((~np.asarray(k.mask)).sum()) for k in replacements.values())
    pruned_total = sum(k.size for k in replacements.values())
    model_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"method": method, "pattern": pattern, "target_sparsity": fraction,
            "sparsity": pruned_zeros / pruned_total, "model_sparsity": pruned_zeros / model_total,
            "pruned_weights": pruned_total, "model_weights": model_total, "layers": layers,
            "calibration": {"rows": int(ids.shape[0]) if measured else 0,
                            "tokens": int(weights.sum()) if measured else 0},
            "seconds": round(seconds, 2)}


def _progress(enabled: bool, total, method: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{method} pruning", unit="layer")
