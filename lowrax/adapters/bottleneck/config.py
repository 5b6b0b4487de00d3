"""`BottleneckConfig`: bottleneck adapters with AdapterHub's `BnConfig` field names.

A preset gives every field its value (AdapterHub's names and aliases):

    seq_bn | pfeiffer          after the feed-forward block, on the normed stream (Pfeiffer et al. 2021)
    double_seq_bn | houlsby    after attention and after the feed-forward block (Houlsby et al. 2019)
    par_bn | parallel          beside the feed-forward block, from its input (He et al. 2022)
    scaled_parallel            par_bn with a learned scalar scaling

and any field set explicitly overrides the preset's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lowrax.adapters.targets import TargetConfig
from lowrax.core.checked import Count, Probability
from lowrax.errors import LowraxError

_SEQ = dict(mh_adapter=False, output_adapter=True, reduction_factor=16, non_linearity="relu", original_ln_before=True,
            original_ln_after=True, residual_before_ln=True, adapter_residual_before_ln=False, ln_after=False,
            is_parallel=False, scaling=1.0, use_gating=False, dropout=0.0, init_weights="bert")
PRESETS = {
    "seq_bn": _SEQ,
    "double_seq_bn": _SEQ | dict(mh_adapter=True, non_linearity="swish", original_ln_before=False),
    "par_bn": _SEQ | dict(reduction_factor=2, original_ln_before=False, is_parallel=True, scaling=4.0,
                          init_weights="mam_adapter"),
}
PRESETS["scaled_parallel"] = PRESETS["par_bn"] | dict(scaling="learned")
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn"}
NON_LINEARITIES = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu")
INITS = ("bert", "mam_adapter", "houlsby")


@dataclass(frozen=True)
class BottleneckConfig(TargetConfig):
    """Bottleneck adapters in the residual stream of every layer (but `leave_out`). Fields left
    None take the preset's value. Sites are fixed by the family (after attention: `mh_adapter`;
    after the feed-forward block: `output_adapter`), so `target_modules` does not apply."""

    preset: str = "seq_bn"  # seq_bn (pfeiffer), double_seq_bn (houlsby), par_bn (parallel), scaled_parallel
    mh_adapter: bool | None = None  # an adapter after the attention block
    output_adapter: bool | None = None  # an adapter after the feed-forward block
    reduction_factor: float | dict | None = None  # bottleneck = hidden // factor; {"<layer>": f, "default": f}
    non_linearity: str | None = None  # relu, swish, gelu, gelu_new, tanh, sigmoid, leakyrelu
    original_ln_before: bool | None = None  # feed the adapter the block's output plus residual (normed when post-LN)
    original_ln_after: bool | None = None  # add the block's residual (and norm) after the adapter
    residual_before_ln: bool | str | None = None  # the adapter's own residual: True (block output), False, "post_add"
    adapter_residual_before_ln: bool | None = None  # add that residual before the adapter's ln_after
    ln_after: bool | None = None  # a trained LayerNorm on the adapter's output
    is_parallel: bool | None = None  # parallel: fed from the block's input, added beside its output
    scaling: float | str | None = None  # the output's factor: a number, "learned" (scalar) or "channel" (vector)
    use_gating: bool | None = None  # a learned sigmoid gate on the output, averaged over the sequence
    dropout: Probability | None = None  # on the adapter's output, training only
    init_weights: str | None = None  # bert (N(0, 0.02)), mam_adapter (zero up projection), houlsby
    leave_out: tuple[Count, ...] = ()  # layer indices without adapters

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None or self.exclude_modules is not None or self.layers_to_transform is not None:
            raise LowraxError("BottleneckConfig places adapters at fixed sites of every layer: use leave_out "
                              "(layer indices) and mh_adapter / output_adapter instead of target_modules, "
                              "exclude_modules or layers_to_transform")
        name = ALIASES.get(self.preset, self.preset)
        if name not in PRESETS:
            raise LowraxError(f"BottleneckConfig.preset must be one of {sorted(PRESETS) + sorted(ALIASES)}, "
                              f"got {self.preset!r}")
        for key, value in PRESETS[name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        object.__setattr__(self, "leave_out", tuple(int(i) for i in (self.leave_out or ())))
        self._check()

    def _check(self) -> None:
        if self.non_linearity.lower() not in NON_LINEARITIES:
            raise LowraxError(f"BottleneckConfig.non_linearity must be one of {NON_LINEARITIES}, got {self.non_linearity!r}")
        if self.init_weights not in INITS:
            raise LowraxError(f"BottleneckConfig.init_weights must be one of {INITS}, got {self.init_weights!r}")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise LowraxError(f"BottleneckConfig.residual_before_ln must be true, false or 'post_add', "
                              f"got {self.residual_before_ln!r}")
        if not (isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)) \
                and self.scaling not in ("learned", "channel"):
            raise LowraxError(f"BottleneckConfig.scaling must be a number, 'learned' or 'channel', got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LowraxError(f"BottleneckConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (self.mh_adapter or self.output_adapter):
            raise LowraxError("BottleneckConfig places no adapter: set mh_adapter or output_adapter")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [self.reduction_factor]
        if any(not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0 for f in factors):
            raise LowraxError(f"BottleneckConfig.reduction_factor must be a positive number or a mapping of "
                              f"layer index (as text) or 'default' to one, got {self.reduction_factor!r}")

    def factor_for(self, layer: int) -> float:
        """The layer's reduction factor (AdapterHub: the layer's entry, else "default")."""
        rf = self.reduction_factor
        if not isinstance(rf, dict):
            return rf
        if str(layer) in rf:
            return rf[str(layer)]
        if "default" in rf:
            return rf["default"]
        raise LowraxError(f"BottleneckConfig.reduction_factor {rf!r} has no entry for layer {layer} and no 'default'")

    def adapter_fields(self) -> dict:
        """The BnConfig fields lowrax reads, resolved (what AdapterHub's config records)."""
        skip = {"preset", "target_modules", "exclude_modules", "layers_to_transform", "modules_to_save"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
