"""AdaLoRA: SVD-shaped LoRA whose per-layer ranks are allocated from a global budget
during training (`config.py`, `kernel.py` the node, `budget.py` the allocator,
`method.py` the registration, `peft_adalora.py` PEFT's ADALORA format)."""

from lowrax.adapters.adalora.config import AdaLoraConfig
from lowrax.adapters.adalora.node import AdaLoraKernel

__all__ = ["AdaLoraConfig", "AdaLoraKernel"]
