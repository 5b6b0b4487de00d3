"""`LoraConfig`: LoRA and its variants' hyper-parameters, with PEFT's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from lowrax.adapters.targets import TargetConfig, check_patterns
from lowrax.adapters.trainable_tokens import check_token_spec
from lowrax.core.checked import Count, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, Probability
from lowrax.errors import LowraxError

INITS = ("kaiming", "gaussian", "random", "pissa")
VARIANTS = ("lora", "lora_fa", "dora", "vera", "delta_lora")
# Options that belong to one variant (None = unset, the variant's default applies).
VARIANT_OPTIONS = {"d_initial": "vera", "delta_lambda": "delta_lora", "delta_start_step": "delta_lora",
                   "fa_projected_grad": "lora_fa"}


@dataclass(frozen=True)
class LoraConfig(TargetConfig):
    """LoRA and variant hyper-parameters, with PEFT's names and defaults (the targeting
    fields, `target_modules` etc., are `TargetConfig`'s)."""

    r: PositiveInt = 8  # rank of A [in, r] and B [r, out]
    alpha: PositiveFloat = 8.0  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: Probability = 0.0  # dropout on the input of the low-rank path, training only
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # "kaiming" (PEFT default: Kaiming-uniform A, zero B), "gaussian", "random" (B nonzero too, for tests),
    # "pissa" (A, B = the top-r singular part of W; the base keeps the rest)
    init: Annotated[str, OneOf(INITS)] = "kaiming"
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> rank
    alpha_pattern: dict = field(default_factory=dict)  # regex on module name -> alpha
    # lora | lora_fa (A frozen at init) | dora (magnitude + direction) | vera (shared random
    # projections, trained scaling vectors) | delta_lora (the base follows the adapter's change)
    variant: Annotated[str, OneOf(VARIANTS)] = "lora"
    d_initial: float | None = None  # vera: initial value of the lambda_d vector (default 0.1)
    delta_lambda: NonNegativeFloat | None = None  # delta_lora: the base moves by lambda * s * (A'B' - AB) (default 0.5)
    delta_start_step: Count | None = None  # delta_lora: optimizer steps before the base starts moving (default 0)
    fa_projected_grad: bool | None = None  # lora_fa: PEFT's LoRA-FA optimizer rule for B's gradient (default false)
    # token ids whose word-embedding rows train beside the LoRA (adapters.trainable_tokens), or
    # {embedding module name: token ids}
    trainable_token_indices: tuple[Count, ...] | dict | None = None

    def __post_init__(self):
        super().__post_init__()
        check_token_spec(self, "trainable_token_indices", self.trainable_token_indices)
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt)
        check_patterns(self, "alpha_pattern", self.alpha_pattern, PositiveFloat)
        for option, owner in VARIANT_OPTIONS.items():
            if getattr(self, option) is not None and self.variant != owner:
                raise LowraxError(f"LoraConfig.{option} applies to variant {owner!r} only; this config has "
                                  f"variant={self.variant!r} (set variant: {owner})")
        self._check_variant_combinations()

    def _check_variant_combinations(self) -> None:
        if self.init == "pissa" and self.variant not in ("lora", "lora_fa"):
            raise LowraxError(f"init='pissa' applies to variants 'lora' and 'lora_fa', not {self.variant!r}")
        if self.variant == "vera":
            for option, default in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False)):
                if getattr(self, option) != default:
                    raise LowraxError(f"LoraConfig.{option} does not apply to variant 'vera' (one rank, no alpha)")
            if self.init not in ("kaiming", "random"):
                raise LowraxError(f"variant 'vera' takes init 'kaiming' (PEFT's) or 'random', not {self.init!r}")
        if self.variant == "delta_lora" and self.dropout > 0:
            raise LowraxError("variant 'delta_lora' has no dropout on the low-rank path (as in the paper); set dropout: 0")
