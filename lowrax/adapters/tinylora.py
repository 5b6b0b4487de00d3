"""TinyLoRA (arXiv 2602.04118, "Learning to Reason in 13 Parameters"; PEFT `TinyLoraConfig`): LoRA-XS
with its r x r core made from a few trained numbers. Per layer, the frozen top-r SVD of W^T = U S V^T
gives a = V_r sqrt(S_r) [in, r] and b = sqrt(S_r) U_r^T [r, out]; fixed random P [u, r, r] turn a
trained vector v [u] into the core R = sum_i v_i P_i:

    y = x @ base + ((dropout(x) @ a) @ R^T) @ b

`weight_tying` shares v between neighbouring layers: with N targeted modules, numbered as torch
visits them, there are max(1, round(N (1 - weight_tying))) vectors, module i using number
min(i // (N // groups), groups - 1). The vectors live once, trained in full, at
`params["tinylora_v"]` [groups, u]. PEFT's init: v = 0 (`init_weights=True`, the model is the base)
or uniform in +-init_v_bound (`"uniform"`); P ~ N(0, 1/r).

PEFT format (`peft_type: TINYLORA`): `<module>.tinylora_A` (r, in), `<module>.tinylora_B` (out, r),
`<module>.tinylora_P` (u, r, r), `base_model.tinylora_v.<group>` (u,). Files saved without P
(PEFT regenerates it from torch's generator) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import PositiveFloat, PositiveInt, Probability, Share
from lowrax.core.kernels import dense_kernel
from lowrax.core.linear import matmul
from lowrax.core.node import FROZEN, AdapterNode, FullyTrained, dropped, shared_entry, unwrapped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, fan_in_fan_out, one_setting, torch_layout

SHARED = "tinylora_v"  # the tree's top-level key for the trained vectors (PEFT's name too)
VECTOR_KEY = "base_model.tinylora_v."  # PEFT's key prefix, then the group number


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyLoraConfig(TargetConfig):
    """TinyLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 2  # the frozen SVD's rank
    u: PositiveInt = 64  # the trained vector's length (per group)
    weight_tying: Share = 0.0  # 0: a vector per module; 1: one for all; between: neighbours share
    tinylora_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    init_v_bound: PositiveFloat = 0.02  # init_weights "uniform": v starts in +-init_v_bound
    init_weights: bool | Literal["uniform"] = True  # True: v = 0 (the base model); "uniform"


def group_of(index: int, count: int, weight_tying: float) -> tuple[int, int]:
    """(group of the index-th of `count` modules, number of groups), as PEFT assigns them."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return min(index // size, groups - 1), groups


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class TinyLoraKernel(AdapterNode):
    """base [in, out], a [in, r], b [r, out] and p [u, r, r] frozen; `v` [u] is bound from the shared
    trained vectors (row `group`) by `bind_shared`, None as stored."""

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    p: jnp.ndarray
    dropout_key: Any = None
    v: Any = None
    group: int = struct.field(pytree_node=False, default=0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "TINYLORA"

    def bind_shared(self, params: dict) -> "TinyLoraKernel":
        vectors = shared_entry(params, SHARED, "a TinyLoRA kernel needs the trained vectors")
        return self.replace(v=vectors[self.group])  # `resolve` has unwrapped its FullyTrained

    def field_labels(self) -> dict:
        return {"a": FROZEN, "b": FROZEN, "p": FROZEN}

    def field_axes(self) -> dict:
        return {"a": ("in", None), "b": (None, "out"), "p": (None, None, None)}

    def core(self) -> jnp.ndarray:
        """R [r, r] = sum_i v_i P_i, in float32."""
        if self.v is None:
            raise LowraxError("TinyLoRA kernel used without its trained vectors; call the model with the whole tree")
        return jnp.einsum("i,ijk->jk", self.v.astype(jnp.float32), self.p.astype(jnp.float32))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        h = jnp.matmul(dropped(x, self.dropout, self.dropout_key), self.a.astype(x.dtype))
        h = jnp.matmul(h, self.core().T.astype(x.dtype))
        return y + jnp.matmul(h, self.b.astype(x.dtype)).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        return self.a.astype(jnp.float32) @ self.core().T @ self.b.astype(jnp.float32)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


# --- build ----------------------------------------------------------------------------------------

def svd_factors(w: jnp.ndarray, r: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(a [in, r], b [r, out]) from the SVD of PEFT's (out, in) weight, in w's dtype."""
    u, s, vt = jnp.linalg.svd(w.astype(jnp.float32).T, full_matrices=False)
    root = jnp.sqrt(s[:r].astype(w.dtype)).astype(jnp.float32)  # PEFT casts S_r to the weight's dtype first
    a = (root[:, None] * vt[:r].astype(w.dtype).astype(jnp.float32)).T
    b = (u[:, :r].astype(w.dtype).astype(jnp.float32) * root[None, :]).T
    return a.astype(w.dtype), b.astype(w.dtype)


