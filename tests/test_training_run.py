"""`run_training` end to end on a tiny llama with SmolLM2's tokenizer: outputs, resume, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lowrax
from lowrax.train.config import load_config
from lowrax.errors import LowraxError
from lowrax.train.trainer import run_training
from tests.conftest import tiny_bert_dir, tiny_llama_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Repeat {w}:", "response": f" {w} {w}"} for w in ["cat", "dog", "sun", "sea", "red", "blue"] * 8]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(tiny_dir, data_file, out, steps, **extra):
    items = {"model.path": str(tiny_dir), "data.source": str(data_file), "data.seq_len": 16, "data.eval_fraction": 0.25,
             "lora.r": 2, "lora.target_modules": "all-linear", "lora.dropout": 0.1, "optim.learning_rate": 0.01,
             "optim.total_steps": 6, "train.steps": steps, "train.batch_size": 4, "train.save_every": 2,
             "train.output_dir": str(out), "train.eval_examples": 0, "train.samples": 0, "train.eval_max_new_tokens": 4}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


SCORED = {"train.eval_examples": 4, "train.samples": 1}  # the task metric and samples (off in the other runs)


def test_run_writes_outputs_and_resume_reproduces_losses(tiny_dir, data_file, tmp_path):
    full = tmp_path / "full"
    summary = run_training(load_config(None, overrides(tiny_dir, data_file, full, 4, **SCORED)), progress=False,
                           log=lambda *_: None)
    assert {p.name for p in full.iterdir()} >= {"adapter", "checkpoints", "config.yaml", "metrics.jsonl", "loss.png", "summary.json"}
    assert summary["metric"] == "exact_match" and "metric_before" in summary and "metric_after" in summary
    assert summary["adapter_bytes"] > 0 and summary["checkpoint_bytes"] > 0

    # Interrupted after 2 steps (the last checkpoint), then resumed to 4: the same losses.
    part = tmp_path / "part"
    run_training(load_config(None, overrides(tiny_dir, data_file, part, 2, **SCORED)), progress=False, log=lambda *_: None)
    run_training(load_config(None, overrides(tiny_dir, data_file, part, 4, **SCORED)), progress=False, log=lambda *_: None)
    assert len(losses(part)) == 4
    assert np.allclose(losses(part), losses(full), rtol=0, atol=1e-6)

    # The exported adapter loads back onto the base and reproduces the trained model.
    model, base = lowrax.load_pretrained(tiny_dir, progress=False)
    loaded = lowrax.load_peft(base, full / "adapter", model)
    assert lowrax.count_params(lowrax.split(loaded)[0]) == summary["trainable_params"]


def test_resume_into_a_different_configuration_is_refused(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    run_training(load_config(None, overrides(tiny_dir, data_file, out, 2)), progress=False, log=lambda *_: None)
    with pytest.raises(LowraxError, match=r"different configuration \(lora\.r\)"):
        run_training(load_config(None, overrides(tiny_dir, data_file, out, 4, **{"lora.r": 4})), progress=False)


def test_unknown_config_key_names_the_closest():
    with pytest.raises(LowraxError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_config(None, ["train.stpes=3"])
    with pytest.raises(LowraxError, match=r"unknown config key 'lora.lora_alpha'; did you mean 'lora.alpha'"):
        load_config(None, ["lora.lora_alpha=3"])


def test_exponent_floats_are_floats_in_overrides_and_files(tmp_path):
    """`3e-4` is a string to PyYAML (YAML 1.1 wants `3.0e-4`); configs read it as the float it means."""
    assert load_config(None, ["optim.learning_rate=3e-4"]).optim.learning_rate == 3e-4
    (tmp_path / "c.yaml").write_text("optim:\n  learning_rate: 5E-3\n  weight_decay: 1e-2\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay) == (5e-3, 1e-2)


def test_dataset_missing_fields_is_named(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(LowraxError, match=r"need the fields messages or prompt\+response or text; found fields: answer, question"):
        run_training(load_config(None, [f"model.path={tiny_dir}", f"data.source={bad}", f"train.output_dir={tmp_path / 'o'}"]),
                     progress=False)


@pytest.mark.parametrize("method", [["lora.r=4"], ["method=ia3"], ["method=loha", "loha.r=2"], ["method=lokr", "lokr.r=2"],
                                    ["method=oft", "oft.oft_block_size=32"],
                                    ["method=ln_tuning", "ln_tuning.target_modules=[LayerNorm]"],
                                    ["method=adalora", "adalora.init_r=4", "adalora.target_r=2"],
                                    ["method=bottleneck", "bottleneck.preset=houlsby"],
                                    ["method=prompt_tuning", "prompt_tuning.num_virtual_tokens=4"],
                                    ["method=p_tuning", "p_tuning.num_virtual_tokens=4"]],
                         ids=["lora", "ia3", "loha", "lokr", "oft", "ln_tuning", "adalora", "bottleneck", "prompt_tuning",
                              "p_tuning"])
def test_classification_run_on_minilm(tmp_path, tiny_bert, method):
    """Each method but prefix tuning fine-tunes a BERT as a classifier (a fresh head trained in full),
    and its adapter loads back with that head: LoRA on the embedded MiniLM, the others on a tiny
    random BERT with its vocabulary (the same code path, in a fraction of the time)."""
    data = tmp_path / "sentiment.csv"
    rows = ["text,label"] + [f"{w} movie,{lab}" for w, lab in [("great", 1), ("awful", 0), ("lovely", 1), ("boring", 0)] * 6]
    data.write_text("\n".join(rows) + "\n")
    base_dir = lowrax.embedded_minilm_path() if method == ["lora.r=4"] else tiny_bert
    cfg = load_config(None, [f"model.path={base_dir}", "model.task=classification", "model.num_labels=2",
                             f"data.source={data}", "data.seq_len=8", "data.eval_fraction=0.25", *method,
                             "optim.learning_rate=0.01", "train.steps=2", "train.batch_size=8", "train.samples=0",
                             f"train.output_dir={tmp_path / 'out'}"])
    summary = run_training(cfg, progress=False, log=lambda *_: None)
    assert summary["metric"] == "accuracy" and 0.0 <= summary["metric_after"] <= 1.0
    model, base = lowrax.load_pretrained(base_dir, num_labels=None, progress=False)
    import jax

    model, base = model.with_classification_head(base, 2, jax.random.key(0))
    loaded = lowrax.load_peft(base, tmp_path / "out" / "adapter", model)
    assert "classifier" in lowrax.split(loaded)[0]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    # PEFT records the task; AdapterHub (bottleneck adapters) the model class, its head beside the adapter
    assert config.get("task_type", config.get("model_class")) in ("SEQ_CLS", "BertForSequenceClassification")


def test_cli_export_import_merge(tiny_dir, data_file, tmp_path):
    from lowrax.cli import main
    from lowrax.train.runs import restore_run

    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **{"lora.dropout": 0.0})]) == 0
    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0

    _, model, params = restore_run(run)
    ids = np.array([[1, 50, 300, 7000, 12]])
    adapted = np.asarray(model.apply(params, ids))
    _, merged = lowrax.load_pretrained(tmp_path / "merged", progress=False)
    assert np.abs(np.asarray(model.apply(merged, ids)) - adapted).max() <= 1e-5
    torch = pytest.importorskip("torch", reason="the transformers check needs torch (pip install -e .[test])")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - adapted).max() <= 1e-4
    # a second merge into the same place is refused rather than clobbering it
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 2


def test_qlora_run_merges_with_requantization(tiny_dir, data_file, tmp_path):
    from lowrax.cli import main

    run = tmp_path / "qrun"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **{"model.quantize": "nf4", "model.quant_blocksize": 32})]) == 0
    assert main(["merge", "--requantize", str(run), str(tmp_path / "merged4")]) == 0
    report = json.loads((tmp_path / "merged4" / "merge_report.json").read_text())
    assert 0 <= report["worst"]["relative"] < 0.2
    config = json.loads((tmp_path / "merged4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model, params = lowrax.load_pretrained(tmp_path / "merged4", progress=False)
    assert type(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]).__name__ == "NF4Tensor"


@pytest.mark.parametrize("variant", [{"lora.variant": "dora"}, {"lora.variant": "vera", "lora.r": 4, "optim.learning_rate": 0.1},
                                     {"lora.variant": "delta_lora", "lora.dropout": 0.0, "lora.delta_start_step": 1},
                                     {"lora.init": "pissa", "optim.loraplus_lr_ratio": 4},
                                     {"lora.init": "corda", "lora.calibration_rows": 4},
                                     {"lora.init": "lora_ga", "lora.calibration_rows": 4}])
def test_variant_runs_export_and_merge(tiny_dir, data_file, tmp_path, variant):
    """`lowrax train lora.variant=...`: the run's PEFT adapter, its export and its merge all give the trained model."""
    from lowrax.cli import main

    run = tmp_path / "run"
    assert main(["train", *overrides(tiny_dir, data_file, run, 3, **variant)]) == 0
    check_exports_and_merge(run, tiny_dir, tmp_path)


