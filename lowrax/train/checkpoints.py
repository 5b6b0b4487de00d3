"""Training checkpoints with orbax: trainable params, optimizer state, step, RNG and data position.

Only the trainable half is saved (the frozen base is reloaded from the
pretrained checkpoint), so an adapter checkpoint is small. Orbax writes each
step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint that would be resumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

# orbax logs every save at WARNING through absl; keep the training progress bar readable.
absl_logging.set_verbosity(absl_logging.ERROR)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Checkpoints:
    """Numbered checkpoints in `directory`, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> int:
        """Save and wait; returns the checkpoint's size in bytes."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                           force=True)
        self._manager.wait_until_finished()
        return self.size(step)

    def size(self, step: int | None) -> int:
        """Bytes on disk of checkpoint `step` (0 for None)."""
        return 0 if step is None else directory_size(self.directory / str(step))

    def restore(self, step: int, template: Any) -> tuple[Any, dict]:
        """(state shaped like `template`, meta dict) of checkpoint `step`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_newest_intact(self, template: Any, warn) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores; a damaged newer one (truncated,
        emptied, garbage) is moved aside to `damaged-checkpoints/` with a warning naming both steps, so
        nothing is deleted and later saves reuse its number. None when there is no checkpoint."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(step, template)
                return step, state, meta
            except Exception as e:  # orbax and tensorstore raise many kinds for a damaged directory
                aside = self.directory.parent / "damaged-checkpoints" / str(step)
                aside.parent.mkdir(exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.directory / str(step)), aside)
                self._manager.reload()
                older = f"step {steps[i + 1]}" if i + 1 < len(steps) else "none left: the run starts over"
                warn(f"warning: checkpoint step {step} in {self.directory} is damaged ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:160] if str(e) else 'unreadable'}); moved it to {aside}; "
                     f"falling back to {older}")
        return None

    def close(self) -> None:
        self._manager.close()
