"""NF4 as a kernel type: what `linear`, merging, checkpoints and sharding do with an `NF4Tensor`.

The one place outside `lowrax.quant` that NF4 is known is this registration's effect.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

from lowrax.core.kernels import KernelType, register_kernel_type
from lowrax.errors import CheckpointError
from lowrax.quant import bnb_format, nf4


def _rebuilt(t: nf4.NF4Tensor, values: jnp.ndarray) -> nf4.NF4Tensor:
    """New values quantized as `t` was (blocksize, double quantization, layout)."""
    return nf4.quantize(values.astype(t.dtype), t.blocksize, t.double_quantized, transpose=t.transposed)


def _dense(t: nf4.NF4Tensor, tie_to=None, dtype=None) -> jnp.ndarray:
    return nf4.dequantize(t, dtype) if tie_to is None else nf4.dequantize_after(t, tie_to, dtype or t.dtype)


def _from_hf(t: nf4.NF4Tensor, shape: tuple, transposed: bool) -> nf4.NF4Tensor:
    """Codes read in the HF layout keep their bytes and are marked transposed, so they
    dequantize to the Flax kernel."""
    return t.replace(shape=tuple(shape), transposed=True) if transposed else t


def _to_hf(key: str, t: nf4.NF4Tensor, transposed: bool) -> dict:
    if t.transposed != transposed:
        raise CheckpointError(f"{key} is stored in NF4 in a layout other than its HF weight's")
    return bnb_format.nf4_to_tensors(key, t)


def _axes(t: nf4.NF4Tensor, sharding_of: Callable[[Any, Any], Any]) -> nf4.NF4Tensor:
    # The codes and block statistics are split along their flat block axis; the few
    # nested statistics are replicated.
    def blocks(x):
        return None if x is None else sharding_of(x, ("nf4_blocks",))

    def small(x):
        return None if x is None else sharding_of(x, ())

    return t.replace(packed=blocks(t.packed), absmax=blocks(t.absmax), nested_absmax=small(t.nested_absmax),
                     offset=small(t.offset), nested_code=small(t.nested_code))


def _quantize(kernel: jnp.ndarray, cfg: Any, transposed: bool) -> nf4.NF4Tensor:
    return nf4.quantize(jnp.asarray(kernel), cfg.blocksize, cfg.double_quant, transpose=transposed)


def _read_hf(key: str, files: Any):
    if not bnb_format.is_quantized(key, files.__contains__):
        return None
    shape = tuple(bnb_format.read_state(files.get(key + bnb_format.STATE_SUFFIX))["shape"])
    return shape, lambda: bnb_format.nf4_from_tensors(key, files.get, files.__contains__)


def _hf_config(tensors: dict) -> dict | None:
    if not any(k.endswith(bnb_format.STATE_SUFFIX) for k in tensors):
        return None
    return bnb_format.quantization_config(any(k.endswith(".nested_absmax") for k in tensors))


NF4_KERNEL = register_kernel_type(nf4.NF4Tensor, KernelType(
    name="NF4", matmul=nf4.nf4_matmul, dense=_dense, rebuilt=_rebuilt, from_hf=_from_hf, to_hf=_to_hf, axes=_axes,
    quant_method="nf4", quantize=_quantize, read_hf=_read_hf, hf_statistics=bnb_format.STATISTIC_SUFFIXES,
    hf_config=_hf_config))
