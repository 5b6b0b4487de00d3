"""Training objectives beyond SFT: preference tuning (DPO and its variants, ORPO, SimPO, KTO)
and knowledge distillation, as pure losses and as loss functions of the one train step."""

from lowrax.objectives.distill import distill_loss
from lowrax.objectives.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss

__all__ = ["distill_loss", "dpo_loss", "kto_loss", "orpo_loss", "simpo_loss"]
