"""Bottleneck adapters against AdapterHub (`adapters` 1.3.0) through committed fixtures: its saved
adapter directories load with its logits (1e-4) on a random BERT classifier, Llama and GPT-2,
for Houlsby, Pfeiffer, parallel and settings away from the presets; lowrax writes the same
directories back; init, refusals, generation and `lowrax train`.

The fixtures come from tests/fixtures/adapterhub/make_fixtures.py, run once in an environment
of their own (AdapterHub pins transformers 4.57); see that script.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lowrax
from lowrax.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from lowrax.errors import CheckpointError, LowraxError
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
SETTINGS = ("houlsby", "pfeiffer", "parallel", "custom_seq", "custom_par", "custom_nores")


@pytest.fixture(scope="module", params=["bert", "llama", "gpt2"])
def family(request):
    model, params = lowrax.load_pretrained(FIXTURES / request.param / "model", progress=False)
    return request.param, model, params, np.load(FIXTURES / request.param / "expected.npz")


def outputs(model, params, expected):
    out = model.apply(params, jnp.asarray(expected["input_ids"]), jnp.asarray(expected["attention_mask"]))
    return np.asarray(out if model.is_causal_lm else out.logits)


@pytest.mark.parametrize("setting", SETTINGS)
def test_adapterhub_adapter_gives_adapterhub_logits_and_writes_back_the_same(family, setting, tmp_path):
    name, model, params, expected = family
    source = FIXTURES / name / setting
    wrapped = lowrax.load_peft(params, source, model)
    assert any(isinstance(n, BottleneckAdapter) for n in jax.tree.leaves(wrapped, is_leaf=lambda x: isinstance(x, BottleneckAdapter)))
    ours = outputs(model, wrapped, expected)
    assert np.abs(ours - expected[f"logits_{setting}"]).max() <= 1e-4
    assert np.abs(ours - expected["logits_base"]).max() > 1e-2  # the adapter matters
    # written back: the same tensors under the same keys, the same config
    json_source = json.loads((source / "adapter_config.json").read_text())
    lowrax.save_peft(wrapped, tmp_path / "again", model)
    theirs, again = load_file(source / "adapter.safetensors"), load_file(tmp_path / "again" / "adapter.safetensors")
    renamed = {k.replace(f".adapters.{setting}.", ".adapters.lowrax."): v for k, v in theirs.items()}
    assert sorted(renamed) == sorted(again)
    for k in renamed:
        np.testing.assert_array_equal(again[k], renamed[k])
    written = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert written["config"] == json_source["config"]
    assert {k: written[k] for k in ("hidden_size", "model_class", "model_type")} == \
        {k: json_source[k] for k in ("hidden_size", "model_class", "model_type")}
    if not model.is_causal_lm:  # the classifier trained with the adapter travels as AdapterHub's static head
        head, head_again = load_file(source / "model_head.safetensors"), load_file(tmp_path / "again" / "model_head.safetensors")
        assert sorted(head) == sorted(head_again) == ["classifier.bias", "classifier.weight"]
        for k in head:
            np.testing.assert_array_equal(head[k], head_again[k])
    reloaded = lowrax.load_peft(params, tmp_path / "again", model)
    np.testing.assert_array_equal(outputs(model, reloaded, expected), ours)


@pytest.mark.parametrize("preset", ["houlsby", "pfeiffer", "parallel", "scaled_parallel"])
def test_wrap_places_adapters_where_the_preset_says_and_only_they_train(family, preset):
    name, model, params, expected = family
    cfg = BottleneckConfig(preset=preset, reduction_factor=8)
    wrapped = lowrax.wrap(params, cfg, jax.random.key(0), model=model)
    nodes = lowrax.adapters.wrap.adapter_nodes(wrapped)
    layers = model.config.num_layers
    assert len(nodes) == (2 * layers if preset == "houlsby" else layers)
    assert all(n.down_kernel.shape == (model.config.hidden_size, model.config.hidden_size // 8) for n in nodes.values())
    trainable, _ = lowrax.split(wrapped)
    assert lowrax.count_params(trainable) == sum(lowrax.count_params(n) for n in nodes.values())
    base = outputs(model, params, expected)
    if preset in ("parallel", "scaled_parallel"):  # mam_adapter init: a zero up projection, the base model
        np.testing.assert_allclose(outputs(model, wrapped, expected), base, atol=1e-6)
    else:
        assert np.isfinite(outputs(model, wrapped, expected)).all()


def test_merge_is_refused_with_the_reason(family):
    _, model, params, _ = family
    wrapped = lowrax.wrap(params, BottleneckConfig(), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="add layers to the residual stream.*cannot be merged"):
        lowrax.merge(wrapped)


def test_bad_directories_and_configs_are_refused(family, tmp_path):
    name, model, params, _ = family
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((FIXTURES / name / "pfeiffer" / "adapter_config.json").read_text())
    (pickled / "pytorch_adapter.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        lowrax.load_peft(params, pickled, model)
    config = json.loads((FIXTURES / name / "pfeiffer" / "adapter_config.json").read_text())
    for change, message in [({"phm_layer": True}, "PHM"), ({"ln_before": True}, "LayerNorm before the bottleneck")]:
        bad = tmp_path / f"bad-{message[:3]}"
        bad.mkdir()
        (bad / "adapter.safetensors").write_bytes((FIXTURES / name / "pfeiffer" / "adapter.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps(config | {"config": config["config"] | change}))
        with pytest.raises(CheckpointError, match=message):
            lowrax.load_peft(params, bad, model)
    with pytest.raises(LowraxError, match="leave_out"):
        BottleneckConfig(target_modules=("q_proj",))
    with pytest.raises(LowraxError, match="preset must be one of"):
        BottleneckConfig(preset="lora")
    with pytest.raises(LowraxError, match="unknown BottleneckConfig key 'reduction'.*reduction_factor"):
        BottleneckConfig.from_dict({"reduction": 4})


def test_families_without_known_sites_are_refused(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="builds a random Qwen2 (pip install -e .[test])")
    from tests.conftest import hf_model_dir

    path, _ = hf_model_dir(tmp_path_factory, "bn-qwen2", lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)))
    model, params = lowrax.load_pretrained(path, progress=False)
    with pytest.raises(LowraxError, match="implemented for llama, gpt2, bert, roberta"):
        lowrax.wrap(params, BottleneckConfig(), jax.random.key(0), model=model)


def test_cached_generation_equals_the_full_forward():
    model, params = lowrax.load_pretrained(FIXTURES / "llama" / "model", progress=False)
    wrapped = lowrax.load_peft(params, FIXTURES / "llama" / "houlsby", model)
    generated = lowrax.generate_ids(model, wrapped, [[5, 9, 17, 3]], max_new_tokens=5)[0]
    # One causal forward over the whole sequence holds every greedy step's full-forward logits.
    logits = np.asarray(model.apply(wrapped, jnp.asarray([[5, 9, 17, 3, *generated]])))[0]
    assert logits[3:8].argmax(-1).tolist() == list(generated)


def test_lowrax_train_exports_imports_and_refuses_merge(tiny_dir, data_file, tmp_path):  # noqa: F811
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3) if not i.startswith("lora.")]
    items += ["method=bottleneck", "bottleneck.preset=houlsby", "bottleneck.reduction_factor=4",
              "bottleneck.init_weights=mam_adapter"]
    assert main(["train", *items]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["config"]["mh_adapter"] and config["version"].startswith("adapters.")
    check_exports_and_merge(run, tiny_dir, tmp_path, merges=False)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter.safetensors").read_bytes()
