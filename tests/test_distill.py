"""Distillation: `lowrax.distill_loss` equal to TRL's `GKDTrainer.generalized_jsd_loss`, and the
distill objective of the train step (in-step teacher) moving a student toward its teacher."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="distillation parity tests need torch (pip install -e .[test])")
pytest.importorskip("trl", reason="distillation parity tests need trl (pip install -e .[test])")

import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402


def _logits(seed: int, shape=(3, 7, 50), scale=3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [True, False])
def test_distill_loss_equals_trl_generalized_jsd(beta, temperature, masked):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = _logits(0), _logits(1)
    labels = np.random.default_rng(2).integers(0, 50, student.shape[:2])
    labels[0, :3] = -100
    labels[2, 5:] = -100
    theirs = GKDTrainer.generalized_jsd_loss(torch.tensor(student), torch.tensor(teacher),
                                             torch.tensor(labels) if masked else None, beta=beta,
                                             temperature=temperature)
    ours = lowrax.distill_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels) if masked else None,
                               beta=beta, temperature=temperature)
    assert abs(float(ours) - float(theirs)) < 1e-5 * max(1.0, abs(float(theirs)))
    assert float(ours) > 0.01  # two different distributions


def test_distill_loss_is_zero_for_equal_logits_and_refuses_bad_input():
    x = jnp.asarray(_logits(3))
    assert abs(float(lowrax.distill_loss(x, x, beta=0.5))) < 1e-6
    with pytest.raises(LowraxError, match="beta must be in"):
        lowrax.distill_loss(x, x, beta=1.5)
    with pytest.raises(LowraxError, match="temperature"):
        lowrax.distill_loss(x, x, temperature=0.0)
    with pytest.raises(LowraxError, match="one tokenizer"):
        lowrax.distill_loss(x, x[..., :40])
