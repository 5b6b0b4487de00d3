"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation").

One pair of frozen random projections is shared by every adapted layer; each
layer trains only two vectors:

    y = x W + lambda_b * ((lambda_d * (x A)) B)

A [max_in, r] and B [r, max_out] are sized for the largest adapted layer and
sliced per layer (A[:in], B[:, :out]), as PEFT does. They are stored once, at
`params["vera_shared"]`, and handed to the nodes inside the traced forward
(`adapters.node.resolve`), so the tree, the checkpoint and the device hold one copy.
lambda_d [r] starts at `d_initial` (0.1), lambda_b [out] at 0: the adapted
model equals the base at init.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.core.node import VECTOR, AdapterNode, dropped, shared_entry
from lowrax.errors import LowraxError
from lowrax.core.linear import matmul

SHARED = "vera_shared"
DEFAULT_D_INITIAL = 0.1


@struct.dataclass
class VeraKernel(AdapterNode):
    """base [in, out] frozen; lambda_d [r] and lambda_b [out] trained. `a`/`b` are None
    as stored and bound to slices of the shared projections by `bind_shared`."""

    base: Any
    lambda_d: jnp.ndarray
    lambda_b: jnp.ndarray
    dropout_key: Any = None
    a: Any = None
    b: Any = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "VERA"

    @property
    def rank(self) -> int:
        return self.lambda_d.shape[0]

    def bind_shared(self, params: dict) -> "VeraKernel":
        shared = shared_entry(params, SHARED, "a VeRA kernel needs the shared projections")
        d_in, d_out = self.shape
        return self.replace(a=shared["a"][:d_in, : self.rank], b=shared["b"][: self.rank, :d_out])

    def field_axes(self) -> dict:
        return {"lambda_b": ("out",), "lambda_d": ("lora_rank",)}

    def field_labels(self) -> dict:
        return {"lambda_d": VECTOR, "lambda_b": VECTOR}

    def delta(self) -> jnp.ndarray:
        a = self.a.astype(jnp.float32) * self.lambda_d.astype(jnp.float32)[None, :]
        return a @ (self.b.astype(jnp.float32) * self.lambda_b.astype(jnp.float32)[None, :])

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.a is None:
            raise LowraxError("VeRA kernel used without its shared projections; call the model with the whole tree")
        y = matmul(x, self.base)
        h = jnp.matmul(dropped(x, self.dropout, self.dropout_key), self.a.astype(x.dtype)) * self.lambda_d.astype(x.dtype)
        return y + (jnp.matmul(h, self.b.astype(x.dtype)) * self.lambda_b.astype(x.dtype)).astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


def shared_projections(key, max_in: int, max_out: int, r: int, dtype=jnp.float32) -> dict:
    """PEFT's initialisation (Kaiming-uniform, a=sqrt(5), on the torch layouts (r, max_in)
    and (max_out, r)): A ~ U(+-1/sqrt(max_in)), B ~ U(+-1/sqrt(r)). Lowrax layout:
    a [max_in, r], b [r, max_out]."""
    ka, kb = jax.random.split(key)
    bound_a, bound_b = 1.0 / math.sqrt(max_in), 1.0 / math.sqrt(r)
    return {"a": jax.random.uniform(ka, (max_in, r), jnp.float32, -bound_a, bound_a).astype(dtype),
            "b": jax.random.uniform(kb, (r, max_out), jnp.float32, -bound_b, bound_b).astype(dtype)}


def check_fits(shared: dict, name: str, d_in: int, d_out: int, r: int) -> None:
    """A clear error when the shared projections are too small for a layer."""
    (a_in, a_r), (b_r, b_out) = shared["a"].shape, shared["b"].shape
    if a_in < d_in or b_out < d_out or a_r < r or b_r < r:
        raise LowraxError(
            f"VeRA projections do not fit {name}: vera_A covers in={a_in}, r={a_r} and vera_B out={b_out}, r={b_r}, "
            f"but the layer needs in={d_in}, out={d_out}, r={r}")


def build_nodes(bases: dict[str, Any], r: int, d_initial: float, dropout: float, key, adapter_dtype,
                random_b: bool = False) -> tuple[dict, dict]:
    """VeRA nodes for `bases` (module name -> frozen kernel) and the shared pair {SHARED: ...}.
    `random_b`: nonzero lambda_b (for tests that need the adapter to change the output)."""
    max_in = max(w.shape[0] for w in bases.values())
    max_out = max(w.shape[1] for w in bases.values())
    # Unlike LoRA's, VeRA's rank may exceed a layer's width: it is the shared projections'
    # inner dimension (the paper uses r=256 on 4096-wide layers, PEFT checks nothing more).
    shared = shared_projections(jax.random.fold_in(key, 0), max_in, max_out, r, adapter_dtype)
    nodes = {}
    for i, (name, w) in enumerate(bases.items()):
        lambda_b = jnp.zeros((w.shape[1],), adapter_dtype)
        if random_b:
            lambda_b = (jax.random.normal(jax.random.fold_in(key, i + 1), (w.shape[1],)) * 0.5).astype(adapter_dtype)
        nodes[name] = VeraKernel(base=w, lambda_d=jnp.full((r,), d_initial, adapter_dtype), lambda_b=lambda_b,
                                 dropout=dropout)
    return nodes, {SHARED: shared}
