"""A run whose loss or gradient turns NaN or infinite stops by name (train.nonfinite=stop) keeping its last
good checkpoint, or skips those steps and counts them (train.nonfinite=skip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrax
from lowrax.train.config import load_config
from lowrax.train.trainer import run_training
from tests.test_training_run import data_file, overrides, tiny_dir  # noqa: F401  (module fixtures)

# A learning rate of 1e30 is a finite, valid number: the first step computes a finite loss, its update
# sends the weights to ~1e30, and every later forward overflows.
EXPLODING = {"optim.learning_rate": 1e30, "optim.schedule": "constant", "lora.dropout": 0.0, "train.save_every": 1}


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_step_stops_the_run_naming_it_and_keeps_the_last_good_checkpoint(tiny_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_dir, data_file, out, 4, **EXPLODING))
    with pytest.raises(lowrax.NonFiniteError, match=r"step 2: the loss is (nan|inf).*the newest checkpoint, step 1, is kept"):
        run_training(cfg, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    assert not (out / "adapter").exists()  # nothing of the broken state was exported
    logged = rows(out)  # strict JSON: the failed step's loss is null, not NaN
    assert [r["step"] for r in logged] == [1, 2] and np.isfinite(logged[0]["loss"]) and logged[1]["loss"] is None


def test_skipped_steps_leave_the_adapter_as_it_was_and_are_counted(tiny_dir, data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_dir, data_file, out, 4, **EXPLODING, **{"train.nonfinite": "skip"}))
    run_training(cfg, progress=False, log=lambda *_: None)
    logged = rows(out)
    assert [r["skipped"] for r in logged] == [0.0, 1.0, 1.0, 1.0]
    # The adapter written at the end is the state after step 1: the skipped updates changed nothing.
    from lowrax.train.runs import restore_run

    first, last = tmp_path / "first", out / "adapter"
    run_training(load_config(None, overrides(tiny_dir, data_file, first, 1, **EXPLODING)), progress=False,
                 log=lambda *_: None)
    ours, ref = load_file(str(last / "adapter_model.safetensors")), load_file(str(first / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)
    assert restore_run(out)[2] is not None  # the final checkpoint restores
