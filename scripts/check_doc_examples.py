"""Run the shell and Python examples of README.md and docs/, as a reader would, in a scratch directory.

    .venv-test/bin/python scripts/check_doc_examples.py [--only PAGE ...] [--keep]

Every ```bash and ```python block in the pages carries a marker on the line before it, which
`tests/test_doc_commands.py` checks is there:

    <!-- example: run -->            run as shown
    <!-- example: short -->          run as shown, each `lowrax train` cut to 2 steps (unless it sets
                                     train.steps or train.epochs itself) with train.quick=true
    <!-- example: short: train.steps=12 -->   the same with another number of steps (a method that
                                     needs more than 2)
    <!-- example: skip: REASON -->   not run, for the reason given (a GPU, hours, a checkpoint no package ships)

Shell blocks run line by line with `bash` (continuation lines joined), `lowrax` and `python` being this
interpreter's, and "Hello!" then "/exit" on standard input (for `lowrax chat`); a line that names a
placeholder (`/path/to/...`, `...`, an UPPER_CASE name) is reported as not runnable. A page's Python
blocks run in one interpreter, in page order, after its shell blocks (later blocks continue earlier
ones). The scratch directory starts with `configs/` (a link to the repository's), the README's first run
as `runs/default` (copied from the repository, or trained first), its adapter as `adapters/dates` and
`adapters/poems`, and the small files the examples name: `notes.txt` and `reviews.csv`.

`.ci/run` runs it in the test environment after the test suite. Exits non-zero naming the first block
that failed, with the end of its output.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- example: (?P<marker>.*?) -->\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)
KINDS = ("run", "short", "skip")
PLACEHOLDER = re.compile(r"/path/to/|\s\.\.\.(\s|$)|\b[A-Z]+_[A-Z_]+\b")  # my-files, `...`, RUN_DIR
STDIN = "Hello!\n/exit\n"
COMMAND_LIMIT_S = 900
SHORT = "train.quick=true train.eval_examples=2 train.samples=0"


@dataclass
class Example:
    page: Path
    line: int
    lang: str
    marker: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str | None:
        kind = (self.marker or "").split(":", 1)[0].strip()
        return kind if kind in KINDS else None


def examples(page: Path) -> list[Example]:
    text = page.read_text()
    return [Example(page, text.count("\n", 0, m.start("body")), m["lang"], m["marker"], m["body"])
            for m in BLOCK.finditer(text)]


def marker_problems(found: list[Example]) -> list[str]:
    """Blocks without a known marker, or skipped without a reason."""
    problems = []
    for ex in found:
        if ex.kind is None:
            problems.append(f"{ex.where}: a ```{ex.lang} block needs <!-- example: run|short|skip: REASON --> "
                            f"on the line before it (found {ex.marker!r})")
        elif ex.kind == "skip" and len(ex.marker.split(":", 1)[-1].strip()) < 10:
            problems.append(f"{ex.where}: a skipped example must say why (<!-- example: skip: REASON -->)")
    return problems


SHIM = """#!/bin/bash
if [ "$1" = train ] && [ -n "$DOC_EXAMPLE_SHORT" ]; then
  extra="$DOC_EXAMPLE_SHORT"
  case " $* " in *" train.steps="*|*" train.epochs="*) ;; *) extra="$extra $DOC_EXAMPLE_STEPS";; esac
  set -- "$@" $extra
