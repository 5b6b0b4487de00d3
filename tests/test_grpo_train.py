"""`lowrax train` with objective grpo on a tiny llama with SmolLM2's tokenizer: prompts from a file with
their other columns reaching a user's reward function, TRL's metric names, one compiled step and rollout per
shape across steps, num_iterations' stored log-probs, truncated completions masked, resume, bad configs."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest

from lowrax.adapters.registry import method_names
from lowrax.errors import LowraxError
from lowrax.train import grpo_run
from lowrax.train.config import load_config
from lowrax.train.trainer import run_training
from tests.conftest import tiny_llama_dir

WORDS = ["cat", "dog", "sun", "sea", "red", "blue", "tree", "rock"]
REWARDS_MODULE = '''
SEEN = []

def short_and_topical(prompts, completions, **columns):
    SEEN.append({"prompts": prompts, "completions": completions, **columns})
    return [None if t == "skip" else -len(c) / 10 for c, t in zip(completions, columns["topic"])]
'''


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rows = [{"prompt": f"Say {w} {'twice' if i % 2 else 'once'}:", "answer": str(i), "topic": "skip" if i == 3 else w}
            for i, w in enumerate(WORDS * 2)]
    path = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "grpo_user_rewards.py").write_text(REWARDS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("grpo_user_rewards", None)
    import grpo_user_rewards

    return grpo_user_rewards


def _config(tiny_dir, out, source, steps=4, **extra):
    """The test run's config; an override given as None is left out."""
    items = {"model.path": str(tiny_dir), "objective": "grpo", "data.source": str(source), "data.seq_len": 16,
             "data.eval_source": str(source), "lora.r": 4, "lora.target_modules": "all-linear",
             "optim.learning_rate": 0.02, "optim.warmup_steps": 0, "train.steps": steps, "train.batch_size": 4,
             "train.save_every": 0, "train.output_dir": str(out), "train.eval_examples": 3, "train.samples": 0,
             "grpo.num_generations": 2, "grpo.max_completion_length": 6,
             "grpo.rewards": "[grpo_user_rewards:short_and_topical, final_number]"}
    items.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in items.items() if v is not None])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_scores_rollouts_with_every_column_and_logs_trl_metrics(tiny_dir, prompts_file, user_rewards, tmp_path):
    out, said = tmp_path / "run", []
    summary = run_training(_config(tiny_dir, out, prompts_file), progress=False, log=said.append)
    assert summary["objective"] == "grpo" and summary["metric"] == "reward"
    assert "metric_before" in summary and "metric_after" in summary
    assert any("held-out mean reward before training" in line for line in said), said
    training_calls = [c for c in user_rewards.SEEN if len(c["completions"]) == 4]  # 2 prompts x 2 completions
    assert len(training_calls) == 4  # one rollout per step
    call = training_calls[0]
    assert set(call) == {"prompts", "completions", "answer", "topic"}
    assert call["prompts"][0] == call["prompts"][1] and call["answer"][0] == call["answer"][1]  # a prompt's group
    assert all(isinstance(c, str) for c in call["completions"])
    rows = _rows(out)
    assert len(rows) == 4
    names = {"loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/short_and_topical/mean",
             "rewards/final_number/mean", "completions/mean_length", "completions/clipped_ratio", "entropy",
             "clip_ratio/region_mean", "rollout_seconds"}
    assert names <= set(rows[0]), names - set(rows[0])
    assert rows[0]["clip_ratio/region_mean"] == 0.0  # one update per rollout: the ratio is 1
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_later_steps_compile_nothing(tiny_dir, prompts_file, user_rewards, tmp_path, monkeypatch):
    compiles, at_step = [], {}

    def listener(name, _, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    prepare = grpo_run.GRPORun.prepare

    def counting(self, micro, state, frozen, step):
        at_step[step] = len(compiles)
        return prepare(self, micro, state, frozen, step)

    monkeypatch.setattr(grpo_run.GRPORun, "prepare", counting)
    try:
        run_training(_config(tiny_dir, tmp_path / "run", prompts_file, steps=5), progress=False, log=lambda *_: None)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert at_step[1] > at_step[0]  # the first step compiled the rollout and the step
    assert at_step[4] == at_step[1], at_step  # prompts of other lengths and new samples: nothing new


def test_num_iterations_reuses_a_rollout_with_its_sampling_log_probs(tiny_dir, prompts_file, user_rewards, tmp_path):
    out = tmp_path / "iter"
    run_training(_config(tiny_dir, out, prompts_file, steps=4, **{"grpo.num_iterations": 2}), progress=False,
                 log=lambda *_: None)
    rows = _rows(out)
    training_calls = [c for c in user_rewards.SEEN if len(c["completions"]) == 4]
    assert len(training_calls) == 2  # steps 1 and 3 sample; 2 and 4 update on the same completions
    assert "reward" in rows[0] and "reward" not in rows[1] and "reward" in rows[2]
    assert rows[0]["clip_ratio/region_mean"] == 0.0
    assert rows[1]["loss"] != rows[0]["loss"]  # the policy moved: a ratio away from 1 on the reused rollout


def test_truncated_completions_can_be_left_out_of_the_loss(tiny_dir, prompts_file, user_rewards, tmp_path):
    out = tmp_path / "masked"
    # two tokens per completion: nearly every completion of a random model runs out and carries no loss
    run_training(_config(tiny_dir, out, prompts_file, steps=2, **{"grpo.mask_truncated_completions": "true",
                                                                  "grpo.max_completion_length": 2}),
                 progress=False, log=lambda *_: None)
    rows = _rows(out)
    assert rows[0]["completions/clipped_ratio"] > 0.5
    truncated_only = [r for r in rows if r["completions/clipped_ratio"] == 1.0]
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in truncated_only)


