"""reuse_freed_host_memory: a freed large block is reused without page-faulting it back in."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys
import lowrax
applied = lowrax.reuse_freed_host_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.memset.argtypes, libc.free.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], [ctypes.c_void_p]
size = 256 << 20
for round in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
print(applied, faults)
"""


def _second_round_faults(mode: str, env=None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_memory_is_reused_without_page_faults():
    pages = (256 << 20) // 4096
    applied, faults = _second_round_faults("on")
    assert applied == "True" and faults < pages // 10, faults
    _, untouched = _second_round_faults("off")
    assert untouched > pages // 2, untouched  # glibc's default: munmap on free, fault back in


def test_lowrax_train_leaves_malloc_alone_unless_asked():
    """glibc's defaults unless LOWRAX_REUSE_HOST_MEMORY=1: a fragmenting, never-trimmed heap costs gigabytes
    on real runs."""
    import os

    probe = "from lowrax.train.host_memory import host_memory_policy; print(host_memory_policy())"
    for value, expected in ((None, "False"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "LOWRAX_REUSE_HOST_MEMORY"}
        if value is not None:
            env["LOWRAX_REUSE_HOST_MEMORY"] = value
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == expected


TRIM_PROBE = r"""
import ctypes, sys
from lowrax.train.host_memory import release_freed_host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.memset.argtypes, libc.free.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
blocks = [libc.malloc(64 << 10) for _ in range(3200)]  # 200 MB below the mmap threshold: the heap
for b in blocks:
    libc.memset(b, 1, 64 << 10)
for b in blocks[:-1]:  # the last one pins the heap's top, so glibc trims nothing by itself
    libc.free(b)
held = rss()
release_freed_host_memory()
print(held, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_releasing_freed_memory_returns_it_to_the_kernel():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    held, released = map(int, out.stdout.split())
    assert held - released > 150, (held, released)
