"""Preference data: (prompt, chosen, rejected) pairs for DPO / ORPO / SimPO, and KTO's unpaired
(prompt, completion, label) examples, tokenized and batched deterministically.

Record forms (field names from `data.*_field`):
  paired, standard        {"prompt": str, "chosen": str, "rejected": str}
  paired, conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}, or
                          without "prompt": full conversations sharing all but their last turn
  unpaired (KTO)          {"prompt": str or [messages], "completion": str or [messages], "label": bool}

Strings: the prompt is encoded as for SFT (chat template with `data.chat_template`) and
the completion follows it, with EOS. Messages: the chat template renders both; the
completion is what the full conversation adds after the prompt with its generation header.
Only completion tokens carry loss. A paired batch holds b chosen rows, then their b
rejected rows (one forward for both); KTO rows come with mismatched `kl_` rows (prompt i,
completion i - 1 of the batch) for the KL estimate, as TRL builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowrax.errors import LowraxError
from lowrax.train.config import DataSection
from lowrax.train.data import chat_ids, gather_loss_positions, loss_width, prompt_ids
from lowrax.train.records import record_name


@dataclass
class Example:
    """One tokenized prompt with its completion(s): `completions` holds (chosen, rejected) for
    a pair, (completion,) for KTO; `desirable` is KTO's label."""

    prompt: list[int]
    completions: tuple
    desirable: bool = True


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _check_fields(record: dict, fields: list[str], name: str, form: str) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise LowraxError(f"{form} {name} needs the fields {', '.join(fields)}; missing {', '.join(missing)} "
                          f"(found: {', '.join(sorted(record))})")


def _completion_ids(tokenizer, prompt, completion, cfg: DataSection, name: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one prompt and completion, both strings or both messages."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if isinstance(completion, str) and not completion.strip() or _is_messages(completion) and not any(
            isinstance(m["content"], str) and m["content"].strip() for m in completion):
        # (the EOS alone would be trained: a preference between two empty answers says nothing)
        raise LowraxError(f"{name}: a completion is empty; chosen, rejected and KTO completions need text")
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt_ids(tokenizer, {cfg.prompt_field: prompt}, cfg), \
            list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + eos
    if _is_messages(prompt) and _is_messages(completion):
        head = chat_ids(tokenizer, prompt, True)
        full = chat_ids(tokenizer, prompt + completion, False)
        if full[: len(head)] != head:
            raise LowraxError(f"{name}: the chat template renders the prompt differently alone than before its "
                              "completion, so the completion cannot be separated; use string fields")
        return head, full[len(head):]
    raise LowraxError(f"{name}: prompt and completion must both be strings or both lists of "
                      f"{{'role', 'content'}} messages, got {type(prompt).__name__} and {type(completion).__name__}")


def _split_implicit_prompt(chosen: list, rejected: list, name: str) -> tuple[list, list, list]:
    """(prompt, chosen tail, rejected tail) of two conversations that share all but their last turn."""
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise LowraxError(f"{name}: without a prompt field, chosen and rejected must be conversations that "
                          "share every turn but their last")
    return chosen[:-1], chosen[-1:], rejected[-1:]


def encode_pairs(tokenizer, records: list[dict], cfg: DataSection) -> list[Example]:
    """Tokenized (prompt, chosen, rejected) examples of paired records."""
    out = []
    for i, record in enumerate(records):
        name = record_name(record, i)
        _check_fields(record, [cfg.chosen_field, cfg.rejected_field], name, "preference")
        chosen, rejected = record[cfg.chosen_field], record[cfg.rejected_field]
        prompt = record.get(cfg.prompt_field)
        if prompt is None:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise LowraxError(f"preference {name} has no {cfg.prompt_field!r} field; only conversational "
                                  f"pairs (lists of messages) may leave the prompt implicit (found: {', '.join(sorted(record))})")
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, name)
        head, good = _completion_ids(tokenizer, prompt, chosen, cfg, name)
        _, bad = _completion_ids(tokenizer, prompt, rejected, cfg, name)
        if not good or not bad:
            raise LowraxError(f"preference {name} has an empty chosen or rejected completion")
        out.append(Example(head, (good, bad)))
    return out


