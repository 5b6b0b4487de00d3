"""Data formats, loss masks, deterministic batches and packing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.train.config import DataSection
from lowrax.train.data import Batches, Encoded, encode_all
from lowrax.train.default_task import make_splits
from tests.test_bad_input import tiny_llama_dir  # noqa: F401 - fixture
from tests.conftest import forward  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return lowrax.load_tokenizer(None)


def test_prompt_response_masks_only_the_response(tokenizer):
    enc = encode_all(tokenizer, [{"prompt": "Say hi:", "response": " hi"}], DataSection(), "causal_lm")
    ids, mask = enc.ids[0], enc.targets[0]
    trained = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(trained) == " hi" + tokenizer.eos_token
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]) == "Say hi:"


def test_messages_train_on_assistant_replies_only(tokenizer):
    record = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}
    enc = encode_all(tokenizer, [record], DataSection(), "causal_lm")
    ids, mask = enc.ids[0], enc.targets[0]
    assert len(ids) == len(mask)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "4" in trained and "6" in trained and "What is" not in trained and "assistant" not in trained


def test_default_task_is_deterministic_and_disjoint():
    train, held_out = make_splits(200, 20, seed=0)
    assert (train, held_out) == make_splits(200, 20, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}


def test_batches_are_a_function_of_position():
    data = Encoded([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]], [[0, 1, 1], [0, 1], [1], [0, 0, 1, 1]], "causal_lm")
    a, b = Batches(data, 6, 2, seed=3), Batches(data, 6, 2, seed=3)
    for k in [5, 0, 3]:  # any order: batch k never depends on what was drawn before
        assert all(np.array_equal(a.batch(k)[key], b.batch(k)[key]) for key in a.batch(k))
    seen = sorted(tuple(r[r > 0]) for k in range(2) for r in a.batch(k)["input_ids"])
    assert seen == sorted(tuple(x) for x in data.ids)  # one epoch covers every example once


def test_packed_examples_do_not_see_each_other(tiny_llama_dir):  # noqa: F811
    model, params = lowrax.load_pretrained(tiny_llama_dir, progress=False)
    first, second = [5, 6, 7, 8], [9, 10, 11]
    data = Encoded([first, second], [[1] * 4, [1] * 3], "causal_lm")
    batch = Batches(data, 8, 1, seed=0, packing=True).batch(0)
    assert batch["segment_ids"].max() == 2
    packed = forward(model)(params, jnp.asarray(batch["input_ids"]), segment_ids=jnp.asarray(batch["segment_ids"]))
    for seg in (1, 2):
        cols = np.where(batch["segment_ids"][0] == seg)[0]
        alone = forward(model)(params, jnp.asarray(batch["input_ids"][:, cols]))
        assert np.abs(np.asarray(packed)[:, cols] - np.asarray(alone)).max() <= 1e-5


def test_save_to_disk_directory_with_its_own_eval_split(tmp_path):
    import datasets

    from lowrax.train.data import load_records

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]),
        "validation": datasets.Dataset.from_list([{"prompt": "qv", "response": "av"}]),
    })
    splits.save_to_disk(str(tmp_path / "ds"))
    train, held_out = load_records(DataSection(source=str(tmp_path / "ds")))
    assert len(train) == 10 and held_out == [{"prompt": "qv", "response": "av"}]


def test_unsupported_data_source_is_explained(tmp_path):
    from lowrax.train.data import load_records
    from lowrax.errors import LowraxError

    (tmp_path / "data.parquetx").write_text("x")
    with pytest.raises(LowraxError, match=r"unsupported extension '.parquetx'; expected one of .csv, .json, .jsonl"):
        load_records(DataSection(source=str(tmp_path / "data.parquetx")))
    with pytest.raises(LowraxError, match="does not exist"):
        load_records(DataSection(source=str(tmp_path / "missing.jsonl")))


def test_text_records_end_with_eos_unless_they_are_fragments():
    from lowrax.train.config import DataSection
    from lowrax.train.data import encode_causal

    tokenizer = lowrax.load_tokenizer(None)
    whole, _ = encode_causal(tokenizer, {"text": "one line"}, "text", DataSection())
    fragment, mask = encode_causal(tokenizer, {"text": "one line"}, "text", DataSection(text_eos=False))
    assert whole == fragment + [tokenizer.eos_token_id] and mask == [1] * len(fragment)
