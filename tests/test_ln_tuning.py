"""LN tuning: PEFT exchange both ways with equal logits (llama, GPT-2, BERT classifier), merge and
unmerge, what trains, NF4 and sharded trees, errors, and `lowrax train method=ln_tuning`."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="LN tuning parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="LN tuning parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.ln_tuning import TunedNorm  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir  # noqa: E402
from tests.test_ia3 import batch_for  # noqa: E402
from tests.test_lycoris import check_lowrax_adapter_loads_in_peft, check_peft_adapter_loads_in_lowrax, peft_model_for  # noqa: E402
from tests.test_peft_exchange import SMALL, check_merge_round_trip, lowrax_outputs  # noqa: E402
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: E402,F401

# (builder, target_modules (None: PEFT's default for the model type), PEFT task settings)
MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)), None, {}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
             None, {}),
    "bert-classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
                        ("LayerNorm",), dict(task_type="SEQ_CLS", modules_to_save=["classifier"])),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    builder, targets, task = MODELS[request.param]
    path, hf = hf_model_dir(tmp_path_factory, f"ln-{request.param}", builder)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params, targets, task


def tuned(tree):
    return [n for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, TunedNorm)) if isinstance(n, TunedNorm)]


def random_ln(case, key=1):
    """LN tuning with the trained copies moved away from the originals (as after training)."""
    _, _, model, params, targets, _ = case
    extra = {"modules_to_save": ("classifier",)} if not model.is_causal_lm else {}
    wrapped = lowrax.wrap(params, lowrax.LNTuningConfig(target_modules=targets, **extra), jax.random.key(0), model.model_type)
    keys = iter(jax.random.split(jax.random.key(key), 1000))
    return jax.tree.map(lambda n: n.replace(value=n.value + 0.3 * jax.random.normal(next(keys), n.value.shape))
                        if isinstance(n, TunedNorm) else n, wrapped, is_leaf=lambda x: isinstance(x, TunedNorm))


def test_lowrax_ln_tuning_loads_in_peft(case, tmp_path):
    check_lowrax_adapter_loads_in_peft(case, random_ln(case), "LNTuningConfig", tmp_path)


def test_peft_ln_tuning_loads_in_lowrax(case, tmp_path):
    _, _, _, _, targets, task = case
    peft_model = peft_model_for(case, peft.LNTuningConfig(target_modules=list(targets) if targets else None, **task))
    with torch.no_grad():  # PEFT's copies start equal to the norms: move them, as training would
        for name, p in peft_model.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(0.3 * torch.randn_like(p))
    check_peft_adapter_loads_in_lowrax(case, peft_model, TunedNorm, tmp_path)


def test_merge_keeps_the_trained_norms_and_unmerges(case):
    model = case[2]
    check_merge_round_trip(model, random_ln(case, key=4), *batch_for(model, seed=2))


def test_only_the_norms_train_and_init_is_the_base_model(case):
    _, _, model, params, targets, _ = case
    wrapped = lowrax.wrap(params, lowrax.LNTuningConfig(target_modules=targets), jax.random.key(0), model.model_type)
    trainable, _ = lowrax.split(wrapped)
    assert set(jax.tree.leaves(lowrax.labels(trainable))) == {"full"}
    assert lowrax.count_params(trainable) == sum(n.value.size for n in tuned(wrapped)) > 0
    ids, mask = batch_for(model)
    np.testing.assert_array_equal(lowrax_outputs(model, wrapped, ids, mask), lowrax_outputs(model, params, ids, mask))


def test_nf4_quantization_and_sharding_leave_tuned_norms_alone(case):
    _, _, model, params, targets, _ = case
    wrapped = random_ln(case)
    quantized = lowrax.quantize(wrapped, lowrax.QuantConfig("nf4", 32), model)
    assert all(n.value.ndim == 1 and n.base.ndim == 1 for n in tuned(quantized))
    ids, mask = batch_for(model)
    assert np.isfinite(lowrax_outputs(model, quantized, ids, mask)).all()
    mesh = lowrax.make_mesh(lowrax.MeshConfig())
    shardings = lowrax.param_shardings(wrapped, model, mesh)
    assert len(tuned(shardings)) == len(tuned(wrapped))


def test_errors_name_the_problem(case, tmp_path):
    _, _, model, params, _, _ = case
    if model.model_type == "bert":  # PEFT has no default norms for BERT; lowrax's roles give every LayerNorm
        wrapped = lowrax.wrap(params, lowrax.LNTuningConfig(), jax.random.key(0), model.model_type)
        assert len(tuned(wrapped)) == 2 * (1 + 2 * model.config.num_layers)  # scale and bias: embeddings + two a layer
    with pytest.raises(LowraxError, match="matched no normalisation module; module names that exist:"):
        lowrax.wrap(params, lowrax.LNTuningConfig(target_modules=["q_proj"]), jax.random.key(0), model.model_type)


def test_lowrax_train_with_ln_tuning_exports_imports_and_merges(tiny_dir, data_file, tmp_path):  # noqa: F811
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3) if not i.startswith("lora.")]
    items += ["method=ln_tuning", "optim.learning_rate=0.05"]
    assert main(["train", *items]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == ["input_layernorm", "norm", "post_attention_layernorm"]
    check_exports_and_merge(run, tiny_dir, tmp_path)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
