"""Training configuration: frozen dataclasses, YAML presets, `key=value` overrides.

    cfg = load_config("configs/default.yaml", ["lora.r=8", "train.steps=100"])

Every field has a doc comment; an unknown key anywhere is an error naming the
closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowrax.errors import LowraxError
from lowrax.lora import LoraConfig
from lowrax.optim import OptimizerConfig
from lowrax.parallel import DistConfig
from lowrax.sharding import MeshConfig


@dataclass(frozen=True)
class ModelSection:
    path: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"  # dtype of the frozen base: float32 | bfloat16 (adapters stay float32)
    task: str = "causal_lm"  # causal_lm | classification (encoders with a classification head)
    num_labels: int | None = None  # classification: size of the head (a fresh head is trained in full)
    quantize: str | None = None  # "nf4": QLoRA, the frozen linear weights stored in 4-bit NF4
    quant_blocksize: int = 64  # NF4 block size (a power of two from 32 to 4096)
    double_quant: bool = True  # NF4 double quantization of the block statistics


@dataclass(frozen=True)
class DataSection:
    source: str = "default"  # "default" (the embedded date task), a JSON/JSONL/CSV/text file, or a save_to_disk directory
    format: str = "auto"  # auto | prompt_response | messages | text | classification
    prompt_field: str = "prompt"  # prompt_response: the field with the prompt
    response_field: str = "response"  # prompt_response: the field with the target text
    messages_field: str = "messages"  # messages: a list of {"role", "content"} rendered with the chat template
    text_field: str = "text"  # text / classification: the input text
    label_field: str = "label"  # classification: an integer label
    chat_template: bool = False  # prompt_response: wrap the prompt in the tokenizer's chat template
    seq_len: int = 64  # tokens per row (longer examples are truncated)
    packing: bool = False  # pack several examples per row (attention never crosses examples)
    loss_positions: int = 0  # compute logits only at this many loss positions per row (0: at every position)
    eval_fraction: float = 0.05  # share of the data held out for evaluation (when eval_source is not set)
    eval_source: str | None = None  # a separate evaluation file or directory
    shuffle_seed: int = 0  # seed of the per-epoch shuffles
    default_train_examples: int = 2000  # size of the generated default task's training set
    default_eval_examples: int = 64  # size of its held-out set


@dataclass(frozen=True)
class TrainSection:
    steps: int = 30  # optimizer steps
    batch_size: int = 16  # examples (or packed rows) per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    remat: bool = False  # keep only each layer's input; the backward pass recomputes the rest (less memory, ~1 more forward)
    seed: int = 0  # adapter init and dropout
    output_dir: str = "runs/default"  # checkpoints, PEFT adapter, metrics.jsonl, loss curve
    save_every: int = 10  # steps between checkpoints (0: only at the end)
    max_checkpoints: int = 2  # checkpoints kept
    eval_every: int = 0  # steps between eval-loss measurements (0: only at the end)
    eval_max_new_tokens: int = 16  # generation budget when scoring the task metric
    eval_examples: int = 64  # held-out examples scored by the task metric (0: skip the metric)
    samples: int = 3  # sample generations printed before and after training
    resume: bool = True  # continue from the latest checkpoint in output_dir if there is one


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshConfig = field(default_factory=MeshConfig)  # device mesh: data x fsdp x tensor
    dist: DistConfig = field(default_factory=DistConfig)  # several processes (hosts): jax.distributed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_SECTION_CLASSES = {"model": ModelSection, "lora": LoraConfig, "optim": OptimizerConfig, "data": DataSection,
                    "train": TrainSection, "mesh": MeshConfig, "dist": DistConfig}
# Fields that may change when a run is resumed (they do not change what the steps compute).
RESUMABLE = {"train.steps", "train.save_every", "train.max_checkpoints", "train.eval_every", "train.samples",
             "train.eval_examples", "train.eval_max_new_tokens", "train.resume", "train.output_dir", "optim.total_steps",
             "mesh.data", "mesh.fsdp", "mesh.tensor", "dist.coordinator_address", "dist.num_processes",
             "dist.process_id", "dist.local_device_ids"}


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def _unknown(key: str) -> LowraxError:
    close = difflib.get_close_matches(key, _valid_keys() + list(_SECTION_CLASSES), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; sections: {', '.join(_SECTION_CLASSES)}"
    return LowraxError(f"unknown config key {key!r}{hint}")


def from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from nested dicts, rejecting unknown sections and keys."""
    sections = {}
    for name, body in (values or {}).items():
        if name not in _SECTION_CLASSES:
            raise _unknown(name)
        if not isinstance(body, dict):
            raise LowraxError(f"config section {name!r} must be a mapping, got {type(body).__name__}")
        cls = _SECTION_CLASSES[name]
        names = {f.name for f in dataclasses.fields(cls)}
        for key in body:
            if key not in names:
                raise _unknown(f"{name}.{key}")
        try:
            sections[name] = cls(**body)
        except TypeError as e:
            raise LowraxError(f"config section {name!r}: {e}") from e
    cfg = TrainConfig(**sections)
    if "total_steps" not in (values or {}).get("optim", {}):
        # The schedule spans the run unless set explicitly.
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, total_steps=max(cfg.train.steps, cfg.optim.warmup_steps)))
    return cfg


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to nested dicts."""
    out = {k: dict(v) for k, v in (values or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise LowraxError(f"override {item!r} must look like section.key=value (e.g. lora.r=8)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise LowraxError(f"override key {key!r} must be section.key (e.g. train.steps)")
        section, name = parts
        if section not in _SECTION_CLASSES or name not in {f.name for f in dataclasses.fields(_SECTION_CLASSES[section])}:
            raise _unknown(key)
        out.setdefault(section, {})[name] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML preset (None: all defaults) and apply `key=value` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LowraxError(f"config file {p} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise LowraxError(f"{p} must hold a mapping of sections (model, lora, optim, data, train, mesh, dist)")
    return from_dict(apply_overrides(values, list(overrides)))


def flatten(cfg_dict: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, body in cfg_dict.items() for k, v in body.items()}


def differences(saved: dict, current: dict) -> list[str]:
    """Keys (other than RESUMABLE ones) whose values differ between two config dicts."""
    a, b = flatten(saved), flatten(current)
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE and _norm(a.get(k)) != _norm(b.get(k)))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
