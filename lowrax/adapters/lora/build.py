"""The LoRA family as a registered method: `wrap(params, LoraConfig(...), key)` builds its nodes.

`LoraConfig.variant` picks the node type: `LoraKernel` for LoRA, LoRA-FA and rsLoRA,
`DoraKernel`, `VeraKernel` or `DeltaLoraKernel` for the others; `LoraConfig.init` the
starting factors (adapters/lora/inits.py; the calibrated ones in calibrated.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrax.adapters.lora import calibrated, delta_lora, dora, inits, vera
from lowrax.adapters.lora.config import LoraConfig
from lowrax.adapters.lora.node import LoraKernel, lora_scale
from lowrax.adapters import trainable_tokens
from lowrax.adapters.registry import AdapterMethod, register_method
from lowrax.adapters.targets import ATTENTION_QV, pattern_value
from lowrax.core.kernels import dense_kernel, is_quantized, rebuilt, why_fixed
from lowrax.errors import LowraxError

def build_nodes(bases: dict[str, Any], cfg: LoraConfig, key, adapter_dtype, model_type=None, *,
                calibration=None) -> tuple[dict, dict]:
    """The LoRA-family node of every targeted kernel (and VeRA's shared projections)."""
    if cfg.variant == "vera":
        d_initial = vera.DEFAULT_D_INITIAL if cfg.d_initial is None else cfg.d_initial
        return vera.build_nodes(bases, cfg.r, d_initial, cfg.dropout, key, adapter_dtype, random_b=cfg.init == "random")
    ranks = {name: int(pattern_value(name, cfg.rank_pattern, cfg.r)) for name in bases}
    for name, base in bases.items():
        if not 1 <= ranks[name] <= min(base.shape):
            raise LowraxError(f"LoRA rank r={ranks[name]} for {name} must be in 1..{min(base.shape)} (min of its "
                              f"in={base.shape[0]}, out={base.shape[1]})")
    alphas = {name: float(pattern_value(name, cfg.alpha_pattern, cfg.alpha)) for name in bases}
    starts = calibrated.starts(bases, cfg, ranks, alphas, calibration, key, adapter_dtype)  # None but for calibrated inits
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        start = starts.get(name) if starts is not None else None
        if starts is not None and start is None:
            continue  # EVA gave this layer no rank: it stays a plain kernel, as in PEFT
        r, alpha = (start.a.shape[1], start.alpha) if start is not None else (ranks[name], alphas[name])
        nodes[name] = _factored_node(name, base, r, alpha, cfg, jax.random.fold_in(key, i), adapter_dtype, start)
    return nodes, {}


def _factored_node(name: str, base, r: int, alpha: float, cfg: LoraConfig, key, adapter_dtype, start=None):
    """One node with low-rank factors A, B (every variant but VeRA); `start` the calibrated init's."""
    scale = lora_scale(alpha, r, cfg.use_rslora)
    rewrites = cfg.variant == "delta_lora" or inits.rewrites_base(cfg.init)
    if rewrites and (reason := why_fixed(base)) is not None:
        what = "Delta-LoRA's base update" if cfg.variant == "delta_lora" else f"init {cfg.init!r}"
        raise LowraxError(f"{name}: {what} rewrites the base, and {reason}: use plain LoRA, DoRA, rsLoRA or "
                          "LoRA-FA over this base")
    kind = inits.family(cfg.init)
    if start is None:
        start = _start(name, base, r, scale, cfg, key, adapter_dtype)
    a, b = start.a, start.b
    if kind == "loftq":
        base = start.base  # the quantized W - s a b
    elif start.base is not None:
        base = rebuilt(base, start.base)  # an NF4 base is quantized again (QLoRA + PiSSA)
    if cfg.variant == "dora":
        # m starts at ||W + s A B||_c, so the DoRA kernel equals W + s A B at init.
        magnitude = dora.column_norms(dense_kernel(base), a, b, scale).astype(adapter_dtype)
        return dora.DoraKernel(base=base, a=a, b=b, magnitude=magnitude, scale=scale, dropout=cfg.dropout,
                               rslora=cfg.use_rslora)
    if cfg.variant == "delta_lora":
        return delta_lora.DeltaLoraKernel(
            base=base, a=a, b=b, anchor_a=jnp.copy(a), anchor_b=jnp.copy(b), scale=scale,  # own buffers: donated apart
            delta_lambda=delta_lora.DEFAULT_LAMBDA if cfg.delta_lambda is None else float(cfg.delta_lambda),
            start_step=delta_lora.DEFAULT_START_STEP if cfg.delta_start_step is None else int(cfg.delta_start_step),
            rslora=cfg.use_rslora)
    return LoraKernel(base=base, a=a, b=b, scale=scale, dropout=cfg.dropout, train_a=cfg.variant != "lora_fa",
                      train_b=kind != "mica", fa_projected_grad=bool(cfg.fa_projected_grad),
                      residual_base=inits.rewrites_base(cfg.init) and kind != "loftq", rslora=cfg.use_rslora)


def _start(name: str, base, r: int, scale: float, cfg: LoraConfig, key, adapter_dtype) -> inits.Start:
    """The data-free inits' factors (and rewritten base) for one kernel."""
    kind = inits.family(cfg.init)
    if kind in inits.RANDOM_INITS:
        return inits.random_start(cfg.init, base.shape, r, key, adapter_dtype)
    if kind == "loftq":
        if is_quantized(base):
            raise LowraxError(f"{name}: init 'loftq' quantizes the float weights itself; wrap the unquantized "
                              "model (without quant.method / lowrax.quantize) and LoftQ makes the quantized base")
        start, quantized = inits.loftq_start(dense_kernel(base), r, scale, cfg.loftq_bits or 4, cfg.loftq_iter or 1,
                                             64, adapter_dtype)
        return inits.Start(start.a, start.b, quantized)
    if kind in inits.CALIBRATED_INITS:
        raise LowraxError(f"init {cfg.init!r} needs calibration data: calibration = lowrax.lora.calibrate(model, "
                          "params, cfg, batches), then lowrax.wrap(params, cfg, key, model=model, "
                          "calibration=calibration) (lowrax train computes it from the training data)")
    return inits.svd_start(cfg.init, dense_kernel(base), r, scale, key, adapter_dtype)


def with_trainable_tokens(tree, cfg: LoraConfig, key, adapter_dtype, model_type):
    """The embedding rows of `trainable_token_indices` trained beside the LoRA."""
    if cfg.trainable_token_indices is None:
        return tree
    return trainable_tokens.with_token_rows(tree, cfg.trainable_token_indices, key, adapter_dtype, model_type)


register_method(AdapterMethod(name="lora", config=LoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(vera.SHARED,), extend=with_trainable_tokens, calibrated=True,
                              examples={"lora": lambda: LoraConfig(r=2), "rslora": lambda: LoraConfig(r=2, use_rslora=True),
                                        "dora": lambda: LoraConfig(r=2, variant="dora"),
                                        "vera": lambda: LoraConfig(r=2, variant="vera"),
                                        "lora_fa": lambda: LoraConfig(r=2, variant="lora_fa"),
                                        "delta_lora": lambda: LoraConfig(r=2, variant="delta_lora"),
                                        "pissa": lambda: LoraConfig(r=2, init="pissa"),
                                        "olora": lambda: LoraConfig(r=2, init="olora")}))
