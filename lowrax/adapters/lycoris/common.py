"""What LoHa and LoKr share (PEFT's `LycorisConfig` / `LycorisLayer`): a dense weight delta
built from small factors, added to the frozen kernel.

    y = x @ base + x @ delta        delta [in, out] = method's product of its factors * alpha / r

Training-time randomness, as PEFT: `rank_dropout` zeroes whole output columns of
delta (rescaled to keep its mean where the method does), `module_dropout` skips the
whole delta for a step. Both need a key (`adapters.tree.with_dropout_keys` gives one
each step); without one (evaluation) the delta is used whole.

Merging adds delta to the kernel; unmerging subtracts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from lowrax.adapters.delta import DeltaKernel
from lowrax.adapters.targets import TargetConfig, check_patterns, pattern_value
from lowrax.core.checked import PositiveFloat, PositiveInt, Probability
from lowrax.errors import LowraxError
from lowrax.core.linear import matmul
from lowrax.peft.common import PREFIX, refuse_conv1d, torch_layout, value_and_pattern

@dataclass(frozen=True)
class LycorisConfig(TargetConfig):
    """The hyper-parameters LoHa and LoKr share, with PEFT's names and defaults."""

    r: PositiveInt = 8  # rank of the factors
    alpha: PositiveFloat = 8.0  # delta is scaled by alpha / r
    rank_dropout: Probability = 0.0  # training: probability of zeroing an output column of delta
    module_dropout: Probability = 0.0  # training: probability of skipping the adapter for a step
    rank_pattern: dict = field(default_factory=dict)  # regex on module name -> rank
    alpha_pattern: dict = field(default_factory=dict)  # regex on module name -> alpha

    def __post_init__(self):
        super().__post_init__()
        check_patterns(self, "rank_pattern", self.rank_pattern, PositiveInt)
        check_patterns(self, "alpha_pattern", self.alpha_pattern, PositiveFloat)


class LycorisKernel(DeltaKernel):
    """Base of the LyCORIS node types. Subclasses define `delta()` (float32 [in, out], scale
    included), may define `delta_output(x)` (x @ delta without forming it), and carry the static
    fields `rank`, `alpha`, `rank_dropout`, `module_dropout`, `rescale_rank_dropout` and a
    `dropout_key` field."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dropout(self) -> float:
        """Nonzero when training needs a key each step (`with_dropout_keys` looks at it)."""
        return max(self.rank_dropout, self.module_dropout)

    def _dropped(self, d: jnp.ndarray) -> jnp.ndarray:
        """Rank dropout (whole output columns of delta) and module dropout, when a key is attached."""
        if self.dropout_key is None:
            return d
        rank_key, module_key = jax.random.split(self.dropout_key)
        if self.rank_dropout > 0:
            keep = (jax.random.uniform(rank_key, (d.shape[-1],)) > self.rank_dropout).astype(jnp.float32)
            if self.rescale_rank_dropout:
                keep = keep / jnp.maximum(keep.mean(), 1e-12)  # PEFT divides by the kept share
            d = d * keep.astype(d.dtype)
        if self.module_dropout > 0:
            d = jnp.where(jax.random.uniform(module_key) > self.module_dropout, d, jnp.zeros_like(d))
        return d

    def apply(self, x: jnp.ndarray) -> jnp.ndarray:
        y = matmul(x, self.base)
        return y + self._dropped(self.delta_output(x)).astype(y.dtype)


def peft_tensors(nodes: dict, fields: dict[str, str], method: str, model) -> dict:
    """The PEFT file's tensors: each node's factors (ours -> PEFT's name) in torch layout; a
    factor a node does not carry (None) is not written."""
    refuse_conv1d(model, method)
    return {f"{PREFIX}{name}.{theirs}": torch_layout(getattr(node, ours))
            for name, node in nodes.items() for ours, theirs in fields.items() if getattr(node, ours) is not None}


def rank_alpha_fields(nodes: dict) -> dict:
    """PEFT's r / alpha (the most common) and rank_pattern / alpha_pattern (the modules that differ)."""
    r, rank_pattern = value_and_pattern({name: n.rank for name, n in nodes.items()})
    alpha, alpha_pattern = value_and_pattern({name: n.alpha for name, n in nodes.items()})
    return {"r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "rank_dropout": max(n.rank_dropout for n in nodes.values()),
            "module_dropout": max(n.module_dropout for n in nodes.values())}


def modules_to_build(bases: dict, cfg: LycorisConfig, method: str):
    """Yield (index, name, base, rank, alpha) for each targeted module, its rank and alpha from
    cfg's patterns; the index seeds the module's own key."""
    for i, (name, base) in enumerate(bases.items()):
        r = int(pattern_value(name, cfg.rank_pattern, cfg.r))
        if r < 1:
            raise LowraxError(f"{method} rank for {name} must be a positive integer, got {r}")
        yield i, name, base, r, float(pattern_value(name, cfg.alpha_pattern, cfg.alpha))


def rank_and_alpha(name: str, config: dict) -> tuple[int, float]:
    """A module's rank and alpha from a PEFT LyCORIS config (its patterns, else r / alpha)."""
    r = int(pattern_value(name, config.get("rank_pattern"), config.get("r", 8)))
    return r, float(pattern_value(name, config.get("alpha_pattern"), config.get("alpha", 8)))


def lycoris_settings(config: dict) -> dict:
    """The LycorisConfig fields of a PEFT config."""
    return {"r": int(config.get("r", 8)), "alpha": float(config.get("alpha", 8)),
            "rank_dropout": float(config.get("rank_dropout") or 0.0),
            "module_dropout": float(config.get("module_dropout") or 0.0),
            "rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {})}
