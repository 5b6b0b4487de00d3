"""What each training objective brings to a `lowrax train` run, looked up by name.

An objective's setup turns the run's context (config, model, preprocessor, records, mesh)
into an `ObjectiveRun`: the batches the steps read, the loss the step minimises, the
held-out evaluation, the task metric before and after training, and what the step needs
beside the trained tree (a distillation teacher). The trainer (lowrax.train.trainer) runs
the same pipeline for every objective and names none of them; a new objective registers
a setup here (and its name and sections in lowrax.objectives.registry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lowrax.adapters.tree import combine
from lowrax.core.registry import Registry
from lowrax.dist.parallel import host_local
from lowrax.dist.sharding import TEACHER_RULES
from lowrax.errors import LowraxError
from lowrax.objectives.registry import objective_named, objective_names
from lowrax.objectives.step_losses import classifier_distill_objective, distill_objective
from lowrax.train.build import DTYPES
from lowrax.train.config import TrainConfig
from lowrax.train.data import Batches, encode_all, loss_width
from lowrax.train.eval_loss import EvalLoss
from lowrax.train.grpo_run import GRPORun, grpo_records
from lowrax.train.on_policy import is_on_policy_step, with_student_completions
from lowrax.train.preference_run import PreferenceRun, preference_records
from lowrax.train.scoring import TaskScorer, covered, score_run
from lowrax.train.teacher import load_teacher
from lowrax.train.teacher_logits import WithTeacherLogits, teacher_logits_store


@dataclass
class RunContext:
    """What every objective's setup may read."""

    cfg: TrainConfig
    model: Any
    params: Any  # the wrapped tree as initialised (before the step donates its buffers)
    tokenizer: Any  # a tokenizer, or an image model's ImageProcessor
    task: str  # the data task: causal_lm, classification, image_classification, seq2seq
    train_records: list
    eval_records: list
    mesh: Any
    primary: bool
    progress: bool
    log: Callable[[str], None]

    @property
    def pad(self) -> int:
        return getattr(self.tokenizer, "pad_token_id", None) or 0


@dataclass
class ObjectiveRun:
    """One objective's part of a run.

    batches.batch(i) -> the i-th micro-batch (host numpy arrays).
    loss_fn: the step's loss (None: the task's own, `lowrax.train.step.task_loss`).
    evaluate(trainable, frozen, progress=False) -> {metric: value}: held-out metrics during training.
    score_start(trainable, frozen) -> summary entries: the task metric training starts from
        (every process calls it; only process 0's entries are kept).
    final_metrics(trainable, frozen, progress) -> summary entries after training, every process.
    score_final(final) -> summary entries from the host-local trained tree, process 0 only.
    prepare(micro, state, frozen, step) -> (micro, logged): micro-batches rebuilt before a step
        (on-policy distillation), and what to log of it.
    step_args: keyword arguments of `sharded_train_step` (a distillation teacher).
    metric: the name of the task metric, or None when there is none to score.
    shown: entries of what `prepare` logs that the progress bar shows beside the loss (GRPO's reward).
    """

    batches: Any
    metric: str | None
    evaluate: Callable[..., dict]
    score_start: Callable[[Any, Any], dict]
    final_metrics: Callable[[Any, Any, bool], dict]
    score_final: Callable[[Any], dict]
    loss_fn: Callable | None = None
    prepare: Callable[[list, Any, Any, int], tuple[list, dict]] = lambda micro, state, frozen, step: (micro, {})
    step_args: dict = field(default_factory=dict)
    on_training_start: Callable[[], None] = lambda: None
    shown: tuple[str, ...] = ()


ObjectiveSetup = Callable[[RunContext], ObjectiveRun]
_SETUPS: Registry[ObjectiveSetup] = Registry("objective run setup", "objective {name!r} has no lowrax train setup; "
                                             "objectives that train: {names}")


def register_objective_run(name: str, setup: ObjectiveSetup) -> ObjectiveSetup:
    return _SETUPS.register(name, setup)


def objective_run(ctx: RunContext) -> ObjectiveRun:
    """The run's objective set up for this context."""
    return _SETUPS[ctx.cfg.objective](ctx)


def objective_records(cfg: TrainConfig, train: list, held_out: list) -> tuple[list, list]:
    """The records an objective trains on (the preference objectives' and GRPO's embedded defaults differ)."""
    section = objective_named(cfg.objective).section
    if section == "preference":
        return preference_records(cfg, train, held_out)
    return grpo_records(cfg, train, held_out) if section == "grpo" else (train, held_out)


# --- supervised fine-tuning (and the base of distillation) ---------------------------------------


