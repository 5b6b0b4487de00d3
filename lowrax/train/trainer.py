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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from lowrax.adapters.tree import combine, count_params, count_trained, split
from lowrax.adapters.wrap import adapter_nodes
from lowrax.models.pretrained import base_model_name, load_preprocessor
from lowrax.peft.format import save_peft
from lowrax.core.atomic import write_text
from lowrax.train.checkpoints import Checkpoints, directory_size
from lowrax.train.config import TrainConfig, differences
from lowrax.train.data import Batches, data_task, encode_all, load_records, loss_width, with_num_labels
from lowrax.train.scoring import TaskScorer, score_run
from lowrax.errors import LowraxError
from lowrax.train.optim import make_optimizer
from lowrax.dist.parallel import global_batch, host_local, initialize_distributed, is_primary, sharded_train_step
from lowrax.dist.sharding import TEACHER_RULES, check_batch, make_mesh
from lowrax.train.preference_run import PreferenceRun, preference_records
from lowrax.train.build import DTYPES, build_model
from lowrax.train.step import init_state, task_loss
from lowrax.train.on_policy import is_on_policy_step, with_student_completions
from lowrax.train.teacher import load_teacher
from lowrax.train.teacher_logits import WithTeacherLogits, teacher_logits_store
from lowrax.objectives.config import PREFERENCE
from lowrax.objectives.step_losses import classifier_distill_objective, distill_objective

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


