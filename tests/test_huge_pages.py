"""`lowrax`'s start: re-executed once with glibc's huge-page tunable where the machine supports it."""

from __future__ import annotations

import os
import subprocess
import sys

from lowrax.train import host_memory

CHILD = """
import os, sys
print("start", os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
from lowrax.train.host_memory import relaunch_with_huge_pages
relaunch_with_huge_pages()
print("running", flush=True)
"""


def run_child(extra_env: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.HUGE_PAGES_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", CHILD, "an-argument"], env={**env, **extra_env},
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def supported() -> bool:
    return (sys.platform.startswith("linux") and host_memory._glibc_at_least(2, 35)
            and host_memory._transparent_huge_pages() == "madvise")


def test_relaunches_once_with_the_tunable_and_the_same_arguments():
    lines = run_child({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    if supported():
        assert lines == ["start glibc.malloc.check=0 ['an-argument']",
                         "start glibc.malloc.check=0:glibc.malloc.hugetlb=1 ['an-argument']", "running"]
    else:
        assert lines == ["start glibc.malloc.check=0 ['an-argument']", "running"]


def test_an_explicit_setting_or_the_opt_out_is_left_alone():
    assert run_child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == [
        "start glibc.malloc.hugetlb=0 ['an-argument']", "running"]
    assert run_child({host_memory.HUGE_PAGES_VARIABLE: "0"}) == ["start  ['an-argument']", "running"]

