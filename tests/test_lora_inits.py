"""LoRA's initialisations against PEFT's: the same factors and rewritten base on the same model and data.

Each test builds PEFT's LoRA with `init_lora_weights=...` on a tiny random HF model and compares its
lora_A, lora_B and base weights with lowrax's wrap of the same model. Where PEFT sketches an SVD at
random (pissa_niter_K, LoRA-GA) or needs a GPU (LoftQ), the test runs PEFT's code with the sketch
made exact or the device moved to the CPU, and says so.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="LoRA init parity needs torch (pip install -e .[test])")
peft = pytest.importorskip("peft", reason="LoRA init parity needs peft (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lowrax  # noqa: E402
from lowrax.adapters.lora import inits  # noqa: E402
from lowrax.adapters.wrap import adapter_nodes  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir, random_batch  # noqa: E402
from tests.test_peft_exchange import SMALL, lowrax_outputs, randomize  # noqa: E402

LLAMA_TARGETS = ("q_proj", "v_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_fc")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            build = {"llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
                     "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=64,
                                                                                          n_layer=2, n_head=4))}[family]
            path, _ = hf_model_dir(tmp_path_factory, family, build)
            cache[family] = (path, *lowrax.load_pretrained(path, progress=False))
        return cache[family]

    return get


def targets_of(family):
    return LLAMA_TARGETS if family == "llama" else GPT2_TARGETS


def peft_model_of(path, family, **lora_kwargs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    extra = {"fan_in_fan_out": True} if family == "gpt2" else {}
    cfg = peft.LoraConfig(target_modules=list(targets_of(family)), **extra, **lora_kwargs)
    return hf, cfg


def peft_factors(peft_model, family):
    """{module name: (a [in, r], b [r, out], base kernel [in, out])} in lowrax's layout."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            weight = module.get_base_layer().weight.detach().numpy()
            kernel = weight if family == "gpt2" else weight.T  # Conv1D stores (in, out) already
            out[name.removeprefix("base_model.model.")] = (module.lora_A["default"].weight.detach().numpy().T,
                                                           module.lora_B["default"].weight.detach().numpy().T, kernel)
    return out


def assert_same_start(wrapped, peft_model, family, atol=1e-4, relative=0.0, pairs=True):
    """Equal factors and base. Singular vectors are defined up to sign, and LAPACK builds differ in the
    sign they pick: each rank-one pair (a[:, i], b[i]) may be negated as a whole (a @ b, and so the
    rewritten base, are unchanged). relative: a tolerance in units of each array's largest entry, for
    factors that amplify float32 rounding (CorDA's bottom directions go through an inverse covariance).
    pairs=False: a and b come from different singular vectors (LoRA-GA), so each column of a and each
    row of b has a sign of its own, and the bases agree once each side's own s a b is added back."""
    ours, theirs = adapter_nodes(wrapped), peft_factors(peft_model, family)
    assert set(ours) == set(theirs)
    for name, (a, b, base) in theirs.items():
        node = ours[name]
        our_a, our_b = np.asarray(node.a), np.asarray(node.b)
        if pairs:
            a_signs = b_signs = np.sign(np.sum(our_a * a, axis=0) + np.sum(our_b * b, axis=1))
        else:
            a_signs, b_signs = np.sign(np.sum(our_a * a, axis=0)), np.sign(np.sum(our_b * b, axis=1))
        a_signs, b_signs = np.where(a_signs == 0, 1, a_signs), np.where(b_signs == 0, 1, b_signs)
        np.testing.assert_allclose(our_a * a_signs[None, :], a, atol=max(atol, relative * np.abs(a).max()),
                                   err_msg=f"{name}: a")
        np.testing.assert_allclose(our_b * b_signs[:, None], b, atol=max(atol, relative * np.abs(b).max()),
                                   err_msg=f"{name}: b")
        if not pairs:
            our_base = np.asarray(node.base) + node.scale * our_a @ our_b
            np.testing.assert_allclose(our_base, base + node.scale * a @ b, atol=atol, err_msg=f"{name}: base + s a b")
            continue
        np.testing.assert_allclose(np.asarray(lowrax.core.kernels.dense_kernel(node.base)), base, atol=atol,
                                   err_msg=f"{name}: base")


