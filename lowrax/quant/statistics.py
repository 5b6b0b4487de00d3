"""Double quantization of NF4's block statistics, bit for bit as bitsandbytes does it on the CPU.

Two details decide the bits, and both are reproduced here:

- The offset is `absmax.mean()` in torch float32: a sum in torch's CPU order
  (8 float lanes, 4-way interleaved rows, a cascade of 4 levels over chunks of
  16, then the lanes one by one), divided by n. A plainly ordered sum differs by
  one ulp about half the time, and the (96, 4096) layout with blocksize 4096
  showed it: 0.41% of its dequantized bf16 weights moved by one bf16 step.
  torch sums more than 32768 values (over 2M weights at blocksize 64) in
  per-thread chunks whose split depends on its thread count; there the order
  here is torch's single-thread one.
- The 8-bit codes come from bitsandbytes 0.50's CPU kernel: every block is
  multiplied by the reciprocal of its absmax (the last, partial one too), the
  result is mapped to one of 65536 bins, and each bin holds the level nearest
  its centre. That differs from picking the nearest level for about 0.1% of the
  values.

The functions take concrete (numpy) or traced (jnp) arrays; the same float32
additions run in the same order either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.quant.codes import DYNAMIC_MAP

SUM_LANES = 8  # torch's Vectorized<float> width in its CPU sum kernel
_ILP = 4  # rows summed side by side
_LEVELS = 4  # cascade levels
LUT_BINS = 65536


def _lookup_table(code: np.ndarray) -> np.ndarray:
    """bin -> code index: the level nearest each bin's centre (float32, as the C++ builds it)."""
    code = code.astype(np.float32)
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    bins = np.arange(LUT_BINS, dtype=np.float32)
    centres = (np.float32(-1.0) + (np.float32(2.0) * bins) / np.float32(LUT_BINS - 1)).astype(np.float32)
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)


DYNAMIC_LUT = _lookup_table(DYNAMIC_MAP)


def _xp(x):
    return jnp if isinstance(x, jax.core.Tracer) else np


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length() if n > 1 else 0


def _cascade_rows(rows, xp):
    """Sum `rows` [size, ...] over axis 0 as torch's multi_row_sum does (4 levels of accumulators)."""
    size = rows.shape[0]
    power = max(4, _ceil_log2(size) // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    zero = xp.zeros(rows.shape[1:], xp.float32)
    acc = [zero] * _LEVELS
    chunks = size // step
    if chunks:
        # Level 0 restarts from zero for every chunk, so all chunks' sums can be formed side by side.
        chunked = rows[: chunks * step].reshape(chunks, step, *rows.shape[1:])
        sums = chunked[:, 0]
        for j in range(1, step):
            sums = sums + chunked[:, j]
        for c in range(chunks):
            i = (c + 1) * step
            acc[1] = acc[1] + sums[c]
            for level in range(2, _LEVELS):
                if i & (mask << ((level - 1) * power)):
                    break
                acc[level], acc[level - 1] = acc[level] + acc[level - 1], zero
    for i in range(chunks * step, size):
        acc[0] = acc[0] + rows[i]
    for level in range(1, _LEVELS):
        acc[0] = acc[0] + acc[level]
    return acc[0]


def _row_sum(elems, xp):
    """torch's row_sum: elements [size, ...] summed with 4 interleaved accumulators."""
    size = elems.shape[0]
    size_ilp = size // _ILP
    if size_ilp:
        partial = _cascade_rows(elems[: size_ilp * _ILP].reshape(size_ilp, _ILP, *elems.shape[1:]), xp)
        partial = [partial[k] for k in range(_ILP)]
    else:
        partial = [xp.zeros(elems.shape[1:], xp.float32)] * _ILP
    for i in range(size_ilp * _ILP, size):
        partial[0] = partial[0] + elems[i]
    for k in range(1, _ILP):
        partial[0] = partial[0] + partial[k]
    return partial[0]


def torch_float32_mean(x):
    """The mean of a 1-D float32 array with torch's CPU float32 arithmetic: sum in its order, then / n."""
    xp = _xp(x)
    x = xp.asarray(x, xp.float32).reshape(-1)
    n = x.shape[0]
    if n < SUM_LANES:
        total = _row_sum(x, xp)
    else:
        vectors = n // SUM_LANES
        lanes = _row_sum(x[: vectors * SUM_LANES].reshape(vectors, SUM_LANES), xp)
        total = xp.float32(0)
        for k in range(vectors * SUM_LANES, n):
            total = total + x[k]
        for lane in range(SUM_LANES):
            total = total + lanes[lane]
    return (xp.asarray(total, xp.float32) / xp.float32(n)).astype(xp.float32)


def quantize_blockwise_8bit(x, blocksize: int):
    """bitsandbytes' CPU `quantize_blockwise` with the signed dynamic code: (uint8 codes [n], float32 absmax [blocks])."""
    xp = _xp(x)
    x = xp.asarray(x, xp.float32).reshape(-1)
    n = x.shape[0]
    blocks = -(-n // blocksize)
    padded = xp.concatenate([x, xp.zeros(blocks * blocksize - n, xp.float32)]).reshape(blocks, blocksize)
    absmax = xp.max(xp.abs(padded), axis=1)
    safe = xp.where(absmax == 0, xp.float32(1), absmax)
    scaled = xp.clip(padded * (xp.float32(1) / safe)[:, None], -1, 1)
    position = ((scaled + xp.float32(1)) * xp.float32(0.5)) * xp.float32(LUT_BINS - 1) + xp.float32(0.5)
    codes = xp.asarray(DYNAMIC_LUT)[xp.floor(position).astype(xp.int32)]
    codes = xp.where((absmax == 0)[:, None], xp.uint8(0), codes)  # an all-zero block stores code 0
    return codes.reshape(-1)[:n].astype(xp.uint8), absmax.astype(xp.float32)
