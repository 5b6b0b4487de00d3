"""Layers shared by the model families: norms, rotary embeddings, attention, masks.

Everything here is a pure function of arrays. Shapes use b=batch, t=query
length, s=key length, h=query heads, k=key/value heads, d=head dim.
Softmax and normalisation statistics are computed in float32 whatever the
compute dtype, as the reference implementations do.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.dropout import site_key
from lowrax.core.lean_backward import dropout_then_contract, gated, input_saving, masked_softmax
from lowrax.errors import LowraxError

_PLAIN_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}
# What the models call: the same functions, with backwards that keep only their inputs (core.lean_backward).
ACTIVATIONS = {name: input_saving(fn) for name, fn in _PLAIN_ACTIVATIONS.items()}
GATED_ACTIVATIONS = {name: gated(fn) for name, fn in _PLAIN_ACTIVATIONS.items()}


def activation(name: str):
    """The activation function HF calls `name` (`hidden_act`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise LowraxError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


def gated_activation(name: str):
    """(gate, up) -> activation(gate) * up, the gated MLP's product, for the activation HF calls `name`."""
    activation(name)  # the same error for an unknown name
    return GATED_ACTIVATIONS[name]


def rms_norm(x: jnp.ndarray, params: dict, eps: float) -> jnp.ndarray:
    """Llama RMSNorm: x / rms(x) * scale, statistics in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return params["scale"].astype(x.dtype) * x32.astype(x.dtype)


def layer_norm(x: jnp.ndarray, params: dict, eps: float) -> jnp.ndarray:
    """LayerNorm over the last axis with scale and bias, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


# --- rotary position embeddings -------------------------------------------------------


def rope_inverse_frequencies(rotary_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] in float32, with HF's `rope_type` scalings.

    Supports the default, `linear` and `llama3` rope types (the ones Llama,
    Mistral and Qwen2 checkpoints use).
    """
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise LowraxError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def rope_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables [b, t, rotary_dim] for integer positions [b, t] (float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [b, t, heads, d] by HF's half-split convention (`rotate_half`)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = (x_rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# --- attention -------------------------------------------------------------------------


def causal_mask(
    query_slots: jnp.ndarray,
    key_valid: jnp.ndarray,
    sliding_window: int | None = None,
) -> jnp.ndarray:
    """Boolean mask [b, t, s]: key slot j is visible from query slot i.

    query_slots [b, t] are the queries' slot indices in the key sequence (an
    arange without a cache, `cache_index + arange` with one); key_valid [b, s]
    is False for padding, or [b, t, s] for per-query validity (packed
    sequences). With a sliding window only the last `window` slots are visible.
    """
    key_slots = jnp.arange(key_valid.shape[-1])[None, None, :]
    q = query_slots[:, :, None]
    mask = (key_slots <= q) & (key_valid if key_valid.ndim == 3 else key_valid[:, None, :])
    if sliding_window is not None:
        mask = mask & (q - key_slots < sliding_window)
    return mask


# Attention scores [b, heads, queries, keys] in float32 larger than ATTENTION_WHOLE_LIMIT are computed a
# block of queries at a time (blocks of ATTENTION_BLOCK_BYTES) in a rematerialised scan: the backward
# recomputes one block's scores instead of keeping every layer's (at 8 x 1024 tokens on SmolLM2 the step's
# temporaries fall from 42 to 16 GB), for about 20% more step time where it applies. Below the limit
# (SmolLM2 at 4 x 256 tokens: 9 MB a layer) the scores are kept whole, and the backward keeps only the
# probabilities (`lean_backward.masked_softmax`).
ATTENTION_WHOLE_LIMIT = 64 << 20
ATTENTION_BLOCK_BYTES = 16 << 20


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray, scale: float,
              softcap: float | None = None, bias: jnp.ndarray | None = None, dropout: tuple = (0.0, None)) -> jnp.ndarray:
    """Grouped-query scaled dot-product attention.

    q [b, t, h, d], k and v [b, s, k, d] with h a multiple of k, mask [b, t, s]
    boolean. Returns [b, t, h * d]. Masked scores get the most negative finite
    value rather than -inf, so an all-masked row (a padding query) stays finite.
    softcap (Gemma 2): scores become softcap * tanh(scores / softcap) before masking.
    bias [b or 1, h, t, s] (T5's relative position bias): added to the scores before masking.
    dropout (rate, key): dropout on the attention probabilities in a training step (see core.dropout).
    Without dropout, scores larger than ATTENTION_WHOLE_LIMIT are computed a block of queries at a time.
    """
    b, t, h, _ = q.shape
    row_bytes = 4 * b * h * k.shape[1]
    block = max(1, ATTENTION_BLOCK_BYTES // row_bytes)
    if dropout[0] or row_bytes * t <= ATTENTION_WHOLE_LIMIT or block >= t:
        return _attention(q, k, v, mask, bias, scale, softcap, dropout)

    def one_block(q_block, mask_block, *bias_block):
        return _attention(q_block, k, v, mask_block, bias_block[0] if bias_block else None, scale, softcap, dropout)

    inputs = [(q, 1), (mask, 1)]
    if bias is not None:
        inputs.append((jnp.broadcast_to(bias, (bias.shape[0], h, t, bias.shape[-1])), 2))
    return by_blocks(one_block, t, block, inputs)


def by_blocks(fn, length: int, block: int, inputs: list[tuple[jnp.ndarray, int]]):
    """fn applied to blocks of `block` along a length-`length` axis of each input (array, axis), in a
    rematerialised scan: the backward recomputes one block's intermediates at a time instead of keeping
    them all. fn's outputs (an array or a tuple) carry the blocked axis at 1; they are joined there. The
    last block is padded with zeros, and the padding dropped from the outputs."""
    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split_blocks(x, block, axis) for x, axis in inputs))
    return jax.tree.map(lambda y: join_blocks(y, length), out)


def split_blocks(x: jnp.ndarray, block: int, axis: int = 1) -> jnp.ndarray:
    """[..., length, ...] -> [blocks, ..., block, ...]: the axis cut into blocks of `block`, stacked in
    front, the last one padded with zeros."""
    length = x.shape[axis]
    blocks = -(-length // block)
    x = jnp.pad(x, [(0, blocks * block - length if i == axis else 0) for i in range(x.ndim)])
    return jnp.moveaxis(x.reshape(*x.shape[:axis], blocks, block, *x.shape[axis + 1:]), axis, 0)


def join_blocks(y: jnp.ndarray, length: int) -> jnp.ndarray:
    """[blocks, n, block, ...] -> [n, length, ...]: split_blocks' inverse for axis 1, padding dropped."""
    return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:])[:, :length]


def _attention(q, k, v, mask, bias, scale, softcap, dropout) -> jnp.ndarray:
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.astype(jnp.float32).reshape(bias.shape[0], kv_heads, h // kv_heads, *bias.shape[2:])
    probs = masked_softmax(scores, mask[:, None, None, :, :]).astype(v.dtype)
    rate, key = dropout  # the mask `dropped_out` draws at site 0
    out = dropout_then_contract("bkgts,bskd->btkgd", probs, v, rate, site_key(key, 0))
    return out.reshape(b, t, h * v.shape[-1])


def segment_visibility(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[b, t, t] True where query and key belong to the same packed example (segment 0 is padding)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return same & (segment_ids[:, None, :] > 0)


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Position ids [b, t] that restart at 0 at the start of every packed example."""
    t = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(t)[None, :], segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def positions_from_mask(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Position ids [b, t] counting only real tokens, so left padding does not shift positions."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
