"""A run's life after its first command: rerunning, extending, importing and continuing, generating
and chatting with what was trained, and the files and messages a shell user sees."""

from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest
import yaml

import lowrax
from lowrax.cli import main
from lowrax.train.config import load_config
from lowrax.train.trainer import run_training
from tests.test_training_run import SCORED, data_file, overrides, tiny_dir  # noqa: F401 - fixtures

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def finished_run(tiny_dir, data_file, tmp_path_factory):
    """A 2-step run, finished by the CLI."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **{"lora.dropout": 0.0}, **SCORED)]) == 0
    return run


def test_rerunning_a_finished_run_keeps_its_record(tiny_dir, data_file, finished_run, capsys):
    summary_before = (finished_run / "summary.json").read_bytes()
    adapter_before = (finished_run / "adapter" / "adapter_model.safetensors").read_bytes()
    record = json.loads(summary_before)
    assert record["steps"] == 2 and record["final_loss"] is not None and record["checkpoint_bytes"] > 0
    assert record["command_wall_seconds"] >= record["train_seconds"] > 0  # the whole command, for the README
    assert record["peak_host_memory_mb"] > 100  # the process peak (ru_maxrss), model and compilation included

    assert main(["train", *overrides(tiny_dir, data_file, finished_run, 2, **{"lora.dropout": 0.0}, **SCORED)]) == 0
    assert "holds a finished run (step 2 of train.steps=2)" in capsys.readouterr().out
    assert (finished_run / "summary.json").read_bytes() == summary_before
    assert (finished_run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before


def test_extending_a_run_continues_its_record(tiny_dir, data_file, tmp_path):
    """`lowrax train train.output_dir=RUN train.steps=4` (no preset) continues a finished run with its own
    settings; the summary covers all 4 steps and keeps the score from before the first."""
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **SCORED)]) == 0
    first = json.loads((run / "summary.json").read_text())
    assert main(["train", f"train.output_dir={run}", "train.steps=4"]) == 0
    extended = json.loads((run / "summary.json").read_text())
    assert extended["steps"] == 4 and len([r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                                            if "loss" in r]) == 4
    assert extended["metric_before"] == first["metric_before"]
    assert extended["samples_before"] == first["samples_before"]
    assert extended["train_seconds"] > first["train_seconds"]
    assert extended["final_loss"] is not None and extended["checkpoint_bytes"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4


def test_a_crash_after_the_last_checkpoint_is_finished_on_rerun(tiny_dir, data_file, tmp_path):
    """The final checkpoint exists but summary.json was never written: the rerun trains nothing,
    and writes a summary with the run's own figures, not empty ones."""
    run = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_dir, data_file, run, 2, **SCORED))
    first = run_training(cfg, **QUIET)
    (run / "summary.json").unlink()
    again = run_training(cfg, **QUIET)
    assert again["steps"] == 2 and again["train_seconds_this_run"] < first["train_seconds"]
    assert again["final_loss"] == first["final_loss"] and again["train_seconds"] == pytest.approx(first["train_seconds"], rel=0.05)
    assert again["metric_before"] == first["metric_before"] and again["checkpoint_bytes"] == first["checkpoint_bytes"]


def test_steps_zero_scores_the_starting_model_and_saves_nothing_else(tiny_dir, data_file, tmp_path, capsys):
    """`train.steps=0`: the held-out loss and metric of the model as training starts it, and no adapter,
    checkpoint or loss curve; a later run in the same directory trains normally."""
    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_dir, data_file, run, 0, **SCORED)]) == 0
    out = capsys.readouterr().out
    assert "held-out loss before training:" in out and "exact_match before training:" in out
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["config.yaml", "summary.json"]
    scored = json.loads((run / "summary.json").read_text())
    assert scored["steps"] == 0 and scored["eval_loss_before"] > 0 and "metric_before" in scored

    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **SCORED)]) == 0
    trained = json.loads((run / "summary.json").read_text())
    assert trained["steps"] == 2 and trained["eval_loss_before"] == pytest.approx(scored["eval_loss_before"])
    assert (run / "adapter" / "adapter_model.safetensors").exists()


