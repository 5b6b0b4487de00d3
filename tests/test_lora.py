"""LoRA as a tree transform: equivalences, PEFT round trips and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
import lowrax.adapters.tree
from lowrax.errors import CheckpointError, LowraxError
from tests.test_bad_input import tiny_llama_dir  # noqa: F401 - fixture

KEY = jax.random.key(0)


@pytest.fixture
def tiny(tiny_llama_dir):  # noqa: F811
    return lowrax.load_pretrained(tiny_llama_dir, progress=False)


IDS = jnp.asarray([[1, 5, 9, 2, 7], [3, 3, 8, 1, 0]])


@pytest.mark.parametrize("targets", [None, "all-linear", ("q_proj", "down_proj"), r".*\.mlp\.(up|gate)_proj"])
def test_zero_init_adapter_leaves_output_unchanged(tiny, targets):
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=2, target_modules=targets), KEY, model.model_type)
    assert np.array_equal(model.apply(wrapped, IDS), model.apply(params, IDS))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factored_forward_equals_merged_forward(tiny, use_rslora):
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, alpha=16, target_modules="all-linear", init="random", use_rslora=use_rslora)
    wrapped = lowrax.lora.wrap(params, cfg, KEY)
    factored = model.apply(wrapped, IDS)
    assert np.abs(factored - model.apply(params, IDS)).max() > 1e-3  # the adapter does something
    assert np.abs(factored - model.apply(lowrax.merge(wrapped), IDS)).max() <= 1e-5


def test_merge_then_unmerge_round_trips(tiny):
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=2, target_modules="all-linear", init="random"), KEY)
    again = lowrax.unmerge(lowrax.merge(wrapped), wrapped)
    assert jax.tree.structure(again) == jax.tree.structure(wrapped)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(wrapped)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6


def test_split_combine_and_labels(tiny):
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=2, target_modules=("q_proj", "v_proj")), KEY)
    trainable, frozen = lowrax.split(wrapped)
    q = trainable["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.base is None and q.a.shape == (16, 2) and q.b.shape == (2, 16)
    assert lowrax.count_params(trainable) == (16 * 2 + 2 * 16) + (16 * 2 + 2 * 8)
    combined = lowrax.combine(trainable, frozen)
    assert np.array_equal(model.apply(combined, IDS), model.apply(wrapped, IDS))
    label_set = set(jax.tree.leaves(lowrax.labels(wrapped)))
    assert label_set == {"frozen", "lora_a", "lora_b"}


def test_rank_pattern_alpha_pattern_and_layers(tiny):
    _, params = tiny
    cfg = lowrax.LoraConfig(r=2, alpha=4, target_modules="all-linear", rank_pattern={"down_proj": 4},
                            alpha_pattern={"q_proj": 1.0}, layers_to_transform=[0])
    wrapped = lowrax.lora.wrap(params, cfg, KEY)
    layer = wrapped["model"]["layers"]["0"]
    assert layer["mlp"]["down_proj"]["kernel"].rank == 4
    assert layer["self_attn"]["q_proj"]["kernel"].scale == 0.5
    assert layer["self_attn"]["k_proj"]["kernel"].scale == 2.0


def test_bad_targets_list_existing_modules(tiny):
    _, params = tiny
    with pytest.raises(LowraxError, match=r"matched no linear module; module names that exist: down_proj, gate_proj, k_proj"):
        lowrax.lora.wrap(params, lowrax.LoraConfig(target_modules=("qkv",)), KEY)


def test_rank_out_of_range_is_named(tiny):
    _, params = tiny
    with pytest.raises(LowraxError, match=r"r=9 for model\.layers\.0\.self_attn\.k_proj must be in 1\.\.8"):
        lowrax.lora.wrap(params, lowrax.LoraConfig(r=9, target_modules=("k_proj",)), KEY)
    with pytest.raises(LowraxError, match="LoraConfig.r must be an integer >= 1"):
        lowrax.LoraConfig(r=0)


def test_unknown_config_key_names_closest():
    with pytest.raises(LowraxError, match="unknown LoraConfig key 'lora_alpha'.*did you mean 'alpha'"):
        lowrax.LoraConfig.from_dict({"r": 4, "lora_alpha": 8})


def test_peft_adapter_that_does_not_fit(tiny, tmp_path):
    model, params = tiny
    wrapped = lowrax.lora.wrap(params, lowrax.LoraConfig(r=2, target_modules=("q_proj",)), KEY)
    lowrax.save_peft(wrapped, tmp_path / "ad", model)
    other_model_params = jax.tree.map(lambda x: x, params)
    other_model_params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = jnp.zeros((16, 12))
    with pytest.raises(CheckpointError, match=r"q_proj do not fit the model: .*lora_A\.weight is \(2, 16\).*expected \(r, 16\) and \(12, r\)"):
        lowrax.load_peft(other_model_params, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj"] and config["peft_type"] == "LORA"


def test_dropout_applies_only_with_a_step_key(tiny):
    model, params = tiny
    cfg = lowrax.LoraConfig(r=4, target_modules="all-linear", init="random", dropout=0.5)
    wrapped = lowrax.lora.wrap(params, cfg, KEY)
    no_dropout = lowrax.lora.wrap(params, lowrax.LoraConfig(r=4, target_modules="all-linear", init="random"), KEY)
    assert np.array_equal(model.apply(wrapped, IDS), model.apply(no_dropout, IDS))  # eval: no key, no dropout
    a = model.apply(lowrax.adapters.tree.with_dropout_keys(wrapped, jax.random.key(5)), IDS)
    b = model.apply(lowrax.adapters.tree.with_dropout_keys(wrapped, jax.random.key(5)), IDS)
    c = model.apply(lowrax.adapters.tree.with_dropout_keys(wrapped, jax.random.key(6)), IDS)
    assert np.array_equal(a, b) and np.abs(a - c).max() > 1e-4 and np.abs(a - model.apply(wrapped, IDS)).max() > 1e-4
