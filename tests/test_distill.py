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


def test_full_fine_tuning_of_a_smaller_student_from_a_larger_teacher():
    """A 1-layer student trained in full (every leaf FullyTrained) distils a 2-layer teacher of the same
    vocabulary through the one train step with the teacher as its argument."""
    import jax

    from lowrax.models import model_from_hf_config
    from lowrax.objectives.config import DistillSection
    from lowrax.objectives.step_losses import distill_objective
    from lowrax.train.data import gather_loss_positions
    from lowrax.train.optim import OptimizerConfig, make_optimizer
    from lowrax.train.step import init_state, make_train_step

    def tiny(layers, hidden, seed):
        config = {"model_type": "llama", "vocab_size": 64, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                  "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2}
        model = model_from_hf_config(config)
        rng = np.random.default_rng(seed)
        shapes = model.param_shapes()
        return model, jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)

    teacher_model, teacher = tiny(2, 64, 0)
    student_model, student = tiny(1, 32, 1)
    trainable, frozen = lowrax.split(jax.tree.map(lowrax.FullyTrained, student))
    assert lowrax.count_params(trainable) == lowrax.count_params(student)  # every weight is trained
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=40))
    step = jax.jit(make_train_step(student_model, optimizer, loss_fn=distill_objective(DistillSection(), teacher_model),
                                   with_teacher=True))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[:, :4] = 0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask,
             **gather_loss_positions(ids, loss_mask, 8)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    state = init_state(trainable, optimizer)
    first = None
    for _ in range(40):
        state, metrics = step(state, frozen, batch, teacher)
        first = float(metrics["divergence"]) if first is None else first
    assert float(metrics["divergence"]) < 0.5 * first
