"""Generation for encoder-decoders (T5): the input is encoded once, and so are each decoder
layer's cross-attention keys and values; then one jitted step per token runs the decoder over a
fixed-size self-attention cache.

Shapes depend only on (batch, input bucket, cache length), so the start and the step compile
once per bucket, never per token. `generate_ids` calls this for a seq2seq model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.core.node import resolve
from lowrax.models.sampling import collect_tokens, sample_next

_COMPILED: dict = {}


def _compiled(model, sampling):
    """(start, step) jitted for this model and sampling rule, built once and reused."""
    key = (id(model), sampling)
    if key not in _COMPILED:

        def next_token(params, token, input_mask, cross, cache, cache_index, rng):
            hidden, cache = model.decode(params, token[:, None], input_mask, cross, cache, cache_index)
            logits = model.logits_from_hidden(resolve(params), hidden[:, 0])
            return sample_next(logits, rng, sampling), cache

        def start(params, input_ids, input_mask, cache, rng):
            cross = model.cross_key_values(params, model.encode(params, input_ids, input_mask))
            first = jnp.full(input_ids.shape[:1], model.config.decoder_start_token_id, jnp.int32)
            token, cache = next_token(params, first, input_mask, cross, cache, 0, rng)
            return token, cache, cross

        _COMPILED[key] = (model, jax.jit(start, donate_argnums=(3,)), jax.jit(next_token, donate_argnums=(4,)))
    return _COMPILED[key][1:]


def generate_seq2seq_ids(model, params, inputs: Sequence[Sequence[int]], max_new_tokens: int, sampling,
                         eos_token_ids: Sequence[int], pad_token_id: int, seed: int,
                         on_token: Callable[[np.ndarray], None] | None, input_bucket: int,
                         cache_bucket: int) -> list[list[int]]:
    """The decoder's new ids for each input (stopping after an EOS id); see `generate_ids`."""
    batch = len(inputs)
    length = -(-max(len(x) for x in inputs) // input_bucket) * input_bucket
    ids = np.full((batch, length), pad_token_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row, x in enumerate(inputs):  # the encoder is bidirectional: padding on the right, masked
        ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    start, step = _compiled(model, sampling)
    cache = model.init_cache(batch, -(-max_new_tokens // cache_bucket) * cache_bucket, model.activation_dtype(params))
    rng, sub = jax.random.split(jax.random.key(seed))
    token, cache, cross = start(params, jnp.asarray(ids), jnp.asarray(mask), cache, sub)
    input_mask = jnp.asarray(mask)

    def next_token(token, i, key):
        nonlocal cache
        token, cache = step(params, token, input_mask, cross, cache, jnp.int32(i + 1), key)
        return token

    return collect_tokens(token, next_token, max_new_tokens, eos_token_ids, rng, on_token)
