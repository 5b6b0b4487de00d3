"""Exceptions lowrax raises for bad input.

Each one carries a message that names the offending thing and the expected
form, so a user can fix the input without reading lowrax's source.
"""

from __future__ import annotations


class LowraxError(ValueError):
    """Base class: a user-facing input problem (a subclass of ValueError).

    `cli`: the same message in the command line's spelling, where the Python
    API's differs (`--overwrite` for `overwrite=True`); `for_cli()` returns it.
    """

    def __init__(self, message: str, *, cli: str | None = None):
        super().__init__(message)
        self.cli = cli

    def for_cli(self) -> str:
        return self.cli or str(self)


class NotAModelError(LowraxError):
    """A path that is neither an HF model directory nor a GGUF file."""


class UnsupportedModelError(LowraxError):
    """A `model_type` (or GGUF architecture) lowrax has no family for."""


class CheckpointError(LowraxError):
    """A checkpoint whose tensors are missing or have the wrong shape."""


class NonFiniteError(LowraxError):
    """Training produced a NaN or infinite loss or gradient; the message names the step."""


class OutputExistsError(LowraxError, FileExistsError):
    """An output directory that already holds files, written without overwrite."""

    def __init__(self, path, what: str = "exists and is not empty"):
        self.path = path
        super().__init__(f"{path} {what}; pass overwrite=True to replace it",
                         cli=f"{path} {what}; add --overwrite to replace it")
