"""The LoRA family as a registered method: `wrap(params, LoraConfig(...), key)` builds its nodes.

`LoraConfig.variant` picks the node type: `LoraKernel` for LoRA, LoRA-FA, rsLoRA
and PiSSA init, `DoraKernel`, `VeraKernel` or `DeltaLoraKernel` for the others.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lowrax.adapters.lora import delta_lora, dora, pissa, vera
from lowrax.adapters.lora.config import LoraConfig
from lowrax.adapters.lora.node import LoraKernel, lora_scale
from lowrax.adapters import trainable_tokens
from lowrax.adapters.registry import AdapterMethod, register_method
from lowrax.adapters.targets import ATTENTION_QV, pattern_value
from lowrax.core.kernels import dense_kernel, rebuilt, why_fixed
from lowrax.errors import LowraxError

def build_nodes(bases: dict[str, Any], cfg: LoraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    """The LoRA-family node of every targeted kernel (and VeRA's shared projections)."""
    if cfg.variant == "vera":
        d_initial = vera.DEFAULT_D_INITIAL if cfg.d_initial is None else cfg.d_initial
        return vera.build_nodes(bases, cfg.r, d_initial, cfg.dropout, key, adapter_dtype, random_b=cfg.init == "random")
    nodes = {name: _factored_node(name, base, cfg, jax.random.fold_in(key, i), adapter_dtype)
             for i, (name, base) in enumerate(bases.items())}
    return nodes, {}


def _init_a(key, shape, init: str, r: int):
    d_in = shape[0]
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / r
    # PEFT: kaiming_uniform_(a=sqrt(5)) on the torch (r, in) weight -> U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _factored_node(name: str, base, cfg: LoraConfig, key, adapter_dtype):
    """One node with low-rank factors A, B (every variant but VeRA)."""
    d_in, d_out = base.shape
    r = int(pattern_value(name, cfg.rank_pattern, cfg.r))
    if not 1 <= r <= min(d_in, d_out):
        raise LowraxError(f"LoRA rank r={r} for {name} must be in 1..{min(d_in, d_out)} (min of its in={d_in}, out={d_out})")
    alpha = float(pattern_value(name, cfg.alpha_pattern, cfg.alpha))
    scale = lora_scale(alpha, r, cfg.use_rslora)
    if cfg.variant == "delta_lora" or cfg.init == "pissa":
        what = "PiSSA's residual" if cfg.init == "pissa" else "Delta-LoRA's base update"
        if (reason := why_fixed(base)) is not None:  # both rewrite the base
            raise LowraxError(f"{name}: {what} rewrites the base, and {reason}: use plain LoRA, DoRA, rsLoRA or "
                              "LoRA-FA over this base")
    if cfg.init == "pissa":
        a, b, residual = pissa.pissa_init(dense_kernel(base), r, scale, adapter_dtype)
        base = rebuilt(base, residual)  # an NF4 base is quantized again (QLoRA + PiSSA)
    else:
        ka, kb = jax.random.split(key)
        a = _init_a(ka, (d_in, r), cfg.init, r).astype(adapter_dtype)
        if cfg.init == "random":
            b = (jax.random.normal(kb, (r, d_out), jnp.float32) * 0.02).astype(adapter_dtype)
        else:
            b = jnp.zeros((r, d_out), adapter_dtype)
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
                      fa_projected_grad=bool(cfg.fa_projected_grad), pissa_residual=cfg.init == "pissa",
                      rslora=cfg.use_rslora)


def with_trainable_tokens(tree, cfg: LoraConfig, key, adapter_dtype, model_type):
    """The embedding rows of `trainable_token_indices` trained beside the LoRA."""
    if cfg.trainable_token_indices is None:
        return tree
    return trainable_tokens.with_token_rows(tree, cfg.trainable_token_indices, key, adapter_dtype, model_type)


register_method(AdapterMethod(name="lora", config=LoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              shared_keys=(vera.SHARED,), extend=with_trainable_tokens,
                              examples={"lora": lambda: LoraConfig(r=2), "rslora": lambda: LoraConfig(r=2, use_rslora=True),
                                        "dora": lambda: LoraConfig(r=2, variant="dora"),
                                        "vera": lambda: LoraConfig(r=2, variant="vera"),
                                        "lora_fa": lambda: LoraConfig(r=2, variant="lora_fa"),
                                        "delta_lora": lambda: LoraConfig(r=2, variant="delta_lora"),
                                        "pissa": lambda: LoraConfig(r=2, init="pissa")}))