def check_exports_and_merge(run, tiny_dir, tmp_path, merges=True):
    """A finished run's PEFT adapter equals its `export-peft`, and the exported adapter (over the
    original base weights) and `lowrax merge`'s model both give the trained model, which differs
    from the base. merges=False: the method cannot merge, and `lowrax merge` says so."""
    from lowrax.cli import main
    from lowrax.train.runs import restore_run

    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0  # the finished run's adapter/, copied
    # As an interrupted run exports (summary.json not yet written): restored from the newest checkpoint.
    (run / "summary.json").rename(run / "summary.json.aside")
    assert main(["export-peft", str(run), str(tmp_path / "peft-restored")]) == 0
    (run / "summary.json.aside").rename(run / "summary.json")
    weights = next(n for n in ("adapter_model.safetensors", "adapter.safetensors") if (run / "adapter" / n).exists())
    for exported in ("peft", "peft-restored"):  # PEFT's files, or AdapterHub's
        assert (tmp_path / exported / weights).read_bytes() == (run / "adapter" / weights).read_bytes()
    assert (main(["merge", str(run), str(tmp_path / "merged")]) == 0) == merges
    _, model, trained = restore_run(run)
    ids = np.array([[1, 50, 300, 7000, 12]])
    adapted = np.asarray(model.apply(trained, ids))
    _, base = lowrax.load_pretrained(tiny_dir, progress=False)
    assert np.abs(adapted - np.asarray(model.apply(base, ids))).max() > 1e-4  # training changed the model
    if merges:
        _, merged = lowrax.load_pretrained(tmp_path / "merged", progress=False)
        assert np.abs(np.asarray(model.apply(merged, ids)) - adapted).max() <= 1e-5
    else:
        assert not (tmp_path / "merged").exists()
    from_peft = lowrax.load_peft(base, tmp_path / "peft", model)
    assert np.abs(np.asarray(model.apply(from_peft, ids)) - adapted).max() <= 1e-5


