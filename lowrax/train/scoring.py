"""The task metric a run reports before and after training.

Exact match of greedy generations for prompt/response data (and seq2seq
input/target data), accuracy for classification. Scoring a causal LM generates for every held-out prompt (tens
of seconds on a CPU), so it shows a progress bar.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lowrax.models.generate import generate_ids
from lowrax.train.config import TrainConfig
from lowrax.train.data import by_length, data_task, detect_format, encode_all, prompt_ids, seq2seq_fields
from lowrax.objectives.logps import classifier_logits
from lowrax.train.default_task import exact_match

GENERATION_BATCH = 16


def covered(scored: int, held_out: int) -> str:
    """How many held-out examples a metric scores: "64", or "the first 64 of 200 (train.eval_examples)"."""
    return str(scored) if scored == held_out else f"the first {scored} of {held_out} (train.eval_examples)"


class TaskScorer:
    """The task metric: exact match of greedy generations (prompt/response data) or accuracy (classification)."""

    def __init__(self, model, tokenizer, records, cfg: TrainConfig, progress: bool = True):
        self.model, self.tokenizer, self.cfg, self.progress = model, tokenizer, cfg, progress
        self.records = records[: cfg.train.eval_examples]
        self.held_out = len(records)  # the log says when the metric covers only the first eval_examples
        d = cfg.data
        self.kind = None
        self._predict = None  # the compiled classifier, built at the first accuracy
        self.measured_accuracy: float | None = None  # set by the held-out loss's pass over the same examples
        # (the record field generation starts from, the field holding the reference output)
        self.fields = (d.prompt_field, d.response_field)
        if self.records and cfg.model.task == "seq2seq":
            self.fields = seq2seq_fields(detect_format(self.records[0], d, "seq2seq"), d)
        if self.records and cfg.model.task == "classification":
            self.kind = "accuracy"
        elif self.records and all(f in self.records[0] for f in self.fields):
            self.kind = "exact_match"

    def covered(self) -> str:
        return covered(len(self.records), self.held_out)

    def generations(self, params, records, desc: str = "generating") -> list[str]:
        tok, d = self.tokenizer, self.cfg.data
        if self.cfg.model.task == "seq2seq":  # the encoder's input, as training encodes it
            prompts = [list(tok(r[self.fields[0]])["input_ids"]) for r in records]
        else:
            prompts = [prompt_ids(tok, r, d) for r in records]
        stops = [tok.eos_token_id] + [i for i in tok("\n", add_special_tokens=False)["input_ids"][-1:]]
        outs = []
        with tqdm(total=len(prompts), desc=desc, unit="example", disable=not self.progress, leave=False) as bar:
            for start in range(0, len(prompts), GENERATION_BATCH):
                chunk = prompts[start: start + GENERATION_BATCH]
                outs += generate_ids(self.model, params, chunk, self.cfg.train.eval_max_new_tokens,
                                     eos_token_ids=stops, pad_token_id=tok.pad_token_id or 0)
                bar.update(len(chunk))
        return [tok.decode(o, skip_special_tokens=True) for o in outs]

    def score(self, params, when: str = "") -> float | None:
        if self.kind == "exact_match":
            predictions = self.generations(params, self.records, f"scoring {when}".strip())
            return exact_match(predictions, [r[self.fields[1]] for r in self.records])
        if self.kind == "accuracy":
            measured, self.measured_accuracy = self.measured_accuracy, None  # good for one score
            return measured if measured is not None else self.accuracy(params, when)
        return None

    def accuracy(self, params, when: str = "") -> float:
        """The share of held-out examples whose highest logit is their label. Examples run shortest
        first, in batches of GENERATION_BATCH padded to the next power of two of their longest row (at
        least 16 tokens): a handful of compiled shapes, and no work on padding a short set never needs."""
        enc = encode_all(self.tokenizer, self.records, self.cfg.data, data_task(self.model, "classification"))
        if self._predict is None:
            model = self.model
            self._predict = jax.jit(lambda params, batch: jnp.argmax(classifier_logits(model, params, batch), -1))
        correct = 0
        with tqdm(total=len(enc.ids), desc=f"scoring {when}".strip(), unit="example", disable=not self.progress,
                  leave=False) as bar:
            for batch, real in by_length(enc, GENERATION_BATCH, self.cfg.data.seq_len):  # in chunks: images take memory
                predicted = np.asarray(self._predict(params, {k: jnp.asarray(v) for k, v in batch.items()}))
                correct += int(np.sum(predicted[:real] == batch["labels"][:real]))
                bar.update(real)
        return correct / max(len(enc.ids), 1)


def score_run(scorer: TaskScorer, params, cfg: TrainConfig, log, when: str, primary: bool) -> dict:
    """The task metric and sample generations `before` or `after` training (process 0 only:
    it works on a host-local copy, so the others need not take part)."""
    out: dict = {}
    if not primary:
        return out
    if scorer.kind:
        out[f"metric_{when}"] = scorer.score(params, f"{when} training")
        log(f"{scorer.kind} {when} training: {out[f'metric_{when}']:.3f} on {scorer.covered()} held-out examples"
            + (" (greedy output equal to the reference)" if scorer.kind == "exact_match" else ""))
    if scorer.kind == "exact_match" and cfg.train.samples and not cfg.train.quick:
        out[f"samples_{when}"] = _samples(scorer, params, cfg.train.samples, log, when)
    return out


def _samples(scorer: TaskScorer, params, n: int, log, when: str) -> list[dict]:
    records = scorer.records[:n]
    outs = scorer.generations(params, records, f"samples {when} training")
    samples = [{"prompt": r[scorer.fields[0]], "output": o} for r, o in zip(records, outs)]
    log(f"held-out prompts and the model's greedy output {when} training:")
    for s in samples:
        log(f"  [{when}] {s['prompt']!r} -> {s['output']!r}")
    return samples
