"""The teacher of a distillation run (`objective: distill`): loaded once, frozen, merged.

`distill.teacher` names a lowrax run directory (its base model and trained adapter: the
default distils the fine-tuned default run), or an HF directory / .gguf file, optionally
with a PEFT adapter (`distill.teacher_adapter`). The teacher must share the student's
tokenizer: distillation compares next-token distributions position by position.
"""

from __future__ import annotations

from pathlib import Path

from lowrax.adapters.tree import merge
from lowrax.errors import LowraxError
from lowrax.models.pretrained import load_pretrained, load_tokenizer
from lowrax.train.config import TrainConfig


def _teacher_source(cfg: TrainConfig) -> tuple[str | None, Path | None, str]:
    """(model path, adapter directory or None, description) of a teacher that is not a run directory."""
    d = cfg.distill
    source = Path(d.teacher).expanduser()
    if not source.exists():
        hint = (" (the default teacher is the fine-tuned default run: train it first with "
                "`lowrax train configs/default.yaml`)" if d.teacher == "runs/default" else "")
        raise LowraxError(f"distill.teacher {source} does not exist; expected a lowrax run directory, an HF model "
                          f"directory or a .gguf file{hint}")
    adapter = Path(d.teacher_adapter).expanduser() if d.teacher_adapter else None
    return str(source), adapter, str(source) + (f" + adapter {adapter}" if adapter else "")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, where: str) -> None:
    """Refuse a teacher whose vocabulary differs from the student's."""
    mine, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if mine != theirs:
        differing = len(set(mine.items()) ^ set(theirs.items()))
        raise LowraxError(f"the teacher ({where}) has a different tokenizer from the student's ({len(theirs)} vs "
                          f"{len(mine)} tokens, {differing} entries differ): distillation compares next-token "
                          "distributions position by position and needs one tokenizer")


def load_teacher(cfg: TrainConfig, student_tokenizer, dtype, mesh=None):
    """(teacher model, its merged frozen params, description). A run directory brings its base
    and the adapter (and classifier head) of its newest checkpoint."""
    from lowrax.adapters.named.exchange import load_peft
    from lowrax.train.runs import read_run_config, restore_run

    run = Path(cfg.distill.teacher).expanduser()
    if (run / "config.yaml").exists():
        if cfg.distill.teacher_adapter:
            raise LowraxError("distill.teacher_adapter goes with an HF or GGUF teacher; a run directory brings its own")
        path, where = read_run_config(run).model.path, f"run {run} (its base + adapter)"
        check_same_tokenizer(student_tokenizer, load_tokenizer(path), where)
        _, model, params = restore_run(run)
    else:
        path, adapter, where = _teacher_source(cfg)
        check_same_tokenizer(student_tokenizer, load_tokenizer(path), where)
        model, params = load_pretrained(path, dtype=dtype, mesh=mesh)
        if adapter is not None:
            params = load_peft(params, adapter, model)
    try:
        params = merge(params)  # a plain tree: the teacher's forward costs what its base costs
    except LowraxError:
        pass  # prompt learning and bottleneck adapters stay unmerged and run as they are
    return model, params, where