def _encoded(ctx: RunContext, width_extra: Callable[[Any, int], int] | None = None):
    cfg = ctx.cfg
    labels = cfg.model.num_labels if ctx.task in ("classification", "image_classification") else None
    train_data = encode_all(ctx.tokenizer, ctx.train_records, cfg.data, ctx.task, "training", labels, ctx.log)
    eval_data = encode_all(ctx.tokenizer, ctx.eval_records, cfg.data, ctx.task, "evaluation", labels, ctx.log)
    width = cfg.data.loss_positions if ctx.task == "causal_lm" else 0
    if width_extra is not None:
        width = width_extra(train_data, width)
    batches = Batches(train_data, cfg.data.seq_len, cfg.train.batch_size, cfg.data.shuffle_seed, cfg.data.packing,
                      ctx.pad, width, cfg.data.target_len)
    return train_data, eval_data, batches, width


def _task_metric_run(ctx: RunContext, batches, eval_data, scorer: TaskScorer, **extra) -> ObjectiveRun:
    """An ObjectiveRun measured by the task's loss and metric (SFT, distillation)."""
    eval_loss = EvalLoss(ctx.model, eval_data, ctx.cfg, ctx.pad, ctx.mesh)

    def held_out_loss(trainable, frozen, when: str, progress: bool) -> dict:
        """The held-out loss (and, for token losses, perplexity), logged: what a text run is judged by."""
        if not eval_data.ids:
            return {}
        loss = eval_loss(trainable, frozen, progress=progress)
        if eval_loss.accuracy is not None and len(scorer.records) == len(eval_data.ids):  # the same examples
            scorer.measured_accuracy = eval_loss.accuracy
        perplexity = f" (perplexity {math.exp(min(loss, 700)):.2f})" if ctx.task in ("causal_lm", "seq2seq") else ""
        ctx.log(f"held-out loss {when} training: {loss:.4f}{perplexity} on {len(eval_data.ids)} examples")
        return {"eval_loss_before" if when == "before" else "eval_loss": loss}

    def task_metric_start(trainable, frozen):
        return score_run(scorer, host_local(combine(trainable, frozen)), ctx.cfg, ctx.log, "before", ctx.primary)

    metric_start = extra.pop("score_start", task_metric_start)  # distillation also scores its teacher

    def score_start(trainable, frozen):
        return {**held_out_loss(trainable, frozen, "before", ctx.progress), **metric_start(trainable, frozen)}

    def final_metrics(trainable, frozen, progress):
        return held_out_loss(trainable, frozen, "after", progress)

    return ObjectiveRun(batches=batches, metric=scorer.kind,
                        evaluate=lambda trainable, frozen, progress=False: {"eval_loss": eval_loss(trainable, frozen, progress)},
                        score_start=score_start, final_metrics=final_metrics,
                        score_final=lambda final: score_run(scorer, final, ctx.cfg, ctx.log, "after", ctx.primary),
                        **extra)


def _scorer(ctx: RunContext) -> TaskScorer:
    return TaskScorer(ctx.model, ctx.tokenizer, ctx.eval_records, ctx.cfg, ctx.progress)


def sft_run(ctx: RunContext) -> ObjectiveRun:
    _, eval_data, batches, _ = _encoded(ctx)
    return _task_metric_run(ctx, batches, eval_data, _scorer(ctx))


# --- preference objectives (dpo, orpo, simpo, kto) ---------------------------------------------


def preference_run(ctx: RunContext) -> ObjectiveRun:
    run = PreferenceRun(ctx.cfg, ctx.model, ctx.tokenizer, ctx.train_records, ctx.eval_records, ctx.mesh)
    if run.precomputed:  # from the initial tree: a base that training moves (Delta-LoRA) is still W0 here
        run.precompute_reference(ctx.params, ctx.progress)

    def score(when):
        return lambda trainable, frozen, progress=ctx.progress: preference_score(run, trainable, frozen, ctx.log, when,
                                                                                 progress)

    return ObjectiveRun(batches=run, loss_fn=run.loss_fn, metric="preference_accuracy" if run.eval_pairs else None,
                        evaluate=lambda trainable, frozen, progress=False: run.evaluate(trainable, frozen),
                        score_start=score("before"), final_metrics=score("after"), score_final=lambda final: {})


def preference_score(run: PreferenceRun, trainable, frozen, log, when: str, progress: bool) -> dict:
    """Held-out preference metrics `before` or `after` training, as summary entries."""
    measured = run.evaluate(trainable, frozen, progress)
    if not measured:
        return {}
    log(f"preference accuracy {when} training: {measured['preference_accuracy']:.3f} on "
        f"{covered(len(run.eval_pairs), run.held_out)} "
        "held-out pairs (the policy gives the chosen completion the higher mean token log-probability)")
    out = {f"metric_{when}": measured.pop("preference_accuracy")}
    return {**out, **{f"{k}_{when}": v for k, v in measured.items()}}


