"""Group-relative policy optimisation (GRPO) and its variants, as pure functions.

`group_advantages` turns the rewards of `num_generations` completions per prompt into advantages;
`grpo_loss` is the policy loss of one batch of completions given their per-token log-probabilities
under the policy being trained, under the policy that sampled them and (for the KL term) under the
reference. Both follow TRL 1.16's `GRPOTrainer` (one process, no gradient accumulation) to the
operation, so that a run here and a run there agree on the same tensors:

    grpo      each sequence's mean token loss, averaged over sequences
    bnpo      token losses averaged over every completion token of the batch
    dr_grpo   token losses summed, over batch size x max_completion_length (Dr. GRPO)
    dapo      token losses summed, over `num_items_in_batch` (the generation batch's tokens)
    cispo     REINFORCE weighted by the clipped, stopped importance ratio, normalised as dapo
    sapo      a soft, temperature-controlled gate in place of the clip, normalised as grpo
    luspo     each sequence's summed token loss, averaged over sequences

`importance_sampling_level="sequence"` is GSPO: one ratio per sequence, the geometric mean of its
tokens' ratios. `rollout` samples the completions with the compiled generator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError
from lowrax.models.generate import generate_ids, left_padded

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
SCALE_REWARDS = ("group", "batch", "none")
STD_FLOOR = 1e-4  # TRL divides by std + 1e-4


def _nanstd(x: jnp.ndarray, axis=None) -> jnp.ndarray:
    """The standard deviation without NaNs, with Bessel's correction, as TRL's `nanstd` computes it (one
    value alone gives NaN: its variance is 0 x count / (count - 1) = 0 x inf)."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    variance = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
    return jnp.sqrt(variance * (count / (count - 1)))


def group_advantages(rewards, num_generations: int, *, scale_rewards: str = "group") -> jnp.ndarray:
    """Advantages [N] of rewards [N], N = prompts x num_generations with each prompt's completions
    consecutive: each reward less its group's mean, divided by (std + 1e-4) of the group
    (`scale_rewards="group"`), of the whole batch ("batch") or not at all ("none"). A NaN reward (no
    reward function scored the completion) is left out of the means and deviations, and its advantage
    is 0."""
    if scale_rewards not in SCALE_REWARDS:
        raise LowraxError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or num_generations < 1 or rewards.shape[0] % num_generations:
        raise LowraxError(f"rewards must be one value per completion, a multiple of num_generations="
                          f"{num_generations} of them; got shape {tuple(rewards.shape)}")
    groups = rewards.reshape(-1, num_generations)
    mean = jnp.repeat(jnp.nanmean(groups, axis=1), num_generations)
    if scale_rewards == "batch":
        std = jnp.broadcast_to(_nanstd(rewards), rewards.shape) if rewards.size > 1 else jnp.zeros_like(rewards)
    else:
        std = jnp.repeat(_nanstd(groups, axis=1)[:, 0], num_generations) if num_generations > 1 \
            else jnp.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_FLOOR)
    return jnp.nan_to_num(advantages, nan=0.0)


def _masked_mean(x, mask):
    """The mean over completion tokens ([B, T] values) or over sequences ([B, 1] values)."""
    if x.shape[1] == 1:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _sequence_means(x, mask):
    """Each sequence's mean over its tokens (NaN for an empty one), or the sequence values themselves."""
    return x[:, 0] if x.shape[1] == 1 else jnp.sum(x * mask, -1) / jnp.sum(mask, -1)


