"""A sparse base kernel: a pruned weight and its mask, as one leaf type of the parameter tree.

`SparseKernel(kernel, mask)` stands where a linear kernel was. The kernel [in, out] (a plain
array, or an NF4 tensor for QLoRA over a pruned base) is zero wherever `mask` is False, so
the layer's product is the kernel's own: `linear` dispatches to it like any kernel type, and
an adapter wraps it as its frozen base. The mask is what merging consults to keep the
sparsity (`lowrax.merge(params, keep_sparsity=True)`: the merged delta is masked), and what
`lowrax.prune` reports per layer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.io.tables import get_path, set_path
from lowrax.models.linear import matmul, register_linear


@struct.dataclass
class SparseKernel:
    """A pruned kernel: `kernel` [in, out] is zero where `mask` (bool [in, out], True = kept) is False.
    `pattern`: how the mask was chosen ("unstructured", "2:4", ...), carried for reports and saving."""

    kernel: Any
    mask: jnp.ndarray
    pattern: str = struct.field(pytree_node=False, default="unstructured")

    @property
    def shape(self) -> tuple:
        return tuple(self.kernel.shape)

    @property
    def ndim(self) -> int:
        return len(self.kernel.shape)

    @property
    def dtype(self):
        return self.kernel.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def sparsity(self) -> float:
        """The fraction of weights pruned."""
        return 1.0 - float(jnp.mean(self.mask.astype(jnp.float32)))


@register_linear(SparseKernel)
def _sparse_matmul(x: jnp.ndarray, kernel: SparseKernel) -> jnp.ndarray:
    return matmul(x, kernel.kernel)


def sparse_kernel(kernel: jnp.ndarray, kept: jnp.ndarray, pattern: str = "unstructured") -> SparseKernel:
    """The SparseKernel keeping `kernel` where `kept` is True (the rest set to zero)."""
    kept = jnp.asarray(kept, bool)
    return SparseKernel(kernel=jnp.where(kept, kernel, jnp.zeros((), kernel.dtype)), mask=kept, pattern=pattern)


def is_sparse(x: Any) -> bool:
    return isinstance(x, SparseKernel)


def masked_like(base: Any, merged: jnp.ndarray) -> jnp.ndarray:
    """`merged` with the pruned weights of a sparse `base` set to zero (merged as is otherwise)."""
    return jnp.where(base.mask, merged, jnp.zeros((), merged.dtype)) if is_sparse(base) else merged


def sparse_modules(params: Any) -> dict[str, SparseKernel]:
    """Dotted module name -> SparseKernel of every pruned kernel in the tree (bare or an adapter's base)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: is_sparse(x) or hasattr(x, "base"))[0]:
        leaf = getattr(leaf, "base", leaf)
        if is_sparse(leaf):
            keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
            out[".".join(keys[:-1])] = leaf
    return out


def with_sparse_kernels(params: dict, modules: dict[str, SparseKernel]) -> dict:
    """params (plain kernels, e.g. merged ones) with the kernels of `modules` made SparseKernels
    again under those modules' masks and patterns (the kernels must already be zero off the mask)."""
    out = jax.tree.map(lambda x: x, params)  # fresh containers; arrays shared
    for name, sparse in modules.items():
        path = tuple(name.split(".")) + ("kernel",)
        set_path(out, path, SparseKernel(kernel=get_path(out, path), mask=sparse.mask, pattern=sparse.pattern))
    return out
