"""Generation mechanics on a tiny llama: compile-once step, sampling filters, EOS, sharded loading."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lowrax
from lowrax.models.generate import SamplingConfig, _compiled, sample_next
from tests.test_bad_input import tiny_llama_dir  # noqa: F401 - fixture


@pytest.fixture
def tiny(tiny_llama_dir):  # noqa: F811
    return lowrax.load_pretrained(tiny_llama_dir, progress=False)


def test_decode_step_compiles_once(tiny):
    model, params = tiny
    lowrax.generate_ids(model, params, [[1, 2, 3], [4, 5]], max_new_tokens=20)
    lowrax.generate_ids(model, params, [[7, 8, 9, 10]], max_new_tokens=20)
    _, step = _compiled(model, SamplingConfig())
    # Two calls, two batch sizes: one compilation each, none per token or per prompt length.
    assert step._cache_size() == 2


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    model, params = tiny
    prompts = [[1, 2, 3], [9, 4]]
    greedy = lowrax.generate_ids(model, params, prompts, max_new_tokens=8)
    assert lowrax.generate_ids(model, params, prompts, 8, SamplingConfig(1.0, top_k=1), seed=3) == greedy
    assert lowrax.generate_ids(model, params, prompts, 8, SamplingConfig(1.0, top_p=1e-6), seed=4) == greedy


def test_sampling_respects_top_k():
    logits = jax.numpy.asarray(np.tile(np.arange(10.0), (64, 1)))
    draws = np.asarray(sample_next(logits, jax.random.key(0), SamplingConfig(temperature=5.0, top_k=3)))
    assert set(draws.tolist()) <= {7, 8, 9} and len(set(draws.tolist())) > 1


def test_stops_on_eos(tiny):
    model, params = tiny
    first = lowrax.generate_ids(model, params, [[1, 2, 3]], max_new_tokens=5)[0]
    stopped = lowrax.generate_ids(model, params, [[1, 2, 3]], max_new_tokens=5, eos_token_ids=[first[1]])[0]
    assert stopped == first[:2]


def test_sharded_checkpoint_with_index(tiny_llama_dir, tiny):  # noqa: F811
    model, params = tiny
    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(tiny_llama_dir / name), metadata={"format": "pt"})
    (tiny_llama_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tiny_llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _, sharded = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(params)))