fi
exec "{python}" -m lowrax "$@"
"""


def prepare(scratch: Path) -> dict:
    """The scratch directory's starting files and the environment the examples run in."""
    shims = scratch / ".bin"
    shims.mkdir()
    (shims / "lowrax").write_text(SHIM.replace("{python}", sys.executable))
    for name in ("python", "python3"):  # a script, not a link: a link would lose the venv's site-packages
        (shims / name).write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}"}
    (scratch / "configs").symlink_to(REPO / "configs")
    default = REPO / "runs" / "default"
    if (default / "summary.json").exists():
        shutil.copytree(default, scratch / "runs" / "default", ignore=shutil.ignore_patterns(".lowrax-*"))
    else:
        print("== runs/default: training the README's first run", flush=True)
        subprocess.run(["lowrax", "train"], cwd=scratch, env=env, check=True, stdout=subprocess.DEVNULL)
    for name in ("dates", "poems"):
        shutil.copytree(scratch / "runs" / "default" / "adapter", scratch / "adapters" / name,
                        ignore=shutil.ignore_patterns(".lowrax-*"))
    from pydoc_data.topics import topics

    (scratch / "notes.txt").write_text("\n".join(topics[name] for name in sorted(topics)[:12]))
    moods = [("a warm, funny and moving film", 1), ("dull, slow and far too long", 0),
             ("the best thing I have seen this year", 1), ("a mess of a plot with nothing to say", 0)]
    rows = [f'"{text} ({i})",{label}' for i in range(8) for text, label in moods]
    (scratch / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return env


def shell_lines(body: str) -> list[str]:
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_shell(ex: Example, scratch: Path, env: dict) -> list[str]:
    """Each line of a shell block; returns the lines left out as placeholders."""
    left_out = []
    steps = ex.marker.split(":", 1)[1].strip() if ex.kind == "short" and ":" in ex.marker else "train.steps=2"
    short_env = {**env, "DOC_EXAMPLE_SHORT": SHORT, "DOC_EXAMPLE_STEPS": steps} if ex.kind == "short" else env
    for line in shell_lines(ex.body):
        command = re.sub(r"(^|\s)\.venv(-test)?/bin/", r"\1", line.split(" #", 1)[0].strip())  # the reader's venv
        if PLACEHOLDER.search(command):
            left_out.append(command)
            continue
        start = time.perf_counter()
        print(f"   $ {command}", flush=True)
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=scratch, env=short_env, input=STDIN,
                                capture_output=True, text=True, timeout=COMMAND_LIMIT_S)
        if result.returncode != 0 or "Traceback" in result.stderr:
            fail(ex, command, result.stdout + result.stderr)
        print(f"     ok in {time.perf_counter() - start:.0f} s", flush=True)
    return left_out


def run_python(blocks: list[Example], scratch: Path, env: dict) -> None:
    """A page's Python blocks in one interpreter, in order."""
    script = "\n".join(f"print('== python block at {ex.where}', flush=True)\n{ex.body}" for ex in blocks)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=COMMAND_LIMIT_S)
    if result.returncode != 0:
        failed = re.findall(r"== python block at (\S+)", result.stdout)
        failing = next((ex for ex in blocks if failed and ex.where == failed[-1]), blocks[0])
        fail(failing, "python", result.stdout + result.stderr)
    print(f"   python: {len(blocks)} block(s) ok in {time.perf_counter() - start:.0f} s", flush=True)


def fail(ex: Example, what: str, output: str) -> None:
    sys.exit(f"check_doc_examples: the example at {ex.where} failed ({what}):\n{output[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="page names to run (README.md, training.md, ...)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and print its path")
    args = parser.parse_args()
    pages = [p for p in PAGES if not args.only or p.name in args.only]
    found = [ex for page in pages for ex in examples(page)]
    problems = marker_problems(found)
    if problems:
        sys.exit("check_doc_examples:\n" + "\n".join(problems))
    scratch = Path(tempfile.mkdtemp(prefix="lowrax-doc-examples-"))
    counts = {"run": 0, "short": 0, "skip": 0}
    try:
        env = prepare(scratch)
        for page in pages:
            page_examples = examples(page)
            for ex in page_examples:
                counts[ex.kind] += 1
                if ex.kind == "skip":
                    print(f"-- {ex.where}: not run ({ex.marker.split(':', 1)[1].strip()})", flush=True)
                elif ex.lang == "bash":
                    print(f"== {ex.where} ({ex.kind})", flush=True)
                    for line in run_shell(ex, scratch, env):
                        print(f"   not runnable as shown (a placeholder): {line}", flush=True)
            python = [ex for ex in page_examples if ex.lang == "python" and ex.kind != "skip"]
            if python:
                run_python(python, scratch, env)
    finally:
        if args.keep:
            print(f"scratch directory kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"check_doc_examples: {counts['run']} run as shown, {counts['short']} run short, {counts['skip']} skipped "
          "with their reasons")


if __name__ == "__main__":
    main()
