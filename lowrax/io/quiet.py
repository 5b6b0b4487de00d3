"""Importing transformers without its advice to install PyTorch.

lowrax uses transformers for tokenizers only and never needs torch; without
torch, `import transformers` logs "PyTorch was not found..." on every command.
"""

from __future__ import annotations

import os
import sys

_ADVISORY = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def import_transformers_quietly() -> None:
    """Import transformers (once) with its advisory warnings off for the import only."""
    if "transformers" in sys.modules:
        return
    previous = os.environ.get(_ADVISORY)
    os.environ[_ADVISORY] = "1"
    try:
        import transformers  # noqa: F401
    finally:
        if previous is None:
            os.environ.pop(_ADVISORY, None)
        else:
            os.environ[_ADVISORY] = previous
