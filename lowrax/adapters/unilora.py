"""UniLoRA (PEFT `UniLoraConfig`): every LoRA factor entry of every layer is one entry of a single trained
vector theta_d [d], times a fixed scale. With the adapted modules numbered as torch visits them, their
A [r, in] and B [out, r] entries (row-major, A then B, module after module) draw indices from a
balanced shuffle of 0..d-1 (each index ceil or floor of (entries / d) times: numpy's generator seeded
with `proj_seed`, as PEFT); each entry is scaled by 1 / sqrt(how often its index is used):

    A = theta_d[index_A] * scale_A     B = theta_d[index_B] * scale_B
    y = x @ base + (dropout(x) @ A^T) @ B^T

theta_d starts uniform in +-init_theta_d_bound (0.02; `init_weights=false`: N(0, 1)), so the model
moves a little at init (PEFT's init). theta_d lives once at `params["unilora_theta_d"]`, trained in
full; the indices and scales are frozen arrays of each node (lowrax layout: [in, r] and [r, out]).

PEFT format (`peft_type: UNILORA`): `base_model.unilora_theta_d` (d,); with `save_indices: true` also
`<module>.unilora_indices_A` / `_B` and `unilora_scales_A` / `_B` (torch layout). Without them the
indices are generated again from `proj_seed`, which numpy makes exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.adapters.registry import AdapterMethod, PeftFormat, register_method, register_peft_format
from lowrax.adapters.targets import ATTENTION_QV, TargetConfig, targeting_from_peft
from lowrax.core.checked import Count, PositiveFloat, PositiveInt, Probability
from lowrax.core.linear import matmul
from lowrax.core.node import FROZEN, AdapterNode, FullyTrained, dropped, shared_entry, unwrapped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, fan_in_fan_out, one_setting

SHARED = "unilora_theta_d"  # the tree's top-level key for the trained vector (PEFT's name too)
THETA_KEY = "base_model.unilora_theta_d"  # PEFT's


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UniLoraConfig(TargetConfig):
    """UniLoRA's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 4  # rank of every layer's A and B
    theta_d_length: PositiveInt = 256  # the one trained vector's length
    proj_seed: Count = 42  # numpy's seed for the index assignment
    unilora_dropout: Probability = 0.0  # training: dropout on the adapter path's input
    init_theta_d_bound: PositiveFloat = 0.02  # theta_d starts uniform in +-bound
    init_weights: bool = True  # False: theta_d ~ N(0, 1)
    save_indices: bool = False  # write the indices and scales into the PEFT file too


