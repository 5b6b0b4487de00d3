"""The one projection op every model calls, dispatching on the kernel's type.

Model code never writes `x @ w` itself: it calls `linear(x, layer)` with the
layer's parameter dict (`{"kernel": ..., "bias": ...}`). A plain array kernel
is a dense matmul; adapter and quantized node types register their own
implementation with `register_linear`, so LoRA computes
`x @ W + s * ((x @ A) @ B)` without ever materialising `W + s * B @ A`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

LinearImpl = Callable[[jnp.ndarray, Any], jnp.ndarray]
_LINEAR_IMPLS: dict[type, LinearImpl] = {}


def register_linear(node_type: type) -> Callable[[LinearImpl], LinearImpl]:
    """Register `fn(x, kernel_node) -> y` as the projection for `node_type` kernels."""

    def decorator(fn: LinearImpl) -> LinearImpl:
        _LINEAR_IMPLS[node_type] = fn
        return fn

    return decorator


def matmul(x: jnp.ndarray, kernel: Any) -> jnp.ndarray:
    """`x @ kernel` for a kernel leaf of any registered type; x is [..., in], result [..., out].

    Leading axes are flattened so every projection is one 2-D matmul: XLA's CPU
    backend handles the backward pass of a rank-3 `x @ A` (contracting over batch
    and time at once) several times slower than the same 2-D product.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    impl = _LINEAR_IMPLS.get(type(kernel))
    y = impl(flat, kernel) if impl is not None else jnp.matmul(flat, kernel.astype(x.dtype))
    return y.reshape(*lead, y.shape[-1])


def linear(x: jnp.ndarray, layer: dict) -> jnp.ndarray:
    """Apply a linear layer `{"kernel": [in, out] (or a node), "bias": [out]?}` to x [..., in]."""
    y = matmul(x, layer["kernel"])
    bias = layer.get("bias")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def embed(ids: jnp.ndarray, table: dict) -> jnp.ndarray:
    """Look up rows of `table["embedding"]` [vocab, dim] for integer ids [...]."""
    return jnp.take(table["embedding"], ids, axis=0)


def attend_to_embedding(x: jnp.ndarray, table: dict) -> jnp.ndarray:
    """Tied output projection: x [..., dim] times the embedding table transposed -> [..., vocab]."""
    flat = jnp.matmul(x.reshape(-1, x.shape[-1]), table["embedding"].astype(x.dtype).T)
    return flat.reshape(*x.shape[:-1], flat.shape[-1])
