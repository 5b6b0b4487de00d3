"""Preference objectives equal to TRL 1.16 on the same model and batch: DPO's loss types run
through TRL's own DPOTrainer, KTO through its KTOTrainer, ORPO and SimPO through TRL's
loss methods on the PEFT model's logits; the reference is the adapter switched off."""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="preference parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="preference parity tests need peft (pip install -e .[test])")
trl = pytest.importorskip("trl", reason="preference parity tests need trl (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from lowrax.objectives.config import PreferenceSection  # noqa: E402
from lowrax.objectives.step_losses import preference_loss_fn, reference_logps  # noqa: E402
from lowrax.train.preference_data import Example, PreferenceBatches  # noqa: E402
from tests.conftest import TINY_LLAMA, hf_model_dir  # noqa: E402

SMALL = TINY_LLAMA
TOL = 1e-5


def _examples(n: int, paired: bool, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, 128, k).tolist()  # noqa: E731
    if paired:
        return [Example(ids(rng.integers(2, 7)), (ids(rng.integers(1, 6)), ids(rng.integers(1, 6)))) for _ in range(n)]
    return [Example(ids(rng.integers(2, 7)), (ids(rng.integers(1, 6)),), bool(i % 3)) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path, _ = hf_model_dir(tmp_path_factory, "pref-llama",
                           lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    adapter = tmp_path_factory.mktemp("pref-adapter")
    policy.save_pretrained(adapter)
    model, params = lowrax.load_pretrained(path, progress=False)
    params = lowrax.load_peft(params, adapter, model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(lowrax.embedded_minilm_path()))
    tokenizer.eos_token = tokenizer.sep_token  # TRL appends EOS to its (unused) dataset
    return path, adapter, model, params, tokenizer


def _trainer(setup, kind: str, tmp_path, **config):
    """TRL's trainer around a fresh PEFT policy whose reference is the adapter switched off
    (TRL keeps a copy of an existing adapter as "ref"; removed, it disables the adapter)."""
    from datasets import Dataset

    path, adapter, _, _, tokenizer = setup
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
    if kind == "dpo":
        data = Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]})
        trainer = trl.DPOTrainer(model=policy, processing_class=tokenizer, train_dataset=data,
                                 args=trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **config))
    else:
        data = Dataset.from_dict({"prompt": ["a b", "c"], "completion": [" c", " d"], "label": [True, False]})
        trainer = trl.KTOTrainer(model=policy, processing_class=tokenizer, train_dataset=data,
                                 args=trl.KTOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                                    per_device_train_batch_size=2, **config))
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.model.train()
    return trainer


def _torch(batch: dict, *keys) -> dict:
    return {k: torch.tensor(np.asarray(batch[k]), dtype=torch.long) for k in keys}


def _ours(setup, objective: str, batch: dict, **config) -> tuple[float, dict]:
    _, _, model, params, _ = setup
    loss_sum, count, sums = preference_loss_fn(objective, PreferenceSection(**config))(
        model, params, {k: jnp.asarray(v) for k, v in batch.items()})
    return float(loss_sum / count), {k: float(v / count) for k, v in sums.items()}


PAIRS = PreferenceBatches(_examples(5, True), seq_len=14, batch_size=5, seed=0).batch(0)

DPO_CASES = [("sigmoid", 0.1, 0.0), ("hinge", 0.5, 0.0), ("ipo", 0.3, 0.0), ("robust", 0.1, 0.2),
             ("bco_pair", 0.2, 0.0), ("apo_zero", 0.1, 0.0), ("apo_down", 0.4, 0.0)]


@pytest.fixture(scope="module")
def dpo_trainer(setup, tmp_path_factory):
    return _trainer(setup, "dpo", tmp_path_factory.mktemp("trl-dpo"))


