"""LoHa and LoKr: PEFT exchange both ways with equal logits (llama, BERT classifier), GPT-2 refused as
PEFT refuses it, merge, init, labels, dropout semantics, NF4 bases and `lowrax train`."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="LoHa/LoKr parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="LoHa/LoKr parity tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.lycoris import LoHaConfig, LoHaKernel, LoKrConfig, LoKrKernel  # noqa: E402
from lowrax.adapters.lycoris.lokr import factorization  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir  # noqa: E402
from tests.test_ia3 import batch_for, max_difference  # noqa: E402
from tests.test_peft_exchange import SMALL, check_merge_round_trip, lowrax_outputs  # noqa: E402
from tests.test_training_run import check_method_run, data_file, tiny_dir  # noqa: E402,F401

MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
              ("q_proj", "v_proj", "down_proj"), {}),
    "bert-classifier": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)),
                        ("query", "value", "output.dense"), dict(task_type="SEQ_CLS", modules_to_save=["classifier"])),
}
# (lowrax config class, PEFT config class, settings): LoKr in its three layouts (right factor
# full or low-rank, left factor low-rank with decompose_both) and with a decompose_factor.
METHODS = {
    # LoHa's random init multiplies two small products: a large alpha makes its effect visible
    "loha": (LoHaConfig, "LoHaConfig", dict(r=4, alpha=400)),
    "loha-pattern": (LoHaConfig, "LoHaConfig", dict(r=2, alpha=200, rank_pattern={"down_proj": 3, "output.dense": 3},
                                                    alpha_pattern={"v_proj": 300.0, "value": 300.0})),
    "lokr-full": (LoKrConfig, "LoKrConfig", dict(r=8, alpha=4)),
    "lokr-both": (LoKrConfig, "LoKrConfig", dict(r=2, alpha=4, decompose_both=True)),
    "lokr-factor": (LoKrConfig, "LoKrConfig", dict(r=2, alpha=2, decompose_factor=4)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    builder, targets, task = MODELS[request.param]
    path, hf = hf_model_dir(tmp_path_factory, f"lycoris-{request.param}", builder)
    model, params = lowrax.load_pretrained(path, progress=False)
    return path, hf, model, params, targets, task


def random_adapter(model, params, method, targets, key=1):
    cls, _, settings = METHODS[method]
    extra = {"modules_to_save": ("classifier",)} if not model.is_causal_lm else {}
    cfg = cls(target_modules=targets, init_weights=False, **settings, **extra)
    return lowrax.wrap(params, cfg, jax.random.key(key), model.model_type)


def check_lowrax_adapter_loads_in_peft(case, wrapped, peft_config_name, tmp_path):
    """lowrax writes the adapter; PEFT loads it (as `peft_config_name`) and gives the same logits,
    which differ visibly from the base model's."""
    path, _, model, params, _, _ = case
    lowrax.save_peft(wrapped, tmp_path / "adapter", model)
    auto = transformers.AutoModelForCausalLM if model.is_causal_lm else transformers.AutoModelForSequenceClassification
    peft_model = peft.PeftModel.from_pretrained(auto.from_pretrained(path, dtype=torch.float32), tmp_path / "adapter").eval()
    assert type(peft_model.peft_config["default"]).__name__ == peft_config_name
    ids, mask = batch_for(model)
    assert max_difference(model, wrapped, peft_model, ids, mask) <= 1e-4
    assert np.abs(lowrax_outputs(model, wrapped, ids, mask) - lowrax_outputs(model, params, ids, mask)).max() > 1e-3


def peft_model_for(case, peft_cfg):
    """PEFT's model of the case's torch model with a (seeded) random adapter."""
    torch.manual_seed(3)
    return peft.get_peft_model(case[1], peft_cfg).eval()


