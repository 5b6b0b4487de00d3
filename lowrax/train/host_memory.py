"""Keep freed host memory for reuse instead of handing it back to the kernel every step.

XLA's CPU runtime mallocs each execution's temporaries (1.3 GB for a SmolLM2 LoRA
step at 4 x 128 tokens) and frees them at its end. glibc serves allocations that
large from fresh `mmap`s in the worker threads' arenas and `munmap`s them on free,
so every step page-faults its whole working set back in: on the 2-core CPU that
was 330k page faults and 0.69 s of kernel time per 1.7 s step
(`python scripts/bench.py --lora`). With one arena, no mmap and no trimming, the freed
block is reused by the next step.

It is not the default: on a real run (variable lengths, evaluation, generation, several
compiled programs) the never-trimmed heap fragments and the peak grew from 4.7 to 7.7 GB
on a SmolLM2 recipe. `lowrax train` applies it only when the environment sets
LOWRAX_REUSE_HOST_MEMORY=1 (for uniform batches, where it is 5-15% faster).
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

OPT_IN_VARIABLE = "LOWRAX_REUSE_HOST_MEMORY"


def reuse_freed_host_memory() -> bool:
    """Make glibc malloc keep and reuse freed memory in this process; True when applied.

    Call it before the first JAX computation: the arena limit only binds threads that
    have not allocated yet. The process then holds its peak memory until it exits (it
    never returns freed memory to the kernel), and the heap can fragment: in 2 of about
    20 SmolLM2 benchmark runs the peak was 4.0 GB instead of 2.7 GB, and on a real run
    with evaluation 7.7 GB instead of 4.7 GB. A no-op off glibc Linux.
    """
    if not sys.platform.startswith("linux"):
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


def host_memory_policy() -> bool:
    """What `lowrax train` applies before its first computation: glibc's defaults, unless the
    environment sets LOWRAX_REUSE_HOST_MEMORY=1 (then `reuse_freed_host_memory`). True when applied."""
    return reuse_freed_host_memory() if os.environ.get(OPT_IN_VARIABLE) == "1" else False


def release_freed_host_memory() -> None:
    """Hand the memory malloc holds free back to the kernel (glibc's `malloc_trim`); a no-op elsewhere.

    XLA's compiler and the loaders free gigabytes that glibc keeps for reuse: compiling the SmolLM2
    step left 1.1 GB of freed heap that the next step's temporaries were then allocated beside.
    `lowrax train` calls this after loading, after scoring and after each compilation of the step (its
    first, and each new batch width's), where it costs milliseconds."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


HUGE_PAGES_VARIABLE = "LOWRAX_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


def relaunch_with_huge_pages() -> None:
    """Re-execute this process with glibc's malloc asking for transparent huge pages, when that helps.

    Each XLA:CPU execution mallocs its temporaries (1.39 GB for a SmolLM2 LoRA step at 4 x 256
    tokens) and frees them at its end; glibc maps blocks that large afresh each time, so every step
    faults its whole working set back in, 4 KiB at a time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
    malloc marks its mappings for 2 MiB pages: 13x fewer page faults and a 6% shorter step, the
    peak unchanged (`scripts/compile_memory.py lora --batch 4 --seq 256 --time 6` under
    `/usr/bin/time -v`, with `LOWRAX_HUGE_PAGES=0` and without). glibc reads its tunables only at start, hence
    the re-execution (Python's start, about 60 ms). It happens only on Linux with glibc 2.35 or later,
    when transparent huge pages are in `madvise` mode (in `always` mode every mapping gets them
    already) and the environment has not set the tunable itself; `LOWRAX_HUGE_PAGES=0` turns it off.
    The `lowrax` command calls this first; library users can set the variable in their own launcher.
    """
    if os.environ.get(HUGE_PAGES_VARIABLE) == "0" or HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if not (sys.platform.startswith("linux") and _glibc_at_least(2, 35) and _transparent_huge_pages() == "madvise"):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), f"{HUGE_PAGES_TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
    except OSError:  # no executable to re-run (an embedded interpreter): carry on without
        return


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (major, minor)
    except (AttributeError, OSError, ValueError):
        return False


def _transparent_huge_pages() -> str | None:
    """The kernel's THP mode, the bracketed word of "always [madvise] never"; None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def peak_host_memory_mb() -> float | None:
    """This process's peak resident memory so far in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
