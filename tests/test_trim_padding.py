"""Training batches cut to a half or a quarter of seq_len when every row fits (data.trim_padding): the cut
keeps every attended position, the loss and gradients equal the full width's, and a step sees at most three
widths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.train.data import trimmed
from lowrax.train.step import task_loss
from tests.test_eval_loss import BERT, LLAMA, random_model


def batch(lengths, seq_len=64, left=False):
    b = len(lengths)
    ids, mask = np.zeros((b, seq_len), np.int32), np.zeros((b, seq_len), np.int32)
    for row, n in enumerate(lengths):
        span = slice(seq_len - n, seq_len) if left else slice(0, n)
        ids[row, span] = np.arange(1, n + 1) % 60 + 1
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy(), "labels": np.arange(b) % 3,
            "loss_positions": np.zeros((b, 7), np.int32)}


@pytest.mark.parametrize("lengths, width", [([3, 16], 16), ([17, 5], 32), ([33], 64), ([64, 2], 64)])
def test_the_width_is_the_narrowest_of_the_quarter_half_and_whole_that_holds_every_row(lengths, width):
    (cut,) = trimmed([batch(lengths)])
    assert cut["input_ids"].shape == cut["attention_mask"].shape == cut["loss_mask"].shape == (len(lengths), width)
    assert cut["attention_mask"].sum() == sum(lengths)  # nothing attended is cut
    assert cut["labels"].shape == (len(lengths),) and cut["loss_positions"].shape == (len(lengths), 7)


def test_micro_batches_share_one_width_and_left_padding_is_never_cut():
    short, longer = trimmed([batch([3, 4]), batch([20, 2])])
    assert short["input_ids"].shape[1] == longer["input_ids"].shape[1] == 32
    (left,) = trimmed([batch([3, 4], left=True)])
    assert left["input_ids"].shape[1] == 64


def test_short_rows_are_left_whole_below_16_positions():
    (cut,) = trimmed([batch([2, 3], seq_len=32)])  # a quarter would be 8: too narrow to be worth a program
    assert cut["input_ids"].shape[1] == 16
    (whole,) = trimmed([batch([2, 3], seq_len=24)])
    assert whole["input_ids"].shape[1] == 24


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loss_and_gradients_equal_the_full_width(family, tmp_path):
    model, params = random_model(tmp_path, LLAMA if family == "llama" else BERT)
    trainable, frozen = lowrax.split(params)
    full = batch([9, 14, 5])
    (cut,) = trimmed([full])
    assert cut["input_ids"].shape[1] == 16
    loss_fn = task_loss(model)
    keys = ("input_ids", "attention_mask", "loss_mask") if family == "llama" else ("input_ids", "attention_mask", "labels")

    def loss_and_grads(data):
        data = {k: jnp.asarray(data[k]) for k in keys}
        return jax.value_and_grad(lambda t: loss_fn(model, lowrax.combine(t, frozen), data)[0])(trainable)

    (got, got_grads), (want, want_grads) = loss_and_grads(cut), loss_and_grads(full)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
