"""Pruning: SparseGPT and Wanda equal llmcompressor's (committed fixtures), magnitude and Wanda masks
equal their definitions, SparseGPT reconstructs better than magnitude, the sparse base through
LoRA recovery, merging (keep or fill), HF files, NF4, the CLI, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.errors import LowraxError
from lowrax.io.hf_checkpoint import tree_to_hf_tensors
from lowrax.pruning import masks
from lowrax.pruning.config import load_prune_config
from lowrax.sparse.kernel import SparseKernel
from tests.conftest import forward, tiny_llama_dir

FIXTURES = Path(__file__).parent / "fixtures" / "llmcompressor"
SETTINGS = {"sparsegpt_50": ("sparsegpt", "unstructured"), "sparsegpt_2of4": ("sparsegpt", "2:4"),
            "wanda_50": ("wanda", "unstructured"), "wanda_2of4": ("wanda", "2:4")}


@pytest.fixture(scope="module")
def fixture_model():
    model, params = lowrax.load_pretrained(FIXTURES / "model", progress=False)
    return model, params, np.load(FIXTURES / "calibration.npz")["input_ids"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


def _hf_weights(params, model) -> dict:
    dense = jax.tree.map(lambda x: x.kernel if isinstance(x, SparseKernel) else x, params,
                         is_leaf=lambda x: isinstance(x, SparseKernel))
    return tree_to_hf_tensors(dense, model)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_pruned_weights_equal_llmcompressor(fixture_model, setting):
    """llmcompressor 0.14's oneshot (tests/fixtures/llmcompressor/make_fixtures.py) on the same random
    Llama and calibration rows, one row per calibration batch as there; the second layer calibrates
    on the pruned first layer's outputs in both."""
    from safetensors.numpy import load_file

    model, params, ids = fixture_model
    method, pattern = SETTINGS[setting]
    expected = load_file(str(FIXTURES / f"{setting}.safetensors"))
    chunkings = (1, 3) if setting == "sparsegpt_50" else (1,)  # 3: the running statistics over chunks
    for chunk_rows in chunkings:
        pruned, report = lowrax.prune(params, model, ids, method=method, sparsity=0.5, pattern=pattern,
                                      chunk_rows=chunk_rows, progress=False)
        mine = _hf_weights(pruned, model)
        assert sorted(expected) == sorted(k for k in mine if ".layers." in k and mine[k].ndim == 2)
        for key, want in expected.items():
            np.testing.assert_array_equal(mine[key] == 0, want == 0, err_msg=f"{key}: a different mask")
            np.testing.assert_allclose(mine[key], want, rtol=1e-4, atol=1e-5, err_msg=key)
        assert report["calibration"] == {"rows": 8, "tokens": 320}
        assert len(report["layers"]) == 14 and report["sparsity"] >= 0.5


def test_padding_tokens_do_not_calibrate(fixture_model):
    """Right padding (attention_mask 0) is left out of the statistics: whatever ids the padding
    holds, the pruned weights are the same."""
    model, params, ids = fixture_model
    mask = np.ones_like(ids)
    mask[:, -12:] = 0
    other = ids.copy()
    other[:, -12:] = (ids[:, -12:] + 17) % 128
    results = [_hf_weights(lowrax.prune(params, model, x, method="sparsegpt", attention_mask=mask, chunk_rows=4,
                                        progress=False)[0], model) for x in (ids, other)]
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    unpadded = _hf_weights(lowrax.prune(params, model, ids, method="sparsegpt", chunk_rows=4, progress=False)[0], model)
    assert any((unpadded[k] != results[0][k]).any() for k in unpadded)  # the padding did change the statistics


def _numpy_magnitude(w, sparsity, pattern):
    n, m = masks.parse_pattern(pattern)
    a = np.abs(w)
    if m:
        out = np.zeros(w.shape, bool)
        for row in range(w.shape[0]):
            for g in range(0, w.shape[1], m):
                out[row, g + np.argsort(a[row, g:g + m], kind="stable")[:n]] = True
        return out
    k = int(sparsity * w.size)
    return a <= np.sort(a.reshape(-1))[k - 1]


