"""Objectives and tasks are looked up in registries, as adapter methods are; the trainer names none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.objectives.registry import objective_named, objective_names
from lowrax.train import objective_runs, trainer
from lowrax.train.config import load_config
from lowrax.train.tasks import task_named

ROOT = Path(lowrax.__file__).resolve().parent


def test_every_objective_has_a_run_setup():
    assert objective_names() and set(objective_runs._SETUPS.names()) == set(objective_names())


def test_the_trainer_names_no_objective_or_task():
    source = Path(trainer.__file__).read_text()
    literals = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)}
    named = literals & (set(objective_names()) | {"causal_lm", "classification", "seq2seq", "preference", "distill"})
    assert not named, f"train/trainer.py names {sorted(named)}: reach objectives and tasks through their registries"


def test_no_function_in_lowrax_is_over_80_lines():
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "functions over 80 lines:\n  " + "\n  ".join(long)


def test_run_settings_come_from_the_method_config_not_its_type():
    """AdaLoRA's schedule length and prompt tuning's tokenizer are filled by the config's own for_run."""
    adalora = lowrax.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2)
    assert adalora.for_run(steps=40, model_dir=None).total_step == 40
    assert adalora.for_run(steps=40, model_dir=None).for_run(steps=7, model_dir=None).total_step == 40
    prompt = lowrax.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    assert prompt.for_run(steps=1, model_dir="/models/x").tokenizer_name_or_path == "/models/x"
    lora = lowrax.LoraConfig(r=2)
    assert lora.for_run(steps=3, model_dir="/models/x") is lora


def test_unknown_and_mismatched_names_are_refused_with_the_known_ones():
    with pytest.raises(LowraxError, match="objective must be one of sft, .*got 'dpp'; did you mean 'dpo'"):
        objective_named("dpp")
    with pytest.raises(LowraxError, match="model.task must be one of causal_lm, classification, seq2seq, got 'clasification'"):
        task_named("clasification")
    with pytest.raises(LowraxError, match="model.task must be one of"):
        load_config(None, ["model.task=regression"])
    with pytest.raises(LowraxError, match="objective 'kto' trains model.task causal_lm; model.task is 'seq2seq'"):
        load_config(None, ["model.task=seq2seq", "objective=kto"])
    with pytest.raises(LowraxError, match="objective 'distill' trains model.task causal_lm or classification"):
        load_config(None, ["model.task=seq2seq", "objective=distill"])


SECTIONS = ("# --- config", "# --- node", "# --- build", "# --- PEFT format", "# --- registration")


@pytest.mark.parametrize("name", lowrax.method_names())
def test_every_method_has_the_same_parts(name):
    """A method folder holds config.py, node.py, build.py and its exchange format (peft.py, or the
    format's own name); a one-module method has the same parts as marked sections, in that order."""
    from lowrax.adapters.registry import method_named

    module = method_named(name).config.__module__
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    if path.name == "config.py":
        folder = path.parent
        for part in ("config.py", "node.py", "build.py"):
            assert (folder / part).exists(), f"{folder.relative_to(ROOT.parent)} has no {part}"
        assert (folder / "peft.py").exists() or (folder / "adapterhub.py").exists(), f"{folder} has no exchange format"
    else:
        text = path.read_text()
        where = [text.find(section) for section in SECTIONS]
        assert -1 not in where and where == sorted(where), (
            f"{path.relative_to(ROOT.parent)} must have the sections {SECTIONS} in that order")


def test_every_method_has_a_row_in_the_variants_benchmark():
    """`scripts/bench.py --variants` measures every registered method (issue: one table of them all)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_variants.py"
    spec = importlib.util.spec_from_file_location("bench_variants_rows", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    missing = sorted(set(lowrax.method_names()) - set(module.METHODS))
    assert not missing, f"no bench_variants row for {missing}"
