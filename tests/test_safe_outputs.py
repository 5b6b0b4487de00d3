"""Nothing is lost: atomic writes killed at every point, --overwrite only over lowrax's own outputs (never a
command's input or a user's directory), one process per run directory, staging leftovers cleared, a damaged
newest checkpoint set aside for the newest intact one, and unwritable paths named in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lowrax
from lowrax.core.atomic import MARKER, remove_stale_staging, staging_prefix, write_directory, write_text
from lowrax.core.run_lock import lock_run_directory
from lowrax.train.config import load_config
from lowrax.train.runs import export_peft, merge_run
from lowrax.train.trainer import run_training
from tests.test_training_run import data_file, losses, overrides, tiny_dir  # noqa: F401  (module fixtures)

ROOT = Path(__file__).resolve().parent.parent

# A child that writes `target` twice (old, then new content) and SIGKILLs itself at the n-th call of one
# file-system operation during the second write: every point where a kill can land between two steps.
KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from lowrax.core import atomic

    kind, op, n, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    def fill(version):
        def write(d):
            (d / "weights.bin").write_bytes(version.encode() * 1000)
            (d / "config.json").write_text(version)
        return write
    if kind == "dir":
        atomic.write_directory(target, fill("old"))
    else:
        atomic.write_text(target, "old")
    calls = {"replace": 0, "rmtree": 0}
    real = {"replace": os.replace, "rmtree": shutil.rmtree}
    def killing(name):
        def op_(*a, **k):
            calls[name] += 1
            if name == op and calls[name] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](*a, **k)
        return op_
    os.replace, shutil.rmtree = killing("replace"), killing("rmtree")
    atomic.os.replace, atomic.shutil.rmtree = os.replace, shutil.rmtree
    if kind == "dir":
        atomic.write_directory(target, fill("new"), overwrite=True)
    else:
        atomic.write_text(target, "new")
""")


def _content(path: Path, kind: str) -> str:
    return (path / "config.json").read_text() if kind == "dir" else path.read_text()


@pytest.mark.parametrize("kind, op, n", [("dir", "replace", 1), ("dir", "replace", 2), ("dir", "rmtree", 1),
                                         ("text", "replace", 1)])
def test_a_kill_at_any_point_of_an_atomic_write_leaves_old_or_new_and_the_next_write_cleans_up(tmp_path, kind, op, n):
    target = tmp_path / ("out" if kind == "dir" else "summary.json")
    proc = subprocess.run([sys.executable, "-c", KILLER, kind, op, str(n), str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if target.exists():
        assert _content(target, kind) in ("old", "new")
        if kind == "dir":
            assert (target / "weights.bin").stat().st_size == 3000  # never half of either
    remove_stale_staging(tmp_path)  # what the next write to this folder does first
    assert target.exists() and _content(target, kind) in ("old", "new")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging left behind


def test_overwrite_replaces_only_lowraxs_own_directories(tmp_path):
    fill = lambda d: (d / "a.txt").write_text("x")  # noqa: E731
    ours = write_directory(tmp_path / "ours", fill)
    assert (ours / MARKER).exists()
    write_directory(ours, fill, overwrite=True)  # its own output: replaced
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.txt").write_text("four years of work")
    for overwrite in (True, False):
        with pytest.raises(lowrax.LowraxError, match="not empty and was not written by lowrax"):
            write_directory(user, fill, overwrite=overwrite)
    with pytest.raises(lowrax.OutputExistsError, match="pass overwrite=True"):
        write_directory(ours, fill)
    assert (user / "thesis.txt").read_text() == "four years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(lowrax.LowraxError, match="is a file, not a directory"):
        write_directory(tmp_path / "file", fill, overwrite=True)
    with pytest.raises(lowrax.LowraxError, match="holds this command's input"):
        write_directory(tmp_path, fill, overwrite=True, inputs=(ours,))


@pytest.fixture(scope="module")
def trained_run(tiny_dir, data_file, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "run"
    run_training(load_config(None, overrides(tiny_dir, data_file, out, 2, **{"train.save_every": 1})),
                 progress=False, log=lambda *_: None)
    return out


def test_commands_never_overwrite_their_input_or_a_user_directory(trained_run, tmp_path):
    for out in (trained_run, trained_run / "adapter", trained_run.parent):
        with pytest.raises(lowrax.LowraxError, match="(holds|is part of) this command's input"):
            merge_run(trained_run, out, overwrite=True, log=lambda *_: None)
        with pytest.raises(lowrax.LowraxError, match="(holds|is part of) this command's input"):
            export_peft(trained_run, out, overwrite=True)
    user = tmp_path / "src"
    user.mkdir()
    (user / "main.py").write_text("print('mine')")
    with pytest.raises(lowrax.LowraxError, match="was not written by lowrax"):
        export_peft(trained_run, user, overwrite=True)
    assert (user / "main.py").read_text() == "print('mine')" and (trained_run / "config.yaml").exists()
    exported = export_peft(trained_run, tmp_path / "exported")
    assert export_peft(trained_run, exported, overwrite=True) == exported  # its own output: replaced


def test_a_second_process_on_a_run_directory_is_refused_with_the_holders_pid(trained_run, tiny_dir, data_file):  # noqa: F811
    cfg = load_config(None, overrides(tiny_dir, data_file, trained_run, 3))
    with lock_run_directory(trained_run):
        with pytest.raises(lowrax.LowraxError, match=rf"is in use by another lowrax process \(pid {os.getpid()}\)"):
            run_training(cfg, progress=False, log=lambda *_: None)
    # A holder killed with -9 leaves no lock behind.
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowrax.core.run_lock import "
                              "lock_run_directory as l; k = l(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                              str(trained_run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(lowrax.LowraxError, match=rf"pid {child.pid}"):
        lock_run_directory(trained_run).release()
    child.kill()
    child.wait()
    after_kill = lock_run_directory(trained_run)  # the killed holder's pid is left for the next run to report
    assert after_kill.killed_pid == child.pid
    after_kill.release()
    said = []
    run_training(cfg, progress=False, log=said.append)  # a holder that released normally is no news
    assert not any("ended without finishing" in line for line in said)
    with open(trained_run / ".lowrax-lock", "w") as f:  # what a run killed by the OOM killer leaves
        f.write(str(child.pid))
    said = []
    run_training(cfg, progress=False, log=said.append)
    assert any(f"(pid {child.pid}) ended without finishing" in line for line in said), said


def test_train_refuses_a_directory_of_someone_elses_files(tiny_dir, data_file, tmp_path):  # noqa: F811
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(lowrax.LowraxError, match="holds files that are not a lowrax run"):
        run_training(load_config(None, overrides(tiny_dir, data_file, tmp_path, 1)), progress=False, log=lambda *_: None)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_staging_left_by_a_killed_run_is_removed_and_a_damaged_checkpoint_is_set_aside(tiny_dir, data_file, tmp_path):  # noqa: F811
    full, run = tmp_path / "full", tmp_path / "run"
    settings = {"train.save_every": 1, "train.max_checkpoints": 3}
    run_training(load_config(None, overrides(tiny_dir, data_file, full, 3, **settings)), progress=False, log=lambda *_: None)
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 2, **settings)), progress=False, log=lambda *_: None)
    # What a kill -9 during the adapter and summary writes leaves, from a writer that no longer runs.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [run / (staging_prefix("adapter").replace(str(os.getpid()), str(dead_pid)) + "x1y2"),
                 run / (staging_prefix("summary.json").replace(str(os.getpid()), str(dead_pid)) + "z3")]
    leftovers[0].mkdir()
    leftovers[1].write_text("{")
    # The newest checkpoint (step 2) damaged: every file in it truncated.
    for f in (run / "checkpoints" / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    warnings = []
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 3, **settings)), progress=False,
                 log=warnings.append)
    assert not any(p.exists() for p in leftovers)
    assert any("checkpoint step 2" in w and "damaged" in w and "falling back to step 1" in w for w in warnings), warnings
    assert (run / "damaged-checkpoints" / "2").is_dir()  # set aside, not deleted
    np.testing.assert_allclose(losses(run), losses(full), atol=1e-6)  # step 2 recomputed from step 1


