"""Lily (Zhong et al. 2024, "Low-Rank Interconnected Adaptation across Layers"; PEFT `LilyConfig`):
low-rank adapters whose projections are shared across layers and mixed by a router.

Modules are grouped by the target suffix they match and their shape, numbered in torch's module
order. Within a group every module shares one up-projection bank B [num_B, r, out] (its first
module's), and consecutive blocks of `stride_A` modules share a down-projection A [in, r]; each
module has its own router [r, num_B]:

    h = x @ A;  p = mean over every row of the batch of softmax(h @ router)
    y = x @ base + scaling * h @ (sum_e p_e B_e)

The router's weights are averaged over all rows the layer sees at once (padding included), as
PEFT computes them, so an output depends on the batch it is computed in; a cached decoding step
routes by its own rows. There is no fixed weight to merge: merging is refused, as in PEFT.
PEFT's init: A and the router Kaiming-uniform, B = 0 (the base model at init).

The shared arrays live once at `params["lily_shared"]` ({"A": {key: A}, "B": {key: B}}), trained in
full. PEFT format (`peft_type: LILY`): every module's `lily_A.weight` (r, in), `lily_B.weight`
(num_B r, out) and `lily_router.weight` (num_B, r), shared ones repeated in each module.
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
from lowrax.core.checked import PositiveFloat, PositiveInt
from lowrax.core.linear import matmul
from lowrax.core.node import FACTOR, AdapterNode, FullyTrained, shared_entry, unwrapped
from lowrax.errors import CheckpointError, LowraxError
from lowrax.peft.common import PREFIX, adapted_modules, adapter_tensor, one_setting, refuse_conv1d, target_spec

SHARED = "lily_shared"  # the tree's top-level key: {"A": {key: [in, r]}, "B": {key: [num_B, r, out]}}


# --- config ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LilyConfig(TargetConfig):
    """Lily's hyper-parameters, with PEFT's names and defaults."""

    r: PositiveInt = 32  # rank of A and of each B
    stride_A: PositiveInt = 1  # consecutive modules of a group sharing one A
    num_B: PositiveInt = 2  # B projections mixed by each module's router
    scaling: PositiveFloat = 1.0  # the factor on the adapter's output
    init_weights: bool = True  # False: B Kaiming-uniform too (a non-zero adapter, for tests)


def group_keys(names: list[str], shapes: dict[str, tuple], target_modules, stride_A: int) -> dict[str, tuple[str, str]]:
    """{module: (A key, B key)} as PEFT's Lily shares them: modules (in torch's order) grouped by the last
    target suffix they end with (the pattern itself when target_modules is a string) and their shape;
    B per group, A per block of stride_A modules of a group."""
    members: dict[tuple, list[str]] = {}
    for name in names:
        if isinstance(target_modules, str):
            suffix = target_modules
        else:
            matches = [s for s in target_modules if name.endswith(s)]
            if not matches:
                continue
            suffix = matches[-1]
        members.setdefault((suffix, tuple(shapes[name])), []).append(name)
    out = {}
    for (suffix, shape), group in members.items():
        b_key = f"{suffix}|{'x'.join(map(str, shape))}"
        for i, name in enumerate(group):
            out[name] = (f"{b_key}|{(i // stride_A) * stride_A}", b_key)
    return out


# --- node -----------------------------------------------------------------------------------------

@struct.dataclass
class LilyKernel(AdapterNode):
    """base [in, out] frozen; router [r, num_B] trained; `a` [in, r] and `b` [num_B, r, out] are bound from
    the shared arrays (keys `a_key`, `b_key`) by `bind_shared`, None as stored."""

    base: Any
    router: jnp.ndarray
    a: Any = None
    b: Any = None
    a_key: str = struct.field(pytree_node=False, default="")
    b_key: str = struct.field(pytree_node=False, default="")
    scaling: float = struct.field(pytree_node=False, default=1.0)
    stride: int = struct.field(pytree_node=False, default=1)  # the config's stride_A, for the PEFT file
    peft_type = "LILY"
    mergeable = False
    unmergeable_reason = "adapters route by the batch they run on (their mixing weights average over its rows)"

    def bind_shared(self, params: dict) -> "LilyKernel":
        shared = shared_entry(params, SHARED, "a Lily kernel needs the shared projections")
        return self.replace(a=shared["A"][self.a_key], b=shared["B"][self.b_key])

    def field_labels(self) -> dict:
        return {"router": FACTOR}

    def field_axes(self) -> dict:
        return {"router": (None, None)}

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.a is None:
            raise LowraxError("Lily kernel used without its shared projections; call the model with the whole tree")
        y = matmul(x, self.base)
        hidden = jnp.matmul(x, self.a.astype(x.dtype))
        weights = jax.nn.softmax(jnp.matmul(hidden, self.router.astype(x.dtype)).astype(jnp.float32), axis=-1)
        mixed = jnp.einsum("e,eio->io", jnp.mean(weights, axis=0), self.b.astype(jnp.float32))
        return y + (self.scaling * jnp.matmul(hidden, mixed.astype(x.dtype))).astype(y.dtype)


# --- build ----------------------------------------------------------------------------------------

def build_nodes(bases: dict[str, Any], cfg: LilyConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """`bases` in torch's module order; groups by the suffixes lowrax will write as target_modules."""
    names = list(bases)
    keys = group_keys(names, {n: bases[n].shape[::-1] for n in names}, sorted({n.rsplit(".", 1)[-1] for n in names}),
                      cfg.stride_A)
    shared_a, shared_b, nodes = {}, {}, {}
    for i, name in enumerate(names):
        d_in, d_out = bases[name].shape
        a_key, b_key = keys[name]
        k_a, k_b, k_r = jax.random.split(jax.random.fold_in(key, i), 3)
        if a_key not in shared_a:
            shared_a[a_key] = kaiming_uniform(k_a, (d_in, cfg.r), d_in)
        if b_key not in shared_b:
            shape = (cfg.num_B, cfg.r, d_out)
            shared_b[b_key] = jnp.zeros(shape) if cfg.init_weights else kaiming_uniform(k_b, shape, d_out)
        nodes[name] = LilyKernel(base=bases[name], router=kaiming_uniform(k_r, (cfg.r, cfg.num_B), cfg.r).astype(adapter_dtype),
                                 a_key=a_key, b_key=b_key, scaling=cfg.scaling, stride=cfg.stride_A)
    shared = {"A": {k: FullyTrained(v.astype(adapter_dtype)) for k, v in shared_a.items()},
              "B": {k: FullyTrained(v.astype(adapter_dtype)) for k, v in shared_b.items()}}
    return nodes, {SHARED: shared}


