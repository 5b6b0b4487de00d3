"""Sharding on a device mesh: logical axis names on every parameter, one rules table.

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))       # axes ("data", "fsdp", "tensor")
    shardings = param_shardings(params, model, mesh)              # a NamedSharding per array leaf

Every parameter's dimensions carry logical names: a model family declares them
per module (`LOGICAL_AXES` in its file: q_proj's kernel is ("embed", "heads"),
down_proj's ("mlp", "embed"), ...); an adapter node names its arrays' axes in
terms of the kernel it adapts (`field_axes()`: A is ("in", "lora_rank"), IA3's
vector ("out",) or ("in",)), which become that kernel's logical names; NF4 codes and block statistics are ("nf4_blocks",).
`RULES` maps logical names to mesh axes: hidden dimensions over `fsdp`,
heads / MLP / vocabulary dimensions over `tensor` (Megatron's column and row
split), the batch over `data` x `fsdp`. Optimizer state follows its parameter
(`optax.tree_map_params`). An axis that does not divide the dimension it shards
is an error naming both numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowrax.core.checked import Bound, Checked, PositiveInt
from lowrax.errors import LowraxError
from lowrax.core.kernels import TRANSPOSED, is_kernel_type, kernel_shardings
from lowrax.core.node import FullyTrained, is_adapter, is_node

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated)
RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "nf4_blocks": "fsdp",
    "lora_rank": None,
    "positions": None,
    "classes": None,
}
# A frozen distillation teacher's weights split over the data axis as well (FSDP across the
# replicas, which the student replicates over): the teacher costs 1 / (data x fsdp) of itself
# per device, gathered layer by layer in its forward (`distill.teacher_sharding: data`).
TEACHER_RULES: dict[str, Any] = {**RULES, "embed": BATCH_AXES, "nf4_blocks": BATCH_AXES}


@dataclass(frozen=True)
class MeshConfig(Checked):
    """Device mesh shape; the product of the three sizes must equal the device count."""

    section_name = "mesh"

    data: Annotated[int, Bound(low=-1)] = -1  # data-parallel replicas; -1: every device the other two axes leave
    fsdp: PositiveInt = 1  # fully-sharded data parallel: parameters and batch split over these devices
    tensor: PositiveInt = 1  # tensor (model) parallel: heads, MLP and vocabulary dimensions split

    def __post_init__(self):
        super().__post_init__()
        if self.data == 0:
            raise LowraxError("mesh.data must be a positive number of replicas, or -1 for every device the other "
                              "two axes leave; got 0")


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes[1] == -1 or sizes[2] == -1:
        raise LowraxError(f"mesh sizes must be positive (data may be -1 for 'the rest'); got data={cfg.data}, "
                          f"fsdp={cfg.fsdp}, tensor={cfg.tensor}")
    if cfg.data == -1:
        if n % (cfg.fsdp * cfg.tensor):
            raise LowraxError(f"mesh fsdp={cfg.fsdp} x tensor={cfg.tensor} = {cfg.fsdp * cfg.tensor} devices does not "
                              f"divide the {n} devices available")
        sizes[0] = n // (cfg.fsdp * cfg.tensor)
    if math.prod(sizes) != n:
        raise LowraxError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
                          f"but {n} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, accumulation: bool = False) -> NamedSharding:
    """Batches [b, ...] split over data x fsdp ([k, b, ...] with gradient accumulation)."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES) if accumulation else PartitionSpec(BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % size:
        raise LowraxError(f"batch size {batch_size} is not divisible by mesh data x fsdp = {size}; "
                          "choose a batch size that is a multiple of it")


def spec_for(shape: tuple, axes: tuple, mesh: Mesh, name: str, rules: dict = RULES) -> NamedSharding:
    """The NamedSharding that `rules` give an array of `shape` with logical `axes`."""
    parts, used = [], set()
    for dim, axis in zip(shape, axes):
        mesh_axis = rules.get(axis) if axis is not None else None
        members = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
        members = tuple(m for m in members if m not in used)
        size = math.prod(mesh.shape[m] for m in members)
        if size == 1:
            parts.append(None)
            continue
        if dim % size:
            raise LowraxError(f"{name}: dimension {dim} (logical axis {axis!r}) is not divisible by mesh axis "
                              f"{'x'.join(members)} of size {size}; change the mesh or RULES")
        used.update(members)
        parts.append(members[0] if len(members) == 1 else members)
    return NamedSharding(mesh, PartitionSpec(*parts))


