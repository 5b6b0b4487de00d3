"""Named LoRA adapters on one base, as pure functions of the parameter tree.

    params = lowrax.load_peft(params, "dir_a", model, adapter_name="a")   # the first loaded is active
    params = lowrax.load_peft(params, "dir_b", model, adapter_name="b")
    params = lowrax.set_adapter(params, "b")          # a traced int: no recompilation
    params = lowrax.disable_adapters(params)          # the base model's outputs
    logits = model.apply(params, ids, mask, adapter_names=["a", "b", "__base__"])   # a slot per row
    tree = lowrax.extract_adapter(params, "a")        # an ordinary LoRA tree: train it, save it

An unnamed LoRA tree (from `wrap` or `load_peft` without a name) becomes the adapter
"default" when a named one is added, as in PEFT. Only LoRA (and rsLoRA, LoRA-FA, PiSSA
once converted) can be named: the slot table stores low-rank factors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.adapters.lora.node import LoraKernel
from lowrax.adapters.slots import LoraSlots, empty_slots, grown, with_slot
from lowrax.core.slot_directory import (BASE_NAME, NO_SLOT, SLOTS_KEY, SlotDirectory, SlotEntry, directory_of,
                                        has_named_adapters)
from lowrax.core.node import FullyTrained, is_node
from lowrax.errors import LowraxError
from lowrax.core.tables import set_path

DEFAULT_CAPACITY = 8  # slots made when the first named adapter arrives; doubled when full
DEFAULT_NAME = "default"  # PEFT's name for an adapter loaded without one


def adapter_names(params: Any) -> list[str]:
    """The names of the loaded adapters, in slot order."""
    return directory_of(params).names() if has_named_adapters(params) else []


def active_adapter(params: Any) -> str | None:
    """The active adapter's name; None when adapters are disabled (or chosen per row)."""
    directory = directory_of(params)
    active = np.asarray(jax.device_get(directory.active))
    if active.ndim != 0 or int(active) == NO_SLOT:
        return None
    return directory.entry(int(active)).name


def node_paths(tree: Any) -> dict[tuple, Any]:
    """Tree path -> node, for every node (adapter or fully trained) of the tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]
    return {tuple(str(p.key) for p in path): leaf for path, leaf in leaves if is_node(leaf)}


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: x, tree, is_leaf=is_node)


def _lora_nodes(tree: Any, what: str) -> dict[tuple, LoraKernel]:
    """The plain LoRA nodes of a single-adapter tree, or an error naming what cannot be named."""
    out = {}
    for path, node in node_paths(tree).items():
        if isinstance(node, FullyTrained):
            raise LowraxError(f"{what} trains {'.'.join(path)} in full (modules_to_save); named adapters hold "
                              "LoRA factors only: load it without adapter_name")
        if type(node) is not LoraKernel or node.residual_base:
            kind = "a PiSSA adapter before conversion" if isinstance(node, LoraKernel) else type(node).__name__
            raise LowraxError(f"{what} is {kind} at {'.'.join(path)}; named adapters (adapter_name=, mixed batches, "
                              "combine_adapters) hold plain LoRA adapters: load it without adapter_name")
        out[path] = node
    return out


def base_params(params: Any) -> Any:
    """The base model's plain tree: named adapters (and unnamed LoRA nodes) removed."""
    out = {k: v for k, v in params.items() if k != SLOTS_KEY} if isinstance(params, dict) else params
    return jax.tree.map(lambda x: x.base if isinstance(x, (LoraSlots, LoraKernel)) else x, out, is_leaf=is_node)


def _as_named(params: Any, capacity: int) -> Any:
    """params with a slot directory: as they are, or an unnamed LoRA tree turned into "default"."""
    if has_named_adapters(params):
        return params
    if not isinstance(params, dict):
        raise LowraxError(f"named adapters need the model's parameter dict, got {type(params).__name__}")
    if capacity < 1:
        raise LowraxError(f"capacity must be >= 1 adapter slot, got {capacity}")
    unnamed = node_paths(params)
    start = dict(base_params(params), **{SLOTS_KEY: SlotDirectory(jnp.int32(NO_SLOT), (None,) * capacity)})
    if not unnamed:
        return start
    _lora_nodes(params, "the adapter these params already hold")
    return add_adapter(start, DEFAULT_NAME, params)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or name == BASE_NAME:
        raise LowraxError(f"an adapter name must be a non-empty string other than {BASE_NAME!r}, got {name!r}")


