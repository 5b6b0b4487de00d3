"""`lowrax train --help-config`: every key of a training config with its value, its form and what
it does, written as a YAML preset (each note a comment) so the output can be saved and edited."""

from __future__ import annotations

import dataclasses

import yaml

from lowrax.adapters.registry import method_names
from lowrax.core.field_notes import field_rows
from lowrax.objectives.registry import objective_names
from lowrax.train.config import TrainConfig
from lowrax.train.tasks import task_names

HEADER = """\
# Every key of `lowrax train`, with the value the command would use here (the defaults, or a preset with
# its overrides), its form in [brackets], and what it does. Give keys as section.key=value overrides
# (lowrax train train.steps=100 lora.r=8) or save this output as a preset and edit it
# (lowrax train my.yaml). The method's own section is named after it: `method=ia3` reads `ia3:`.
"""


def config_reference(cfg: TrainConfig) -> str:
    """The YAML text described above for `cfg`."""
    lines = [HEADER]
    lines.append(_line("method", cfg.method, "one of " + ", ".join(method_names()),
                       "the adapter method; its settings are the section of that name", 0))
    lines.append(_line("objective", cfg.objective, "one of " + ", ".join(objective_names()),
                       "what the step optimizes (sft: next-token or label cross-entropy)", 0))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if not dataclasses.is_dataclass(value):
            continue
        section = cfg.method if field.name == "adapter" else field.name
        lines.append(f"\n{section}:")
        for name, current, form, note in field_rows(value):
            if section == "model" and name == "task":
                form = "one of " + ", ".join(task_names())
            lines.append(_line(name, current, form, note, 2))
    return "\n".join(lines) + "\n"


def _line(name: str, value, form: str, note: str, indent: int) -> str:
    shown = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip()
    shown = shown.removesuffix("\n...").strip()
    comment = f"[{form}] {note}".strip() if form else note
    return f"{' ' * indent}{name}: {shown}" + (f"  # {comment}" if comment else "")


def _plain(value):
    """A value as YAML writes it: tuples as lists, nested dataclasses as mappings."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
