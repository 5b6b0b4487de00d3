"""Many adapters on one base: mixed-adapter generation and adapter combination, printed as JSON.

    python scripts/bench.py --adapters [--adapters-count 8] [--rank 16] [--new-tokens 32] [--out F]

On the model (default: the embedded SmolLM2-135M-Instruct, float32), with `count` random LoRA
adapters of rank `rank` on every linear kernel:
  generation tokens/s for a batch of `count` prompts
    - single:  every row with the same adapter (an ordinary LoRA tree)
    - mixed:   every row with its own adapter (named adapters, `adapter_names=`)
    - looping: one batch-1 call per adapter (what serving each adapter alone costs)
  targets: mixed / single >= 0.8, mixed / looping >= 4 (compile time excluded: best of repeats);
  and the time `combine_adapters` takes for two of the adapters, per combination type.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import base_parser, best_of, command_line, emit, machine_facts, timed  # noqa: E402

import lowrax  # noqa: E402
from lowrax.merging.combine_adapters import COMBINATION_TYPES  # noqa: E402
from lowrax.models.generate import SamplingConfig  # noqa: E402

OPTIONS = {"ties": dict(density=0.5), "ties_svd": dict(density=0.5), "magnitude_prune": dict(density=0.5),
           "magnitude_prune_svd": dict(density=0.5), "dare_linear": dict(density=0.5), "dare_ties": dict(density=0.5),
           "dare_linear_svd": dict(density=0.5), "dare_ties_svd": dict(density=0.5)}


def random_adapter(model, params, rank: int, seed: int):
    """A LoRA adapter on every linear kernel with small random A and B (as a trained one would be)."""
    wrapped = lowrax.wrap(params, lowrax.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"),
                          jax.random.key(seed), model.model_type)
    trainable, frozen = lowrax.split(wrapped)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1000 + seed), len(leaves))
    leaves = [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return lowrax.combine(jax.tree.unflatten(treedef, leaves), frozen)


def generation(model, singles, named, prompts, new_tokens, repeats):
    names = lowrax.adapter_names(named)

    def gen(params, batch, adapter_names=None):
        return lambda: lowrax.generate_ids(model, params, batch, new_tokens, SamplingConfig(), eos_token_ids=(),
                                           adapter_names=adapter_names)

    runs = {
        "single": gen(singles[0], prompts),
        "mixed": gen(named, prompts, names[: len(prompts)]),
        "looping": lambda: [gen(tree, [p])() for tree, p in zip(singles, prompts)],
    }
    out = {}
    for label, run in runs.items():
        first = timed(run)  # compiles
        seconds = best_of(run, repeats)
        out[label] = {"tokens_per_s": len(prompts) * new_tokens / seconds, "seconds": seconds, "first_call_s": first}
        print(f"generation {label}: {out[label]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    out["mixed_over_single"] = out["mixed"]["tokens_per_s"] / out["single"]["tokens_per_s"]
    out["mixed_over_looping"] = out["mixed"]["tokens_per_s"] / out["looping"]["tokens_per_s"]
    return out


def combination_times(named, repeats):
    out = {}
    for kind in COMBINATION_TYPES:
        run = lambda kind=kind: jax.block_until_ready(jax.tree.leaves(lowrax.combine_adapters(  # noqa: E731
            named, ["a0", "a1"], [0.6, 0.4], "merged", kind, key=jax.random.key(0), **OPTIONS.get(kind, {}))))
        first = timed(run)
        out[kind] = {"seconds": best_of(run, repeats), "first_call_s": first}
        print(f"combine {kind}: {out[kind]['seconds']:.2f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--adapters-count", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-combine", action="store_true")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()

    model, params = lowrax.load_pretrained(args.model, progress=False)
    singles = [random_adapter(model, params, args.rank, i) for i in range(args.adapters_count)]
    named = params
    for i, tree in enumerate(singles):
        named = lowrax.add_adapter(named, f"a{i}", tree, capacity=args.adapters_count)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, model.config.vocab_size, args.prompt_tokens).tolist() for _ in range(args.adapters_count)]
    result = {
        "model": str(args.model or "embedded SmolLM2-135M-Instruct"), "dtype": "float32",
        "adapters": args.adapters_count, "rank": args.rank, "targets": "all-linear",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "command": command_line("--adapters"), "machine": machine_facts(("jax",)),
    }
    if not args.skip_generation:
        result["generation"] = generation(model, singles, named, prompts, args.new_tokens, args.repeats)
    if not args.skip_combine:
        result["combine_two_adapters"] = combination_times(named, max(1, args.repeats - 1))
    emit(result, args.out)


if __name__ == "__main__":
    main()
