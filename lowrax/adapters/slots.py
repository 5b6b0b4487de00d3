"""Many LoRA adapters over one base: a stacked slot table per adapted kernel.

Named adapters (`lowrax.load_peft(..., adapter_name=)`, `add_adapter`) live in
one `LoraSlots` node per adapted kernel: factors a [in, S, R] and b [S, R, out]
for S slots of at most rank R (smaller ranks padded with zeros, so they add
nothing), a per-slot scale and rank. Which slot a row uses is not part of the
compiled program: the tree's `adapter_slots` entry (`SlotDirectory`) holds the
active slot as an int32 array, a scalar for every row or one per row, and
`resolve` binds it into each node as `select`. `linear` then applies each row's
factors (Punica / S-LoRA style), so any mix of the loaded adapters, switching
the active one, or switching them all off (slot -1) runs the same program.

How rows get their factors: the slots side by side are one LoRA of rank S * R
(a as [in, S * R], b as [S * R, out], free reshapes of the stored layout);
each row's [S * R] intermediate is multiplied by its slot's one-hot gain, so
other slots' columns contribute exact zeros. Two dense matmuls, no gathered
copies of the factors: a gather of [rows, in, R] factors per kernel wrote
about as many bytes per decode step as the base weights read (measured on
SmolLM2, 8 rank-16 adapters: 0.53x the single-adapter speed, see
scripts/bench_adapters.py).

The adapters' names are Python data in the directory (`entries`), so they are
part of the tree's structure; `anonymous(params)` drops them for a compiled
call, which then does not see a load into a free slot either.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from lowrax.core.linear import matmul
from lowrax.core.node import AdapterNode
from lowrax.core.slot_directory import SLOTS_KEY
from lowrax.errors import LowraxError


@struct.dataclass
class LoraSlots(AdapterNode):
    """S LoRA adapters over one frozen kernel: row i gets `x @ base + scale[s] * x @ a[:, s] @ b[s]`
    for its slot s (`select`, bound from the directory by `resolve`), or `x @ base` for s = -1.

    a [in, S, R], b [S, R, out]: each slot's factors zero-padded to rank R; scale [S] float32;
    rank [S] int32 (0: the slot's adapter does not adapt this kernel). Nothing here is trained:
    `extract_adapter` gives one slot back as an ordinary, trainable LoRA tree.
    """

    base: Any
    a: jnp.ndarray
    b: jnp.ndarray
    scale: jnp.ndarray
    rank: jnp.ndarray
    select: Any = None
    peft_type = "LORA"

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, padded rank)."""
        return self.a.shape[1], self.a.shape[2]

    def field_labels(self) -> dict:
        return {}

    def field_axes(self) -> dict:
        return {"a": ("in", "slot", "lora_rank"), "b": ("slot", "lora_rank", "out"), "scale": ("slot",),
                "rank": ("slot",), "select": ()}

    def bind_shared(self, params: dict) -> "LoraSlots":
        directory = params.get(SLOTS_KEY)
        if directory is None:
            raise LowraxError(f"a LoraSlots kernel needs the tree's {SLOTS_KEY!r} entry, which is missing")
        return self.replace(select=directory.active)

    def _slot_and_gain(self):
        if self.select is None:
            raise LowraxError("LoraSlots.select is unset: run the model through model.apply (or lowrax's resolve)")
        select = jnp.asarray(self.select, jnp.int32)
        slot = jnp.maximum(select, 0)
        return slot, jnp.where(select >= 0, self.scale[slot], 0.0)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        slot, gain = self._slot_and_gain()
        if slot.ndim == 0:  # one adapter for every row: a plain LoRA product
            a = self.a[:, slot].astype(x.dtype)
            return y + jnp.matmul(jnp.matmul(x, a), (gain * self.b[slot]).astype(x.dtype)).astype(y.dtype)
        rows = slot.shape[0]
        if x.shape[0] % rows:
            raise LowraxError(f"{x.shape[0]} flattened rows cannot be split into {rows} sequences (adapter_names)")
        d_in, slots, rank = self.a.shape
        own = (jnp.arange(slots)[None, :] == slot[:, None]) * gain[:, None]  # [rows, S]: the row's slot, scaled
        h = jnp.matmul(x, self.a.reshape(d_in, slots * rank).astype(x.dtype)).reshape(rows, -1, slots, rank)
        h = (h * own[:, None, :, None].astype(h.dtype)).reshape(x.shape[0], slots * rank)
        return y + jnp.matmul(h, self.b.reshape(slots * rank, -1).astype(x.dtype)).astype(y.dtype)

    def delta(self) -> jnp.ndarray:
        slot, gain = self._slot_and_gain()
        if slot.ndim != 0:
            raise LowraxError("merging takes one active adapter, not one per row: set_adapter(params, name) first")
        return gain * (self.a[:, slot].astype(jnp.float32) @ self.b[slot].astype(jnp.float32))

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


def empty_slots(base, capacity: int, max_rank: int, dtype=jnp.float32) -> LoraSlots:
    d_in, d_out = base.shape
    return LoraSlots(base=base, a=jnp.zeros((d_in, capacity, max_rank), dtype),
                     b=jnp.zeros((capacity, max_rank, d_out), dtype), scale=jnp.zeros((capacity,), jnp.float32),
                     rank=jnp.zeros((capacity,), jnp.int32))


def grown(node: LoraSlots, capacity: int, max_rank: int) -> LoraSlots:
    """The node with room for `capacity` slots of rank `max_rank` (zero-padded; never shrinks)."""
    slots, rank = node.capacity
    if capacity <= slots and max_rank <= rank:
        return node
    pad_s, pad_r = max(capacity - slots, 0), max(max_rank - rank, 0)
    return node.replace(a=jnp.pad(node.a, ((0, 0), (0, pad_s), (0, pad_r))),
                        b=jnp.pad(node.b, ((0, pad_s), (0, pad_r), (0, 0))),
                        scale=jnp.pad(node.scale, (0, pad_s)), rank=jnp.pad(node.rank, (0, pad_s)))


def with_slot(node: LoraSlots, slot: int, a=None, b=None, scale: float = 0.0) -> LoraSlots:
    """The node with slot `slot` holding factors a [in, r], b [r, out] (None: emptied)."""
    if a is None:
        return node.replace(a=node.a.at[:, slot].set(0), b=node.b.at[slot].set(0), scale=node.scale.at[slot].set(0),
                            rank=node.rank.at[slot].set(0))
    r = a.shape[1]
    a_pad = jnp.zeros((node.a.shape[0], node.a.shape[2]), node.a.dtype).at[:, :r].set(a.astype(node.a.dtype))
    b_pad = jnp.zeros(node.b.shape[1:], node.b.dtype).at[:r].set(b.astype(node.b.dtype))
    return node.replace(a=node.a.at[:, slot].set(a_pad), b=node.b.at[slot].set(b_pad),
                        scale=node.scale.at[slot].set(scale), rank=node.rank.at[slot].set(r))
