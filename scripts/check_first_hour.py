"""What a new user does after the README's first command, run in that environment (no test extra).

    .venv/bin/python scripts/check_first_hour.py [RUN_DIR]     (default: runs/default)

1. The README's Quick start block, verbatim, in a scratch directory.
2. `lowrax generate --adapter RUN_DIR` on a held-out date: the trained format comes out.
3. `lowrax chat --adapter RUN_DIR` with two lines of input: replies stream and it exits cleanly.
4. Rerunning `lowrax train` into the finished run keeps its summary.json byte for byte.

`.ci/run` runs it after the README's first command, so a runtime dependency that only the test
extra brings in (jinja2 came in through torch) fails CI instead of a new user's first hour.
Exits non-zero with a message naming the step that failed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOWRAX = [sys.executable, "-m", "lowrax.cli.main"]


def step(name: str, command: list[str], cwd: Path, stdin: str | None = None) -> str:
    print(f"== {name}", flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, input=stdin)
    if result.returncode != 0:
        sys.exit(f"check_first_hour: {name} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    if "Traceback" in result.stderr or "PyTorch was not found" in result.stderr:
        sys.exit(f"check_first_hour: {name} printed a traceback or foreign noise:\n{result.stderr}")
    return result.stdout


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/default").resolve()
    readme = (REPO / "README.md").read_text()
    quick_start = re.search(r"```python\n(.*?)```", readme.split("## Quick start", 1)[1], re.S).group(1)
    with tempfile.TemporaryDirectory() as scratch:
        out = step("Quick start", [sys.executable, "-c", quick_start], Path(scratch))
        print(out.strip())

    out = step("generate with the trained run", [*LOWRAX, "generate", "--adapter", str(run),
                                                 "Convert 2031-07-04 to lowrax date format:"], REPO)
    print(out.strip())
    if "4 Jul 2031" not in out:
        sys.exit("check_first_hour: the trained run did not produce the trained format ('4 Jul 2031')")

    out = step("chat with the trained run", [*LOWRAX, "chat", "--adapter", str(run), "--max-new-tokens", "16"],
               REPO, stdin="Hello!\nWhat is 2+2?\n/exit\n")
    print(out.strip())
    if len([line for line in out.splitlines() if line.strip()]) < 2:
        sys.exit("check_first_hour: chat did not answer both messages")

    summary = run / "summary.json"
    before = summary.read_bytes()
    step("rerun the finished run", [*LOWRAX, "train", f"train.output_dir={run}"], REPO)
    if summary.read_bytes() != before:
        sys.exit("check_first_hour: rerunning a finished run changed its summary.json")
    print("check_first_hour: all steps passed")


if __name__ == "__main__":
    main()