def balanced_indices(count: int, length: int, seed: int) -> np.ndarray:
    """PEFT's `generate_index`: each of 0..length-1 floor(count / length) times, `count % length` of them
    once more (chosen without replacement), shuffled, all by numpy's generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return data


def indices_and_scales(shapes: list[tuple[int, int]], r: int, length: int, seed: int) -> list[dict]:
    """Per module (shape [in, out], in torch's module order): its A [r, in] and B [out, r] indices and
    scales, in torch layout."""
    sizes = [(r * d_in, d_out * r) for d_in, d_out in shapes]
    flat = balanced_indices(sum(a + b for a, b in sizes), length, seed)
    counts = np.bincount(flat, minlength=length).astype(np.float32)
    inverse = np.zeros(length, np.float32)
    inverse[counts > 0] = 1.0 / np.sqrt(counts[counts > 0])
    out, start = [], 0
    for (d_in, d_out), (size_a, size_b) in zip(shapes, sizes):
        index_a = flat[start:start + size_a].reshape(r, d_in)
        index_b = flat[start + size_a:start + size_a + size_b].reshape(d_out, r)
        start += size_a + size_b
        out.append({"index_a": index_a, "index_b": index_b, "scale_a": inverse[index_a], "scale_b": inverse[index_b]})
    return out


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class UniLoraKernel(AdapterNode):
    """base [in, out], index_a / scale_a [in, r] and index_b / scale_b [r, out] frozen; `theta` [d] is
    bound from the shared trained vector by `bind_shared`, None as stored."""

    base: Any
    index_a: jnp.ndarray
    index_b: jnp.ndarray
    scale_a: jnp.ndarray
    scale_b: jnp.ndarray
    dropout_key: Any = None
    theta: Any = None
    dropout: float = struct.field(pytree_node=False, default=0.0)
    peft_type = "UNILORA"

    def bind_shared(self, params: dict) -> "UniLoraKernel":
        theta = shared_entry(params, SHARED, "a UniLoRA kernel needs the trained vector")
        return self.replace(theta=theta)  # `resolve` has unwrapped its FullyTrained

    def field_labels(self) -> dict:
        return {"index_a": FROZEN, "index_b": FROZEN, "scale_a": FROZEN, "scale_b": FROZEN}

    def field_axes(self) -> dict:
        return {"index_a": ("in", None), "scale_a": ("in", None), "index_b": (None, "out"), "scale_b": (None, "out")}

    def factors(self) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(A [in, r], B [r, out]) in float32."""
        if self.theta is None:
            raise LowraxError("UniLoRA kernel used without its trained vector; call the model with the whole tree")
        theta = self.theta.astype(jnp.float32)
        return (theta[self.index_a] * self.scale_a.astype(jnp.float32),
                theta[self.index_b] * self.scale_b.astype(jnp.float32))

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        a, b = (f.astype(x.dtype) for f in self.factors())
        return y + jnp.matmul(jnp.matmul(dropped(x, self.dropout, self.dropout_key), a), b).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        a, b = self.factors()
        return a @ b

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


# --- build ----------------------------------------------------------------------------------------

def _node(base, assigned: dict, dropout: float) -> UniLoraKernel:
    dtype = base.dtype  # PEFT keeps the scales in the weight's dtype
    return UniLoraKernel(base=base, index_a=jnp.asarray(assigned["index_a"].T, jnp.int32),
                         index_b=jnp.asarray(assigned["index_b"].T, jnp.int32),
                         scale_a=jnp.asarray(assigned["scale_a"].T).astype(dtype),
                         scale_b=jnp.asarray(assigned["scale_b"].T).astype(dtype), dropout=dropout)


def build_nodes(bases: dict[str, Any], cfg: UniLoraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """`bases` in torch's module order (wrap orders them: the index assignment runs through them in turn)."""
    assigned = indices_and_scales([tuple(b.shape) for b in bases.values()], cfg.r, cfg.theta_d_length, cfg.proj_seed)
    nodes = {name: _node(base, a, cfg.unilora_dropout) for (name, base), a in zip(bases.items(), assigned)}
    if cfg.init_weights:
        theta = jax.random.uniform(key, (cfg.theta_d_length,), jnp.float32, -cfg.init_theta_d_bound,
                                   cfg.init_theta_d_bound)
    else:
        theta = jax.random.normal(key, (cfg.theta_d_length,), jnp.float32)
    return nodes, {SHARED: FullyTrained(theta.astype(adapter_dtype))}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, UniLoraKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    theta = params.get(SHARED)
    if theta is None:
        raise LowraxError(f"UniLoRA params lack their trained vector at params[{SHARED!r}]")
    theta = np.asarray(unwrapped(theta), np.float32)
    r, dropout = one_setting(((int(n.index_a.shape[1]), n.dropout) for n in nodes.values()), "UniLoRA",
                             "r and unilora_dropout")
    tensors = {THETA_KEY: theta}
    for name, node in nodes.items():  # the indices always travel with the file: no seed can disagree
        tensors[f"{PREFIX}{name}.unilora_indices_A"] = np.asarray(node.index_a).T.astype(np.int64)
        tensors[f"{PREFIX}{name}.unilora_indices_B"] = np.asarray(node.index_b).T.astype(np.int64)
        tensors[f"{PREFIX}{name}.unilora_scales_A"] = np.asarray(node.scale_a, np.float32).T
        tensors[f"{PREFIX}{name}.unilora_scales_B"] = np.asarray(node.scale_b, np.float32).T
    return tensors, {"r": r, "theta_d_length": int(theta.shape[0]), "proj_seed": 42, "unilora_dropout": dropout,
                     "init_theta_d_bound": 0.02, "init_weights": True, "save_indices": True,
                     "fan_in_fan_out": fan_in_fan_out(model), "bias": "none"}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"UniLoRA adapter_config.json has bias {config.get('bias')!r}; lowrax reads bias 'none' "
                              "(PEFT's default) only")
    if THETA_KEY not in tensors:
        raise CheckpointError(f"UniLoRA adapter lacks {THETA_KEY}")
    r, length = int(config.get("r", 4)), int(config.get("theta_d_length", 256))
    theta = np.asarray(tensors[THETA_KEY], np.float32)
    if theta.shape != (length,):
        raise CheckpointError(f"adapter tensor {THETA_KEY} has shape {theta.shape}, expected ({length},)")
    names = [n for n in bases if f"{n}.unilora_indices_A" in tensors]
    if not names:  # PEFT's default (save_indices: false): the targets come from the config, indices from the seed
        from lowrax.adapters.targets import select_targets

        targets = set(select_targets({}, to_config(config)[1], None, ATTENTION_QV, "unilora", {n: () for n in bases}))
        names = [n for n in bases if n in targets]
        assigned = indices_and_scales([tuple(bases[n].shape) for n in names], r, length, int(config.get("proj_seed", 42)))
    else:
        assigned = [_stored(tensors, n, bases[n].shape, r, length) for n in names]
    used = {THETA_KEY} | {f"{n}.unilora_{kind}_{side}" for n in names for kind in ("indices", "scales")
                          for side in "AB" if f"{n}.unilora_{kind}_{side}" in tensors}
    dropout = float(config.get("unilora_dropout") or 0.0)
    nodes = {name: _node(bases[name], a, dropout) for name, a in zip(names, assigned)}
    return nodes, {SHARED: FullyTrained(jnp.asarray(theta, adapter_dtype))}, used


def _stored(tensors: dict, name: str, shape: tuple, r: int, length: int) -> dict:
    d_in, d_out = shape
    out = {}
    for side, expected in (("A", (r, d_in)), ("B", (d_out, r))):
        for kind in ("indices", "scales"):
            key = f"{name}.unilora_{kind}_{side}"
            if key not in tensors:
                raise CheckpointError(f"UniLoRA adapter lacks {PREFIX}{key}")
            if tuple(tensors[key].shape) != expected:
                raise CheckpointError(f"adapter tensor {PREFIX}{key} has shape {tuple(tensors[key].shape)}, "
                                      f"expected {expected}")
        index = np.asarray(tensors[f"{name}.unilora_indices_{side}"], np.int64)
        if (index < 0).any() or (index >= length).any():
            raise CheckpointError(f"adapter tensor {PREFIX}{name}.unilora_indices_{side} indexes outside theta_d "
                                  f"(length {length})")
        out[f"index_{side.lower()}"] = index
        out[f"scale_{side.lower()}"] = np.asarray(tensors[f"{name}.unilora_scales_{side}"], np.float32)
    return out


def to_config(config: dict) -> tuple[str, UniLoraConfig]:
    return "unilora", UniLoraConfig(r=config.get("r", 4), theta_d_length=config.get("theta_d_length", 256),
                                    proj_seed=config.get("proj_seed", 42),
                                    unilora_dropout=float(config.get("unilora_dropout") or 0.0),
                                    **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="unilora", config=UniLoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), module_order=True, identity_at_init=False,
                              examples={"unilora": lambda: UniLoraConfig(r=2, theta_d_length=32)}))
register_peft_format(PeftFormat(peft_type="UNILORA", write=write, read=read, to_config=to_config, module_order=True))