def _kernel_axes(model, keys: tuple[str, ...], ndim: int) -> tuple:
    """Logical axes of a plain parameter from its family's LOGICAL_AXES: the entry whose
    key (a module path such as "q_proj" or "attention/output/dense") ends the longest
    suffix of the parameter's module path."""
    table = getattr(model, "logical_axes", {}) or {}
    module, leaf = "/".join(keys[:-1]), keys[-1]
    matches = [k for k in table if module == k or module.endswith("/" + k)]
    axes = table[max(matches, key=len)] if matches else None
    if axes is not None and leaf in ("kernel", "embedding") and len(axes) == ndim:
        return axes
    if axes is not None and leaf == "bias" and ndim == 1:
        return (axes[-1],)
    return (None,) * ndim


def param_shardings(params: Any, model, mesh: Mesh, rules: dict = RULES) -> Any:
    """A tree shaped like `params` (a whole tree or one half of `split`) holding the
    NamedSharding of every array leaf; None stays None."""
    def plain(keys, x, axes=None):
        if axes == ():
            return replicated(mesh)
        if axes == TRANSPOSED:
            axes = tuple(reversed(_kernel_axes(model, keys, x.ndim)))
        axes = _kernel_axes(model, keys, x.ndim) if axes is None else axes
        return spec_for(tuple(x.shape), axes, mesh, "/".join(keys), rules)

    def base(keys, b):  # an array or a kernel type (each of its arrays by the axes it declares)
        return kernel_shardings(b, lambda x, axes: plain(keys, x, axes))

    def visit(path, leaf):
        keys = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
        if leaf is None:
            return None
        if isinstance(leaf, FullyTrained):  # its value is None in the frozen half
            return FullyTrained(None if leaf.value is None else plain(keys, leaf.value))
        if is_kernel_type(leaf):
            return base(keys, leaf)
        if is_adapter(leaf) and leaf.stands_for_array:  # fields shaped like the array (LN tuning), or small
            declared = leaf.field_axes()                # ones it declares, replicated (trainable tokens' rows)
            return leaf.replace(**{f.name: plain(keys, getattr(leaf, f.name), () if f.name in declared else None)
                                   for f in dataclasses.fields(leaf)
                                   if f.metadata.get("pytree_node", True) and getattr(leaf, f.name) is not None})
        if is_adapter(leaf) and keys[-1] != "kernel":  # not a module's adapter (prompt learning): small, replicated
            return jax.tree.map(lambda _: replicated(mesh), leaf)
        if is_adapter(leaf):
            in_ax, out_ax = _kernel_axes(model, keys, 2)
            named = {"in": in_ax, "out": out_ax, "lora_rank": "lora_rank", "slot": None, None: None}  # None: replicated
            fields = {}
            for f in dataclasses.fields(leaf):
                value = getattr(leaf, f.name)
                if f.name == "base" or value is None or not f.metadata.get("pytree_node", True):
                    continue
                field_axes = leaf.field_axes()
                if f.name not in field_axes:
                    raise LowraxError(f"{type(leaf).__name__}.{f.name} has no logical axes; declare them in its field_axes()")
                if isinstance(value, dict):  # a field holding a small tree of arrays (GLoRA's support tensors): replicated
                    fields[f.name] = jax.tree.map(lambda v, name=f.name: plain(keys + (name,), v, ()), value)
                    continue
                fields[f.name] = plain(keys + (f.name,), value, tuple(named[a] for a in field_axes[f.name]))
            return leaf.replace(base=base(keys, leaf.base), **fields)
        return plain(keys, leaf)

    return jax.tree_util.tree_map_with_path(
        visit, params, is_leaf=lambda x: x is None or is_node(x) or is_kernel_type(x))


def shard(tree: Any, shardings: Any) -> Any:
    """Place every array of `tree` by the matching sharding (None leaves stay None)."""
    return jax.tree.map(lambda x, s: None if x is None else jax.device_put(x, s), tree, shardings,
                        is_leaf=lambda x: x is None)


def state_shardings(state_shapes, trainable_shardings, optimizer, mesh: Mesh):
    """Shardings of a `TrainState`: optimizer state follows its parameter, the rest is replicated."""
    import optax

    repl = replicated(mesh)
    # multi_transform keeps MaskedNode placeholders where a group does not own a parameter.
    masked = lambda x: x is None or isinstance(x, optax.MaskedNode)  # noqa: E731
    opt = optax.tree_map_params(optimizer, lambda v, s: v if masked(v) else s, state_shapes.opt_state,
                                trainable_shardings, transform_non_params=lambda _: repl, is_leaf=masked)
    return state_shapes.replace(step=repl, trainable=trainable_shardings, opt_state=opt, rng=repl)
