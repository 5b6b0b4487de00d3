"""`run_training(cfg)`: the fine-tune behind `lowrax train`.

Loads the base, wraps it with LoRA, trains with the one jitted step, scores
the task before and after, and writes to `train.output_dir`:

    config.yaml        the resolved configuration (a resume must match it, except RESUMABLE keys such as train.steps)
    checkpoints/       orbax checkpoints (adapters + optimizer state + step + RNG + data position)
    adapter/           the adapter in PEFT format (adapter_model.safetensors + adapter_config.json)
    metrics.jsonl      one JSON line per step (loss, grad norm, tokens/s) and per evaluation
    loss.png           the loss curve
    summary.json       task metric before/after, sizes, timings (of every session of the run, and of this command)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from lowrax.adapters.tree import combine, count_params, count_trained, split
from lowrax.adapters.wrap import adapter_nodes
from lowrax.core.atomic import MARKER, write_text
from lowrax.core.run_lock import lock_run_directory
from lowrax.dist.parallel import global_batch, host_local, initialize_distributed, is_primary, sharded_train_step
from lowrax.dist.sharding import check_batch, make_mesh
from lowrax.errors import LowraxError, NonFiniteError
from lowrax.models.pretrained import base_model_name, load_preprocessor
from lowrax.peft.format import save_peft
from lowrax.train.build import build_model, calibrated_params
from lowrax.train.checkpoints import Checkpoints, directory_size
from lowrax.train.config import TrainConfig, differences, with_steps
from lowrax.train.data import data_task, load_records, planned_trim_widths, trimmed, with_num_labels
from lowrax.train.metrics_log import MetricsLog, plot_losses
from lowrax.train.objective_runs import ObjectiveRun, RunContext, objective_records, objective_run, stacked
from lowrax.train.host_memory import peak_host_memory_mb, release_freed_host_memory
from lowrax.train.optim import make_optimizer
from lowrax.train.step import init_state

SKIP_LIMIT = 20  # train.nonfinite=skip: this many skipped steps in a row stop the run (nothing left to learn from)


def _check_output_dir(out: Path, cfg: TrainConfig) -> None:
    saved_path = out / "config.yaml"
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text())
        changed = differences(saved, cfg.to_dict())
        if changed:
            raise LowraxError(
                f"{out} holds a run with a different configuration ({', '.join(changed)}); "
                "use a new train.output_dir or the same settings to resume"
            )
        if not cfg.train.resume and (out / "checkpoints").exists():
            raise LowraxError(f"{out} already holds checkpoints and train.resume=false; use a new train.output_dir")


def finished_run(out: Path, cfg: TrainConfig) -> dict | None:
    """The summary of a run in `out` that has already trained to `train.steps` (None otherwise).

    A finished run is left as it is: rerunning its command must not replace its record.
    Its summary (written last) must reach `train.steps` and be at least as new as the newest
    checkpoint; a run whose last save was not followed by a summary (a crash) is finished again
    instead. A run with train.save_every=0 has no checkpoint: its summary alone says it finished.
    """
    summary_path = out / "summary.json"
    if not (cfg.train.resume and summary_path.exists()) or cfg.train.steps == 0:
        return None
    ckpts = Checkpoints(out / "checkpoints")
    latest = ckpts.latest_step()
    ckpts.close()
    summary = json.loads(summary_path.read_text())
    steps = summary.get("steps", latest)
    if steps is None or steps < cfg.train.steps or (latest is not None and latest > steps):
        return None
    return summary


def run_training(cfg: TrainConfig, progress: bool = True, log=print, started: float | None = None) -> dict:
    """Fine-tune per `cfg`; returns the summary also written to summary.json.

    Into a directory with a checkpoint, training resumes from it (up to a larger
    `train.steps` too); a run already at `train.steps` is reported and left intact.
    `started`: when the command began (`time.perf_counter()`), for `command_wall_seconds`.

    On a mesh of several devices, or in several processes (`dist`), the same code runs:
    parameters are loaded into their shards and the one step is jitted with explicit
    shardings. Process 0 writes the run's files; every process writes its checkpoint shards.
    """
    started = time.perf_counter() if started is None else started
    initialize_distributed(cfg.dist)  # before any other JAX call; a no-op for one process
    primary = is_primary()
    if not primary:
        progress, log = False, (lambda *_: None)
    out = Path(cfg.train.output_dir)
    train_records, eval_records = load_records(cfg.data)  # a bad data source fails before the model loads
    cfg = with_num_labels(cfg, train_records)
    lock = lock_run_directory(out) if primary else None  # one process per run directory
    if lock is not None and lock.killed_pid is not None:
        log(f"note: the previous lowrax process in {out} (pid {lock.killed_pid}) ended without finishing: it was "
            "killed, or the machine stopped (the out-of-memory killer leaves no message of its own: `dmesg` or the "
            "system log says whether it struck); this run continues from the newest checkpoint")
    try:
        return _train_in(out, cfg, (train_records, eval_records), primary, progress, log, started)
    finally:
        if lock is not None:
            lock.release()


def _train_in(out: Path, cfg: TrainConfig, records: tuple, primary: bool, progress: bool, log, started: float) -> dict:
    _check_output_dir(out, cfg)
    train_records, eval_records = records
    finished = finished_run(out, cfg)
    if finished is not None:
        log(f"{out} holds a finished run (step {finished.get('steps', cfg.train.steps)} of train.steps="
            f"{cfg.train.steps}); its summary.json and adapter are kept. Raise train.steps to train further, "
            "or use a new train.output_dir.")
        return {**finished, "already_finished": True}
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.batch_size, mesh)
    train_records, eval_records = objective_records(cfg, train_records, eval_records)
    model, base, params = build_model(cfg, mesh, run_dir=out)
    tokenizer = load_preprocessor(cfg.model.path, model)  # or an image model's ImageProcessor
    release_freed_host_memory()  # the loaders' transient copies
    ctx = RunContext(cfg, model, params, tokenizer, data_task(model, cfg.model.task), train_records, eval_records,
                     mesh, primary, progress, log)
    objective = objective_run(ctx)
    if params is None:  # a LoRA init that needs data: calibrated on the run's own first batches
        ctx.params = calibrated_params(cfg, model, base, objective.batches, out, primary, progress, log)
    del base
    if cfg.train.epochs is not None:
        ctx.cfg = with_epoch_steps(cfg, objective.batches.rows_per_epoch, log)
    if ctx.cfg.train.steps == 0:
        return score_only(ctx, objective, out, started)
    run = TrainingRun(ctx, objective, out)
    run.start()
    run.train(started)
    return run.finish(started)


def score_only(ctx: RunContext, objective: ObjectiveRun, out: Path, started: float) -> dict:
    """train.steps=0: the held-out loss and task metric of the model as training would start it (the base
    with its adapters as initialised, most of which start as the identity; a classification head starts
    random), written to summary.json; no checkpoint, adapter or loss curve."""
    cfg = ctx.cfg
    trainable, frozen = split(ctx.params)
    ctx.log("train.steps=0: scoring the model as training would start it; nothing is trained or saved but "
            "config.yaml and summary.json")
    scores = objective.score_start(trainable, frozen)
    summary = {"model": cfg.model.path or "embedded SmolLM2-135M-Instruct", "task": ctx.task,
               "objective": cfg.objective, "metric": objective.metric, "steps": 0, **scores,
               "command_wall_seconds": time.perf_counter() - started}
    if ctx.primary:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def with_epoch_steps(cfg: TrainConfig, rows_per_epoch: int, log) -> TrainConfig:
    """cfg with train.steps set by train.epochs (and the schedule's length with it, unless set apart)."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum_steps
    steps = -(-cfg.train.epochs * rows_per_epoch // per_step)
    log(f"train.epochs={cfg.train.epochs}: {steps} steps ({rows_per_epoch} rows per epoch, {per_step} per step)")
    return with_steps(cfg, steps)


class TrainingRun:
    """One `lowrax train` session: the compiled step, its state, checkpoints, metrics and summary."""

    def __init__(self, ctx: RunContext, objective: ObjectiveRun, out: Path):
        cfg = ctx.cfg
        self.ctx, self.objective, self.out, self.cfg = ctx, objective, out, cfg
        trainable, frozen = split(ctx.params)
        # The step donates the adapters' buffers; PiSSA's export needs them as initialised.
        needs_initial = any(n.exports_from_initial for n in adapter_nodes(ctx.params).values())
        self.initial_trainable = jax.tree.map(jnp.copy, trainable) if needs_initial else None
        optimizer = make_optimizer(cfg.optim)
        self.step_fn, self.state, self.frozen = sharded_train_step(
            ctx.model, optimizer, ctx.mesh, init_state(trainable, optimizer, cfg.train.seed), frozen,
            grad_accum_steps=cfg.train.grad_accum_steps, remat=cfg.train.remat, loss_fn=objective.loss_fn,
            skip_nonfinite=cfg.train.nonfinite == "skip", model_dropout=cfg.train.model_dropout, **objective.step_args)
        ctx.params = None  # the step owns the arrays now
        if ctx.primary:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.ckpts = Checkpoints(out / "checkpoints", cfg.train.max_checkpoints)
        self.metrics = MetricsLog(out / "metrics.jsonl", ctx.primary)
        self.summary: dict = {
            "model": cfg.model.path or "embedded SmolLM2-135M-Instruct", "task": ctx.task, "objective": cfg.objective,
            "trainable_params": count_trained(trainable), "total_params": count_params(ctx.model.param_shapes()),
            "metric": objective.metric, "mesh": dict(ctx.mesh.shape), "processes": jax.process_count()}
        self.start_step, self.before, self.skipped_in_a_row = 0, {}, 0
        self.trim_widths: list[int] | None = None  # planned when training starts
        self.so_far = {"train_seconds": 0.0, "real_tokens": 0, "loss": None}  # earlier sessions of the run

    def start(self) -> None:
        """Resume from the latest checkpoint, or score what a fresh run starts from."""
        restored = self.ckpts.restore_newest_intact(self.state, self.ctx.log) if self.cfg.train.resume else None
        if restored is not None:
            latest, self.state, meta = restored
            self.start_step = int(meta["step"])
            self.before = meta.get("summary", {})
            self.so_far.update(meta.get("progress", {}))
            origin = f" (imported from {meta['imported_from']})" if "imported_from" in meta else ""
            self.ctx.log(f"resumed from {self.out / 'checkpoints' / str(latest)} at step {self.start_step}{origin}")
        elif (self.out / "summary.json").exists() and not self.cfg.train.save_every:
            self.ctx.log(f"note: {self.out} holds an earlier run but no checkpoint to continue from "
                         "(train.save_every=0): training starts over from step 0")
        self.metrics.truncate(self.start_step)  # later lines will be recomputed identically
        if self.start_step == 0 and not self.before and not self.cfg.train.quick:
            # A fresh run, or an imported adapter: every process takes part, process 0 scores.
            self.before = self.objective.score_start(self.state.trainable, self.frozen)
            release_freed_host_memory()  # the scoring programs' compilation
        self.objective.on_training_start()
        self.summary.update(self.before)

    PLANNED_STEPS = 4096  # a longer run's widths are planned from this many steps spread over it

    def planned_widths(self) -> list[int] | None:
        """The widths training batches are cut to (`data.planned_trim_widths`) from the longest row of the
        run's steps, or None (a quarter, a half and all of seq_len) when the batches cannot tell it ahead."""
        batches, accum = self.objective.batches, self.cfg.train.grad_accum_steps
        if not hasattr(batches, "longest") or self.start_step >= self.cfg.train.steps:
            return None
        steps = np.unique(np.linspace(self.start_step, self.cfg.train.steps - 1, self.PLANNED_STEPS).astype(int))
        longest = [max(batches.longest(int(step) * accum + i) or 0 for i in range(accum)) for step in steps]
        return None if not all(longest) else planned_trim_widths(longest, batches.seq_len)

    def batch_for(self, step: int) -> tuple[dict, int, dict]:
        """The step's batch on the mesh, its count of real (non-padding) tokens, and what to log of it."""
        accum = self.cfg.train.grad_accum_steps
        micro = [self.objective.batches.batch(step * accum + i) for i in range(accum)]
        micro, logged = self.objective.prepare(micro, self.state, self.frozen, step)
        if self.cfg.data.trim_padding:
            micro = trimmed(micro, self.trim_widths)
        batch = stacked(micro, accum)
        return global_batch(self.ctx.mesh, batch, accum > 1), count_real_tokens(batch), logged

    def train(self, started: float | None = None) -> None:
        """Steps from where the run stands to train.steps; `started` (the command's start, perf_counter)
        dates the first step's end as `seconds_to_first_step` in the summary."""
        cfg = self.cfg
        bar = tqdm(range(self.start_step, cfg.train.steps), desc="training", unit="step", disable=not self.ctx.progress,
                   initial=self.start_step, total=cfg.train.steps)
        # Training time excludes checkpoint saves, so a checkpoint's record equals the final one.
        self.train_start, self.saving, self.tokens_seen, self.loss = time.perf_counter(), 0.0, 0, self.so_far["loss"]
        self.trim_widths = self.planned_widths() if self.cfg.data.trim_padding else None
        shapes_seen = set()  # each new batch shape (a trimmed width) compiles the step again
        for step in bar:
            batch, real_tokens, logged = self.batch_for(step)
            t0 = time.perf_counter()
            self.state, m = self.step_fn(self.state, self.frozen, batch)
            shape = tuple(x.shape for x in jax.tree.leaves(batch))
            if shape not in shapes_seen:
                shapes_seen.add(shape)
                release_freed_host_memory()  # the compiler's freed heap, before the step's temporaries grow beside it
            self.loss = float(m["loss"])  # waits for the step: the progress bar and metrics.jsonl show every loss
            if step == self.start_step and started is not None:  # load, score, compile: the wait before training moves
                self.summary["seconds_to_first_step"] = time.perf_counter() - started
            grad_norm = float(m["grad_norm"])
            dt = time.perf_counter() - t0
            self.tokens_seen += real_tokens
            own = {k: float(v) for k, v in m.items() if k not in ("loss", "grad_norm", "tokens")}  # penalty, rewards/...
            self.metrics.write({"step": step + 1, "loss": finite_or_none(self.loss), "grad_norm": finite_or_none(grad_norm),
                                "tokens": real_tokens, "tokens_per_s": real_tokens / dt, **own, **logged})
            self.check_health(step + 1, grad_norm, own.get("skipped", 0.0))
            shown = {k: f"{logged[k]:.3f}" for k in self.objective.shown if logged.get(k) is not None}
            bar.set_postfix(loss=f"{self.loss:.4f}", **shown, tok_s=f"{real_tokens / dt:.0f}")
            done = step + 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                self.metrics.write({"step": done, **self.objective.evaluate(self.state.trainable, self.frozen)})
            if cfg.train.save_every and (done % cfg.train.save_every == 0 or done == cfg.train.steps):
                self.save(done)
        bar.close()

    def check_health(self, done: int, grad_norm: float, skipped: float) -> None:
        """Stop on a non-finite loss or gradient (train.nonfinite=stop) before anything of it is saved; with
        train.nonfinite=skip, stop only when every one of the last SKIP_LIMIT steps was skipped."""
        if skipped:
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= SKIP_LIMIT:
                raise NonFiniteError(f"step {done}: the last {SKIP_LIMIT} steps all had a non-finite loss or gradient "
                                     f"and were skipped; {self.checkpoint_hint()}")
            return
        self.skipped_in_a_row = 0
        if not (math.isfinite(self.loss) and math.isfinite(grad_norm)):
            raise NonFiniteError(f"step {done}: the loss is {self.loss} and the gradient norm {grad_norm}; "
                                 f"{self.checkpoint_hint()} (lower optim.learning_rate, check the data and the "
                                 "base weights, or set train.nonfinite=skip to skip such steps)")

    def checkpoint_hint(self) -> str:
        latest = self.ckpts.latest_step()
        where = (f"the newest checkpoint, step {latest}, is kept ({self.out / 'checkpoints' / str(latest)})"
                 if latest is not None else "no checkpoint was written")
        return f"nothing of this step was saved, {where}"

    def save(self, done: int) -> None:
        """A checkpoint, with the run's record so far, so a resumed run reports all of it."""
        save_start = time.perf_counter()
        so_far = {"train_seconds": self.so_far["train_seconds"] + save_start - self.train_start - self.saving,
                  "real_tokens": self.so_far["real_tokens"] + self.tokens_seen, "loss": self.loss}
        self.ckpts.save(done, self.state, {"step": done, "examples_seen": done * self.cfg.train.grad_accum_steps
                                           * self.cfg.train.batch_size, "summary": self.before, "progress": so_far})
        self.saving += time.perf_counter() - save_start

    def finish(self, started: float) -> dict:
        """The summary after training; process 0 also writes the adapter, loss curve and summary.json."""
        cfg, ctx, summary = self.cfg, self.ctx, self.summary
        elapsed = time.perf_counter() - self.train_start - self.saving
        total_seconds = self.so_far["train_seconds"] + elapsed
        summary.update({
            "steps": max(cfg.train.steps, self.start_step),
            "train_seconds": total_seconds,  # every session of the run, resumed ones included
            "train_seconds_this_run": elapsed,
            "real_tokens_per_s": (self.so_far["real_tokens"] + self.tokens_seen) / total_seconds if total_seconds > 0 else None,
            "final_loss": self.loss,
            "checkpoint_bytes": self.ckpts.size(self.ckpts.latest_step()),
        })
        summary.update(self.objective.final_metrics(self.state.trainable, self.frozen, ctx.progress))
        release_freed_host_memory()
        # Gathered once, by every process, for scoring and the adapter file (a no-op in one process).
        trained, frozen, initial_trainable = host_local((self.state.trainable, self.frozen, self.initial_trainable))
        final = combine(trained, frozen)
        initial = combine(initial_trainable, frozen) if initial_trainable is not None else None
        self.ckpts.close()
        if not ctx.primary:
            return summary
        summary.update(self.objective.score_final(final))
        adopt_run_adapter(self.out / "adapter")
        adapter = save_peft(final, self.out / "adapter", ctx.model, base_model=base_model_name(cfg.model.path),
                            overwrite=True, initial=initial)
        summary["adapter_bytes"] = directory_size(adapter)
        plot_losses(self.metrics.rows(), self.out / "loss.png")
        summary["command_wall_seconds"] = time.perf_counter() - started  # load, score, train, score, save
        summary["peak_host_memory_mb"] = peak_host_memory_mb()  # this process's, so far: the run's whole command
        write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        checkpoint = (f"checkpoint {summary['checkpoint_bytes'] / 1e6:.1f} MB" if cfg.train.save_every
                      else "no checkpoint (train.save_every=0)")
        ctx.log(f"wrote {self.out}: adapter {summary['adapter_bytes'] / 1e6:.1f} MB, {checkpoint}")
        return summary


def count_real_tokens(batch: dict) -> int:
    """The batch's tokens that are not padding: attended tokens, a rollout's prompt and completion tokens, or
    an image batch's examples."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "completion_mask" in batch:
        return int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
    return int(batch["labels"].size)


def adopt_run_adapter(adapter_dir: Path) -> None:
    """A run's own `adapter/` is the run's to replace (the run holds the directory's lock), also when an
    older lowrax wrote it without the marker that `--overwrite` asks for elsewhere."""
    if adapter_dir.is_dir() and not (adapter_dir / MARKER).exists():
        (adapter_dir / MARKER).touch()


def finite_or_none(x: float) -> float | None:
    """metrics.jsonl holds strict JSON: a NaN or infinite value is written as null."""
    return x if math.isfinite(x) else None