@pytest.mark.parametrize("loss_type,beta,smoothing", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_loss_types_equal_trl(setup, dpo_trainer, loss_type, beta, smoothing):
    trainer = dpo_trainer
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, smoothing
    trainer._metrics["train"].clear()
    inputs = _torch(PAIRS, "input_ids", "attention_mask")
    inputs["completion_mask"] = torch.tensor(PAIRS["loss_mask"], dtype=torch.long)
    theirs = float(trainer._compute_loss(trainer.model, inputs, False))
    loss, metrics = _ours(setup, "dpo", PAIRS, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    assert abs(loss - theirs) < TOL * max(1.0, abs(theirs))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(metrics[name] - trainer._metrics["train"][name][-1]) < TOL, name
    assert 0.0 < metrics["rewards/accuracies"] < 1.0  # the batch is not trivially one-sided


def test_precomputed_reference_equals_the_in_step_one(setup):
    _, _, model, params, _ = setup
    batch = {k: jnp.asarray(v) for k, v in PAIRS.items()}
    stored = dict(batch, ref_logps=reference_logps(model, params, batch))
    fn = preference_loss_fn("dpo", PreferenceSection(beta=0.3))
    np.testing.assert_allclose(fn(model, params, stored)[0], fn(model, params, batch)[0], rtol=1e-6)
    # and the reference is the base model: the adapter-off tree equals the pretrained params
    base = lowrax.adapters_off(params)
    assert all(isinstance(x, jax.Array) or isinstance(x, np.ndarray) for x in jax.tree.leaves(base))


def test_kto_equals_trl(setup, tmp_path):
    batch = PreferenceBatches(_examples(6, False), seq_len=14, batch_size=6, seed=0).batch(0)
    trainer = _trainer(setup, "kto", tmp_path, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    inputs = _torch(batch, "input_ids", "attention_mask")
    inputs["completion_mask"] = torch.tensor(batch["loss_mask"], dtype=torch.long)
    inputs["label"] = torch.tensor(batch["desirable"], dtype=torch.bool)
    for ours, theirs in (("input_ids", "KL_input_ids"), ("attention_mask", "KL_attention_mask"),
                         ("loss_mask", "KL_completion_mask")):
        inputs[theirs] = torch.tensor(batch["kl_" + ours], dtype=torch.long)
    theirs = float(trainer._compute_loss(trainer.model, inputs, False))
    loss, metrics = _ours(setup, "kto", batch, beta=0.2, undesirable_weight=1.5)
    assert abs(loss - theirs) < TOL
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert abs(metrics[name] - logged[name]) < TOL, name


def _policy_logits(setup, batch: dict) -> torch.Tensor:
    path, adapter, _, _, _ = setup
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    policy = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        return policy(**_torch(batch, "input_ids", "attention_mask")).logits


def _labels(batch: dict) -> torch.Tensor:
    return torch.tensor(np.where(batch["loss_mask"] == 1, batch["input_ids"], -100), dtype=torch.long)


def test_orpo_equals_trl(setup):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits = _policy_logits(setup, PAIRS)
    b = PAIRS["input_ids"].shape[0] // 2
    mean_logps = ORPOTrainer.get_batch_logps(logits, _labels(PAIRS), average_log_prob=True)
    own = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device="cpu"))
    terms, chosen_rewards, rejected_rewards, log_odds_ratio, _ = ORPOTrainer.odds_ratio_loss(
        own, mean_logps[:b], mean_logps[b:])
    # TRL's SFT term: mean cross-entropy over every attended token of the chosen rows
    ids, mask = torch.tensor(PAIRS["input_ids"][:b]).long(), torch.tensor(PAIRS["attention_mask"][:b])
    nll = torch.nn.functional.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]),
                                            torch.where(mask[:, 1:] == 1, ids[:, 1:], -100).reshape(-1))
    theirs = float(nll - terms.mean())
    loss, metrics = _ours(setup, "orpo", PAIRS, beta=0.25)
    assert abs(loss - theirs) < TOL
    assert abs(metrics["rewards/chosen"] - float(chosen_rewards.mean())) < TOL
    assert abs(metrics["rewards/rejected"] - float(rejected_rewards.mean())) < TOL
    assert abs(metrics["log_odds_ratio"] - float(log_odds_ratio)) < TOL
    assert abs(metrics["nll_loss"] - float(nll)) < TOL