def test_save_every_zero_keeps_only_the_adapter(tiny_dir, data_file, tmp_path, capsys):
    """`train.save_every=0`: no checkpoint at all; the finished run is recognised by its summary, and
    generate / export-peft / merge use its adapter."""
    run = tmp_path / "run"
    args = overrides(tiny_dir, data_file, run, 2, **{"train.save_every": 0, "lora.dropout": 0.0})
    assert main(["train", *args]) == 0
    assert "no checkpoint (train.save_every=0)" in capsys.readouterr().out
    assert not (run / "checkpoints").exists()
    summary = (run / "summary.json").read_bytes()
    assert main(["train", *args]) == 0
    assert "holds a finished run" in capsys.readouterr().out and (run / "summary.json").read_bytes() == summary

    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == \
        (run / "adapter" / "adapter_model.safetensors").read_bytes()
    from lowrax.train.runs import load_adapted

    restored = load_adapted(run)
    from_adapter = load_adapted(run / "adapter", model_path=str(tiny_dir))
    ids = np.arange(1, 9, dtype=np.int32)[None]
    np.testing.assert_allclose(np.asarray(restored.model.apply(restored.params, ids)),
                               np.asarray(from_adapter.model.apply(from_adapter.params, ids)), atol=1e-6)

    longer = overrides(tiny_dir, data_file, run, 3, **{"train.save_every": 0, "lora.dropout": 0.0})
    assert main(["train", *longer]) == 0
    assert "no checkpoint to continue from (train.save_every=0): training starts over" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_import_peft_then_the_obvious_train_command_continues(tiny_dir, data_file, finished_run, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"data": {"source": str(data_file), "seq_len": 16, "eval_fraction": 0.25},
                                      "optim": {"learning_rate": 0.01},
                                      "train": {"batch_size": 4, "eval_examples": 4, "samples": 1,
                                                "eval_max_new_tokens": 4}}))
    imported = tmp_path / "imported"
    # No --model: the adapter names its base (the tiny model's absolute path).
    assert main(["import-peft", str(finished_run / "adapter"), str(imported), str(preset)]) == 0
    assert f"lowrax train train.output_dir={imported}" in capsys.readouterr().out
    saved = yaml.safe_load((imported / "config.yaml").read_text())
    assert saved["data"]["source"] == str(data_file) and saved["lora"]["r"] == 2  # the preset's data, the adapter's r
    assert main(["train", f"train.output_dir={imported}", "train.steps=2"]) == 0
    summary = json.loads((imported / "summary.json").read_text())
    # the imported adapter is scored before training continues, so nothing reads "nan before"
    assert summary["steps"] == 2 and summary["metric_before"] is not None
    assert "not scored before" not in capsys.readouterr().out


def test_adapters_name_their_base_model(finished_run, tiny_dir):
    config = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir.resolve())
    from lowrax.models.pretrained import EMBEDDED_HUB_ID, base_model_name, base_model_path

    assert base_model_name(None) == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_path(EMBEDDED_HUB_ID) is None  # read back as the embedded model
    with pytest.raises(lowrax.LowraxError, match="not a local path"):
        base_model_path("someone/unknown-model")


