"""What `lowrax train` does for `objective: grpo`: prompts in, rollouts sampled by the policy being trained,
rewards, group-relative advantages, and the held-out mean reward before and after.

Each training micro-batch is `train.batch_size / grpo.num_generations` prompts; before its step the current
policy samples `num_generations` completions of each (the compiled generator: one program per batch and
bucketed length, reused by every later step), the reward functions score them, and the step minimises
`grpo_loss` on them (`objectives.step_losses.grpo_objective`). With `grpo.num_iterations` = k > 1 a rollout
serves k consecutive steps and carries the sampling policy's log-probs for the importance ratio. Which
prompts a step gets and its sampling key are functions of (seeds, step), so a resumed run is the same run.

The held-out metric is the mean reward of one greedy completion per held-out prompt (the first
`train.eval_examples`), with a few printed before and after training.
"""

from __future__ import annotations

import time
from functools import lru_cache

import jax
import numpy as np
from tqdm.auto import tqdm

from lowrax.adapters.tree import combine
from lowrax.dist.parallel import host_local
from lowrax.errors import LowraxError
from lowrax.models.generate import eos_ids
from lowrax.models.sampling import SamplingConfig
from lowrax.objectives.grpo import Rollout, group_advantages, rollout
from lowrax.objectives.logps import completion_token_logps
from lowrax.objectives.rewards import completion_text, reward_from_spec, reward_name, score
from lowrax.objectives.step_losses import grpo_objective
from lowrax.train.data import chat_ids, planned_trim_widths, prompt_ids
from lowrax.train.scoring import covered

EVAL_BATCH = 16  # held-out prompts generated at once


