"""8-bit row-wise weights, byte-for-byte bitsandbytes' `Linear8bitLt` (LLM.int8() storage), as a kernel type.

Layout (what `int8_vectorwise_quant` makes and transformers + bitsandbytes save):
  weight  int8 [rows, cols]   round(w * 127 / absmax of its row), w cast to float16 first
  SCB     float32 [rows]      each row's absmax
  weight_format uint8 []      0 ("row"), kept for older readers
Rows are the HF weight's rows (a torch Linear's output features): like NF4, the codes keep
the HF layout and are marked `transposed` under a Flax kernel [in, out].

The product dequantizes the weight (`codes * SCB / 127`, bitsandbytes' arithmetic) inside
the step and multiplies in the activations' dtype; bitsandbytes' own int8 matmul also
quantizes the activations, so its outputs differ from this by that rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.core.kernels import TRANSPOSED, KernelType, register_kernel_type
from lowrax.errors import CheckpointError, LowraxError

# bitsandbytes multiplies by this reciprocal of 127, a float32 once it meets a float32 tensor.
INVERSE_127 = np.float32(7.874015718698502e-3)
SCB_KEY = "SCB"
FORMAT_KEY = "weight_format"


@struct.dataclass
class Int8Tensor:
    """A frozen weight in row-wise int8: `codes` [rows, cols] and `row_absmax` [rows] (bitsandbytes' SCB).

    shape: the logical (tree) shape; transposed: the codes hold its transpose (the HF [out, in]
    layout of a Flax kernel [in, out]); dtype: the dtype the weight had, and dequantizes to.
    """

    codes: jnp.ndarray
    row_absmax: jnp.ndarray
    shape: tuple = struct.field(pytree_node=False, default=())
    dtype: str = struct.field(pytree_node=False, default="float32")
    transposed: bool = struct.field(pytree_node=False, default=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def quantize_int8(x, transpose: bool = False) -> Int8Tensor:
    """Row-wise int8 of a float array as bitsandbytes quantizes it (rows of x.T when `transpose`)."""
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.ndim(x) != 2:
        raise LowraxError(f"int8 quantizes 2-D floating-point weights; got {dtype} of shape {jnp.shape(x)}")
    data = (jnp.asarray(x).T if transpose else jnp.asarray(x)).astype(jnp.float16).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(data), axis=1)
    # torch divides a scalar by a tensor as scalar * reciprocal (not a correctly rounded quotient)
    scaled = data * (jnp.float32(127.0) * (jnp.float32(1.0) / absmax))[:, None]
    codes = jnp.where(absmax[:, None] > 0, jnp.round(scaled), 0).astype(jnp.int8)  # an all-zero row stays zero
    return Int8Tensor(codes, absmax, shape=tuple(x.shape), dtype=dtype.name, transposed=transpose)


def dequantize_int8(t: Int8Tensor, dtype=None) -> jnp.ndarray:
    """The weight [*shape] in `dtype` (default: the dtype it was quantized from)."""
    out = t.codes.astype(jnp.float32) * t.row_absmax[:, None] * INVERSE_127
    return (out.T if t.transposed else out).astype(dtype or t.dtype)


def dequantize_int8_after(t: Int8Tensor, anchor: jnp.ndarray, dtype) -> jnp.ndarray:
    """Dequantize t, made to depend on `anchor` (a scalar of this layer's activations), so XLA
    cannot hoist every layer's dequantization to the start of the step and keep all the
    full-precision weights alive at once (as `nf4.dequantize_after`)."""
    tie = (anchor * 0).astype(jnp.float32)  # x * 0 is not folded away for floats
    return dequantize_int8(t.replace(row_absmax=t.row_absmax + tie), dtype)


@jax.custom_vjp
def int8_matmul(x: jnp.ndarray, t: Int8Tensor) -> jnp.ndarray:
    """x [n, in] @ the dequantized weight; the weight is frozen (no gradient), and the backward
    pass dequantizes again rather than keep a full-precision copy alive."""
    return jnp.matmul(x, dequantize_int8_after(t, x[0, 0], x.dtype))


def _int8_matmul_fwd(x, t):
    return int8_matmul(x, t), t


def _int8_matmul_bwd(t, g):
    g, t = jax.lax.optimization_barrier((g, t))
    no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                           else jnp.zeros_like(a), t)
    return jnp.matmul(g, dequantize_int8_after(t, g[0, 0], g.dtype).T), no_grad


int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


def _module_key(weight_key: str, name: str) -> str:
    """`....q_proj.weight` -> `....q_proj.<name>` (bitsandbytes saves its statistics beside the weight)."""
    return weight_key[: -len("weight")] + name


def _read_hf(key: str, files: Any):
    if not key.endswith(".weight") or _module_key(key, SCB_KEY) not in files:
        return None

    def read() -> Int8Tensor:
        codes, absmax = files.get(key), files.get(_module_key(key, SCB_KEY))
        if codes.dtype != np.int8 or codes.ndim != 2 or absmax.shape != (codes.shape[0],):
            raise CheckpointError(f"{key}: an 8-bit weight must be int8 [rows, cols] with SCB float32 [rows]; got "
                                  f"{codes.dtype} {codes.shape} and SCB {absmax.shape}")
        fmt = _module_key(key, FORMAT_KEY)
        if fmt in files and int(np.asarray(files.get(fmt)).reshape(-1)[0]) != 0:
            raise CheckpointError(f"{fmt}: only bitsandbytes' row-major 8-bit format (0) is supported")
        return Int8Tensor(jnp.asarray(codes), jnp.asarray(absmax.astype(np.float32)), shape=tuple(codes.shape))

    return files.shape(key), read


def _to_hf(key: str, t: Int8Tensor, transposed: bool) -> dict:
    if t.transposed != transposed:
        raise CheckpointError(f"{key} is stored in int8 in a layout other than its HF weight's")
    return {key: np.asarray(t.codes, np.int8), _module_key(key, SCB_KEY): np.asarray(t.row_absmax, np.float32),
            _module_key(key, FORMAT_KEY): np.zeros((), np.uint8)}


def _hf_config(tensors: dict) -> dict | None:
    if not any(k.endswith("." + SCB_KEY) for k in tensors):
        return None
    return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}


def _axes(t: Int8Tensor, sharding_of: Callable[[Any, Any], Any]) -> Int8Tensor:
    # Codes are the kernel (or its transpose): split like it; the row statistics are small and
    # kept whole on every device.
    codes = None if t.codes is None else sharding_of(t.codes, TRANSPOSED if t.transposed else None)
    return t.replace(codes=codes, row_absmax=None if t.row_absmax is None else sharding_of(t.row_absmax, ()))


INT8_KERNEL = register_kernel_type(Int8Tensor, KernelType(
    name="int8", matmul=int8_matmul,
    dense=lambda t, tie_to=None, dtype=None: (dequantize_int8(t, dtype) if tie_to is None
                                              else dequantize_int8_after(t, tie_to, dtype or t.dtype)),
    rebuilt=lambda t, values: quantize_int8(values.astype(t.dtype), t.transposed),
    from_hf=lambda t, shape, transposed: t.replace(shape=tuple(shape), transposed=True) if transposed else t,
    to_hf=_to_hf, axes=_axes, quant_method="int8",
    quantize=lambda kernel, cfg, transposed: quantize_int8(kernel, transposed),
    read_hf=_read_hf, hf_statistics=("." + SCB_KEY, "." + FORMAT_KEY), hf_config=_hf_config))