def grpo_loss(logps, old_logps, advantages, completion_mask, *, ref_logps=None, loss_type: str = "dapo",
              beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              importance_sampling_level: str = "token", delta: float | None = None,
              max_completion_length: int | None = None, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, num_items_in_batch=None, kl_bias_correction: bool = True):
    """(loss, metrics) of completions' per-token log-probs `logps` [B, T] under the policy being trained.

    old_logps [B, T]: under the policy that sampled them (None: the same policy, `stop_gradient(logps)`, as
    when each rollout is used for one update); advantages [B] (or [B, T]); completion_mask [B, T]: 1 on
    the completion's tokens. ref_logps [B, T]: under the reference, needed when beta != 0 (the k3 KL
    estimate, weighted by beta, joins each token's loss; `kl_bias_correction`, on by default as TRL's
    `use_bias_correction_kl`, weights it by the importance ratio, which changes its gradient even where the
    ratio is 1). epsilon / epsilon_high: the clip's lower and upper margins
    (epsilon_high defaults to epsilon; cispo clips the ratio at epsilon_high itself). delta: the
    two-sided clip's upper bound on the unclipped ratio. max_completion_length: dr_grpo's normaliser
    (default: T). num_items_in_batch: dapo's and cispo's normaliser (default: the completion tokens
    here). Metrics carry TRL's names: `kl` (with beta), `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean`, `clip_ratio/low_min`, `clip_ratio/high_max`, or `cispo_clip_ratio`.
    """
    if loss_type not in LOSS_TYPES:
        raise LowraxError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise LowraxError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise LowraxError("beta != 0 needs ref_logps: the completions' log-probs under the reference")
    logps = jnp.asarray(logps)
    if logps.ndim != 2:
        raise LowraxError(f"logps must be per-token log-probs [batch, completion length]; got shape {logps.shape}")
    mask = jnp.asarray(completion_mask, logps.dtype)
    advantages = jnp.asarray(advantages, logps.dtype)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else jnp.asarray(old_logps, logps.dtype)
    epsilon_low, epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:  # GSPO: one ratio per sequence
        log_weights = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
    ratio = jnp.exp(log_weights)
    per_token, clipped_view = _policy_token_losses(loss_type, logps, ratio, advantages, epsilon_low, epsilon_high, delta,
                                                   sapo_temperature_pos, sapo_temperature_neg)
    metrics = {}
    if beta != 0.0:
        ref = jnp.asarray(ref_logps, logps.dtype)
        per_token_kl = jnp.exp(ref - logps) - (ref - logps) - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio  # before delta bounds it, as TRL weighs it
        per_token = per_token + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl, mask)
    loss = _aggregated(loss_type, per_token, mask, max_completion_length, num_items_in_batch)
    metrics.update(_clip_metrics(loss_type, clipped_view, advantages, mask, epsilon_low, epsilon_high))
    return loss, metrics


def _policy_token_losses(loss_type, logps, coef_1, advantages, epsilon_low, epsilon_high, delta, temperature_pos,
                         temperature_neg):
    """(each token's policy loss, the ratio as the clip metrics see it: bounded by delta where it applies)."""
    if loss_type == "cispo":
        clamped = jax.lax.stop_gradient(jnp.minimum(coef_1, epsilon_high))
        return -clamped * advantages * logps, coef_1
    if loss_type == "sapo":
        temperatures = jnp.where(advantages > 0, temperature_pos, temperature_neg)
        return -jax.nn.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages, coef_1
    coef_2 = jnp.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = jnp.minimum(coef_1, delta)
    return -jnp.minimum(coef_1 * advantages, coef_2 * advantages), coef_1


def _aggregated(loss_type, per_token, mask, max_completion_length, num_items_in_batch):
    """The loss type's reduction of the token losses [B, T] (or [B, 1]) over the completion tokens."""
    batch, length = mask.shape
    if loss_type in ("grpo", "sapo"):
        return jnp.mean(jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
    if loss_type == "bnpo":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        return jnp.sum(per_token * mask) / (batch * (max_completion_length or length))
    if loss_type in ("dapo", "cispo"):
        items = jnp.sum(mask) if num_items_in_batch is None else jnp.asarray(num_items_in_batch, mask.dtype)
        return jnp.sum(per_token * mask) / jnp.maximum(items, 1.0)
    return jnp.mean(jnp.sum(per_token * mask, -1))  # luspo


def _clip_metrics(loss_type, coef_1, advantages, mask, epsilon_low, epsilon_high) -> dict:
    """How often the ratio was clipped, under TRL's metric names (none for sapo, whose gate is smooth)."""
    dtype = mask.dtype
    if loss_type == "cispo":
        return {"cispo_clip_ratio": _masked_mean(((coef_1 > epsilon_high) & (advantages > 0)).astype(dtype), mask)}
    if loss_type == "sapo":
        return {}
    low = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).astype(dtype)
    high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).astype(dtype)
    return {"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
            "clip_ratio/region_mean": _masked_mean(jnp.maximum(low, high), mask),
            "clip_ratio/low_min": jnp.nanmin(_sequence_means(low, mask)),
            "clip_ratio/high_max": jnp.nanmax(_sequence_means(high, mask))}


