"""Every `lowrax` command shown in the README and docs/ is one the command line accepts today: its
command and flags parse, and the config keys and values it passes (`section.key=value`, a preset)
load. Running them all would take hours (they train); this keeps none of them stale. Usage
synopses (`[CONFIG.yaml]`, `RUN_DIR`) and lines that need a shell (`$(...)`) are left out.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from lowrax.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after `lowrax`) of each command in the pages' bash blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if not words or not words[0].endswith("lowrax"):
                        continue
                    if any("[" in w or "..." in w or w.isupper() or "$(" in w for w in words):
                        continue  # a synopsis, a placeholder or a shell expansion: not a runnable line
                    found.append((f"{page.name}: {part.strip()}", words[1:]))
    return found


COMMANDS = shown_commands()


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 40  # the extraction itself works


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w[:90] for w, _ in COMMANDS])
def test_a_shown_command_parses_and_its_config_loads(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # presets are shown relative to the repository
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0:  # --help, --version
            return
        raise AssertionError(f"{where}: the command line refuses it") from None
    if args.command in ("train", "import-peft", "prune"):
        items = list(args.items)
        preset = items.pop(0) if items and "=" not in items[0] else None
        if args.command == "prune":
            from lowrax.pruning.config import load_prune_config

            load_prune_config(preset, items)
        else:
            from lowrax.train.config import load_config

            load_config(preset, items)


def test_every_python_example_is_valid_python():
    """Fragments (they continue the page's earlier blocks) are compiled, not run; the README's Quick start
    blocks are run whole by tests/test_runtime_deps.py."""
    blocks = [(page.name, block) for page in PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)]
    assert len(blocks) >= 10  # the extraction itself works
    for name, block in blocks:
        compile(block, f"a python block of {name}", "exec")


def test_every_example_block_is_marked_run_short_or_skipped_with_a_reason():
    """scripts/check_doc_examples.py (run by .ci/run) runs the blocks marked run or short; each of the
    others says why it is not run."""
    spec = importlib.util.spec_from_file_location("check_doc_examples", ROOT / "scripts" / "check_doc_examples.py")
    checker = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checker  # its dataclass looks its module up
    spec.loader.exec_module(checker)
    found = [ex for page in PAGES for ex in checker.examples(page)]
    assert len(found) >= 40  # the extraction itself works
    assert checker.marker_problems(found) == []
    assert sum(ex.kind != "skip" for ex in found) >= 25
