"""`lowrax train` with objective dpo / orpo / simpo / kto / distill on a tiny llama with SmolLM2's
tokenizer: outputs and metrics, the precomputed reference, preference data forms and their
errors, the distillation teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.train.config import DataSection, load_config
from lowrax.train.preference_data import encode_pairs, encode_unpaired
from lowrax.train.trainer import run_training
from tests.conftest import tiny_bert_dir, tiny_llama_dir

WORDS = ["cat", "dog", "sun", "sea", "red", "blue", "tree", "rock"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": f"Repeat {w}:", "chosen": f" {w} {w}", "rejected": f" {w} {WORDS[(i + 1) % len(WORDS)]}"}
            for i, w in enumerate(WORDS * 3)]
    return _jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    rows = [r for w in WORDS * 3 for r in ({"prompt": f"Repeat {w}:", "completion": f" {w} {w}", "label": True},
                                             {"prompt": f"Repeat {w}:", "completion": f" {w} moon", "label": False})]
    return _jsonl(tmp_path_factory.mktemp("kto") / "kto.jsonl", rows)


def _config(tiny_dir, out, objective, source, steps=6, **extra):
    items = {"model.path": str(tiny_dir), "objective": objective, "data.source": str(source), "data.seq_len": 16,
             "lora.r": 4, "lora.target_modules": "all-linear", "optim.learning_rate": 0.02, "train.steps": steps,
             "train.batch_size": 4, "train.save_every": 0, "train.output_dir": str(out), "train.eval_examples": 0,
             "train.samples": 0, "optim.warmup_steps": 0}
    items.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_raises_held_out_preference_accuracy_and_logs_trl_metrics(tiny_dir, pairs_file, tmp_path):
    out, said = tmp_path / "dpo", []
    summary = run_training(_config(tiny_dir, out, "dpo", pairs_file, steps=8, **{"data.eval_source": str(pairs_file),
                                                                                  "preference.beta": 0.5,
                                                                                  "train.eval_examples": 16}),
                           progress=False, log=said.append)
    assert any("on the first 16 of 24 (train.eval_examples) held-out pairs" in line for line in said), said
    assert summary["metric"] == "preference_accuracy" and summary["objective"] == "dpo"
    assert summary["metric_after"] > summary["metric_before"]
    assert summary["eval_rewards/accuracies_after"] > 0.5
    rows = _rows(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(rows[0])
    assert rows[0]["rewards/margins"] == 0.0  # the first step's policy is the reference (LoRA B = 0)
    assert rows[-1]["rewards/margins"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()


def test_precomputed_reference_trains_exactly_as_the_in_step_one(tiny_dir, pairs_file, tmp_path):
    runs = {}
    for reference in ("adapters_off", "precomputed"):
        out = tmp_path / reference
        run_training(_config(tiny_dir, out, "dpo", pairs_file, steps=3, **{"preference.reference": reference}),
                     progress=False, log=lambda *_: None)
        runs[reference] = [r["loss"] for r in _rows(out) if "loss" in r]
    np.testing.assert_allclose(runs["precomputed"], runs["adapters_off"], rtol=1e-5)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_objectives_train(tiny_dir, pairs_file, tmp_path, objective):
    out = tmp_path / objective
    summary = run_training(_config(tiny_dir, out, objective, pairs_file, steps=6,
                                   **{"data.eval_source": str(pairs_file), "preference.beta": 1.0,
                                      "train.eval_examples": 24}),
                           progress=False, log=lambda *_: None)
    # on the same held-out pairs, the chosen completions' mean log-probs move above the rejected ones'
    assert summary["eval_rewards/margins_after"] > summary["eval_rewards/margins_before"]
    if objective == "orpo":
        assert {"nll_loss", "log_odds_chosen", "log_odds_ratio"} <= set(_rows(out)[0])


def test_kto_run_from_unpaired_records(tiny_dir, unpaired_file, pairs_file, tmp_path):
    out = tmp_path / "kto"
    summary = run_training(_config(tiny_dir, out, "kto", unpaired_file, steps=6,
                                   **{"data.eval_source": str(pairs_file), "train.eval_examples": 24}), progress=False,
                           log=lambda *_: None)
    rows = _rows(out)
    assert "kl" in rows[0] and rows[0]["kl"] == 0.0  # policy = reference at the first step
    assert summary["metric_after"] >= summary["metric_before"]
    # the reference precomputed before training (each batch's mismatched KL rows included) trains identically
    run_training(_config(tiny_dir, tmp_path / "kto-pre", "kto", unpaired_file, steps=6,
                         **{"preference.reference": "precomputed", "data.eval_source": str(pairs_file)}),
                 progress=False, log=lambda *_: None)
    np.testing.assert_allclose([r["loss"] for r in _rows(tmp_path / "kto-pre")], [r["loss"] for r in rows], rtol=1e-5)
    # kl is a difference of log-probs near -20 (float32 ulp ~2e-6), computed in two programs
    np.testing.assert_allclose([r["kl"] for r in _rows(tmp_path / "kto-pre")], [r["kl"] for r in rows], atol=1e-5)


def test_preference_records_and_their_errors():
    tokenizer = lowrax.load_tokenizer(None)
    cfg = DataSection(chat_template=True)
    standard = encode_pairs(tokenizer, [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}], cfg)[0]
    chat = encode_pairs(tokenizer, [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"}],
                                     "rejected": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "no"}]}], cfg)[0]
    assert standard.prompt == chat.prompt  # the implicit prompt is the shared turn, rendered with the template
    assert tokenizer.decode(chat.completions[0]).startswith("yes")
    with pytest.raises(LowraxError, match="record 2 needs the fields chosen, rejected; missing rejected"):
        encode_pairs(tokenizer, [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], cfg)
    with pytest.raises(LowraxError, match="share every turn but their last"):
        encode_pairs(tokenizer, [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "b"}]}],
                     cfg)
    with pytest.raises(LowraxError, match="must both be strings or both lists"):
        encode_pairs(tokenizer, [{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}],
                     cfg)
    with pytest.raises(LowraxError, match="must be a boolean"):
        encode_unpaired(tokenizer, [{"prompt": "a", "completion": "b", "label": "maybe"}], cfg)
    with pytest.raises(LowraxError, match="both desirable"):
        encode_unpaired(tokenizer, [{"prompt": "a", "completion": "b", "label": True}], cfg)


def test_sft_records_for_a_paired_objective_are_refused(tiny_dir, tmp_path):
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}] * 8)
    with pytest.raises(LowraxError, match="trains on pairs: records need the fields chosen and rejected"):
        run_training(_config(tiny_dir, tmp_path / "x", "dpo", sft), progress=False, log=lambda *_: None)
    with pytest.raises(LowraxError, match="objective must be one of"):
        load_config(None, ["objective=ppo"])


def test_reference_refusals_for_methods_that_move_or_replace_the_base(tiny_dir, pairs_file, tmp_path):
    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    import jax

    delta = lowrax.wrap(params, lowrax.LoraConfig(r=2, variant="delta_lora"), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="precompute the reference"):
        lowrax.adapters_off(delta)
    lowrax.adapters_off(delta, allow_moving_base=True)  # before the first step the base is still W0
    pissa = lowrax.wrap(params, lowrax.LoraConfig(r=2, init="pissa"), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="PiSSA"):
        lowrax.adapters_off(pissa)
    # Delta-LoRA trains with DPO when the reference is precomputed
    out = tmp_path / "delta"
    run_training(_config(tiny_dir, out, "dpo", pairs_file, steps=2, **{"lora.variant": "delta_lora",
                                                                        "preference.reference": "precomputed"}),
                 progress=False, log=lambda *_: None)
    assert len([r for r in _rows(out) if "loss" in r]) == 2


@pytest.fixture(scope="module")
def teacher_run(tiny_dir, tmp_path_factory):
    """A short SFT run: the teacher of the distillation tests."""
    data = _jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl",
                  [{"prompt": f"Repeat {w}:", "response": f" {w} {w}"} for w in WORDS * 4])
    out = tmp_path_factory.mktemp("teacher")
    run_training(_config(tiny_dir, out, "sft", data, steps=6, **{"optim.learning_rate": 0.05}), progress=False,
                 log=lambda *_: None)
    return out, data


@pytest.mark.parametrize("beta,hard", [(0.0, 0.3)])  # forward KL (other betas: tests/test_distill.py)
def test_distillation_moves_the_student_toward_the_teacher(tiny_dir, teacher_run, tmp_path, beta, hard):
    teacher, data = teacher_run
    out = tmp_path / "student"
    run_training(_config(tiny_dir, out, "distill", data, steps=6, **{"distill.teacher": str(teacher),
                                                                     "distill.beta": beta,
                                                                     "distill.hard_label_weight": hard,
                                                                     "optim.learning_rate": 0.05}),
                 progress=False, log=lambda *_: None)
    rows = [r for r in _rows(out) if "divergence" in r]
    assert rows[-1]["divergence"] < 0.5 * rows[0]["divergence"]
    if hard:
        np.testing.assert_allclose(rows[0]["loss"], (1 - hard) * rows[0]["divergence"] + hard * rows[0]["hard_loss"],
                                   rtol=1e-5)


def test_distillation_teacher_errors(tiny_dir, teacher_run, tmp_path, monkeypatch):
    _, data = teacher_run
    monkeypatch.chdir(tmp_path)  # no runs/default here
    with pytest.raises(LowraxError, match="train it first"):
        run_training(_config(tiny_dir, tmp_path / "a", "distill", data), progress=False, log=lambda *_: None)
    with pytest.raises(LowraxError, match="different tokenizer"):
        run_training(_config(tiny_dir, tmp_path / "b", "distill", data,
                             **{"distill.teacher": str(lowrax.embedded_minilm_path())}),
                     progress=False, log=lambda *_: None)


def test_classifier_distillation_on_an_encoder(tmp_path_factory, tmp_path):
    """An encoder classifier run (a BERT + LoRA + head) teaches a fresh student: teacher logits plus labels."""
    data = tmp_path / "sentiment.csv"
    rows = ["text,label"] + [f"{w} movie,{lab}" for w, lab in [("great", 1), ("awful", 0), ("lovely", 1), ("boring", 0)] * 6]
    data.write_text("\n".join(rows) + "\n")
    common = [f"model.path={tiny_bert_dir(tmp_path_factory)}", "model.task=classification", "model.num_labels=2",
              f"data.source={data}", "data.seq_len=8", "data.eval_fraction=0.25", "optim.learning_rate=0.02",
              "train.batch_size=8", "train.samples=0", "train.save_every=0"]
    teacher = tmp_path / "teacher"
    run_training(load_config(None, common + ["train.steps=6", f"train.output_dir={teacher}"]), progress=False,
                 log=lambda *_: None)
    out = tmp_path / "student"
    summary = run_training(load_config(None, common + ["objective=distill", f"distill.teacher={teacher}",
                                                       "distill.temperature=2.0", "distill.hard_label_weight=0.5",
                                                       "train.steps=6", "train.seed=1", f"train.output_dir={out}"]),
                           progress=False, log=lambda *_: None)
    rows = [r for r in _rows(out) if "divergence" in r]
    assert rows[-1]["divergence"] < rows[0]["divergence"]
    np.testing.assert_allclose(rows[0]["loss"], 0.5 * rows[0]["divergence"] + 0.5 * rows[0]["hard_loss"], rtol=1e-5)
    assert summary["metric"] == "accuracy" and "teacher_metric" in summary


def test_student_completions_replace_each_rows_completion(tiny_dir, teacher_run):
    """On-policy rows: the same prompts, the student's greedy continuation as the completion, loss on it only."""
    from lowrax.models.generate import generate_ids
    from lowrax.train.data import Batches, encode_all, load_records
    from lowrax.train.on_policy import is_on_policy_step, row_prompts, with_student_completions

    _, data = teacher_run
    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    tokenizer = lowrax.load_tokenizer(tiny_dir)
    cfg = DataSection(source=str(data), seq_len=16)
    encoded = encode_all(tokenizer, load_records(cfg)[0], cfg, "causal_lm")
    batch = Batches(encoded, 16, 4, seed=0, loss_positions=8).batch(0)
    out = with_student_completions(model, params, batch, max_new_tokens=5, temperature=0.0, eos_token_id=None,
                                   pad_id=0, seed=0)
    prompts = row_prompts(batch)
    generated = generate_ids(model, params, prompts, 5)
    for row, (prompt, new) in enumerate(zip(prompts, generated)):
        n = len(prompt)
        assert out["input_ids"][row, :n].tolist() == prompt and out["input_ids"][row, n: n + 5].tolist() == new
        assert out["loss_mask"][row].tolist() == [0] * n + [1] * 5 + [0] * (16 - n - 5)
        assert out["loss_weights"][row].sum() == 5 and out["loss_targets"][row, :5].tolist() == new
    shares = [is_on_policy_step(0.5, 0, step) for step in range(200)]
    assert 0.4 < np.mean(shares) < 0.6 and shares == [is_on_policy_step(0.5, 0, step) for step in range(200)]


