"""IA3: PEFT exchange both ways with equal logits (llama, GPT-2 Conv1D, BERT), merge, labels, training."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="IA3 parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="IA3 parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402
from tests.test_peft_exchange import SMALL, check_merge_round_trip, lowrax_outputs, torch_outputs  # noqa: E402
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: E402,F401  (fixtures)

CASES = {
    # name: (builder, PEFT IA3Config kwargs beyond the model type's defaults)
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)), {}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
             dict(fan_in_fan_out=True)),
    "bert-classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
                        dict(task_type="SEQ_CLS", modules_to_save=["classifier"])),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    builder, theirs = CASES[request.param]
    path, hf = hf_model_dir(tmp_path_factory, f"ia3-{request.param}", builder)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params, theirs


def batch_for(model, seed=0):
    return random_batch(128, [9, 5], pad_id=0, left=model.is_causal_lm, seed=seed)


def max_difference(model, params, torch_model, ids, mask) -> float:
    """Largest logit difference at real (non-padding) positions; padded positions of a
    left-padded causal batch have no defined output."""
    valid = mask.astype(bool) if model.is_causal_lm else slice(None)
    ours = lowrax_outputs(model, params, ids, mask)[valid]
    return float(np.abs(ours - torch_outputs(torch_model, ids, mask, model.is_causal_lm)[valid]).max())


def random_ia3(model, params, key=1):
    """IA3 on PEFT's default targets with random vectors (PEFT's init_ia3_weights=False), and a
    random head where the model has one to save."""
    extra = {"modules_to_save": ("classifier",)} if not model.is_causal_lm else {}
    return lowrax.wrap(params, lowrax.IA3Config(init_ia3_weights=False, **extra), jax.random.key(key), model.model_type)


def test_lowrax_ia3_adapter_loads_in_peft(case, tmp_path):
    path, _, model, params, _ = case
    wrapped = random_ia3(model, params)
    lowrax.save_peft(wrapped, tmp_path / "adapter", model)
    auto = transformers.AutoModelForCausalLM if model.is_causal_lm else transformers.AutoModelForSequenceClassification
    peft_model = peft.PeftModel.from_pretrained(auto.from_pretrained(path, dtype=torch.float32), tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].peft_type == peft.PeftType.IA3
    ids, mask = batch_for(model)
    assert max_difference(model, wrapped, peft_model, ids, mask) <= 1e-4
    # the vectors act: the change is 10x the parity tolerance
    assert np.abs(lowrax_outputs(model, wrapped, ids, mask) - lowrax_outputs(model, params, ids, mask)).max() > 1e-3


def test_peft_ia3_adapter_loads_in_lowrax(case, tmp_path):
    _, hf, model, params, theirs = case
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, peft.IA3Config(init_ia3_weights=False, **theirs)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    kinds = {type(n) for n in jax.tree.leaves(wrapped, is_leaf=lambda x: isinstance(x, lowrax.AdapterNode))}
    assert lowrax.IA3Kernel in kinds
    assert max_difference(model, wrapped, peft_model, *batch_for(model, seed=1)) <= 1e-4
    peft_model.unload()  # restore the shared module-scoped torch model


def test_ia3_merge_equals_factored_and_unmerges(case):
    _, _, model, params, _ = case
    wrapped = random_ia3(model, params, key=4)
    check_merge_round_trip(model, wrapped, *batch_for(model, seed=2))


def test_nf4_bases_carry_ia3(case):
    _, _, model, params, _ = case
    quantized = lowrax.quantize(params, lowrax.QuantConfig("nf4", 32), model)
    wrapped = random_ia3(model, quantized, key=5)
    assert any(isinstance(n.base, lowrax.NF4Tensor) for n in jax.tree.leaves(
        wrapped, is_leaf=lambda x: isinstance(x, lowrax.IA3Kernel)) if isinstance(n, lowrax.IA3Kernel))
    ids, mask = batch_for(model)
    out = lowrax_outputs(model, wrapped, ids, mask)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(lowrax_outputs(model, lowrax.merge(wrapped), ids, mask), out, atol=2e-4, rtol=1e-4)


def test_ia3_scales_input_of_feedforward_and_output_and_bias_elsewhere():
    w, bias = jnp.arange(6.0).reshape(2, 3), jnp.asarray([1.0, -2.0, 0.5])
    x = jnp.asarray([[1.0, 2.0]])
    out_node = lowrax.IA3Kernel(base=w, vector=jnp.asarray([2.0, 3.0, 4.0]))
    in_node = lowrax.IA3Kernel(base=w, vector=jnp.asarray([5.0, 7.0]), feedforward=True)
    np.testing.assert_allclose(lowrax.linear(x, {"kernel": out_node, "bias": bias}), (x @ w + bias) * out_node.vector)
    np.testing.assert_allclose(lowrax.linear(x, {"kernel": in_node, "bias": bias}), (x * in_node.vector) @ w + bias)


def test_ia3_trains_only_its_vectors_and_starts_at_the_base(case):
    _, _, model, params, _ = case
    wrapped = lowrax.wrap(params, lowrax.IA3Config(), jax.random.key(0), model.model_type)
    trainable, _ = lowrax.split(wrapped)
    labels = set(jax.tree.leaves(lowrax.labels(trainable)))
    assert labels <= {"vector"}
    vectors = jax.tree.leaves(trainable)
    assert vectors and all(v.ndim == 1 for v in vectors)
    ids, mask = batch_for(model)
    np.testing.assert_array_equal(lowrax_outputs(model, wrapped, ids, mask), lowrax_outputs(model, params, ids, mask))


def test_ia3_config_errors_name_the_problem(case):
    _, _, model, params, _ = case
    with pytest.raises(LowraxError, match=r"feedforward_modules \['down_proj'\] must be a subset of target_modules"):
        lowrax.IA3Config(target_modules=("k_proj",), feedforward_modules=("down_proj",))
    with pytest.raises(LowraxError, match="ia3 has no default target_modules for model_type 'phi'"):
        lowrax.wrap(params, lowrax.IA3Config(), jax.random.key(0), "phi")
    with pytest.raises(LowraxError, match="IA3 has no default feedforward_modules for model_type 'phi'"):
        lowrax.wrap(params, lowrax.IA3Config(target_modules="all-linear"), jax.random.key(0), "phi")
    with pytest.raises(LowraxError, match="unknown IA3Config key 'feedforward'.*did you mean 'feedforward_modules'"):
        lowrax.IA3Config.from_dict({"feedforward": ["down_proj"]})


def test_lowrax_train_with_ia3_exports_imports_and_merges(tiny_dir, data_file, tmp_path):
    """`lowrax train method=ia3`: the run's PEFT adapter, export, import and merge all give the trained model."""
    import yaml

    from lowrax.cli import main
    from lowrax.train.config import load_config

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3) if not i.startswith("lora.")]
    items += ["method=ia3", "ia3.target_modules=[k_proj,v_proj,down_proj]", "optim.learning_rate=0.05"]
    assert main(["train", *items]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "ia3" and saved["ia3"]["feedforward_modules"] is None and "lora" not in saved
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    check_exports_and_merge(run, tiny_dir, tmp_path)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()

    with pytest.raises(LowraxError, match="config section 'lora' configures method 'lora', but method is 'ia3'"):
        load_config(None, ["method=ia3", "lora.r=4"])
    with pytest.raises(LowraxError, match="unknown adapter method 'ia4'.*did you mean 'ia3'"):
        load_config(None, ["method=ia4"])
