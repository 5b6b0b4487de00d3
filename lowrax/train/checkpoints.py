"""Training checkpoints with orbax: trainable params, optimizer state, step, RNG and data position.

Only the trainable half is saved (the frozen base is reloaded from the
pretrained checkpoint), so an adapter checkpoint is small. Orbax writes each
step into a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint that would be resumed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from lowrax.errors import LowraxError

# orbax logs every save at WARNING through absl; keep the training progress bar readable.
absl_logging.set_verbosity(absl_logging.ERROR)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax reports a failed write from each of its threads, with tracebacks, and leaves write
    callbacks whose event loop is closed (each prints 'Event loop is closed' when it runs or is
    collected, now or at exit). Those are dropped, and only those: the error raised by `save` says
    what failed, once."""
    previous_verbosity, previous_hook = absl_logging.get_verbosity(), sys.unraisablehook
    absl_logging.set_verbosity(absl_logging.FATAL)
    if not getattr(previous_hook, "drops_orbax_leftovers", False):
        sys.unraisablehook = _without_orbax_leftovers(previous_hook)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous_verbosity)


def _without_orbax_leftovers(hook):
    def filtered(unraisable):
        error, source = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        orbax_coroutine = "orbax" in getattr(source, "co_filename", "")
        if not (closed_loop or orbax_coroutine and isinstance(error, ImportError)):
            hook(unraisable)

    filtered.drops_orbax_leftovers = True
    return filtered


class _OrbaxWriteEchoes(logging.Filter):
    """After a failed save, orbax's own reports of the same failure from the threads and tasks it abandoned,
    which may come after `save` has raised its one error (and after `_orbax_quiet` has ended): absl's
    `logging.exception` from orbax's writer threads, and asyncio's 'Task exception was never retrieved' for
    its write tasks when they are collected or at exit."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            return False
        message = record.getMessage()
        return not ("Task exception was never retrieved" in message and "orbax" in message)


_ORBAX_WRITE_ECHOES = _OrbaxWriteEchoes()
_ECHO_LOGGERS = ("absl", "asyncio")  # the loggers those reports go through


def _write_failure(error: Exception) -> str:
    """The operating system's reason for a failed checkpoint write, else the error's first line."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    code = re.search(r"os_error_code='?(\d+)", str(error))  # tensorstore's form
    return os.strerror(int(code.group(1))) if code else (str(error).splitlines() or [type(error).__name__])[0][:200]


class Checkpoints:
    """Numbered checkpoints in `directory`, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._opened = None

    @property
    def _manager(self) -> ocp.CheckpointManager:
        """Opened at the first use that needs it (orbax creates the directory): a run that saves nothing
        (train.save_every=0) leaves no empty checkpoints/ behind."""
        if self._opened is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep)
            self._opened = ocp.CheckpointManager(self.directory, options=options)
        return self._opened

    def latest_step(self) -> int | None:
        return self._manager.latest_step() if self.directory.is_dir() else None

    def save(self, step: int, state: Any, meta: dict) -> int:
        """Save and wait; returns the checkpoint's size in bytes. A failed write (a full disk, a quota)
        removes its partial directory and is one error naming the reason and the step a rerun resumes from."""
        try:
            with _orbax_quiet():
                self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)), force=True)
                self._manager.wait_until_finished()
        except Exception as e:  # orbax and tensorstore report a failed write as OSError, ValueError, ...
            for name in _ECHO_LOGGERS:  # for as long as its threads and tasks may live
                logging.getLogger(name).addFilter(_ORBAX_WRITE_ECHOES)
            gc.collect()  # the abandoned write coroutines, while the filter above is in place
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            self._manager.reload()
            newest = self._manager.latest_step()
            resume = f"a rerun resumes from step {newest}" if newest is not None else "no checkpoint is saved yet"
            raise LowraxError(f"could not save checkpoint step {step} in {self.directory}: {_write_failure(e)}; "
                              f"{resume}") from e
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
        steps = sorted(self._manager.all_steps(), reverse=True) if self.directory.is_dir() else []
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
        if self._opened is not None:
            self._opened.close()
