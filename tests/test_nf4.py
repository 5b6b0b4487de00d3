"""NF4 against bitsandbytes' `quantize_4bit` / `dequantize_4bit` on the CPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lowrax.errors import LowraxError
from lowrax.quant import nf4
from lowrax.quant.codes import DYNAMIC_MAP, NF4_LEVELS

torch = pytest.importorskip("torch", reason="NF4 parity tests need torch (pip install -e .[test])")
F = pytest.importorskip("bitsandbytes.functional", reason="NF4 parity tests need bitsandbytes (pip install -e .[test])")

DTYPES = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16),
          "float16": (torch.float16, jnp.float16)}
SHAPES = [(64, 64), (33, 17), (1000,), (300, 129), (5,)]


def pair(shape, dtype, seed=0):
    x = torch.tensor(np.random.default_rng(seed).normal(size=shape).astype(np.float32)).to(DTYPES[dtype][0])
    return x, jnp.asarray(x.float().numpy()).astype(DTYPES[dtype][1])


def from_bnb(packed, state) -> nf4.NF4Tensor:
    """A lowrax NF4Tensor holding exactly what bitsandbytes produced."""
    dq = state.nested
    return nf4.NF4Tensor(
        packed=jnp.asarray(packed.numpy().reshape(-1)), absmax=jnp.asarray(state.absmax.numpy()),
        nested_absmax=jnp.asarray(state.state2.absmax.numpy()) if dq else None,
        offset=jnp.asarray(state.offset.numpy()) if dq else None,
        shape=tuple(state.shape), dtype=str(state.dtype).replace("torch.", ""), blocksize=state.blocksize)


def reference_dequantize(packed, state) -> np.ndarray:
    """bitsandbytes' reference (non-native) NF4 dequantization, flattened to float32."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    out = _dequantize_4bit_compute(packed.reshape(-1), absmax, F.get_4bit_type("nf4", device="cpu"),
                                   state.blocksize, state.shape, state.dtype)
    return out.float().numpy().reshape(-1)


def test_code_books_match_bitsandbytes():
    assert np.array_equal(NF4_LEVELS, F.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(DYNAMIC_MAP, F.create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_codes_and_absmax_are_identical(shape, dtype, blocksize):
    x, xj = pair(shape, dtype)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    ours = nf4.quantize(xj, blocksize, double_quant=False)
    assert np.array_equal(np.asarray(ours.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(ours.absmax), state.absmax.numpy())
    # lowrax dequantizes exactly as bitsandbytes' reference kernel (code[q] * absmax, then the dtype)
    ref = reference_dequantize(packed, state)
    assert np.array_equal(np.asarray(nf4.dequantize(ours)).astype(np.float32).reshape(-1), ref)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(64, 64), (300, 129), (576, 1536)])
def test_lowrax_dequantizes_double_quantized_bitsandbytes_output_exactly(shape, dtype):
    x, _ = pair(shape, dtype, seed=1)
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4.dequantize(from_bnb(packed, state))
    assert ours.dtype == DTYPES[dtype][1]
    assert np.array_equal(np.asarray(ours).astype(np.float32).reshape(-1), reference_dequantize(packed, state))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape,blocksize", [((96, 4096), 4096), ((96, 4096), 64), ((576, 1536), 64),
                                             ((300, 129), 32), ((5,), 64)])
def test_double_quantization_is_bit_identical_to_bitsandbytes(shape, blocksize, dtype):
    """Packed codes, 8-bit statistics, nested absmax and offset all equal bitsandbytes' (CPU), and so
    every dequantized value. (96, 4096) at blocksize 4096 once differed in 0.41% of its values: the
    offset was summed in another order than torch's."""
    for seed in range(3):
        _, xj = pair(shape, dtype, seed=seed)
        xj = (xj.astype(jnp.float32) * 0.02).astype(xj.dtype)  # weight-sized values
        x = torch.tensor(np.asarray(xj.astype(jnp.float32))).to(DTYPES[dtype][0])
        packed, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        ours = nf4.quantize(xj, blocksize, double_quant=True)
        assert np.array_equal(np.asarray(ours.packed), packed.numpy().reshape(-1))
        assert np.asarray(ours.offset) == state.offset.numpy()
        assert np.array_equal(np.asarray(ours.nested_absmax), state.state2.absmax.numpy())
        assert np.array_equal(np.asarray(ours.absmax), state.absmax.numpy())
        ref = F.dequantize_4bit(packed, state).float().numpy().reshape(-1)
        assert np.array_equal(np.asarray(nf4.dequantize(ours)).astype(np.float32).reshape(-1), ref)