def _label(value, name: str, field: str) -> bool:
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise LowraxError(f"KTO {name}: {field!r} must be a boolean (desirable or not), got {value!r}")


def encode_unpaired(tokenizer, records: list[dict], cfg: DataSection) -> list[Example]:
    """Tokenized KTO examples (prompt, completion, desirable)."""
    out = []
    for i, record in enumerate(records):
        name = record_name(record, i)
        _check_fields(record, [cfg.prompt_field, cfg.completion_field, cfg.label_field], name, "KTO")
        head, completion = _completion_ids(tokenizer, record[cfg.prompt_field], record[cfg.completion_field], cfg, name)
        if not completion:
            raise LowraxError(f"KTO {name} has an empty completion")
        out.append(Example(head, (completion,), _label(record[cfg.label_field], name, cfg.label_field)))
    if not any(e.desirable for e in out) or all(e.desirable for e in out):
        raise LowraxError("KTO data needs both desirable (label true) and undesirable (label false) examples")
    return out


def completion_width(examples: list[Example], seq_len: int) -> int:
    """Loss positions per row: the longest completion (after truncation), rounded up to 8."""
    return loss_width((len(c) for e in examples for c in e.completions), seq_len)


class PreferenceBatches:
    """Deterministic batches of preference examples; `batch(k)` is a pure function of (seed, k).

    Paired: input_ids, attention_mask, loss_mask [2b, t] with loss_positions / loss_targets /
    loss_weights [2b, K]: rows 0..b-1 chosen, b..2b-1 rejected. KTO: the same arrays [b, ...],
    `desirable` [b] and the `kl_` rows. Rows longer than seq_len keep their first seq_len tokens.
    """

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int, pad_id: int = 0,
                 width: int | None = None):
        if not examples:
            raise LowraxError("no preference examples after tokenization")
        if batch_size < 2 and len(examples[0].completions) == 1:
            raise LowraxError("KTO needs train.batch_size >= 2: its KL estimate pairs each prompt with another "
                              "example's completion")
        self.examples, self.seq_len, self.batch_size, self.seed, self.pad_id = examples, seq_len, batch_size, seed, pad_id
        self.width = width or completion_width(examples, seq_len)
        self.paired = len(examples[0].completions) == 2
        self._order: tuple[int, list[int]] | None = None

    @property
    def rows_per_epoch(self) -> int:
        return len(self.examples)

    def indices(self, k: int) -> list[int]:
        """The examples of batch k: consecutive slices of per-epoch seeded shuffles."""
        n, b = len(self.examples), self.batch_size
        out = []
        for position in range(k * b, (k + 1) * b):
            epoch, i = divmod(position, n)
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n).tolist())
            out.append(self._order[1][i])
        return out

    def _rows(self, pieces: list[tuple[list[int], list[int]]], prefix: str = "") -> dict:
        t = self.seq_len
        ids = np.full((len(pieces), t), self.pad_id, np.int32)
        mask = np.zeros((len(pieces), t), np.int32)
        loss = np.zeros((len(pieces), t), np.int32)
        for row, (prompt, completion) in enumerate(pieces):
            seq = (prompt + completion)[:t]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            loss[row, len(prompt): len(seq)] = 1
        out = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss,
               **gather_loss_positions(ids, loss, self.width, where="preference batch")}
        return {prefix + key: value for key, value in out.items()}

    def batch_of(self, chosen: list[int]) -> dict:
        """The batch of the given example indices (evaluation batches use it directly)."""
        examples = [self.examples[i] for i in chosen]
        if self.paired:
            return self._rows([(e.prompt, e.completions[0]) for e in examples]
                              + [(e.prompt, e.completions[1]) for e in examples])
        mismatched = [(e.prompt, examples[i - 1].completions[0]) for i, e in enumerate(examples)]
        return {**self._rows([(e.prompt, e.completions[0]) for e in examples]), **self._rows(mismatched, "kl_"),
                "desirable": np.array([e.desirable for e in examples], np.int32)}

    def batch(self, k: int) -> dict:
        return self.batch_of(self.indices(k))
