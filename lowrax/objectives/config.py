"""Settings of the training objectives (`objective:` in a run's config) other than SFT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from lowrax.core.checked import Bound, Checked, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, Share
from lowrax.errors import LowraxError
from lowrax.objectives.preference import DPO_LOSS_TYPES
from lowrax.objectives.registry import Objective, register_objective

PAIRED = ("dpo", "orpo", "simpo")  # objectives trained on (prompt, chosen, rejected) pairs
PREFERENCE = PAIRED + ("kto",)
REFERENCES = ("adapters_off", "precomputed")


@dataclass(frozen=True)
class PreferenceSection(Checked):
    section_name = "preference"

    beta: PositiveFloat = 0.1  # dpo/kto: weight of the implicit KL constraint; orpo: of the odds-ratio term; simpo: reward scale
    loss_type: Annotated[str, OneOf(DPO_LOSS_TYPES)] = "sigmoid"  # dpo's loss
    label_smoothing: Annotated[float, Bound(0, 0.5, high_open=True)] = 0.0  # dpo robust, simpo: the assumed share of flipped preference labels
    gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    sft_weight: NonNegativeFloat = 0.0  # simpo: weight of the chosen rows' SFT loss added to it (TRL's cpo_alpha)
    desirable_weight: PositiveFloat = 1.0  # kto: weight of desirable examples' losses
    undesirable_weight: PositiveFloat = 1.0  # kto: weight of undesirable examples' losses
    reference: Annotated[str, OneOf(REFERENCES)] = "adapters_off"  # dpo, kto: adapters_off (the same weights, in the step) | precomputed (once, before training)



@dataclass(frozen=True)
class DistillSection(Checked):
    section_name = "distill"

    teacher: str = "runs/default"  # a lowrax run directory (its base and adapter), an HF directory or a .gguf file
    teacher_adapter: str | None = None  # a PEFT adapter directory put on the teacher (with an HF/GGUF teacher)
    beta: Share = 0.0  # generalised JSD: 0 forward KL (Hinton), 1 reverse KL, between: the interpolated JSD
    temperature: PositiveFloat = 1.0  # softmax temperature of both distributions
    hard_label_weight: Share = 0.0  # weight of the ordinary next-token loss mixed in (0: distillation only)
    on_policy: Share = 0.0  # share of steps trained on the student's own completions of the prompts (GKD's lmbda)
    generation_tokens: PositiveInt = 16  # on-policy: tokens the student writes per completion
    generation_temperature: NonNegativeFloat = 1.0  # on-policy: the student's sampling temperature (0: greedy)
    teacher_logits: str | None = None  # a directory: the teacher's logits computed once and stored there (float16)
    teacher_sharding: Annotated[str, OneOf(("student", "data"))] = "student"  # on a mesh: student (the student's rules) | data (also split over the data axis)

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_logits and self.on_policy:
            raise LowraxError("distill.teacher_logits stores the teacher's logits on the training data, while "
                              "distill.on_policy trains on new completions: use one or the other")


def _check_distill(cfg) -> None:
    if cfg.distill.on_policy and cfg.model.task != "causal_lm":
        raise LowraxError("distill.on_policy has the student generate completions, which needs a causal LM; "
                          f"model.task is {cfg.model.task!r}")


register_objective(Objective("sft", ("causal_lm", "classification", "seq2seq"),
                             description="supervised fine-tuning on the task's own loss"))
for _name in PREFERENCE:
    register_objective(Objective(_name, ("causal_lm",), section="preference",
                                 description="preference tuning on chosen/rejected completions"))
register_objective(Objective("distill", ("causal_lm", "classification"), section="distill", check=_check_distill,
                             description="knowledge distillation from a teacher (seq2seq distillation is not implemented)"))
