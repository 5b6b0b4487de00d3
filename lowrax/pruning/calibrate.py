"""Layer-wise calibration: each layer's linear inputs, with every earlier layer already pruned.

The pruning methods that look at activations (Wanda, SparseGPT) see one transformer layer at
a time, as the papers and llmcompressor do: the calibration rows go through layer i, the
statistics of every linear input inside it are gathered (from the layer as it still is),
the layer is pruned, and the rows go through the pruned layer to become layer i + 1's input.

Any family works unchanged: `Model.layer` (every family's loop calls its layers through it)
consults `models.base.LAYER_HOOK`, which this module sets to stop the forward at the layer
being calibrated and take its input, or to hand earlier layers' stored outputs straight on.
The rows stream in chunks of `chunk_rows`: the device holds one chunk's activations at a time,
and the layer outputs waiting for the next layer live in host memory.

Per linear input X [tokens, in] (padding tokens excluded) the statistics are llmcompressor's
running means over calibration rows: the Hessian H = 2/rows * X^T X (SparseGPT; also used to
report every method's reconstruction error) and the squared norms sum_t X_tj^2 / rows (Wanda).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.probes import Probe, recording
from lowrax.models.base import LAYER_HOOK


class _Stop(Exception):
    """Raised inside the forward once the layer being calibrated has been reached."""


@dataclass
class LayerCall:
    """What the forward passed to one layer for one chunk of rows."""

    layer_fn: Callable
    params: Any
    x: Any
    rest: tuple


class _Interceptor:
    """The layer hook: layers before `target` return `replay` (the stored output of the layer before
    the target, for this chunk) without computing; the target layer's call is kept and the forward stopped."""

    def __init__(self, target: int, replay: Any):
        self.target, self.replay, self.calls, self.call = target, replay, 0, None

    def __call__(self, layer_fn):
        def run(params, x, *rest):
            index, self.calls = self.calls, self.calls + 1
            if index < self.target:
                return self.replay
            self.call = LayerCall(layer_fn, params, x, rest)
            raise _Stop

        return run


def layer_call(model, params, input_ids, attention_mask, target: int, replay: Any) -> LayerCall | None:
    """The inputs of layer `target` for these rows (None past the last layer), given `replay`,
    the output of layer `target - 1` for the same rows (ignored for layer 0)."""
    interceptor = _Interceptor(target, replay)
    token = LAYER_HOOK.set(interceptor)
    try:
        model.apply(params, input_ids, attention_mask)
    except _Stop:
        return interceptor.call
    finally:
        LAYER_HOOK.reset(token)
    return None


def _cache_key(layer_fn: Callable):
    """A key equal for equal layer functions: families may pass a fresh functools.partial per call
    (GPT-2 binds the layer index), which would otherwise compile once per chunk."""
    if isinstance(layer_fn, functools.partial):
        return (layer_fn.func, layer_fn.args, tuple(sorted(layer_fn.keywords.items())))
    return layer_fn


_COMPILED: dict = {}


def _jitted(kind: str, layer_fn: Callable, make: Callable):
    key = (kind, _cache_key(layer_fn))
    if key not in _COMPILED:
        if len(_COMPILED) >= 64:  # models come and go in one process (tests): keep the newest few
            _COMPILED.clear()
        _COMPILED[key] = make(layer_fn)
    return _COMPILED[key]


def _statistics_program(layer_fn: Callable, want_hessian: bool):
    def statistics(probed_params, x, rest, token_weights, hessian_scale):
        with recording() as recorded:
            layer_fn(probed_params, x, *rest)
        out = {}
        for name, inputs in recorded:
            if inputs.shape[0] != token_weights.shape[0]:
                raise ValueError(f"{name}'s input has {inputs.shape[0]} rows, expected one per token "
                                 f"({token_weights.shape[0]})")
            xs = inputs.astype(jnp.float32) * token_weights[:, None]
            stats = {"sq_norms": jnp.linalg.norm(xs, axis=0) ** 2}
            if want_hessian:
                scaled = hessian_scale * xs  # llmcompressor scales before the product: the same rounding
                stats["gram"] = scaled.T @ scaled
            out[name] = stats
        return out

    return jax.jit(statistics)


def _layer_program(layer_fn: Callable):
    return jax.jit(lambda params, x, rest: layer_fn(params, x, *rest))


def layer_statistics(call: LayerCall, probed_params: Any, token_weights: jnp.ndarray, running: "RunningStatistics",
                     rows: int, want_hessian: bool) -> None:
    """Add this chunk (`rows` calibration rows; token_weights 0 at padding) to the running statistics."""
    scale = np.float32(np.sqrt(2.0 / (running.rows + rows)))
    program = _jitted(f"statistics-{want_hessian}", call.layer_fn, lambda fn: _statistics_program(fn, want_hessian))
    chunk = program(probed_params, call.x, call.rest, token_weights, scale)
    running.add(chunk, rows)


def run_layer(call: LayerCall, params: Any) -> Any:
    """The layer's output for this chunk with `params` (the pruned layer) in place of its own."""
    return _jitted("layer", call.layer_fn, _layer_program)(params, call.x, call.rest)


def with_probes(layer_params: Any, names: dict[int, str]) -> Any:
    """layer_params with each kernel whose id is in `names` replaced by a probe of that name."""
    return jax.tree.map(lambda x: Probe(x, names[id(x)]) if id(x) in names else x, layer_params)


class RunningStatistics:
    """llmcompressor's running means over calibration rows, updated chunk by chunk."""

    def __init__(self):
        self.rows = 0
        self.hessian: dict[str, jnp.ndarray] = {}
        self.sq_norms: dict[str, jnp.ndarray] = {}

    def rename(self, names: dict[str, str]) -> None:
        """Key the statistics by other names (the layer's own -> the whole tree's)."""
        self.hessian = {names[k]: v for k, v in self.hessian.items()}
        self.sq_norms = {names[k]: v for k, v in self.sq_norms.items()}

    def add(self, chunk: dict, rows: int) -> None:
        """chunk: per module the inputs' squared norms and (optionally) the Gram matrix of the
        inputs scaled by sqrt(2 / rows so far), as `layer_statistics` computes them."""
        before, self.rows = self.rows, self.rows + rows
        keep = before / self.rows
        for name, stats in chunk.items():
            self.sq_norms[name] = self.sq_norms.get(name, 0.0) * keep + stats["sq_norms"] / self.rows
            if "gram" in stats:
                self.hessian[name] = self.hessian.get(name, 0.0) * keep + stats["gram"]


def host(tree: Any) -> Any:
    """A layer output kept in host memory until the next layer needs it."""
    return jax.tree.map(np.asarray, tree)