def unchanged_at_init(model, params, wrapped, tol=1e-4):
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=False)
    valid = mask.astype(bool)
    diff = np.abs(lowrax_outputs(model, wrapped, ids, mask) - lowrax_outputs(model, params, ids, mask))[valid].max()
    assert diff <= tol


@pytest.mark.parametrize("family,init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora"),
                                         ("llama", "mica"), ("gpt2", "mica")])
def test_svd_inits_equal_peft(models, family, init):
    path, model, params = models(family)
    hf, cfg = peft_model_of(path, family, r=4, lora_alpha=8, init_lora_weights=init)
    peft_model = peft.get_peft_model(hf, cfg)
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, alpha=8, init=init, target_modules=targets_of(family)),
                          jax.random.key(0), model=model)
    assert_same_start(wrapped, peft_model, family)
    unchanged_at_init(model, params, wrapped)
    if init == "mica":  # b is frozen on both sides: only a trains
        node = next(iter(adapter_nodes(wrapped).values()))
        assert node.field_labels()["b"] == "frozen"
        assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_olora_on_gpt2_is_broken_in_peft_and_built_here(models):
    # PEFT's OLoRA factors the Conv1D (in, out) weight as if it were (out, in): on GPT-2's non-square
    # c_attn its lora_A comes out (r, out) and the model no longer runs. lowrax factors W^T for every
    # family; GPT-2's start keeps the model unchanged.
    path, model, params = models("gpt2")
    hf, cfg = peft_model_of(path, "gpt2", r=4, init_lora_weights="olora")
    peft_model = peft.get_peft_model(hf, cfg)
    assert peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.shape == (4, 192)
    with pytest.raises(RuntimeError):
        peft_model(input_ids=torch.tensor([[5, 6, 7]]))
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, init="olora", target_modules=GPT2_TARGETS), jax.random.key(0),
                          model=model)
    unchanged_at_init(model, params, wrapped)


def test_randomized_svd_is_torch_svd_lowrank_given_the_same_sketch(monkeypatch):
    """pissa_niter_K: the algorithm equals torch.svd_lowrank's when both draw the same Gaussian sketch."""
    m = np.random.default_rng(0).normal(size=(40, 24)).astype(np.float32)
    key = jax.random.key(3)
    sketch = np.asarray(jax.random.normal(key, (24, 5), jnp.float32))
    import torch._lowrank as lowrank

    monkeypatch.setattr(lowrank.torch, "randn", lambda *a, **k: torch.from_numpy(sketch.copy()))
    u, s, v = torch.svd_lowrank(torch.from_numpy(m), q=5, niter=3)
    left, ours_s, right_t = inits.randomized_svd(jnp.asarray(m), 5, 3, key)
    np.testing.assert_allclose(np.asarray(ours_s), s.numpy(), rtol=1e-4)
    # singular vectors up to a common sign per pair
    for i in range(5):
        sign = np.sign(np.dot(np.asarray(left[:, i]), u[:, i].numpy()))
        np.testing.assert_allclose(sign * np.asarray(left[:, i]), u[:, i].numpy(), atol=1e-4)
        np.testing.assert_allclose(sign * np.asarray(right_t[i]), v[:, i].numpy(), atol=1e-4)


def test_pissa_niter_keeps_the_model_and_finds_a_low_rank_top(models):
    path, model, params = models("llama")
    cfg = lowrax.LoraConfig(r=4, alpha=8, init="pissa_niter_16", target_modules=LLAMA_TARGETS)
    wrapped = lowrax.wrap(params, cfg, jax.random.key(0), model=model)
    unchanged_at_init(model, params, wrapped)
    exact = adapter_nodes(lowrax.wrap(params, cfg.__class__(r=4, alpha=8, init="pissa", target_modules=LLAMA_TARGETS),
                                      jax.random.key(0), model=model))
    for name, node in adapter_nodes(wrapped).items():  # the sketch's top singular value is the exact one's to 1%
        top = np.linalg.svd(np.asarray(node.a) @ np.asarray(node.b), compute_uv=False)[0]
        top_exact = np.linalg.svd(np.asarray(exact[name].a) @ np.asarray(exact[name].b), compute_uv=False)[0]
        assert abs(top - top_exact) <= 0.01 * top_exact


