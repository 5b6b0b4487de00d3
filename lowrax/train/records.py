"""Reading data files and checking their records, with errors that name the file, line and field.

JSON Lines, JSON and CSV files are read here rather than through `datasets`, whose errors do not
say which line is wrong; every record is then checked against its format before tokenization.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from lowrax.core.checked import shown
from lowrax.errors import LowraxError

ROLES = ("system", "user", "assistant", "tool")


class Record(dict):
    """A record read from a file, remembering where: `origin` ("data.jsonl line 7") survives the
    shuffle and the train / evaluation split, so an error names the line a user can open."""

    origin: str | None = None


def with_origin(fields: dict, origin: str) -> Record:
    record = Record(fields)
    record.origin = origin
    return record


def record_name(record: dict, index: int) -> str:
    """How errors name a record: its file and line when it was read from one, else its position."""
    return getattr(record, "origin", None) or f"record {index + 1}"


def read_record_file(path: Path) -> list[dict]:
    """The records of a .jsonl / .json / .csv / .txt file; a malformed one is an error naming its line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowraxError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text"):
        records = [with_origin({"text": line}, f"{path.name} line {n}")
                   for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif suffix == ".csv":
        records = _csv_records(path, text)
    else:
        records = _json_records(path, text)
    if not records:
        raise LowraxError(f"data file {path} holds no records")
    return records


def _json_records(path: Path, text: str) -> list[dict]:
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines under a .json name, as `datasets` reads them too
        if isinstance(whole, list):
            return [_record_object(path, f"item {i + 1}", r) for i, r in enumerate(whole)]
        if whole is not None:
            raise LowraxError(f"data file {path} holds a JSON {type(whole).__name__}; expected a list of records "
                              "([{...}, ...]) or one JSON object per line")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowraxError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(_record_object(path, f"line {number}", value))
    return records


def _record_object(path: Path, where: str, value) -> Record:
    if not isinstance(value, dict):
        raise LowraxError(f"{path} {where}: a record must be a JSON object of fields, got {type(value).__name__} "
                          f"{shown(value)}")
    return with_origin(value, f"{path.name} {where}")


def _csv_records(path: Path, text: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))  # a quoted field may span lines
    header = next(reader, None)
    if header is None:
        return []
    records, end = [], reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise LowraxError(f"{path}:{start}: {len(row)} fields, but the header names {len(header)} "
                              f"({', '.join(header)}); quote fields that contain commas")
        records.append(with_origin(dict(zip(header, row)), f"{path.name} line {start}"))
    for column in header:  # integer columns (labels) as integers, as `datasets` infers them
        values = [r[column] for r in records]
        if values and all(_is_int(v) for v in values):
            for r in records:
                r[column] = int(r[column])
    return records


def _is_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def check_record(record: dict, fmt: str, cfg, where: str, num_labels: int | None = None) -> None:
    """A record's fields for format `fmt` (names from the DataSection `cfg`): present, of the right
    type, non-empty where training needs text; an error names `where` (the record) and the field."""
    def text(field: str, may_be_empty: bool = False) -> None:
        if field not in record:
            raise LowraxError(f"{where}: field {field!r} is missing (its fields: {', '.join(map(str, record))})")
        value = record[field]
        if not isinstance(value, str) or not (value.strip() or may_be_empty):
            raise LowraxError(f"{where}: field {field!r} must be {'a' if may_be_empty else 'a non-empty'} string, got "
                              f"{shown(value)}")

    if fmt == "prompt_response":
        text(cfg.prompt_field, may_be_empty=True)
        text(cfg.response_field)
    elif fmt == "messages":
        check_messages(record.get(cfg.messages_field), f"{where}: field {cfg.messages_field!r}", needs_reply=True)
    elif fmt == "seq2seq":
        text(cfg.input_field)
        text(cfg.target_field)
    elif fmt in ("text", "classification"):
        text(cfg.text_field)
    if fmt in ("classification", "image_classification"):
        label = record.get(cfg.label_field)
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0 or (
                num_labels is not None and label >= num_labels):
            span = f"0..{num_labels - 1} (model.num_labels={num_labels})" if num_labels else "0, 1, 2, ..."
            raise LowraxError(f"{where}: field {cfg.label_field!r} must be an integer class in {span}, got "
                              f"{shown(label)}")


def check_messages(messages, where: str, needs_reply: bool) -> None:
    """A chat: a list of {"role": one of ROLES, "content": string}, with an assistant turn to train on."""
    if not isinstance(messages, list) or not messages:
        raise LowraxError(f"{where} must be a non-empty list of {{\"role\", \"content\"}} messages, got "
                          f"{shown(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise LowraxError(f"{where}, message {i + 1}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": "
                              f"a string}}, got {shown(message)}")
    if needs_reply and not any(m["role"] == "assistant" for m in messages):
        raise LowraxError(f"{where} has no assistant message: nothing to train on")

