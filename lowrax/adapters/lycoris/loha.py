"""LoHa (Hyeon-Woo et al. 2022, "FedPara"; PEFT `LoHaConfig`): the weight delta is the
Hadamard (element-wise) product of two rank-r products, so its rank can reach r^2.

    delta [in, out] = (a1 @ b1) * (a2 @ b2) * alpha / r       a [in, r], b [r, out]

PEFT's init (`init_weights=True`): every factor Kaiming-uniform except its `hada_w2_b`
(our a2), which is zero, so the model is unchanged at init.

PEFT format (`peft_type: LOHA`), torch orientation: `hada_w1_a` (out, r) = b1.T,
`hada_w1_b` (r, in) = a1.T, `hada_w2_a` = b2.T, `hada_w2_b` = a2.T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.lycoris.common import (LycorisConfig, LycorisKernel,
                                            lycoris_settings, modules_to_build, peft_tensors,
                                            rank_alpha_fields, rank_and_alpha)
from lowrax.adapters.init import kaiming_uniform
from lowrax.core.node import FACTOR
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, targeting_from_peft
from lowrax.errors import CheckpointError
from lowrax.peft.common import PREFIX, check_shape

FIELDS = {"a1": "hada_w1_b", "b1": "hada_w1_a", "a2": "hada_w2_b", "b2": "hada_w2_a"}  # ours -> PEFT's


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """LoHa's hyper-parameters, with PEFT's names and defaults."""

    init_weights: bool = True  # True: a2 zero (the base model at init); False: every factor random


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class LoHaKernel(LycorisKernel):
    base: Any
    a1: jnp.ndarray
    b1: jnp.ndarray
    a2: jnp.ndarray
    b2: jnp.ndarray
    dropout_key: Any = None
    rank: int = struct.field(pytree_node=False, default=8)
    alpha: float = struct.field(pytree_node=False, default=8.0)
    rank_dropout: float = struct.field(pytree_node=False, default=0.0)
    module_dropout: float = struct.field(pytree_node=False, default=0.0)
    rescale_rank_dropout: bool = struct.field(pytree_node=False, default=True)  # PEFT's LoHa always rescales
    peft_type = "LOHA"

    def field_labels(self) -> dict:
        return {name: FACTOR for name in FIELDS}

    def field_axes(self) -> dict:
        return {"a1": ("in", "lora_rank"), "b1": ("lora_rank", "out"), "a2": ("in", "lora_rank"),
                "b2": ("lora_rank", "out")}

    def delta(self) -> jnp.ndarray:
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        return (f32(self.a1) @ f32(self.b1)) * (f32(self.a2) @ f32(self.b2)) * self.scale

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        """x @ delta. The Hadamard product of two rank-r products is one rank-r^2 product,
        (a1 @ b1) * (a2 @ b2) = (a1 . a2) @ (b1 * b2), with a1 . a2 [in, r^2] the row-wise
        Kronecker product (row i: kron(a1[i], a2[i])) and b1 * b2 [r^2, out] the column-wise
        one: applied as (x @ (a1 . a2)) @ (b1 * b2), LoRA-like, when that costs fewer
        multiplications than forming delta [in, out] (always, but for tiny batches or r^2
        close to the layer's width)."""
        (d_in, r), d_out, n = self.a1.shape, self.b1.shape[1], x.shape[0]
        if n * r * r * (d_in + d_out) >= d_in * d_out * (2 * r + n):
            return x @ self.delta().astype(x.dtype)
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        left = (f32(self.a1)[:, :, None] * f32(self.a2)[:, None, :]).reshape(d_in, r * r)
        right = (f32(self.b1)[:, None, :] * f32(self.b2)[None, :, :]).reshape(r * r, d_out) * self.scale
        return (x @ left.astype(x.dtype)) @ right.astype(x.dtype)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: LoHaConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, name, base, r, alpha in modules_to_build(bases, cfg, "LoHa"):
        d_in, d_out = base.shape
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        # torch fan-ins: hada_w*_a (out, r) -> r; hada_w*_b (r, in) -> in
        a2 = (kaiming_uniform(k[2], (d_in, r), d_in, adapter_dtype) if not cfg.init_weights
              else jnp.zeros((d_in, r), adapter_dtype))
        nodes[name] = LoHaKernel(
            base=base, a1=kaiming_uniform(k[0], (d_in, r), d_in, adapter_dtype),
            b1=kaiming_uniform(k[1], (r, d_out), r, adapter_dtype), a2=a2,
            b2=kaiming_uniform(k[3], (r, d_out), r, adapter_dtype), rank=r, alpha=alpha,
            rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, LoHaKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    return peft_tensors(nodes, FIELDS, "LoHa", model), rank_alpha_fields(nodes) | {"init_weights": True, "use_effective_conv2d": False}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    suffix = ".hada_w1_a"
    names = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    if not names:
        raise CheckpointError("LoHa adapter holds no .hada_w1_a tensors")
    if any(k.endswith((".hada_t1", ".hada_t2")) for k in tensors):
        raise CheckpointError("LoHa adapter holds convolution (CP-decomposed, hada_t1/hada_t2) tensors; "
                              "lowrax adapts linear layers only")
    nodes, consumed = {}, set()
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}{suffix} targets {name!r}, which is not a linear "
                                  "module of this model")
        d_in, d_out = bases[name].shape
        r, alpha = rank_and_alpha(name, config)
        arrays = {}
        for ours, theirs in FIELDS.items():
            key = f"{name}.{theirs}"
            if key not in tensors:
                raise CheckpointError(f"LoHa adapter lacks {PREFIX}{key}")
            expected = (d_out, r) if theirs.endswith("_a") else (r, d_in)
            check_shape(name, theirs, tensors[key], expected)
            arrays[ours] = jnp.asarray(np.asarray(tensors[key], np.float32).T, adapter_dtype)
            consumed.add(key)
        nodes[name] = LoHaKernel(base=bases[name], rank=r, alpha=alpha,
                                 rank_dropout=float(config.get("rank_dropout") or 0.0),
                                 module_dropout=float(config.get("module_dropout") or 0.0), **arrays)
    return nodes, {}, consumed


def to_config(config: dict) -> tuple[str, LoHaConfig]:
    return "loha", LoHaConfig(**lycoris_settings(config), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="loha", config=LoHaConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"loha": lambda: LoHaConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="LOHA", write=write, read=read, to_config=to_config))
