"""Working with finished (or interrupted) training runs: restore, export to PEFT, import from PEFT, merge.

A run directory is what `lowrax train` writes: `config.yaml` plus orbax
`checkpoints/`. The base model is reloaded from `model.path`, wrapped exactly as
in training, and the checkpointed adapters are restored into it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import yaml

from lowrax.adapters.registry import format_for_config, method_names
from lowrax.adapters.tree import combine, merge, split
from lowrax.errors import LowraxError
from lowrax.core.atomic import MARKER, check_output, write_directory, write_text
from lowrax.core.run_lock import lock_run_directory
from lowrax.io.hf_checkpoint import kernel_records, save_hf_directory
from lowrax.models.pretrained import (base_model_name, base_model_path, is_embedded, load_pretrained,
                                      load_preprocessor)
from lowrax.peft.common import CONFIG, WEIGHTS
from lowrax.peft.format import load_peft, read_adapter_config, save_peft
from lowrax.merging.requantize import merge_requantized
from lowrax.train.checkpoints import Checkpoints
from lowrax.train.config import TrainConfig, apply_overrides, from_dict, read_preset
from lowrax.train.optim import make_optimizer
from lowrax.train.step import init_state
from lowrax.train.data import detect_format, load_records
from lowrax.train.build import DTYPES, INIT_FILE, build_model


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise LowraxError(f"{run_dir} is not a lowrax run directory: it has no config.yaml (expected the train.output_dir of `lowrax train`)")
    return from_dict(yaml.safe_load(path.read_text()))


def restore_run(run_dir: str | Path, step: int | None = None, with_initial: bool = False,
                model_path: str | None = None, dtype: str | None = None):
    """(cfg, model, params with the trained adapters) from a run directory's latest (or given) checkpoint;
    with_initial: also the adapters as initialised (PiSSA's export needs them).
    model_path / dtype: another copy of the base, or another dtype for it, than the run's."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if model_path is not None or dtype is not None:
        model = dataclasses.replace(cfg.model, path=model_path or cfg.model.path, dtype=dtype or cfg.model.dtype)
        cfg = dataclasses.replace(cfg, model=model)
    model, base, params = build_model(cfg, run_dir=run_dir)
    if params is None:
        raise LowraxError(f"{run_dir} has no {INIT_FILE}: a run with lora.init={cfg.adapter.init} stores its calibrated "
                          "starting factors there when training starts, and its checkpoints need them")
    trainable, frozen = split(params)
    ckpts = Checkpoints(run_dir / "checkpoints")
    newest = ckpts.latest_step()
    adapter = finished_adapter(run_dir) if step is None else None
    if adapter is not None and (newest is None or summary_steps(run_dir) > newest):
        ckpts.close()  # train.save_every=0: the adapter written at the end is newer than any checkpoint
        trained = load_peft(base, adapter, model)
        return (cfg, model, trained, params) if with_initial else (cfg, model, trained)
    step = newest if step is None else step
    if step is None:
        raise LowraxError(f"{run_dir} holds no checkpoint and no finished adapter (an interrupted run with "
                          "train.save_every=0 keeps nothing to restore)")
    state, _ = ckpts.restore(step, init_state(trainable, make_optimizer(cfg.optim), cfg.train.seed))
    ckpts.close()
    trained = combine(state.trainable, frozen)
    return (cfg, model, trained, params) if with_initial else (cfg, model, trained)


@dataclasses.dataclass
class Adapted:
    """A base model with a trained adapter, ready to generate with."""

    model: object
    params: dict
    tokenizer: object
    chat: bool | None  # what prompts were wrapped in when it was trained (None: the tokenizer's default)
    source: str  # what was loaded, in words


def uses_chat_template(cfg: TrainConfig) -> bool:
    """Whether a run's prompts were wrapped in the chat template (messages data always are, and GRPO's
    conversational prompts and its embedded default)."""
    if cfg.objective == "grpo":
        return cfg.data.chat_template or cfg.data.source == "default" or _grpo_prompts_are_chats(cfg)
    fmt = cfg.data.format
    if fmt == "auto" and cfg.data.source != "default":
        try:
            records, _ = load_records(cfg.data)
            fmt = detect_format(records[0], cfg.data, cfg.model.task) if records else "auto"
        except (LowraxError, OSError):
            pass  # the data moved: fall back to the run's setting
    return fmt == "messages" or (fmt in ("auto", "prompt_response") and cfg.data.chat_template)


def _grpo_prompts_are_chats(cfg: TrainConfig) -> bool:
    try:
        records, _ = load_records(cfg.data)
    except (LowraxError, OSError):
        return False  # the data moved: the run's setting decides
    first = records[0] if records else {}
    return isinstance(first.get(cfg.data.prompt_field), list) or cfg.data.messages_field in first


def load_adapted(path: str | Path, model_path: str | None = None, dtype: str | None = None) -> Adapted:
    """A run directory (its newest checkpoint) or a PEFT adapter directory on its base model.

    The base is the run's model or the one the adapter's config names, unless `model_path`
    gives another copy. A PEFT directory inside a run (`RUN/adapter`) keeps the run's chat setting.
    """
    path = Path(path)
    if (path / "config.yaml").exists():
        cfg, model, params = restore_run(path, model_path=model_path, dtype=dtype)
        return Adapted(model, params, load_preprocessor(cfg.model.path, model), uses_chat_template(cfg), f"run {path}")
    if not (path / CONFIG).exists():
        raise LowraxError(f"{path} is neither a lowrax run directory (config.yaml) nor a PEFT adapter directory "
                          f"({CONFIG} + {WEIGHTS})")
    peft_config = read_adapter_config(path)
    if model_path is None:
        model_path = base_model_path(recorded_base(peft_config), where=f"{path}: ")
    model, base = load_pretrained(model_path, dtype=DTYPES[dtype or "float32"])
    params = load_peft(base, path, model)
    run = path.parent
    chat = uses_chat_template(read_run_config(run)) if (run / "config.yaml").exists() else None
    return Adapted(model, params, load_preprocessor(model_path, model), chat, f"PEFT adapter {path}")


def recorded_base(adapter_config: dict) -> str | None:
    """The base model an adapter directory names: PEFT's base_model_name_or_path, AdapterHub's model_name."""
    return adapter_config.get("base_model_name_or_path", adapter_config.get("model_name") or None)


def export_peft(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a run's adapter in PEFT format: a copy of the run's own `adapter/` when that holds the
    newest checkpoint (no model is loaded), else restored from the newest checkpoint (an
    interrupted run)."""
    run_dir = Path(run_dir)
    check_output(out_dir, overwrite, (run_dir,))
    current = finished_adapter(run_dir)
    if current is not None:
        return write_directory(out_dir, lambda staging: shutil.copytree(
            current, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER)), overwrite, (run_dir,))
    cfg, model, params, initial = restore_run(run_dir, with_initial=True)
    return save_peft(params, out_dir, model, base_model=base_model_name(cfg.model.path), overwrite=overwrite,
                     initial=initial)


def finished_adapter(run_dir: Path) -> Path | None:
    """The run's `adapter/` when nothing newer is checkpointed: written at the end of the run
    (summary.json, written after it, names a step at least as new as the newest checkpoint, or
    there is none: train.save_every=0); None for an interrupted run."""
    adapter, steps = run_dir / "adapter", summary_steps(run_dir)
    if not (adapter / CONFIG).is_file() or steps is None:
        return None
    ckpts = Checkpoints(run_dir / "checkpoints")
    newest = ckpts.latest_step()
    ckpts.close()
    return adapter if steps > 0 and (newest is None or steps >= newest) else None


def summary_steps(run_dir: Path) -> int | None:
    """The steps a run's summary.json records (None without a readable one)."""
    try:
        steps = json.loads((run_dir / "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def merge_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False, requantize: bool = False,
              keep_sparsity: bool = True, log=print) -> Path:
    """Write a run's base with its adapters merged in, as HF safetensors that transformers loads.

    requantize (QLoRA runs): merge into the NF4 bases and save 4-bit weights again, logging
    the rounding error that adds; otherwise NF4 bases are dequantized and saved in full precision.
    keep_sparsity (a pruned base): the merged kernels keep its zeros (the adapter's delta is
    masked there; the output records them in pruning.json) or, False, the delta fills them.
    """
    check_output(out_dir, overwrite, (run_dir, read_run_config(Path(run_dir)).model.path))
    cfg, model, params = restore_run(run_dir)
    records = kernel_records(params)  # a pruned base's pruning.json
    if records and requantize:
        raise LowraxError(f"--requantize over a base that carries {', '.join(records)} (a pruned base) is not "
                          "supported: merge to full precision, then load the merged directory with "
                          "model.quantize=nf4 (its zeros stay exact in NF4)")
    if requantize:
        if cfg.model.quantize is None:
            raise LowraxError(f"{run_dir} is not a QLoRA run (model.quantize is not set); nothing to re-quantize")
        merged, report = merge_requantized(params)
        log(f"re-quantizing the merged weights adds a relative error of up to {report['worst']['relative']:.2e} "
            "(per-module figures in merge_report.json)")
    else:
        merged, report = merge(params, keep_sparsity=keep_sparsity), None
    if is_embedded(cfg.model.path):
        log("note: the embedded base is SmolLM2-135M-Instruct after 4-bit (Q4_1) quantization: the merged float "
            "weights carry that rounding; merge onto the original checkpoint with PEFT to avoid it")
    if records and keep_sparsity:
        log(f"sparsity kept: the adapter's delta is masked where the base was pruned, so the merged layers keep "
            f"its zeros (recorded in {', '.join(records)})")
    elif records:
        log("sparsity filled: the adapter's delta fills the pruned weights; the merged model is dense")
    out = save_hf_directory(merged, model, out_dir, tokenizer=load_preprocessor(cfg.model.path, model),
                            overwrite=overwrite, keep_native=requantize, records=records if keep_sparsity else {})
    if report is not None:
        (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def import_peft(adapter_dir: str | Path, out_dir: str | Path, model_path: str | None = None,
                overrides: list[str] = (), preset: str | Path | None = None) -> Path:
    """Turn a PEFT adapter into a lowrax run directory (config.yaml + checkpoint at step 0) that
    `lowrax train train.output_dir=OUT_DIR` continues and `lowrax export-peft` / `lowrax merge` read.

    The run's settings are the `preset` (a YAML file such as configs/default.yaml; None: the
    dataclass defaults) with the adapter's method and settings, its base model (`model_path`, or
    the one its config names) and `overrides` on top.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if (out_dir / "config.yaml").exists() or (out_dir / "checkpoints").exists():
        raise LowraxError(f"{out_dir} already holds a run; choose a new directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise LowraxError(f"{out_dir} is not empty; import-peft creates a new run directory: choose a new or empty one")
    peft_config = read_adapter_config(adapter_dir)
    method, adapter_cfg = format_for_config(peft_config, where=f"{adapter_dir}: ").to_config(peft_config)
    if model_path is None:
        model_path = base_model_path(recorded_base(peft_config), where=f"{adapter_dir}: ")
    values = read_preset(preset)
    for name in method_names():
        values.pop(name, None)  # the preset's adapter settings give way to the adapter's own
    values.update(method=method, **{method: dataclasses.asdict(adapter_cfg)})
    # the run's task from PEFT's task_type (an override still wins): a T5 or a classifier trains as one
    task = {"SEQ_2_SEQ_LM": "seq2seq", "SEQ_CLS": "classification"}.get(peft_config.get("task_type"))
    values["model"] = {**({"task": task} if task else {}), **values.get("model", {}), "path": model_path}
    values["train"] = {**values.get("train", {}), "output_dir": str(out_dir)}
    cfg = from_dict(apply_overrides(values, list(overrides)))
    model, base, wrapped = build_model(cfg)
    params = load_peft(base, adapter_dir, model)
    trainable, _ = split(params)
    if jax.tree.structure(trainable) != jax.tree.structure(split(wrapped)[0]):
        raise LowraxError(f"{adapter_dir}: its tensors adapt other modules than its adapter_config.json selects; "
                          "lowrax cannot continue training it as a run")
    state = init_state(trainable, make_optimizer(cfg.optim), cfg.train.seed)
    with lock_run_directory(out_dir, "run_dir"):
        ckpts = Checkpoints(out_dir / "checkpoints")
        ckpts.save(0, state, {"step": 0, "examples_seen": 0, "imported_from": str(adapter_dir)})
        ckpts.close()
        write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out_dir
