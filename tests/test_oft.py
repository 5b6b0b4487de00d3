"""OFT: PEFT exchange both ways with equal logits (llama, BERT classifier), the Cayley and COFT
maths against PEFT's own functions, merge/unmerge, init, block dropout, NF4 bases and `lowrax train`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="OFT parity tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="OFT parity tests need peft (pip install -e .[test])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.oft import OFTConfig, OFTKernel, cayley, nearest_divisor, project_coft  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.test_ia3 import batch_for  # noqa: E402
from tests.test_lycoris import (case, check_lowrax_adapter_loads_in_peft, check_peft_adapter_loads_in_lowrax,  # noqa: E402,F401
                                peft_model_for)
from tests.test_peft_exchange import check_merge_round_trip, lowrax_outputs  # noqa: E402
from tests.test_training_run import check_exports_and_merge, data_file, overrides, tiny_dir  # noqa: E402,F401

# Settings shared by both sides (PEFT's OFTConfig takes the same names). r=5 does not divide the
# widths (64, 96): both sides adjust it to 4 blocks. COFT's ball has radius eps / sqrt(8 blocks)
# = 1.41: lowrax's adapter for PEFT starts at 3x PEFT's random init (block norms about 2.2), so
# every block is projected there, and the rotation stays visible on the random BERT's small logits.
SETTINGS = {
    "neumann": dict(oft_block_size=8, r=0),
    "exact-r": dict(r=5, oft_block_size=0, use_cayley_neumann=False),
    "shared": dict(oft_block_size=16, r=0, block_share=True),
    "coft": dict(oft_block_size=8, r=0, coft=True, eps=4.0),
}


def random_oft(model, params, targets, settings, key=1):
    extra = {"modules_to_save": ("classifier",)} if not model.is_causal_lm else {}
    cfg = OFTConfig(target_modules=targets, init_weights=False, **settings, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r=5's adjustment warning
        return lowrax.wrap(params, cfg, jax.random.key(key), model.model_type)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_lowrax_oft_loads_in_peft(case, setting, tmp_path):  # noqa: F811
    wrapped = random_oft(case[2], case[3], case[4], SETTINGS[setting])
    if SETTINGS[setting].get("coft"):
        wrapped = jax.tree.map(lambda n: n.replace(weight=3 * n.weight) if isinstance(n, OFTKernel) else n, wrapped,
                               is_leaf=lambda n: isinstance(n, OFTKernel))
    check_lowrax_adapter_loads_in_peft(case, wrapped, "OFTConfig", tmp_path)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_peft_oft_loads_in_lowrax(case, setting, tmp_path):  # noqa: F811
    peft_cfg = peft.OFTConfig(target_modules=list(case[4]), init_weights=False, **SETTINGS[setting], **case[5])
    check_peft_adapter_loads_in_lowrax(case, peft_model_for(case, peft_cfg), OFTKernel, tmp_path)


def test_cayley_and_coft_projection_equal_peft_s():
    from peft.tuners.oft.layer import OFTRotationModule

    b = 6
    q = np.random.default_rng(0).normal(0, 0.3, (3, b * (b - 1) // 2)).astype(np.float32)
    module = OFTRotationModule(3, q.shape[1], b, 3 * b)
    for neumann, terms in [(False, 5), (True, 1), (True, 2), (True, 3), (True, 4), (True, 5), (True, 8)]:
        theirs = module._cayley_batch(torch.from_numpy(q), b, neumann, terms).numpy()
        np.testing.assert_allclose(cayley(jnp.asarray(q), b, neumann, terms), theirs, atol=1e-5, err_msg=f"{neumann} {terms}")
    exact = np.asarray(cayley(jnp.asarray(q), b, False, 0))
    np.testing.assert_allclose(exact @ exact.transpose(0, 2, 1), np.broadcast_to(np.eye(b), exact.shape), atol=1e-5)
    for eps in (1e-3, 0.5, 100.0):  # inside and outside the ball
        theirs = module._project_batch(torch.from_numpy(q), eps=eps).numpy()
        np.testing.assert_allclose(project_coft(jnp.asarray(q), b, eps), theirs, rtol=1e-5, atol=1e-7)


def test_block_adjustment_is_peft_s():
    from peft.tuners.oft.layer import OFTLayer

    for width in (12, 64, 96, 576, 1536, 97):
        for wanted in (1, 3, 5, 7, 8, 32, 100, 2000):
            assert nearest_divisor(width, wanted) == OFTLayer.adjust_oft_parameters(None, width, wanted), (width, wanted)


def test_merge_equals_the_adapted_model_and_unmerges(case):  # noqa: F811
    _, _, model, params, targets, _ = case
    check_merge_round_trip(model, random_oft(model, params, targets, SETTINGS["exact-r"], key=4), *batch_for(model, seed=2))


def test_default_init_is_the_base_model_and_only_rotations_train(case):  # noqa: F811
    _, _, model, params, targets, _ = case
    wrapped = lowrax.wrap(params, OFTConfig(target_modules=targets, oft_block_size=16), jax.random.key(0), model.model_type)
    trainable, _ = lowrax.split(wrapped)
    assert set(jax.tree.leaves(lowrax.labels(trainable))) == {"rotation"}
    ids, mask = batch_for(model)
    np.testing.assert_allclose(lowrax_outputs(model, wrapped, ids, mask), lowrax_outputs(model, params, ids, mask),
                               atol=1e-6, rtol=0)


def test_module_dropout_turns_whole_blocks_to_identity_in_training_only():
    node = OFTKernel(base=jnp.eye(8), weight=jnp.full((4, 1), 0.5), blocks=4, block_size=2, module_dropout=0.5)
    x = jnp.ones((1, 8))
    assert not np.allclose(node.apply(x), x)  # every block rotates without a key (evaluation)
    for seed in range(5):
        out = np.asarray(node.replace(dropout_key=jax.random.key(seed)).apply(x)).reshape(4, 2)
        assert (np.all(out == 1.0, axis=1)).sum() == 2  # exactly int(0.5 * 4) blocks pass unrotated


def test_coft_keeps_the_stored_parameters_projected_after_each_update():
    node = OFTKernel(base=jnp.eye(4), weight=jnp.full((2, 1), 3.0), blocks=2, block_size=2, coft=True, eps=0.5)
    stepped = node.after_update(1)
    np.testing.assert_allclose(stepped.weight, project_coft(node.weight, 2, 0.5))
    np.testing.assert_allclose(stepped.apply(jnp.ones((1, 4))), node.apply(jnp.ones((1, 4))), rtol=1e-6)
    grad = jax.grad(lambda w: node.replace(weight=w).apply(jnp.ones((1, 4))).sum())(node.weight)
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0  # gradients flow through the projection


def test_nf4_bases_carry_oft(case):  # noqa: F811
    _, _, model, params, targets, _ = case
    quantized = lowrax.quantize(params, lowrax.QuantConfig("nf4", 32), model)
    wrapped = random_oft(model, quantized, targets, SETTINGS["neumann"], key=5)
    ids, mask = batch_for(model)
    out = lowrax_outputs(model, wrapped, ids, mask)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(lowrax_outputs(model, lowrax.merge(wrapped), ids, mask), out, atol=2e-4, rtol=1e-4)


def test_config_errors_name_the_problem():
    with pytest.raises(LowraxError, match="exactly one of r and oft_block_size non-zero.*r=4, oft_block_size=32"):
        OFTConfig(r=4)
    with pytest.raises(LowraxError, match="exactly one of r and oft_block_size"):
        OFTConfig(r=0, oft_block_size=0)
    with pytest.raises(LowraxError, match=r"OFTConfig.module_dropout must be a number in \[0, 1\), got 1.0"):
        OFTConfig(module_dropout=1.0)
    with pytest.raises(LowraxError, match="unknown OFTConfig key 'block_size'.*did you mean 'oft_block_size'"):
        OFTConfig.from_dict({"block_size": 8})


def test_old_peft_oft_adapters_are_refused_with_the_reason(case, tmp_path):  # noqa: F811
    _, _, model, params, targets, _ = case
    lowrax.save_peft(random_oft(model, params, targets, SETTINGS["neumann"]), tmp_path / "a", model)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.17.1"}))
    with pytest.raises(lowrax.CheckpointError, match="Cayley-Neumann series of a PEFT release before 0.18.0"):
        lowrax.load_peft(params, tmp_path / "a", model)
    del config["oft_block_size"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lowrax.CheckpointError, match="predates PEFT 0.14"):
        lowrax.load_peft(params, tmp_path / "a", model)


def test_lowrax_train_with_oft_exports_imports_and_merges(tiny_dir, data_file, tmp_path):  # noqa: F811
    from lowrax.cli import main

    run = tmp_path / "run"
    items = [i for i in overrides(tiny_dir, data_file, run, 3) if not i.startswith("lora.")]
    items += ["method=oft", "oft.target_modules=[q_proj,v_proj,down_proj]", "oft.oft_block_size=8", "oft.coft=true", "oft.eps=0.5"]
    assert main(["train", *items]) == 0
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "OFT"
    check_exports_and_merge(run, tiny_dir, tmp_path)
    from lowrax.train.runs import restore_run

    nodes = [n for n in jax.tree.leaves(restore_run(run)[2], is_leaf=lambda n: isinstance(n, OFTKernel))
             if isinstance(n, OFTKernel)]
    assert nodes and all(np.allclose(n.weight, project_coft(n.weight, 8, 0.5), rtol=1e-6, atol=0) for n in nodes)  # COFT held
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "imported"), "--model", str(tiny_dir)]) == 0
    assert main(["export-peft", str(tmp_path / "imported"), str(tmp_path / "peft2")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
