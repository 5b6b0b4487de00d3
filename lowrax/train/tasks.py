"""Model tasks by name (`model.task`): which models can train each, what a run adds to the
model and to the adapter config for it. `lowrax train` looks the task up here; the step's
loss follows the model itself (lowrax.train.step.task_loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from lowrax.core.registry import Registry
from lowrax.errors import LowraxError


@dataclass(frozen=True)
class Task:
    name: str
    refuses: Callable[[Any], str | None]  # (model) -> why the model cannot train this task, or None
    # (model, params, cfg, key) -> (model, params): what the task adds to a loaded model (a classification head)
    prepare: Callable[..., tuple] = lambda model, params, cfg, key: (model, params)
    # (adapter config) -> adapter config: what the task asks of every method (a head trained in full)
    adapter_defaults: Callable[[Any], Any] = lambda adapter_cfg: adapter_cfg


_TASKS: Registry[Task] = Registry("task", "model.task must be one of {names}, got {name!r}")


def register_task(task: Task) -> Task:
    return _TASKS.register(task.name, task)


def task_names() -> list[str]:
    return _TASKS.names()


def task_named(name: str) -> Task:
    return _TASKS[name]


def _causal_refusal(model) -> str | None:
    if model.is_seq2seq:
        return f"{model.model_type} is an encoder-decoder: train it with model.task=seq2seq"
    if not model.is_causal_lm:
        return f"model.task=causal_lm needs a causal LM; {model.model_type} is an encoder"
    return None


def _with_head(model, params, cfg, key):
    if "classifier" in params:
        return model, params
    if not cfg.model.num_labels:
        raise LowraxError("model.task=classification on an encoder without a head needs model.num_labels")
    return model.with_classification_head(params, cfg.model.num_labels, key)


def _head_trained(adapter_cfg):
    return adapter_cfg if adapter_cfg.modules_to_save else dataclasses.replace(adapter_cfg, modules_to_save=("classifier",))


register_task(Task("causal_lm", _causal_refusal))
register_task(Task("classification", lambda model: None if model.classifies else
                   f"model.task=classification needs an encoder (bert, roberta, vit); got {model.model_type}",
                   prepare=_with_head, adapter_defaults=_head_trained))
register_task(Task("seq2seq", lambda model: None if model.is_seq2seq else
                   f"model.task=seq2seq needs an encoder-decoder (t5); got {model.model_type}"))
