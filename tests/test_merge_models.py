"""`lowrax.merge_models` equals mergekit (0.1.5) on random fine-tunes of a tiny Llama:
task arithmetic, TIES, DARE (given the same drop masks), SLERP and linear."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="model-merging parity tests need torch (pip install -e .[test])")
mergekit_merge = pytest.importorskip("mergekit.merge", reason="model-merging parity tests need mergekit (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from mergekit import sparsify  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

import lowrax  # noqa: E402
from lowrax.errors import LowraxError  # noqa: E402
from tests.conftest import hf_model_dir  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(base dir, [fine-tune dirs]): fine-tunes are the base plus small random task vectors."""
    base_dir, base = hf_model_dir(tmp_path_factory, "merge-base",
                                  lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    tuned = []
    for i in range(3):
        torch.manual_seed(100 + i)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
        model.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        path = tmp_path_factory.mktemp(f"merge-tuned-{i}")
        model.save_pretrained(path)
        tuned.append(path)
    return base_dir, tuned


def content_mask(delta, density):
    """A drop mask both sides can compute from a task vector alone (stands in for a random draw)."""
    x = np.abs(np.asarray(delta, np.float32)) * np.float32(997.0)
    return (x - np.floor(x)) < density


@contextlib.contextmanager
def content_masks_in_mergekit():
    original = sparsify.bernoulli

    def masked(tensor, density, rescale_norm=None):
        if density >= 1:
            return tensor
        keep = torch.tensor(content_mask(tensor.float().numpy(), density), dtype=torch.float32)
        return sparsify.rescaled_masked_tensor(tensor.float(), keep, rescale_norm).to(tensor.dtype)

    sparsify.bernoulli = masked
    try:
        yield
    finally:
        sparsify.bernoulli = original


def run_mergekit(config: dict, out) -> dict:
    with content_masks_in_mergekit():
        mergekit_merge.run_merge(MergeConfiguration.model_validate(config), str(out),
                                 MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return lowrax.load_pretrained(out, progress=False)[1]


CASES = [  # (method, per-model parameters, global parameters, lowrax kwargs)
    ("task_arithmetic", [dict(weight=0.6), dict(weight=0.3)], {}, {}),
    ("task_arithmetic", [dict(weight=0.6), dict(weight=0.3), dict(weight=-0.2)], dict(normalize=True, **{"lambda": 0.8}),
     dict(normalize=True, lambda_=0.8)),
    ("ties", [dict(weight=0.6, density=0.5), dict(weight=0.4, density=0.3)], {}, {}),
    ("ties", [dict(weight=1.0, density=0.7), dict(weight=0.5, density=0.7), dict(weight=0.5, density=0.7)],
     dict(normalize=False, rescale=True), dict(normalize=False, rescale=True)),
    ("dare_linear", [dict(weight=0.6, density=0.5), dict(weight=0.4, density=0.5)], {}, {}),
    ("dare_ties", [dict(weight=0.6, density=0.4), dict(weight=0.4, density=0.6)], {}, {}),
    ("slerp", [{}], dict(t=0.3), dict(t=0.3)),
    ("linear", [dict(weight=0.6), dict(weight=0.2)], {}, {}),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{len(c[1])}" for c in CASES])
def test_merge_equals_mergekit(checkpoints, tmp_path, case):
    base_dir, tuned = checkpoints
    method, per_model, shared, ours_kwargs = CASES[case]
    dirs = tuned[: len(per_model)]
    config = {"merge_method": method, "dtype": "float32", "parameters": shared,
              "models": [{"model": str(d), "parameters": p} for d, p in zip(dirs, per_model)]}
    if method != "linear":
        config["base_model"] = str(base_dir)
    if method == "slerp":
        config["models"].append({"model": str(base_dir)})
    theirs = run_mergekit(config, tmp_path / "mergekit")

    _, base = lowrax.load_pretrained(base_dir, progress=False)
    models = [lowrax.load_pretrained(d, progress=False)[1] for d in dirs]
    kwargs = dict(ours_kwargs)
    if method != "slerp":
        kwargs["weights"] = [p["weight"] for p in per_model]
    if "density" in per_model[0]:
        kwargs["density"] = [p["density"] for p in per_model]
    if method.startswith("dare"):
        flat_base, flats = lowrax.merging.models._flat(base), [lowrax.merging.models._flat(m) for m in models]
        kwargs["keep_masks"] = lambda path, i, shape: content_mask(
            np.asarray(flats[i][path], np.float32) - np.asarray(flat_base[path], np.float32), kwargs["density"][i])
    ours = lowrax.merge_models(None if method == "linear" else base, models, method, **kwargs)

    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
    assert worst <= 1e-6
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(base)))
    assert moved > 1e-3  # the merge is not the base


def test_merge_models_refuses_bad_input(checkpoints):
    base_dir, tuned = checkpoints
    _, base = lowrax.load_pretrained(base_dir, progress=False)
    _, one = lowrax.load_pretrained(tuned[0], progress=False)
    with pytest.raises(LowraxError, match="needs weights="):
        lowrax.merge_models(base, [one], "ties", density=0.5)
    with pytest.raises(LowraxError, match="unknown merge method 'average'"):
        lowrax.merge_models(base, [one], "average", weights=[1.0])
    with pytest.raises(LowraxError, match="pass key=jax.random.key"):
        lowrax.merge_models(base, [one], "dare_linear", weights=[1.0], density=0.5)
    with pytest.raises(LowraxError, match="slerp interpolates the base and one model"):
        lowrax.merge_models(base, [one, one], "slerp")
    smaller = dict(one, lm_head={"kernel": one["lm_head"]["kernel"][:, :10]})
    with pytest.raises(LowraxError, match="lm_head/kernel has shape"):
        lowrax.merge_models(base, [smaller], "task_arithmetic", weights=[1.0])
    adapted = lowrax.wrap(one, lowrax.LoraConfig(r=2), jax.random.key(0), "llama")
    with pytest.raises(LowraxError, match="merge adapters in first"):
        lowrax.merge_models(base, [adapted], "task_arithmetic", weights=[1.0])
    drawn = lowrax.merge_models(base, [one], "dare_ties", weights=[1.0], density=0.5, key=jax.random.key(0))
    again = lowrax.merge_models(base, [one], "dare_ties", weights=[1.0], density=0.5, key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the key's draw keeps about `density` of each task vector
    sparse = lowrax.merge_models(base, [one], "dare_linear", weights=[1.0], density=0.2, key=jax.random.key(1),
                                 rescale=False)
    kept = np.asarray(sparse["lm_head"]["kernel"]) != np.asarray(base["lm_head"]["kernel"])
    assert 0.15 < kept.mean() < 0.25


def test_merge_models_command_writes_the_merge(checkpoints, tmp_path, capsys):
    from lowrax.cli.main import MERGE_METHODS, main

    base_dir, tuned = checkpoints
    assert main(["merge-models", str(tmp_path / "out"), "--method", "ties", "--base", str(base_dir), "--model",
                 str(tuned[0]), "--model", str(tuned[1]), "--weights", "0.6", "0.4", "--density", "0.5"]) == 0
    assert "ties of 2 model(s)" in capsys.readouterr().out
    _, written = lowrax.load_pretrained(tmp_path / "out", progress=False)
    _, base = lowrax.load_pretrained(base_dir, progress=False)
    models = [lowrax.load_pretrained(d, progress=False)[1] for d in tuned[:2]]
    expected = lowrax.merge_models(base, models, "ties", weights=[0.6, 0.4], density=0.5)
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["merge-models", str(tmp_path / "bad"), "--method", "ties", "--base", str(base_dir), "--model",
                 str(tuned[0]), "--weights", "0.6", "0.4", "--density", "0.5"]) == 2
    assert "1 models, 2 weights" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert sorted(MERGE_METHODS) == sorted(lowrax.merging.models.METHODS)
