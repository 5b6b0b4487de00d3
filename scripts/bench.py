"""Benchmarks, printed as JSON: lowrax next to transformers-torch, measured in the same run.

    python scripts/bench.py [--model PATH] [--batch 4] [--seq 128] [--new-tokens 64] [--out bench.json]
    python scripts/bench.py --lora [--vs-peft] [--rank 16] ...   (the LoRA train step: scripts/bench_lora.py)
    python scripts/bench.py --variants [--only lora,dora]         (the LoRA family on the default task: scripts/bench_variants.py)
    python scripts/bench.py --adapters [--adapters-count 8]       (mixed-adapter batches, combine_adapters: scripts/bench_adapters.py)
    python scripts/bench.py --objectives [--pairs 8]              (DPO/ORPO/SimPO/KTO/distill steps vs SFT: scripts/bench_objectives.py)
    python scripts/bench.py --pruning [--pattern 2:4]             (SparseGPT time and memory per layer: scripts/bench_pruning.py)
    python scripts/bench.py --recipes [--only text,classifier]    (real recipes' peak memory vs PEFT: scripts/bench_recipes.py)
    python scripts/bench.py --grpo [--prompts 4] [--generations 4] (a GRPO step, rollout and update, vs TRL: scripts/bench_grpo.py)

Reports for the model (default: the embedded SmolLM2-135M-Instruct, float32):
  forward tokens/s (batch x seq, logits for every position), and
  greedy generation tokens/s (KV cache, batch 1 and `--batch`), compile time excluded
  and reported separately. The torch side needs `pip install -e .[test]`.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import base_parser, best_of, command_line, emit, load_torch_causal_lm, machine_facts  # noqa: E402

import lowrax  # noqa: E402
from lowrax.models.generate import SamplingConfig  # noqa: E402


def bench_lowrax(model, params, ids, prompt, new_tokens, batch, repeats):
    apply = jax.jit(model.apply)
    x = jnp.asarray(ids)
    start = time.perf_counter()
    apply(params, x).block_until_ready()
    compile_s = time.perf_counter() - start
    fwd = best_of(lambda: apply(params, x).block_until_ready(), repeats)
    out = {"forward_tokens_per_s": ids.size / fwd, "forward_compile_s": compile_s}
    for b in (1, batch):
        prompts = [prompt] * b
        run = lambda: lowrax.generate_ids(model, params, prompts, new_tokens, SamplingConfig(), eos_token_ids=())  # noqa: E731
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        t = best_of(run, repeats)
        out[f"generate_b{b}_tokens_per_s"] = b * new_tokens / t
        out[f"generate_b{b}_first_call_s"] = first
    return out


def bench_torch(path, ids, prompt, new_tokens, batch, repeats):
    import torch

    hf = load_torch_causal_lm(path).eval()
    x = torch.tensor(ids)
    with torch.no_grad():
        hf(x)
        fwd = best_of(lambda: hf(x), repeats)
        out = {"forward_tokens_per_s": ids.size / fwd, "threads": torch.get_num_threads()}
        for b in (1, batch):
            p = torch.tensor([prompt] * b)
            run = lambda: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new_tokens,  # noqa: E731
                                      min_new_tokens=new_tokens, do_sample=False)
            run()
            out[f"generate_b{b}_tokens_per_s"] = b * new_tokens / best_of(run, repeats)
    return out


def main() -> None:
    if "--lora" in sys.argv:
        sys.argv.remove("--lora")
        import bench_lora

        return bench_lora.main()
    if "--variants" in sys.argv:
        sys.argv.remove("--variants")
        import bench_variants

        return bench_variants.main()
    if "--adapters" in sys.argv:
        sys.argv.remove("--adapters")
        import bench_adapters

        return bench_adapters.main()
    if "--objectives" in sys.argv:
        sys.argv.remove("--objectives")
        import bench_objectives

        return bench_objectives.main()
    if "--recipes" in sys.argv:
        sys.argv.remove("--recipes")
        import bench_recipes

        return bench_recipes.main()
    if "--grpo" in sys.argv:
        sys.argv.remove("--grpo")
        import bench_grpo

        return bench_grpo.main()
    if "--pruning" in sys.argv:
        sys.argv.remove("--pruning")
        import bench_pruning

        return bench_pruning.main()
    ap = base_parser(__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers-torch side")
    args = ap.parse_args()

    model, params = lowrax.load_pretrained(args.model, progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    prompt = rng.integers(10, model.config.vocab_size, 24).tolist()
    result = {
        "model": str(args.model or "embedded SmolLM2-135M-Instruct"),
        "dtype": "float32",
        "batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "command": command_line(""),
        "machine": {**machine_facts(("jax", "torch", "transformers")), "jax_backend": jax.default_backend()},
        "lowrax": bench_lowrax(model, params, ids, prompt, args.new_tokens, args.batch, args.repeats),
    }
    if not args.no_torch:
        result["torch"] = bench_torch(args.model, ids, prompt, args.new_tokens, args.batch, args.repeats)
        result["ratio_lowrax_over_torch"] = {
            k: result["lowrax"][k] / result["torch"][k] for k in result["torch"] if k.endswith("tokens_per_s")
        }
    emit(result, args.out)


if __name__ == "__main__":
    main()
