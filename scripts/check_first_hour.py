"""What a new user does after the README's first command, run in that environment (no test extra).

    .venv/bin/python scripts/check_first_hour.py [RUN_DIR]     (default: runs/default)

1. The README's Quick start block, verbatim, in a scratch directory.
2. `lowrax generate --adapter RUN_DIR` on a held-out date: the trained format comes out.
3. `lowrax chat --adapter RUN_DIR` with two lines of input: replies stream and it exits cleanly.
4. Rerunning `lowrax train` into the finished run keeps its summary.json byte for byte.
5. `lowrax --version` answers at once (no JAX loaded).
6. A short run on text data prints the held-out loss and perplexity before and after; the same run
   again (with `train.quick`, into a new directory) starts from the compilation cache: it adds no
   entry to the cache, and both wall times are printed.

`.ci/run` runs it after the README's first command, so a runtime dependency that only the test
extra brings in (jinja2 came in through torch) fails CI instead of a new user's first hour.
Exits non-zero with a message naming the step that failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOWRAX = [sys.executable, "-m", "lowrax"]


def step(name: str, command: list[str], cwd: Path, stdin: str | None = None, env: dict | None = None) -> str:
    print(f"== {name}", flush=True)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, input=stdin, env=env)
    if result.returncode != 0:
        sys.exit(f"check_first_hour: {name} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    if "Traceback" in result.stderr or "PyTorch was not found" in result.stderr:
        sys.exit(f"check_first_hour: {name} printed a traceback or foreign noise:\n{result.stderr}")
    return result.stdout


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/default").resolve()
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    quick_start = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))  # every Python block, in order
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
    started = time.perf_counter()
    out = step("lowrax --version", [*LOWRAX, "--version"], REPO)
    seconds = time.perf_counter() - started
    print(f"{out.strip()} ({seconds:.1f} s)")
    if not out.startswith("lowrax ") or seconds > 5:
        sys.exit(f"check_first_hour: --version printed {out!r} in {seconds:.1f} s (expected 'lowrax ...' at once)")

    text_runs()
    print("check_first_hour: all steps passed")


def text_runs() -> None:
    """Step 6: a text run reports loss and perplexity; its rerun compiles nothing the cache keeps."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cache = scratch / "jax-cache"
        env = {**os.environ, "LOWRAX_COMPILATION_CACHE": str(cache)}
        common = ["data.source=embedded_text", "data.seq_len=64", "train.batch_size=4", "train.steps=2",
                  "train.eval_examples=0"]
        started = time.perf_counter()
        out = step("a text run", [*LOWRAX, "train", *common, f"train.output_dir={scratch / 'first'}"], REPO, env=env)
        first = time.perf_counter() - started
        print(out.strip())
        if not re.search(r"held-out loss: [\d.]+ before -> [\d.]+ after training", out):
            sys.exit("check_first_hour: the text run did not print its held-out loss before and after")
        entries = sorted(p.name for p in cache.iterdir())
        started = time.perf_counter()
        step("the same run again, quick", [*LOWRAX, "train", *common, "train.quick=true",
                                           f"train.output_dir={scratch / 'second'}"], REPO, env=env)
        second = time.perf_counter() - started
        print(f"text run: {first:.1f} s with an empty compilation cache, {second:.1f} s the second time (quick)")
        added = sorted(set(p.name for p in cache.iterdir()) - set(entries))
        if not entries or added:
            sys.exit(f"check_first_hour: the rerun compiled programs again ({len(entries)} cached after the first "
                     f"run, {len(added)} added by the second: {added[:3]})")


if __name__ == "__main__":
    main()
