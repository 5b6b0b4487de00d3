"""Training objectives beyond SFT: preference tuning (DPO and its variants, ORPO, SimPO, KTO),
knowledge distillation and GRPO's policy loss, as pure losses and as loss functions of the one train step."""

from lowrax.objectives.distill import distill_loss
from lowrax.objectives.grpo import group_advantages, grpo_loss
from lowrax.objectives.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss

__all__ = ["distill_loss", "dpo_loss", "group_advantages", "grpo_loss", "kto_loss", "orpo_loss", "simpo_loss"]
