"""One GRPO step split into rollout and update, next to TRL + PEFT's GRPO step on the same model and batch,
printed as JSON.

    python scripts/bench.py --grpo [--prompts 4] [--generations 4] [--completion 12] [--steps 4] [--rank 16]
        [--no-trl] [--out F]

On the model (default: the embedded SmolLM2-135M-Instruct, float32) with LoRA of rank `rank` on every linear
layer, each step samples `generations` completions of `prompts` prompts of the embedded arithmetic task
(temperature 1, at most `completion` new tokens, the chat template), scores them with the final-number
reward and takes one update of the dapo loss (beta 0, one update per rollout) with AdamW, as
`lowrax train configs/grpo.yaml` does. Each side runs in its own process (peak RSS its own); the first step
(compilation, warm-up) is reported apart, the rest as medians:
  rollout_s   sampling and scoring (lowrax: `objectives.grpo.rollout` and the reward; TRL: its
              `_generate_and_score_completions`)
  update_s    the rest of the step: the policy loss, its gradient and the optimizer
  rollout_tokens_per_s   completion tokens sampled per second of rollout
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import (base_parser, command_line, emit, in_fresh_process, load_torch_causal_lm,  # noqa: E402
                          machine_facts)
from bench_lora import peak_rss_bytes  # noqa: E402


def prompts_and_answers(count: int, steps: int) -> list[dict]:
    from lowrax.train.default_task import make_arithmetic_splits

    train, _ = make_arithmetic_splits(count * steps, 0, seed=0)
    return train


def bench_lowrax(args) -> dict:
    import jax

    import lowrax
    from lowrax.adapters.tree import combine
    from lowrax.models.generate import eos_ids
    from lowrax.models.sampling import SamplingConfig
    from lowrax.objectives.config import GRPOSection
    from lowrax.objectives.grpo import group_advantages, rollout
    from lowrax.objectives.rewards import final_number, score
    from lowrax.objectives.step_losses import grpo_objective
    from lowrax.train.data import chat_ids, trim_widths
    from lowrax.train.optim import OptimizerConfig, make_optimizer
    from lowrax.train.step import init_state, make_train_step

    model, base = lowrax.load_pretrained(args.model, progress=False)
    tokenizer = lowrax.load_tokenizer(args.model)
    params = lowrax.wrap(base, lowrax.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"),
                         jax.random.key(0), model=model)
    trainable, frozen = lowrax.split(params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=2e-4, warmup_steps=0, schedule="constant"))
    cfg = GRPOSection(num_generations=args.generations, max_completion_length=args.completion)
    step = jax.jit(make_train_step(model, optimizer, loss_fn=grpo_objective(cfg)), donate_argnums=(0,))
    state = init_state(trainable, optimizer)
    records = prompts_and_answers(args.prompts, args.steps + 1)
    reward, eos, pad = final_number(), eos_ids(tokenizer, model), tokenizer.pad_token_id or 0
    sampling = SamplingConfig(temperature=1.0)
    rows = []
    for i in range(args.steps + 1):
        chunk = records[i * args.prompts: (i + 1) * args.prompts]
        start = time.perf_counter()
        prompts = [chat_ids(tokenizer, r["prompt"], True) for r in chunk]
        rolled = rollout(model, combine(state.trainable, frozen), prompts, args.generations, args.completion,
                         sampling, eos, pad, seed=i)
        texts = [tokenizer.decode(ids[: int(m.sum())], skip_special_tokens=True)
                 for ids, m in zip(rolled.completion_ids, rolled.completion_mask)]
        answers = [r["answer"] for r in chunk for _ in range(args.generations)]
        _, total = score([reward], None, [None] * len(texts), texts, {"answer": answers})
        width = next(w for w in trim_widths(64) if w >= rolled.longest_prompt)  # as `lowrax train` cuts the prompts
        batch = rolled.batch(group_advantages(total, args.generations), width)
        sampled = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        rows.append({"rollout_s": sampled - start, "update_s": time.perf_counter() - sampled,
                     "completion_tokens": int(rolled.completion_mask.sum()), "reward": float(np.nanmean(total))})
    return summarised(rows)


def bench_trl(args) -> dict:
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset

    from lowrax.models.pretrained import resolve_model_path
    from lowrax.objectives.rewards import final_number

    hf = load_torch_causal_lm(args.model)
    if getattr(hf, "hf_quantizer", None) is not None:  # a GGUF checkpoint, dequantized to float32 on loading:
        hf.hf_quantizer = None                          # plain weights, which the Trainer otherwise refuses
        hf.is_quantized = False
    source = resolve_model_path(args.model)
    tokenizer = (transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
                 if source.suffix == ".gguf" else transformers.AutoTokenizer.from_pretrained(str(source)))
    records = prompts_and_answers(args.prompts, args.steps + 1)
    batch = args.prompts * args.generations
    config = trl.GRPOConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "bench-grpo-trl"), report_to=[],
                            use_cpu=True, bf16=False, per_device_train_batch_size=batch,
                            num_generations=args.generations, max_completion_length=args.completion, temperature=1.0,
                            learning_rate=2e-4, lr_scheduler_type="constant", beta=0.0, loss_type="dapo",
                            max_steps=args.steps + 1, logging_steps=1, save_strategy="no", shuffle_dataset=False,
                            seed=0)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=[final_number()], args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(records),
                              peft_config=peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                          target_modules="all-linear", task_type="CAUSAL_LM"))
    rows, rolling = [], {"s": 0.0, "tokens": 0}
    generate = trainer._generate_and_score_completions

    def timed_generation(inputs):
        start = time.perf_counter()
        out = generate(inputs)
        rolling["s"] += time.perf_counter() - start
        rolling["tokens"] += int(out["completion_mask"].sum())
        return out

    trainer._generate_and_score_completions = timed_generation

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, rolling["s"], rolling["tokens"] = time.perf_counter(), 0.0, 0

        def on_step_end(self, *_, **__):
            rows.append({"rollout_s": rolling["s"], "update_s": time.perf_counter() - self.start - rolling["s"],
                         "completion_tokens": rolling["tokens"]})

    trainer.add_callback(StepTimes())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out = summarised(rows)
    out.update(threads=torch.get_num_threads(), mean_reward=float(np.mean(rewards)) if rewards else None)
    return out


def summarised(rows: list[dict]) -> dict:
    """The first step apart (compilation, warm-up), medians of the rest, and the process's peak RSS."""
    first, rest = rows[0], rows[1:]

    def median(key):
        return float(np.median([r[key] for r in rest]))

    return {"first_step_s": first["rollout_s"] + first["update_s"], "rollout_s": median("rollout_s"),
            "update_s": median("update_s"), "step_s": median("rollout_s") + median("update_s"),
            "rollout_tokens_per_s": sum(r["completion_tokens"] for r in rest) / sum(r["rollout_s"] for r in rest),
            "mean_reward": float(np.mean([r["reward"] for r in rows])) if "reward" in first else None,
            "steps_timed": len(rest), "peak_rss_bytes": peak_rss_bytes()}


