"""Sharded and multi-process training: tests/sharding_cases.py, run on 8 virtual CPU devices.

JAX fixes its device count when it starts, so the cases run in a child pytest whose
XLA_FLAGS give it 8 CPU devices; the rest of the suite keeps its single device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).with_name("sharding_cases.py")


def test_sharding_cases_on_8_virtual_cpu_devices():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # conftest's flags too
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, f"sharding cases failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1]
