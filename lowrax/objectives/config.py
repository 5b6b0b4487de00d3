"""Settings of the training objectives (`objective:` in a run's config) other than SFT."""

from __future__ import annotations

from dataclasses import dataclass

from lowrax.errors import LowraxError
from lowrax.objectives.preference import DPO_LOSS_TYPES
from lowrax.objectives.registry import Objective, register_objective

PAIRED = ("dpo", "orpo", "simpo")  # objectives trained on (prompt, chosen, rejected) pairs
PREFERENCE = PAIRED + ("kto",)
REFERENCES = ("adapters_off", "precomputed")


@dataclass(frozen=True)
class PreferenceSection:
    beta: float = 0.1  # dpo/kto: weight of the implicit KL constraint; orpo: of the odds-ratio term; simpo: reward scale
    loss_type: str = "sigmoid"  # dpo: sigmoid | hinge | ipo | robust | bco_pair | apo_zero | apo_down
    label_smoothing: float = 0.0  # dpo robust, simpo: the assumed share of flipped preference labels
    gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    sft_weight: float = 0.0  # simpo: weight of the chosen rows' SFT loss added to it (TRL's cpo_alpha)
    desirable_weight: float = 1.0  # kto: weight of desirable examples' losses
    undesirable_weight: float = 1.0  # kto: weight of undesirable examples' losses
    reference: str = "adapters_off"  # dpo, kto: adapters_off (the same weights, in the step) | precomputed (once, before training)

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise LowraxError(f"preference.loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.reference not in REFERENCES:
            raise LowraxError(f"preference.reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.beta <= 0:
            raise LowraxError(f"preference.beta must be > 0, got {self.beta}")


@dataclass(frozen=True)
class DistillSection:
    teacher: str = "runs/default"  # a lowrax run directory (its base and adapter), an HF directory or a .gguf file
    teacher_adapter: str | None = None  # a PEFT adapter directory put on the teacher (with an HF/GGUF teacher)
    beta: float = 0.0  # generalised JSD: 0 forward KL (Hinton), 1 reverse KL, between: the interpolated JSD
    temperature: float = 1.0  # softmax temperature of both distributions
    hard_label_weight: float = 0.0  # weight of the ordinary next-token loss mixed in (0: distillation only)
    on_policy: float = 0.0  # share of steps trained on the student's own completions of the prompts (GKD's lmbda)
    generation_tokens: int = 16  # on-policy: tokens the student writes per completion
    generation_temperature: float = 1.0  # on-policy: the student's sampling temperature (0: greedy)
    teacher_logits: str | None = None  # a directory: the teacher's logits computed once and stored there (float16)
    teacher_sharding: str = "student"  # on a mesh: student (the student's rules) | data (also split over the data axis)

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise LowraxError(f"distill.beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {self.beta}")
        if self.temperature <= 0:
            raise LowraxError(f"distill.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.hard_label_weight <= 1.0:
            raise LowraxError(f"distill.hard_label_weight must be in [0, 1], got {self.hard_label_weight}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise LowraxError(f"distill.on_policy must be a share of steps in [0, 1], got {self.on_policy}")
        if self.teacher_sharding not in ("student", "data"):
            raise LowraxError(f"distill.teacher_sharding must be student or data, got {self.teacher_sharding!r}")
        if self.teacher_logits and self.on_policy:
            raise LowraxError("distill.teacher_logits stores the teacher's logits on the training data, while "
                              "distill.on_policy trains on new completions: use one or the other")
        if self.generation_tokens < 1 or self.generation_temperature < 0:
            raise LowraxError("distill.generation_tokens must be >= 1 and distill.generation_temperature >= 0, got "
                              f"{self.generation_tokens} and {self.generation_temperature}")


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
