"""Settings of the training objectives (`objective:` in a run's config) other than SFT."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from lowrax.core.checked import Bound, Checked, Count, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, Share
from lowrax.errors import LowraxError
from lowrax.objectives.grpo import LOSS_TYPES as GRPO_LOSS_TYPES, SCALE_REWARDS
from lowrax.objectives.preference import DPO_LOSS_TYPES
from lowrax.objectives.rewards import BUILT_INS, reward_from_spec
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


@dataclass(frozen=True)
class GRPOSection(Checked):
    """GRPO's settings; names and defaults follow TRL's GRPOConfig except where a CPU run needs less
    (num_generations, max_completion_length)."""

    section_name = "grpo"

    num_generations: Annotated[int, Bound(low=2)] = 4  # completions sampled per prompt (train.batch_size counts completions)
    max_completion_length: PositiveInt = 32  # new tokens per completion at most (longer ones are cut: truncated)
    temperature: PositiveFloat = 1.0  # sampling temperature; the policy's log-probs are taken at it too, as TRL's
    top_p: Annotated[float, Bound(0, 1, low_open=True)] = 1.0  # nucleus sampling (1: off)
    top_k: Count = 0  # top-k sampling (0: off)
    rewards: tuple[str, ...] = ("final_number",)  # built-ins (NAME or NAME=OPTION) or module:function, summed
    reward_weights: tuple[float, ...] | None = None  # one weight per reward (null: 1 each)
    scale_rewards: Annotated[str, OneOf(SCALE_REWARDS)] = "group"  # advantages divided by the group's std, the batch's, or none
    loss_type: Annotated[str, OneOf(GRPO_LOSS_TYPES)] = "dapo"  # how token losses are normalised (docs: reinforcement learning)
    beta: NonNegativeFloat = 0.0  # weight of the k3 KL to the reference, the base with adapters off (0: no reference pass)
    epsilon: PositiveFloat = 0.2  # the clip's lower margin
    epsilon_high: PositiveFloat | None = None  # the clip's upper margin (null: epsilon; DAPO uses 0.28); cispo's ratio cap
    importance_sampling_level: Annotated[str, OneOf(("token", "sequence"))] = "token"  # sequence: GSPO
    delta: PositiveFloat | None = None  # two-sided clip: the unclipped ratio capped at delta (null: off)
    sapo_temperature_pos: PositiveFloat = 1.0  # sapo: gate temperature for positive advantages
    sapo_temperature_neg: PositiveFloat = 1.05  # sapo: gate temperature for negative advantages
    kl_bias_correction: bool = True  # weight the KL term by the importance ratio (TRL's use_bias_correction_kl)
    num_iterations: PositiveInt = 1  # updates per rollout (> 1: the old policy's log-probs are stored with it)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length carry no loss

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise LowraxError(f"grpo.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} "
                              f"rewards ({', '.join(self.rewards)}); give one per reward, or null for 1 each")
        if not self.rewards:
            raise LowraxError("grpo.rewards is empty; name at least one reward (e.g. [final_number])")
        for spec in self.rewards:  # a built-in's option now; a module:function is imported when the run starts
            if spec.partition("=")[0].strip() in BUILT_INS or ":" not in spec:
                reward_from_spec(spec)


def _check_grpo(cfg) -> None:
    g, t = cfg.grpo, cfg.train
    if t.batch_size % g.num_generations:
        raise LowraxError(f"train.batch_size counts completions and must be a multiple of grpo.num_generations "
                          f"({g.num_generations}); got {t.batch_size}")
    if g.num_iterations > 1 and t.save_every % g.num_iterations:
        raise LowraxError(f"with grpo.num_iterations={g.num_iterations}, train.save_every must be a multiple of it "
                          f"(a checkpoint between the updates of one rollout could not be resumed exactly); "
                          f"got {t.save_every}")


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
register_objective(Objective("grpo", ("causal_lm",), section="grpo", check=_check_grpo,
                             description="group-relative policy optimisation on sampled completions and rewards"))