def check_method_run(tiny_dir, data_file, tmp_path, method: str, settings: list[str], full: bool = True,
                     targets: str | None = "[q_proj,v_proj,down_proj]", peft_type: str | None = None):
    """`lowrax train method=METHOD` on `targets` (None: the method's default) writes PEFT's type (default
    METHOD in capitals), and its adapter imports and re-exports to the same bytes. full: also every export
    and merge path (`check_exports_and_merge`); without it the run is two steps with no checkpoint (the
    conformance suite covers merging and orbax)."""
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3 if full else 2,
                                  **({} if full else {"train.save_every": 0})) if not i.startswith("lora.")]
    items += [f"method={method}", *([f"{method}.target_modules={targets}"] if targets else []), *settings]
    assert main(["train", *items]) == 0
    written = json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"]
    assert written == (peft_type or method.upper())
    if full:
        check_exports_and_merge(run, tiny_dir, tmp_path)
    else:
        assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert ((tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes())


def test_a_text_run_reports_held_out_loss_and_perplexity_before_and_after(tiny_dir, tmp_path):
    text = tmp_path / "news.txt"
    text.write_text("".join(f"The {w} market rose by {n} points on {d}.\n" for w, n, d in
                            zip(["stock", "bond", "gold", "oil"] * 6, range(24), ["Monday", "Friday"] * 12)))
    common = {"data.source": text, "data.seq_len": 24, "optim.learning_rate": 0.01, "train.eval_examples": 4,
              "train.samples": 2}
    said = []
    summary = run_training(load_config(None, overrides(tiny_dir, text, tmp_path / "full", 2, **common)),
                           progress=False, log=said.append)
    lines = [line for line in said if line.startswith("held-out loss")]
    assert [line.split(":")[0] for line in lines] == ["held-out loss before training", "held-out loss after training"]
    assert all("(perplexity " in line and "on 6 examples" in line for line in lines), lines
    assert summary["eval_loss"] < summary["eval_loss_before"]
    quick = []
    summary = run_training(load_config(None, overrides(tiny_dir, text, tmp_path / "quick", 2, **common,
                                                       **{"train.quick": "true"})), progress=False, log=quick.append)
    assert "eval_loss_before" not in summary and "eval_loss" in summary
    assert not any("before training" in line or "[after]" in line for line in quick), quick


def test_epochs_set_the_steps_from_the_data(tiny_dir, data_file, tmp_path):
    """48 records, a quarter held out: 36 training rows; one epoch at batch 8 is 36 / 8 -> 5 steps."""
    said = []
    items = [i for i in overrides(tiny_dir, data_file, tmp_path / "run", 30, **{
        "train.epochs": 1, "train.batch_size": 8, "train.save_every": 0}) if not i.startswith("optim.total_steps=")]
    summary = run_training(load_config(None, items), progress=False, log=said.append)
    assert "train.epochs=1: 5 steps (36 rows per epoch, 8 per step)" in said
    assert summary["steps"] == 5 and len(losses(tmp_path / "run")) == 5
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.train.steps, saved.train.epochs, saved.optim.total_steps) == (5, 1, 5)


