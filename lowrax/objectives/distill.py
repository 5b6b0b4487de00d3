"""Knowledge distillation: the generalised Jensen-Shannon divergence of GKD (TRL's
`GKDTrainer.generalized_jsd_loss`), which spans forward KL (beta 0, Hinton's loss with a
temperature), reverse KL (beta 1) and the symmetric JSD between them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError


def token_divergence(student_logits, teacher_logits, *, beta: float = 0.5, temperature: float = 1.0) -> jnp.ndarray:
    """[..., V] logits -> [...] divergence per position (float32), before any masking.

    beta 0: KL(teacher || student); beta 1: KL(student || teacher); otherwise
    beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta * teacher + (1 - beta) * student."""
    if not 0.0 <= beta <= 1.0:
        raise LowraxError(f"distillation beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {beta}")
    if temperature <= 0:
        raise LowraxError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise LowraxError(f"student and teacher logits differ in vocabulary size ({student_logits.shape[-1]} vs "
                          f"{teacher_logits.shape[-1]}): distillation needs one tokenizer")
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)

    def kl(p_log, q_log):  # KL(p || q) summed over the vocabulary
        return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)

    if beta == 0.0:
        return kl(teacher, student)
    if beta == 1.0:
        return kl(student, teacher)
    mixture = jnp.logaddexp(student + math.log1p(-beta), teacher + math.log(beta))
    return beta * kl(teacher, mixture) + (1.0 - beta) * kl(student, mixture)


def distill_loss(student_logits, teacher_logits, labels=None, beta: float = 0.5, temperature: float = 1.0):
    """The generalised JSD loss, equal to TRL's `GKDTrainer.generalized_jsd_loss` (reduction
    "batchmean"): logits [b, t, V]; with `labels` [b, t] the mean over positions whose label
    is not -100, without it the sum over positions divided by the batch size."""
    per_position = token_divergence(student_logits, teacher_logits, beta=beta, temperature=temperature)
    if labels is None:
        return jnp.sum(per_position) / max(per_position.shape[0], 1)
    mask = (labels != -100).astype(jnp.float32)
    return jnp.sum(per_position * mask) / jnp.maximum(jnp.sum(mask), 1.0)