def test_orthogonal_init_starts_at_zero_with_peft_statistics(models):
    path, model, params = models("llama")
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, init="orthogonal", target_modules=LLAMA_TARGETS),
                          jax.random.key(0), model=model)
    hf, cfg = peft_model_of(path, "llama", r=4, init_lora_weights="orthogonal")
    torch.manual_seed(0)
    theirs = peft_factors(peft.get_peft_model(hf, cfg), "llama")
    for name, node in adapter_nodes(wrapped).items():
        a, b = np.asarray(node.a), np.asarray(node.b)
        assert np.abs(a @ b).max() <= 1e-6 and np.abs(a).max() > 0 and np.abs(b).max() > 0
        ta, tb = theirs[name][:2]
        assert np.abs(ta @ tb).max() <= 1e-6
        # same construction: each factor has rank r/2, entries of scale ~0.1
        assert np.linalg.matrix_rank(a) == np.linalg.matrix_rank(ta) == 2
        assert 0.5 < a.std() / ta.std() < 2.0 and 0.5 < b.std() / tb.std() < 2.0
    with pytest.raises(LowraxError, match="even rank"):
        lowrax.wrap(params, lowrax.LoraConfig(r=3, init="orthogonal", target_modules=LLAMA_TARGETS), jax.random.key(0))


def test_gaussian_init_has_peft_scale(models):
    _, model, params = models("llama")
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, init="gaussian", target_modules=("down_proj",)),
                          jax.random.key(0), model=model)
    a = np.concatenate([np.asarray(n.a).ravel() for n in adapter_nodes(wrapped).values()])
    assert abs(a.std() - 1 / 4) < 0.02  # PEFT: normal_(std=1 / r); b zero
    assert all(not np.asarray(n.b).any() for n in adapter_nodes(wrapped).values())


# ---- calibrated inits --------------------------------------------------------------------------


