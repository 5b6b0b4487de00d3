"""The objectives as loss functions of the one train step.

Each is `loss_fn(model, params, batch) -> (loss sum, count, metric sums)`: the step
divides all three by the count summed over micro-batches, so what it logs is the
objective's batch mean (`train.step.make_train_step`).

Paired objectives (dpo, orpo, simpo) take a batch of 2b rows, the b chosen rows first
and their b rejected rows after (one forward for both, as TRL's concatenated forward);
KTO takes b unpaired rows with `desirable` [b] and KTO's mismatched `kl_*` rows. The DPO
and KTO reference is the same parameters with every adapter switched off, run in the
same step without gradient, or `ref_logps` [rows] precomputed and stored in the batch.
Distillation's loss function takes a fourth argument, the teacher's parameters. GRPO takes
rollouts: left-padded prompts, right-padded completions, their advantages (and, when a rollout
serves several updates, the sampling policy's log-probs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrax.adapters.tree import adapters_off
from lowrax.core.node import resolve
from lowrax.errors import LowraxError
from lowrax.objectives.config import DistillSection, GRPOSection, PreferenceSection
from lowrax.objectives.distill import token_divergence
from lowrax.objectives.fused_logps import head_position_losses, target_logps
from lowrax.objectives.grpo import grpo_loss
from lowrax.objectives.logps import (at_positions, classifier_logits, completion_logps, completion_token_logps,
                                     whole_sequence_nll)
from lowrax.objectives.preference import dpo_per_pair, kto_per_example, orpo_per_pair, simpo_per_pair


def reference_logps(model, params, batch: dict, prefix: str = "") -> jnp.ndarray:
    """The reference model's summed completion log-probs [n] of the batch's rows: precomputed
    (`{prefix}ref_logps` in the batch), or the adapter-off model in this step, without gradient."""
    stored = batch.get(prefix + "ref_logps")
    if stored is not None:
        return stored.astype(jnp.float32)
    logps, _, _ = completion_logps(model, adapters_off(params), batch, prefix=prefix)
    return jax.lax.stop_gradient(logps)


def _pair_weights(batch: dict, b: int) -> jnp.ndarray:
    """[b] 1 for a real pair, 0 for a filler row of a last evaluation batch."""
    return batch.get("pair_weights", jnp.ones((b,), jnp.float32)).astype(jnp.float32)


def _summed(losses, per_pair: dict, weights) -> tuple:
    return jnp.sum(losses * weights), jnp.sum(weights), {k: jnp.sum(v * weights) for k, v in per_pair.items()}


def _halves(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    b = x.shape[0] // 2
    return x[:b], x[b:]


def policy_preference_of(mean_logps) -> jnp.ndarray:
    """[b] 1 where the policy gives the chosen completion the higher mean token log-prob (the
    held-out metric of a preference run, logged per step too as `policy_preference`)."""
    chosen, rejected = _halves(jax.lax.stop_gradient(mean_logps))
    return (chosen > rejected).astype(jnp.float32)


def dpo_objective(cfg: PreferenceSection):
    def loss_fn(model, params, batch):
        logps, tokens, _ = completion_logps(model, params, batch)
        ref = reference_logps(model, params, batch)
        (chosen, rejected), (ref_chosen, ref_rejected) = _halves(logps), _halves(ref)
        chosen_tokens, rejected_tokens = _halves(tokens)
        losses, per_pair = dpo_per_pair(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                                        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                                        chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
        per_pair["policy_preference"] = policy_preference_of(_mean_logps(logps, tokens))
        return _summed(losses, per_pair, _pair_weights(batch, chosen.shape[0]))

    return loss_fn


def _mean_logps(logps, tokens):
    return logps / jnp.maximum(tokens, 1.0)


def orpo_objective(cfg: PreferenceSection):
    """TRL's ORPO: the chosen rows' mean token NLL (prompt included) minus the mean odds-ratio
    term. The NLL is a mean over the micro-batch's chosen tokens, weighted by its pairs."""

    def loss_fn(model, params, batch):
        logps, tokens, hidden = completion_logps(model, params, batch)
        mean = _mean_logps(logps, tokens)
        b = logps.shape[0] // 2
        terms, per_pair = orpo_per_pair(mean[:b], mean[b:], beta=cfg.beta)
        nll_sum, nll_tokens = whole_sequence_nll(model, params, hidden[:b], batch["input_ids"][:b],
                                                 batch["attention_mask"][:b])
        nll = nll_sum / jnp.maximum(nll_tokens, 1.0)
        weights = _pair_weights(batch, b)
        per_pair["nll_loss"] = jnp.broadcast_to(jax.lax.stop_gradient(nll), (b,))
        per_pair["policy_preference"] = policy_preference_of(mean)
        return _summed(nll - terms, per_pair, weights)

    return loss_fn


