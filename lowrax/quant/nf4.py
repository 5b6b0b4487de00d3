"""NF4 4-bit quantization, bit-compatible with bitsandbytes' `quantize_4bit(quant_type="nf4")`.

Layout (what bitsandbytes stores, and what its 4-bit safetensors hold):
  packed   uint8 [ceil(n / 2)]  two codes per byte, even element in the high nibble
  absmax   float32 [blocks]     per-block max |x| (blocks of `blocksize` over the flattened tensor)
with double quantization (`compress_statistics`):
  absmax   uint8 [blocks]       (absmax - offset) in the signed 8-bit dynamic code, blocks of 256
  nested_absmax float32 [ceil(blocks / 256)], offset float32 []

Both directions are jnp code: jit-able, shardable, usable on host numpy arrays too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lowrax.errors import LowraxError
from lowrax.quant.codes import DYNAMIC_MAP, NF4_LEVELS
from lowrax.quant.statistics import quantize_blockwise_8bit, torch_float32_mean

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@struct.dataclass
class NF4Tensor:
    """A frozen weight stored in NF4; `dequantize(t)` gives it back in `dtype` and `shape`.

    `transposed`: the codes hold the torch `nn.Linear` layout (out, in) of a Flax kernel
    whose `shape` is (in, out), so the bytes are exactly those bitsandbytes stores for
    the HF weight. `nested_code`: the 8-bit map of the statistics, when a checkpoint
    supplied its own (otherwise the standard dynamic map).
    """

    packed: jnp.ndarray
    absmax: jnp.ndarray
    nested_absmax: Any = None
    offset: Any = None
    nested_code: Any = None
    shape: tuple = struct.field(pytree_node=False, default=())
    dtype: str = struct.field(pytree_node=False, default="float32")
    blocksize: int = struct.field(pytree_node=False, default=64)
    transposed: bool = struct.field(pytree_node=False, default=False)

    @property
    def stored_shape(self) -> tuple:
        """Shape of the quantized data (the HF weight's shape)."""
        return tuple(reversed(self.shape)) if self.transposed else tuple(self.shape)

    @property
    def double_quantized(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def nbytes(self) -> int:
        """Bytes of the stored statistics and codes."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in (self.packed, self.absmax, self.nested_absmax, self.offset) if x is not None)


def _blockwise_absmax(flat: jnp.ndarray, blocksize: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(scaled values in [-1, 1], absmax per block), with bitsandbytes' float32 arithmetic:
    full blocks multiply by the reciprocal of their absmax, a partial last block divides."""
    n = flat.shape[0]
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        rest = flat[full:]
        am = jnp.maximum(jnp.max(jnp.abs(rest)), 1e-38)
        absmax = jnp.concatenate([absmax, am[None]])
        scaled = jnp.concatenate([scaled, jnp.clip(rest / am, -1, 1)])
    return scaled, absmax


def _nearest(scaled: jnp.ndarray, levels: np.ndarray) -> jnp.ndarray:
    """Index of the nearest level; a value exactly between two levels takes the lower one."""
    midpoints = jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2.0))
    return jnp.searchsorted(midpoints, scaled, side="left").astype(jnp.uint8)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise LowraxError(f"NF4 blocksize must be a power of two from 32 to 4096 ({BLOCKSIZES}), got {blocksize}")