def grpo_records(cfg, train: list[dict], held_out: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) prompt records; the embedded default is small additions (`default_task.make_arithmetic_splits`)."""
    if cfg.data.source != "default":
        return train, held_out
    from lowrax.train.default_task import make_arithmetic_splits

    return make_arithmetic_splits(cfg.data.default_train_examples, cfg.data.default_eval_examples, cfg.data.shuffle_seed)


class PromptBatches:
    """Prompt indices in a seeded shuffle per epoch; `batch(k)` is the k-th micro-batch's indices."""

    def __init__(self, count: int, prompts_per_batch: int, seed: int, num_generations: int):
        self.count, self.per_batch, self.seed = count, prompts_per_batch, seed
        self.rows_per_epoch = count * num_generations  # what train.epochs counts: completions, as batch_size does

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.count)

    def batch(self, k: int) -> list[int]:
        return [int(self._order(j // self.count)[j % self.count])
                for j in range(k * self.per_batch, (k + 1) * self.per_batch)]


class GRPORun:
    """Prompts, rewards, rollouts and the held-out reward of one GRPO run."""

    def __init__(self, ctx):
        cfg, g = ctx.cfg, ctx.cfg.grpo
        self.ctx, self.cfg, self.g, self.tokenizer, self.model = ctx, cfg, g, ctx.tokenizer, ctx.model
        self.rewards = [reward_from_spec(spec) for spec in g.rewards]
        self.names = [reward_name(fn) for fn in self.rewards]
        self.train_prompts = [self.encode(r, i, "training") for i, r in enumerate(ctx.train_records)]
        self.eval_records = ctx.eval_records[: cfg.train.eval_examples]
        self.eval_prompts = [self.encode(r, i, "held-out") for i, r in enumerate(self.eval_records)]
        self.batches = PromptBatches(len(self.train_prompts), cfg.train.batch_size // g.num_generations,
                                     cfg.data.shuffle_seed, g.num_generations)
        self.prompt_widths = self.planned_prompt_widths()
        self.sampling = SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
        self.eos = eos_ids(self.tokenizer, self.model)
        self.pad = self.tokenizer.pad_token_id or 0
        self.loss_fn = grpo_objective(g)
        self._window: tuple[int, list[dict]] | None = None  # (first step, micro-batches) of the current rollout
        self._old_logps = jax.jit(lambda params, b: completion_token_logps(
            self.model, params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
            temperature=g.temperature)) if g.num_iterations > 1 else None

    PLANNED_STEPS = 4096  # a longer run's prompt widths are planned from this many steps spread over it

    def planned_prompt_widths(self) -> list[int]:
        """At most three prompt widths for the whole run (`data.planned_trim_widths`, as training batches are cut),
        from the longest prompt of each step: each width is one more compiled step."""
        accum, steps = self.cfg.train.grad_accum_steps, max(self.cfg.train.steps, 1)
        planned = np.unique(np.linspace(0, steps - 1, min(steps, self.PLANNED_STEPS)).astype(int))
        longest = [max(len(self.train_prompts[j]) for i in range(accum) for j in self.batches.batch(int(s) * accum + i))
                   for s in planned]
        widths = planned_trim_widths(longest, self.cfg.data.seq_len)
        # and seq_len, for a step the sampled plan missed (compiled only if one needs it)
        return widths if widths[-1] == self.cfg.data.seq_len else widths + [self.cfg.data.seq_len]

    # --- prompts and rewards -----------------------------------------------------------------

    def prompt_value(self, record: dict):
        """The record's prompt as the rewards receive it: text, or a list of chat messages."""
        d = self.cfg.data
        return record[d.prompt_field] if d.prompt_field in record else record[d.messages_field]

    def encode(self, record: dict, index: int, split: str) -> list[int]:
        d = self.cfg.data
        if not isinstance(record, dict) or (d.prompt_field not in record and d.messages_field not in record):
            found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise LowraxError(f"objective grpo reads prompts: {split} record {index} needs the field {d.prompt_field!r} "
                              f"(text or a list of chat messages) or {d.messages_field!r}; found: {found}")
        prompt = self.prompt_value(record)
        if isinstance(prompt, str):
            ids = prompt_ids(self.tokenizer, {d.prompt_field: prompt}, d)
        elif isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt) and prompt:
            ids = chat_ids(self.tokenizer, prompt, True)
        else:
            raise LowraxError(f"{split} record {index}: a prompt must be text or a non-empty list of chat messages "
                              f"({{'role': ..., 'content': ...}}); got {prompt!r:.80}")
        if not ids or len(ids) > d.seq_len:
            raise LowraxError(f"{split} record {index}: its prompt is {len(ids)} tokens; prompts need 1 to data.seq_len "
                              f"({d.seq_len}) tokens: raise data.seq_len or shorten it")
        return ids

    def completions_for_rewards(self, records: list[dict], rows: Rollout, per_prompt: int) -> tuple[list, list, dict]:
        """(prompts, completions, columns) as reward functions take them, one entry per completion."""
        texts = [self.tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
                 for ids, m in zip(rows.completion_ids, rows.completion_mask)]
        repeated = [r for r in records for _ in range(per_prompt)]
        prompts = [self.prompt_value(r) for r in repeated]
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        skip = {self.cfg.data.prompt_field, self.cfg.data.messages_field}
        keys = dict.fromkeys(k for r in records for k in r if k not in skip)  # every column, in order
        columns = {k: [r.get(k) for r in repeated] for k in keys}
        return prompts, completions, columns

    # --- training ------------------------------------------------------------------------------

    def prepare(self, micro: list[list[int]], state, frozen, step: int) -> tuple[list[dict], dict]:
        """The step's micro-batches of rollouts from the current policy (or the current rollout's, on the
        later updates of a `num_iterations` window), and the rollout's metrics under TRL's names."""
        k = self.g.num_iterations
        if self._window is not None and self._window[0] == step - step % k:
            return self._window[1], {}
        if step % k:  # a run resumed from its last checkpoint, which train.steps put inside a window
            self.ctx.log(f"note: step {step + 1} is inside a rollout's grpo.num_iterations={k} updates (the run "
                         "resumed from a checkpoint there): it samples a new rollout")
        started = time.perf_counter()
        policy = host_local(combine(state.trainable, frozen))
        sampled, tables, combined, lengths, truncated = [], [], [], [], []
        for i, indices in enumerate(micro):
            records = [self.ctx.train_records[j] for j in indices]
            rows = rollout(self.model, policy, [self.train_prompts[j] for j in indices], self.g.num_generations,
                           self.g.max_completion_length, self.sampling, self.eos, self.pad,
                           seed=self.cfg.train.seed * 1_000_003 + step * len(micro) + i)
            table, total = score(self.rewards, self.g.reward_weights, *self.completions_for_rewards(
                records, rows, self.g.num_generations))
            tables.append(table), combined.append(total)
            lengths.append(rows.completion_mask.sum(1)), truncated.append(rows.truncated)
            if self.g.mask_truncated_completions:
                rows = rows.masked_truncated()
            sampled.append((rows, group_advantages(total, self.g.num_generations, scale_rewards=self.g.scale_rewards)))
        # one prompt width for every micro-batch (accumulation stacks them): the narrowest planned one that holds
        # them, so the step never computes the generator bucket's all-padding columns
        width = next(w for w in self.prompt_widths if w >= max(rows.longest_prompt for rows, _ in sampled))
        out = [rows.batch(advantages, width) for rows, advantages in sampled]
        if self._old_logps is not None:
            for batch in out:
                batch["old_logps"] = np.asarray(self._old_logps(policy, batch))
            self._window = (step, out)
        metrics = self.rollout_metrics(np.concatenate(tables), np.concatenate(combined), np.concatenate(lengths),
                                       np.concatenate(truncated))
        return out, {**metrics, "rollout_seconds": time.perf_counter() - started}

    def rollout_metrics(self, table, combined, lengths, truncated) -> dict:
        groups = combined.reshape(-1, self.g.num_generations)
        metrics = {"reward": _nan_stat(np.nanmean, combined), "reward_std": _nan_stat(_nanstd, combined),
                   "frac_reward_zero_std": float(np.mean(np.nan_to_num(np.nanstd(groups, axis=1)) == 0))}
        for j, name in enumerate(self.names):
            metrics[f"rewards/{name}/mean"] = _nan_stat(np.nanmean, table[:, j])
            metrics[f"rewards/{name}/std"] = _nan_stat(_nanstd, table[:, j])
        terminated = lengths[~truncated] if (~truncated).any() else np.zeros(1)
        metrics.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                        "completions/max_length": float(lengths.max()),
                        "completions/clipped_ratio": float(truncated.mean()),
                        "completions/mean_terminated_length": float(terminated.mean())})
        return metrics

    # --- held-out reward -------------------------------------------------------------------------

    def evaluate(self, trainable, frozen, progress: bool = False, samples: int = 0) -> tuple[dict, list[dict]]:
        """({"reward": mean, "rewards/NAME/mean": ...}, samples) of one greedy completion per held-out prompt."""
        if not self.eval_prompts:
            return {}, []
        params = host_local(combine(trainable, frozen))
        tables, shown = [], []
        with tqdm(total=len(self.eval_prompts), desc="held-out reward", unit="prompt", disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(self.eval_prompts), EVAL_BATCH):
                records = self.eval_records[start: start + EVAL_BATCH]
                rows = rollout(self.model, params, self.eval_prompts[start: start + EVAL_BATCH], 1,
                               self.g.max_completion_length, SamplingConfig(), self.eos, self.pad)
                prompts, completions, columns = self.completions_for_rewards(records, rows, 1)
                table, total = score(self.rewards, self.g.reward_weights, prompts, completions, columns)
                tables.append(np.concatenate([total[:, None], table], 1))
                shown += [{"prompt": completion_text(p), "completion": completion_text(c), "reward": _finite(r)}
                          for p, c, r in zip(prompts, completions, total)][: max(samples - len(shown), 0)]
                bar.update(len(records))
        table = np.concatenate(tables)
        metrics = {"reward": _nan_stat(np.nanmean, table[:, 0])}
        metrics.update({f"rewards/{n}/mean": _nan_stat(np.nanmean, table[:, j + 1]) for j, n in enumerate(self.names)})
        return metrics, shown

    def held_out(self, trainable, frozen, when: str, progress: bool) -> dict:
        """Summary entries `before` or `after` training: the held-out mean reward (`metric_{when}`), each
        function's, and the sample completions, all logged."""
        cfg, log = self.cfg, self.ctx.log
        measured, shown = self.evaluate(trainable, frozen, progress, 0 if cfg.train.quick else cfg.train.samples)
        if not measured:
            return {}
        by_function = ", ".join(f"{n} {_shown_number(measured[f'rewards/{n}/mean'])}" for n in self.names)
        log(f"held-out mean reward {when} training: {_shown_number(measured['reward'])} ({by_function}) on "
            f"{covered(len(self.eval_prompts), len(self.ctx.eval_records))} prompts, one greedy completion each")
        for sample in shown:
            log(f"  [{when}] {sample['prompt']!r} -> {sample['completion']!r} (reward {sample['reward']})")
        out = {f"metric_{when}": measured.pop("reward"), **{f"{k}_{when}": v for k, v in measured.items()}}
        return {**out, f"samples_{when}": shown} if shown else out


def _nanstd(x: np.ndarray) -> float:
    """Standard deviation with Bessel's correction over the non-NaN values, as TRL logs it."""
    x = x[~np.isnan(x)]
    return float(np.std(x, ddof=1)) if x.size > 1 else float("nan")


def _nan_stat(fn, x: np.ndarray) -> float | None:
    """fn over the non-NaN values; None (null in metrics.jsonl) where there are none."""
    if np.isnan(x).all():
        return None
    return _finite(float(fn(x)))


def _finite(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _shown_number(x: float | None) -> str:
    return "none scored" if x is None else f"{x:.3f}"
