"""Bottleneck adapters as a registered method: `wrap(params, BottleneckConfig(...), key, model=model)`
puts one `BottleneckAdapter` at each of the model's residual-stream sites the config selects."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lowrax.adapters.bottleneck.config import BottleneckConfig
from lowrax.adapters.bottleneck.node import BottleneckAdapter, Wiring
from lowrax.adapters.registry import AdapterMethod, register_method
from lowrax.errors import LowraxError

SUPPORTED = ("llama", "gpt2", "bert", "roberta")  # families whose sites lowrax knows by AdapterHub's names


def sites(model, cfg: BottleneckConfig) -> dict[str, tuple[str, int]]:
    """{AdapterHub module name: (location, layer)} of the sites `cfg` fills."""
    if model.model_type not in SUPPORTED or not hasattr(model, "bottleneck_sites"):
        raise LowraxError(f"bottleneck adapters are implemented for {', '.join(SUPPORTED)} models (AdapterHub's "
                          f"site names), not {model.model_type!r}")
    wanted = {"mh_adapter": cfg.mh_adapter, "output_adapter": cfg.output_adapter}
    return {name: (where, layer) for name, (where, layer) in model.bottleneck_sites().items()
            if wanted[where] and layer not in cfg.leave_out}


def site_path(name: str) -> tuple[str, ...]:
    """Where a site's node lives in the tree: the module's path, then `adapters`."""
    return (*name.split("."), "adapters")


def bottleneck_size(hidden: int, factor: float) -> int:
    """AdapterHub: int(hidden // reduction_factor), at least 1."""
    return max(int(hidden // factor), 1)


def wiring_of(cfg: BottleneckConfig) -> Wiring:
    scaling = float(cfg.scaling) if isinstance(cfg.scaling, (int, float)) else None
    return Wiring(non_linearity=cfg.non_linearity.lower(), original_ln_before=cfg.original_ln_before,
                  original_ln_after=cfg.original_ln_after, residual_before_ln=cfg.residual_before_ln,
                  adapter_residual_before_ln=cfg.adapter_residual_before_ln, is_parallel=cfg.is_parallel,
                  scaling=scaling, init_weights=cfg.init_weights)


def _init(key, cfg: BottleneckConfig, hidden: int, m: int, dtype) -> dict:
    """AdapterHub's three inits: bert N(0, 0.02); mam_adapter Kaiming-uniform down, zero up;
    houlsby N(0, 0.01^2) truncated at 2 std. Biases start at zero, a gate as bert."""
    k_down, k_up, k_gate = jax.random.split(key, 3)
    if cfg.init_weights == "bert":
        down = 0.02 * jax.random.normal(k_down, (hidden, m))
        up = 0.02 * jax.random.normal(k_up, (m, hidden))
    elif cfg.init_weights == "mam_adapter":
        bound = 1.0 / math.sqrt(hidden)
        down = jax.random.uniform(k_down, (hidden, m), minval=-bound, maxval=bound)
        up = jnp.zeros((m, hidden))
    else:
        down = 0.01 * jax.random.truncated_normal(k_down, -2.0, 2.0, (hidden, m))
        up = 0.01 * jax.random.truncated_normal(k_up, -2.0, 2.0, (m, hidden))
    arrays = {"down_kernel": down, "down_bias": jnp.zeros((m,)), "up_kernel": up, "up_bias": jnp.zeros((hidden,))}
    if cfg.scaling == "learned":
        arrays["scale"] = jnp.ones((1,))
    elif cfg.scaling == "channel":
        arrays["scale"] = jnp.ones((hidden,))
    if cfg.ln_after:
        arrays["norm_scale"], arrays["norm_bias"] = jnp.ones((hidden,)), jnp.zeros((hidden,))
    if cfg.use_gating:
        arrays["gate_kernel"], arrays["gate_bias"] = 0.02 * jax.random.normal(k_gate, (hidden, 1)), jnp.zeros((1,))
    return {k: v.astype(dtype) for k, v in arrays.items()}


def build_inserted(params, cfg: BottleneckConfig, key, adapter_dtype, model) -> dict:
    hidden = model.config.hidden_size
    wiring = wiring_of(cfg)
    chosen = sites(model, cfg)
    if not chosen:
        raise LowraxError(f"leave_out {list(cfg.leave_out)} leaves no layer for a bottleneck adapter")
    out = {}
    for i, (name, (_, layer)) in enumerate(chosen.items()):
        arrays = _init(jax.random.fold_in(key, i), cfg, hidden, bottleneck_size(hidden, cfg.factor_for(layer)),
                       adapter_dtype)
        out[site_path(name)] = BottleneckAdapter(**arrays, wiring=wiring, dropout=float(cfg.dropout))
    return out


# AdapterHub initialises both projections N(0, 0.02) ("bert" init): not the base model at init.
register_method(AdapterMethod(name="bottleneck", config=BottleneckConfig, build=None, build_inserted=build_inserted,
                              identity_at_init=False,
                              examples={"pfeiffer": lambda: BottleneckConfig(reduction_factor=4),
                                        "houlsby": lambda: BottleneckConfig(preset="double_seq_bn", reduction_factor=4),
                                        "parallel": lambda: BottleneckConfig(preset="par_bn", reduction_factor=4)}))