def run_side(side: str, args) -> dict:
    return bench_lowrax(args) if side == "lowrax" else bench_trl(args)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--completion", type=int, default=12, help="new tokens per completion at most")
    ap.add_argument("--steps", type=int, default=4, help="steps timed after the first")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL + PEFT side")
    args = ap.parse_args()
    result = {"model": str(args.model or "embedded SmolLM2-135M-Instruct"), "prompts": args.prompts,
              "generations": args.generations, "completion_tokens": args.completion, "rank": args.rank,
              "command": command_line("--grpo"), "machine": machine_facts(("jax", "torch", "transformers", "peft",
                                                                           "trl")),
              "lowrax": in_fresh_process(run_side, "lowrax", args)}
    if not args.no_trl:
        result["trl"] = in_fresh_process(run_side, "trl", args)
        result["ratio_lowrax_over_trl"] = {
            "step_speed": result["trl"]["step_s"] / result["lowrax"]["step_s"],
            "rollout_tokens_per_s": result["lowrax"]["rollout_tokens_per_s"] / result["trl"]["rollout_tokens_per_s"],
            "update_speed": result["trl"]["update_s"] / result["lowrax"]["update_s"],
            "peak_memory": result["lowrax"]["peak_rss_bytes"] / result["trl"]["peak_rss_bytes"]}
    emit(result, args.out)


if __name__ == "__main__":
    main()
