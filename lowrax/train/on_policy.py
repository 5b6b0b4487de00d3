"""On-policy distillation (GKD's `lmbda`): on a seeded share of the steps, the student writes
the completions it is then taught on, so it learns from the teacher on its own mistakes.

The batch's prompts (each row's tokens before its first loss token) are continued by the
current student (sampled at `distill.generation_temperature`, or greedy at 0), and the rows
rebuilt as prompt + generation with the loss on the generated tokens. Which steps do so, and
the sampling key, are pure functions of (train.seed, step), so a resumed run is the same run.
"""

from __future__ import annotations

import numpy as np

from lowrax.errors import LowraxError
from lowrax.models.generate import SamplingConfig, generate_ids
from lowrax.train.data import gather_loss_positions


def is_on_policy_step(share: float, seed: int, step: int) -> bool:
    """Whether `step` uses student-generated completions (probability `share`)."""
    return share > 0 and np.random.default_rng([seed, step, 7]).random() < share


def row_prompts(batch: dict) -> list[list[int]]:
    """Each row's prompt: its tokens before the first loss token."""
    prompts = []
    for row, (ids, loss) in enumerate(zip(batch["input_ids"], batch["loss_mask"])):
        hits = np.nonzero(loss)[0]
        if len(hits) == 0 or hits[0] == 0:
            raise LowraxError(f"on-policy distillation: batch row {row} has no prompt before its completion")
        prompts.append(ids[: hits[0]].tolist())
    return prompts


def with_student_completions(model, params, batch: dict, *, max_new_tokens: int, temperature: float,
                             eos_token_id: int | None, pad_id: int, seed: int) -> dict:
    """The batch with every row's completion replaced by the student's own continuation of its prompt."""
    if "segment_ids" in batch:
        raise LowraxError("on-policy distillation needs one example per row: set data.packing=false")
    prompts = row_prompts(batch)
    eos = [eos_token_id] if eos_token_id is not None else []
    generated = generate_ids(model, params, prompts, max_new_tokens, SamplingConfig(temperature=temperature),
                             eos_token_ids=eos, pad_token_id=pad_id, seed=seed)
    b, t = batch["input_ids"].shape
    ids = np.full((b, t), pad_id, np.int32)
    mask = np.zeros((b, t), np.int32)
    loss = np.zeros((b, t), np.int32)
    for row, (prompt, new) in enumerate(zip(prompts, generated)):
        seq = (prompt + list(new))[:t]
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        loss[row, len(prompt): len(seq)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}
    if "loss_positions" in batch:
        out.update(gather_loss_positions(ids, loss, batch["loss_positions"].shape[1], where="on-policy batch"))
    return out