def quantize(x, blocksize: int = 64, double_quant: bool = True, offset=None, transpose: bool = False) -> NF4Tensor:
    """NF4-quantize a float array (float32, bfloat16 or float16) as bitsandbytes does.

    The packed codes and float32 absmax are bit-identical to bitsandbytes'; so are the
    double-quantized statistics of bitsandbytes on the CPU (`lowrax.quant.statistics`),
    up to 32768 blocks, beyond which torch's sum order depends on its thread count (pass
    `offset` to use a given one). transpose=True quantizes x.T (a Flax kernel stored
    in torch's (out, in) layout) while `shape` stays x's.
    """
    check_blocksize(blocksize)
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise LowraxError(f"NF4 quantizes floating-point weights; got dtype {dtype}")
    logical_shape = tuple(x.shape)
    data = jnp.asarray(x).T if transpose else jnp.asarray(x)
    flat = data.reshape(-1).astype(jnp.float32)
    scaled, absmax = _blockwise_absmax(flat, blocksize)
    if scaled.shape[0] % 2:
        scaled = jnp.concatenate([scaled, jnp.zeros((1,), jnp.float32)])
    codes = _nearest(scaled, NF4_LEVELS)
    packed = (codes[0::2] << 4) | codes[1::2]
    meta = dict(shape=logical_shape, dtype=dtype.name, blocksize=blocksize, transposed=transpose)
    if not double_quant:
        return NF4Tensor(packed, absmax, **meta)
    offset = jnp.asarray(torch_float32_mean(absmax) if offset is None else offset, jnp.float32)
    qabsmax, nested = quantize_blockwise_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Tensor(packed, jnp.asarray(qabsmax), jnp.asarray(nested), offset, **meta)


def block_absmax(t: NF4Tensor) -> jnp.ndarray:
    """The float32 per-block absmax (undoing double quantization as bitsandbytes does)."""
    if not t.double_quantized:
        return t.absmax
    n = t.absmax.shape[0]
    nested = jnp.repeat(t.nested_absmax, NESTED_BLOCKSIZE)[:n]
    code = jnp.asarray(DYNAMIC_MAP) if t.nested_code is None else t.nested_code
    return code[t.absmax.astype(jnp.int32)] * nested + t.offset


def dequantize(t: NF4Tensor, dtype=None) -> jnp.ndarray:
    """The weight back in `dtype` (default: the dtype it was quantized from) and its shape."""
    n = t.size
    codes = jnp.stack([t.packed >> 4, t.packed & 0xF], axis=-1).reshape(-1)[:n].astype(jnp.int32)
    values = jnp.asarray(NF4_LEVELS)[codes]
    scale = jnp.repeat(block_absmax(t), t.blocksize)[:n]
    out = (values * scale).reshape(t.stored_shape)
    return (out.T if t.transposed else out).astype(dtype or t.dtype)


def dequantize_after(t: NF4Tensor, anchor: jnp.ndarray, dtype) -> jnp.ndarray:
    """Dequantize t, made to depend on `anchor` (a scalar of the activations flowing through
    this layer). Without the dependency XLA schedules every layer's dequantization, which
    needs only the parameters, at the start of the program and keeps all the full-precision
    weights alive at once; with it, one layer's weight exists at a time."""
    tie = (anchor * 0).astype(jnp.float32)  # x * 0 is not folded away for floats
    absmax = t.absmax + tie.astype(t.absmax.dtype) if not t.double_quantized else t.absmax
    offset = t.offset + tie if t.double_quantized else t.offset
    return dequantize(t.replace(absmax=absmax, offset=offset), dtype)


@jax.custom_vjp
def nf4_matmul(x: jnp.ndarray, t: NF4Tensor) -> jnp.ndarray:
    """x @ dequantize(t); the weight is frozen, so only x gets a gradient. The backward pass
    dequantizes again (tied to the incoming gradient) instead of keeping the forward's copy:
    that is where QLoRA saves memory, for a second dequantization per step."""
    return jnp.matmul(x, dequantize_after(t, x[0, 0], x.dtype))


def _nf4_matmul_fwd(x, t):
    return nf4_matmul(x, t), t  # the residual is the 4-bit weight, not its dequantized copy


def _nf4_matmul_bwd(t, g):
    # In the backward pass the data dependency alone does not stop XLA from hoisting the
    # dequantizations (measured on the CPU backend); the barrier does.
    g, t = jax.lax.optimization_barrier((g, t))
    w = dequantize_after(t, g[0, 0], g.dtype)
    no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(a.dtype, jnp.floating)
                           else jnp.zeros_like(a), t)
    return jnp.matmul(g, w.T), no_grad


nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)
