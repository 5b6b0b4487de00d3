"""Training configuration: frozen dataclasses, YAML presets, `key=value` overrides.

    cfg = load_config("configs/default.yaml", ["lora.r=8", "train.steps=100"])
    cfg = load_config(None, ["method=ia3", "ia3.target_modules=[k_proj,v_proj,down_proj]"])

`method` names a registered adapter method (`lowrax.method_names()`); its settings
are the section of the same name (`lora:`, `ia3:`), parsed by the method's config class.

Every field has a doc comment; an unknown key anywhere is an error naming the
closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from lowrax.adapters.lora.config import LoraConfig
from lowrax.adapters.registry import method_for_config, method_named, method_names
from lowrax.core.checked import (Bound, Checked, ConfigValueError, Count, OneOf, PositiveInt, PowerOfTwo,
                                 Probability, owner_name)
from lowrax.core.kernels import quant_methods
from lowrax.quant import tree as _quant_tree  # noqa: F401  (registers the nf4 and int8 quantizers)
from lowrax.errors import LowraxError
from lowrax.objectives.config import DistillSection, GRPOSection, PreferenceSection
from lowrax.objectives.registry import check_objective
from lowrax.train.tasks import task_named
from lowrax.train.optim import OptimizerConfig
from lowrax.dist.parallel import DistConfig
from lowrax.dist.sharding import MeshConfig


class _ConfigLoader(yaml.SafeLoader):
    """YAML as configs mean it: `3e-4` is a float (YAML 1.1, which PyYAML follows, wants `3.0e-4`)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _refuse_duplicate_keys(loader: _ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML lets a repeated key silently replace the first one."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:
            continue  # an unhashable key: the constructor's own error names it
        if first != key_node.start_mark.line + 1:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given on line {first})",
                                                    key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_ConfigLoader.construct_mapping = _refuse_duplicate_keys


def load_yaml(text: str):
    """A config file's or override's value, parsed as YAML with floats such as 1e-3 read as floats
    and repeated keys refused."""
    return yaml.load(text, Loader=_ConfigLoader)


