"""Text for calibration and held-out perplexity, and the perplexity itself.

The embedded text set is the Python documentation every CPython carries
(`pydoc_data.topics`: 79 topics, about 465k characters of English prose and code): every
fourth topic in name order is held out for evaluation, the rest calibrate (and train a
recovery run). Nothing is downloaded. A text file (.txt) or a JSON-lines file (one record per
line, its `text_field`) can stand in for it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lowrax.errors import LowraxError

SPLITS = ("calibration", "heldout")


def embedded_texts(split: str) -> list[str]:
    """The embedded set's texts of one split ("calibration" or "heldout")."""
    if split not in SPLITS:
        raise LowraxError(f"text split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = split == "heldout"
    return [topics[name] for i, name in enumerate(names) if (i % 4 == 3) == held]


def embedded_records(split: str, piece_chars: int = 1000) -> list[dict]:
    """The embedded set's split as {"text"} records of whole paragraphs, about `piece_chars` each
    (training data for a recovery run)."""
    records = []
    for text in embedded_texts(split):
        piece = ""
        for paragraph in text.split("\n\n"):
            piece = f"{piece}\n\n{paragraph}" if piece else paragraph
            if len(piece) >= piece_chars:
                records.append({"text": piece})
                piece = ""
        if piece.strip():
            records.append({"text": piece})
    return records


def read_texts(source: str, split: str, text_field: str = "text") -> list[str]:
    """Texts from "embedded" (that split) or a .txt / .jsonl file (the whole file; `split` unused)."""
    if source == "embedded":
        return embedded_texts(split)
    path = Path(source)
    if not path.is_file():
        raise LowraxError(f"text source must be 'embedded', a .txt file or a .jsonl file; {source} is not a file")
    if path.suffix == ".txt":
        return [path.read_text()]
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)[text_field]))
            except (ValueError, KeyError, TypeError) as e:
                raise LowraxError(f"{path}:{number}: expected a JSON object with a {text_field!r} field ({e})") from e
        return texts
    raise LowraxError(f"text source {source}: expected a .txt or .jsonl file")


def token_windows(tokenizer, texts: list[str], rows: int, length: int) -> np.ndarray:
    """The first `rows` consecutive windows of `length` tokens [rows, length] of the texts
    joined end to end (an end-of-text token between them)."""
    if rows < 1 or length < 2:
        raise LowraxError(f"need at least one row of two tokens; got rows={rows}, length={length}")
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= rows * length:
            break
    if len(stream) < rows * length:
        raise LowraxError(f"the text holds {len(stream)} tokens, fewer than {rows} rows of {length}: "
                          "ask for fewer rows or shorter ones")
    return np.asarray(stream[: rows * length], np.int32).reshape(rows, length)


@functools.partial(jax.jit, static_argnums=0)
def _summed_nll(model, params, ids):
    from lowrax.objectives.logps import whole_sequence_nll

    return whole_sequence_nll(model, params, model.final_hidden(params, ids), ids, jnp.ones_like(ids))


def perplexity(model, params, ids: np.ndarray, batch_rows: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) of a causal LM over ids [rows, length]."""
    total, count = 0.0, 0.0
    for start in range(0, ids.shape[0], batch_rows):
        nll, tokens = _summed_nll(model, params, jnp.asarray(ids[start:start + batch_rows]))
        total, count = total + float(nll), count + float(tokens)
    return float(np.exp(total / count))
