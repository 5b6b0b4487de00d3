"""The bottleneck adapter node: a small MLP in the block's residual stream.

    y = scaling * up(act(down(u)))        u: what the adapter reads (below), down [hidden, m], up [m, hidden]

and what it returns at its site, given the sub-block's output h, its input x and the
block's own norm N (BERT's post-LN; none in a pre-norm decoder), as AdapterHub computes
it (`Adapter` / `ParallelAdapter` pre_forward, forward, post_forward):

    sequential   u = N(h + x) if original_ln_before else h     (without N: h + x)
                 r = h (residual_before_ln True), u (False), or h + x before N ("post_add")
                 out = LN_a(y + r) or LN_a(y) + r (ln_after; adapter_residual_before_ln picks), else y + r
                 returns N(out + x) if original_ln_after else out
    parallel     u = x;  out = LN_a(y) if ln_after else y;  s = out + h
                 returns N(s + x) if original_ln_after else s

A gate (use_gating) multiplies y by sigmoid(gate(u)) averaged over the sequence.
The node replaces no weight: it is stored at its site's own tree path and cannot merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from lowrax.core.node import FULL, AdapterNode, dropped
from lowrax.errors import LowraxError
from lowrax.core import layers

ADAPTER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, AdapterHub's adapter_norm_after


@dataclass(frozen=True)
class Wiring:
    """How the node sits in the stream (static; the same BnConfig fields AdapterHub reads)."""

    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    is_parallel: bool = False
    scaling: float | None = 1.0  # None: the learned `scale` array
    init_weights: str = "bert"  # how it was initialised (recorded for AdapterHub's config)


def _activation(name: str):
    name = name.lower()
    if name == "leakyrelu":
        return lambda v: jax.nn.leaky_relu(v, 0.01)
    if name == "sigmoid":
        return jax.nn.sigmoid
    return layers.activation(name)


@struct.dataclass
class BottleneckAdapter(AdapterNode):
    down_kernel: jnp.ndarray  # [hidden, m]
    down_bias: jnp.ndarray  # [m]
    up_kernel: jnp.ndarray  # [m, hidden]
    up_bias: jnp.ndarray  # [hidden]
    scale: Any = None  # [1] ("learned") or [hidden] ("channel"); None: the fixed wiring.scaling
    norm_scale: Any = None  # [hidden]: ln_after's LayerNorm, or None
    norm_bias: Any = None
    gate_kernel: Any = None  # [hidden, 1]: use_gating, or None
    gate_bias: Any = None  # [1]
    dropout_key: Any = None
    wiring: Wiring = struct.field(pytree_node=False, default=Wiring())
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "BOTTLENECK"
    mergeable = False
    unmergeable_reason = "bottleneck adapters add layers to the residual stream rather than change weights"

    def switched_off(self):
        return None  # the plain residual sum

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.down_kernel.shape)

    @property
    def base(self):
        return None  # nothing frozen: every array of the node trains

    def field_labels(self) -> dict:
        names = ("down_kernel", "down_bias", "up_kernel", "up_bias", "scale", "norm_scale", "norm_bias",
                 "gate_kernel", "gate_bias")
        return {n: FULL for n in names}

    def field_axes(self) -> dict:
        return {}  # small: replicated (dist.sharding replicates nodes that are not kernels)

    def apply(self, x):
        raise LowraxError("a bottleneck adapter sits in the residual stream, not in a linear layer")

    def _mlp(self, u: jnp.ndarray) -> jnp.ndarray:
        w = self.wiring
        f32 = jnp.float32
        down = _activation(w.non_linearity)(u.astype(f32) @ self.down_kernel.astype(f32) + self.down_bias.astype(f32))
        y = down @ self.up_kernel.astype(f32) + self.up_bias.astype(f32)
        y = y * (self.scale.astype(f32) if self.scale is not None else w.scaling)
        y = dropped(y, self.dropout, self.dropout_key)
        if self.gate_kernel is not None:
            gate = jax.nn.sigmoid(u.astype(f32) @ self.gate_kernel.astype(f32) + self.gate_bias.astype(f32))
            y = y * jnp.mean(gate, axis=1, keepdims=True)  # one gate per sequence, padding included as AdapterHub
        return y

    def _norm_after(self, y: jnp.ndarray) -> jnp.ndarray:
        if self.norm_scale is None:
            return y
        return layers.layer_norm(y, {"scale": self.norm_scale, "bias": self.norm_bias}, ADAPTER_NORM_EPS)

    def residual(self, h: jnp.ndarray, x: jnp.ndarray, norm) -> jnp.ndarray:
        """The site's output for sub-block output h and input x (see the module docstring)."""
        w = self.wiring
        close = (lambda v: norm(v) if norm is not None else v) if w.original_ln_after else None
        if w.is_parallel:
            s = self._norm_after(self._mlp(x)).astype(h.dtype) + h
            return close(s + x) if close else s
        u, r = h, (h if w.residual_before_ln is True else None)
        if w.original_ln_before:
            u = h + x
            if w.residual_before_ln == "post_add":
                r = u
            u = norm(u) if norm is not None else u
        if w.residual_before_ln is False:
            r = u
        y = self._mlp(u).astype(h.dtype)
        out = self._norm_after(y + r) if w.adapter_residual_before_ln else self._norm_after(y) + r
        return close(out + x) if close else out
