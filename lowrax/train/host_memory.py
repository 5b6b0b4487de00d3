"""Keep freed host memory for reuse instead of handing it back to the kernel every step.

XLA's CPU runtime mallocs each execution's temporaries (1.3 GB for a SmolLM2 LoRA
step at 4 x 128 tokens) and frees them at its end. glibc serves allocations that
large from fresh `mmap`s in the worker threads' arenas and `munmap`s them on free,
so every step page-faults its whole working set back in: on the 2-core CPU that
was 330k page faults and 0.69 s of kernel time per 1.7 s step
(`LOWRAX_SYSTEM_MALLOC=1 python scripts/bench.py --lora`). With one arena, no mmap
and no trimming, the freed block is reused by the next step.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

OPT_OUT_VARIABLE = "LOWRAX_SYSTEM_MALLOC"


def reuse_freed_host_memory() -> bool:
    """Make glibc malloc keep and reuse freed memory in this process; True when applied.

    Call it before the first JAX computation: the arena limit only binds threads that
    have not allocated yet. The process then holds its peak memory until it exits (it
    never returns freed memory to the kernel), and the heap can fragment: in 2 of about
    20 SmolLM2 benchmark runs the peak was 4.0 GB instead of 2.7 GB. A no-op off glibc
    Linux, or when the environment sets LOWRAX_SYSTEM_MALLOC=1.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_VARIABLE) == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 as a size is the largest one: never trim the heap's top.
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