def test_resumed_run_continues_with_the_same_losses(tiny_dir, prompts_file, user_rewards, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_training(_config(tiny_dir, whole, prompts_file, steps=4, **{"train.save_every": 2}), progress=False,
                 log=lambda *_: None)
    run_training(_config(tiny_dir, split, prompts_file, steps=2, **{"train.save_every": 2}), progress=False,
                 log=lambda *_: None)
    run_training(_config(tiny_dir, split, prompts_file, steps=4, **{"train.save_every": 2}), progress=False,
                 log=lambda *_: None)
    np.testing.assert_allclose([r["loss"] for r in _rows(split)], [r["loss"] for r in _rows(whole)], rtol=1e-5)


def test_the_reference_term_runs_with_adapters_off(tiny_dir, prompts_file, user_rewards, tmp_path):
    out = tmp_path / "kl"
    run_training(_config(tiny_dir, out, prompts_file, steps=3, **{"grpo.beta": 0.1, "grpo.loss_type": "grpo"}),
                 progress=False, log=lambda *_: None)
    rows = _rows(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B = 0: the policy is the reference
    assert rows[-1]["kl"] > 0


def example_settings(name: str) -> dict:
    """The method's settings as overrides of its section, from its first registered example (small enough for
    the tiny model, where PEFT's defaults, e.g. C3A's 256-wide blocks, are not)."""
    import dataclasses

    from lowrax.adapters.registry import method_named

    examples = method_named(name).examples
    if name == "lora" or not examples:
        return {}
    example = next(iter(examples.values()))()

    def default(f):  # a field's declared default (some configs have none to build: trainable tokens' ids)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    return {f"{name}.{f.name}": json.dumps(list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(example) if (v := getattr(example, f.name)) != default(f)}


@pytest.mark.parametrize("method, extra", [(name, example_settings(name)) for name in method_names()] +
                         [("lora", {"model.quantize": "nf4", "model.quant_blocksize": 32})])
def test_every_method_and_an_nf4_base_train_with_grpo(tiny_dir, prompts_file, user_rewards, tmp_path, method, extra):
    """Rollouts from the adapted model (virtual tokens in the generator's cache for prompt and prefix tuning,
    4-bit weights for NF4), and the KL term against the same model with its adapters off (which reads the
    base arrays beside the trained ones: LN tuning's trained copy must not share the step's donated buffer)."""
    config = _config(tiny_dir, tmp_path / method, prompts_file, steps=2,
                     **{"method": method, "grpo.beta": 0.1, "optim.learning_rate": 0.05, **extra},
                     **({} if method == "lora" else {"lora.r": None, "lora.target_modules": None}))
    run_training(config, progress=False, log=lambda *_: None)
    rows = _rows(tmp_path / method)
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows), rows
    assert all(r["kl"] >= 0 for r in rows)  # the tiny model's near-uniform outputs keep it at rounding level
    starts_adapted = method in ("prefix_tuning", "p_tuning", "prompt_tuning", "bottleneck")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) or starts_adapted


