"""Training batches cut to a narrower width when every row fits (data.trim_padding): the cut keeps every
attended position, the loss and gradients equal the full width's, and a run plans at most three widths from
its batches' longest rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrax
from lowrax.train.data import Batches, Encoded, planned_trim_widths, trim_widths, trimmed
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
def test_without_a_plan_the_width_is_the_narrowest_of_the_quarter_half_and_whole_that_holds_every_row(lengths, width):
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


def test_the_ladder_of_widths_grows_by_at_most_half_from_16_to_seq_len():
    assert trim_widths(128) == [16, 24, 32, 48, 64, 96, 128]
    assert trim_widths(100) == [16, 24, 32, 48, 64, 96, 100]
    assert trim_widths(16) == [16] and trim_widths(12) == [12]
    ladder = trim_widths(4096)
    assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]))


def test_a_plan_holds_every_step_in_at_most_three_widths_that_leave_the_least_padding():
    # steps' longest rows: most fit 48, a few need 64 and 128, one fits 16
    longest = [40] * 50 + [60] * 5 + [100] * 2 + [10]
    assert planned_trim_widths(longest, 128) == [48, 64, 128]  # 64 for five steps saves more than 16 for one
    assert planned_trim_widths(longest, 128, most=2) == [48, 128]
    assert planned_trim_widths([5, 7], 128) == [16]  # nothing longer: no full-width program at all
    widths = planned_trim_widths([30, 40, 50, 70, 90, 120, 140, 200], 256)
    assert len(widths) == 3 and widths[-1] == 256
    # brute force over every choice of two widths under the top one agrees
    import itertools
    ladder = trim_widths(256)
    fits = [next(w for w in ladder if n <= w) for n in [30, 40, 50, 70, 90, 120, 140, 200]]
    def padded(ws):
        return sum(next(w for w in sorted(ws) if f <= w) for f in fits)
    best = min((set(c) | {256} for c in itertools.combinations(ladder[:-1], 2)), key=padded)
    assert padded(widths) == padded(best)


def test_batches_tell_their_longest_row_without_building_the_batch():
    lengths = [3, 30, 17, 9, 41, 5, 22, 12]
    data = Encoded(ids=[list(range(1, n + 1)) for n in lengths], targets=[[1] * n for n in lengths], task="causal_lm")
    for packing in (False, True):
        batches = Batches(data, seq_len=32, batch_size=3, seed=0, packing=packing)
        for k in range(6):
            built = batches.batch(k)["attention_mask"]
            assert batches.longest(k) == int(built.sum(axis=1).max())


def test_trimmed_to_planned_widths_falls_back_to_the_full_width_for_a_longer_batch():
    (cut,) = trimmed([batch([20, 3])], widths=[24, 48])
    assert cut["input_ids"].shape[1] == 24
    (whole,) = trimmed([batch([50, 3])], widths=[24, 48])  # longer than the plan foresaw (on-policy completions)
    assert whole["input_ids"].shape[1] == 64 and whole["attention_mask"].sum() == 53
