"""Training data: local files through `datasets`, tokenized with loss masks, batched deterministically.

Formats (`data.format`, detected from the columns when "auto"):
  prompt_response  loss on the response (and EOS) only; optional chat template on the prompt
  messages         chat messages rendered with the tokenizer's template; loss on assistant turns
  text             loss on every token
  classification   text + integer label, for encoders with a classification head
  seq2seq          input + target, for encoder-decoders (T5): loss on the target (and EOS);
                   prompt/response records serve as input/target too
  image_classification  image + integer label, for image encoders (ViT); an image folder
                   (one subfolder per class) gives such records

Batches are a pure function of (seed, examples consumed), so a resumed run sees
exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowrax.train.config import FORMATS, DataSection
from lowrax.train.records import check_record, read_record_file, record_name
from lowrax.errors import LowraxError

_SUFFIXES = (".csv", ".json", ".jsonl", ".text", ".txt")  # read by lowrax.train.records


def _load_dataset(source: str):
    from lowrax.train.image_data import image_folder_splits, is_image_folder

    path = Path(source).expanduser()
    if is_image_folder(path):
        return image_folder_splits(path)
    if path.is_dir():
        import datasets  # only here: it and pandas / pyarrow are about 100 MB of a small run's memory

        datasets.disable_progress_bars()  # its "Loading dataset from disk" bars would interleave with lowrax's
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return {name: list(split) for name, split in loaded.items()}
        return {"train": list(loaded)}
    if not path.exists():
        raise LowraxError(f"data source {path} does not exist; expected 'default', a .json/.jsonl/.csv/.txt file, "
                          "a directory written by Dataset.save_to_disk, or an image folder (one subfolder per class)")
    if path.suffix.lower() not in _SUFFIXES:
        raise LowraxError(f"data source {path} has an unsupported extension {path.suffix!r}; "
                          f"expected one of {', '.join(_SUFFIXES)} or a save_to_disk directory")
    return {"train": read_record_file(path)}


def load_records(cfg: DataSection) -> tuple[list[dict], list[dict]]:
    """(train, eval) lists of records from the configured source."""
    if cfg.source == "default":
        from lowrax.train.default_task import make_splits

        return make_splits(cfg.default_train_examples, cfg.default_eval_examples, cfg.shuffle_seed)
    if cfg.source == "embedded_text":
        from lowrax.pruning.text import embedded_records

        return embedded_records("calibration"), embedded_records("heldout")[: cfg.default_eval_examples]
    splits = _load_dataset(cfg.source)
    train = splits.get("train") or next(iter(splits.values()))
    evaluation = splits.get("validation") or splits.get("test")
    if cfg.eval_source:
        evaluation = _load_dataset(cfg.eval_source)["train"]
    if evaluation is None:
        order = np.random.default_rng(cfg.shuffle_seed).permutation(len(train))
        n_eval = int(round(len(train) * cfg.eval_fraction))
        evaluation = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    if not train:
        raise LowraxError(f"data source {cfg.source} has no training records")
    return train, evaluation


def detect_format(record: dict, cfg: DataSection, task: str) -> str:
    """The record format: cfg.format, or inferred from the fields present; checks required fields."""
    needed = {
        "prompt_response": [cfg.prompt_field, cfg.response_field],
        "messages": [cfg.messages_field],
        "text": [cfg.text_field],
        "classification": [cfg.text_field, cfg.label_field],
        "seq2seq": [cfg.input_field, cfg.target_field],
        "image_classification": [cfg.image_field, cfg.label_field],
    }
    fmt = cfg.format
    if fmt == "auto":
        candidates = {"classification": ["classification"], "seq2seq": ["seq2seq", "prompt_response"],
                      "image_classification": ["image_classification"]}.get(task, ["messages", "prompt_response", "text"])
        fmt = next((f for f in candidates if all(k in record for k in needed[f])), None)
        if fmt is None:
            wanted = " or ".join("+".join(needed[f]) for f in candidates)
            raise LowraxError(f"data records need the fields {wanted}; found fields: {', '.join(sorted(record))}")
    if fmt not in FORMATS:
        raise LowraxError(f"data.format must be auto or one of {FORMATS}, got {fmt!r}")
    if (task == "image_classification") != (fmt == "image_classification"):
        raise LowraxError(f"data.format {fmt!r} does not fit {'an image' if task == 'image_classification' else 'a text'} "
                          "model: image encoders (ViT) train on image/label records (data.format=image_classification)")
    if task == "seq2seq" and fmt not in ("seq2seq", "prompt_response"):
        raise LowraxError(f"model.task=seq2seq trains on input/target (or prompt/response) records; data.format is {fmt!r}")
    missing = [k for k in needed[fmt] if k not in record]
    if missing:
        raise LowraxError(f"data format {fmt!r} needs the fields {', '.join(needed[fmt])}; missing {', '.join(missing)} "
                          f"(found: {', '.join(sorted(record))})")
    return fmt


def chat_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def prompt_ids(tokenizer, record: dict, cfg: DataSection) -> list[int]:
    """Token ids of a prompt_response record's prompt (what generation starts from)."""
    prompt = record[cfg.prompt_field]
    if cfg.chat_template:
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}], True)
    return list(tokenizer(prompt)["input_ids"])