def test_magnitude_masks_equal_their_definition_on_a_random_model(fixture_model):
    model, params, _ = fixture_model
    dense = _hf_weights(params, model)
    for sparsity, pattern in ((0.25, "unstructured"), (0.5, "unstructured"), (0.5, "2:4"), (0.5, "4:8")):
        pruned, report = lowrax.prune(params, model, method="magnitude", sparsity=sparsity, pattern=pattern,
                                      progress=False)
        mine = _hf_weights(pruned, model)
        for name, stats in report["layers"].items():
            key = name + ".weight"
            want = _numpy_magnitude(dense[key], sparsity, pattern)
            np.testing.assert_array_equal(mine[key] == 0, want, err_msg=f"{key} {pattern} {sparsity}")
            np.testing.assert_array_equal(mine[key][~want], dense[key][~want])  # kept weights untouched
            assert stats["sparsity"] == pytest.approx(want.mean())
        assert "relative_error" not in next(iter(report["layers"].values()))  # no data, no error measured
    sparse = lowrax.sparse_modules(pruned)
    assert len(sparse) == 14 and all(k.pattern == "4:8" for k in sparse.values())


def test_wanda_scores_compare_within_each_output():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    norms = rng.uniform(0.1, 5, size=16).astype(np.float32)
    scores = np.abs(w) * np.sqrt(norms)[None]
    for sparsity, pattern in ((0.25, "unstructured"), (0.5, "2:4"), (0.5, "4:8")):
        got = np.asarray(masks.wanda_pruned(jnp.asarray(w), jnp.asarray(norms), sparsity, pattern))
        n, m = masks.parse_pattern(pattern)
        for row in range(6):
            if m:
                for g in range(0, 16, m):
                    assert set(np.flatnonzero(got[row, g:g + m])) == set(np.argsort(scores[row, g:g + m])[:n])
            else:
                assert set(np.flatnonzero(got[row])) == set(np.argsort(scores[row])[: int(16 * sparsity)])


def test_sparsegpt_reconstructs_every_layer_better_than_magnitude(fixture_model):
    model, params, ids = fixture_model
    for pattern in ("unstructured", "2:4"):
        errors = {}
        for method in ("magnitude", "sparsegpt"):
            _, report = lowrax.prune(params, model, ids, method=method, sparsity=0.5, pattern=pattern, chunk_rows=4,
                                     progress=False)
            errors[method] = {name: s["relative_error"] for name, s in report["layers"].items()}
        worse = [n for n in errors["sparsegpt"] if errors["sparsegpt"][n] >= errors["magnitude"][n]]
        assert not worse, f"{pattern}: SparseGPT no better than magnitude at {worse}"


def test_gpt2_and_bert_layers_prune_too(tmp_path):
    torch = pytest.importorskip("torch", reason="the GPT-2 and BERT models are built with transformers + torch")
    import transformers

    torch.manual_seed(0)
    builds = {"gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2,
                                                                           n_head=4, n_positions=32)),
              "bert": transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                                     num_attention_heads=4, intermediate_size=48))}
    ids = np.random.default_rng(0).integers(0, 64, (4, 12))
    for name, hf in builds.items():
        hf.save_pretrained(tmp_path / name)
        model, params = lowrax.load_pretrained(tmp_path / name, progress=False)
        method = "sparsegpt" if name == "gpt2" else "wanda"  # SparseGPT on Conv1D's (in, out) layout
        pruned, report = lowrax.prune(params, model, ids, method=method, pattern="2:4", chunk_rows=2, progress=False)
        assert len(report["layers"]) == (8 if name == "gpt2" else 12), sorted(report["layers"])
        assert report["sparsity"] == 0.5
        for kernel in lowrax.sparse_modules(pruned).values():  # 2 of every 4 inputs of each output kept
            kept = np.asarray(kernel.mask).T.reshape(kernel.shape[1], -1, 4).sum(-1)
            assert (kept == 2).all()
        out = forward(model)(pruned, jnp.asarray(ids))
        assert np.isfinite(np.asarray(out if model.is_causal_lm else out.last_hidden_state)).all()


