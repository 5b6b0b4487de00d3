"""AdaLoRA as a registered method: `wrap(params, AdaLoraConfig(total_step=...), key)` builds
one `AdaLoraKernel` per targeted kernel, with init_r triplets, all kept."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lowrax.adapters.adalora.config import AdaLoraConfig
from lowrax.adapters.adalora.node import RANKNUM_EPS, AdaLoraKernel, Schedule
from lowrax.adapters.registry import AdapterMethod, register_method
from lowrax.adapters.targets import ATTENTION_QV
from lowrax.errors import LowraxError

def schedule_of(cfg: AdaLoraConfig) -> Schedule:
    if cfg.total_step is None:
        raise LowraxError("AdaLoraConfig.total_step must be set: the rank budget falls over the run's length "
                          "(lowrax train sets it to train.steps)")
    return Schedule(target_r=cfg.target_r, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT, beta1=cfg.beta1,
                    beta2=cfg.beta2, total_step=cfg.total_step, orth_reg_weight=cfg.orth_reg_weight)


def adalora_scale(alpha: float, init_r: int) -> float:
    """PEFT's scaling / ranknum: alpha (or init_r when alpha is 0) over init_r + 1e-5."""
    return (alpha if alpha > 0 else float(init_r)) / (init_r + RANKNUM_EPS)


def new_node(base, a, e, b, kept, *, scale: float, dropout: float, schedule: Schedule) -> AdaLoraKernel:
    """A node with fresh allocator state (smoothed scores zero, as a new PEFT RankAllocator)."""
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    return AdaLoraKernel(base=base, a=a, e=e, b=b, ipt_a=zeros(a), ipt_e=zeros(e), ipt_b=zeros(b), unc_a=zeros(a),
                         unc_e=zeros(e), unc_b=zeros(b), kept=jnp.asarray(kept, jnp.float32), scale=scale,
                         dropout=dropout, schedule=schedule)


def build_nodes(bases: dict[str, Any], cfg: AdaLoraConfig, key, adapter_dtype, model_type=None) -> tuple[dict, dict]:
    schedule = schedule_of(cfg)
    r = cfg.init_r
    nodes = {}
    for i, (name, base) in enumerate(bases.items()):
        d_in, d_out = base.shape
        ka, ke, kb = jax.random.split(jax.random.fold_in(key, i), 3)
        std = 0.02 if cfg.init_weights else 1.0
        a = (std * jax.random.normal(ka, (d_in, r))).astype(adapter_dtype)
        b = (std * jax.random.normal(kb, (r, d_out))).astype(adapter_dtype)
        e = (jnp.zeros((r,)) if cfg.init_weights else jax.random.normal(ke, (r,))).astype(adapter_dtype)
        nodes[name] = new_node(base, a, e, b, jnp.ones((r,)), scale=adalora_scale(cfg.alpha, r), dropout=cfg.dropout,
                               schedule=schedule)
    return nodes, {}


register_method(AdapterMethod(name="adalora", config=AdaLoraConfig, build=build_nodes, default_roles=ATTENTION_QV,
                              examples={"adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10)}))
