"""Working with finished (or interrupted) training runs: restore, export to PEFT, import from PEFT, merge.

A run directory is what `lowrax train` writes: `config.yaml` plus orbax
`checkpoints/`. The base model is reloaded from `model.path`, wrapped exactly as
in training, and the checkpointed adapters are restored into it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import yaml

from lowrax.adapters.registry import peft_format
from lowrax.adapters.tree import combine, merge, split
from lowrax.errors import LowraxError
from lowrax.io.pretrained import load_tokenizer, save_pretrained
from lowrax.peft.format import load_peft, read_adapter_config, save_peft
from lowrax.quant.tree import merge_requantized
from lowrax.train.checkpoints import Checkpoints
from lowrax.train.config import TrainConfig, apply_overrides, from_dict
from lowrax.train.optim import make_optimizer
from lowrax.train.step import init_state
from lowrax.train.trainer import build_model


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise LowraxError(f"{run_dir} is not a lowrax run directory: it has no config.yaml (expected the train.output_dir of `lowrax train`)")
    return from_dict(yaml.safe_load(path.read_text()))


def restore_run(run_dir: str | Path, step: int | None = None, with_initial: bool = False):
    """(cfg, model, params with the trained adapters) from a run directory's latest (or given) checkpoint;
    with_initial: also the adapters as initialised (PiSSA's export needs them)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model, _, params = build_model(cfg)
    trainable, frozen = split(params)
    ckpts = Checkpoints(run_dir / "checkpoints")
    step = ckpts.latest_step() if step is None else step
    if step is None:
        raise LowraxError(f"{run_dir / 'checkpoints'} holds no checkpoint yet")
    state, _ = ckpts.restore(step, init_state(trainable, make_optimizer(cfg.optim), cfg.train.seed))
    ckpts.close()
    trained = combine(state.trainable, frozen)
    return (cfg, model, trained, params) if with_initial else (cfg, model, trained)


def export_peft(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a run's adapter in PEFT format."""
    cfg, model, params, initial = restore_run(run_dir, with_initial=True)
    return save_peft(params, out_dir, model, base_model=cfg.model.path, overwrite=overwrite, initial=initial)


def merge_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, requantize: bool = False,
              log=print) -> Path:
    """Write a run's base with its adapters merged in, as HF safetensors that transformers loads.

    requantize (QLoRA runs): merge into the NF4 bases and save 4-bit weights again, logging
    the rounding error that adds; otherwise NF4 bases are dequantized and saved in full precision.
    """
    cfg, model, params = restore_run(run_dir)
    if requantize:
        if cfg.model.quantize is None:
            raise LowraxError(f"{run_dir} is not a QLoRA run (model.quantize is not set); nothing to re-quantize")
        merged, report = merge_requantized(params)
        log(f"re-quantizing the merged weights adds a relative error of up to {report['worst']['relative']:.2e} "
            "(per-module figures in merge_report.json)")
    else:
        merged, report = merge(params), None
    out = save_pretrained(merged, model, out_dir, tokenizer=load_tokenizer(cfg.model.path),
                                 overwrite=overwrite, keep_nf4=requantize)
    if report is not None:
        (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def import_peft(adapter_dir: str | Path, out_dir: str | Path, model_path: str | None = None,
                overrides: list[str] = ()) -> Path:
    """Turn a PEFT adapter into a lowrax run directory (config.yaml + checkpoint at step 0) that
    `lowrax train` continues from and `lowrax export-peft` / `lowrax merge` read."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if (out_dir / "config.yaml").exists() or (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds a run; choose a new directory")
    peft_config = read_adapter_config(adapter_dir)
    method, adapter_cfg = peft_format(peft_config.get("peft_type"), where=f"{adapter_dir}: ").to_config(peft_config)
    values = apply_overrides({"model": {"path": model_path}, "method": method, method: dataclasses.asdict(adapter_cfg),
                              "train": {"output_dir": str(out_dir)}}, list(overrides))
    cfg = from_dict(values)
    model, base, wrapped = build_model(cfg)
    params = load_peft(base, adapter_dir, model)
    trainable, _ = split(params)
    if jax.tree.structure(trainable) != jax.tree.structure(split(wrapped)[0]):
        raise LowraxError(f"{adapter_dir}: its tensors adapt other modules than its adapter_config.json selects; "
                          "lowrax cannot continue training it as a run")
    state = init_state(trainable, make_optimizer(cfg.optim), cfg.train.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out_dir / "checkpoints")
    ckpts.save(0, state, {"step": 0, "examples_seen": 0, "imported_from": str(adapter_dir)})
    ckpts.close()
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_dir
