"""Preference losses on sequence log-probabilities, as TRL 1.16 defines them.

Every function takes per-example sequence log-probs (summed over completion
tokens unless said otherwise) and returns `(loss, metrics)`: the loss averaged
over the batch and TRL's reward metrics (batch means). Pure jnp: they run inside
the one jitted train step or on their own.

    DPO       lowrax.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, loss_type="sigmoid")
    ORPO      orpo_loss(mean_logp_c, mean_logp_r, nll, beta=0.1)         no reference
    SimPO     simpo_loss(mean_logp_c, mean_logp_r, beta, gamma)          no reference
    KTO       kto_loss(pi, ref, desirable, kl, beta)                      unpaired
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrax.errors import LowraxError

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero", "apo_down")


def pair_metrics(chosen_rewards, rejected_rewards) -> dict:
    """TRL's rewards/* metrics per pair [b] (detached); their batch means are what TRL logs."""
    chosen_rewards, rejected_rewards = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32)}


def _means(per_pair: dict) -> dict:
    return {k: jnp.mean(v) for k, v in per_pair.items()}


def dpo_per_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
                 rejected_tokens=None) -> tuple[jnp.ndarray, dict]:
    """(per-pair losses [b], per-pair metrics {name: [b]}) of `dpo_loss`."""
    if loss_type not in DPO_LOSS_TYPES:
        raise LowraxError(f"DPO loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if beta <= 0:
        raise LowraxError(f"DPO beta must be > 0, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise LowraxError(f"the robust DPO loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -jax.nn.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        # TRL's length-normalised IPO: each log-ratio per completion token.
        if chosen_tokens is None or rejected_tokens is None:
            raise LowraxError("the ipo loss is length-normalised: pass chosen_tokens and rejected_tokens "
                              "(completion token counts per example)")
        per_token = (chosen_ratio / jnp.maximum(chosen_tokens, 1.0)) - (rejected_ratio / jnp.maximum(rejected_tokens, 1.0))
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
        flipped = -label_smoothing * jax.nn.log_sigmoid(-beta * delta)
        losses = (clean - flipped) / (1.0 - 2.0 * label_smoothing)
    elif loss_type == "bco_pair":
        losses = -jax.nn.log_sigmoid(beta * chosen_ratio) - jax.nn.log_sigmoid(-beta * rejected_ratio)
    elif loss_type == "apo_zero":
        losses = (1.0 - jax.nn.sigmoid(beta * chosen_ratio)) + jax.nn.sigmoid(beta * rejected_ratio)
    else:  # apo_down
        losses = jax.nn.sigmoid(beta * chosen_ratio) + (1.0 - jax.nn.sigmoid(beta * (chosen_ratio - rejected_ratio)))
    return losses, pair_metrics(beta * chosen_ratio, beta * rejected_ratio)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
             rejected_tokens=None) -> tuple[jnp.ndarray, dict]:
    """DPO and its TRL variants. Inputs [b]: sequence log-probs summed over completion tokens
    of the policy and the reference; chosen_tokens / rejected_tokens [b]: completion token
    counts (needed by the length-normalised `ipo`).

    loss_type: sigmoid (DPO), hinge (SLiC), ipo, robust (with label_smoothing), bco_pair,
    apo_zero, apo_down. Returns (mean loss, {"rewards/chosen", "rewards/rejected",
    "rewards/margins", "rewards/accuracies"}) with rewards beta * (policy - reference)."""
    losses, metrics = dpo_per_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                   loss_type=loss_type, label_smoothing=label_smoothing, chosen_tokens=chosen_tokens,
                                   rejected_tokens=rejected_tokens)
    return jnp.mean(losses), _means(metrics)


