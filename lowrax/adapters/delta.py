"""What the methods that add a weight delta to the frozen kernel share (LoHa, LoKr, C3A, FourierFT,
HiRA, SHiRA, ...):

    y = x @ base + x @ delta            delta [in, out], float32, built from the method's own arrays

A node type defines `delta()`, and `delta_output(x)` where x @ delta is cheaper without forming delta.
Merging adds delta to the kernel; unmerging subtracts it. Methods whose delta depends on the base
(HiRA) override `merge_into` / `unmerge_from` with the base they are given.

A method whose step forms the dense delta anyway (FourierFT, SHiRA, HiRA, MiSS's "bat") says so with
`folds_into_base`: over a float32 array base the step then multiplies x by the merged kernel once instead
of by the base and by the delta (one product less forward and one less for x's gradient).
"""

from __future__ import annotations

import jax.numpy as jnp

from lowrax.core.kernels import is_kernel_type
from lowrax.core.linear import matmul
from lowrax.core.node import AdapterNode


class DeltaKernel(AdapterNode):
    """Base of node types that add `delta()` (float32 [in, out]) to the frozen kernel's output."""

    def delta(self) -> jnp.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement delta()")

    def delta_output(self, x: jnp.ndarray) -> jnp.ndarray:
        return x @ self.delta().astype(x.dtype)

    @property
    def folds_into_base(self) -> bool:
        """True when delta_output(x) is x @ delta() with x untouched (no dropout on the adapter path)."""
        return False

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        # a float32 array only: rounded to a 16-bit base's precision, base + delta would lose small deltas
        if self.folds_into_base and not is_kernel_type(self.base) and self.base.dtype == jnp.float32:
            return matmul(x, self.merge_into(self.base.astype(jnp.float32)))
        y = matmul(x, self.base)
        return y + self.delta_output(x).astype(y.dtype)

    def merge_into(self, w: jnp.ndarray) -> jnp.ndarray:
        return w + self.delta()

    def unmerge_from(self, merged: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
        return merged - self.delta()

