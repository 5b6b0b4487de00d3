"""Optimizers built with optax for the trainable half of the tree.

Gradients are taken only with respect to the trainable half (`lowrax.split`),
whose frozen positions are None, so frozen leaves carry no optimizer state at
all: optax sees only adapter (and fully-trained) arrays. Within that half the
tree's labels (`lowrax.labels`) pick the update: LoRA+ gives `lora_b` and 1-D
leaves a larger learning rate, and Delta-LoRA's `anchor` leaves get none (and
no state), nor do AdaLoRA's allocator state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import jax
import optax

from lowrax.core.checked import Checked, Count, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, Probability
from lowrax.core.node import SINGULAR
from lowrax.adapters.tree import ANCHOR, LORA_B, labels
from lowrax.errors import LowraxError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig(Checked):
    """AdamW with warmup and decay; the defaults suit LoRA on a small model."""

    section_name = "optim"

    learning_rate: PositiveFloat = 2e-4  # peak learning rate, reached after warmup
    schedule: Annotated[str, OneOf(SCHEDULES)] = "cosine"  # decay after warmup
    warmup_steps: Count = 0  # linear warmup from 0
    total_steps: PositiveInt = 1000  # length of the schedule (warmup included)
    weight_decay: NonNegativeFloat = 0.0  # decoupled (AdamW) weight decay
    b1: Probability = 0.9  # Adam's first-moment decay
    b2: Probability = 0.999  # Adam's second-moment decay
    eps: PositiveFloat = 1e-8
    max_grad_norm: PositiveFloat | None = 1.0  # global-norm clipping; None disables it
    # LoRA+ (Hayou et al. 2024): learning rate of B (and of 1-D leaves: DoRA magnitudes, VeRA
    # vectors, biases) = ratio x learning_rate, PEFT's grouping; None: one rate for all.
    loraplus_lr_ratio: PositiveFloat | None = None  # PEFT suggests 2 to 32

    def __post_init__(self):
        super().__post_init__()
        if self.warmup_steps > self.total_steps:
            raise LowraxError(f"warmup_steps ({self.warmup_steps}) must be in 0..total_steps ({self.total_steps})")


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
    """Clipping, then AdamW on the schedule, per label group of the trainable tree:
    `base` (learning_rate), `loraplus` (learning_rate x loraplus_lr_ratio) and
    `no_update` (Delta-LoRA anchors: neither an update nor state)."""
    schedule = learning_rate_schedule(cfg)
    ratio = cfg.loraplus_lr_ratio

    def adamw(scale: float):
        lr = schedule if scale == 1.0 else (lambda count: scale * schedule(count))
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)

    transforms = {"base": adamw(1.0), "no_update": optax.set_to_zero()}
    if ratio is not None:
        transforms["loraplus"] = adamw(float(ratio))
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.multi_transform(transforms, lambda params: update_groups(params, ratio is not None)))
    return optax.chain(*parts)


def update_groups(trainable, loraplus: bool):
    """The optimizer group of every leaf of the trainable half (see make_optimizer).

    LoRA+ follows PEFT's `create_loraplus_optimizer`: B matrices and every 1-D leaf get
    the larger rate, A matrices and other fully-trained weights the base rate."""
    def group(x, label):
        if label == ANCHOR:
            return "no_update"
        # AdaLoRA's singular values are 1-D here but (r, 1) in PEFT, which groups them with A
        if loraplus and (label == LORA_B or (x.ndim == 1 and label != SINGULAR)):
            return "loraplus"
        return "base"

    return jax.tree.map(group, trainable, labels(trainable))
