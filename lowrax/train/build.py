"""The model a run trains: its base (dtype, NF4, a classification head) wrapped with its adapter
method, rebuilt identically by `lowrax.train.runs` to restore a checkpoint into."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from lowrax.adapters.wrap import wrap
from lowrax.errors import LowraxError
from lowrax.models.pretrained import load_pretrained, resolve_model_path
from lowrax.train.config import TrainConfig
from lowrax.train.step import task_loss
from lowrax.train.tasks import task_named

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


INIT_FILE = "lora_init.safetensors"  # a calibrated LoRA init's starting factors, in the run directory
DEFAULT_CALIBRATION_ROWS = 64


def build_model(cfg: TrainConfig, mesh=None, run_dir: Path | None = None):
    """(model, base params, adapter-wrapped params) as a run with this config trains them
    (with `mesh`: the base loaded straight into its shards).

    The adapter initialisation depends only on `train.seed`, so a run directory's
    checkpoint always restores into the same structure (`lowrax.train.runs`). A LoRA init
    that needs data (corda, eva, lora_ga) starts from the factors `calibrated_params` stored
    in `run_dir`; before they exist the wrapped params are None.
    """
    key = jax.random.key(cfg.train.seed)
    model, base = _load_model(cfg, jax.random.fold_in(key, 1), mesh)
    adapter_cfg = _adapter_config(cfg)
    calibration = None
    if _calibrated(adapter_cfg):
        path = None if run_dir is None else Path(run_dir) / INIT_FILE
        if path is None or not path.exists():
            return model, base, None
        from lowrax.adapters.lora.calibrated import load_initial_factors

        calibration = load_initial_factors(path)
    return model, base, wrap(base, adapter_cfg, _adapter_key(cfg), model=model, calibration=calibration)


def calibrated_params(cfg: TrainConfig, model, base, batches, run_dir: Path, primary: bool, progress: bool, log):
    """The run's adapters for a calibrated LoRA init, calibrated on its first training batches; the
    starting factors are stored in run_dir so a resumed or restored run rebuilds the same start."""
    from lowrax.adapters.lora.calibrated import calibrate, initial_factors, save_initial_factors

    adapter_cfg = _adapter_config(cfg)
    rows = adapter_cfg.calibration_rows or DEFAULT_CALIBRATION_ROWS
    count = -(-rows // batches.batch_size)
    log(f"lora.init={adapter_cfg.init}: calibrating on the first {count * batches.batch_size} training rows")
    calibration = calibrate(model, base, adapter_cfg, (batches.batch(k) for k in range(count)), progress=progress,
                            loss_fn=task_loss(model))
    params = wrap(base, adapter_cfg, _adapter_key(cfg), model=model, calibration=calibration)
    if primary:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_initial_factors(initial_factors(params, adapter_cfg.init), Path(run_dir) / INIT_FILE)
    return params


def _adapter_key(cfg: TrainConfig):
    """The adapter initialisation's key: a function of train.seed alone (a restored run rebuilds the same)."""
    return jax.random.fold_in(jax.random.key(cfg.train.seed), 2)


def _adapter_config(cfg: TrainConfig):
    adapter_cfg = task_named(cfg.model.task).adapter_defaults(cfg.adapter)
    return adapter_cfg.for_run(steps=cfg.train.steps, model_dir=resolve_model_path(cfg.model.path))


def _calibrated(adapter_cfg) -> bool:
    from lowrax.adapters.lora.inits import CALIBRATED_INITS

    return getattr(adapter_cfg, "init", None) in CALIBRATED_INITS


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