def build_nodes(bases: dict[str, Any], cfg: TinyLoraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """`bases` in torch's module order (wrap orders them for methods with `module_order`)."""
    nodes, count = {}, len(bases)
    groups = group_of(0, count, cfg.weight_tying)[1]
    for index, (name, base) in enumerate(bases.items()):
        w = dense_kernel(base)
        r = min(cfg.r, *w.shape)
        a, b = svd_factors(w, r)
        p = jax.random.normal(jax.random.fold_in(key, index + 1), (cfg.u, r, r), jnp.float32) / np.sqrt(r)
        nodes[name] = TinyLoraKernel(base=base, a=a, b=b, p=p.astype(adapter_dtype),
                                     group=group_of(index, count, cfg.weight_tying)[0], dropout=cfg.tinylora_dropout)
    if cfg.init_weights == "uniform":
        v = jax.random.uniform(jax.random.fold_in(key, 0), (groups, cfg.u), jnp.float32, -cfg.init_v_bound,
                               cfg.init_v_bound)
    else:
        v = jnp.zeros((groups, cfg.u), jnp.float32)
    return nodes, {SHARED: FullyTrained(v.astype(adapter_dtype))}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, TinyLoraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    vectors = params.get(SHARED)
    if vectors is None:
        raise LowraxError(f"TinyLoRA params lack their trained vectors at params[{SHARED!r}]")
    vectors = np.asarray(unwrapped(vectors), np.float32)
    r, u, dropout = one_setting(((int(n.a.shape[1]), int(n.p.shape[0]), n.dropout) for n in nodes.values()),
                                "TinyLoRA", "r, u and tinylora_dropout")
    tensors = {f"{VECTOR_KEY}{g}": vectors[g] for g in range(vectors.shape[0])}
    for name, node in nodes.items():
        tensors[f"{PREFIX}{name}.tinylora_A"] = torch_layout(node.a)
        tensors[f"{PREFIX}{name}.tinylora_B"] = torch_layout(node.b)
        tensors[f"{PREFIX}{name}.tinylora_P"] = np.asarray(node.p, np.float32)
    groups = vectors.shape[0]
    # the weight_tying that gives these groups back for this many modules
    tying = 0.0 if groups == len(nodes) else 1.0 - groups / len(nodes)
    return tensors, {"r": r, "u": u, "weight_tying": tying, "projection_seed": 42, "save_projection": True,
                     "init_v_bound": 0.02, "tinylora_dropout": dropout, "fan_in_fan_out": fan_in_fan_out(model),
                     "bias": "none", "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"TinyLoRA adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    u = int(config.get("u", 64))
    names = adapted_modules(tensors, ".tinylora_A", bases, "TinyLoRA")
    names = [n for n in bases if n in names]  # load_peft hands the bases in torch's module order
    groups = group_of(0, len(names), float(config.get("weight_tying", 0.0)))[1]
    vector_keys = {f"{VECTOR_KEY}{g}" for g in range(groups)}
    missing = sorted(vector_keys - set(tensors))
    if missing:
        raise CheckpointError(f"TinyLoRA adapter lacks {missing[0]} (weight_tying gives {groups} vectors for "
                              f"{len(names)} modules)")
    nodes, used = {}, set(vector_keys)
    for index, name in enumerate(names):
        d_in, d_out = bases[name].shape
        r = tensors[f"{name}.tinylora_A"].shape[0]
        a = adapter_tensor(tensors, name, "tinylora_A", (r, d_in), "TinyLoRA")
        b = adapter_tensor(tensors, name, "tinylora_B", (d_out, r), "TinyLoRA")
        if f"{name}.tinylora_P" not in tensors:
            raise CheckpointError(f"TinyLoRA adapter lacks {PREFIX}{name}.tinylora_P: it was saved with "
                                  "save_projection=false, and PEFT's projections come from torch's random generator, "
                                  "which lowrax cannot reproduce; save it with save_projection=true")
        p = adapter_tensor(tensors, name, "tinylora_P", (u, r, r), "TinyLoRA")
        used |= {f"{name}.tinylora_A", f"{name}.tinylora_B", f"{name}.tinylora_P"}
        nodes[name] = TinyLoraKernel(base=bases[name], a=jnp.asarray(a.T), b=jnp.asarray(b.T),
                                     p=jnp.asarray(p, adapter_dtype),
                                     group=group_of(index, len(names), float(config.get("weight_tying", 0.0)))[0],
                                     dropout=float(config.get("tinylora_dropout") or 0.0))
    vectors = np.stack([np.asarray(tensors[f"{VECTOR_KEY}{g}"], np.float32) for g in range(groups)])
    if vectors.shape[1] != u:
        raise CheckpointError(f"TinyLoRA vectors have length {vectors.shape[1]}, expected u={u}")
    return nodes, {SHARED: FullyTrained(jnp.asarray(vectors, adapter_dtype))}, used


def to_config(config: dict) -> tuple[str, TinyLoraConfig]:
    return "tinylora", TinyLoraConfig(r=config.get("r", 2), u=config.get("u", 64),
                                      weight_tying=float(config.get("weight_tying", 0.0)),
                                      tinylora_dropout=float(config.get("tinylora_dropout") or 0.0),
                                      **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="tinylora", config=TinyLoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), module_order=True,
                              examples={"tinylora": lambda: TinyLoraConfig(r=2, u=4, weight_tying=0.5)}))
register_peft_format(PeftFormat(peft_type="TINYLORA", write=write, read=read, to_config=to_config, module_order=True))
