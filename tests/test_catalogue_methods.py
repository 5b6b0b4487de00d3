"""PEFT's further per-layer methods (BOFT, C3A, FourierFT, HiRA, SHiRA, DeLoRA, MiSS, GraLoRA, HRA,
RoAd, BEFT, PEANuT, Super-Tuning, DeFT, VB-LoRA, PVeRA, RandLoRA, TinyLoRA, UniLoRA, OSF, Lily, GLoRA, FRoD): each exchanged with PEFT both ways with equal logits (float32), its seeded positions equal to
PEFT's, its config errors, and `lowrax train method=NAME` exporting and importing. The conformance suite
(tests/test_conformance.py) runs each on every family from the registry, merging included."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PEFT exchange tests need torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="PEFT exchange tests need peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.wrap import adapter_nodes  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import random_batch  # noqa: E402
from tests.test_ia3 import max_difference  # noqa: E402
from tests.test_peft_exchange import lowrax_outputs, perturb_peft, randomize  # noqa: E402
from tests.test_variants_peft import MODELS, saved_models  # noqa: E402,F401  (the fixture)
from tests.test_variants_peft import fresh_torch_model as fresh_causal_lm  # noqa: E402
from tests.test_training_run import check_method_run, data_file, tiny_dir  # noqa: E402,F401

# method: (lowrax config for targets, PEFT config class, PEFT kwargs giving a non-trivial adapter)
METHODS = {
    "boft": (lambda t: lowrax.BOFTConfig(boft_block_size=8, init_weights=False, target_modules=t), "BOFTConfig",
             dict(boft_block_size=8, init_weights=False)),
    "c3a": (lambda t: lowrax.C3AConfig(block_size=16, target_modules=t), "C3AConfig",
            dict(block_size=16, init_weights="xavier_uniform")),
    "fourierft": (lambda t: lowrax.FourierFTConfig(n_frequency=40, scaling=10.0, random_loc_seed=11, target_modules=t),
                  "FourierFTConfig", dict(n_frequency=40, scaling=10.0, init_weights=False, random_loc_seed=11)),
    "hira": (lambda t: lowrax.HiraConfig(r=4, target_modules=t), "HiraConfig", dict(r=4, init_weights=False)),
    "delora": (lambda t: lowrax.DeloraConfig(r=4, delora_lambda=3.0, target_modules=t), "DeloraConfig",
               dict(r=4, delora_lambda=3.0, init_weights=False)),
    "miss": (lambda t: lowrax.MissConfig(r=4, target_modules=t), "MissConfig", dict(r=4, init_weights=False)),
    "miss_bat": (lambda t: lowrax.MissConfig(r=4, init_weights="bat", target_modules=t), "MissConfig",
                 dict(r=4, init_weights="bat")),
    "miss_mini": (lambda t: lowrax.MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=t), "MissConfig",
                  dict(r=4, mini_r=8, init_weights="mini")),
    "gralora": (lambda t: lowrax.GraloraConfig(r=8, alpha=16.0, gralora_k=2, target_modules=t), "GraloraConfig",
                dict(r=8, alpha=16, gralora_k=2, init_weights=False)),
    "gralora_hybrid": (lambda t: lowrax.GraloraConfig(r=8, alpha=16.0, gralora_k=4, hybrid_r=2, target_modules=t),
                       "GraloraConfig", dict(r=8, alpha=16, gralora_k=4, hybrid_r=2, init_weights=False)),
    "hra": (lambda t: lowrax.HRAConfig(r=4, target_modules=t), "HRAConfig", dict(r=4, init_weights=False)),
    "hra_gs": (lambda t: lowrax.HRAConfig(r=4, apply_GS=True, init_weights=False, target_modules=t), "HRAConfig",
               dict(r=4, apply_GS=True, init_weights=False)),
    "road": (lambda t: lowrax.RoadConfig(group_size=8, init_weights=False, target_modules=t), "RoadConfig",
             dict(group_size=8, init_weights=False)),
    "road_2": (lambda t: lowrax.RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=t),
               "RoadConfig", dict(variant="road_2", group_size=8, init_weights=False)),
    "road_4": (lambda t: lowrax.RoadConfig(variant="road_4", group_size=8, init_weights=False, target_modules=t),
               "RoadConfig", dict(variant="road_4", group_size=8, init_weights=False)),
    "shira": (lambda t: lowrax.ShiraConfig(r=2, random_seed=5, target_modules=t), "ShiraConfig",
              dict(r=2, init_weights=False, random_seed=5)),
    "beft": (lambda t: lowrax.BeftConfig(init_weights=False, target_modules=t), "BeftConfig",
             dict(init_weights=False)),
    "peanut": (lambda t: lowrax.PeanutConfig(r=4, init_weights=False, target_modules=t), "PeanutConfig",
               dict(r=4, init_weights=False)),
    "supertuning": (lambda t: lowrax.SupertuningConfig(sparsity=0.9, init_weights=False, target_modules=t),
                    "SupertuningConfig", dict(sparsity=0.9, init_weights=False)),
    "supra": (lambda t: lowrax.SupertuningConfig(sparsity=0.95, r=2, lora_alpha=3.0, init_weights=False,
                                                 target_modules=t), "SupertuningConfig",
              dict(sparsity=0.95, r=2, lora_alpha=3.0, init_weights=False)),
    "supertuning_bottom": (lambda t: lowrax.SupertuningConfig(sparsity=0.8, select_top=False, init_weights=False,
                                                              target_modules=t), "SupertuningConfig",
                           dict(sparsity=0.8, select_top=False, init_weights=False)),
    "deft": (lambda t: lowrax.DeftConfig(r=4, target_modules=t), "DeftConfig", dict(r=4)),
    "vblora": (lambda t: lowrax.VBLoRAConfig(r=2, num_vectors=8, vector_length=8, init_vector_bank_bound=0.5,
                                             target_modules=t), "VBLoRAConfig",
               dict(r=2, num_vectors=8, vector_length=8, init_vector_bank_bound=0.5)),
    "pvera": (lambda t: lowrax.PveraConfig(r=4, init_weights=False, target_modules=t), "PveraConfig",
              dict(r=4, init_weights=False)),
    "randlora": (lambda t: lowrax.RandLoraConfig(r=8, randlora_alpha=16.0, init_weights=False, target_modules=t),
                 "RandLoraConfig", dict(r=8, randlora_alpha=16, init_weights=False)),
    "randlora_sparse": (lambda t: lowrax.RandLoraConfig(r=8, sparse=True, init_weights=False, target_modules=t),
                        "RandLoraConfig", dict(r=8, sparse=True, init_weights=False)),
    "tinylora": (lambda t: lowrax.TinyLoraConfig(r=2, u=4, init_weights="uniform", init_v_bound=0.5, target_modules=t),
                 "TinyLoraConfig", dict(r=2, u=4, init_weights="uniform", init_v_bound=0.5)),
    "tinylora_tied": (lambda t: lowrax.TinyLoraConfig(r=3, u=3, weight_tying=0.5, init_weights="uniform",
                                                      init_v_bound=0.5, target_modules=t), "TinyLoraConfig",
                      dict(r=3, u=3, weight_tying=0.5, init_weights="uniform", init_v_bound=0.5)),
    "unilora": (lambda t: lowrax.UniLoraConfig(r=2, theta_d_length=64, init_theta_d_bound=0.3, target_modules=t),
                "UniLoraConfig", dict(r=2, theta_d_length=64, init_theta_d_bound=0.3)),
    "unilora_saved_indices": (lambda t: lowrax.UniLoraConfig(r=2, theta_d_length=64, init_weights=False,
                                                             target_modules=t), "UniLoraConfig",
                              dict(r=2, theta_d_length=64, init_weights=False, save_indices=True)),
    "osf": (lambda t: lowrax.OSFConfig(effective_rank=20, target_modules=t), "OSFConfig", dict(effective_rank=20)),
    "osf_fraction": (lambda t: lowrax.OSFConfig(effective_rank=0.25, rank_pattern={"down_proj": 50}, target_modules=t),
                     "OSFConfig", dict(effective_rank=0.25, rank_pattern={"down_proj": 50})),
    "lily": (lambda t: lowrax.LilyConfig(r=4, stride_A=2, num_B=3, init_weights=False, target_modules=t), "LilyConfig",
             dict(r=4, stride_A=2, num_B=3, init_weights=False)),
    "glora": (lambda t: lowrax.GloraConfig(r=4, init_weights=False, target_modules=t), "GloraConfig",
              dict(r=4, init_weights=False)),
    "glora_vectors": (lambda t: lowrax.GloraConfig(config_A_B="vector", config_C="vector", config_D_E="vector",
                                                   init_weights=False, target_modules=t), "GloraConfig",
                      dict(config_A_B="vector", config_C="vector", config_D_E="vector", init_weights=False)),
    "frod": (lambda t: lowrax.FrodConfig(sparse_rate=0.05, init_weights=False, target_modules=t), "FrodConfig",
             dict(sparse_rate=0.05, init_weights=False)),
    "deft_qr": (lambda t: lowrax.DeftConfig(r=4, alpha=8, decomposition_method="qr", target_modules=t), "DeftConfig",
                dict(r=4, alpha=8, decomposition_method="qr")),
    "deft_para": (lambda t: lowrax.DeftConfig(r=4, para=True, target_modules=t), "DeftConfig", dict(r=4, para=True)),
    "peanut_deep": (lambda t: lowrax.PeanutConfig(r=4, depth=2, act_fn="gelu", scaling=0.5, init_weights=False,
                                                  target_modules=t), "PeanutConfig",
                    dict(r=4, depth=2, act_fn="gelu", scaling=0.5, init_weights=False)),
}
# PEFT implements these for nn.Linear only, not GPT-2's Conv1D
GPT2_REFUSED = {"beft", "boft", "c3a", "delora", "hra", "hra_gs", "miss", "miss_bat", "miss_mini", "peanut",
                "peanut_deep", "road", "road_2", "road_4", "shira", "supertuning", "supra", "supertuning_bottom", "osf",
                "osf_fraction", "lily", "glora", "glora_vectors"}
CASES = [(family, method) for method in sorted(METHODS) for family in MODELS
         if not (family == "gpt2" and method in GPT2_REFUSED)]
# PEFT rebuilds FRoD's per-layer U from its own eigendecomposition of the weights when it loads a file, so a
# file is exact in PEFT only where that decomposition agrees with the writer's: lowrax reads PEFT's FRoD files
# exactly, and `test_frod_written_by_lowrax_is_read_back_exactly` covers the other direction in lowrax
FROM_PEFT_ONLY = {"frod"}


def peft_kwargs(family: str, method: str) -> dict:
    targets = list(MODELS[family][1])
    return dict(METHODS[method][2], target_modules=targets, **({"fan_in_fan_out": True} if family == "gpt2" else {}))


def fresh_torch_model(path):
    return fresh_causal_lm(path).eval()


# Lily's router averages over every row of the batch, padding included, and the hidden states at padded
# positions are each framework's own: it is compared on a batch without padding
UNPADDED = {"lily"}


def largest_difference(model, params, torch_model, method: str = "") -> float:
    """Largest logit difference at the real positions of a left-padded batch (test_ia3's measure)."""
    lengths = [9, 9] if method in UNPADDED else [9, 6]
    return max_difference(model, params, torch_model, *random_batch(128, lengths, pad_id=0, left=True, seed=3))


@pytest.mark.parametrize("family, method", CASES)
def test_peft_adapter_loads_in_lowrax_with_equal_logits(saved_models, family, method, tmp_path):
    path, model, params, _ = saved_models(family)
    torch.manual_seed(0)
    peft_model = perturb_peft(peft.get_peft_model(fresh_torch_model(path), getattr(peft, METHODS[method][1])(
        **peft_kwargs(family, method))))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = lowrax.load_peft(params, tmp_path / "adapter", model)
    assert largest_difference(model, loaded, peft_model, method) <= 1e-4
    assert largest_difference(model, params, peft_model, method) > 1e-3  # the adapter acts: 10x the tolerance


@pytest.mark.parametrize("family, method", [case for case in CASES if case[1] not in FROM_PEFT_ONLY])
def test_lowrax_adapter_loads_in_peft_with_equal_logits(saved_models, family, method, tmp_path):
    path, model, params, targets = saved_models(family)
    wrapped = lowrax.wrap(params, METHODS[method][0](tuple(targets)), jax.random.key(1), model=model)
    trained = randomize(wrapped, jax.random.key(2))
    lowrax.save_peft(trained, tmp_path / "adapter", model, initial=wrapped)
    peft_model = peft.PeftModel.from_pretrained(fresh_torch_model(path), tmp_path / "adapter").eval()
    assert largest_difference(model, trained, peft_model, method) <= 1e-4
    assert largest_difference(model, params, peft_model, method) > 1e-3


@pytest.mark.parametrize("method", sorted(GPT2_REFUSED))
def test_on_gpt2_it_trains_and_merges_but_is_not_written_for_peft(saved_models, tmp_path, method):
    _, model, params, targets = saved_models("gpt2")
    wrapped = randomize(lowrax.wrap(params, METHODS[method][0](tuple(targets)), jax.random.key(1), model=model),
                        jax.random.key(2))
    ids, mask = random_batch(128, [7], pad_id=0, left=True, seed=1)
    if all(n.mergeable for n in adapter_nodes(wrapped).values()):  # Lily's routing has no weight to merge
        np.testing.assert_allclose(lowrax_outputs(model, lowrax.merge(wrapped), ids, mask),
                                   lowrax_outputs(model, wrapped, ids, mask), atol=1e-4)
    with pytest.raises(LowraxError, match="GPT-2"):
        lowrax.save_peft(wrapped, tmp_path / "adapter", model)


def test_seeded_positions_equal_peft(saved_models):
    """FourierFT's spectrum positions and SHiRA's mask come from torch.randperm with PEFT's seeds."""
    path, model, params, targets = saved_models("llama")
    torch.manual_seed(0)
    for method, peft_name, field in (("fourierft", "FourierFTConfig", "indices"), ("shira", "ShiraConfig", "shira_indices")):
        theirs = peft.get_peft_model(fresh_torch_model(path), getattr(peft, peft_name)(**peft_kwargs("llama", method)))
        layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
        expected = getattr(layer, field)["default"].numpy()
        ours = first_q_proj_node(lowrax.wrap(params, METHODS[method][0](tuple(targets)), jax.random.key(0), model=model))
        if method == "fourierft":
            from lowrax.adapters.fourierft import spectrum_positions

            d_in, d_out = ours.base.shape
            got = np.stack(spectrum_positions(d_out, d_in, ours.spectrum.shape[0], ours.seed))
        else:
            got = np.asarray(ours.indices)
        np.testing.assert_array_equal(got, expected)


def first_q_proj_node(params):
    is_node = lambda x: isinstance(x, lowrax.AdapterNode)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
    return next(leaf for path, leaf in flat if is_node(leaf) and "q_proj" in jax.tree_util.keystr(path))


@pytest.fixture
def peft_butterflies(monkeypatch):
    """PEFT's BOFT with its CUDA extension's code path on the CPU: without the extension PEFT silently
    uses one butterfly factor whatever the config says; the extension only builds block-diagonal
    matrices, which torch.block_diag does here."""
    from peft.tuners.boft import layer as boft_layer

    class BlockDiagonal:
        @staticmethod
        def apply(blocks):
            return torch.stack([torch.block_diag(*factor) for factor in blocks])

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", BlockDiagonal)


def test_boft_butterfly_factors_exchange_with_peft_both_ways(saved_models, peft_butterflies, tmp_path):
    path, model, params, targets = saved_models("llama")
    settings = dict(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(fresh_torch_model(path), peft.BOFTConfig(target_modules=list(targets), **settings)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = lowrax.load_peft(params, tmp_path / "theirs", model)
    assert largest_difference(model, loaded, theirs) <= 1e-4
    ours = randomize(lowrax.wrap(params, lowrax.BOFTConfig(target_modules=tuple(targets), **settings), jax.random.key(1),
                                 model=model), jax.random.key(2))
    lowrax.save_peft(ours, tmp_path / "ours", model)
    back = peft.PeftModel.from_pretrained(fresh_torch_model(path), tmp_path / "ours").eval()
    assert largest_difference(model, ours, back) <= 1e-4
    assert largest_difference(model, params, back) > 1e-3


def test_c3a_delta_matrix_equals_its_fft_forward():
    """The merged block-circulant matrix and the FFT forward are the same linear map."""
    kernel = jax.random.normal(jax.random.key(0), (3, 2, 4))
    node = lowrax.C3AKernel(base=np.zeros((8, 12), np.float32), kernel=kernel)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    np.testing.assert_allclose(np.asarray(node.delta_output(x)), np.asarray(x @ node.delta()), atol=1e-5)


def test_config_errors_name_the_problem(saved_models):
    _, model, params, _ = saved_models("llama")
    with pytest.raises(LowraxError, match="C3AConfig.block_size must be an integer >= 1, got 0"):
        lowrax.C3AConfig(block_size=0)
    with pytest.raises(LowraxError, match="C3A block_size 48 must divide .* input width 64.*choose a divisor of 64"):
        lowrax.wrap(params, lowrax.C3AConfig(block_size=48, target_modules=("q_proj",)), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="FourierFT n_frequency 100000 exceeds"):
        lowrax.wrap(params, lowrax.FourierFTConfig(n_frequency=100000, target_modules=("q_proj",)), jax.random.key(0),
                    model=model)
    with pytest.raises(LowraxError, match=r"HiraConfig.hira_dropout must be a number in \[0, 1\), got 1"):
        lowrax.HiraConfig(hira_dropout=1.0)
    with pytest.raises(LowraxError, match="SHiRA r=40 would train"):
        lowrax.wrap(params, lowrax.ShiraConfig(r=40, target_modules=("q_proj",)), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="ShiraConfig.mask_type"):
        lowrax.ShiraConfig(mask_type="structured")
    with pytest.raises(LowraxError, match="BOFTConfig.boft_block_num must be 0 when boft_block_size is set"):
        lowrax.BOFTConfig(boft_block_size=4, boft_block_num=2)
    with pytest.raises(LowraxError, match=r"GraloraConfig.r must be a multiple of gralora_k \(3\), got 8"):
        lowrax.GraloraConfig(r=8, gralora_k=3)
    with pytest.raises(LowraxError, match="RoadConfig.group_size must be an even number"):
        lowrax.RoadConfig(group_size=7)


@pytest.mark.parametrize("method, settings", [("c3a", ["c3a.block_size=16"]), ("fourierft", ["fourierft.n_frequency=32"]),
                                              ("hira", ["hira.r=2", "optim.learning_rate=0.2"]),
                                              ("delora", ["delora.r=2"]), ("miss", ["miss.r=4", "miss.init_weights=bat"]),
                                              ("gralora", ["gralora.r=4", "gralora.alpha=8", "gralora.hybrid_r=2"]),
                                              ("hra", ["hra.r=2", "hra.apply_GS=true", "hra.init_weights=false"]),
                                              ("road", ["road.group_size=8", "road.variant=road_4"]),
                                              ("boft", ["boft.boft_block_size=4", "boft.boft_n_butterfly_factor=2"]),
                                              ("shira", ["shira.r=1"]), ("beft", ["beft.target_modules=all-linear"]),
                                              ("peanut", ["peanut.r=4", "peanut.depth=1"]),
                                              ("supertuning", ["supertuning.sparsity=0.9", "supertuning.r=2"]),
                                              ("deft", ["deft.r=2", "deft.decomposition_method=qr"]),
                                              ("vblora", ["vblora.r=2", "vblora.num_vectors=8", "vblora.vector_length=16"]),
                                              ("pvera", ["pvera.r=4"]),
                                              ("randlora", ["randlora.r=4", "randlora.randlora_alpha=8"]),
                                              ("tinylora", ["tinylora.u=8", "tinylora.weight_tying=0.5"]),
                                              ("unilora", ["unilora.r=2", "unilora.theta_d_length=64"]),
                                              ("osf", ["osf.effective_rank=0.75"]),
                                              ("lily", ["lily.r=4", "lily.stride_A=2"]),
                                              ("glora", ["glora.r=2"]),
                                              ("frod", ["frod.sparse_rate=0.05"])])
def test_lowrax_train_then_export_and_import(tiny_dir, data_file, tmp_path, method, settings):  # noqa: F811
    check_method_run(tiny_dir, data_file, tmp_path, method, settings, full=False)


def test_exact_cayley_without_lapack_equals_lapack_and_is_orthogonal():
    """OFT's exact Cayley and BOFT's blocks solve (I + S) R = I - S without LAPACK (core/cayley.py)."""
    import jax.numpy as jnp

    from lowrax.core.cayley import cayley

    r = jax.random.normal(jax.random.key(0), (6, 16, 16))
    s = 0.5 * (r - jnp.swapaxes(r, -1, -2))
    eye = jnp.eye(16)
    lapack = jnp.linalg.solve(eye + s, eye - s)
    ours = cayley(s)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(lapack), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours @ jnp.swapaxes(ours, -1, -2)), np.broadcast_to(np.eye(16), (6, 16, 16)),
                               atol=1e-5)


@pytest.mark.parametrize("settings", [dict(r=4), dict(r=4, alpha=8, decomposition_method="qr")])
def test_deft_starts_as_the_base_model(saved_models, settings):
    """DeFT's conformance examples start away from the base (see its registration), so its identity at
    PEFT's init is checked here."""
    _, model, params, targets = saved_models("llama")
    wrapped = lowrax.wrap(params, lowrax.DeftConfig(target_modules=tuple(targets), **settings), jax.random.key(1),
                          model=model)
    ids, mask = random_batch(128, [7], pad_id=0, left=True, seed=1)
    np.testing.assert_allclose(lowrax_outputs(model, wrapped, ids, mask), lowrax_outputs(model, params, ids, mask),
                               atol=1e-5)


@pytest.mark.parametrize("peft_type, reason", [("XLORA", "X-LoRA mixes several LoRA adapters"),
                                               ("ADAPTION_PROMPT", "Llama-Adapter adds gated prompts"),
                                               ("PSOFT", "PSOFT's file holds only the r x r rotation"),
                                               ("SOMETHING_NEW", "")])
def test_peft_types_not_built_are_refused_by_name(saved_models, tmp_path, peft_type, reason):
    from lowrax.io.safetensors_dir import write_tensor_file

    _, model, params, _ = saved_models("llama")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    write_tensor_file({"x": np.zeros(1, np.float32)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(LowraxError, match=f"adapter type '{peft_type}' is not supported.*{reason}.*supported peft_type "
                                          "values: .*LORA"):
        lowrax.load_peft(params, tmp_path, model)


def test_vblora_saved_with_only_top_k_weights_loads_for_inference_not_training(saved_models, tmp_path):
    """PEFT's save_only_topk_weights keeps each sub-vector's top-k indices and weights: lowrax restores the
    logits as PEFT does (-inf elsewhere), equal logits, and import-peft refuses to continue training it."""
    from lowrax.adapters.registry import format_for_config

    path, model, params, targets = saved_models("llama")
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(fresh_torch_model(path), peft.VBLoRAConfig(
        r=3, num_vectors=16, vector_length=16, topk=3, init_vector_bank_bound=0.5, save_only_topk_weights=True,
        target_modules=list(targets))).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(fresh_torch_model(path), tmp_path / "adapter").eval()
    loaded = lowrax.load_peft(params, tmp_path / "adapter", model)
    assert largest_difference(model, loaded, reloaded) <= 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    with pytest.raises(LowraxError, match="save_only_topk_weights.*cannot continue training"):
        format_for_config(config).to_config(config)


def test_pvera_samples_while_training_and_uses_the_mean_otherwise(saved_models):
    """PVeRA's training forward draws z = mu + eps * exp(logvar / 2) with the step's key (so the log-variance
    half of lambda_d gets a gradient); without a key (evaluation, generation, PEFT's eval mode) z = mu."""
    from lowrax.adapters.tree import with_dropout_keys
    from lowrax.adapters.wrap import adapter_nodes

    _, model, params, targets = saved_models("llama")
    wrapped = randomize(lowrax.wrap(params, lowrax.PveraConfig(r=4, target_modules=tuple(targets)), jax.random.key(1),
                                    model=model), jax.random.key(2))
    keyed = with_dropout_keys(wrapped, jax.random.key(7))
    assert all(n.dropout_key is not None for n in adapter_nodes(keyed).values())
    ids, mask = random_batch(128, [7, 7], pad_id=0, left=False)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    assert np.abs(lowrax_outputs(model, keyed, ids, mask) - lowrax_outputs(model, wrapped, ids, mask)).max() > 1e-4

    def loss(trainable, frozen, key):
        tree = with_dropout_keys(lowrax.combine(trainable, frozen), key) if key is not None else lowrax.combine(trainable, frozen)
        total, count = lowrax.train.step.causal_lm_loss(model, tree, batch)
        return total / count

    trainable, frozen = lowrax.split(wrapped)
    sampled = jax.grad(loss)(trainable, frozen, jax.random.key(3))
    mean_only = jax.grad(loss)(trainable, frozen, None)
    node_sampled = next(iter(adapter_nodes(lowrax.combine(sampled, frozen)).values()))
    node_mean = next(iter(adapter_nodes(lowrax.combine(mean_only, frozen)).values()))
    assert np.abs(np.asarray(node_sampled.lambda_d[4:])).max() > 0  # the log-variance learns from the noise
    assert np.abs(np.asarray(node_mean.lambda_d[4:])).max() == 0


def test_pvera_refuses_what_it_cannot_reproduce(saved_models, tmp_path):
    path, model, params, _ = saved_models("llama")
    for option in ({"save_projection": False}, {"sample_at_inference": True}):
        peft_model = peft.get_peft_model(fresh_torch_model(path), peft.PveraConfig(r=4, target_modules=["q_proj"],
                                                                                   **option))
        peft_model.save_pretrained(tmp_path / str(option))
        match = "save_projection=false" if "save_projection" in option else "samples at inference"
        with pytest.raises(lowrax.CheckpointError, match=match):
            lowrax.load_peft(params, tmp_path / str(option), model)


def test_tinylora_needs_the_model_to_number_its_modules(saved_models, tmp_path):
    _, model, params, targets = saved_models("llama")
    with pytest.raises(LowraxError, match="numbers the adapted modules in the model's order: pass the model"):
        lowrax.wrap(params, lowrax.TinyLoraConfig(target_modules=tuple(targets)), jax.random.key(0))
    wrapped = lowrax.wrap(params, lowrax.TinyLoraConfig(u=4, target_modules=tuple(targets)), jax.random.key(0), model=model)
    lowrax.save_peft(wrapped, tmp_path / "tiny", model)
    with pytest.raises(LowraxError, match="numbers its modules in the model's order: pass the model"):
        lowrax.load_peft(params, tmp_path / "tiny")


def test_osf_projects_gradients_as_peft_hooks_do(saved_models):
    """OSF's gradients of U_low and V_low, after the projection that keeps them off the frozen top directions,
    equal PEFT's (its tensor hooks) on square, wide and tall layers, each singular pair up to the sign
    its LAPACK chose (which flips that column of U_low's gradient and row of V_low's)."""
    from lowrax.adapters.tree import precondition_grads
    from lowrax.adapters.wrap import adapter_nodes

    path, model, params, _ = saved_models("llama")
    targets = ["q_proj", "gate_proj", "down_proj"]  # 64 x 64, 64 -> 96, 96 -> 64
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(fresh_torch_model(path), peft.OSFConfig(effective_rank=20, target_modules=targets))
    ids, mask = random_batch(128, [8, 8], pad_id=0, left=False)
    peft_model(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.backward()
    wrapped = lowrax.wrap(params, lowrax.OSFConfig(effective_rank=20, target_modules=tuple(targets)), jax.random.key(0),
                          model=model)
    trainable, frozen = lowrax.split(wrapped)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}

    def loss(t):
        total, count = lowrax.train.step.causal_lm_loss(model, lowrax.combine(t, frozen), batch)
        return total / count

    grads = adapter_nodes(lowrax.combine(precondition_grads(jax.grad(loss)(trainable), wrapped), frozen))
    for name, module in peft_model.named_modules():
        if hasattr(module, "osf_svd_params") and "default" in module.osf_svd_params:
            key = name.removeprefix("base_model.model.")
            ours = grads[key]
            signs = np.sign(np.sum(np.asarray(adapter_nodes(wrapped)[key].u0) * module._osf_U_low_init["default"].numpy(), 0))
            for part, field, aligned in (("U_low", "u_low", signs[None, :]), ("V_low", "v_low", signs[:, None]),
                                         ("S_low", "s_low", 1.0)):
                theirs = module.osf_svd_params["default"][part].grad.numpy()
                np.testing.assert_allclose(np.asarray(getattr(ours, field)) * aligned, theirs, atol=1e-6,
                                           err_msg=f"{name} {part}")


def test_psoft_adapters_mean_different_things_under_another_svd_sign(saved_models):
    """Why PSOFT is refused: PEFT rebuilds A and B from an SVD of the base at load, and an equally valid SVD
    with one singular pair negated (another LAPACK's choice) changes the adapted model's output."""
    path, model, _, _ = saved_models("llama")
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(fresh_torch_model(path), peft.PsoftConfig(r=4, target_modules=["q_proj"],
                                                                                init_weights=False)).eval()
    ids = torch.tensor(random_batch(128, [7], pad_id=0, left=False)[0])
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        a, b = layer._get_psoft_ab_cache_buffers("default")
        a[0].neg_()
        b[:, 0].neg_()  # still an SVD of the same weight: B A is unchanged
        after = peft_model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("kinds", [dict(), dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
                                   dict(config_A_B="constant", config_C="none", config_D_E="constant")])
def test_glora_on_layers_with_a_bias_equals_peft_both_ways(tmp_path_factory, tmp_path, kinds):
    """BERT's layers have biases: GLoRA's bias terms (b D, E, W C) are exchanged too."""
    from tests.conftest import hf_model_dir
    from tests.test_peft_exchange import SMALL

    path, _ = hf_model_dir(tmp_path_factory, "bert-glora", lambda: transformers.BertForSequenceClassification(
        transformers.BertConfig(**SMALL, num_labels=3)))
    model, params = lowrax.load_pretrained(path, progress=False)
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=False, seed=4)
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    peft_model = perturb_peft(peft.get_peft_model(hf, peft.GloraConfig(r=4, target_modules=["query", "value"],
                                                                        init_weights=False, **kinds))).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = lowrax.load_peft(params, tmp_path / "theirs", model)
    assert max_difference(model, loaded, peft_model, ids, mask) <= 1e-4
    assert max_difference(model, params, peft_model, ids, mask) > 2e-4  # the tiny classifier's logits move little
    ours = randomize(lowrax.wrap(params, lowrax.GloraConfig(r=4, target_modules=("query", "value"),
                                                            modules_to_save=("classifier",), **kinds),
                                 jax.random.key(1), model=model), jax.random.key(2))  # a classifier's file carries its head
    lowrax.save_peft(ours, tmp_path / "ours", model)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    assert max_difference(model, ours, peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval(), ids, mask) <= 1e-4


def test_frod_written_by_lowrax_is_read_back_exactly(saved_models, tmp_path):
    """A FRoD file carries the shared bases and sparse patterns; the per-layer U is solved again from the base on
    reading (in float64), so lowrax's own file loads back to the same model."""
    _, model, params, targets = saved_models("gpt2")
    wrapped = randomize(lowrax.wrap(params, lowrax.FrodConfig(sparse_rate=0.05, target_modules=tuple(targets)),
                                    jax.random.key(1), model=model), jax.random.key(2))
    lowrax.save_peft(wrapped, tmp_path / "frod", model)
    loaded = lowrax.load_peft(params, tmp_path / "frod", model)
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=True, seed=3)
    valid = mask.astype(bool)
    assert np.abs(lowrax_outputs(model, loaded, ids, mask) - lowrax_outputs(model, wrapped, ids, mask))[valid].max() <= 1e-5
