"""The block's residual stream: the one hook point of bottleneck adapters.

Every family adds a sub-block's output h to its input x through `add_residual`:
`x + h` in pre-norm decoders, `norm(x + h)` in post-norm encoders (BERT). An adapter
node stored at the layer's site (`Model.bottleneck_sites()`) computes that sum
instead, with its bottleneck in the stream, as AdapterHub's `BottleneckLayer` does.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp


def add_residual(h: jnp.ndarray, x: jnp.ndarray, adapter=None, norm: Callable | None = None) -> jnp.ndarray:
    """h: the sub-block's output, x: its input (the residual), norm: the block's own
    normalisation of the sum (None in pre-norm blocks); adapter: the site's node or None."""
    if adapter is not None:
        return adapter.residual(h, x, norm)
    return norm(h + x) if norm is not None else h + x


def site_adapter(params: dict, *keys: str):
    """The adapter node stored at `params[keys...]["adapters"]`, or None."""
    for key in keys:
        params = params.get(key) if isinstance(params, dict) else None
    return params.get("adapters") if isinstance(params, dict) else None


def layer_sites(attention: str, feed_forward: str, num_layers: int) -> dict[str, tuple[str, int]]:
    """AdapterHub's residual-stream sites of a family: module name -> (location, layer index),
    from the two modules' names with `{i}` for the layer (`model.layers.{i}.attention_adapters`).
    A bottleneck adapter lives at the tree path `module name + ("adapters",)`."""
    out = {}
    for i in range(num_layers):
        out[attention.format(i=i)] = ("mh_adapter", i)
        out[feed_forward.format(i=i)] = ("output_adapter", i)
    return out