def test_on_policy_distillation_run(tiny_dir, teacher_run, tmp_path):
    teacher, data = teacher_run
    out = tmp_path / "on-policy"
    run_training(_config(tiny_dir, out, "distill", data, steps=2, **{"distill.teacher": str(teacher),
                                                                     "distill.on_policy": 1.0,
                                                                     "distill.generation_tokens": 4}),
                 progress=False, log=lambda *_: None)
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["on_policy"] for r in rows] == [1, 1] and all(r["divergence"] > 0 for r in rows)
    with pytest.raises(LowraxError, match="on_policy has the student generate"):
        load_config(None, ["model.task=classification", "objective=distill", "distill.on_policy=0.5"])


def test_teacher_logits_stored_on_disk_train_as_the_in_step_teacher(tiny_dir, teacher_run, tmp_path):
    teacher, data = teacher_run
    store = tmp_path / "teacher-logits"
    common = {"distill.teacher": str(teacher), "distill.beta": 0.5}
    losses = {}
    for name, extra in (("in_step", {}), ("stored", {"distill.teacher_logits": str(store)})):
        run_training(_config(tiny_dir, tmp_path / name, "distill", data, steps=2, **common, **extra), progress=False,
                     log=lambda *_: None)
        losses[name] = [r["loss"] for r in _rows(tmp_path / name) if "loss" in r]
    # the tiny teacher is close to its student (losses ~1e-5), so float16 storage shows at the percent level
    np.testing.assert_allclose(losses["stored"], losses["in_step"], rtol=2e-2)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["vocab"] == 49152 and meta["examples"] > 0
    # the stored logits are the teacher's own at each example's completion positions, to float16 precision
    from lowrax.objectives.logps import logits_at
    from lowrax.train.data import Batches, encode_all, load_records
    from lowrax.train.runs import restore_run

    _, teacher_model, teacher_params = restore_run(teacher)
    cfg = DataSection(source=str(data), seq_len=16)
    encoded = encode_all(lowrax.load_tokenizer(tiny_dir), load_records(cfg)[0], cfg, "causal_lm")
    batch = Batches(encoded, 16, 2, seed=0, loss_positions=meta["loss_positions"]).rows_batch([[0], [1]])
    hidden = teacher_model.final_hidden(teacher_params, batch["input_ids"], batch["attention_mask"])
    expected = np.asarray(logits_at(teacher_model, teacher_params, hidden, batch["loss_positions"]))
    stored = np.load(store / "logits.npy")[:2].astype(np.float32)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=1e-4)
    written = (store / "logits.npy").stat().st_mtime_ns
    run_training(_config(tiny_dir, tmp_path / "again", "distill", data, steps=1, **common,
                         **{"distill.teacher_logits": str(store)}), progress=False, log=lambda *_: None)
    assert (store / "logits.npy").stat().st_mtime_ns == written  # reused, not recomputed
    with pytest.raises(LowraxError, match="holds teacher logits for other data"):
        run_training(_config(tiny_dir, tmp_path / "other", "distill", data, steps=1, **common,
                             **{"distill.teacher_logits": str(store), "data.eval_fraction": 0.25}),
                     progress=False, log=lambda *_: None)
    with pytest.raises(LowraxError, match="use one or the other"):
        load_config(None, ["objective=distill", f"distill.teacher_logits={store}", "distill.on_policy=0.5"])
