"""Kernel types: base weights stored as something other than a plain array.

A linear layer's `kernel` is usually an array [in, out]. A kernel type (NF4 codes, an 8-bit
row-quantized weight, a pruned kernel with its mask) stands in its place, in the tree and
as an adapter's frozen base. Each type registers once, in its own module, a `KernelType`
saying everything the rest of lowrax needs of it: the product, a dense view, what a merge
into it keeps, a rebuild over new values, the HF checkpoint form in both directions
(including quantize-on-load) and the logical axes of its arrays. Everything outside that
module asks this registry; nothing else names the type.

Types may nest (a pruned kernel over NF4 codes): `children` names the fields holding an
inner kernel, so the dense view, the axes and the checkpoint form recurse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lowrax.errors import LowraxError


TRANSPOSED = "transposed"  # logical axes of an array laid out as the dense kernel's transpose


@dataclass(frozen=True)
class KernelType:
    """What one base-weight type does. Shapes: x [n, in], y [n, out], a dense kernel [in, out].

    matmul(x, kernel) -> y: the layer's product, never a dense copy kept for the gradient.
    dense(kernel, tie_to, dtype) -> [in, out]: the values as a plain array, in `dtype` (None: the
        dtype the weight had).
        tie_to: inside a step, a scalar of the layer's activations the computation may depend
        on, so XLA keeps one layer's dense weight alive at a time (None outside a step).
    keep_merged(kernel, merged) -> [in, out]: what a merge of an adapter into this base keeps
        of the merged values (a pruned base zeroes its pruned weights; most keep them all).
    rebuilt(kernel, dense) -> kernel: the same type over new values (PiSSA's residual base,
        Delta-LoRA's moving base, a re-quantized merge).
    fixed: why the type cannot hold new values (a pruned kernel's zeros), or None if it can.
    from_hf(kernel, shape, transposed) -> kernel: a kernel read in the HF tensor's layout made
        the tree's [in, out] kernel of `shape` (transposed: the HF layout is [out, in]).
    to_hf(hf_key, kernel, transposed) -> {key: array} | None: the tensors of its native
        checkpoint form (bitsandbytes' 4-bit or 8-bit keys), or None to save the dense values.
    axes(kernel, sharding_of) -> kernel: the type with each array field replaced by
        `sharding_of(array, logical_axes)`; logical axes None mean "as the dense kernel" (only
        for arrays of the kernel's shape), TRANSPOSED "as its transpose", () replicated.
    quantize(array_hf, quant_cfg, transposed) -> kernel: the type made from a full-precision
        weight in the HF layout on load (`model.quantize` names it by `quant_method`); None for
        types that are not made that way.
    read_hf(key, files) -> (hf_shape, read) | None: the type's native form of HF tensor `key` in a
        checkpoint (`files`: `in`, `get(key)`, `shape(key)`), read lazily; None when absent.
    hf_statistics: suffixes of the tensors stored beside a native weight (not parameters).
    hf_config(tensors) -> dict | None: config.json's `quantization_config` for saved tensors
        that hold this type's native form.
    record_file, record(params, extra) -> dict | None, restore(record) -> {module: wrap}: a file a
        saved model directory carries for this type (a pruned model's masks), written from the
        tree and read back on load: wrap(hf_value, to_tree) is called with each recorded module's
        kernel as read (to_tree: HF layout -> tree layout) and returns finish(kernel, place) ->
        kernel, called with the loaded kernel (place: puts an array where the kernel lives).
    children: names of fields that hold an inner kernel (array or kernel type).

    Only `name` and `matmul` are required: a type without the others (a calibration probe)
    refuses the operations it lacks by name.
    """

    name: str
    matmul: Callable[[Any, Any], Any]
    dense: Callable[..., Any] | None = None
    rebuilt: Callable[[Any, Any], Any] | None = None
    from_hf: Callable[[Any, tuple, bool], Any] | None = None
    axes: Callable[[Any, Callable], Any] | None = None
    keep_merged: Callable[[Any, Any], Any] = lambda kernel, merged: merged
    fixed: str | None = None
    to_hf: Callable[[str, Any, bool], dict | None] = lambda key, kernel, transposed: None
    quant_method: str | None = None
    quantize: Callable[[Any, Any, bool], Any] | None = None
    read_hf: Callable[[str, Any], Any] | None = None
    hf_statistics: tuple[str, ...] = ()
    hf_config: Callable[[dict], dict | None] | None = None
    record_file: str | None = None
    record: Callable[[Any, dict | None], dict | None] | None = None
    restore: Callable[[dict], dict] | None = None
    children: tuple[str, ...] = field(default=())


_TYPES: dict[type, KernelType] = {}


def register_kernel_type(cls: type, spec: KernelType) -> KernelType:
    """Make `cls` a kernel type: `linear`, merging, saving, loading and sharding then handle it."""
    _TYPES[cls] = spec
    return spec


def register_linear(cls: type) -> Callable[[Callable], Callable]:
    """Decorator: `fn(x, kernel) -> y` as the product of `cls` kernels, a kernel type with nothing
    else (merging, saving or sharding one is refused by name). A full type registers a KernelType."""

    def decorator(fn: Callable) -> Callable:
        register_kernel_type(cls, KernelType(name=cls.__name__, matmul=fn))
        return fn

    return decorator


def kernel_type(x: Any) -> KernelType | None:
    """The registered KernelType of `x`, or None for a plain array (or anything else)."""
    return _TYPES.get(type(x))


def is_kernel_type(x: Any) -> bool:
    """True for a kernel of a registered non-array type."""
    return type(x) in _TYPES


def kernel_types() -> list[KernelType]:
    """Every registered kernel type."""
    return list(_TYPES.values())


def hf_statistic_suffixes() -> tuple[str, ...]:
    """Suffixes of the checkpoint tensors stored beside a native weight of any kernel type."""
    return tuple(s for spec in _TYPES.values() for s in spec.hf_statistics)


def quantizer(method: str) -> KernelType:
    """The kernel type a `model.quantize` method name makes on load."""
    for spec in _TYPES.values():
        if spec.quant_method == method:
            return spec
    known = sorted(s.quant_method for s in _TYPES.values() if s.quant_method)
    raise LowraxError(f"unknown quantization method {method!r}; expected one of {known}")


def quant_methods() -> list[str]:
    return sorted(s.quant_method for s in _TYPES.values() if s.quant_method)


def operation(spec: KernelType, name: str) -> Callable:
    """`spec`'s implementation of `name`, or a LowraxError naming the type and the operation."""
    fn = getattr(spec, name)
    if fn is None:
        raise LowraxError(f"{spec.name} kernels do not support {name} (their KernelType leaves it unset)")
    return fn


def dense_kernel(kernel: Any, tie_to=None, dtype=None) -> Any:
    """A kernel as a plain array [in, out] in `dtype` (None: its own; a plain array is returned
    as it is, cast to `dtype` if given)."""
    spec = kernel_type(kernel)
    if spec is None:
        return kernel if dtype is None else kernel.astype(dtype)
    return operation(spec, "dense")(kernel, tie_to, dtype)


def keep_merged(base: Any, merged: Any) -> Any:
    """What a merge into `base` keeps of `merged` (all of it for a plain array)."""
    spec = kernel_type(base)
    return merged if spec is None else spec.keep_merged(base, merged)


def why_fixed(base: Any) -> str | None:
    """Why `base` cannot be rebuilt over new values (None: it can)."""
    spec = kernel_type(base)
    return None if spec is None else spec.fixed


def rebuilt(base: Any, values: Any) -> Any:
    """`base`'s type over new dense values (the values themselves for a plain array)."""
    spec = kernel_type(base)
    if spec is None:
        return values.astype(base.dtype)
    if spec.fixed:
        raise LowraxError(f"a {spec.name} base cannot take new values: {spec.fixed}")
    return operation(spec, "rebuilt")(base, values)


def is_quantized(kernel: Any) -> bool:
    """True when `kernel`, or a kernel it nests, is of a quantized type (one made by `model.quantize`)."""
    spec = kernel_type(kernel)
    while spec is not None:
        if spec.quant_method:
            return True
        kernel = getattr(kernel, spec.children[0]) if spec.children else None
        spec = kernel_type(kernel)
    return False


def native_hf_tensors(key: str, kernel: Any, transposed: bool) -> dict | None:
    """A kernel's tensors in its native checkpoint form (None: save its dense values); a nesting
    type without a form of its own saves its inner kernel's."""
    spec = kernel_type(kernel)
    if spec is None:
        return None
    native = spec.to_hf(key, kernel, transposed)
    if native is None and spec.children:
        return native_hf_tensors(key, getattr(kernel, spec.children[0]), transposed)
    return native


def kernel_from_hf(kernel: Any, shape: tuple, transposed: bool) -> Any:
    """A kernel read in its HF tensor's layout, in the tree's [in, out] layout."""
    spec = kernel_type(kernel)
    if spec is None:
        return np.ascontiguousarray(kernel.T) if transposed else kernel
    return operation(spec, "from_hf")(kernel, shape, transposed)


def kernel_shardings(kernel: Any, sharding_of: Callable[[Any, Any], Any]) -> Any:
    """`kernel` with every array replaced by `sharding_of(array, logical_axes)` (None: the dense
    kernel's axes; (): replicated); a plain array is `sharding_of(kernel, None)`."""
    spec = kernel_type(kernel)
    if spec is None:
        return None if kernel is None else sharding_of(kernel, None)
    return operation(spec, "axes")(kernel, sharding_of)
