"""The LyCORIS family (PEFT's `LycorisConfig` methods): LoHa and LoKr, weight deltas built from
small factors (`common.py`), one module each with its node, registration and PEFT format."""

from lowrax.adapters.lycoris.loha import LoHaConfig, LoHaKernel
from lowrax.adapters.lycoris.lokr import LoKrConfig, LoKrKernel

__all__ = ["LoHaConfig", "LoHaKernel", "LoKrConfig", "LoKrKernel"]