def encode_causal(tokenizer, record: dict, fmt: str, cfg: DataSection) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) for one record; loss_mask marks the tokens the model is trained to produce."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "prompt_response":
        p = prompt_ids(tokenizer, record, cfg)
        r = list(tokenizer(record[cfg.response_field], add_special_tokens=False)["input_ids"]) + eos
        return p + r, [0] * len(p) + [1] * len(r)
    if fmt == "messages":
        messages = record[cfg.messages_field]
        ids, mask = [], []
        for i, message in enumerate(messages):
            upto = chat_ids(tokenizer, messages[: i + 1], False)
            trained = message.get("role") == "assistant"
            if trained:
                # The assistant header belongs to the prompt; only the reply itself is trained.
                header = chat_ids(tokenizer, messages[:i], True)
                if upto[: len(header)] == header and len(header) > len(ids):
                    mask += [0] * (len(header) - len(ids))
                    ids = header
            mask += [1 if trained else 0] * (len(upto) - len(ids))
            ids = upto
        return ids, mask
    ids = list(tokenizer(record[cfg.text_field])["input_ids"]) + (eos if cfg.text_eos else [])
    return ids, [1] * len(ids)


def with_num_labels(cfg, records: list[dict]):
    """cfg with model.num_labels set for classification when it is not: 1 + the largest training label
    (an image folder's class count). The run's config.yaml records it, so a restore rebuilds the same head."""
    if cfg.model.task != "classification" or cfg.model.num_labels is not None or not records:
        return cfg
    import dataclasses

    field = cfg.data.label_field
    labels = [r[field] for r in records if field in r]
    if not labels or not all(isinstance(x, (int, np.integer)) and x >= 0 for x in labels):
        return cfg  # detect_format names the missing or malformed field later
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_labels=int(max(labels)) + 1))


def data_task(model, task: str) -> str:
    """What the records hold for `model.task` on this model: classification of images for an image model."""
    return "image_classification" if task == "classification" and model.is_image_model else task


def seq2seq_fields(fmt: str, cfg: DataSection) -> tuple[str, str]:
    """The (input, target) fields of a seq2seq record in format `fmt`."""
    return (cfg.input_field, cfg.target_field) if fmt == "seq2seq" else (cfg.prompt_field, cfg.response_field)