def test_a_pruned_base_keeps_its_zeros_through_grpo(tiny_dir, prompts_file, user_rewards, tmp_path):
    import lowrax
    from lowrax.train.runs import restore_run

    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    pruned, _ = lowrax.prune(params, model, np.random.default_rng(0).integers(3, 100, (2, 8)), method="magnitude",
                             sparsity=0.5, progress=False)
    pruned_dir = lowrax.save_pretrained(pruned, model, tmp_path / "pruned", tokenizer=lowrax.load_tokenizer(tiny_dir))
    out = tmp_path / "run"
    run_training(_config(pruned_dir, out, prompts_file, steps=2, **{"grpo.beta": 0.1, "train.save_every": 2}),
                 progress=False, log=lambda *_: None)
    assert all(np.isfinite(r["loss"]) for r in _rows(out))
    bases = lowrax.sparse_modules(restore_run(out)[2])
    assert bases
    for name, base in bases.items():
        assert not np.asarray(base.kernel)[~np.asarray(base.mask)].any(), name


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": 3}, "must be a multiple of grpo.num_generations"),
    ({"grpo.reward_weights": "[1.0]"}, "1 weights for 2 rewards"),
    ({"grpo.num_iterations": 2, "train.save_every": 3}, "train.save_every must be a multiple of it"),
    ({"grpo.rewards": "[regex_match]"}, "needs its pattern"),
    ({"grpo.rewards": "[no_such_reward]"}, "unknown reward 'no_such_reward'"),
    ({"grpo.rewards": "[grpo_user_rewards:missing]"}, "has no function 'missing'"),
    ({"model.task": "classification"}, "objective 'grpo' trains model.task causal_lm"),
])
def test_bad_settings_are_named(tiny_dir, prompts_file, user_rewards, tmp_path, overrides, message):
    with pytest.raises(LowraxError, match=message):
        run_training(_config(tiny_dir, tmp_path / "bad", prompts_file, **overrides), progress=False,
                     log=lambda *_: None)


def test_records_without_a_prompt_are_named(tiny_dir, user_rewards, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"question": "hi", "answer": "1"}) + "\n")
    with pytest.raises(LowraxError, match="training record 0 needs the field 'prompt'"):
        run_training(_config(tiny_dir, tmp_path / "out", source), progress=False, log=lambda *_: None)


def test_chat_prompts_make_lowrax_chat_use_the_template(tiny_dir, prompts_file, tmp_path):
    """`lowrax chat` on a GRPO run wraps what it is sent as the run's prompts were: in the chat template for
    conversational prompts and the embedded default, as text for text prompts."""
    from lowrax.train.runs import uses_chat_template

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}) + "\n")
    assert uses_chat_template(_config(tiny_dir, tmp_path / "a", chats))
    assert not uses_chat_template(_config(tiny_dir, tmp_path / "b", prompts_file))
    assert uses_chat_template(load_config(None, ["objective=grpo"]))


def test_reward_options_are_checked_with_the_config():
    """A built-in's missing or malformed option fails when the config is read, before any model loads."""
    with pytest.raises(LowraxError, match="needs its pattern"):
        load_config(None, ["objective=grpo", "grpo.rewards=[regex_match]"])
    with pytest.raises(LowraxError, match="unknown reward 'finalnumber'"):
        load_config(None, ["objective=grpo", "grpo.rewards=[finalnumber]"])
    load_config(None, ["objective=grpo", "grpo.rewards=[my_package.rewards:score]"])  # imported when the run starts


def test_an_override_only_grpo_run_starts_from_the_grpo_preset(tmp_path, monkeypatch):
    from lowrax.cli.main import train_config

    monkeypatch.chdir(tmp_path)  # the source tree's configs/
    cfg, source = train_config(["objective=grpo", f"train.output_dir={tmp_path / 'run'}"])
    assert source.endswith("configs/grpo.yaml") and cfg.data.seq_len == 64
    _, source = train_config([f"train.output_dir={tmp_path / 'sft'}"])
    assert source.endswith("configs/default.yaml")