def simpo_objective(cfg: PreferenceSection):
    """SimPO on length-averaged log-probs; with sft_weight > 0 plus that weight times the chosen
    rows' mean token NLL over their completions (TRL's CPO with cpo_alpha)."""

    def loss_fn(model, params, batch):
        logps, tokens, _ = completion_logps(model, params, batch)
        mean = _mean_logps(logps, tokens)
        b = logps.shape[0] // 2
        losses, per_pair = simpo_per_pair(mean[:b], mean[b:], beta=cfg.beta, gamma=cfg.gamma,
                                          label_smoothing=cfg.label_smoothing)
        per_pair["policy_preference"] = policy_preference_of(mean)
        if cfg.sft_weight:
            nll = -jnp.sum(logps[:b]) / jnp.maximum(jnp.sum(tokens[:b]), 1.0)
            losses = losses + cfg.sft_weight * nll
        return _summed(losses, per_pair, _pair_weights(batch, b))

    return loss_fn


def kto_objective(cfg: PreferenceSection):
    """KTO: the KL estimate is the batch mean of policy minus reference log-probs of the
    mismatched `kl_*` rows (prompt i with completion i - 1), clamped at 0, no gradient."""

    def loss_fn(model, params, batch):
        logps, _, _ = completion_logps(model, params, batch)
        # the mismatched rows only enter the detached KL estimate: a forward pass without gradient
        kl_logps, _, _ = completion_logps(model, jax.lax.stop_gradient(params), batch, prefix="kl_")
        ref, kl_ref = reference_logps(model, params, batch), reference_logps(model, params, batch, prefix="kl_")
        kl = jnp.mean(kl_logps - kl_ref)
        losses, metrics = kto_per_example(logps, ref, batch["desirable"], kl, beta=cfg.beta,
                                          desirable_weight=cfg.desirable_weight,
                                          undesirable_weight=cfg.undesirable_weight)
        n = jnp.float32(logps.shape[0])
        return jnp.sum(losses), n, {k: v * n for k, v in metrics.items()}

    return loss_fn


_BUILDERS = {"dpo": dpo_objective, "orpo": orpo_objective, "simpo": simpo_objective, "kto": kto_objective}


def preference_loss_fn(objective: str, cfg: PreferenceSection):
    """The step's loss function of a preference objective."""
    if objective not in _BUILDERS:
        raise LowraxError(f"{objective!r} is not a preference objective ({', '.join(_BUILDERS)})")
    return _BUILDERS[objective](cfg)


def distill_objective(cfg: DistillSection, teacher_model=None):
    """Distillation: at every completion position (the batch's loss positions) the generalised
    JSD between the student's and the frozen teacher's next-token distributions, mixed with
    the ordinary next-token loss by `hard_label_weight`. The teacher's parameters come as the
    step's `teacher` argument (never closed over: that would bake them into the program);
    without a teacher model, its logits come stored in the batch (`teacher_logits` [b, K, V])."""

    def loss_fn(model, params, batch, teacher=None):
        positions, targets = batch["loss_positions"], batch["loss_targets"]
        weights = batch["loss_weights"].astype(jnp.float32)
        hidden = model.final_hidden(params, batch["input_ids"], batch["attention_mask"])
        if teacher_model is None:  # stored teacher logits [b, K, V]
            def teacher_logits(_, stored):
                return stored.astype(jnp.float32)
            teacher_input = batch["teacher_logits"]
        else:
            def teacher_logits(teacher, teacher_hidden):
                return teacher_model.logits_from_hidden(resolve(teacher), teacher_hidden).astype(jnp.float32)
            teacher_input = at_positions(teacher_model.final_hidden(teacher, batch["input_ids"],
                                                                    batch["attention_mask"]), positions)

        def loss_of_logits(student, teacher, teacher_in, tgt):  # one block of positions, student and teacher
            divergence, hard = _per_position(cfg, student, teacher_logits(teacher, teacher_in), tgt)
            return _mix(cfg, divergence, hard), (jax.lax.stop_gradient(divergence), jax.lax.stop_gradient(hard))

        def head(params, h):
            return model.logits_from_hidden(resolve(params), h).astype(jnp.float32)

        mixed, (divergence, hard) = head_position_losses(head, params, at_positions(hidden, positions), loss_of_logits,
                                                         (teacher_input, targets), teacher)
        return (jnp.sum(mixed * weights), jnp.sum(weights),
                {"divergence": jnp.sum(divergence * weights), "hard_loss": jnp.sum(hard * weights)})

    return loss_fn