def log1mexp(x: jnp.ndarray) -> jnp.ndarray:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2."""
    return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def orpo_per_pair(chosen_mean_logps, rejected_mean_logps, *, beta: float = 0.1) -> tuple[jnp.ndarray, dict]:
    """ORPO's odds-ratio term per pair, beta * log sigmoid(log odds(chosen) - log odds(rejected)),
    on length-averaged log-probs (a reward; the loss subtracts it), and per-pair metrics."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))
    ratio = jax.nn.log_sigmoid(log_odds)
    metrics = pair_metrics(beta * chosen_mean_logps, beta * rejected_mean_logps)
    metrics.update({"log_odds_ratio": jax.lax.stop_gradient(ratio), "log_odds_chosen": jax.lax.stop_gradient(log_odds)})
    return beta * ratio, metrics


def orpo_loss(chosen_mean_logps, rejected_mean_logps, chosen_nll, *, beta: float = 0.1) -> tuple[jnp.ndarray, dict]:
    """ORPO (TRL's ORPOTrainer): chosen_nll - mean(beta * log sigmoid(log odds ratio)).

    chosen_mean_logps / rejected_mean_logps [b]: completion log-probs averaged per token;
    chosen_nll: the SFT loss of the chosen rows (TRL: mean token cross-entropy over the
    whole chosen sequence, prompt included)."""
    terms, metrics = orpo_per_pair(chosen_mean_logps, rejected_mean_logps, beta=beta)
    return chosen_nll - jnp.mean(terms), {**_means(metrics), "nll_loss": chosen_nll}


def simpo_per_pair(chosen_mean_logps, rejected_mean_logps, *, beta: float = 2.0, gamma: float = 0.5,
                   label_smoothing: float = 0.0) -> tuple[jnp.ndarray, dict]:
    """SimPO per pair (TRL's CPOTrainer, loss_type="simpo"): -log sigmoid(beta * (mean logp
    chosen - mean logp rejected) - gamma), label-smoothed, and per-pair metrics (rewards beta * mean logp)."""
    if beta <= 0:
        raise LowraxError(f"SimPO beta must be > 0, got {beta}")
    logits = (chosen_mean_logps - rejected_mean_logps) - gamma / beta
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1.0 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return losses, pair_metrics(beta * chosen_mean_logps, beta * rejected_mean_logps)


def simpo_loss(chosen_mean_logps, rejected_mean_logps, *, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> tuple[jnp.ndarray, dict]:
    """SimPO: mean over pairs of `simpo_per_pair` (no reference model)."""
    losses, metrics = simpo_per_pair(chosen_mean_logps, rejected_mean_logps, beta=beta, gamma=gamma,
                                     label_smoothing=label_smoothing)
    return jnp.mean(losses), _means(metrics)


def kto_per_example(logps, ref_logps, desirable, kl, *, beta: float = 0.1, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0) -> tuple[jnp.ndarray, dict]:
    """KTO (TRL's KTOTrainer, loss_type="kto") per example, and its metric sums.

    logps / ref_logps [b]: summed completion log-probs; desirable [b] bool; kl: the batch's
    KL estimate (mean policy - reference log-ratio of mismatched prompt/completion pairs,
    clamped at 0, no gradient). Desirable rows lose 1 - sigmoid(beta (ratio - kl)),
    undesirable rows 1 - sigmoid(beta (kl - ratio)), each weighted."""
    ratio = logps - ref_logps
    desirable = desirable.astype(bool)
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    losses = jnp.where(desirable, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio - kl))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - ratio))))
    rewards = jax.lax.stop_gradient(beta * ratio)
    n_good = jnp.sum(desirable)
    n_bad = desirable.shape[0] - n_good
    chosen = jnp.sum(jnp.where(desirable, rewards, 0.0)) / jnp.maximum(n_good, 1)
    rejected = jnp.sum(jnp.where(desirable, 0.0, rewards)) / jnp.maximum(n_bad, 1)
    return losses, {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                    "kl": kl}


def kto_loss(logps, ref_logps, desirable, kl, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jnp.ndarray, dict]:
    """KTO: the mean of `kto_per_example` over the batch."""
    losses, metrics = kto_per_example(logps, ref_logps, desirable, kl, beta=beta, desirable_weight=desirable_weight,
                                      undesirable_weight=undesirable_weight)
    return jnp.mean(losses), metrics
