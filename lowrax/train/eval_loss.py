"""The mean held-out loss of a run's task, compiled once per run."""

from __future__ import annotations

import jax
import numpy as np
from tqdm.auto import tqdm

from lowrax.adapters.tree import combine
from lowrax.dist.parallel import global_batch
from lowrax.train.config import TrainConfig
from lowrax.train.data import by_length
from lowrax.train.step import task_loss


class EvalLoss:
    """Mean loss over the held-out set, each example counted once; compiled once per padded width. A
    classifier's pass also counts the examples whose highest logit is their label (`accuracy`), so a run
    that scores accuracy on the same examples need not run them again.

    The batches are built once, shortest examples first, each padded to the power of two above its
    longest row (`data.padded_width`): a short held-out set is not run at the full `seq_len`, and the
    mean does not depend on the order. The frozen half is an argument of the jitted function (a
    closure would bake the whole base model into the program as constants).
    """

    def __init__(self, model, data, cfg: TrainConfig, pad: int, mesh=None):
        loss_fn = task_loss(model)
        self._fn = jax.jit(lambda trainable, frozen, batch: loss_fn(model, combine(trainable, frozen), batch))
        self.accuracy: float | None = None  # a classifier's, from the latest call
        size = cfg.train.batch_size
        self._batches = []
        for batch, real in by_length(data, size, cfg.data.seq_len, pad, cfg.data.target_len):
            filler = np.arange(size) >= real
            if "loss_mask" in batch:
                batch["loss_mask"][filler] = 0
            else:
                batch["example_weights"] = (~filler).astype(np.float32)
            self._batches.append(batch if mesh is None else global_batch(mesh, batch))

    def __call__(self, trainable, frozen, progress: bool = False) -> float:
        total, count, correct = 0.0, 0.0, None
        for batch in tqdm(self._batches, desc="eval loss", unit="batch", disable=not progress, leave=False):
            s, n, *sums = self._fn(trainable, frozen, batch)
            total, count = total + float(s), count + float(n)
            if sums:  # a classifier's count of correct predictions
                correct = (correct or 0.0) + float(sums[0]["accuracy"])
        self.accuracy = None if correct is None else correct / max(count, 1.0)
        return total / max(count, 1.0)
