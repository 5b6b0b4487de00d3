"""Merge adapters into their quantized bases and quantize the result again, with the error it adds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrax.adapters.tree import merged_bias, without_shared
from lowrax.core.kernels import dense_kernel, is_kernel_type, is_quantized, rebuilt
from lowrax.core.node import is_adapter, is_node, resolve


def merge_requantized(params: Any) -> tuple[Any, dict]:
    """Merge adapters into their quantized (NF4) bases and quantize the result again.

    Returns (params with quantized kernels holding base + scale * A @ B, report). Re-quantizing
    adds rounding error, as PEFT warns; the report measures it per module against the
    exact float32 merge: `mean_abs`, `max_abs` and `relative` (||error|| / ||merged||),
    plus the worst `relative` over all modules under "worst".
    """
    report: dict = {}

    def adapted_quantized(x) -> bool:
        return isinstance(x, dict) and is_adapter(x.get("kernel")) and is_quantized(x["kernel"].base)

    def visit(path, layer):
        if not adapted_quantized(layer):
            return layer
        node = layer["kernel"]
        exact = node.merge_into(dense_kernel(node.base, dtype=jnp.float32))
        again = rebuilt(node.base, exact)
        error = dense_kernel(again, dtype=jnp.float32) - exact
        name = ".".join(str(getattr(p, "key", "")) for p in path)
        report[name] = {"mean_abs": float(jnp.mean(jnp.abs(error))), "max_abs": float(jnp.max(jnp.abs(error))),
                        "relative": float(jnp.linalg.norm(error) / jnp.maximum(jnp.linalg.norm(exact), 1e-30))}
        return dict(layer, kernel=again, **merged_bias(node, layer))  # IA3 scales the bias too

    merged = without_shared(jax.tree_util.tree_map_with_path(
        visit, resolve(params), is_leaf=lambda x: adapted_quantized(x) or is_node(x) or is_kernel_type(x)))
    if report:
        report["worst"] = {"relative": max(r["relative"] for r in report.values())}
    return merged, report