def test_an_unwritable_output_is_one_line_naming_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a file where a folder should be: refused for root too
    for write in (lambda: write_text(blocker / "summary.json", "{}"), lambda: write_directory(blocker / "adapter", print),
                  lambda: lock_run_directory(blocker / "run")):
        with pytest.raises(lowrax.LowraxError, match=r"cannot write .*a-file.*a file stands where a folder is needed|is a file"):
            write()
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "readonly"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(lowrax.LowraxError, match=r"cannot write .*readonly.*Permission denied"):
                write_text(locked / "summary.json", json.dumps({}))
        finally:
            locked.chmod(0o700)


def test_a_run_rewrites_its_own_adapter_even_without_the_marker(tiny_dir, data_file, tmp_path):  # noqa: F811
    """A run directory written before outputs carried the marker: its adapter/ is still the run's."""
    run = tmp_path / "run"
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 1)), progress=False, log=lambda *_: None)
    (run / "adapter" / MARKER).unlink()
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 2)), progress=False, log=lambda *_: None)
    assert (run / "adapter" / MARKER).exists() and (run / "adapter" / "adapter_model.safetensors").exists()


# For a child process: a write past 20 KB in one file fails (EFBIG) as writes on a full disk fail
# (SIGXFSZ ignored: a failed write instead of the signal's kill).
FILE_SIZE_LIMIT = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000)); ")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_rerun_resumes(tiny_dir, data_file, tmp_path):  # noqa: F811
    run, settings = tmp_path / "run", {"train.save_every": 1}
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 2, **settings)), progress=False, log=lambda *_: None)
    # Step 3's checkpoint files exceed the limit (orbax's metadata is ~100 KB); the log lines do not.
    train = f"from lowrax.cli import main; raise SystemExit(main(['train', *{overrides(tiny_dir, data_file, run, 3, **settings)!r}]))"
    child = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT + train], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
    assert child.returncode != 0
    assert f"could not save checkpoint step 3 in {run / 'checkpoints'}: File too large; a rerun resumes from step 2" \
        in child.stderr, child.stderr[-3000:]
    assert "Traceback" not in child.stderr, child.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]  # no partial step 3
    said = []
    run_training(load_config(None, overrides(tiny_dir, data_file, run, 3, **settings)), progress=False, log=said.append)
    assert any(line.startswith(f"resumed from {run / 'checkpoints' / '2'} at step 2") for line in said), said
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3]
