"""The model a run trains: its base (dtype, NF4, a classification head) wrapped with its adapter
method, rebuilt identically by `lowrax.train.runs` to restore a checkpoint into."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lowrax.adapters.wrap import wrap
from lowrax.errors import LowraxError
from lowrax.models.pretrained import load_pretrained, resolve_model_path
from lowrax.train.config import TrainConfig
from lowrax.train.tasks import task_named

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(cfg: TrainConfig, mesh=None):
    """(model, base params, adapter-wrapped params) as a run with this config trains them
    (with `mesh`: the base loaded straight into its shards).

    The adapter initialisation depends only on `train.seed`, so a run directory's
    checkpoint always restores into the same structure (`lowrax.train.runs`).
    """
    key = jax.random.key(cfg.train.seed)
    model, base = _load_model(cfg, jax.random.fold_in(key, 1), mesh)
    adapter_cfg = task_named(cfg.model.task).adapter_defaults(cfg.adapter)
    adapter_cfg = adapter_cfg.for_run(steps=cfg.train.steps, model_dir=resolve_model_path(cfg.model.path))
    return model, base, wrap(base, adapter_cfg, jax.random.fold_in(key, 2), model=model)


def _load_model(cfg: TrainConfig, key, mesh=None):
    dtype = DTYPES.get(cfg.model.dtype)
    if dtype is None:
        raise LowraxError(f"model.dtype must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    quant = None
    if cfg.model.quantize is not None:
        from lowrax.quant.tree import QuantConfig

        quant = QuantConfig(cfg.model.quantize, cfg.model.quant_blocksize, cfg.model.double_quant)
    task = task_named(cfg.model.task)
    model, params = load_pretrained(cfg.model.path, dtype=dtype, quantize=quant, mesh=mesh)
    if (refusal := task.refuses(model)) is not None:
        raise LowraxError(refusal)
    return task.prepare(model, params, cfg, key)
