"""AdaLoRA: training equal to PEFT's (losses, weights and rank patterns through every phase of
the budget), one compilation for the whole schedule, PEFT exchange both ways (llama, GPT-2,
BERT classifier; pruned adapters with their rank_pattern), merge, NF4 bases, `lowrax train`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="AdaLoRA parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="AdaLoRA parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.adalora import AdaLoraConfig, AdaLoraKernel  # noqa: E402
from lowrax.adapters.adalora.budget import budget_table  # noqa: E402
from lowrax.adapters.wrap import adapter_nodes  # noqa: E402
from lowrax.errors import CheckpointError, LowraxError  # noqa: E402
from lowrax.train.step import init_state, make_train_step  # noqa: E402
from tests.conftest import hf_model_dir  # noqa: E402
from tests.test_ia3 import batch_for, max_difference  # noqa: E402
from tests.test_lycoris import check_lowrax_adapter_loads_in_peft  # noqa: E402
from tests.test_peft_exchange import SMALL, check_merge_round_trip, lowrax_outputs  # noqa: E402
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: E402,F401

MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
              ("q_proj", "v_proj", "down_proj"), {}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
             ("c_attn", "c_fc"), dict(fan_in_fan_out=True)),
    "bert-classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
                        ("query", "value", "output.dense"), dict(task_type="SEQ_CLS", modules_to_save=["classifier"])),
}
# A schedule with every phase in 9 steps: warm-up (g = 0, 1), allocations at g = 2 and 4 (deltaT 2;
# g = 3 and 5 only smooth the scores), the final allocation at g = 6 = total_step - tfinal, and
# the fixed pattern at g = 7, 8.
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=8, beta1=0.85, beta2=0.85,
                orth_reg_weight=0.5)
PEFT_SCHEDULE = {k: v for k, v in SCHEDULE.items()} | {"lora_alpha": 8}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    builder, targets, task = MODELS[request.param]
    path, hf = hf_model_dir(tmp_path_factory, f"adalora-{request.param}", builder)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params, targets, task


def random_adalora(model, params, targets, key=1, **settings):
    """AdaLoRA with every array random (singular values too), so the adapter visibly changes the
    model and every factor has a gradient from the first step."""
    extra = {"modules_to_save": ("classifier",)} if not model.is_causal_lm else {}
    cfg = AdaLoraConfig(target_modules=targets, alpha=8.0, init_weights=False, **(SCHEDULE | settings), **extra)
    wrapped = lowrax.wrap(params, cfg, jax.random.key(key), model.model_type)
    # N(0, 1) factors (PEFT's init_lora_weights=False) swamp a tiny model; N(0, 0.3^2) does not
    return jax.tree.map(lambda n: n.replace(a=0.3 * n.a, b=0.3 * n.b) if isinstance(n, AdaLoraKernel) else n, wrapped,
                        is_leaf=lambda n: isinstance(n, AdaLoraKernel))


def pruned(wrapped, seed=0):
    """The adapter after an allocation: a random half of each layer's triplets kept (e zeroed
    elsewhere), and none at all in the first layer (PEFT then stores rank-0 tensors)."""
    rng = np.random.default_rng(seed)
    first = [True]

    def prune(n):
        kept = (rng.permutation(n.rank) < n.rank // 2).astype(np.float32) * (not first[0])
        first[0] = False
        return n.replace(kept=jnp.asarray(kept), e=n.e * kept)

    return jax.tree.map(lambda n: prune(n) if isinstance(n, AdaLoraKernel) else n, wrapped,
                        is_leaf=lambda n: isinstance(n, AdaLoraKernel))


@pytest.mark.parametrize("allocated", [False, True], ids=["full", "pruned"])
def test_lowrax_adalora_loads_in_peft(case, allocated, tmp_path):
    wrapped = random_adalora(case[2], case[3], case[4])
    if allocated:
        wrapped = pruned(wrapped)
    check_lowrax_adapter_loads_in_peft(case, wrapped, "AdaLoraConfig", tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    nodes = adapter_nodes(wrapped)
    if allocated:
        assert config["rank_pattern"] == {f"{name}.lora_E": (np.asarray(n.kept) > 0).tolist() for name, n in nodes.items()}
    else:
        assert config["rank_pattern"] is None


def test_peft_adalora_after_allocation_loads_in_lowrax(case, tmp_path):
    """PEFT trains a few steps through an allocation and saves a pruned adapter with its
    rank_pattern; lowrax loads it with the same logits and writes the same tensors back."""
    path, hf, model, params, targets, task = case
    cfg = peft.AdaLoraConfig(target_modules=list(targets), init_lora_weights=False, **PEFT_SCHEDULE, **task)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.1)  # randn is too large for the model to stay sane
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    ids, mask = batch_for(model)
    for g in range(3):  # the allocation at g = 2
        peft_model.train()
        out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         labels=torch.tensor(ids if model.is_causal_lm else [0, 1]))
        out.loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(g)
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    pattern = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and any(not all(v) for v in pattern.values())
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    assert max_difference(model, wrapped, peft_model, *batch_for(model, seed=1)) <= 1e-4
    lowrax.save_peft(wrapped, tmp_path / "again", model)
    from safetensors.numpy import load_file

    theirs, ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    peft_model.unload()


def _llama(tmp_path_factory):
    return hf_model_dir(tmp_path_factory, "adalora-train", MODELS["llama"][0])


def test_training_equals_peft_through_the_whole_budget_schedule(tmp_path_factory, tmp_path):
    """The same adapter trained by lowrax's jitted step and by PEFT's model + update_and_allocate
    (plain SGD, same batches): equal losses (with the orthogonality penalty), equal rank
    patterns after every allocation and equal final weights; the step compiles once."""
    path, hf = _llama(tmp_path_factory)
    model, params = lowrax.load_pretrained(path, progress=False)
    wrapped = random_adalora(model, params, MODELS["llama"][1])
    lowrax.save_peft(wrapped, tmp_path / "start", model)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "start", is_trainable=True)
    lr, steps = 0.5, 9
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)

    trainable, frozen = lowrax.split(wrapped)
    optimizer = optax.sgd(lr)
    state = init_state(trainable, optimizer)
    step = jax.jit(make_train_step(model, optimizer))
    rng = np.random.default_rng(0)
    for g in range(steps):
        ids = rng.integers(1, 128, (2, 7))
        batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((2, 7), jnp.int32),
                 "loss_mask": jnp.ones((2, 7), jnp.int32)}
        state, metrics = step(state, frozen, batch)
        out = peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(ids))
        out.loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(g)
        opt.zero_grad()
        assert abs(float(metrics["loss"] + metrics["penalty"]) - out.loss.item()) < 1e-5, g
        if g in (2, 4, 6):
            theirs = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
            nodes = adapter_nodes(lowrax.combine(state.trainable, frozen))
            ours = {f"{name}.lora_E": (np.asarray(n.kept) > 0).tolist() for name, n in nodes.items()}
            assert ours == theirs, g
            assert sum(map(sum, ours.values())) == budget_table(24, 12, 1, 2, 8)[g]
    assert step._cache_size() == 1
    trained = lowrax.combine(state.trainable, frozen)
    torch_params = dict(peft_model.named_parameters())
    for name, node in adapter_nodes(trained).items():
        key = f"base_model.model.{name}.%s.default"
        np.testing.assert_allclose(node.a, torch_params[key % "lora_A"].detach().numpy().T, atol=2e-5)
        np.testing.assert_allclose(node.e, torch_params[key % "lora_E"].detach().numpy()[:, 0], atol=2e-5)
        np.testing.assert_allclose(node.b, torch_params[key % "lora_B"].detach().numpy().T, atol=2e-5)
        assert float(jnp.sum(jnp.abs(node.e * (1 - node.kept)))) == 0.0  # the fixed pattern holds after g = 6
    # the exported adapter carries the final pattern, trimmed as PEFT trims it
    lowrax.save_peft(trained, tmp_path / "trained", model)
    peft_model.save_pretrained(tmp_path / "peft-trained")
    for d in ("trained", "peft-trained"):
        assert json.loads((tmp_path / d / "adapter_config.json").read_text())["rank_pattern"] is not None


def test_budget_schedule_is_peft_s():
    from peft.tuners.adalora.layer import RankAllocator

    cfg = peft.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100, deltaT=5)
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config, allocator.init_bgt, allocator.target_bgt = cfg, 12 * 7, 4 * 7
    table = budget_table(12 * 7, 4 * 7, 10, 20, 100)
    assert [allocator.budget_schedule(g)[0] for g in range(101)] == table.tolist()


def test_merge_unmerge_and_default_init(case):
    model, params, targets = case[2], case[3], case[4]
    ids, mask = batch_for(model)
    check_merge_round_trip(model, pruned(random_adalora(model, params, targets)), ids, mask)
    fresh = lowrax.wrap(params, AdaLoraConfig(target_modules=targets, **SCHEDULE), jax.random.key(0), model.model_type)
    np.testing.assert_array_equal(lowrax_outputs(model, fresh, ids, mask), lowrax_outputs(model, params, ids, mask))
    labels = {l for l in jax.tree.leaves(lowrax.labels(fresh)) if l != "frozen"}
    assert labels >= {"lora_a", "lora_b", "singular", "anchor"}


def test_nf4_bases_carry_adalora(case):
    """QLoRA-style: AdaLoRA over NF4 kernels equals its merge onto the dequantized base."""
    model, params, targets = case[2], case[3], case[4]
    quantized = lowrax.quantize(params, lowrax.QuantConfig("nf4", 32), model)
    wrapped = pruned(random_adalora(model, quantized, targets))
    assert any(isinstance(n.base, lowrax.NF4Tensor) for n in adapter_nodes(wrapped).values())
    ids, mask = batch_for(model)
    out = lowrax_outputs(model, wrapped, ids, mask)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(lowrax_outputs(model, lowrax.merge(wrapped), ids, mask), out, atol=2e-4, rtol=1e-4)


def test_config_and_file_errors_name_the_problem(case, tmp_path):
    with pytest.raises(LowraxError, match="target_r .* must be below init_r"):
        AdaLoraConfig(init_r=4, target_r=4)
    with pytest.raises(LowraxError, match="no budgeting phase"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(LowraxError, match="unknown AdaLoraConfig key 'init_rank'.*did you mean 'init_r'"):
        AdaLoraConfig.from_dict({"init_rank": 4})
    model, params, targets = case[2], case[3], case[4]
    with pytest.raises(LowraxError, match="total_step must be set"):
        lowrax.wrap(params, AdaLoraConfig(target_modules=targets), jax.random.key(0), model.model_type)
    lowrax.save_peft(pruned(random_adalora(model, params, targets)), tmp_path / "a", model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["rank_pattern"] = None
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no rank_pattern entry"):
        lowrax.load_peft(params, tmp_path / "a", model)


def test_lowrax_train_exports_imports_and_merges(tiny_dir, data_file, tmp_path):  # noqa: F811
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 4) if not i.startswith("lora.")]
    items += ["method=adalora", "adalora.target_modules=[q_proj,v_proj,down_proj]", "adalora.init_r=4",
              "adalora.target_r=2", "adalora.tinit=1", "adalora.tfinal=1",
              # PEFT's init starts at the base model with small factors: a large alpha and rate make 4 steps visible
              "adalora.alpha=256", "optim.learning_rate=0.05"]
    assert main(["train", *items]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 4 and config["rank_pattern"]
    assert sum(map(sum, config["rank_pattern"].values())) == 2 * len(config["rank_pattern"])  # the target budget
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]
    assert all(r["penalty"] > 0 for r in rows)
    check_exports_and_merge(run, tiny_dir, tmp_path)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