def _plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finished_run(out: Path, cfg: TrainConfig) -> dict | None:
    """The summary of a run in `out` that has already trained to `train.steps` (None otherwise).

    A finished run is left as it is: rerunning its command must not replace its record.
    Its summary must exist and describe the newest checkpoint; a run whose last save
    was not followed by a summary (a crash) is finished again instead.
    """
    summary_path, ckpt_dir = out / "summary.json", out / "checkpoints"
    if not (cfg.train.resume and summary_path.exists() and ckpt_dir.exists()):
        return None
    ckpts = Checkpoints(ckpt_dir)
    latest = ckpts.latest_step()
    ckpts.close()
    if latest is None or latest < cfg.train.steps:
        return None
    summary = json.loads(summary_path.read_text())
    return summary if summary.get("steps", latest) == latest else None


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
    _check_output_dir(out, cfg)
    finished = finished_run(out, cfg)
    if finished is not None:
        log(f"{out} holds a finished run (step {finished.get('steps', cfg.train.steps)} of train.steps="
            f"{cfg.train.steps}); its summary.json and adapter are kept. Raise train.steps to train further, "
            "or use a new train.output_dir.")
        return {**finished, "already_finished": True}
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.batch_size, mesh)
    preference = cfg.objective in PREFERENCE
    if preference:
        train_records, eval_records = preference_records(cfg, train_records, eval_records)
    model, base, params = build_model(cfg, mesh)
    if cfg.objective == "distill" and model.is_image_model:
        raise LowraxError("objective 'distill' supports text models; distilling an image classifier is not implemented")
    # the text model's tokenizer, or an image model's ImageProcessor (what encode_all reads examples with)
    tokenizer = load_preprocessor(cfg.model.path, model)
    task = data_task(model, cfg.model.task)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    teacher = None  # distillation: (model, merged params, description)
    if preference:
        run = PreferenceRun(cfg, model, tokenizer, train_records, eval_records, mesh)
        batches, loss_fn, eval_data = run, run.loss_fn, None
        if run.precomputed:  # from the initial tree: a base that training moves (Delta-LoRA) is still W0 here
            run.precompute_reference(params, progress)
    else:
        train_data = encode_all(tokenizer, train_records, cfg.data, task)
        eval_data = encode_all(tokenizer, eval_records, cfg.data, task)
        width = cfg.data.loss_positions if task == "causal_lm" else 0
        if cfg.objective == "distill":
            teacher = load_teacher(cfg, tokenizer, DTYPES[cfg.model.dtype], mesh)
            log(f"teacher: {teacher[2]}")
            if task == "causal_lm":  # teacher logits at the completions (or the student's own, on-policy) only
                width = width or loss_width((sum(m) for m in train_data.targets), cfg.data.seq_len)
                if cfg.distill.on_policy:
                    width = min(max(width, cfg.distill.generation_tokens), cfg.data.seq_len - 1)
        batches = Batches(train_data, cfg.data.seq_len, cfg.train.batch_size, cfg.data.shuffle_seed, cfg.data.packing,
                          pad, width, cfg.data.target_len)
        distill = distill_objective if task == "causal_lm" else classifier_distill_objective
        loss_fn = distill(cfg.distill, teacher[0]) if teacher else None
        if teacher and cfg.distill.teacher_logits:  # computed once, read by the steps: no teacher in the step
            if task != "causal_lm":
                raise LowraxError("distill.teacher_logits stores a causal LM's logits; classifier distillation "
                                  "runs its teacher in the step")
            stored = teacher_logits_store(cfg.distill.teacher_logits, train_data, cfg.data.seq_len, width,
                                          teacher[0], teacher[1], teacher[2], progress, log)
            batches, loss_fn = WithTeacherLogits(batches, stored), distill_objective(cfg.distill)

    trainable, frozen = split(params)
    # The step donates the adapters' buffers; PiSSA's export needs them as initialised.
    needs_initial = any(n.exports_from_initial for n in adapter_nodes(params).values())
    initial_trainable = jax.tree.map(jnp.copy, trainable) if needs_initial else None
    optimizer = make_optimizer(cfg.optim)
    accum = cfg.train.grad_accum_steps
    in_step = teacher and not cfg.distill.teacher_logits
    teacher_args = {"teacher": teacher[1], "teacher_model": teacher[0],
                    "teacher_rules": TEACHER_RULES if cfg.distill.teacher_sharding == "data" else None} if in_step else {}
    step_fn, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer, cfg.train.seed),
                                                frozen, grad_accum_steps=accum, remat=cfg.train.remat, loss_fn=loss_fn,
                                                **teacher_args)

    if primary:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ckpts = Checkpoints(out / "checkpoints", cfg.train.max_checkpoints)
    scorer = TaskScorer(model, tokenizer, [] if preference else eval_records, cfg, progress)
    metric = "preference_accuracy" if preference and run.eval_pairs else scorer.kind
    summary: dict = {"model": cfg.model.path or "embedded SmolLM2-135M-Instruct", "task": task,
                     "objective": cfg.objective, "trainable_params": count_trained(trainable),
                     "total_params": count_params(model.param_shapes()), "metric": metric,
                     "mesh": dict(mesh.shape), "processes": jax.process_count()}
    metrics = MetricsLog(out / "metrics.jsonl", primary)
    start_step, before = 0, {}
    progress_so_far = {"train_seconds": 0.0, "real_tokens": 0, "loss": None}
    latest = ckpts.latest_step() if cfg.train.resume else None
    if latest is not None:
        state, meta = ckpts.restore(latest, state)
        start_step = int(meta["step"])
        before = meta.get("summary", {})
        progress_so_far.update(meta.get("progress", {}))
        origin = f" (imported from {meta['imported_from']})" if "imported_from" in meta else ""
        log(f"resumed from {out / 'checkpoints' / str(latest)} at step {start_step}{origin}")
        metrics.truncate(start_step)  # later lines will be recomputed identically
    else:
        metrics.truncate(0)
    if metric and start_step == 0 and not before:
        # A fresh run, or an imported adapter: score what training starts from.
        # Every process takes part in the gather; process 0 scores.
        if preference:
            before = preference_score(run, state.trainable, frozen, log, "before", progress)
        else:
            before = score_run(scorer, host_local(combine(state.trainable, frozen)), cfg, log, "before", primary)
        if teacher and scorer.kind and primary:  # what the student is distilled toward
            before["teacher_metric"] = scorer.score(host_local(teacher[1]), "the teacher")
            log(f"{scorer.kind} of the teacher: {before['teacher_metric']:.3f}")
    if teacher and not in_step:
        teacher = (teacher[0], None, teacher[2])  # its logits are stored: the weights need not stay in memory
    summary.update(before)

    def batch_for(step: int, state) -> tuple[dict, int, dict]:
        """The step's batch on the mesh, its count of real (non-padding) tokens, and what to log of it."""
        micro = [batches.batch(step * accum + i) for i in range(accum)]  # Batches or a PreferenceRun
        on_policy = bool(teacher) and is_on_policy_step(cfg.distill.on_policy, cfg.train.seed, step)
        if on_policy:
            student = host_local(combine(state.trainable, frozen))
            micro = [with_student_completions(model, student, m, max_new_tokens=cfg.distill.generation_tokens,
                                              temperature=cfg.distill.generation_temperature,
                                              eos_token_id=tokenizer.eos_token_id, pad_id=pad,
                                              seed=cfg.train.seed * 1_000_003 + step * accum + i)
                     for i, m in enumerate(micro)]
        stacked = {k: np.stack([m[k] for m in micro]) for k in micro[0]} if accum > 1 else micro[0]
        logged = {"on_policy": int(on_policy)} if teacher and cfg.distill.on_policy else {}
        real = stacked["attention_mask"].sum() if "attention_mask" in stacked else stacked["labels"].size  # images
        return global_batch(mesh, stacked, accum > 1), int(real), logged

    evaluate = run.evaluate if preference else EvalLoss(model, eval_data, cfg, pad, mesh)

    bar = tqdm(range(start_step, cfg.train.steps), desc="training", unit="step", disable=not progress,
               initial=start_step, total=cfg.train.steps)
    # Training time excludes checkpoint saves, so a checkpoint's record equals the final one.
    train_start, saving, tokens_seen, loss = time.perf_counter(), 0.0, 0, progress_so_far["loss"]
    for step in bar:
        batch, real_tokens, logged = batch_for(step, state)
        t0 = time.perf_counter()
        state, m = step_fn(state, frozen, batch)
        loss = float(m["loss"])  # waits for the step: the progress bar and metrics.jsonl show every loss
        dt = time.perf_counter() - t0
        tokens_seen += real_tokens
        own = {k: float(v) for k, v in m.items() if k not in ("loss", "grad_norm", "tokens")}  # penalty, rewards/...
        metrics.write({"step": step + 1, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens": real_tokens,
                       "tokens_per_s": real_tokens / dt, **own, **logged})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{real_tokens / dt:.0f}")
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0:
            measured = evaluate(state.trainable, frozen)
            metrics.write({"step": done, **(measured if preference else {"eval_loss": measured})})
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == cfg.train.steps:
            # The run's record so far travels with the checkpoint, so a resumed run reports all of it.
            save_start = time.perf_counter()
            so_far = {"train_seconds": progress_so_far["train_seconds"] + save_start - train_start - saving,
                      "real_tokens": progress_so_far["real_tokens"] + tokens_seen, "loss": loss}
            ckpts.save(done, state, {"step": done, "examples_seen": done * accum * cfg.train.batch_size,
                                     "summary": before, "progress": so_far})
            saving += time.perf_counter() - save_start
    bar.close()
    elapsed = time.perf_counter() - train_start - saving
    total_seconds = progress_so_far["train_seconds"] + elapsed
    total_tokens = progress_so_far["real_tokens"] + tokens_seen
    summary.update({
        "steps": max(cfg.train.steps, start_step),
        "train_seconds": total_seconds,  # every session of the run, resumed ones included
        "train_seconds_this_run": elapsed,
        "real_tokens_per_s": total_tokens / total_seconds if total_seconds > 0 else None,
        "final_loss": loss,
        "checkpoint_bytes": ckpts.size(ckpts.latest_step()),
    })
    if preference:
        summary.update(preference_score(run, state.trainable, frozen, log, "after", progress))
    elif eval_data.ids:
        summary["eval_loss"] = evaluate(state.trainable, frozen, progress=progress)
    # Gathered once, by every process, for scoring and the adapter file (a no-op in one process).
    trained, frozen_local, initial_trainable = host_local((state.trainable, frozen, initial_trainable))
    final = combine(trained, frozen_local)
    initial = combine(initial_trainable, frozen_local) if initial_trainable is not None else None
    ckpts.close()
    if not primary:
        return summary
    summary.update(score_run(scorer, final, cfg, log, "after", primary))
    adapter = save_peft(final, out / "adapter", model, base_model=base_model_name(cfg.model.path), overwrite=True,
                        initial=initial)
    summary["adapter_bytes"] = directory_size(adapter)
    _plot_losses(metrics.rows(), out / "loss.png")
    summary["command_wall_seconds"] = time.perf_counter() - started  # load, score, train, score, save
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out}: adapter {summary['adapter_bytes'] / 1e6:.1f} MB, checkpoint {summary['checkpoint_bytes'] / 1e6:.1f} MB")
    return summary


def preference_score(run: PreferenceRun, trainable, frozen, log, when: str, progress: bool) -> dict:
    """Held-out preference metrics `before` or `after` training, as summary entries."""
    measured = run.evaluate(trainable, frozen, progress)
    if not measured:
        return {}
    log(f"preference accuracy {when} training: {measured['preference_accuracy']:.3f} on {len(run.eval_pairs)} "
        "held-out pairs (the policy gives the chosen completion the higher mean token log-probability)")
    out = {f"metric_{when}": measured.pop("preference_accuracy")}
    return {**out, **{f"{k}_{when}": v for k, v in measured.items()}}


class MetricsLog:
    """metrics.jsonl: one JSON line per step or evaluation, written by process 0 only."""

    def __init__(self, path: Path, primary: bool):
        self.path, self.primary = path, primary

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def truncate(self, step: int) -> None:
        """Keep the lines up to `step` (0: none)."""
        if self.primary:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows() if 0 < r.get("step", 0) <= step))

    def write(self, row: dict) -> None:
        if self.primary:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


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