def test_statistics_follow_torch_and_bitsandbytes_cpu_arithmetic():
    """torch's float32 mean order for every length up to a few thousand, and bitsandbytes' CPU
    8-bit code table (not the nearest level) on values that straddle bin edges; jit gives the same bits."""
    import jax

    from lowrax.quant.statistics import quantize_blockwise_8bit, torch_float32_mean

    rng = np.random.default_rng(0)
    for n in list(range(1, 70)) + [96, 255, 256, 257, 1000, 4097, 13824, 32768]:
        x = np.abs(rng.normal(size=n) * 3).astype(np.float32)
        assert torch_float32_mean(x) == np.float32(torch.tensor(x).mean().item()), n
    x = rng.normal(size=5000).astype(np.float32)
    codes, absmax = quantize_blockwise_8bit(x, 256)
    ref_codes, ref_state = F.quantize_blockwise(torch.tensor(x), code=torch.tensor(DYNAMIC_MAP), blocksize=256)
    assert np.array_equal(codes, ref_codes.numpy()) and np.array_equal(absmax, ref_state.absmax.numpy())
    jitted = jax.jit(lambda v: (torch_float32_mean(v), *quantize_blockwise_8bit(v, 256)))(jnp.asarray(x))
    assert jitted[0] == torch_float32_mean(x)
    assert np.array_equal(np.asarray(jitted[1]), codes) and np.array_equal(np.asarray(jitted[2]), absmax)


def test_size_is_about_4_13_bits_per_parameter():
    _, xj = pair((576, 1536), "bfloat16")
    t = nf4.quantize(xj, 64, double_quant=True)
    bits = 8 * t.nbytes() / xj.size
    assert 4.12 <= bits <= 4.14


def test_bad_input():
    with pytest.raises(LowraxError, match=r"blocksize must be a power of two from 32 to 4096 .* got 48"):
        nf4.quantize(jnp.ones((64,)), 48)
    with pytest.raises(LowraxError, match="floating-point weights; got dtype int32"):
        nf4.quantize(jnp.ones((64,), jnp.int32))


def test_linear_dequantizes_inside_the_step():
    import jax

    import lowrax

    w = jax.random.normal(jax.random.key(0), (64, 32))
    t = nf4.quantize(w, 64)
    x = jax.random.normal(jax.random.key(1), (3, 5, 64))
    y = jax.jit(lowrax.linear)(x, {"kernel": t})
    assert np.abs(np.asarray(y) - np.asarray(x @ nf4.dequantize(t))).max() <= 1e-5
    err = np.abs(np.asarray(nf4.dequantize(t)) - np.asarray(w))
    # at most half the widest NF4 gap (1 - 0.7230) of the block absmax; typically far less
    assert err.max() <= 0.5 * (1 - 0.7230) * np.abs(np.asarray(w)).max() + 1e-6 and err.mean() < 0.1


def test_transposed_storage_matches_the_torch_layout():
    """A Flax kernel (in, out) quantized with transpose=True holds bitsandbytes' bytes for the (out, in) weight."""
    w = torch.tensor(np.random.default_rng(3).normal(size=(48, 80)).astype(np.float32))  # torch (out, in)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    t = nf4.quantize(jnp.asarray(w.numpy().T), 64, double_quant=False, transpose=True)
    assert t.shape == (80, 48) and t.stored_shape == (48, 80)
    assert np.array_equal(np.asarray(t.packed), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(nf4.dequantize(t)), reference_dequantize(packed, state).reshape(48, 80).T)
