"""`AdaLoraConfig`: AdaLoRA's hyper-parameters, with PEFT's names and defaults (and lowrax's
`alpha` / `dropout` for the fields it shares with `LoraConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowrax.adapters.targets import TargetConfig
from lowrax.core.checked import Count, NonNegativeFloat, OpenUnit, PositiveInt, Probability
from lowrax.errors import LowraxError


@dataclass(frozen=True)
class AdaLoraConfig(TargetConfig):
    """AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning"). Every layer starts with `init_r` triplets; after `tinit` steps the total
    budget falls on a cubic schedule to `target_r` per layer at step `total_step - tfinal`,
    keeping the triplets with the highest smoothed importance; the last `tfinal` steps
    train the final ranks. Steps count from 0, as PEFT's `update_and_allocate(global_step)`."""

    init_r: PositiveInt = 12  # triplets per layer at the start
    target_r: Count = 8  # average triplets per layer at the end (total budget target_r x layers)
    alpha: float = 8.0  # the adapter's output is scaled by alpha / init_r (PEFT: lora_alpha / ranknum)
    dropout: Probability = 0.0  # dropout on the input of the adapter path, training only
    tinit: Count = 0  # steps before the budget starts to fall
    tfinal: Count = 0  # steps at the end with the final ranks fixed
    deltaT: PositiveInt = 1  # steps between two budget allocations
    beta1: OpenUnit = 0.85  # EMA factor of the sensitivity |w * grad|
    beta2: OpenUnit = 0.85  # EMA factor of its uncertainty
    orth_reg_weight: NonNegativeFloat = 0.5  # weight of the orthogonality penalty on P and Q added to the loss
    total_step: PositiveInt | None = None  # length of the schedule; lowrax train sets it to train.steps
    init_weights: bool = True  # True: E = 0, P and Q ~ N(0, 0.02^2) (the base model); False: all N(0, 1)

    def __post_init__(self):
        super().__post_init__()
        if not self.target_r < self.init_r:
            raise LowraxError(f"AdaLoraConfig.target_r ({self.target_r}) must be below init_r ({self.init_r}): "
                              "the budget only falls (PEFT fails at its first allocation otherwise)")
        if self.total_step is not None:
            if self.tinit >= self.total_step - self.tfinal:
                raise LowraxError(f"AdaLoraConfig leaves no budgeting phase: tinit ({self.tinit}) must be below "
                                  f"total_step - tfinal ({self.total_step} - {self.tfinal}); lower tinit/tfinal or "
                                  "raise total_step")

    def for_run(self, *, steps: int, model_dir=None) -> "AdaLoraConfig":
        """The rank budget falls over the run's length unless total_step says otherwise."""
        return self if self.total_step is not None else dataclasses.replace(self, total_step=max(steps, 1))
