"""What the methods that add a weight delta to the frozen kernel share (LoHa, LoKr, C3A, FourierFT,
HiRA, SHiRA, ...):

    y = x @ base + x @ delta            delta [in, out], float32, built from the method's own arrays

A node type defines `delta()`, and `delta_output(x)` where x @ delta is cheaper without forming delta.
Merging adds delta to the kernel; unmerging subtracts it. Methods whose delta depends on the base
(HiRA) override `merge_into` / `unmerge_from` with the base they are given.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowrax.core.linear import matmul
from lowrax.core.node import AdapterNode
from lowrax.errors import CheckpointError
from lowrax.peft.common import PREFIX, check_shape


class DeltaKernel(AdapterNode):
    """Base of node types that add `delta()` (float32 [in, out]) to the frozen kernel's output."""

    def delta(self) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement delta()")

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        return x @ self.delta().astype(x.dtype)

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        return y + self.delta_output(x).astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()


def module_names(tensors: dict, suffix: str, bases: dict, method: str) -> list[str]:
    """The adapted modules of a PEFT file (keys without PEFT's prefix): those with a `suffix` tensor,
    each a module of this model, or a CheckpointError that names the problem."""
    names = sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix))
    if not names:
        raise CheckpointError(f"{method} adapter holds no {suffix} tensors")
    for name in names:
        if name not in bases:
            raise CheckpointError(f"adapter tensor {PREFIX}{name}{suffix} targets {name!r}, which is not a linear "
                                  "module of this model")
    return names


def tensor(tensors: dict, name: str, field: str, expected: tuple[int, ...], method: str):
    """One adapter tensor of a module as float32 numpy, present and of the expected (torch) shape."""
    key = f"{name}.{field}"
    if key not in tensors:
        raise CheckpointError(f"{method} adapter lacks {PREFIX}{key}")
    check_shape(name, field, tensors[key], expected)
    return np.asarray(tensors[key], np.float32)


def value_and_pattern(values: dict[str, int]) -> tuple[int, dict[str, int]]:
    """A per-module setting as PEFT's config holds it: the most common value (the smallest on a tie)
    and a pattern of the module names that differ from it."""
    counts = list(values.values())
    common = max(sorted(set(counts)), key=counts.count)
    return common, {name: v for name, v in values.items() if v != common}