def check_peft_adapter_loads_in_lowrax(case, peft_model, node_type, tmp_path):
    """PEFT saves its adapter; lowrax loads it as `node_type` nodes with the same logits and
    writes it back tensor for tensor. Unloads `peft_model` (the torch model is shared)."""
    _, _, model, params, _, _ = case
    peft_model.save_pretrained(tmp_path / "adapter")
    wrapped = lowrax.load_peft(params, tmp_path / "adapter", model)
    kinds = {type(n) for n in jax.tree.leaves(wrapped, is_leaf=lambda x: isinstance(x, lowrax.AdapterNode))}
    assert node_type in kinds
    assert max_difference(model, wrapped, peft_model, *batch_for(model, seed=1)) <= 1e-4
    lowrax.save_peft(wrapped, tmp_path / "again", model)
    from safetensors.numpy import load_file

    theirs, ours = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(theirs[k], ours[k])
    peft_model.unload()  # restore the shared module-scoped torch model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_lowrax_adapter_loads_in_peft(case, method, tmp_path):
    wrapped = random_adapter(case[2], case[3], method, case[4])
    check_lowrax_adapter_loads_in_peft(case, wrapped, METHODS[method][1], tmp_path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_peft_adapter_loads_in_lowrax(case, method, tmp_path):
    _, peft_cls, settings = METHODS[method]
    peft_cfg = getattr(peft, peft_cls)(target_modules=list(case[4]), init_weights=False, **settings, **case[5])
    check_peft_adapter_loads_in_lowrax(case, peft_model_for(case, peft_cfg), LoHaKernel if method.startswith("loha") else LoKrKernel, tmp_path)


@pytest.mark.parametrize("method", ["loha", "lokr-both"])
def test_merge_equals_the_adapted_model_and_unmerges(case, method):
    _, _, model, params, targets, _ = case
    wrapped = random_adapter(model, params, method, targets, key=4)
    check_merge_round_trip(model, wrapped, *batch_for(model, seed=2))


@pytest.mark.parametrize("cfg", [LoHaConfig(r=4), LoKrConfig(r=2), LoKrConfig(r=2, init_weights="lycoris")])
def test_default_init_is_the_base_model_and_only_factors_train(case, cfg):
    _, _, model, params, targets, _ = case
    import dataclasses

    wrapped = lowrax.wrap(params, dataclasses.replace(cfg, target_modules=targets), jax.random.key(0), model.model_type)
    trainable, _ = lowrax.split(wrapped)
    assert set(jax.tree.leaves(lowrax.labels(trainable))) == {"factor"}
    ids, mask = batch_for(model)
    np.testing.assert_array_equal(lowrax_outputs(model, wrapped, ids, mask), lowrax_outputs(model, params, ids, mask))


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in [1, 2, 7, 12, 64, 96, 127, 128, 576, 1536, 3072, 4096, 11008]:
        for factor in [-1, 2, 4, 8, 16, 5]:
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


# (left, right) shapes: the first is cheaper contracting `left` first, the second `right` first
@pytest.mark.parametrize("left_shape, right_shape", [((3, 2), (4, 3)), ((2, 5), (3, 2))])
def test_kronecker_forward_and_gradients_equal_the_formed_delta(left_shape, right_shape):
    keys = jax.random.split(jax.random.key(0), 4)
    (in_m, out_l), (in_n, out_k) = left_shape, right_shape
    node = LoKrKernel(base=jnp.zeros((in_m * in_n, out_l * out_k)), left=jax.random.normal(keys[0], left_shape),
                      right_a=jax.random.normal(keys[1], (in_n, 2)),
                      right_b=jax.random.normal(keys[2], (2, out_k)), rank=2, alpha=3.0)
    x = jax.random.normal(keys[3], (2, 5, in_m * in_n))  # batch and positions, as layers call it
    np.testing.assert_allclose(node.apply(x), x @ node.delta(), rtol=1e-5, atol=1e-5)
    factored = jax.grad(lambda n, x: jnp.sum(jnp.sin(n.apply(x))), argnums=(0, 1))(node, x)
    formed = jax.grad(lambda n, x: jnp.sum(jnp.sin(x @ (n.base + n.delta()))), argnums=(0, 1))(node, x)
    for got, want in zip(jax.tree.leaves(factored), jax.tree.leaves(formed)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rank_and_module_dropout_act_on_whole_output_columns_in_training_only():
    node = LoHaKernel(base=jnp.zeros((8, 16)), a1=jnp.ones((8, 2)), b1=jnp.ones((2, 16)), a2=jnp.ones((8, 2)),
                      b2=jnp.ones((2, 16)), rank=2, alpha=2.0, rank_dropout=0.5)
    x = jnp.ones((3, 8))
    clean = node.apply(x)
    dropped = node.replace(dropout_key=jax.random.key(0)).apply(x)
    kept = np.asarray(dropped[0] != 0)
    assert 0 < kept.sum() < 16 and np.all((np.asarray(dropped) != 0) == kept[None, :])  # whole columns
    # LoHa rescales by the kept share, as PEFT does
    np.testing.assert_allclose(np.asarray(dropped)[:, kept], np.asarray(clean)[:, kept] * 16 / kept.sum(), rtol=1e-6)
    skipped = node.replace(rank_dropout=0.0, module_dropout=0.999).replace(dropout_key=jax.random.key(1)).apply(x)
    np.testing.assert_array_equal(np.asarray(skipped), 0)


def test_nf4_bases_carry_loha_and_lokr(case):
    _, _, model, params, targets, _ = case
    quantized = lowrax.quantize(params, lowrax.QuantConfig("nf4", 32), model)
    for cfg in (LoHaConfig(r=2, init_weights=False, target_modules=targets),
                LoKrConfig(r=2, init_weights=False, target_modules=targets)):
        wrapped = lowrax.wrap(quantized, cfg, jax.random.key(5), model.model_type)
        ids, mask = batch_for(model)
        out = lowrax_outputs(model, wrapped, ids, mask)
        assert np.isfinite(out).all()
        merged = lowrax.merge(wrapped)  # onto the dequantized base: the adapted model
        np.testing.assert_allclose(lowrax_outputs(model, merged, ids, mask), out, atol=2e-4, rtol=1e-4)


def test_gpt2_is_refused_for_peft_export_as_peft_refuses_it(tmp_path_factory, tmp_path):
    builder = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))  # noqa: E731
    path, hf = hf_model_dir(tmp_path_factory, "lycoris-gpt2", builder)
    for peft_cfg in (peft.LoHaConfig(target_modules=["c_attn"]), peft.OFTConfig(target_modules=["c_attn"])):
        with pytest.raises((TypeError, ValueError), match="Conv1D"):
            peft.get_peft_model(hf, peft_cfg)
    model, params = lowrax.load_pretrained(path, progress=False)
    for cfg in (LoHaConfig(r=2), LoKrConfig(r=2), lowrax.OFTConfig(oft_block_size=16)):
        wrapped = lowrax.wrap(params, cfg, jax.random.key(0), model.model_type)
        with pytest.raises(LowraxError, match="does not support GPT-2"):
            lowrax.save_peft(wrapped, tmp_path / "x", model)
    assert not (tmp_path / "x").exists()


def test_config_errors_name_the_problem():
    with pytest.raises(LowraxError, match="LoHaConfig.r must be an integer >= 1, got 0"):
        LoHaConfig(r=0)
    with pytest.raises(LowraxError, match=r"LoKrConfig.rank_dropout must be a number in \[0, 1\), got 1.5"):
        LoKrConfig(rank_dropout=1.5)
    with pytest.raises(LowraxError, match="LoKrConfig.init_weights must be true, false or 'lycoris'"):
        LoKrConfig(init_weights="gaussian")
    with pytest.raises(LowraxError, match="unknown LoKrConfig key 'decompose'.*did you mean 'decompose_both'"):
        LoKrConfig.from_dict({"decompose": True})


@pytest.mark.parametrize("method,settings", [("loha", ["loha.r=2"]), ("lokr", ["lokr.r=2", "lokr.decompose_both=true"])])
def test_lowrax_train_exports_imports_and_merges(tiny_dir, data_file, tmp_path, method, settings):
    check_method_run(tiny_dir, data_file, tmp_path, method, settings)