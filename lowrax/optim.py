"""Optimizers built with optax for the trainable half of the tree.

Gradients are taken only with respect to the trainable half (`lowrax.split`),
whose frozen positions are None, so frozen leaves carry no optimizer state at
all: optax sees only adapter (and fully-trained) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay; the defaults suit LoRA on a small model."""

    learning_rate: float = 2e-4  # peak learning rate, reached after warmup
    schedule: str = "cosine"  # decay after warmup: cosine | linear | constant
    warmup_steps: int = 0  # linear warmup from 0
    total_steps: int = 1000  # length of the schedule (warmup included)
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # global-norm clipping; None disables it

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in 0..total_steps ({self.total_steps})")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then the chosen decay to 0 at `total_steps`."""
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(cfg.learning_rate, decay_steps),
        "linear": optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
        "constant": optax.constant_schedule(cfg.learning_rate),
    }[cfg.schedule]
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clipping + AdamW on the schedule."""
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)
