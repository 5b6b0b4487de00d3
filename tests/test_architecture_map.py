"""docs/ARCHITECTURE.md's map names every package folder of lowrax (a new folder is a new room on the map)."""

from __future__ import annotations

from pathlib import Path

import lowrax

ROOT = Path(lowrax.__file__).resolve().parent
MAP = ROOT.parent / "docs" / "ARCHITECTURE.md"


def package_folders() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_dir() and any(p.glob("*.py")))


def test_the_map_names_every_package_folder():
    text = MAP.read_text()
    folders = package_folders()
    assert "core" in folders and "adapters/lora" in folders
    # a folder is named as `name/` in the tree (its own line or a list of sibling folders)
    missing = [f for f in folders if f.split("/")[-1] + "/" not in text]
    assert not missing, f"docs/ARCHITECTURE.md's map misses {missing}"


def test_every_package_folder_has_an_init():
    """A folder without __init__.py is a namespace package: easy to lose (an ignored path) without notice."""
    missing = [f for f in package_folders() if not (ROOT / f / "__init__.py").exists()]
    assert not missing, f"package folders without __init__.py: {missing}"