def _per_position(cfg: DistillSection, student, teacher_logits, targets) -> tuple:
    """(divergence from the teacher, cross-entropy on the targets) per position (or example)."""
    return (token_divergence(student, teacher_logits, beta=cfg.beta, temperature=cfg.temperature),
            -target_logps(student, targets))


def _mix(cfg: DistillSection, divergence, hard):
    """The divergence mixed with the cross-entropy by `hard_label_weight`."""
    return (1.0 - cfg.hard_label_weight) * divergence + cfg.hard_label_weight * hard


def _mixed(cfg: DistillSection, divergence, hard, weights) -> tuple:
    """(loss sum, count, metric sums): the divergence mixed with the cross-entropy by `hard_label_weight`,
    weighted."""
    return (jnp.sum(_mix(cfg, divergence, hard) * weights), jnp.sum(weights),
            {"divergence": jnp.sum(jax.lax.stop_gradient(divergence) * weights),
             "hard_loss": jnp.sum(jax.lax.stop_gradient(hard) * weights)})


def _distilled(cfg: DistillSection, student, teacher_logits, targets, weights) -> tuple:
    """`_mixed` of a whole batch's logits (a classifier's: one position per example)."""
    return _mixed(cfg, *_per_position(cfg, student, teacher_logits, targets), weights)


def classifier_distill_objective(cfg: DistillSection, teacher_model):
    """Classifier distillation (encoders): per example, the generalised JSD between the student's
    and the frozen teacher's class distributions, mixed with the cross-entropy on the labels by
    `hard_label_weight`. batch: input_ids, attention_mask, labels [b], optional example_weights."""

    def loss_fn(model, params, batch, teacher):
        student = classifier_logits(model, params, batch).astype(jnp.float32)
        teacher_logits = jax.lax.stop_gradient(classifier_logits(teacher_model, teacher, batch))
        labels = batch["labels"]
        weights = batch.get("example_weights", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
        return _distilled(cfg, student, teacher_logits, labels, weights)

    return loss_fn


TOKEN_NORMALISED = ("dapo", "cispo", "bnpo")  # GRPO losses over completion tokens; the others over sequences


def grpo_objective(cfg: GRPOSection):
    """GRPO's policy loss (`objectives.grpo.grpo_loss`) of a batch of rollouts: prompt_ids / prompt_mask
    [B, P], completion_ids / completion_mask [B, T], advantages [B], optionally old_logps [B, T]. The
    reference (beta > 0) is the base with every adapter off, run in the step without gradient. The loss
    returns as (mean x count, count), count the completion tokens or the sequences as the loss type
    normalises, so accumulated micro-batches give the loss of their union; metrics (TRL's names, and the
    policy's mean token `entropy`) are the micro-batch's means, weighted the same way."""

    def loss_fn(model, params, batch):
        rows = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
        logps, entropy = completion_token_logps(model, params, *rows, temperature=cfg.temperature, with_entropy=True)
        ref = None
        if cfg.beta:
            ref = jax.lax.stop_gradient(completion_token_logps(model, adapters_off(params), *rows,
                                                               temperature=cfg.temperature))
        mask = batch["completion_mask"].astype(jnp.float32)
        loss, metrics = grpo_loss(
            logps, batch.get("old_logps"), batch["advantages"], mask, ref_logps=ref, loss_type=cfg.loss_type,
            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            importance_sampling_level=cfg.importance_sampling_level, delta=cfg.delta,
            max_completion_length=cfg.max_completion_length, sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg, kl_bias_correction=cfg.kl_bias_correction)
        metrics["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        count = jnp.sum(mask) if cfg.loss_type in TOKEN_NORMALISED else jnp.float32(mask.shape[0])
        return loss * count, count, {k: jax.lax.stop_gradient(v) * count for k, v in metrics.items()}

    return loss_fn
