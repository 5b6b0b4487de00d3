"""The mean held-out loss of a run's task, compiled once per run."""

from __future__ import annotations

import jax
import numpy as np
from tqdm.auto import tqdm

from lowrax.adapters.tree import combine
from lowrax.dist.parallel import global_batch
from lowrax.train.config import TrainConfig
from lowrax.train.data import Batches
from lowrax.train.step import task_loss


class EvalLoss:
    """Mean loss over the held-out set, each example counted once; compiled once per run.

    The batches are built once; the frozen half is an argument of the jitted function
    (a closure would bake the whole base model into the program as constants).
    """

    def __init__(self, model, data, cfg: TrainConfig, pad: int, mesh=None):
        loss_fn = task_loss(model)
        self._fn = jax.jit(lambda trainable, frozen, batch: loss_fn(model, combine(trainable, frozen), batch))
        size = cfg.train.batch_size
        batches = (Batches(data, cfg.data.seq_len, size, seed=0, packing=False, pad_id=pad, target_len=cfg.data.target_len)
                   if data.ids else None)
        self._batches = []
        for k in range(-(-len(data.ids) // size)):
            batch = batches.batch(k)
            filler = np.arange(k * size, (k + 1) * size) >= len(data.ids)  # rows that wrapped into a second epoch
            if "loss_mask" in batch:
                batch["loss_mask"][filler] = 0
            else:
                batch["example_weights"] = (~filler).astype(np.float32)
            self._batches.append(batch if mesh is None else global_batch(mesh, batch))

    def __call__(self, trainable, frozen, progress: bool = False) -> float:
        total, count = 0.0, 0.0
        for batch in tqdm(self._batches, desc="eval loss", unit="batch", disable=not progress, leave=False):
            s, n = self._fn(trainable, frozen, batch)
            total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)
