"""HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation"; PEFT `HRAConfig`): the layer's input is reflected by a chain of r learned
Householder reflections before the frozen kernel.

    y = x R^T @ base        R = H_0 H_1 ... H_{r-1},  H_i = I - 2 u_i u_i^T / |u_i|^2      u [in, r]

applied as r reflections of x (never forming the in x in matrix R). With `apply_GS` the columns of u
are first made orthonormal by Gram-Schmidt (Q) and R = I - 2 Q Q^T. PEFT's init (`init_weights=True`)
with an even r draws r / 2 Kaiming-uniform columns and repeats each twice, so the reflections cancel in
pairs and the model starts as the base (an odd r, or `False`, draws every column: the model changes).
Merging folds R into the kernel (base <- R^T base); unmerging applies R (R is orthogonal).

PEFT format (`peft_type: HRA`): `<module>.hra_u` shaped (in, r); `r` and `apply_GS` in the config.
PEFT implements HRA for nn.Linear (and convolutions) only: on GPT-2 (Conv1D layers) it trains and merges
here, and saving it for PEFT is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.init import kaiming_uniform
from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveInt
from lowrax.core.linear import matmul
from lowrax.core.node import ROTATION, AdapterNode
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d

SUFFIX = ".hra_u"


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HRAConfig(TargetConfig):
    """HRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 8  # reflections per layer (at most its input width); even for the base model at init
    apply_GS: bool = False  # orthonormalise the reflection vectors (Gram-Schmidt) first
    init_weights: bool = True  # True: paired columns (the base model, for an even r); False: random


# --- node -----------------------------------------------------------------------------------------

def orthonormal_columns(u: jnp.ndarray) -> jnp.ndarray:
    """Classical Gram-Schmidt on u's columns, in order, as PEFT computes it."""
    columns = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - jnp.dot(q, v) * q
        columns.append(v / jnp.linalg.norm(v))
    return jnp.stack(columns, axis=1)


@struct.dataclass
class HRAKernel(AdapterNode):
    """base [in, out] frozen; u [in, r] trained."""

    base: Any
    u: jnp.ndarray
    apply_gs: bool = struct.field(pytree_node=False, default=False)
    peft_type = "HRA"

    def field_labels(self) -> dict:
        return {"u": ROTATION}

    def field_axes(self) -> dict:
        return {"u": ("in", "lora_rank")}

    def vectors(self) -> jnp.ndarray:
        """The unit reflection vectors [in, r], float32 (orthonormal with apply_GS)."""
        u = self.u.astype(jnp.float32)
        return orthonormal_columns(u) if self.apply_gs else u / jnp.linalg.norm(u, axis=0)

    def reflect(self, x: jnp.ndarray) -> jnp.ndarray:
        """x R^T for rows x [n, in]."""
        v = self.vectors().astype(x.dtype)
        if self.apply_gs:
            return x - 2.0 * (x @ v) @ v.T
        for i in reversed(range(v.shape[1])):
            x = x - 2.0 * (x @ v[:, i])[:, None] * v[:, i][None, :]
        return x

    def rotation(self) -> jnp.ndarray:
        """R^T [in, in], float32."""
        return self.reflect(jnp.eye(self.u.shape[0], dtype=jnp.float32))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        return matmul(self.reflect(x), self.base)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return self.rotation() @ w

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return self.rotation().T @ merged


# --- build ----------------------------------------------------------------------------------------

def initial_vectors(key, d_in: int, r: int, init: bool, dtype) -> jnp.ndarray:
    """PEFT's draws: paired Kaiming-uniform columns for init_weights with an even r, else all random.
    PEFT draws the (in, r) torch tensor with fan-in r (its second dimension)."""
    if init and r % 2 == 0:
        half = kaiming_uniform(key, (d_in, r // 2), r // 2, jnp.float32)
        return jnp.repeat(half, 2, axis=1).astype(dtype)
    return kaiming_uniform(key, (d_in, r), r, dtype)


def build_nodes(bases: dict[str, Any], cfg: HRAConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in = base.shape[0]
        if cfg.r > d_in:
            raise LowraxError(f"HRA r={cfg.r} exceeds {name}'s input width {d_in}; lower r")
        u = initial_vectors(jax.random.fold_in(key, i), d_in, cfg.r, cfg.init_weights, adapter_dtype)
        nodes[name] = HRAKernel(base=base, u=u, apply_gs=cfg.apply_GS)
    return nodes, {}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, HRAKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "HRA")
    r, apply_gs = one_setting(((int(n.u.shape[1]), n.apply_gs) for n in nodes.values()), "HRA", "r and apply_GS")
    tensors = {f"{PREFIX}{name}{SUFFIX}": np.asarray(node.u, np.float32) for name, node in nodes.items()}
    return tensors, {"r": r, "apply_GS": apply_gs, "init_weights": True, "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    r, nodes = int(config.get("r", 8)), {}
    for name in adapted_modules(tensors, SUFFIX, bases, "HRA"):
        d_in = bases[name].shape[0]
        if r > d_in:
            raise CheckpointError(f"HRA adapter_config.json has r={r}, more than {name}'s input width {d_in}")
        u = adapter_tensor(tensors, name, SUFFIX[1:], (d_in, r), "HRA")
        nodes[name] = HRAKernel(base=bases[name], u=jnp.asarray(u, adapter_dtype), apply_gs=bool(config.get("apply_GS")))
    return nodes, {}, {f"{n}{SUFFIX}" for n in nodes}


def to_config(config: dict) -> tuple[str, HRAConfig]:
    return "hra", HRAConfig(r=int(config.get("r", 8)), apply_GS=bool(config.get("apply_GS")), **targeting_from_peft(config))


# --- registration ----------------------------------------------------------------------------------

register_method(AdapterMethod(name="hra", config=HRAConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"hra": lambda: HRAConfig(r=2)}))
register_peft_format(PeftFormat(peft_type="HRA", write=write, read=read, to_config=to_config))