# --- PEFT format ----------------------------------------------------------------------------------

def write(nodes: dict[str, LilyKernel], params: Any, *, model=None, **_unused) -> tuple[dict, dict]:
    refuse_conv1d(model, "Lily")
    if not isinstance(target_spec(nodes, model), list):
        raise LowraxError("PEFT's Lily shares projections between the modules that match the same entry of "
                          "target_modules; these adapted modules are not exactly those a suffix list selects "
                          "(layers_to_transform, exclude_modules or a regex), so PEFT would share them differently")
    shared = params.get(SHARED)
    if shared is None:
        raise LowraxError(f"Lily params lack their shared projections at params[{SHARED!r}]")
    r, num_b, scaling, stride = one_setting(((int(n.router.shape[0]), int(n.router.shape[1]), n.scaling, n.stride)
                                             for n in nodes.values()), "Lily", "r, num_B, scaling and stride_A")
    tensors = {}
    for name, node in nodes.items():
        a, b = (np.asarray(unwrapped(shared[part][key]), np.float32) for part, key in (("A", node.a_key), ("B", node.b_key)))
        tensors[f"{PREFIX}{name}.lily_A.weight"] = a.T
        tensors[f"{PREFIX}{name}.lily_B.weight"] = b.reshape(num_b * r, -1)
        tensors[f"{PREFIX}{name}.lily_router.weight"] = np.asarray(node.router, np.float32).T
    return tensors, {"r": r, "num_B": num_b, "scaling": scaling, "stride_A": stride, "init_weights": True}


def read(tensors: dict, config: dict, bases: dict, adapter_dtype) -> tuple[dict, dict, set]:
    r, num_b = int(config.get("r", 32)), int(config.get("num_B", 2))
    names = [n for n in bases if n in set(adapted_modules(tensors, ".lily_A.weight", bases, "Lily"))]
    target_modules = config.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in names})
    keys = group_keys(names, {n: bases[n].shape[::-1] for n in names}, target_modules, int(config.get("stride_A", 1)))
    shared_a, shared_b, nodes, used = {}, {}, {}, set()
    for name in names:
        if name not in keys:
            raise CheckpointError(f"Lily adapter adapts {name}, which matches no entry of its target_modules")
        d_in, d_out = bases[name].shape
        a = adapter_tensor(tensors, name, "lily_A.weight", (r, d_in), "Lily").T
        b = adapter_tensor(tensors, name, "lily_B.weight", (num_b * r, d_out), "Lily").reshape(num_b, r, d_out)
        router = adapter_tensor(tensors, name, "lily_router.weight", (num_b, r), "Lily").T
        used |= {f"{name}.lily_A.weight", f"{name}.lily_B.weight", f"{name}.lily_router.weight"}
        a_key, b_key = keys[name]
        shared_a.setdefault(a_key, a)  # PEFT writes each sharer's copy; the group's first is its own
        shared_b.setdefault(b_key, b)
        nodes[name] = LilyKernel(base=bases[name], router=jnp.asarray(router, adapter_dtype), a_key=a_key, b_key=b_key,
                                 scaling=float(config.get("scaling", 1.0)), stride=int(config.get("stride_A", 1)))
    shared = {"A": {k: FullyTrained(jnp.asarray(v, adapter_dtype)) for k, v in shared_a.items()},
              "B": {k: FullyTrained(jnp.asarray(v, adapter_dtype)) for k, v in shared_b.items()}}
    return nodes, {SHARED: shared}, used


def to_config(config: dict) -> tuple[str, LilyConfig]:
    return "lily", LilyConfig(r=config.get("r", 32), stride_A=config.get("stride_A", 1), num_B=config.get("num_B", 2),
                              scaling=float(config.get("scaling", 1.0)), **targeting_from_peft(config))


# --- registration ---------------------------------------------------------------------------------

register_method(AdapterMethod(name="lily", config=LilyConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(SHARED,), module_order=True,
                              examples={"lily": lambda: LilyConfig(r=4, stride_A=2, num_B=3)}))
register_peft_format(PeftFormat(peft_type="LILY", write=write, read=read, to_config=to_config, module_order=True))
