"""Preference and distillation steps next to the SFT step on the same rows, printed as JSON.

    python scripts/bench.py --objectives [--pairs 8] [--seq 64] [--rank 16] [--repeats 3] [--only sft,kto] [--out F]

On the model (default: the embedded SmolLM2-135M-Instruct, float32) with LoRA of rank `rank`
on every linear kernel, `pairs` preference pairs of the default preference set (2 x pairs
rows of `seq` tokens) go through
  - sft:              the ordinary next-token step on all the rows (loss on the completions)
  - dpo:              DPO with the reference in the step (the same weights, adapters off)
  - dpo_precomputed:  DPO with reference log-probs stored in the batch
  - orpo, simpo, kto  (kto: the rows as unpaired examples, with its mismatched KL rows)
  - kto_precomputed:  KTO with the reference log-probs of both kinds of rows stored in the batch
  - distill:          the rows' completions distilled from a teacher (the base with another
                      LoRA, merged: a second copy of the weights is the teacher's own)
For each: the compiled step's memory (arguments + outputs + temporaries, XLA's memory
analysis: the step's own peak, apart from loading) and its time (best of repeats, compile
excluded). Target: the DPO step's memory within 1.15x of the SFT step's.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import base_parser, best_of, command_line, emit, machine_facts  # noqa: E402
from bench_lora import program_costs  # noqa: E402

import lowrax  # noqa: E402
from lowrax.objectives.config import DistillSection, PreferenceSection  # noqa: E402
from lowrax.objectives.logps import completion_logps  # noqa: E402
from lowrax.objectives.step_losses import distill_objective, preference_loss_fn  # noqa: E402
from lowrax.train.default_task import make_preference_splits, unpaired  # noqa: E402
from lowrax.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from lowrax.train.preference_data import PreferenceBatches, encode_pairs, encode_unpaired  # noqa: E402
from lowrax.train.config import DataSection  # noqa: E402
from lowrax.train.step import causal_lm_loss, init_state, make_train_step  # noqa: E402


SIDES = ("sft", "dpo", "orpo", "simpo", "dpo_precomputed", "kto", "kto_precomputed", "distill")


def measure(step, state, frozen, batch, repeats: int, *extra) -> dict:
    jitted = jax.jit(step, donate_argnums=(0,))
    compiled = jitted.lower(state, frozen, batch, *extra).compile()
    _, held = program_costs(compiled)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch, *extra)
        jax.block_until_ready(metrics)

    run()
    return {"step_bytes": held, "step_s": best_of(run, repeats)}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(SIDES), help="the steps to measure (sft is always measured)")
    args = ap.parse_args()
    wanted = {"sft", *args.only.split(",")}
    unknown = wanted - set(SIDES)
    if unknown:
        raise SystemExit(f"--only: unknown steps {sorted(unknown)}; expected some of {', '.join(SIDES)}")

    model, base = lowrax.load_pretrained(args.model, progress=False)
    tokenizer = lowrax.load_tokenizer(args.model)
    lora = lowrax.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear")
    params = lowrax.wrap(base, lora, jax.random.key(0), model=model)
    trainable, frozen = lowrax.split(params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4))
    fresh = lambda: init_state(jax.tree.map(jnp.copy, trainable), optimizer)  # noqa: E731

    records, _ = make_preference_splits(args.pairs, 0)
    data = DataSection(seq_len=args.seq)
    pad = tokenizer.pad_token_id or 0
    pairs = PreferenceBatches(encode_pairs(tokenizer, records, data), args.seq, args.pairs, 0, pad)
    batch = {k: jnp.asarray(v) for k, v in pairs.batch(0).items()}
    kto_batch = {k: jnp.asarray(v) for k, v in PreferenceBatches(
        encode_unpaired(tokenizer, unpaired(records), data), args.seq, 2 * args.pairs, 0, pad,
        pairs.width).batch(0).items()}

    def preference_step(objective):
        return make_train_step(model, optimizer, loss_fn=preference_loss_fn(objective, PreferenceSection()))

    def reference_of(rows, prefix=""):
        return jax.jit(lambda p, b: completion_logps(model, lowrax.adapters_off(p), b, prefix=prefix)[0])(params, rows)

    steps = {
        "sft": lambda: measure(make_train_step(model, optimizer, loss_fn=causal_lm_loss), fresh(), frozen, batch,
                               args.repeats),
        **{objective: (lambda objective=objective: measure(preference_step(objective), fresh(), frozen, batch,
                                                           args.repeats)) for objective in ("dpo", "orpo", "simpo")},
        "dpo_precomputed": lambda: measure(preference_step("dpo"), fresh(), frozen,
                                           dict(batch, ref_logps=reference_of(batch)), args.repeats),
        "kto": lambda: measure(preference_step("kto"), fresh(), frozen, kto_batch, args.repeats),
        "kto_precomputed": lambda: measure(preference_step("kto"), fresh(), frozen,
                                           dict(kto_batch, ref_logps=reference_of(kto_batch),
                                                kl_ref_logps=reference_of(kto_batch, "kl_")), args.repeats),
        "distill": lambda: measure(make_train_step(model, optimizer, loss_fn=distill_objective(DistillSection(), model),
                                                   with_teacher=True), fresh(), frozen, batch, args.repeats,
                                   lowrax.merge(lowrax.wrap(base, lora, jax.random.key(1), model=model))),
    }
    assert tuple(steps) == SIDES
    sides = {name: measure_side() for name, measure_side in steps.items() if name in wanted}

    sft = sides["sft"]
    result = {
        "model": str(args.model or "embedded SmolLM2-135M-Instruct"), "dtype": "float32",
        "pairs": args.pairs, "rows": 2 * args.pairs, "seq": args.seq, "rank": args.rank,
        "machine": dict(machine_facts(("jax", "flax", "optax")), jax_backend=jax.default_backend()),
        "command": command_line("--objectives"),
        "steps": sides,
        "memory_over_sft": {k: v["step_bytes"] / sft["step_bytes"] for k, v in sides.items()},
        "time_over_sft": {k: v["step_s"] / sft["step_s"] for k, v in sides.items()},
        "target": "dpo step memory <= 1.15 x sft step memory",
    }
    if "dpo" in sides:
        result["target_met"] = result["memory_over_sft"]["dpo"] <= 1.15
    emit(result, args.out)


if __name__ == "__main__":
    main()
