"""The LoRA family: `LoraConfig` (with `variant` and `init`), the node types, `calibrate` (the
data the corda, eva and lora_ga inits need), and `wrap` (the generic `lowrax.wrap`, kept under
this name as `lowrax.lora.wrap`)."""

from lowrax.adapters.lora.calibrated import LoraCalibration, calibrate
from lowrax.adapters.lora.config import INITS, VARIANTS, LoraConfig
from lowrax.adapters.lora.delta_lora import DeltaLoraKernel
from lowrax.adapters.lora.dora import DoraKernel
from lowrax.adapters.lora.node import LoraKernel, lora_scale
from lowrax.adapters.lora.vera import VeraKernel
from lowrax.adapters.wrap import wrap

__all__ = ["LoraConfig", "VARIANTS", "INITS", "calibrate", "LoraCalibration", "LoraKernel", "DoraKernel", "VeraKernel", "DeltaLoraKernel",
           "lora_scale", "wrap"]
