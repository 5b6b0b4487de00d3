"""Teacher logits precomputed to disk (`distill.teacher_logits: DIR`): the teacher runs once,
before training, and the steps read its logits instead of holding it in memory.

    DIR/logits.npy   float16 [examples, K, vocab]: the teacher's logits at each training example's
                     K loss positions (its completion tokens), in the order of the encoded data
    DIR/meta.json    shape, the teacher, and a fingerprint of the tokenized data they belong to

Written into a temporary sibling and renamed into place when complete; a store whose meta
matches the run's data and teacher is reused (a resumed run, or a second student). One
example per row: packing and on-policy steps, whose rows are not the stored examples, are
refused. Size: examples x K x vocab x 2 bytes (the default task: 2000 x 12 x 49152 x 2 =
2.4 GB), which the run states before it writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowrax.errors import LowraxError
from lowrax.core.atomic import write_directory
from lowrax.objectives.logps import logits_at
from lowrax.train.data import Batches, Encoded


def data_fingerprint(data: Encoded, width: int) -> str:
    digest = hashlib.sha256(str(width).encode())
    for ids, mask in zip(data.ids, data.targets):
        digest.update(np.asarray(ids, np.int64).tobytes() + b"|" + np.asarray(mask, np.int8).tobytes() + b";")
    return digest.hexdigest()


def teacher_logits_store(out: str | Path, data: Encoded, seq_len: int, width: int, teacher_model, teacher_params,
                         teacher_name: str, progress: bool = True, log=print) -> np.ndarray:
    """The stored logits (a read-only memory map), computed and written first when `out` holds
    none for this data and teacher."""
    out = Path(out).expanduser()
    meta = {"examples": len(data.ids), "loss_positions": width, "vocab": teacher_model.config.vocab_size,
            "teacher": teacher_name, "data": data_fingerprint(data, width)}
    if (out / "meta.json").exists():
        saved = json.loads((out / "meta.json").read_text())
        if saved != meta:
            changed = sorted(k for k in meta if saved.get(k) != meta[k])
            raise LowraxError(f"{out} holds teacher logits for other {', '.join(changed)}; use another "
                              "distill.teacher_logits directory")
        return np.load(out / "logits.npy", mmap_mode="r")
    size = len(data.ids) * width * meta["vocab"] * 2
    log(f"writing the teacher's logits to {out}: {len(data.ids)} examples x {width} positions x {meta['vocab']} "
        f"(float16, {size / 1e9:.2f} GB)")
    fn = jax.jit(lambda p, ids, mask, pos: logits_at(teacher_model, p, teacher_model.final_hidden(p, ids, mask), pos))
    size_batch = 16
    batches = Batches(data, seq_len, size_batch, seed=0, loss_positions=width)
    order = np.arange(len(data.ids))

    def fill(staging: Path) -> None:
        stored = np.lib.format.open_memmap(staging / "logits.npy", mode="w+", dtype=np.float16,
                                           shape=(len(data.ids), width, meta["vocab"]))
        for start in tqdm(range(0, len(order), size_batch), desc="teacher logits", unit="batch",
                          disable=not progress, leave=False):
            rows = [int(min(i, len(order) - 1)) for i in range(start, start + size_batch)]
            batch = batches.rows_batch([[i] for i in rows])
            logits = fn(teacher_params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                        jnp.asarray(batch["loss_positions"]))
            stored[rows] = np.asarray(logits, np.float16)
        stored.flush()
        del stored
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    write_directory(out, fill, overwrite=True)
    return np.load(out / "logits.npy", mmap_mode="r")


class WithTeacherLogits:
    """Training batches with the stored teacher logits of each row's example (`teacher_logits` [b, K, V])."""

    def __init__(self, batches: Batches, stored: np.ndarray):
        if batches.packing:
            raise LowraxError("distill.teacher_logits stores one example per row: set data.packing=false")
        self.batches, self.stored = batches, stored

    def batch(self, k: int) -> dict:
        out = self.batches.batch(k)
        size = self.batches.batch_size
        examples = [self.batches.row_at(k * size + row)[0] for row in range(size)]
        out["teacher_logits"] = np.asarray(self.stored[examples])  # float16 to the device; the loss casts it
        return out
