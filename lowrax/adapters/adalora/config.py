"""`AdaLoraConfig`: AdaLoRA's hyper-parameters, with PEFT's names and defaults (and lowrax's
`alpha` / `dropout` for the fields it shares with `LoraConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowrax.adapters.targets import TargetConfig
from lowrax.errors import LowraxError


@dataclass(frozen=True)
class AdaLoraConfig(TargetConfig):
    """AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning"). Every layer starts with `init_r` triplets; after `tinit` steps the total
    budget falls on a cubic schedule to `target_r` per layer at step `total_step - tfinal`,
    keeping the triplets with the highest smoothed importance; the last `tfinal` steps
    train the final ranks. Steps count from 0, as PEFT's `update_and_allocate(global_step)`."""

    init_r: int = 12  # triplets per layer at the start
    target_r: int = 8  # average triplets per layer at the end (total budget target_r x layers)
    alpha: float = 8.0  # the adapter's output is scaled by alpha / init_r (PEFT: lora_alpha / ranknum)
    dropout: float = 0.0  # dropout on the input of the adapter path, training only
    tinit: int = 0  # steps before the budget starts to fall
    tfinal: int = 0  # steps at the end with the final ranks fixed
    deltaT: int = 1  # steps between two budget allocations
    beta1: float = 0.85  # EMA factor of the sensitivity |w * grad|
    beta2: float = 0.85  # EMA factor of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q added to the loss
    total_step: int | None = None  # length of the schedule; lowrax train sets it to train.steps
    init_weights: bool = True  # True: E = 0, P and Q ~ N(0, 0.02^2) (the base model); False: all N(0, 1)

    def __post_init__(self):
        super().__post_init__()
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise LowraxError(f"AdaLoraConfig.{name} must be a non-negative integer, got {value!r}")
        if self.init_r < 1 or self.deltaT < 1:
            raise LowraxError(f"AdaLoraConfig.init_r and deltaT must be at least 1, got init_r={self.init_r}, "
                              f"deltaT={self.deltaT}")
        if not self.target_r < self.init_r:
            raise LowraxError(f"AdaLoraConfig.target_r ({self.target_r}) must be below init_r ({self.init_r}): "
                              "the budget only falls (PEFT fails at its first allocation otherwise)")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise LowraxError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise LowraxError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise LowraxError(f"AdaLoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.total_step is not None:
            if not isinstance(self.total_step, int) or self.total_step < 1:
                raise LowraxError(f"AdaLoraConfig.total_step must be a positive integer, got {self.total_step!r}")
            if self.tinit >= self.total_step - self.tfinal:
                raise LowraxError(f"AdaLoraConfig leaves no budgeting phase: tinit ({self.tinit}) must be below "
                                  f"total_step - tfinal ({self.total_step} - {self.tfinal}); lower tinit/tfinal or "
                                  "raise total_step")

    def for_run(self, *, steps: int, model_dir=None) -> "AdaLoraConfig":
        """The rank budget falls over the run's length unless total_step says otherwise."""
        return self if self.total_step is not None else dataclasses.replace(self, total_step=steps)
