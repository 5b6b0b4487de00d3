"""The user guide builds as a site with no broken link or anchor (`mkdocs build --strict`), and the
API reference renders from the docstrings it names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs build needs mkdocs-material and mkdocstrings (pip install -e .[test])")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "load_pretrained" in reference and "HF directory" in reference  # rendered from the docstring
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    listed = (ROOT / "mkdocs.yml").read_text()
    assert all(page in listed for page in pages), f"pages missing from mkdocs.yml's nav: {pages - set(listed.split())}"
