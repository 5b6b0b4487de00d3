"""What every model family shares: the causal-LM forward contract and KV caching.

A family subclasses `CausalLM` (decoders) and provides `hidden_states`,
`logits_from_hidden` and `kv_shape`; this class turns them into
`apply(params, input_ids, attention_mask)` for training and evaluation and
into `prefill`/`decode_step` for generation with a fixed-size KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError
from lowrax.io import tables
from lowrax.models.layers import positions_from_mask, segment_positions, segment_visibility
from lowrax.adapters.node import resolve


def recomputed_in_backward(layer_fn: Callable) -> Callable:
    """`layer_fn(params, x, *rest)` whose backward pass recomputes its forward from the inputs.

    Only the inputs are kept for the backward pass (one [b, t, hidden] array per layer
    besides the weights). `jax.checkpoint` marks its recomputation with optimization
    barriers, but XLA's CPU pipeline removes those before scheduling and then runs the
    recomputation during the forward pass, keeping every activation alive anyway
    (measured on SmolLM2: 1.33 -> 1.23 GB of step temporaries). Here the recomputation
    takes the incoming gradient as a zero-valued input, so no backend can start it
    before the backward pass reaches the layer.
    """

    @jax.custom_vjp
    def layer(params, x, *rest):
        return layer_fn(params, x, *rest)

    def forward(params, x, *rest):
        return layer_fn(params, x, *rest), (params, x, rest)

    def backward(saved, grads):
        params, x, rest = saved
        anchor = next(g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating))
        x = x + (anchor.reshape(-1)[0] * 0).astype(x.dtype)  # x * 0 is not folded away for floats
        _, vjp = jax.vjp(layer_fn, params, x, *rest)
        return vjp(grads)

    layer.defvjp(forward, backward)
    return layer


class Model:
    """Common to all families: the tensor table and the config.

    Families are frozen dataclasses with a `config` and a `remat` flag (set through
    `with_remat` for a training step).
    """

    config: Any
    tensor_table: ClassVar[tuple]
    # Prefix of the task-model keys that a bare base-model checkpoint omits
    # (e.g. "bert." for BertModel saved without a head); None when keys never omit one.
    bare_prefix: ClassVar[str | None] = None
    is_causal_lm: ClassVar[bool] = False
    # Module path suffix -> logical axis names of its kernel (bias: the last one); see lowrax.dist.sharding.
    logical_axes: ClassVar[dict] = {}

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def tensors(self) -> list[tables.Tensor]:
        """Every checkpoint tensor this model has, with tree path, HF key and shape."""
        return tables.expand(self.tensor_table, self.config, self.config.num_layers)

    def with_remat(self, remat: bool) -> "Model":
        """This model with every layer recomputed in the backward pass (see `recomputed_in_backward`)."""
        if not isinstance(remat, bool):
            raise LowraxError(f"remat must be true or false, got {remat!r}")
        return dataclasses.replace(self, remat=remat)

    def layer(self, layer_fn: Callable) -> Callable:
        """`layer_fn(params, x, *rest)` as the forward calls it: recomputed in the backward pass under remat."""
        return recomputed_in_backward(layer_fn) if getattr(self, "remat", False) else layer_fn

    def param_shapes(self) -> dict:
        """A tree of `jax.ShapeDtypeStruct` (float32) with the structure `load_pretrained` returns."""
        tree: dict = {}
        for t in self.tensors():
            if not t.optional:
                tables.set_path(tree, t.path, jax.ShapeDtypeStruct(t.shape, jnp.float32))
        return tree


class CausalLM(Model):
    """A decoder-only LM; subclasses implement `hidden_states` and `logits_from_hidden`."""

    is_causal_lm: ClassVar[bool] = True

    def apply(self, params, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Logits [b, t, vocab] for input_ids [b, t].

        attention_mask [b, t] (1 = token, 0 = padding) may pad on either side;
        position ids default to counting real tokens only, so a left-padded
        sequence gets the same positions as unpadded. segment_ids [b, t] (1, 2, ...
        per packed example, 0 for padding) keep packed examples from attending to
        each other and restart their positions.
        """
        hidden = self.final_hidden(params, input_ids, attention_mask, position_ids, segment_ids)
        return self.logits_from_hidden(resolve(params), hidden)

    def final_hidden(self, params, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Final-norm hidden states [b, t, hidden] (what `apply` projects to logits)."""
        params = resolve(params)
        if segment_ids is not None:
            key_valid = segment_visibility(segment_ids)
            if position_ids is None:
                position_ids = segment_positions(segment_ids)
        else:
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            key_valid = attention_mask.astype(bool)
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask)
        hidden, _ = self.hidden_states(params, input_ids, position_ids, key_valid)
        return hidden

    # --- generation with a fixed-size KV cache -------------------------------------

    @staticmethod
    def query_slots(input_ids, cache_index):
        """Slot of each query token in the key sequence: [b, t]."""
        b, t = input_ids.shape
        start = 0 if cache_index is None else cache_index
        return jnp.broadcast_to(start + jnp.arange(t)[None, :], (b, t))

    @staticmethod
    def update_cache(kv_cache, k, v, cache_index):
        """Write this step's k, v [b, t, k, d] into the cache at `cache_index`.

        Returns the keys/values to attend over and the new cache entry; without a
        cache the step attends over its own keys only.
        """
        if kv_cache is None:
            return k, v, None
        cached_k, cached_v = kv_cache
        cached_k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), cache_index, axis=1)
        cached_v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), cache_index, axis=1)
        return cached_k, cached_v, (cached_k, cached_v)

    def init_cache(self, batch: int, length: int, dtype=jnp.float32):
        """An empty KV cache for `batch` sequences of up to `length` tokens."""
        shape = self.kv_shape(batch, length)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.config.num_layers)]

    def prefill(self, params, input_ids, attention_mask, cache):
        """Run the (left-padded) prompt [b, t] through the model, filling cache slots 0..t-1.

        Returns (logits of the last position [b, vocab], cache, next positions [b]).
        The key-validity mask covers the whole cache: prompt padding is invalid,
        every later slot valid once written (causality hides unwritten ones).
        """
        params = resolve(params)
        b, t = input_ids.shape
        length = cache[0][0].shape[1]
        positions = positions_from_mask(attention_mask)
        key_valid = jnp.concatenate(
            [attention_mask.astype(bool), jnp.ones((b, length - t), bool)], axis=1
        )
        hidden, cache = self.hidden_states(params, input_ids, positions, key_valid, cache, 0)
        logits = self.logits_from_hidden(params, hidden[:, -1])
        return logits, cache, positions[:, -1] + 1, key_valid

    def decode_step(self, params, token, position, key_valid, cache, cache_index):
        """One token per sequence: token [b], position [b] -> (logits [b, vocab], cache)."""
        params = resolve(params)
        hidden, cache = self.hidden_states(
            params, token[:, None], position[:, None], key_valid, cache, cache_index
        )
        return self.logits_from_hidden(params, hidden[:, 0]), cache
