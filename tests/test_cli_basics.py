"""The command line's own surface: --help and --version without importing JAX, help text on every
argument, `lowrax train --help-config`, and which preset an override-only `lowrax train` starts from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lowrax.cli.main import build_parser, train_config
from lowrax.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _run_without_jax(argv: list[str]) -> subprocess.CompletedProcess:
    """`lowrax ARGV` in a fresh interpreter that fails if anything imported JAX."""
    code = ("import sys\nfrom lowrax.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'jax' not in sys.modules, 'JAX was imported'\n" % argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_help_and_version_do_not_import_jax():
    for argv in (["--help"], ["train", "--help"], ["generate", "--help"], ["--version"]):
        child = _run_without_jax(argv)
        assert child.returncode == 0, child.stderr
    version = _run_without_jax(["--version"]).stdout.strip()
    assert version.startswith("lowrax 0.") and "jax " in version and "Python 3." in version and "\n" not in version
    as_module = subprocess.run([sys.executable, "-m", "lowrax", "--version"], capture_output=True, text=True, cwd=ROOT,
                               timeout=120)  # `python -m lowrax` is the same command
    assert as_module.returncode == 0 and as_module.stdout.strip() == version and not as_module.stderr


def test_every_argument_of_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them nowhere public
    missing = [f"{name} {action.dest}" for name, sub in commands.items() for action in sub._actions if not action.help]
    assert missing == []
    summaries = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
    assert set(summaries) == set(commands) and all(summaries.values())


def test_train_help_lists_the_registered_methods_objectives_and_tasks():
    import lowrax
    from lowrax.cli.main import TRAIN_METHODS, TRAIN_OBJECTIVES, TRAIN_TASKS
    from lowrax.objectives.registry import objective_names
    from lowrax.train.tasks import task_names

    assert (list(TRAIN_METHODS), list(TRAIN_OBJECTIVES), list(TRAIN_TASKS)) == \
        (lowrax.method_names(), objective_names(), task_names())
    child = _run_without_jax(["train", "--help"])
    assert "methods (method=NAME" in child.stdout and "prefix_tuning" in child.stdout and "distill" in child.stdout


def test_help_config_is_a_preset_of_the_config_the_command_would_use(tmp_path, capsys):
    from lowrax.cli import main

    assert main(["train", "--help-config", "train.steps=7", "lora.r=4"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "preset.yaml").write_text(text)
    assert load_config(tmp_path / "preset.yaml") == load_config(str(ROOT / "configs" / "default.yaml"),
                                                               ["train.steps=7", "lora.r=4"])
    assert "  steps: 7  # [an integer >= 0] optimizer steps (0: score the model as training would start it, train nothing)" \
        in text.splitlines()
    assert "  r: 4  # [an integer >= 1] rank of A [in, r] and B [r, out]" in text.splitlines()
    assert main(["train", "--help-config", "method=ia3"]) == 0
    ia3 = yaml.safe_load(capsys.readouterr().out)
    assert ia3["method"] == "ia3" and "feedforward_modules" in ia3["ia3"] and "lora" not in ia3


def test_override_only_runs_on_other_data_start_from_the_built_in_defaults(tmp_path):
    """configs/default.yaml holds the embedded task's short rows and scored positions: a run on a
    user's data must not inherit them."""
    out = tmp_path / "run"
    cfg, source = train_config([f"data.source={tmp_path / 'news.txt'}", f"train.output_dir={out}"])
    assert source == "built-in defaults"
    assert cfg.data.loss_positions == 0 and cfg == load_config(None, [f"data.source={tmp_path / 'news.txt'}",
                                                                      f"train.output_dir={out}"])
    cfg, source = train_config([f"train.output_dir={out}"])
    assert source.endswith("default.yaml") and cfg.data.loss_positions == 12


def test_the_default_preset_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the source tree's is used
    cfg, source = train_config([f"train.output_dir={tmp_path / 'run'}"])
    assert source == str(ROOT / "configs" / "default.yaml") and cfg.data.loss_positions == 12
