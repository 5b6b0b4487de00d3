"""GRPO's advantages and policy loss equal TRL 1.16's GRPOTrainer on the same tensors: every loss type,
token and sequence importance sampling, the KL term, the two-sided clip, and the metrics by TRL's names."""

from __future__ import annotations

import itertools
import types
from collections import defaultdict

import jax
import numpy as np
import pytest

from lowrax import group_advantages, grpo_loss
from lowrax.errors import LowraxError

torch = pytest.importorskip("torch", reason="torch (the test extra) is the reference's runtime")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl (the test extra) is the reference")
trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl (the test extra) is the reference")

B, T = 6, 7


def tensors(seed: int = 0):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-1.5, 0.6, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios on both sides of the clip
    ref = (logps + rng.normal(0, 0.2, (B, T))).astype(np.float32)
    mask = np.ones((B, T), np.float32)
    for row, length in enumerate([7, 3, 5, 1, 6, 4]):
        mask[row, length:] = 0
    advantages = rng.normal(0, 1, B).astype(np.float32)
    return logps, old, ref, mask, advantages


def trl_loss(logps, old, ref, mask, advantages, *, loss_type, beta, epsilon, epsilon_high, level, delta,
             num_items, max_completion_length=T, bias_correction=True):
    """(loss, d loss / d logps, metrics) from GRPOTrainer._compute_loss, on a stand-in for the trainer that holds
    only what the loss reads (one process, no accumulation, no entropy terms)."""
    logps_t = torch.tensor(logps, requires_grad=True)
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction: x, sync_gradients=True)
    trainer = types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon, epsilon_high=epsilon_high,
        importance_sampling_level=level, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, max_completion_length=max_completion_length,
        current_gradient_accumulation_steps=1, accelerator=accelerator, model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(delta=delta, use_bias_correction_kl=bias_correction, sapo_temperature_pos=1.0,
                                   sapo_temperature_neg=1.05, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps_t, torch.zeros_like(logps_t), None))
    inputs = {"prompt_ids": torch.zeros((B, 2), dtype=torch.long), "prompt_mask": torch.ones((B, 2), dtype=torch.long),
              "completion_ids": torch.zeros((B, T), dtype=torch.long), "completion_mask": torch.tensor(mask),
              "advantages": torch.tensor(advantages), "old_per_token_logps": torch.tensor(old),
              "ref_per_token_logps": torch.tensor(ref), "num_items_in_batch": torch.tensor(float(num_items))}
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items() if k != "entropy"}
    return float(loss), logps_t.grad.numpy(), metrics


COMBINATIONS = list(itertools.product(
    ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"),  # loss_type
    ("token", "sequence"),  # importance sampling
    (0.0, 0.04),  # beta
))


@pytest.mark.parametrize("loss_type, level, beta", COMBINATIONS)
def test_loss_gradient_and_metrics_equal_trl(loss_type, level, beta):
    logps, old, ref, mask, advantages = tensors()
    epsilon, epsilon_high = 0.2, (5.0 if loss_type == "cispo" else 0.28)
    delta = 1.5 if loss_type in ("grpo", "dapo") else None  # the two-sided clip where it applies
    num_items = mask.sum() + 5  # the generation batch spans more tokens than this micro-batch
    want, want_grad, want_metrics = trl_loss(logps, old, ref, mask, advantages, loss_type=loss_type, beta=beta,
                                             epsilon=epsilon, epsilon_high=epsilon_high, level=level, delta=delta,
                                             num_items=num_items)

    def ours(lp):
        return grpo_loss(lp, old, advantages, mask, ref_logps=ref, loss_type=loss_type, beta=beta, epsilon=epsilon,
                         epsilon_high=epsilon_high, importance_sampling_level=level, delta=delta,
                         max_completion_length=T, num_items_in_batch=num_items)

    (got, metrics), grad = jax.value_and_grad(ours, has_aux=True)(logps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_kl_bias_correction_with_the_two_sided_clip_equals_trl():
    logps, old, ref, mask, advantages = tensors(2)
    want, want_grad, want_metrics = trl_loss(logps, old, ref, mask, advantages, loss_type="grpo", beta=0.1,
                                             epsilon=0.2, epsilon_high=0.2, level="token", delta=1.1,
                                             num_items=mask.sum(), bias_correction=True)
    fn = lambda lp: grpo_loss(lp, old, advantages, mask, ref_logps=ref, loss_type="grpo", beta=0.1,  # noqa: E731
                              delta=1.1)
    (got, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), want_metrics["kl"], rtol=1e-5)


def test_the_kl_without_bias_correction_and_the_same_policy_default_equal_trl():
    logps, _, ref, mask, advantages = tensors(1)
    want, want_grad, _ = trl_loss(logps, logps, ref, mask, advantages, loss_type="bnpo", beta=0.1, epsilon=0.2,
                                  epsilon_high=0.2, level="token", delta=None, num_items=mask.sum(), bias_correction=False)
    fn = lambda lp: grpo_loss(lp, None, advantages, mask, ref_logps=ref, loss_type="bnpo", beta=0.1,  # noqa: E731
                              kl_bias_correction=False)[0]
    got, grad = jax.value_and_grad(fn)(logps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale):
    rng = np.random.default_rng(3)
    rewards = rng.normal(0.5, 1.0, 12).astype(np.float32)
    rewards[[1, 6, 7]] = np.nan  # unscorable completions
    rewards[8:12] = 2.0  # one group all alike: std 0
    rewards[9] = np.nan
    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, 4), dim=1).repeat_interleave(4)
    std = (trl_utils.nanstd(r.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch"
           else trl_utils.nanstd(r).expand_as(r))
    want = r - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0).numpy()
    got = np.asarray(group_advantages(rewards, 4, scale_rewards=scale))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[1] == got[6] == got[7] == 0.0  # an unscorable completion moves nothing


def test_a_lone_scored_completion_in_its_group_gets_no_advantage():
    got = np.asarray(group_advantages([1.0, np.nan, 0.0, 2.0], 2))
    assert got[0] == got[1] == 0.0 and got[2] < 0 < got[3]


def test_bad_arguments_are_named():
    logps, old, _, mask, advantages = tensors()
    with pytest.raises(LowraxError, match="loss_type must be one of"):
        grpo_loss(logps, old, advantages, mask, loss_type="ppo")
    with pytest.raises(LowraxError, match="beta != 0 needs ref_logps"):
        grpo_loss(logps, old, advantages, mask, beta=0.1)
    with pytest.raises(LowraxError, match="importance_sampling_level"):
        grpo_loss(logps, old, advantages, mask, importance_sampling_level="batch")
    with pytest.raises(LowraxError, match="a multiple of num_generations=4"):
        group_advantages(np.zeros(6), 4)
    with pytest.raises(LowraxError, match="scale_rewards must be one of"):
        group_advantages(np.zeros(4), 2, scale_rewards="std")