def test_eva_and_loftq_runs(tiny_dir, data_file, tmp_path, capsys):
    """`lowrax train lora.init=eva`: ranks redistributed over the layers (rank_pattern in the PEFT file), and a
    resumed run starts from the stored factors; `lora.init=loftq`: an NF4 base under the adapters; either one
    refused where it cannot work."""
    from lowrax.cli import main
    from lowrax.train.runs import restore_run

    run = tmp_path / "eva"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **{"lora.init": "eva", "lora.calibration_rows": 8,
                                                                      "lora.dropout": 0.0})]) == 0
    from lowrax.adapters.lora.calibrated import load_initial_factors

    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    ranks = {name: f["a"].shape[1] for name, f in load_initial_factors(run / "lora_init.safetensors").statistics.items()}
    assert sum(ranks.values()) <= 2 * 14  # EVA's budget: r for each of the 14 targets, moved between them
    assert adapter["rank_pattern"] == {name: r for name, r in ranks.items() if r != adapter["r"]}
    assert main(["train", *overrides(tiny_dir, data_file, run, 4, **{"lora.init": "eva", "lora.calibration_rows": 8,
                                                                      "lora.dropout": 0.0, "train.resume": True})]) == 0
    run = tmp_path / "loftq"
    assert main(["train", *overrides(tiny_dir, data_file, run, 2, **{"lora.init": "loftq", "lora.alpha": 2})]) == 0
    _, _, params = restore_run(run)
    node = params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
    assert type(node.base).__name__ == "NF4Tensor"
    assert main(["train", *overrides(tiny_dir, data_file, tmp_path / "x", 2,
                                     **{"lora.init": "loftq", "model.quantize": "nf4"})]) == 2
    assert "lora.init=loftq quantizes the targeted weights itself" in capsys.readouterr().err
    assert main(["train", *overrides(tiny_dir, data_file, tmp_path / "y", 2, **{"lora.init": "corda", "objective": "dpo"})]) == 2
    assert "lora.init=corda calibrates on the run's training batches" in capsys.readouterr().err