@pytest.mark.parametrize("smoothing,sft_weight", [(0.0, 0.0), (0.1, 1.0)])
def test_simpo_equals_trl(setup, smoothing, sft_weight):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    logits = _policy_logits(setup, PAIRS)
    b = PAIRS["input_ids"].shape[0] // 2
    labels = _labels(PAIRS)
    mean_logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    own = types.SimpleNamespace(beta=2.0, label_smoothing=smoothing, loss_type="simpo", simpo_gamma=0.7, alpha=0.0,
                                accelerator=types.SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(own, mean_logps[:b], mean_logps[b:])
    # TRL's cpo_alpha term: cross-entropy over the chosen rows' completion tokens
    nll = torch.nn.functional.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]), labels[:b, 1:].reshape(-1))
    theirs = float(losses.mean() + sft_weight * nll)
    loss, metrics = _ours(setup, "simpo", PAIRS, beta=2.0, gamma=0.7, label_smoothing=smoothing, sft_weight=sft_weight)
    assert abs(loss - theirs) < TOL
    assert abs(metrics["rewards/margins"] - float((chosen_rewards - rejected_rewards).mean())) < TOL


def test_pure_dpo_loss_matches_the_objective_and_refuses_bad_settings(setup):
    _, _, model, params, _ = setup
    batch = {k: jnp.asarray(v) for k, v in PAIRS.items()}
    logps = np.asarray(lowrax.objectives.logps.completion_logps(model, params, batch)[0])
    ref = np.asarray(reference_logps(model, params, batch))
    b = len(logps) // 2
    loss, metrics = lowrax.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.1)
    ours, sums = _ours(setup, "dpo", PAIRS, beta=0.1)
    assert abs(float(loss) - ours) < 1e-6 and abs(float(metrics["rewards/margins"]) - sums["rewards/margins"]) < 1e-6
    with pytest.raises(LowraxError, match="loss_type must be one of"):
        lowrax.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], loss_type="nope")
    with pytest.raises(LowraxError, match="chosen_tokens"):
        lowrax.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], loss_type="ipo")
    with pytest.raises(LowraxError, match="label_smoothing"):
        lowrax.dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], loss_type="robust", label_smoothing=0.5)
    with pytest.raises(LowraxError, match="preference.reference"):
        PreferenceSection(reference="ref_model")


def test_dpo_step_with_accumulation_equals_one_batch(setup):
    """Two micro-batches of pairs give the step one large batch gives (loss, metrics, update)."""
    from lowrax.train.optim import OptimizerConfig, make_optimizer
    from lowrax.train.step import init_state, make_train_step

    _, _, model, params, _ = setup
    batches = PreferenceBatches(_examples(4, True, seed=3), seq_len=14, batch_size=2, seed=0)
    whole = PreferenceBatches(batches.examples, seq_len=14, batch_size=4, seed=0, width=batches.width)
    halves = [batches.batch_of([0, 1]), batches.batch_of([2, 3])]
    one = whole.batch_of([0, 1, 2, 3])
    trainable, frozen = lowrax.split(params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    fn = preference_loss_fn("dpo", PreferenceSection(beta=0.5))
    results = []
    for accum, batch in ((1, one), (2, {k: np.stack([h[k] for h in halves]) for k in halves[0]})):
        step = jax.jit(make_train_step(model, optimizer, grad_accum_steps=accum, loss_fn=fn))
        state = init_state(jax.tree.map(jnp.copy, trainable), optimizer)
        state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})  # a second step: rewards move
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen"):
        np.testing.assert_allclose(ma[key], mb[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(ma["rewards/margins"]) != 0.0
    # Adam divides each gradient by its own scale, so a rounding-level difference in a near-zero
    # gradient (summed in another order over two micro-batches) moves that element by a few 1e-7.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a.trainable, b.trainable)