def test_lora_recovery_over_a_pruned_base_and_both_merges(tiny_dir, tmp_path):
    from lowrax.train.runs import merge_run
    from lowrax.train.trainer import run_training

    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    ids = np.random.default_rng(0).integers(3, 49152, (4, 16))
    pruned, _ = lowrax.prune(params, model, ids, method="sparsegpt", sparsity=0.5, progress=False)
    pruned_dir = lowrax.save_pretrained(pruned, model, tmp_path / "pruned", tokenizer=lowrax.load_tokenizer(tiny_dir))
    record = json.loads((pruned_dir / "pruning.json").read_text())
    assert len(record["modules"]) == 14

    # transformers reads the pruned files, zeros included, with lowrax's logits
    torch = pytest.importorskip("torch", reason="the HF check needs transformers + torch")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    assert float((hf.model.layers[0].mlp.down_proj.weight == 0).float().mean()) >= 0.5
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model)(pruned, jnp.asarray(ids))), theirs, atol=1e-4)

    # LoRA recovery: the base stays pruned through training and restore
    cfg = lowrax.load_config(None, [f"model.path={pruned_dir}", "lora.r=4", "lora.target_modules=all-linear",
                                    "lora.init=gaussian", "train.steps=3", "train.batch_size=4", "data.seq_len=16",
                                    "train.save_every=0", "train.eval_examples=0", "train.samples=0",
                                    f"train.output_dir={tmp_path / 'run'}", "optim.learning_rate=0.02",
                                    "optim.warmup_steps=0", "data.source=embedded_text", "data.default_eval_examples=4"])
    run_training(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(np.isfinite(losses)) and losses[0] > 0
    from lowrax.train.runs import restore_run

    _, _, trained = restore_run(tmp_path / "run")
    bases = lowrax.sparse_modules(trained)
    assert len(bases) == 14
    for name, base in bases.items():
        assert not np.asarray(base.kernel)[~np.asarray(base.mask)].any(), name
    adapted = forward(model)(trained, jnp.asarray(ids))

    kept = merge_run(tmp_path / "run", tmp_path / "kept", log=lambda *_: None)
    filled = merge_run(tmp_path / "run", tmp_path / "filled", keep_sparsity=False, log=lambda *_: None)
    assert (kept / "pruning.json").exists() and not (filled / "pruning.json").exists()
    _, kept_params = lowrax.load_pretrained(kept, progress=False)
    _, filled_params = lowrax.load_pretrained(filled, progress=False)
    for name, base in lowrax.sparse_modules(kept_params).items():
        np.testing.assert_array_equal(np.asarray(base.mask), np.asarray(bases[name].mask), err_msg=name)
    assert not lowrax.sparse_modules(filled_params)
    filled_kernel = np.asarray(filled_params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"])
    assert (filled_kernel == 0).mean() < 0.01  # the delta filled the pruned weights
    np.testing.assert_allclose(np.asarray(forward(model)(filled_params, jnp.asarray(ids))), np.asarray(adapted),
                               atol=1e-4)
    # kept: exactly the adapted model with every merged kernel masked
    masked = lowrax.merge(trained, keep_sparsity=True)
    np.testing.assert_allclose(np.asarray(forward(model)(kept_params, jnp.asarray(ids))),
                               np.asarray(forward(model)(masked, jnp.asarray(ids))), atol=1e-5)


def test_nf4_over_a_pruned_base_keeps_its_zeros(tiny_dir, tmp_path):
    model, params = lowrax.load_pretrained(tiny_dir, progress=False)
    pruned, _ = lowrax.prune(params, model, method="magnitude", pattern="2:4", progress=False)
    path = lowrax.save_pretrained(pruned, model, tmp_path / "p")
    _, quantized = lowrax.load_pretrained(path, quantize=lowrax.QuantConfig(), progress=False)
    from lowrax.adapters.tree import dense_kernel

    for name, kernel in lowrax.sparse_modules(quantized).items():
        assert isinstance(kernel.kernel, lowrax.NF4Tensor), name
        assert not np.asarray(dense_kernel(kernel))[~np.asarray(kernel.mask)].any(), name
    wrapped = lowrax.wrap(quantized, lowrax.LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    shardings = lowrax.param_shardings(wrapped, model, lowrax.make_mesh(lowrax.MeshConfig()))
    assert isinstance(shardings["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].base, SparseKernel)
    assert np.isfinite(np.asarray(forward(model)(wrapped, jnp.ones((1, 4), jnp.int32)))).all()
    with pytest.raises(LowraxError, match="fill its pruned weights"):
        lowrax.wrap(quantized, lowrax.LoraConfig(r=2, variant="delta_lora", target_modules="all-linear"), jax.random.key(0))


def test_prune_command_writes_the_model_and_its_report(tiny_dir, tmp_path):
    from lowrax.cli.main import main

    out = tmp_path / "pruned"
    args = ["prune", f"model.path={tiny_dir}", "prune.method=wanda", "prune.pattern=2:4", "calibration.samples=4",
            "calibration.length=16", "evaluation.samples=2", "evaluation.length=16", f"prune.output_dir={out}"]
    assert main(args) == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "wanda" and record["pattern"] == "2:4" and record["sparsity"] == 0.5
    assert record["perplexity_dense"] > 1 and record["perplexity_pruned"] > 1
    assert set(record["report"]["layers"]) == set(record["modules"])
    assert all("relative_error" in s for s in record["report"]["layers"].values())
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert main(args) == 2  # the output exists: refused without --overwrite


def test_bad_pruning_inputs_are_named(fixture_model, tiny_dir):
    model, params, ids = fixture_model
    cases = [
        (dict(method="random"), "pruning method must be one of"),
        (dict(pattern="3:2"), "N must be between 0 and M"),
        (dict(pattern="2-4"), "pruning pattern must be"),
        (dict(sparsity=1.5, method="magnitude"), r"sparsity must be a fraction in \[0, 1\)"),
        (dict(method="wanda", calibration_ids=None), "wanda pruning needs calibration_ids"),
        (dict(calibration_ids=ids[0]), r"calibration_ids must be integer token ids \[rows, tokens\]"),
        (dict(chunk_rows=0), "chunk_rows must be a positive integer"),
        (dict(pattern="16:32", method="magnitude"), "not a multiple of 32"),
    ]
    for kwargs, message in cases:
        kwargs = {"calibration_ids": ids, **kwargs}
        with pytest.raises(LowraxError, match=message):
            lowrax.prune(params, model, progress=False, **kwargs)
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=2), jax.random.key(0), model=model)
    with pytest.raises(LowraxError, match="before adding adapters"):
        lowrax.prune(wrapped, model, method="magnitude", progress=False)
    with pytest.raises(LowraxError, match="prune a model in full precision"):
        lowrax.prune(lowrax.quantize(params, lowrax.QuantConfig(), model), model, method="magnitude", progress=False)
    with pytest.raises(LowraxError, match="did you mean 'prune.sparsity'"):
        load_prune_config(None, ["prune.sparsty=0.3"])
    with pytest.raises(LowraxError, match="the number 124"):
        load_prune_config(_yaml(tiny_dir.parent / "bad.yaml", "prune:\n  pattern: 2:4\n"))
    assert load_prune_config(None, ["prune.pattern=2:4"]).prune.pattern == "2:4"


def _yaml(path, text):
    path.write_text(text)
    return path


def test_pruned_checkpoints_merge_as_plain_weights(fixture_model):
    model, params, _ = fixture_model
    pruned, _ = lowrax.prune(params, model, method="magnitude", progress=False)
    merged = lowrax.merge_models(params, [pruned, params], "linear", weights=[0.5, 0.5])
    want = 0.5 * (np.asarray(pruned["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].kernel)
                  + np.asarray(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]))
    np.testing.assert_allclose(np.asarray(merged["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]), want, rtol=1e-6)
