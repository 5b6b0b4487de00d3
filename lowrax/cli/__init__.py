"""The `lowrax` command line (`lowrax.cli.main`)."""

from lowrax.cli.main import main

__all__ = ["main"]