def read_yaml_file(path: str | Path, what: str = "config file"):
    """A YAML file's content, or one error naming the file and what is wrong with it (missing, a
    directory, not UTF-8 text, a syntax error at line:column, a repeated key)."""
    p = Path(path)
    if not p.exists():
        raise LowraxError(f"{what} {p} does not exist")
    if p.is_dir():
        raise LowraxError(f"{what} {p} is a directory; expected a YAML file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowraxError(f"{what} {p} is not UTF-8 text (byte {e.start}); expected a YAML file") from None
    except OSError as e:
        raise LowraxError(f"cannot read {what} {p}: {e.strerror}") from None
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise LowraxError(f"{where}: {e.problem or e.context} (not valid YAML)") from None
    except yaml.YAMLError as e:
        raise LowraxError(f"{p}: not valid YAML ({e})") from None


def override_value(key: str, raw: str):
    """An override's value parsed as YAML, or an error naming the override."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LowraxError(f"override {key}={raw!r}: the value is not valid YAML ({problem}); quote a string "
                          f"value, e.g. {key}='\"...\"'") from None


DTYPE_NAMES = ("float32", "bfloat16", "float16")
FORMATS = ("prompt_response", "messages", "text", "classification", "seq2seq", "image_classification")


@dataclass(frozen=True)
class ModelSection(Checked):
    section_name = "model"

    path: str | None = None  # HF directory or .gguf file; None = the embedded SmolLM2-135M-Instruct (its Q4_1 GGUF, dequantized)
    dtype: Annotated[str, OneOf(DTYPE_NAMES)] = "float32"  # dtype of the frozen base (adapters stay float32)
    task: str = "causal_lm"  # causal_lm | classification (text or image encoders with a classification head) | seq2seq (T5)
    num_labels: Annotated[int, Bound(low=2)] | None = None  # classification: size of a fresh head, trained in full (None: 1 + the largest training label)
    quantize: str | None = None  # "nf4": QLoRA, the frozen linear weights in 4-bit NF4; "int8": in 8-bit rows (LLM.int8())
    quant_blocksize: Annotated[int, PowerOfTwo(), Bound(32, 4096)] = 64  # NF4 block size
    double_quant: bool = True  # NF4 double quantization of the block statistics

    def __post_init__(self):
        super().__post_init__()
        if self.quantize is not None and self.quantize not in quant_methods():
            raise ConfigValueError(owner_name(self), "quantize", self.quantize,
                                   f"null or one of {', '.join(quant_methods())}")


@dataclass(frozen=True)
class DataSection(Checked):
    section_name = "data"

    source: str = "default"  # "default" (the embedded date task), "embedded_text" (Python's docs, as `lowrax prune` uses), a JSON/JSONL/CSV/text file, or a save_to_disk directory
    format: Annotated[str, OneOf(("auto",) + FORMATS)] = "auto"  # auto: from the first record's fields
    prompt_field: str = "prompt"  # prompt_response: the field with the prompt
    response_field: str = "response"  # prompt_response: the field with the target text
    messages_field: str = "messages"  # messages: a list of {"role", "content"} rendered with the chat template
    text_field: str = "text"  # text / classification: the input text
    image_field: str = "image"  # image_classification: an image (a path, or a `datasets` Image column)
    input_field: str = "input"  # seq2seq: the encoder's input text
    target_field: str = "target"  # seq2seq: the text the decoder is trained to produce
    label_field: str = "label"  # classification: an integer label; kto: true for a desirable completion
    chosen_field: str = "chosen"  # dpo/orpo/simpo: the preferred completion (a string or messages)
    rejected_field: str = "rejected"  # dpo/orpo/simpo: the dispreferred completion
    completion_field: str = "completion"  # kto: the completion its label judges
    chat_template: bool = False  # prompt_response: wrap the prompt in the tokenizer's chat template
    seq_len: Annotated[int, Bound(low=2)] = 64  # tokens per row (longer examples are truncated); seq2seq: the encoder's input
    target_len: PositiveInt = 32  # seq2seq: decoder tokens per row (the target and its EOS; longer ones are truncated)
    packing: bool = False  # pack several examples per row (attention never crosses examples)
    # A training batch is cut to the narrowest width that holds its rows (the padding is never attended): at
    # most three widths of 16, 24, 32, 48, 64, ... (up to seq_len), planned from the run's batches.
    trim_padding: bool = True
    text_eos: bool = True  # text: end each record with the end-of-text token (false: records are fragments of one text)
    loss_positions: Count = 0  # compute logits only at this many loss positions per row (0: at every position)
    eval_fraction: Probability = 0.05  # share of the data held out for evaluation (when eval_source is not set)
    eval_source: str | None = None  # a separate evaluation file or directory
    shuffle_seed: Count = 0  # seed of the per-epoch shuffles
    default_train_examples: PositiveInt = 2000  # size of the generated default task's training set
    default_eval_examples: Count = 64  # size of its held-out set


@dataclass(frozen=True)
class TrainSection(Checked):
    section_name = "train"

    steps: Count = 30  # optimizer steps (0: score the model as training would start it, train nothing)
    # Passes over the training data; when set, train.steps is derived from it: epochs x rows per epoch
    # / (batch_size x grad_accum_steps), rounded up (the last batch is completed from the next shuffle).
    epochs: Annotated[int, Bound(low=1)] | None = None
    batch_size: PositiveInt = 16  # examples (or packed rows) per micro-batch
    grad_accum_steps: PositiveInt = 1  # micro-batches per optimizer step
    remat: bool = False  # keep only each layer's input; the backward pass recomputes the rest (less memory, ~1 more forward)
    # The model config's own dropout (BERT's hidden_dropout_prob, GPT-2's resid_pdrop, ...) in training
    # steps, as transformers applies it in train mode; false: the model trains as in eval mode.
    model_dropout: bool = True
    seed: Count = 0  # adapter init and dropout
    output_dir: str = "runs/default"  # checkpoints, PEFT adapter, metrics.jsonl, loss curve
    # Steps between checkpoints (the last step is always saved); 0: no checkpoints, only the adapter at the
    # end (an interrupted run starts over).
    save_every: Count = 10
    max_checkpoints: PositiveInt = 2  # checkpoints kept
    eval_every: Count = 0  # steps between eval-loss measurements (0: only at the end)
    eval_max_new_tokens: PositiveInt = 16  # generation budget when scoring the task metric
    eval_examples: Count = 64  # held-out examples scored by the task metric (0: skip the metric)
    samples: Count = 3  # sample generations printed before and after training
    # For quick experiments: no scoring before training and no sample generations (the held-out loss
    # and metric after training are still measured; train.eval_examples=0 skips the metric too).
    quick: bool = False
    resume: bool = True  # continue from the latest checkpoint in output_dir if there is one
    # A step whose loss or gradient is NaN or infinite: "stop" the run with an error naming the step (the
    # last checkpoint stays the newest), or "skip" its update and count it in metrics.jsonl ("skipped").
    nonfinite: Annotated[str, OneOf(("stop", "skip"))] = "stop"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: str = "lora"  # the adapter method (lowrax.method_names()); its settings are the section named after it
    objective: str = "sft"  # a registered objective (lowrax.objectives.registry): sft | dpo | orpo | simpo | kto | distill | grpo
    adapter: Any = field(default_factory=LoraConfig)  # the method's config: LoraConfig, IA3Config, ...
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)  # dpo, orpo, simpo, kto
    distill: DistillSection = field(default_factory=DistillSection)  # objective: distill
    grpo: GRPOSection = field(default_factory=GRPOSection)  # objective: grpo
    mesh: MeshConfig = field(default_factory=MeshConfig)  # device mesh: data x fsdp x tensor
    dist: DistConfig = field(default_factory=DistConfig)  # several processes (hosts): jax.distributed

    def __post_init__(self):
        task_named(self.model.task)
        check_objective(self)
        expected = method_named(self.method).config
        if type(self.adapter) is not expected:
            raise LowraxError(f"method {self.method!r} takes a {expected.__name__}, got {type(self.adapter).__name__} "
                              f"(a {method_for_config(self.adapter).name!r} config)")
        self._check_lora_init()

    def _check_lora_init(self) -> None:
        init = getattr(self.adapter, "init", None)
        if init in ("corda", "eva", "lora_ga") and self.objective != "sft":
            raise LowraxError(f"lora.init={init} calibrates on the run's training batches, which objective "
                              f"{self.objective!r} does not have in that form: use objective sft, or calibrate in "
                              "Python (lowrax.lora.calibrate) and train from the wrapped params")
        if init == "loftq" and self.model.quantize is not None:
            raise LowraxError("lora.init=loftq quantizes the targeted weights itself (NF4 with lora.loftq_bits=4, "
                              "int8 with 8): leave model.quantize unset")

    @property
    def lora(self) -> LoraConfig:
        """The LoRA settings of a `method: lora` run (code written before `method` existed reads them here)."""
        if not isinstance(self.adapter, LoraConfig):
            raise LowraxError(f"this run's method is {self.method!r}, not lora; its settings are cfg.adapter")
        return self.adapter

    def to_dict(self) -> dict:
        """Nested dicts as in the YAML files: the adapter's section is named after the method."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "adapter":
                out[self.method] = dataclasses.asdict(value)
            else:
                out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return out


_SECTION_CLASSES = {"model": ModelSection, "optim": OptimizerConfig, "data": DataSection,
                    "train": TrainSection, "preference": PreferenceSection, "distill": DistillSection,
                    "grpo": GRPOSection, "mesh": MeshConfig, "dist": DistConfig}
TOP_LEVEL = ("method", "objective")  # plain values beside the sections
# Fields that may change when a run is resumed (they do not change what the steps compute).
RESUMABLE = {"train.steps", "train.save_every", "train.max_checkpoints", "train.eval_every", "train.samples", "train.quick", "train.epochs",
             "train.eval_examples", "train.eval_max_new_tokens", "train.resume", "train.output_dir", "train.nonfinite", "optim.total_steps",
             "mesh.data", "mesh.fsdp", "mesh.tensor", "dist.coordinator_address", "dist.num_processes",
             "dist.process_id", "dist.local_device_ids"}


def _section_classes() -> dict[str, type]:
    """Every section a config may hold: the fixed ones and one per registered method."""
    return {**_SECTION_CLASSES, **{name: method_named(name).config for name in method_names()}}


def _valid_keys() -> list[str]:
    return list(TOP_LEVEL) + [f"{s}.{f.name}" for s, cls in _section_classes().items() for f in dataclasses.fields(cls)]


def unknown_key(key: str, valid_keys: list[str], sections: list[str], what: str = "config key") -> LowraxError:
    """The error for an unknown config key, naming the closest valid key (or the sections)."""
    # A close spelling in the key's own section first (`lora.lora_alpha` -> `lora.alpha`), then the same key
    # name in another section (`steps` -> `train.steps`), then the closest spelling anywhere.
    section = key.rsplit(".", 1)[0] + "." if "." in key else None
    own = [k for k in valid_keys if section and k.startswith(section)]
    same_name = [k for k in valid_keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and k != key]
    close = (difflib.get_close_matches(key, own, n=1, cutoff=0.75) or same_name[:1]
             or difflib.get_close_matches(key, valid_keys + sections, n=1, cutoff=0.5))
    hint = f"; did you mean {close[0]!r}?" if close else f"; sections: {', '.join(sections)}"
    return LowraxError(f"unknown {what} {key!r}{hint}")


def _unknown(key: str) -> LowraxError:
    return unknown_key(key, _valid_keys(), list(_section_classes()))


def from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from nested dicts, rejecting unknown sections and keys."""
    values = dict(values or {})
    method = _method_name(values.pop("method", "lora"))
    objective = values.pop("objective", "sft")
    classes = _section_classes()
    sections = {}
    for name, body in values.items():
        if name not in classes:
            raise _unknown(name)
        if name in method_names() and name != method:
            raise LowraxError(f"config section {name!r} configures method {name!r}, but method is {method!r}; "
                              f"set method: {name} (or drop the section)")
        if not isinstance(body, dict):
            raise LowraxError(f"config section {name!r} must be a mapping, got {type(body).__name__}")
        cls = classes[name]
        names = {f.name for f in dataclasses.fields(cls)}
        for key in body:
            if key not in names:
                raise _unknown(f"{name}.{key}")
        try:
            sections["adapter" if name == method else name] = cls(**body)
        except ConfigValueError as e:
            raise e.named(name) from None
        except TypeError as e:
            raise LowraxError(f"config section {name!r}: {e}") from e
    if "adapter" not in sections:  # the method's defaults (a method without them says which key to set)
        try:
            sections["adapter"] = method_named(method).config()
        except ConfigValueError as e:
            raise e.named(method) from None
    cfg = TrainConfig(method=method, objective=objective, **sections)
    if "total_steps" not in values.get("optim", {}):
        # The schedule spans the run unless set explicitly.
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
            cfg.optim, total_steps=schedule_length(cfg.train.steps, cfg.optim.warmup_steps)))
    return cfg


def schedule_length(steps: int, warmup_steps: int) -> int:
    """optim.total_steps when not set apart: the run's steps (at least the warmup, and one step for a
    run that only scores, train.steps=0)."""
    return max(steps, warmup_steps, 1)


def with_steps(cfg: TrainConfig, steps: int) -> TrainConfig:
    """cfg with train.steps = `steps`; a schedule that followed the old steps follows the new ones."""
    optim = cfg.optim
    if optim.total_steps == schedule_length(cfg.train.steps, optim.warmup_steps):
        optim = dataclasses.replace(optim, total_steps=schedule_length(steps, optim.warmup_steps))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps), optim=optim)


def _method_name(method):
    if not isinstance(method, str):
        raise LowraxError(f"config key 'method' must be a method name ({', '.join(method_names())}), got {method!r}")
    method_named(method)  # an unknown name is an error listing the registered ones
    return method


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to nested dicts.

    `method=NAME` switches the adapter method: the sections of other methods that came
    with `values` (a preset written for LoRA) are dropped; one set by an override stays,
    and is an error of `from_dict`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    overridden = set()
    for item in overrides:
        key, parts, raw = override_parts(item, "lora.r=8")
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            out[parts[0]] = override_value(key, raw)
            overridden.add(parts[0])
            continue
        if len(parts) == 1:
            raise _unknown(key)
        if len(parts) != 2:
            raise LowraxError(f"override key {key!r} must be section.key (e.g. train.steps)")
        section, name = parts
        classes = _section_classes()
        if section not in classes or name not in {f.name for f in dataclasses.fields(classes[section])}:
            raise _unknown(key)
        out.setdefault(section, {})[name] = override_value(key, raw)
        overridden.add(section)
    if "method" in overridden:
        for stale in set(method_names()) - {_method_name(out["method"])} - overridden:
            out.pop(stale, None)
    return out


def override_parts(item: str, example: str) -> tuple[str, list[str], str]:
    """(key, its dot-separated parts, raw value) of a `key=value` override; example: one for the error."""
    if "=" not in item:
        raise LowraxError(f"override {item!r} must look like section.key=value (e.g. {example})")
    key, raw = item.split("=", 1)
    return key.strip(), key.strip().split("."), raw


def read_preset(path: str | Path | None) -> dict:
    """A YAML preset's sections as plain dicts (None: none, i.e. all defaults)."""
    if path is None:
        return {}
    p = Path(path)
    values = read_yaml_file(p) or {}
    if not isinstance(values, dict):
        raise LowraxError(f"{p} must hold a mapping of sections (model, method, objective, lora, optim, data, train, "
                          "preference, distill, grpo, mesh, dist)")
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML preset (None: all defaults) and apply `key=value` overrides."""
    return from_dict(apply_overrides(read_preset(path), list(overrides)))


def load_run_config(run_dir: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A run directory's own `config.yaml` with `overrides` on top (what `lowrax train` continues
    when no preset is given). A schedule whose length followed `train.steps` follows a new
    `train.steps` too, so extending a finished run trains its new steps on a live schedule."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise LowraxError(f"{run_dir} is not a lowrax run directory: it has no config.yaml")
    values = read_yaml_file(path, "run config") or {}
    if not isinstance(values, dict):
        raise LowraxError(f"{path} must hold a mapping of sections; the run's config is damaged")
    optim, train = values.get("optim") or {}, values.get("train") or {}
    if not isinstance(optim, dict) or not isinstance(train, dict):
        raise LowraxError(f"{path}: sections optim and train must be mappings; the run's config is damaged")
    if optim.get("total_steps") == schedule_length(train.get("steps", 0), optim.get("warmup_steps", 0)):
        optim.pop("total_steps")
    return from_dict(apply_overrides(values, list(overrides)))


def flatten(cfg_dict: dict) -> dict[str, Any]:
    """{"section.key": value}; top-level plain values (`method`) keep their own name."""
    out = {}
    for s, body in cfg_dict.items():
        if isinstance(body, dict):
            out.update({f"{s}.{k}": v for k, v in body.items()})
        else:
            out[s] = body
    return out


def differences(saved: dict, current: dict) -> list[str]:
    """Keys (other than RESUMABLE ones) whose values differ between two config dicts
    (a run saved before `method` existed was a LoRA run)."""
    a = flatten({"method": "lora", "objective": "sft", **saved})
    b = flatten({"method": "lora", "objective": "sft", **current})
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE and _norm(a.get(k)) != _norm(b.get(k)))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