def encode_target(tokenizer, text: str) -> list[int]:
    """A seq2seq target's ids ending in one EOS (T5's tokenizer appends it already; others do not)."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


@dataclass
class Encoded:
    """Tokenized examples: causal (ids, loss_mask) pairs, classification (ids, label), seq2seq
    (input ids, target ids), or image classification (images, label) with the image processor."""

    ids: list  # token ids; for image_classification the images (paths, PIL images), processed per batch
    targets: list  # loss masks (causal), int labels (classification, images) or target ids (seq2seq)
    task: str
    processor: object = None  # image_classification: the `lowrax.ImageProcessor` making pixel_values


def encode_all(tokenizer, records: list[dict], cfg: DataSection, task: str, what: str = "training",
               num_labels: int | None = None, log=None) -> Encoded:
    """Every record checked (an error names the `what` record and its field) and tokenized. Causal-LM
    records with no trained token within data.seq_len (a prompt that fills the row) are left out,
    and `log` reports how many; if none is left, that is an error."""
    if not records:
        return Encoded([], [], task)
    fmt = detect_format(records[0], cfg, task)
    for i, record in enumerate(records):
        check_record(record, fmt, cfg, f"{what} {record_name(record, i)} {_preview(record)}", num_labels)
    if task == "image_classification":  # `tokenizer` is the model's ImageProcessor; images are read per batch
        return Encoded([r[cfg.image_field] for r in records], [int(r[cfg.label_field]) for r in records], task,
                       processor=tokenizer)
    ids, targets = [], []
    source, target = seq2seq_fields(fmt, cfg)
    for record in records:
        if task == "seq2seq":
            ids.append(list(tokenizer(record[source])["input_ids"]))
            targets.append(encode_target(tokenizer, record[target]))
        elif task == "classification":
            ids.append(list(tokenizer(record[cfg.text_field])["input_ids"]))
            targets.append(int(record[cfg.label_field]))
        else:
            i, m = encode_causal(tokenizer, record, fmt, cfg)
            ids.append(i)
            targets.append(m)
    if task == "causal_lm":
        ids, targets = _with_trained_tokens(ids, targets, records, cfg.seq_len, what, log)
    return Encoded(ids, targets, task)


def _with_trained_tokens(ids: list, masks: list, records: list, seq_len: int, what: str, log) -> tuple[list, list]:
    """The examples that train at least one token within the first seq_len (the rest would add nothing)."""
    kept = [k for k, m in enumerate(masks) if any(m[1:seq_len])]  # position 0 is never predicted
    if len(kept) == len(masks):
        return ids, masks
    first = next(k for k, m in enumerate(masks) if not any(m[1:seq_len]))
    if not kept:
        raise LowraxError(f"no {what} record has a trained token within data.seq_len={seq_len} (their prompts fill "
                          "the row); raise data.seq_len")
    if log is not None:
        log(f"data: {len(masks) - len(kept)} of {len(masks)} {what} records have no trained token within "
            f"data.seq_len={seq_len} (the prompt fills the row; the first is {record_name(records[first], first)}) and are left out")
    return [ids[k] for k in kept], [masks[k] for k in kept]


def _preview(record: dict) -> str:
    text = json.dumps(record, ensure_ascii=False, default=str)
    return f"({text[:60]}...)" if len(text) > 60 else f"({text})"


def padded_width(longest: int, seq_len: int) -> int:
    """The width a batch whose longest row has `longest` tokens is padded to when it need not be `seq_len`
    (held-out loss and accuracy): the next power of two, at least 16, at most seq_len. A handful of
    compiled shapes, and little work on padding."""
    return min(seq_len, max(16, 1 << (max(longest, 1) - 1).bit_length()))


def by_length(data: Encoded, batch_size: int, seq_len: int, pad_id: int = 0, target_len: int = 32):
    """Yield (batch, real rows) over every example once, shortest first, each batch of `batch_size` rows
    padded to `padded_width` of its longest (images: seq_len); a last short batch is filled with copies of
    its last row, which the caller leaves out of its sums (`real` rows are the genuine ones)."""
    images = data.task == "image_classification"
    order = sorted(range(len(data.ids)), key=lambda i: 0 if images else len(data.ids[i]))
    by_width: dict[int, Batches] = {}  # one batch builder per padded width
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)  # one batch shape
        width = seq_len if images else padded_width(len(data.ids[chunk[-1]]), seq_len)
        batches = by_width.setdefault(width, Batches(data, width, batch_size, seed=0, pad_id=pad_id,
                                                     target_len=target_len))
        yield batches.rows_batch([[i] for i in chunk], "held-out batch"), real


# The arrays of a batch with one entry per position of its rows [b, seq_len, ...]: the ones `trimmed` cuts.
PER_POSITION = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "token_type_ids")


MIN_TRIM_WIDTH = 16  # narrower programs save too little to be worth compiling
# Each width is one more compiled training step, and XLA's CPU executable of a step stays resident
# (about 70 MB for MiniLM's): a run picks at most this many, the ones that save the most padding.
MOST_TRIM_WIDTHS = 3


def trim_widths(seq_len: int) -> list[int]:
    """The widths a training batch may be cut to: 16 x 2^k and 24 x 2^k below seq_len, then seq_len (each at
    most 1.5x the one below)."""
    widths, base = [], MIN_TRIM_WIDTH
    while base < seq_len:
        widths += [w for w in (base, base * 3 // 2) if w < seq_len]
        base *= 2
    return widths + [seq_len]


def default_trim_widths(seq_len: int) -> list[int]:
    """The widths when a run's batches are not known ahead: a quarter, a half and all of seq_len."""
    return sorted({w for w in (seq_len // 4, seq_len // 2) if w >= MIN_TRIM_WIDTH} | {seq_len})


def planned_trim_widths(longest_per_step: list[int], seq_len: int, most: int = MOST_TRIM_WIDTHS) -> list[int]:
    """At most `most` widths of `trim_widths(seq_len)` that leave the least padding over the run, given
    each step's longest row: the narrowest width that holds every step is always one of them."""
    ladder = np.asarray(trim_widths(seq_len))
    fits = ladder[np.searchsorted(ladder, np.minimum(longest_per_step or [seq_len], seq_len))]
    used, counts = np.unique(fits, return_counts=True)

    def padded(chosen):  # every step at the narrowest chosen width that holds it
        widths = np.asarray(sorted(chosen) + [used[-1]])
        return int(np.sum(counts * widths[np.searchsorted(widths, used)]))

    best = min((c for size in range(min(most, len(used))) for c in itertools.combinations(used[:-1].tolist(), size)),
               key=padded)
    return sorted(best) + [int(used[-1])]


def trimmed(batches: list[dict], widths: list[int] | None = None) -> list[dict]:
    """Training micro-batches cut to the narrowest of `widths` (default: `default_trim_widths`) that holds
    every row's last attended token, else left whole: the padding beyond it is never attended and carries
    no loss, so the loss and gradients are those of the full width."""
    masks = [b["attention_mask"] for b in batches if b.get("attention_mask") is not None]
    if not masks or any(m.ndim != 2 for m in masks):
        return batches
    seq_len = masks[0].shape[1]
    attended = [np.nonzero(m.any(axis=0))[0] for m in masks]
    longest = max(int(a[-1]) + 1 if a.size else 1 for a in attended)
    width = next((w for w in widths or default_trim_widths(seq_len) if longest <= w), seq_len)
    if width >= seq_len:
        return batches
    return [{k: (v[:, :width] if k in PER_POSITION and v.shape[1] == seq_len else v) for k, v in b.items()}
            for b in batches]


class Batches:
    """Deterministic batches: `batch(k)` is the k-th batch of the seeded, per-epoch shuffled stream.

    Rows are `seq_len` tokens, right-padded; with packing, consecutive shuffled
    examples share a row with distinct `segment_ids`.
    """

    def __init__(self, data: Encoded, seq_len: int, batch_size: int, seed: int, packing: bool = False, pad_id: int = 0,
                 loss_positions: int = 0, target_len: int = 32):
        if not data.ids:
            raise LowraxError("no training examples after tokenization")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.loss_positions, self.target_len = loss_positions, target_len
        self.packing, self.pad_id = packing and data.task == "causal_lm", pad_id
        self._epochs: dict[int, list] = {}
        self._lengths: dict[int, int] = {}

    def _rows(self, epoch: int) -> list:
        """The epoch's rows: lists of example indices (one each without packing)."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data.ids)).tolist()
            rows = [[i] for i in order] if not self.packing else self._pack(order)
            self._epochs = {epoch: rows}  # only the current epoch is kept
            self._lengths[epoch] = len(rows)
        return self._epochs[epoch]

    def _pack(self, order: list[int]) -> list[list[int]]:
        rows, current, used = [], [], 0
        for i in order:
            n = min(len(self.data.ids[i]), self.seq_len)
            if current and used + n > self.seq_len:
                rows.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        return rows + ([current] if current else [])

    @property
    def rows_per_epoch(self) -> int:
        """Rows in one pass over the data: one per example, or the packed rows."""
        return len(self._rows(0))

    def row_at(self, index: int) -> list[int]:
        """Example indices of the index-th row of the infinite stream of epochs."""
        epoch = 0
        while True:
            length = self._lengths.get(epoch) or len(self._rows(epoch))
            if index < length:
                return self._rows(epoch)[index]
            index -= length
            epoch += 1

    def longest(self, k: int) -> int | None:
        """The longest row of the k-th batch in tokens (None for images, which have no length), without
        building it."""
        if self.data.task == "image_classification":
            return None
        rows = [self.row_at(k * self.batch_size + row) for row in range(self.batch_size)]
        return max(min(sum(len(self.data.ids[i]) for i in row), self.seq_len) for row in rows)

    def batch(self, k: int) -> dict:
        """The k-th batch as numpy arrays [batch_size, seq_len] (labels [batch_size] for classification)."""
        return self.rows_batch([self.row_at(k * self.batch_size + row) for row in range(self.batch_size)], f"batch {k}")

    def rows_batch(self, rows: list[list[int]], where: str = "batch") -> dict:
        """The batch whose rows hold the given example indices (one each without packing)."""
        t, b = self.seq_len, len(rows)
        ids = np.full((b, t), self.pad_id, np.int32)
        mask = np.zeros((b, t), np.int32)
        if self.data.task == "image_classification":
            images = [self.data.ids[i] for (i,) in rows]
            return {"pixel_values": self.data.processor(images),
                    "labels": np.asarray([self.data.targets[i] for (i,) in rows], np.int32)}
        out = {"input_ids": ids, "attention_mask": mask}
        if self.data.task == "classification":
            labels = np.zeros((b,), np.int32)
            for row in range(b):
                (i,) = rows[row]
                seq = self.data.ids[i][:t]
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
                labels[row] = self.data.targets[i]
            out["labels"] = labels
            return out
        if self.data.task == "seq2seq":
            return self._seq2seq_rows(rows, out)
        loss = np.zeros((b, t), np.int32)
        segments = np.zeros((b, t), np.int32)
        for row in range(b):
            start = 0
            for seg, i in enumerate(rows[row], start=1):
                seq, m = self.data.ids[i][: t - start], self.data.targets[i][: t - start]
                ids[row, start: start + len(seq)] = seq
                loss[row, start: start + len(seq)] = m
                mask[row, start: start + len(seq)] = 1
                segments[row, start: start + len(seq)] = seg
                start += len(seq)
        out["loss_mask"] = loss
        if self.packing:
            out["segment_ids"] = segments
        if self.loss_positions:
            out.update(gather_loss_positions(ids, loss, self.loss_positions, segments if self.packing else None, where))
        return out


    def _seq2seq_rows(self, rows: list[list[int]], out: dict) -> dict:
        """Encoder inputs [b, seq_len], and the targets as labels [b, target_len] with their loss_mask (the
        decoder's input is the labels shifted right, which the loss makes with the model's start token)."""
        t, b = self.seq_len, len(rows)
        labels = np.full((b, self.target_len), self.pad_id, np.int32)
        loss = np.zeros((b, self.target_len), np.int32)
        for row in range(b):
            (i,) = rows[row]
            seq, target = self.data.ids[i][:t], self.data.targets[i][: self.target_len]
            out["input_ids"][row, : len(seq)] = seq
            out["attention_mask"][row, : len(seq)] = 1
            labels[row, : len(target)] = target
            loss[row, : len(target)] = 1
        return {**out, "labels": labels, "loss_mask": loss}


def loss_width(loss_counts, seq_len: int) -> int:
    """Loss positions per row (`data.loss_positions`) that hold every row's loss tokens, given each
    example's count of them: the largest (after truncation to the row), rounded up to 8."""
    longest = max(min(n, seq_len - 1) for n in loss_counts)
    return min(-(-longest // 8) * 8, seq_len - 1)


def gather_loss_positions(ids: np.ndarray, loss: np.ndarray, width: int, segments: np.ndarray | None = None,
                          where: str = "batch") -> dict:
    """[b, width] positions whose next token carries loss, with those targets and 0/1 weights."""
    b = ids.shape[0]
    positions = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    weights = np.zeros((b, width), np.int32)
    for row in range(b):
        hits = np.nonzero(loss[row, 1:])[0]
        if segments is not None:
            hits = hits[segments[row, hits + 1] == segments[row, hits]]
        if len(hits) > width:
            raise LowraxError(f"{where} row {row} has {len(hits)} loss tokens but data.loss_positions is {width}; "
                              "raise data.loss_positions (or set it to 0 to score every position)")
        positions[row, : len(hits)] = hits
        targets[row, : len(hits)] = ids[row, hits + 1]
        weights[row, : len(hits)] = 1
    return {"loss_positions": positions, "loss_targets": targets, "loss_weights": weights}
