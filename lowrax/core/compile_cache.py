"""JAX's persistent compilation cache for the command line: a rerun of the same shapes loads its
compiled programs from disk instead of compiling them again.

The cache lives in `$LOWRAX_COMPILATION_CACHE` (`off` turns it off), else in JAX's own
`JAX_COMPILATION_CACHE_DIR` when the environment sets one, else in
`$XDG_CACHE_HOME/lowrax/jax` (`~/.cache/lowrax/jax`). Entries are keyed by the program, the
JAX and XLA versions and the device, so a stale one is never used; deleting the folder is safe.
"""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "LOWRAX_COMPILATION_CACHE"


def compilation_cache_dir() -> Path | None:
    """Where the command line caches compiled programs, or None when the cache is off."""
    chosen = os.environ.get(VARIABLE)
    if chosen is not None:
        return None if chosen.strip().lower() in ("off", "0", "") else Path(chosen).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrax" / "jax"


def use_compilation_cache() -> Path | None:
    """Point JAX at the cache folder (created if needed); the folder, or None when off or unwritable
    (a read-only home must not stop a command: it then compiles as without a cache)."""
    folder = compilation_cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK):
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's default, 1 s, misses the smaller ones
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder
