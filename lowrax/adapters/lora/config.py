"""`LoraConfig`: LoRA and its variants' hyper-parameters, with PEFT's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from lowrax.adapters.lora import inits
from lowrax.adapters.targets import TargetConfig, check_patterns
from lowrax.adapters.trainable_tokens import check_token_spec
from lowrax.core.checked import Count, NonNegativeFloat, OneOf, PositiveFloat, PositiveInt, Probability
from lowrax.errors import LowraxError

INITS = inits.INITS  # and pissa_niter_K
VARIANTS = ("lora", "lora_fa", "dora", "vera", "delta_lora")
# Options that belong to one variant (None = unset, the variant's default applies).
VARIANT_OPTIONS = {"d_initial": "vera", "delta_lambda": "delta_lora", "delta_start_step": "delta_lora",
                   "fa_projected_grad": "lora_fa"}
# Options that belong to one init (PEFT's loftq_config, corda_config, eva_config, lora_ga_config).
INIT_OPTIONS = {"loftq_bits": "loftq", "loftq_iter": "loftq", "corda_method": "corda", "eva_rho": "eva",
                "eva_whiten": "eva", "eva_adjust_scaling_factors": "eva", "lora_ga_direction": "lora_ga",
                "lora_ga_scale": "lora_ga", "lora_ga_stable_gamma": "lora_ga"}


@dataclass(frozen=True)
class LoraConfig(TargetConfig):
    """LoRA and variant hyper-parameters, with PEFT's names and defaults (the targeting
    fields, `target_modules` etc., are `TargetConfig`'s)."""

    r: PositiveInt = 8  # rank of A [in, r] and B [r, out]
    alpha: PositiveFloat = 8.0  # scale = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: Probability = 0.0  # dropout on the input of the low-rank path, training only
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    # "kaiming" (PEFT's default: Kaiming-uniform A, zero B), "gaussian", "random" (B nonzero too, for
    # tests), "orthogonal", "mica", "pissa", "pissa_niter_K", "olora", "loftq", and with calibration
    # data "corda", "eva", "lora_ga": each is described in adapters/lora/inits.py and docs/methods.md
    init: Annotated[str, inits.InitName()] = "kaiming"
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
    loftq_bits: Annotated[int, OneOf((4, 8))] | None = None  # loftq: NF4 (4, default) or int8 (8) base
    loftq_iter: PositiveInt | None = None  # loftq: quantize / SVD alternations (default 1)
    corda_method: Annotated[str, OneOf(("ipm", "kpm"))] | None = None  # corda: top (ipm, default) or bottom (kpm) directions
    eva_rho: PositiveFloat | None = None  # eva: a layer may take up to rho * r components (default 2; 1: no redistribution)
    eva_whiten: bool | None = None  # eva: divide the components by the root of their singular values (default false)
    eva_adjust_scaling_factors: bool | None = None  # eva: alpha follows a redistributed rank (default true)
    lora_ga_direction: Annotated[str, OneOf(("ArBr", "A2rBr", "ArB2r", "random"))] | None = None  # default ArB2r
    lora_ga_scale: Annotated[str, OneOf(("stable", "weight_svd", "gd_scale", "unit"))] | None = None  # default stable
    lora_ga_stable_gamma: PositiveFloat | None = None  # lora_ga: the "stable" scale's gamma (default 16)
    # corda, eva, lora_ga in `lowrax train`: how many training rows calibrate the init (default 64)
    calibration_rows: PositiveInt | None = None

    def __post_init__(self):
        super().__post_init__()
        check_token_spec(self, "trainable_token_indices", self.trainable_token_indices)
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt)
        check_patterns(self, "alpha_pattern", self.alpha_pattern, PositiveFloat)
        for option, owner in VARIANT_OPTIONS.items():
            if getattr(self, option) is not None and self.variant != owner:
                raise LowraxError(f"LoraConfig.{option} applies to variant {owner!r} only; this config has "
                                  f"variant={self.variant!r} (set variant: {owner})")
        for option, owner in INIT_OPTIONS.items():
            if getattr(self, option) is not None and self.init != owner:
                raise LowraxError(f"LoraConfig.{option} applies to init {owner!r} only; this config has "
                                  f"init={self.init!r} (set init: {owner})")
        if self.calibration_rows is not None and self.init not in inits.CALIBRATED_INITS:
            raise LowraxError(f"LoraConfig.calibration_rows applies to the inits that need data "
                              f"({', '.join(inits.CALIBRATED_INITS)}); this config has init={self.init!r}")
        self._check_variant_combinations()

    def _check_variant_combinations(self) -> None:
        if self.init not in ("kaiming", "gaussian", "random") and self.variant not in ("lora", "lora_fa"):
            raise LowraxError(f"init={self.init!r} applies to variants 'lora' and 'lora_fa', not {self.variant!r}")
        if self.variant == "vera":
            for option, default in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False)):
                if getattr(self, option) != default:
                    raise LowraxError(f"LoraConfig.{option} does not apply to variant 'vera' (one rank, no alpha)")
            if self.init not in ("kaiming", "random"):
                raise LowraxError(f"variant 'vera' takes init 'kaiming' (PEFT's) or 'random', not {self.init!r}")
        if self.variant == "delta_lora" and self.dropout > 0:
            raise LowraxError("variant 'delta_lora' has no dropout on the low-rank path (as in the paper); set dropout: 0")
