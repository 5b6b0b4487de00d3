"""Per-token and per-sequence log-probabilities of a causal LM, computed only where needed.

A batch's rows carry `loss_positions` / `loss_targets` / `loss_weights` [n, K]: the K
positions whose next token is a completion token (see `train.data.Batches`). The
vocabulary projection runs at those positions only, the largest matmul of a small model.

The logits are never materialised whole: `logps_at` is a fused cross-entropy
(`objectives.fused_logps`) that keeps one block of positions' logits at a time. Distillation, which
needs whole distributions, runs student and teacher over the same blocks of positions
(`objectives.fused_logps.head_position_losses`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrax.core.node import resolve
from lowrax.objectives.fused_logps import head_position_losses, head_target_logps, target_logps


def at_positions(hidden, positions) -> jnp.ndarray:
    """Hidden states [n, K, H] at positions [n, K] of hidden [n, t, H]."""
    return jnp.take_along_axis(hidden, positions[..., None], axis=1)


def logits_at(model, params, hidden, positions) -> jnp.ndarray:
    """float32 logits [n, K, V] from final hidden states [n, t, H] at positions [n, K]."""
    return model.logits_from_hidden(resolve(params), at_positions(hidden, positions)).astype(jnp.float32)


def logps_at(model, params, hidden, positions, targets) -> jnp.ndarray:
    """log p(target) [n, K] from final hidden states [n, t, H] at positions [n, K], by a fused
    cross-entropy whose float32 logits exist one block (`fused_logps.BLOCK_BYTES`) at a time, in the
    forward and in the backward."""
    def head(params, h):
        return model.logits_from_hidden(resolve(params), h).astype(jnp.float32)

    return head_target_logps(head, params, at_positions(hidden, positions), targets)


def completion_logps(model, params, batch: dict, prefix: str = ""):
    """(summed completion log-probs [n], completion token counts [n], final hidden states
    [n, t, H]) of the rows `{prefix}input_ids` etc. (prefix "kl_": KTO's mismatched rows)."""
    hidden = model.final_hidden(params, batch[prefix + "input_ids"], batch[prefix + "attention_mask"])
    token = logps_at(model, params, hidden, batch[prefix + "loss_positions"], batch[prefix + "loss_targets"])
    weights = batch[prefix + "loss_weights"].astype(jnp.float32)
    return jnp.sum(token * weights, axis=-1), jnp.sum(weights, axis=-1), hidden


def completion_token_logps(model, params, prompt_ids, prompt_mask, completion_ids, completion_mask, *,
                           temperature: float = 1.0, with_entropy: bool = False):
    """log p(token) [B, T] of each completion token given its prompt and the completion before it, as RL
    (GRPO) needs them: prompts [B, P] left-padded, completions [B, T] right-padded, run as one row each.
    The distribution is the softmax of logits / temperature (the sampling temperature, as TRL scores
    completions). The logits exist one block at a time (`fused_logps`); a padding position's value is
    meaningless and is to be masked by completion_mask. with_entropy: (log-probs, each position's entropy
    [B, T], without gradient)."""
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
    p, t = prompt_ids.shape[1], completion_ids.shape[1]
    positions = jnp.broadcast_to(jnp.arange(p - 1, p + t - 1), completion_ids.shape)  # each predicts the next token
    hidden = at_positions(model.final_hidden(params, ids, mask), positions)

    def head(params, h):
        return model.logits_from_hidden(resolve(params), h).astype(jnp.float32) / temperature

    def loss_of_logits(logits, _, targets):
        if not with_entropy:
            return target_logps(logits, targets), ()
        logp = jax.nn.log_softmax(logits, -1)  # one normalisation for both, one block of positions at a time
        entropy = -jnp.sum(jnp.exp(logp) * logp, -1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], jax.lax.stop_gradient(entropy)

    logps, entropy = head_position_losses(head, params, hidden, loss_of_logits, (completion_ids,))
    return (logps, entropy) if with_entropy else logps


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
