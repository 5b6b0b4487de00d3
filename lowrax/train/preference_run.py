"""What `lowrax train` does differently for the preference objectives (dpo, orpo, simpo, kto):
their data, their loss function, the precomputed reference, and their held-out metrics.

The held-out metric is preference accuracy: the share of held-out pairs whose chosen
completion the policy gives a higher mean per-token log-probability than the rejected one
(length-normalised, so a longer completion is not ranked lower for its length). It needs
no reference, so it means the same before training (the base model's own ranking, about
0.5 when both completions are plausible) and after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowrax.adapters.tree import adapters_off, combine
from lowrax.dist.parallel import global_batch
from lowrax.errors import LowraxError
from lowrax.objectives.config import PAIRED
from lowrax.objectives.logps import completion_logps
from lowrax.objectives.step_losses import policy_preference_of, preference_loss_fn
from lowrax.train.config import TrainConfig
from lowrax.train.preference_data import PreferenceBatches, completion_width, encode_pairs, encode_unpaired


def preference_records(cfg: TrainConfig, train: list[dict], held_out: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of the objective; the embedded default is the date task's pairs
    (unpaired for KTO, its held-out set kept paired for the accuracy)."""
    if cfg.data.source != "default":
        return train, held_out
    from lowrax.train.default_task import make_preference_splits, unpaired

    train, held_out = make_preference_splits(cfg.data.default_train_examples, cfg.data.default_eval_examples,
                                             cfg.data.shuffle_seed)
    return (unpaired(train) if cfg.objective == "kto" else train), held_out


def _is_paired(records: list[dict], cfg: TrainConfig) -> bool:
    return bool(records) and cfg.data.chosen_field in records[0] and cfg.data.rejected_field in records[0]