def test_generate_with_a_run_or_its_adapter(finished_run, tiny_dir, tmp_path, capsys):
    """`lowrax generate --adapter` on a run, its adapter directory and an exported copy gives the trained
    model's text; `--chat auto` prompts as the run was trained (without the template)."""
    from lowrax.train.runs import restore_run

    _, model, params = restore_run(finished_run)
    tokenizer = lowrax.load_tokenizer(tiny_dir)
    assert tokenizer.chat_template  # so that auto choosing "off" is a choice
    expected = lowrax.generate(model, params, tokenizer, ["Repeat cat:"], max_new_tokens=6, chat=False)[0]
    with_template = lowrax.generate(model, params, tokenizer, ["Repeat cat:"], max_new_tokens=6, chat=True)[0]
    assert expected != with_template  # so the outputs below show which way each prompt was encoded
    assert main(["export-peft", str(finished_run), str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    for source in (finished_run, finished_run / "adapter", tmp_path / "exported"):
        assert main(["generate", "--adapter", str(source), "--max-new-tokens", "6", "Repeat cat:"]) == 0
        out = capsys.readouterr().out
        text = out.split(">>> Repeat cat:\n", 1)[1].rsplit("\n\n", 1)[0]
        if source == tmp_path / "exported":
            assert text == with_template  # a lone PEFT directory: the tokenizer's default (its template)
        else:
            assert text == expected
    assert main(["generate", "--adapter", str(tmp_path / "exported"), "--chat", "off", "--max-new-tokens", "6",
                 "Repeat cat:"]) == 0
    assert capsys.readouterr().out.split(">>> Repeat cat:\n", 1)[1].rsplit("\n\n", 1)[0] == expected


def test_chat_streams_replies_and_keeps_the_conversation(finished_run, tiny_dir, monkeypatch, capsys):
    from lowrax.cli.chat import StreamPrinter, chat_ids
    from lowrax.models.generate import eos_ids, generate_ids
    from lowrax.train.runs import restore_run

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd again\n/reset\nHello there\n/exit\n"))
    assert main(["chat", "--adapter", str(finished_run), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "trained on prompts without the chat template" in captured.err
    lines = captured.out.splitlines()
    assert lines[0] == "you> Hello there" and "(conversation cleared)" in lines  # piped: both turns marked
    replies = [line.removeprefix("assistant> ") for line in lines if line.startswith("assistant> ")]
    first, second, after_reset = replies[:3]

    _, model, params = restore_run(finished_run)
    tok = lowrax.load_tokenizer(tiny_dir)
    stops = eos_ids(tok, model)
    turn1 = [{"role": "user", "content": "Hello there"}]
    ids = generate_ids(model, params, [chat_ids(tok, turn1)], 5, eos_token_ids=stops, pad_token_id=tok.pad_token_id)[0]
    reply = tok.decode([i for i in ids if i not in stops], skip_special_tokens=True)
    assert first == reply and after_reset == reply  # /reset forgot the first exchange
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And again"}]
    ids = generate_ids(model, params, [chat_ids(tok, turn2)], 5, eos_token_ids=stops, pad_token_id=tok.pad_token_id)[0]
    assert second == tok.decode([i for i in ids if i not in stops], skip_special_tokens=True)

    # Streaming: text is written as tokens arrive, a byte-split character only once complete.
    writes = []

    class Out:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    printer = StreamPrinter(tok, Out(), set(stops))
    for token in tok("héllo wörld", add_special_tokens=False)["input_ids"]:
        printer(np.array([token]))
    printer.finish()
    assert "".join(writes) == "héllo wörld\n" and len([w for w in writes if w]) > 2
    assert not any("\ufffd" in w for w in writes)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(finished_run, tiny_dir, tmp_path, umask):
    from lowrax.train.runs import restore_run

    _, model, params = restore_run(finished_run)
    old = os.umask(umask)
    try:
        out = lowrax.save_peft(params, tmp_path / "adapter", model)
        merged = lowrax.save_pretrained(lowrax.merge(params), model, tmp_path / "merged")
    finally:
        os.umask(old)
    for path in [out, *out.iterdir(), merged, *merged.iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_cli_errors_use_the_cli_spelling(finished_run, tmp_path, capsys):
    target = tmp_path / "merged"
    assert main(["export-peft", str(finished_run), str(target)]) == 0  # a directory lowrax wrote
    assert main(["merge", str(finished_run), str(target)]) == 2
    err = capsys.readouterr().err
    assert "add --overwrite" in err and "overwrite=True" not in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")  # a user's: --overwrite is not offered, nor taken
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(finished_run), str(tmp_path / "mine"), *extra]) == 2
        assert "was not written by lowrax" in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    assert main(["generate", "--temperature", "-1", "hi"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(tmp_path), "hi"]) == 2
    assert "neither a lowrax run directory" in capsys.readouterr().err
    # the Python API keeps the Python spelling
    from lowrax.train.runs import restore_run

    _, model, params = restore_run(finished_run)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        lowrax.save_peft(params, target, model)


def test_scoring_shows_progress(tiny_dir, data_file, tmp_path, capsys):
    run_training(load_config(None, overrides(tiny_dir, data_file, tmp_path / "run", 1, **SCORED)), progress=True,
                 log=lambda *_: None)
    err = capsys.readouterr().err
    assert "scoring before training" in err and "scoring after training" in err
