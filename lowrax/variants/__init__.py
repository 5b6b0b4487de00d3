"""LoRA variants as adapter node types (see `lowrax.nodes` for the interface).

Importing this package registers every node type and its projection.
"""

from lowrax.variants.delta_lora import DeltaLoraKernel
from lowrax.variants.dora import DoraKernel
from lowrax.variants.vera import VeraKernel

__all__ = ["DoraKernel", "VeraKernel", "DeltaLoraKernel"]