class PreferenceRun:
    """Batches, loss function and held-out evaluation of one preference run."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, train_records, eval_records, mesh=None):
        self.cfg, self.model, self.mesh = cfg, model, mesh
        d, pad = cfg.data, tokenizer.pad_token_id or 0
        if cfg.objective in PAIRED:
            if not _is_paired(train_records, cfg):
                raise LowraxError(f"objective {cfg.objective} trains on pairs: records need the fields "
                                  f"{d.chosen_field} and {d.rejected_field} (and {d.prompt_field}); found: "
                                  f"{', '.join(sorted(train_records[0])) if train_records else 'no records'}")
            train = encode_pairs(tokenizer, train_records, d)
        else:
            train = encode_unpaired(tokenizer, train_records, d)
        # The held-out metric scores the first train.eval_examples pairs (0: none), as the task metrics do.
        scored = eval_records[: cfg.train.eval_examples]
        self.eval_pairs = encode_pairs(tokenizer, scored, d) if _is_paired(scored, cfg) else []
        self.held_out = len(eval_records)
        width = completion_width(train + self.eval_pairs, d.seq_len)
        self.batches = PreferenceBatches(train, d.seq_len, cfg.train.batch_size, d.shuffle_seed, pad, width)
        self.eval_batches = (PreferenceBatches(self.eval_pairs, d.seq_len, cfg.train.batch_size, 0, pad, width)
                             if self.eval_pairs else None)
        self.loss_fn = preference_loss_fn(cfg.objective, cfg.preference)
        self.precomputed = cfg.preference.reference == "precomputed" and cfg.objective in ("dpo", "kto")
        self._reference: np.ndarray | None = None
        self._eval_reference: np.ndarray | None = None
        self._kl_reference: np.ndarray | None = None  # KTO: [batches, b] of the mismatched rows, per batch
        self._eval_fn = jax.jit(self._evaluate_batch)

    # --- the precomputed reference -------------------------------------------------------

    def precompute_reference(self, params, progress: bool = True) -> None:
        """Summed completion log-probs of every training and held-out pair's chosen and rejected
        rows under the adapter-off model, once, before training (`preference.reference: precomputed`)."""
        off = adapters_off(params, allow_moving_base=True)  # before the first step, a moving base is still W0
        fn = jax.jit(lambda p, batch: completion_logps(self.model, p, batch)[0])
        if self.cfg.objective == "kto":
            self._precompute_kto(off, progress)
        else:
            self._reference = self._reference_of(self.batches, fn, off, progress)
        if self.eval_batches is not None:
            self._eval_reference = self._reference_of(self.eval_batches, fn, off, progress)

    def _reference_of(self, batches: PreferenceBatches, fn, off, progress: bool) -> np.ndarray:
        n, size = len(batches.examples), self.cfg.train.batch_size
        reference = np.zeros((n, 2), np.float32)
        for start in tqdm(range(0, n, size), desc="reference log-probs", unit="batch", disable=not progress,
                          leave=False):
            chosen = [min(i, n - 1) for i in range(start, start + size)]  # a full batch: one compiled shape
            logps = np.asarray(fn(off, self._placed(batches.batch_of(chosen))))
            reference[chosen, 0], reference[chosen, 1] = logps[:size], logps[size:]
        return reference

    def _precompute_kto(self, off, progress: bool) -> None:
        """KTO: each example's reference log-prob, and those of the mismatched KL rows of every batch the
        run will draw (they pair a prompt with the previous row's completion, so they depend on the batch)."""
        fn = jax.jit(lambda p, batch: (completion_logps(self.model, p, batch)[0],
                                       completion_logps(self.model, p, batch, prefix="kl_")[0]))
        count = self.cfg.train.steps * self.cfg.train.grad_accum_steps
        own = np.zeros((len(self.batches.examples),), np.float32)
        kl = np.zeros((count, self.cfg.train.batch_size), np.float32)
        for k in tqdm(range(count), desc="reference log-probs", unit="batch", disable=not progress, leave=False):
            indices = self.batches.indices(k)
            rows, mismatched = fn(off, self._placed(self.batches.batch_of(indices)))
            own[indices], kl[k] = np.asarray(rows), np.asarray(mismatched)
        self._reference, self._kl_reference = own, kl

    @staticmethod
    def _with_reference(batch: dict, reference: np.ndarray | None, indices: list[int]) -> dict:
        if reference is None:
            raise LowraxError("the precomputed reference is missing: call precompute_reference first")
        batch["ref_logps"] = np.concatenate([reference[indices, 0], reference[indices, 1]])
        return batch

    def batch(self, k: int) -> dict:
        """Training batch k, with its precomputed reference log-probs when there are some."""
        indices = self.batches.indices(k)
        batch = self.batches.batch_of(indices)
        if not self.precomputed:
            return batch
        if self.cfg.objective == "kto":
            if self._kl_reference is None or k >= len(self._kl_reference):
                raise LowraxError(f"no precomputed reference for batch {k}: call precompute_reference first")
            return {**batch, "ref_logps": self._reference[indices], "kl_ref_logps": self._kl_reference[k]}
        return self._with_reference(batch, self._reference, indices)

    # --- held-out evaluation -------------------------------------------------------------

    def _placed(self, batch: dict) -> dict:
        return {k: jnp.asarray(v) for k, v in batch.items()} if self.mesh is None else global_batch(self.mesh, batch)

    def _evaluate_batch(self, trainable, frozen, batch):
        params = combine(trainable, frozen)
        if self.cfg.objective == "kto":  # its loss is defined on unpaired rows: report the ranking only
            logps, tokens, _ = completion_logps(self.model, params, batch)
            sums = {"policy_preference": jnp.sum(policy_preference_of(logps / jnp.maximum(tokens, 1.0))
                                                 * batch["pair_weights"])}
            return jnp.zeros(()), jnp.sum(batch["pair_weights"]), sums
        return self.loss_fn(self.model, params, batch)  # the paired objectives log policy_preference

    def evaluate(self, trainable, frozen, progress: bool = False) -> dict:
        """Held-out preference accuracy (policy ranking), and for paired objectives the eval loss and
        reward metrics (against the precomputed reference when there is one)."""
        if self.eval_batches is None:
            return {}
        n, size = len(self.eval_pairs), self.cfg.train.batch_size
        totals: dict = {}
        for start in tqdm(range(0, n, size), desc="eval", unit="batch", disable=not progress, leave=False):
            indices = [min(i, n - 1) for i in range(start, start + size)]
            batch = self.eval_batches.batch_of(indices)
            if self.precomputed:
                batch = self._with_reference(batch, self._eval_reference, indices)
            batch["pair_weights"] = (np.arange(start, start + size) < n).astype(np.float32)
            loss_sum, count, sums = self._eval_fn(trainable, frozen, self._placed(batch))
            for key, value in {"loss": loss_sum, "count": count, **sums}.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        out = {"preference_accuracy": totals["policy_preference"] / n}
        if self.cfg.objective != "kto":
            out["eval_loss"] = totals["loss"] / n
            out.update({f"eval_{k}": v / n for k, v in totals.items() if k.startswith("rewards/")})
        return out
