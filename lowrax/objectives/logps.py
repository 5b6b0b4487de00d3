"""Per-token and per-sequence log-probabilities of a causal LM, computed only where needed.

A batch's rows carry `loss_positions` / `loss_targets` / `loss_weights` [n, K]: the K
positions whose next token is a completion token (see `train.data.Batches`). The
vocabulary projection runs at those positions only, the largest matmul of a small model.

The logits are never materialised whole: when [n, K, V] would exceed LOGIT_BLOCK_BYTES,
`logps_at` runs over blocks of positions in a scan whose body is rematerialised, so the
forward keeps one block's logits at a time and the backward recomputes each block's
(one more vocabulary projection per step) instead of keeping them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrax.core.node import resolve


def logits_at(model, params, hidden, positions) -> jnp.ndarray:
    """float32 logits [n, K, V] from final hidden states [n, t, H] at positions [n, K]."""
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    return model.logits_from_hidden(resolve(params), picked).astype(jnp.float32)


def target_logps(logits, targets) -> jnp.ndarray:
    """log p(target) [...] from logits [..., V] and targets [...]: logit[target] - logsumexp(logits),
    without materialising every log-probability."""
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)


LOGIT_BLOCK_BYTES = 64 << 20  # float32 logits computed at once; SmolLM2 at 4 x 256 tokens: 3 blocks of 200 MB


def vocab_size(model, params, hidden) -> int:
    """The width of the model's logits (its head's output), read from shapes only."""
    return jax.eval_shape(lambda h: model.logits_from_hidden(resolve(params), h), hidden[:, :1]).shape[-1]


def by_position_blocks(fn, vocab: int, positions, *per_position, block_bytes: int | None = None):
    """fn(positions [n, c], *per_position blocks [n, c, ...]) -> an array or tuple of arrays [n, c], applied
    to blocks of c positions so that c x n x vocab float32 logits fit `block_bytes`; the blocks run in a
    scan whose body is rematerialised (the backward recomputes one block's logits at a time).
    Equal to fn(positions, *per_position) when everything fits one block. block_bytes: LOGIT_BLOCK_BYTES
    unless given."""
    n, k = positions.shape
    block = max(1, (block_bytes or LOGIT_BLOCK_BYTES) // (4 * n * vocab))
    if block >= k:
        return fn(positions, *per_position)
    blocks = -(-k // block)

    def split(x):  # [n, K, ...] -> [blocks, n, block, ...]; the last block padded with zeros (dropped below)
        x = jnp.pad(x, [(0, 0), (0, blocks * block - k)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(n, blocks, block, *x.shape[2:]).swapaxes(0, 1)

    def join(y):  # [blocks, n, block, ...] -> [n, K, ...]
        return y.swapaxes(0, 1).reshape(n, blocks * block, *y.shape[3:])[:, :k]

    out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), tuple(split(x) for x in (positions, *per_position)))
    return jax.tree.map(join, out)


def logps_at(model, params, hidden, positions, targets, block_bytes: int | None = None) -> jnp.ndarray:
    """log p(target) [n, K] from final hidden states [n, t, H] at positions [n, K], over blocks of
    positions when the whole [n, K, V] float32 logits would exceed `block_bytes`."""
    return by_position_blocks(lambda pos, tgt: target_logps(logits_at(model, params, hidden, pos), tgt),
                              vocab_size(model, params, hidden), positions, targets, block_bytes=block_bytes)


def completion_logps(model, params, batch: dict, prefix: str = ""):
    """(summed completion log-probs [n], completion token counts [n], final hidden states
    [n, t, H]) of the rows `{prefix}input_ids` etc. (prefix "kl_": KTO's mismatched rows)."""
    hidden = model.final_hidden(params, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])
    token = logps_at(model, params, hidden, batch[prefix + "loss_positions"], batch[prefix + "loss_targets"])
    weights = batch[prefix + "loss_weights"].astype(jnp.float32)
    return jnp.sum(token * weights, axis=-1), jnp.sum(weights, axis=-1), hidden


def whole_sequence_nll(model, params, hidden, input_ids, attention_mask) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(summed token NLL, token count) over every attended next token of the rows (prompt
    included), as TRL's ORPO computes its SFT term."""
    n, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t - 1), (n, t - 1))
    token = logps_at(model, params, hidden, positions, input_ids[:, 1:])
    weights = attention_mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(token * weights), jnp.sum(weights)


def classifier_logits(model, params, batch) -> jnp.ndarray:
    """A classifier's logits [b, labels] for a text batch or, for an image model, a pixel_values batch."""
    if model.is_image_model:
        return model.apply(params, batch["pixel_values"]).logits
    return model.apply(params, batch["input_ids"], batch["attention_mask"]).logits
