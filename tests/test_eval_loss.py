"""The held-out loss: shortest examples first, each batch padded to a power of two, equal to the loss of
every example run at the full seq_len, for token losses and for classification."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import lowrax
from lowrax.models import model_from_hf_config
from lowrax.train.config import load_config
from lowrax.train.data import Encoded, padded_width
from lowrax.train.eval_loss import EvalLoss
from lowrax.train.step import task_loss

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
BERT = {"model_type": "bert", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 128, "type_vocab_size": 2, "num_labels": 3,
        "architectures": ["BertForSequenceClassification"]}


def random_model(path, config):
    """(model, params) of a random checkpoint of `config` written to `path` and loaded as a user would."""
    import json

    from safetensors.numpy import save_file

    model = model_from_hf_config(config)
    rng = np.random.default_rng(0)
    save_file({t.hf_key: (0.3 * rng.normal(size=t.hf_shape)).astype(np.float32) for t in model.tensors()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return lowrax.load_pretrained(path, progress=False)


def test_padded_width_is_the_next_power_of_two_within_seq_len():
    assert [padded_width(n, 100) for n in (0, 1, 16, 17, 33, 64, 65, 99)] == [16, 16, 16, 32, 64, 64, 100, 100]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_held_out_loss_equals_every_example_at_full_width(family, tmp_path):
    model, params = random_model(tmp_path, LLAMA if family == "llama" else BERT)
    rng = np.random.default_rng(1)
    lengths = [3, 40, 7, 18, 5, 33, 9]  # 7 examples in batches of 3: the last batch has filler rows
    ids = [rng.integers(1, 64, n).tolist() for n in lengths]
    if family == "llama":
        data = Encoded(ids, [[0] * 2 + [1] * (n - 2) for n in lengths], "causal_lm")
    else:
        data = Encoded(ids, rng.integers(0, 3, len(ids)).tolist(), "classification")
    cfg = load_config(None, ["data.seq_len=48", "train.batch_size=3"])
    trainable, frozen = lowrax.split(params)
    got = EvalLoss(model, data, cfg, pad=0)(trainable, frozen)

    loss_fn, total, count = task_loss(model), 0.0, 0.0
    for i in range(len(ids)):  # each example alone, right-padded to the full seq_len
        row = np.zeros((1, 48), np.int32)
        row[0, : lengths[i]] = ids[i]
        mask = (np.arange(48) < lengths[i]).astype(np.int32)[None]
        batch = {"input_ids": row, "attention_mask": mask}
        if family == "llama":
            batch["loss_mask"] = np.zeros((1, 48), np.int32)
            batch["loss_mask"][0, : lengths[i]] = data.targets[i]
        else:
            batch["labels"] = np.asarray([data.targets[i]], np.int32)
        s, n, *_ = loss_fn(model, params, jax.tree.map(np.asarray, batch))
        total, count = total + float(s), count + float(n)
    np.testing.assert_allclose(got, total / count, rtol=1e-5)


def test_a_classifier_held_out_pass_also_measures_accuracy_over_the_same_examples(tmp_path):
    """The final held-out loss of a classifier also counts its correct predictions, equal to the scorer's own
    accuracy pass, which the run then skips."""
    from lowrax.train.scoring import TaskScorer

    model, params = random_model(tmp_path, BERT)
    rng = np.random.default_rng(2)
    lengths = [3, 40, 7, 18, 5, 33, 9, 12]
    ids = [rng.integers(1, 64, n).tolist() for n in lengths]
    labels = rng.integers(0, 3, len(ids)).tolist()
    cfg = load_config(None, ["data.seq_len=48", "train.batch_size=3", "model.task=classification"])
    trainable, frozen = lowrax.split(params)
    eval_loss = EvalLoss(model, Encoded(ids, labels, "classification"), cfg, pad=0)
    eval_loss(trainable, frozen)

    predicted = [int(np.argmax(model.apply(params, np.asarray([row]), np.ones((1, len(row)), np.int32)).logits))
                 for row in ids]
    want = float(np.mean(np.asarray(predicted) == np.asarray(labels)))
    assert 0 < want < 1  # a random head: some right, some wrong
    assert eval_loss.accuracy == pytest.approx(want)

    class Tokenizer:  # the scorer re-encodes the records: hand back the same ids
        def __call__(self, text, **_):
            return {"input_ids": ids[int(text)]}

    records = [{"text": str(i), "label": label} for i, label in enumerate(labels)]
    scorer = TaskScorer(model, Tokenizer(), records, cfg, progress=False)
    assert scorer.kind == "accuracy" and scorer.score(params) == pytest.approx(want)  # its own pass
    scorer.measured_accuracy = 0.25
    assert scorer.score(params) == 0.25  # taken once, not recomputed
    assert scorer.score(params) == pytest.approx(want)
