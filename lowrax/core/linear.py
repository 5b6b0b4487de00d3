"""The one projection op every model calls, dispatching on the kernel's type.

Model code never writes `x @ w` itself: it calls `linear(x, layer)` with the
layer's parameter dict (`{"kernel": ..., "bias": ...}`). A plain array kernel
is a dense matmul. An adapter node (`lowrax.core.node.AdapterNode`) is
asked for the layer's output through its `project(x, bias)` method, so LoRA
computes `x @ W + s * ((x @ A) @ B)` without ever materialising
`W + s * B @ A`, and IA3 can scale the bias with the output. Other kernel types
(NF4 bases, pruned kernels) give their product in their `KernelType`
(lowrax.core.kernels).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lowrax.core.kernels import kernel_type


# XLA:CPU's float32 dot keeps one running sum per output along the whole contraction.
# On checkpoints with large activations that rounds measurably worse than torch's MKL:
# SmolLM2's MLP down projection (K=1536) alone takes its logits from 5e-5 to 1.8e-4 off
# a float64 reference. Summing contraction blocks of at most this many terms separately
# brings the error level with torch's (scripts/parity_smollm2.py); GPU and TPU libraries
# split the contraction themselves, so only the CPU backend gets this.
ACCUMULATION_BLOCK = 768


def dense_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [n, k] @ w [k, m], a float32 contraction summed in blocks of at most ACCUMULATION_BLOCK on CPU.

    Only float32: a bfloat16 product accumulates in float32 inside the dot and rounds
    once, where blocks would round each partial sum to bfloat16 as well."""
    return _blocked_matmul(x, w) if _sums_in_blocks(x) else jnp.matmul(x, w)


def _sums_in_blocks(x: jnp.ndarray) -> bool:
    """Whether a contraction over x's last axis is summed in blocks (float32 on CPU, longer than a block)."""
    return x.shape[-1] > ACCUMULATION_BLOCK and x.dtype == jnp.float32 and jax.default_backend() == "cpu"


def _block_bounds(k: int) -> list[int]:
    """The edges of the fewest near-equal blocks of at most ACCUMULATION_BLOCK that cover 0..k."""
    needed = -(-k // ACCUMULATION_BLOCK)
    return [round(i * k / needed) for i in range(needed + 1)]


def matmul_with_extra_columns(x: jnp.ndarray, w: jnp.ndarray, extra_x: jnp.ndarray, extra_w: jnp.ndarray) -> jnp.ndarray:
    """x @ w + extra_x @ extra_w (x [n, k], extra_x [n, r]) as one matmul over the concatenated
    operands, so the sum is a single dot's output rather than an add XLA fuses into every reader.
    Summed in the blocks of `dense_matmul`, the extra columns joining the last one."""
    if not _sums_in_blocks(x):
        return jnp.matmul(jnp.concatenate([x, extra_x], -1), jnp.concatenate([w, extra_w], 0))
    bounds = _block_bounds(x.shape[-1])
    parts = [jnp.matmul(x[:, lo:hi], w[lo:hi]) for lo, hi in zip(bounds[:-2], bounds[1:-1])]
    last = bounds[-2]
    parts.append(jnp.matmul(jnp.concatenate([x[:, last:], extra_x], -1), jnp.concatenate([w[last:], extra_w], 0)))
    return functools.reduce(jnp.add, parts)


# Below this many rows (decode steps, small batches) the blocks are one batched dot over
# reshaped operands: such a product is bound by reading the weight, and slicing would
# copy it. Above it, sliced blocks run faster (measured on SmolLM2: LoRA step 3% and
# forward 8% faster than the batched dot; decode 2x faster the other way round).
BATCHED_BLOCKS_BELOW_ROWS = 64


@jax.custom_vjp
def _blocked_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    k = x.shape[-1]
    bounds = _block_bounds(k)
    needed = len(bounds) - 1
    equal = next((b for b in range(needed, 2 * needed + 1) if k % b == 0), None)
    if equal is not None and x.shape[0] < BATCHED_BLOCKS_BELOW_ROWS:
        xb = x.reshape(x.shape[0], equal, k // equal)
        wb = w.reshape(equal, k // equal, w.shape[-1])
        return jnp.sum(jax.lax.dot_general(xb, wb, (((2,), (1,)), ((1,), (0,)))), axis=0)
    parts = [jnp.matmul(x[:, lo:hi], w[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    return functools.reduce(jnp.add, parts)


def _blocked_matmul_fwd(x, w):
    return _blocked_matmul(x, w), (x, w)


def _blocked_matmul_bwd(residuals, g):
    # The plain products: the blocks would only add slice copies of x to what a training
    # step keeps alive, for gradients that need no closer agreement with torch.
    x, w = residuals
    grad_x = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    grad_w = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))
    return grad_x, grad_w


_blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


def matmul(x: jnp.ndarray, kernel: Any) -> jnp.ndarray:
    """`x @ kernel` for a kernel leaf of any registered type; x is [..., in], result [..., out].

    Leading axes are flattened so every projection is one 2-D matmul: XLA's CPU
    backend handles the backward pass of a rank-3 `x @ A` (contracting over batch
    and time at once) several times slower than the same 2-D product.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    y = _flat_matmul(flat, kernel)
    return y.reshape(*lead, y.shape[-1])


def _flat_matmul(x: jnp.ndarray, kernel: Any) -> jnp.ndarray:
    if hasattr(kernel, "project"):  # an adapter node
        return kernel.apply(x)
    spec = kernel_type(kernel)
    return spec.matmul(x, kernel) if spec is not None else dense_matmul(x, kernel.astype(x.dtype))


def linear(x: jnp.ndarray, layer: dict) -> jnp.ndarray:
    """Apply a linear layer `{"kernel": [in, out] (or a node), "bias": [out]?}` to x [..., in]."""
    kernel, bias = layer["kernel"], layer.get("bias")
    if hasattr(kernel, "project"):  # an adapter node: it owns the layer's output, bias included
        flat = x.reshape(-1, x.shape[-1])
        y = kernel.project(flat, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    y = matmul(x, kernel)
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