def add_adapter(params: Any, name: str, adapted: Any, *, capacity: int = DEFAULT_CAPACITY) -> Any:
    """params with the LoRA adapter of `adapted` (a tree over the same base, from `wrap`,
    `load_peft` or training) added under `name`. The first adapter added is active.

    The slot table grows when it must (more adapters than slots, a higher rank, a kernel no
    loaded adapter adapted before): such a load changes the compiled program's shapes.
    capacity: the slots made with the first named adapter."""
    _check_name(name)
    params = _as_named(params, capacity)
    directory = params[SLOTS_KEY]
    if name in directory.names():
        raise LowraxError(f"an adapter named {name!r} is already loaded; delete_adapter(params, {name!r}) first")
    new = _lora_nodes(adapted, f"adapter {name!r}")
    if not new:
        raise LowraxError(f"adapter {name!r}: the given tree holds no LoRA adapter")
    free = [i for i, e in enumerate(directory.entries) if e is None]
    slot = free[0] if free else directory.capacity
    slots = directory.capacity if free else 2 * directory.capacity
    out = _copy(params)
    existing = {p: n for p, n in node_paths(out).items() if isinstance(n, LoraSlots)}
    for path in sorted(set(existing) | set(new)):
        node = existing.get(path)
        lora = new.get(path)
        if node is None:
            node = empty_slots(lora.base, slots, lora.rank, lora.a.dtype)
        elif lora is not None and tuple(lora.shape) != tuple(node.shape):
            raise LowraxError(f"adapter {name!r} adapts {'.'.join(path)} as {lora.shape}, but the base kernel there "
                              f"is {node.shape}: an adapter of another model?")
        node = grown(node, slots, lora.rank if lora is not None else 0)
        node = with_slot(node, slot) if lora is None else with_slot(node, slot, lora.a, lora.b, lora.scale)
        set_path(out, path, node)
    first = next(iter(new.values()))
    entries = list(directory.entries) + [None] * (slots - directory.capacity)
    entries[slot] = SlotEntry(name, rslora=first.rslora, dropout=first.dropout)
    active = directory.active
    if not directory.names():
        active = jnp.int32(slot)
    out[SLOTS_KEY] = SlotDirectory(active, tuple(entries))
    return out


def set_adapter(params: Any, name: str) -> Any:
    """params whose model runs adapter `name` for every row."""
    directory = directory_of(params)
    return dict(params, **{SLOTS_KEY: directory.replace(active=jnp.int32(directory.slot_of(name)))})


def disable_adapters(params: Any) -> Any:
    """params whose model gives the base model's outputs; `set_adapter` switches one back on."""
    if not has_named_adapters(params):
        params = _as_named(params, DEFAULT_CAPACITY)
    return dict(params, **{SLOTS_KEY: params[SLOTS_KEY].replace(active=jnp.int32(NO_SLOT))})


def delete_adapter(params: Any, name: str) -> Any:
    """params without adapter `name` (its slot is emptied and free for the next load). If it
    was active, the first remaining adapter becomes active (none left: adapters are off)."""
    directory = directory_of(params)
    slot = directory.slot_of(name)
    out = _copy(params)
    for path, node in node_paths(out).items():
        if isinstance(node, LoraSlots):
            set_path(out, path, with_slot(node, slot))
    entries = tuple(None if i == slot else e for i, e in enumerate(directory.entries))
    active = np.asarray(jax.device_get(directory.active))
    if active.ndim == 0 and int(active) == slot:
        remaining = [i for i, e in enumerate(entries) if e is not None]
        active = np.int32(remaining[0] if remaining else NO_SLOT)
    out[SLOTS_KEY] = SlotDirectory(jnp.asarray(active, jnp.int32), entries)
    return out


def extract_adapter(params: Any, name: str | None = None) -> Any:
    """Adapter `name` (default: the active one) as an ordinary single-adapter LoRA tree over the
    base: what `wrap` or `load_peft` without a name gives, to train, save or merge."""
    directory = directory_of(params)
    if name is None:
        name = active_adapter(params)
        if name is None:
            raise LowraxError("no adapter is active (disabled, or one per row): name the adapter to extract")
    slot = directory.slot_of(name)
    entry = directory.entry(slot)

    def one(node):
        if not isinstance(node, LoraSlots):
            return node
        r = int(jax.device_get(node.rank[slot]))
        if r == 0:
            return node.base
        return LoraKernel(base=node.base, a=node.a[:, slot, :r], b=node.b[slot, :r], scale=float(node.scale[slot]),
                          dropout=entry.dropout, rslora=entry.rslora)

    return jax.tree.map(one, {k: v for k, v in params.items() if k != SLOTS_KEY}, is_leaf=is_node)