def calibration_rows(n_rows=6, seed=1):
    """Rows of different lengths, and PEFT's view of them (one unpadded row per forward)."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(5, 13, n_rows)]
    ids, mask = random_batch(128, lengths, pad_id=0, left=False, seed=seed)
    return ids, mask, lengths


@pytest.mark.parametrize("family,method", [("llama", "ipm"), ("llama", "kpm"), ("gpt2", "ipm")])
def test_corda_equals_peft(models, family, method):
    from peft.tuners.lora.corda import preprocess_corda

    path, model, params = models(family)
    ids, mask, lengths = calibration_rows()
    hf, cfg = peft_model_of(path, family, r=4, lora_alpha=8, init_lora_weights="corda",
                            corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))

    def run_model():
        with torch.no_grad():
            for row, n in enumerate(lengths):
                hf(input_ids=torch.tensor(ids[row:row + 1, :n]))

    preprocess_corda(hf, cfg, run_model=run_model)
    peft_model = peft.get_peft_model(hf, cfg)
    ours = lowrax.LoraConfig(r=4, alpha=8, init="corda", corda_method=method, target_modules=targets_of(family))
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    calibration = lowrax.lora.calibrate(model, params, ours, batches, progress=False)
    assert calibration.rows == len(lengths) and calibration.tokens == sum(lengths)
    wrapped = lowrax.wrap(params, ours, jax.random.key(0), model=model, calibration=calibration)
    assert_same_start(wrapped, peft_model, family, atol=2e-4, relative=1e-3 if method == "kpm" else 0.0)
    unchanged_at_init(model, params, wrapped)


def test_lora_ga_equals_peft_with_an_exact_svd(models, monkeypatch):
    """PEFT sketches the gradient's SVD at random (svd_lowrank, q = 4r); with the sketch replaced by the
    exact SVD (what lowrax computes) the factors and base agree."""
    from peft.tuners.lora import layer as lora_layer
    from peft.tuners.lora.loraga import preprocess_loraga

    def exact(m, q=6, niter=2):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :q], s[:q], vh[:q].T

    monkeypatch.setattr(lora_layer.torch, "svd_lowrank", exact)
    path, model, params = models("llama")
    ids, mask, lengths = calibration_rows()
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    hf, cfg = peft_model_of(path, "llama", r=4, lora_alpha=8, init_lora_weights="lora_ga",
                            lora_ga_config=peft.tuners.lora.config.LoraGAConfig())

    def train_step():
        for b_ids, b_mask in batches:
            labels = torch.tensor(np.where(b_mask > 0, b_ids, -100))
            hf(input_ids=torch.tensor(b_ids), attention_mask=torch.tensor(b_mask), labels=labels).loss.backward()

    preprocess_loraga(hf, cfg, train_step=train_step)
    peft_model = peft.get_peft_model(hf, cfg)
    ours = lowrax.LoraConfig(r=4, alpha=8, init="lora_ga", target_modules=LLAMA_TARGETS)
    calibration = lowrax.lora.calibrate(model, params, ours, [{"input_ids": i, "attention_mask": m} for i, m in batches],
                                        progress=False)
    wrapped = lowrax.wrap(params, ours, jax.random.key(0), model=model, calibration=calibration)
    assert_same_start(wrapped, peft_model, "llama", atol=2e-4, pairs=False)
    unchanged_at_init(model, params, wrapped)


def test_eva_finds_peft_components_and_ranks(models):
    """PEFT's EVA runs an incremental PCA over the batches until the components settle; lowrax's is the
    exact PCA of all calibration tokens. Given one batch (which PEFT then sees again and again) both
    are the PCA of the same tokens: the same directions and the same ranks."""
    from peft.tuners.lora.eva import get_eva_state_dict

    path, model, params = models("llama")
    rng = np.random.default_rng(5)
    ids = rng.integers(3, 128, (48, 16))
    mask = np.ones_like(ids)
    mask[::5, 12:] = 0  # some padding, which neither side counts
    batches = [{"input_ids": ids, "attention_mask": mask}]
    hf, cfg = peft_model_of(path, "llama", r=4, lora_alpha=8, init_lora_weights="eva",
                            eva_config=peft.tuners.lora.config.EvaConfig(rho=2.0, tau=0.99))
    torch_batches = [{"input_ids": torch.tensor(b["input_ids"]), "attention_mask": torch.tensor(b["attention_mask"])}
                     for b in batches]
    theirs = get_eva_state_dict(hf, torch_batches, peft_config=cfg, show_progress_bar=False)
    ours_cfg = lowrax.LoraConfig(r=4, alpha=8, init="eva", target_modules=LLAMA_TARGETS)
    calibration = lowrax.lora.calibrate(model, params, ours_cfg, batches, progress=False)
    wrapped = lowrax.wrap(params, ours_cfg, jax.random.key(0), model=model, calibration=calibration)
    nodes = adapter_nodes(wrapped)
    for name, components in theirs.items():
        components = components.numpy()
        if components.shape[0] == 0:
            assert name not in nodes
            continue
        a = np.asarray(nodes[name].a).T
        assert a.shape == components.shape, name
        cosines = np.abs(np.sum(a * components, axis=1))
        # PEFT's incremental PCA sketches each fit (svd_lowrank, q = 2k, 4 iterations): its components
        # are that close to the exact ones
        assert cosines.min() > 0.97, (name, cosines)
    # lowrax's are the exact PCA of the tokens the mask keeps (numpy's SVD of the centred inputs)
    inputs = []
    layer = hf.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach().numpy()))
    with torch.no_grad():
        hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    handle.remove()
    x = inputs[0][mask.astype(bool)].astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    ours = np.asarray(nodes["model.layers.0.mlp.down_proj"].a).T
    assert np.abs(np.sum(ours * vt[:len(ours)], axis=1)).min() > 1 - 1e-5
    unchanged_at_init(model, params, wrapped)


def test_calibrated_inits_explain_what_they_need(models):
    _, model, params = models("llama")
    cfg = lowrax.LoraConfig(r=4, init="corda", target_modules=LLAMA_TARGETS)
    with pytest.raises(LowraxError, match=r"needs calibration data: calibration = lowrax.lora.calibrate"):
        lowrax.wrap(params, cfg, jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="input_ids must be a non-empty 2-D integer array"):
        lowrax.lora.calibrate(model, params, cfg, [{"input_ids": np.zeros((3,), np.int32)}], progress=False)
    with pytest.raises(LowraxError, match="is for the inits that need data"):
        lowrax.lora.calibrate(model, params, lowrax.LoraConfig(init="pissa"), [], progress=False)
    ids, mask, _ = calibration_rows()
    calibration = lowrax.lora.calibrate(model, params, cfg, {"input_ids": ids, "attention_mask": mask}, progress=False)
    eva = lowrax.LoraConfig(r=4, init="eva", target_modules=LLAMA_TARGETS)
    with pytest.raises(LowraxError, match="computed for init 'corda', the config has 'eva'"):
        lowrax.wrap(params, eva, jax.random.key(0), model=model, calibration=calibration)
    with pytest.raises(LowraxError, match="ia3 takes no calibration data"):
        lowrax.wrap(params, lowrax.IA3Config(), jax.random.key(0), model=model, calibration=calibration)


# ---- LoftQ -------------------------------------------------------------------------------------


def test_loftq_equals_peft_on_the_cpu(models, monkeypatch):
    """PEFT's loftq_init moves weights to "cuda" to quantize them with bitsandbytes; here its code runs
    with that device mapped to the CPU (bitsandbytes' NF4 runs there too). The targets have 64 inputs:
    bitsandbytes 0.50's CPU dequantize kernel blocks each row of the weight on its own, which disagrees
    with its own quantizer (and its generic and CUDA paths) where a block of 64 spans two rows."""
    bnb = pytest.importorskip("bitsandbytes", reason="LoftQ parity needs bitsandbytes (pip install -e .[test])")
    from peft.utils import loftq_utils

    original_to, original_params_to = torch.Tensor.to, bnb.nn.Params4bit.to

    def on_cpu(args, kwargs):
        args = tuple("cpu" if a == "cuda" else a for a in args)
        if kwargs.get("device") == "cuda":
            kwargs = dict(kwargs, device="cpu")
        return args, kwargs

    def tensor_to(self, *args, **kwargs):
        args, kwargs = on_cpu(args, kwargs)
        return original_to(self, *args, **kwargs)

    def params_to(self, *args, **kwargs):
        args, kwargs = on_cpu(args, kwargs)
        return original_params_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", tensor_to)
    monkeypatch.setattr(bnb.nn.Params4bit, "to", params_to)
    monkeypatch.setattr(loftq_utils, "clear_device_cache", lambda: None)
    path, model, params = models("llama")
    targets = ("q_proj", "v_proj", "gate_proj")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = peft.LoraConfig(target_modules=list(targets), r=4, lora_alpha=4, init_lora_weights="loftq",
                          loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=2))
    peft_model = peft.get_peft_model(hf, cfg)
    monkeypatch.undo()
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=4, alpha=4, init="loftq", loftq_iter=2, target_modules=targets),
                          jax.random.key(0), model=model)
    assert all(isinstance(n.base, lowrax.NF4Tensor) for n in adapter_nodes(wrapped).values())
    assert_same_start(wrapped, peft_model, "llama", atol=1e-4)
    # LoftQ's point: base + adapter is closer to W than the plain NF4 base
    quantized = lowrax.quantize(params, lowrax.QuantConfig(blocksize=64, double_quant=False))
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=False)
    exact = lowrax_outputs(model, params, ids, mask)
    assert np.abs(lowrax_outputs(model, wrapped, ids, mask) - exact).mean() < \
        np.abs(lowrax_outputs(model, quantized, ids, mask) - exact).mean()


def test_loftq_refuses_a_quantized_base(models):
    _, model, params = models("llama")
    quantized = lowrax.quantize(params, lowrax.QuantConfig(blocksize=64))
    with pytest.raises(LowraxError, match="init 'loftq' quantizes the float weights itself"):
        lowrax.wrap(quantized, lowrax.LoraConfig(r=4, init="loftq", target_modules=LLAMA_TARGETS), jax.random.key(0))


# ---- exchange ----------------------------------------------------------------------------------


def trained(wrapped):
    return randomize(wrapped, jax.random.key(2))  # every trainable array moved, as training would


def peft_logits(base_dir, adapter_dir, ids, mask):
    from tests.test_peft_exchange import torch_outputs

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return torch_outputs(peft.PeftModel.from_pretrained(hf, adapter_dir).eval(), ids, mask, True)


@pytest.mark.parametrize("init", ["olora", "pissa_niter_2", "mica", "orthogonal"])
def test_trained_adapters_load_in_peft_over_the_original_model(models, init, tmp_path):
    path, model, params = models("llama")
    initial = lowrax.wrap(params, lowrax.LoraConfig(r=4, alpha=8, init=init, target_modules=LLAMA_TARGETS),
                          jax.random.key(0), model=model)
    tuned = trained(initial)
    lowrax.save_peft(tuned, tmp_path / "adapter", model, initial=initial)
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=True)
    valid = mask.astype(bool)
    ours = lowrax_outputs(model, tuned, ids, mask)
    assert np.abs(ours - peft_logits(path, tmp_path / "adapter", ids, mask))[valid].max() <= 1e-4
    if init == "mica":  # PEFT keeps b frozen, and so does lowrax reading the file back
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        again = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
        assert not any(p.requires_grad for n, p in again.named_parameters() if "lora_B" in n)
        loaded = lowrax.load_peft(params, tmp_path / "adapter", model)
        assert all(n.field_labels()["b"] == "frozen" for n in adapter_nodes(loaded).values())


def test_calibrated_adapter_loads_in_peft(models, tmp_path):
    path, model, params = models("llama")
    ids, mask, _ = calibration_rows()
    cfg = lowrax.LoraConfig(r=4, alpha=8, init="corda", target_modules=LLAMA_TARGETS)
    calibration = lowrax.lora.calibrate(model, params, cfg, {"input_ids": ids, "attention_mask": mask}, progress=False)
    initial = lowrax.wrap(params, cfg, jax.random.key(0), model=model, calibration=calibration)
    tuned = trained(initial)
    lowrax.save_peft(tuned, tmp_path / "adapter", model, initial=initial)
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=True)
    valid = mask.astype(bool)
    assert np.abs(lowrax_outputs(model, tuned, ids, mask) - peft_logits(path, tmp_path / "adapter", ids, mask))[valid].max() <= 1e-4


def test_loftq_adapter_loads_in_peft_over_the_saved_loftq_base(models, tmp_path):
    """A LoftQ adapter fits the base LoftQ quantized: PEFT users load it over that base, saved dequantized
    with `save_pretrained(base_params(params))` (or in bitsandbytes' 4-bit layout, keep_quantized=True)."""
    path, model, params = models("llama")
    initial = lowrax.wrap(params, lowrax.LoraConfig(r=4, alpha=4, init="loftq", target_modules=LLAMA_TARGETS),
                          jax.random.key(0), model=model)
    tuned = trained(initial)
    lowrax.save_peft(tuned, tmp_path / "adapter", model)
    lowrax.save_pretrained(lowrax.base_params(tuned), model, tmp_path / "base")
    ids, mask = random_batch(128, [9, 6], pad_id=0, left=True)
    valid = mask.astype(bool)
    theirs = peft_logits(tmp_path / "base", tmp_path / "adapter", ids, mask)
    assert np.abs(lowrax_outputs(model, tuned, ids, mask) - theirs)[valid].max() <= 1e-4


def test_unconverted_rewritten_base_adapters_are_refused(models, tmp_path):
    path, model, params = models("llama")
    hf, cfg = peft_model_of(path, "llama", r=4, init_lora_weights="olora")
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "olora")
    with pytest.raises(LowraxError, match="olora adapter saved without conversion only fits the base its init rewrote"):
        lowrax.load_peft(params, tmp_path / "olora", model)


def test_a_damaged_init_file_is_named(tmp_path):
    from lowrax.adapters.lora.calibrated import load_initial_factors

    (tmp_path / "lora_init.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(LowraxError, match="is not a LoRA init file lowrax wrote"):
        load_initial_factors(tmp_path / "lora_init.safetensors")
