"""Every built-in adapter method. Importing this module registers them (`lowrax` does it
on import); a new method adds its module here."""

import lowrax.adapters.ia3  # noqa: F401  IA3
import lowrax.adapters.lora.build  # noqa: F401  LoRA, LoRA-FA, DoRA, VeRA, Delta-LoRA, rsLoRA, PiSSA
import lowrax.adapters.lora.peft  # noqa: F401  PEFT's LORA format (LoRA, DoRA; PiSSA/Delta-LoRA converted)
import lowrax.adapters.lora.peft_vera  # noqa: F401  PEFT's VERA format
import lowrax.adapters.lycoris.loha  # noqa: F401  LoHa and PEFT's LOHA format
import lowrax.adapters.lycoris.lokr  # noqa: F401  LoKr and PEFT's LOKR format
import lowrax.adapters.oft  # noqa: F401  OFT and PEFT's OFT format
import lowrax.adapters.boft  # noqa: F401  BOFT and PEFT's BOFT format
import lowrax.adapters.c3a  # noqa: F401  C3A and PEFT's C3A format
import lowrax.adapters.fourierft  # noqa: F401  FourierFT and PEFT's FOURIERFT format
import lowrax.adapters.hira  # noqa: F401  HiRA and PEFT's HIRA format
import lowrax.adapters.shira  # noqa: F401  SHiRA and PEFT's SHIRA format
import lowrax.adapters.delora  # noqa: F401  DeLoRA and PEFT's DELORA format
import lowrax.adapters.miss  # noqa: F401  MiSS (and its bat / mini forms) and PEFT's MISS format
import lowrax.adapters.gralora  # noqa: F401  GraLoRA (with hybrid_r) and PEFT's GRALORA format
import lowrax.adapters.hra  # noqa: F401  HRA (with apply_GS) and PEFT's HRA format
import lowrax.adapters.road  # noqa: F401  RoAd (road_1 / road_2 / road_4) and PEFT's ROAD format
import lowrax.adapters.beft  # noqa: F401  BEFT (a trained bias) and PEFT's BEFT format
import lowrax.adapters.peanut  # noqa: F401  PEANuT (a network over the weight) and PEFT's PEANUT format
import lowrax.adapters.supertuning  # noqa: F401  Super-Tuning (largest weights, optional LoRA) and its PEFT format
import lowrax.adapters.vblora  # noqa: F401  VB-LoRA (factors mixed from a shared vector bank) and its format
import lowrax.adapters.deft  # noqa: F401  DeFT (a projected-out subspace, an injection in its place) and its format
import lowrax.adapters.pvera  # noqa: F401  PVeRA (VeRA with a sampled scaling) and PEFT's PVERA format
import lowrax.adapters.randlora  # noqa: F401  RandLoRA (scaled shared random bases, full rank) and its format
import lowrax.adapters.tinylora  # noqa: F401  TinyLoRA (a frozen SVD around a core from a few trained numbers)
import lowrax.adapters.unilora  # noqa: F401  UniLoRA (every factor entry drawn from one trained vector)
import lowrax.adapters.osf  # noqa: F401  OSF (the bottom singular part trains, orthogonal to the top)
import lowrax.adapters.lily  # noqa: F401  Lily (projections shared across layers, mixed by a router)
import lowrax.adapters.glora  # noqa: F401  GLoRA (weight and bias re-parameterised by support tensors)
import lowrax.adapters.frod  # noqa: F401  FRoD (a shared basis per kind of layer, a sparse trained rotation)
import lowrax.adapters.trainable_tokens  # noqa: F401  trainable tokens and PEFT's TRAINABLE_TOKENS format
import lowrax.adapters.ln_tuning  # noqa: F401  LN tuning and PEFT's LN_TUNING format
import lowrax.adapters.prompt.build  # noqa: F401  prompt tuning, P-tuning, prefix tuning
import lowrax.adapters.prompt.peft  # noqa: F401  their PEFT formats
import lowrax.adapters.adalora.build  # noqa: F401  AdaLoRA
import lowrax.adapters.adalora.peft  # noqa: F401  PEFT's ADALORA format
import lowrax.adapters.bottleneck.build  # noqa: F401  bottleneck adapters
import lowrax.adapters.bottleneck.adapterhub  # noqa: F401  AdapterHub's adapter directories
