"""Exceptions lowrax raises for bad input.

Each one carries a message that names the offending thing and the expected
form, so a user can fix the input without reading lowrax's source.
"""


class LowraxError(ValueError):
    """Base class: a user-facing input problem (a subclass of ValueError)."""


class NotAModelError(LowraxError):
    """A path that is neither an HF model directory nor a GGUF file."""


class UnsupportedModelError(LowraxError):
    """A `model_type` (or GGUF architecture) lowrax has no family for."""


class CheckpointError(LowraxError):
    """A checkpoint whose tensors are missing or have the wrong shape."""