# --- reinforcement learning (grpo) -------------------------------------------------------------------


def grpo_run(ctx: RunContext) -> ObjectiveRun:
    """Rollouts sampled before each step (`GRPORun.prepare`), the held-out mean reward before and after."""
    run = GRPORun(ctx)

    def held_out(when):
        return lambda trainable, frozen, progress=ctx.progress: run.held_out(trainable, frozen, when, progress)

    def evaluate(trainable, frozen, progress=False):
        return {f"eval_{k}": v for k, v in run.evaluate(trainable, frozen, progress)[0].items()}

    return ObjectiveRun(batches=run.batches, loss_fn=run.loss_fn, metric="reward" if run.eval_prompts else None,
                        evaluate=evaluate, score_start=held_out("before"), final_metrics=held_out("after"),
                        score_final=lambda final: {}, prepare=run.prepare, shown=("reward",))


# --- distillation ----------------------------------------------------------------------------------


def distill_run(ctx: RunContext) -> ObjectiveRun:
    cfg, log = ctx.cfg, ctx.log
    if ctx.model.is_image_model:
        raise LowraxError("objective 'distill' supports text models; distilling an image classifier is not implemented")
    teacher_model, teacher_params, described = load_teacher(cfg, ctx.tokenizer, DTYPES[cfg.model.dtype], ctx.mesh)
    log(f"teacher: {described}")
    causal = ctx.task == "causal_lm"

    def completion_width(train_data, width):  # teacher logits at the completions (or the student's own) only
        if not causal:
            return width
        width = width or loss_width((sum(m) for m in train_data.targets), cfg.data.seq_len)
        return min(max(width, cfg.distill.generation_tokens), cfg.data.seq_len - 1) if cfg.distill.on_policy else width

    train_data, eval_data, batches, width = _encoded(ctx, completion_width)
    loss_fn = (distill_objective if causal else classifier_distill_objective)(cfg.distill, teacher_model)
    stored = bool(cfg.distill.teacher_logits)
    if stored:  # computed once, read by the steps: no teacher in the step
        if not causal:
            raise LowraxError("distill.teacher_logits stores a causal LM's logits; classifier distillation "
                              "runs its teacher in the step")
        logits = teacher_logits_store(cfg.distill.teacher_logits, train_data, cfg.data.seq_len, width, teacher_model,
                                      teacher_params, described, ctx.progress, log)
        batches, loss_fn = WithTeacherLogits(batches, logits), distill_objective(cfg.distill)
    step_args = {} if stored else {"teacher": teacher_params, "teacher_model": teacher_model,
                                   "teacher_rules": TEACHER_RULES if cfg.distill.teacher_sharding == "data" else None}
    held = {"params": teacher_params}  # the teacher's weights, released once training starts if its logits are stored
    scorer = _scorer(ctx)

    def score_start(trainable, frozen):
        out = score_run(scorer, host_local(combine(trainable, frozen)), cfg, log, "before", ctx.primary)
        if scorer.kind and ctx.primary:  # what the student is distilled toward
            out["teacher_metric"] = scorer.score(host_local(held["params"]), "the teacher")
            log(f"{scorer.kind} of the teacher: {out['teacher_metric']:.3f}")
        return out

    def release():
        if stored:
            held["params"] = None

    def prepare(micro, state, frozen, step):
        if not cfg.distill.on_policy:
            return micro, {}
        on_policy = is_on_policy_step(cfg.distill.on_policy, cfg.train.seed, step)
        if on_policy:
            student = host_local(combine(state.trainable, frozen))
            micro = [with_student_completions(ctx.model, student, m, max_new_tokens=cfg.distill.generation_tokens,
                                              temperature=cfg.distill.generation_temperature,
                                              eos_token_id=ctx.tokenizer.eos_token_id, pad_id=ctx.pad,
                                              seed=cfg.train.seed * 1_000_003 + step * len(micro) + i)
                     for i, m in enumerate(micro)]
        return micro, {"on_policy": int(on_policy)}

    return _task_metric_run(ctx, batches, eval_data, scorer, score_start=score_start, loss_fn=loss_fn,
                            prepare=prepare, step_args=step_args, on_training_start=release)


# Each objective's setup, by the section of settings it reads (lowrax.objectives.registry).
SETUP_BY_SECTION = {None: sft_run, "preference": preference_run, "distill": distill_run, "grpo": grpo_run}
for _objective in objective_names():
    register_objective_run(_objective, SETUP_BY_SECTION[objective_named(_objective).section])


def stacked(micro: list[dict], accum: int) -> dict:
    """Micro-batches stacked on a leading axis for gradient accumulation (one batch as it is)."""
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]} if accum > 1 else micro[0]