@dataclass(frozen=True)
class Rollout:
    """`num_generations` sampled completions of each prompt, as GRPO's step takes them: row i is a
    completion of prompt i // num_generations. prompt_ids / prompt_mask [N, P]: left-padded to a bucketed
    width; completion_ids / completion_mask [N, T = max_completion_length]: right-padded, each completion
    through its first EOS; truncated [N]: no EOS within T tokens."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    truncated: np.ndarray
    pad_token_id: int = 0

    def masked_truncated(self) -> "Rollout":
        """The rollout with truncated completions' masks zeroed (TRL's `mask_truncated_completions`)."""
        return replace(self, completion_mask=self.completion_mask * (~self.truncated)[:, None])

    @property
    def longest_prompt(self) -> int:
        return int(self.prompt_mask.sum(1).max())

    def batch(self, advantages, prompt_width: int | None = None) -> dict:
        """The batch GRPO's step takes (`objectives.step_losses.grpo_objective`): these rows and their
        advantages [N], the left-padded prompts cut or padded to `prompt_width` columns (at least
        `longest_prompt`; None: as sampled, at the generator's bucket)."""
        ids, mask = self.prompt_ids, self.prompt_mask
        if prompt_width is not None:
            if prompt_width < self.longest_prompt:
                raise LowraxError(f"prompt_width {prompt_width} is narrower than the longest prompt ({self.longest_prompt})")
            extra = prompt_width - ids.shape[1]
            if extra >= 0:
                ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=self.pad_token_id)
                mask = np.pad(mask, ((0, 0), (extra, 0)))
            else:  # columns of padding only
                ids, mask = ids[:, -prompt_width:], mask[:, -prompt_width:]
        return {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": self.completion_ids,
                "completion_mask": self.completion_mask, "advantages": np.asarray(advantages, np.float32)}


def rollout(model, params, prompts: Sequence[Sequence[int]], num_generations: int, max_completion_length: int,
            sampling, eos_token_ids: Sequence[int], pad_token_id: int = 0, seed: int = 0) -> Rollout:
    """Sample `num_generations` completions of each token-id prompt with the compiled generator (one
    prefill and one decode program per batch and bucketed length, reused by every later call of the same
    shapes; each prompt is prefilled once and its cache copied for its completions) and pad them for the
    policy loss."""
    if num_generations < 1 or max_completion_length < 1:
        raise LowraxError(f"num_generations and max_completion_length must be >= 1; got {num_generations} and "
                          f"{max_completion_length}")
    prompts = [list(p) for p in prompts]
    outputs = generate_ids(model, params, prompts, max_completion_length, sampling, eos_token_ids, pad_token_id, seed,
                           repeats=num_generations)
    prompt_ids, prompt_mask = (np.repeat(a, num_generations, axis=0) for a in left_padded(prompts, pad_token_id))
    completion_ids = np.full((len(outputs), max_completion_length), pad_token_id, np.int32)
    completion_mask = np.zeros((len(outputs), max_completion_length), np.int32)
    for row, out in enumerate(outputs):
        completion_ids[row, :len(out)], completion_mask[row, :len(out)] = out, 1
    # generate_ids cuts each completion after its first EOS: one that does not end in one ran out of tokens
    stops = set(eos_token_ids)
    truncated = np.asarray([not (out and out[-1] in stops) for out in outputs])
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, pad_token_id)
