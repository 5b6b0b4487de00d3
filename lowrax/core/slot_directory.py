"""The tree's adapter-slot directory: which named adapter each row of a batch uses.

`params["adapter_slots"]` (a `SlotDirectory`) holds the active slot as an int32 array,
a scalar for every row or one per row, and the names of the loaded adapters as static
data. Models read it (`with_adapter_rows`, `has_named_adapters`) and `resolve` binds the
active slot into every `LoraSlots` node (lowrax.adapters.slots), so switching or mixing
adapters never recompiles. The names are part of the tree's structure; `anonymous(params)`
drops them for a compiled call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError

SLOTS_KEY = "adapter_slots"  # the top-level tree key of the directory
BASE_NAME = "__base__"  # PEFT's name for "no adapter" in adapter_names
NO_SLOT = -1


@dataclass(frozen=True)
class SlotEntry:
    """What the tree remembers of a named adapter beyond its arrays (for extracting it again)."""

    name: str
    rslora: bool = False
    dropout: float = 0.0


@jax.tree_util.register_pytree_node_class
class SlotDirectory:
    """params["adapter_slots"]: the slot of each name (`entries`, static) and the active slot(s).

    active: int32, shape [] (one slot for every row) or [batch] (a slot per row); -1 is the base model.
    """

    def __init__(self, active, entries: tuple):
        self.active = active
        self.entries = tuple(entries)

    def tree_flatten(self):
        return (self.active,), self.entries

    @classmethod
    def tree_unflatten(cls, entries, children):
        return cls(children[0], entries)

    @property
    def capacity(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return [e.name for e in self.entries if e is not None]

    def slot_of(self, name: str) -> int:
        for i, e in enumerate(self.entries):
            if e is not None and e.name == name:
                return i
        loaded = ", ".join(self.names()) or "none"
        raise LowraxError(f"no adapter named {name!r} is loaded (loaded: {loaded})")

    def entry(self, slot: int) -> SlotEntry:
        return self.entries[slot]

    def replace(self, active=None, entries=None) -> "SlotDirectory":
        return SlotDirectory(self.active if active is None else active, self.entries if entries is None else entries)

    def __repr__(self) -> str:
        return f"SlotDirectory(names={self.names()}, capacity={self.capacity})"


def has_named_adapters(params: Any) -> bool:
    return isinstance(params, dict) and isinstance(params.get(SLOTS_KEY), SlotDirectory)


def directory_of(params: Any) -> SlotDirectory:
    if not has_named_adapters(params):
        raise LowraxError("these params hold no named adapters: load one with "
                          "lowrax.load_peft(params, adapter_dir, model, adapter_name='a')")
    return params[SLOTS_KEY]


def adapter_rows(params: Any, names: Sequence[str] | Any) -> jnp.ndarray:
    """One slot per row (int32 [batch]) for `names` (an adapter name or "__base__" per row); an
    int array is taken as slots already."""
    directory = directory_of(params)
    if isinstance(names, (jax.Array, np.ndarray)):
        rows = jnp.asarray(names)
        if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
            raise LowraxError(f"adapter_names as an array must be int slots [batch], got {rows.dtype} {rows.shape}")
        return rows.astype(jnp.int32)
    if isinstance(names, str):
        raise LowraxError("adapter_names takes one name per row (a list), not one string")
    return jnp.asarray([NO_SLOT if n == BASE_NAME else directory.slot_of(n) for n in names], jnp.int32)


def with_adapter_rows(params: Any, names: Sequence[str] | Any, batch: int | None = None) -> Any:
    """params whose model runs row i with adapter `names[i]` ("__base__": none)."""
    rows = adapter_rows(params, names)
    if batch is not None and rows.shape[0] != batch:
        raise LowraxError(f"adapter_names has {rows.shape[0]} entries for a batch of {batch} rows: give one per row")
    return dict(params, **{SLOTS_KEY: params[SLOTS_KEY].replace(active=rows)})


def anonymous(params: Any) -> Any:
    """params whose directory forgets the adapters' names (not their slots): the tree structure
    then depends only on the slot table's shapes, so a compiled call is reused when adapters are
    loaded into free slots or deleted."""
    if not has_named_adapters(params):
        return params
    directory = params[SLOTS_KEY]
    return dict(params, **{SLOTS_KEY: SlotDirectory(directory.active, (None,) * directory.capacity)})
