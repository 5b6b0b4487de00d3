"""The docs' measured tables, generated from the benchmarks' JSON so that no table drifts from its command.

    .venv-test/bin/python scripts/bench.py --out docs/figures/forward.json             # forward and generation
    .venv-test/bin/python scripts/bench.py --lora --table --out docs/figures/lora.json  # the LoRA step vs PEFT
    .venv-test/bin/python scripts/bench.py --lora --qlora --out docs/figures/qlora.json # QLoRA next to LoRA
    .venv-test/bin/python scripts/bench.py --adapters --out docs/figures/adapters.json # many adapters on one base
    .venv-test/bin/python scripts/bench.py --pruning --out docs/figures/pruning.json   # SparseGPT per layer
    .venv-test/bin/python scripts/bench.py --recipes --out docs/figures/recipes.json   # measure (about an hour)
    .venv-test/bin/python scripts/bench.py --variants --out docs/figures/variants.json  # the methods (about 40 min)
    .venv-test/bin/python scripts/bench.py --objectives --pairs 8 --seq 64 --out docs/figures/objectives.json
    .venv-test/bin/python scripts/bench.py --grpo --out docs/figures/grpo.json         # a GRPO step vs TRL
    .venv-test/bin/python scripts/prune_table.py                                       # perplexity (about 45 min)
    .venv-test/bin/python scripts/memory_phases.py --out docs/figures/phases.json train.steps=3 \
        train.output_dir=runs/phases                                                     # a run's phases
    .venv-test/bin/python scripts/performance_tables.py                              # rewrite the tables
    .venv-test/bin/python scripts/performance_tables.py --check                      # exit 1 if a table differs

Each table sits in a page of PAGES (docs/performance.md, docs/preference-and-distillation.md, docs/pruning.md,
docs/reinforcement-learning.md) between
`<!-- generated: NAME -->` and `<!-- end generated -->` and is rendered from docs/figures/NAME.json. `tests/test_performance_tables.py` runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the pages with generated tables
PAGES = tuple(REPO / "docs" / page for page in ("performance.md", "preference-and-distillation.md", "pruning.md",
                                                 "reinforcement-learning.md"))
FIGURES = REPO / "docs" / "figures"
TARGET_PEAK_RATIO = 0.8  # issue target: lowrax's peak at most 0.8x PEFT's

RECIPE_NAMES = {
    "text": "text: SmolLM2-135M, LoRA r 16 on every linear layer, batch 4 of up to 256 tokens, one epoch (87 steps), "
            "held-out loss",
    "text_padded": "text, every batch padded to 256 tokens on both sides",
    "classifier": "classifier: MiniLM-L6, LoRA r 8 on query and value + head, batch 16 of up to 128 tokens, 88 steps, "
                  "accuracy on 500",
    "classifier_padded": "classifier, every batch padded to 128 tokens on both sides",
}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _timing(runs: dict, key: str, fmt: str) -> str:
    """'lowrax / PEFT' medians of a per-run timing, or a dash for runs measured before it was recorded."""
    if not all(r.get(key) is not None for side in ("lowrax", "peft") for r in runs[side]):
        return "-"
    return f"{format(_median(runs['lowrax'], key), fmt)} / {format(_median(runs['peft'], key), fmt)}"


def recipes_table(figures: dict) -> str:
    rows = ["| recipe | runs | lowrax peak | PEFT + torch peak | ratio (target <= 0.8x) | wall lowrax / PEFT |"
            " first step after, lowrax / PEFT | training tokens/s, lowrax / PEFT | peak spread lowrax / PEFT |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, recipe in figures["recipes"].items():
        runs = recipe["runs"]
        ratio = recipe["median_peak_ratio_lowrax_over_peft"]
        verdict = "met" if ratio <= TARGET_PEAK_RATIO else "**missed**"
        spread = recipe["peak_spread"]
        rows.append(f"| {RECIPE_NAMES.get(name, name)} | {len(runs['lowrax'])} "
                    f"| {_median(runs['lowrax'], 'peak_rss_mb') / 1024:.2f} GiB "
                    f"| {_median(runs['peft'], 'peak_rss_mb') / 1024:.2f} GiB | {ratio:.2f}x: {verdict} "
                    f"| {_median(runs['lowrax'], 'wall_s'):.0f} s / {_median(runs['peft'], 'wall_s'):.0f} s "
                    f"| {_timing(runs, 'seconds_to_first_step', '.1f')} s "
                    f"| {_timing(runs, 'real_tokens_per_s', '.0f')} "
                    f"| {100 * spread['lowrax']:.1f}% / {100 * spread['peft']:.1f}% |")
    rows.append("")
    machines = [(name, recipe.get("machine", figures.get("machine"))) for name, recipe in figures["recipes"].items()]
    if all(m == machines[0][1] for _, m in machines):
        rows.append(f"Medians of the runs; measured {_machine(machines[0][1])}.")
    else:
        rows.append("Medians of the runs; " + "; ".join(f"{name} measured {_machine(m)}" for name, m in machines) + ".")
    return "\n".join(rows)


def _machine(m: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    commit = f", at commit {m['commit']}" if m.get("commit") else ""
    return f"{m['date']} on {m['platform']}, {m['cpus']} cores, Python {m['python']}, {versions}{commit}"


def _table(figures: dict, header: str, body: list[str], footer: str) -> str:
    """A generated table: its command, the header row ("| a | b |"), its alignment row (the first column
    left, the rest right), the body, and a footer that ends with where and when it was measured."""
    columns = header.count("|") - 1
    return "\n".join([f"`{figures['command']}`", "", header, "| --- |" + " ---: |" * (columns - 1), *body,
                      "", f"{footer} Measured {_machine(figures['machine'])}."])


# memory_phases.py's labels, in the order a run passes through them
PHASE_ORDER = ("imports", "other setup", "data", "model", "tokenizer", "objective setup", "step setup", "scoring before",
               "compile + step 1", "train steps", "evaluation", "checkpoints", "held-out loss", "scoring after",
               "writing outputs")


def phases_table(report: dict) -> str:
    """scripts/memory_phases.py's report: peak RSS and seconds by phase, then the compiled programs."""
    phases = report["phases"]
    rows = [f"`{report['command']}`", "", "| phase | peak RSS MB | RSS at its end MB | seconds |", "| --- | ---: | ---: | ---: |"]
    for name in sorted(phases, key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else len(PHASE_ORDER)):
        r = phases[name]
        rows.append(f"| {name} | {r['peak_rss_mb']:.0f} | {r.get('end_rss_mb', 0):.0f} | {r['seconds']:.1f} |")
    rows += ["", "| program | compiled in | arguments MB | outputs MB | temporaries MB |", "| --- | --- | ---: | ---: | ---: |"]
    for p in report["programs"]:
        sizes = (f"({p['error']}) | | " if "error" in p else
                 f"{p['argument']:.0f} | {p['output']:.0f} | {p['temp']:.0f} ")
        rows.append(f"| {p['program']} | {p['phase']} | {sizes}|")
    rows += ["", f"Process peak RSS {report['peak_rss_mb']:.0f} MB, wall {report['wall_s']:.0f} s."]
    if "machine" in report:
        rows[-1] += f" Measured {_machine(report['machine'])}."
    return "\n".join(rows)


def _settings(overrides: list[str]) -> str:
    """A method's overrides of configs/default.yaml, less the method's name, as the table shows them."""
    shown = [o for o in overrides if not o.startswith("method=")]
    return " ".join(f"`{o}`" for o in shown) or "the preset's"


def variants_table(figures: dict) -> str:
    """scripts/bench_variants.py's report: the methods on the default task, step time against LoRA's."""
    methods = figures["methods"]
    lora_step = methods["lora"]["median_step_s"] if "lora" in methods else None
    rows = [f"`{figures['command']}`", "",
            "| method | settings | trainable params | adapter file | step time | vs LoRA "
            "| peak memory | eval loss | exact match before -> after |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in methods.items():
        ratio = "-" if lora_step is None else f"{r['median_step_s'] / lora_step:.2f}x"
        rows.append(f"| {name} | {_settings(r['overrides'])} | {r['trainable_params'] / 1e6:.2f} M "
                    f"| {r['adapter_bytes'] / 1e6:.2f} MB | {r['median_step_s']:.2f} s | {ratio} "
                    f"| {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['eval_loss']:.4f} "
                    f"| {r['metric_before']:.3f} -> {r['metric_after']:.3f} |")
    rows += ["", f"{figures['steps']} steps of 16 examples each; step time is the median after the first (compiling) "
                 f"step; peak memory is the whole process's. Measured {_machine(figures['machine'])}."]
    again = figures.get("remeasured")
    if again:
        rows[-1] += (f" The rows of {', '.join(again['methods'])} come from `{again['command']}` right after, on "
                     f"the same machine and commit: {again['why']}.")
    return "\n".join(rows)


OBJECTIVE_NAMES = {
    "sft": "SFT on the same rows",
    "dpo": "DPO, reference in the step",
    "dpo_precomputed": "DPO, precomputed reference",
    "orpo": "ORPO (NLL over the whole chosen rows)",
    "simpo": "SimPO",
    "kto": "KTO, reference in the step (rows + as many KL rows)",
    "kto_precomputed": "KTO, precomputed reference",
    "distill": "distillation (a second, merged model as teacher)",
}


def objectives_table(figures: dict) -> str:
    """scripts/bench_objectives.py's report: each objective's compiled step against SFT's on the same rows."""
    body = [f"| {OBJECTIVE_NAMES.get(name, name)} | {step['step_bytes'] / 1e9:.2f} | {figures['memory_over_sft'][name]:.2f} "
            f"| {step['step_s']:.2f} | {figures['time_over_sft'][name]:.2f} |" for name, step in figures["steps"].items()]
    return _table(figures, "| step | memory (GB) | x SFT | time (s) | x SFT |", body,
                  f"{figures['rows']} rows of {figures['seq']} tokens, LoRA r {figures['rank']} on every linear layer; "
                  "memory is the compiled step's arguments, outputs and temporaries (XLA's memory analysis), time the "
                  "best of the repeats.")


FORWARD_MEASURES = (("forward_tokens_per_s", "forward, {batch} x {seq} tokens, tokens/s"),
                    ("generate_b1_tokens_per_s", "greedy generation, batch 1, {new_tokens} new tokens, tokens/s"),
                    ("generate_b{batch}_tokens_per_s", "greedy generation, batch {batch}, {new_tokens} new tokens, tokens/s"))


def forward_table(figures: dict) -> str:
    """scripts/bench.py's default report: forward and cached generation throughput next to transformers'."""
    body = []
    for key, label in FORWARD_MEASURES:
        ours, theirs = figures["lowrax"][key.format(**figures)], figures["torch"][key.format(**figures)]
        body.append(f"| {label.format(**figures)} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")
    return _table(figures, "| measure | lowrax | transformers (torch) | ratio |", body,
                  f"{figures['model']}, {figures['dtype']}; the best of {figures.get('repeats', 3)} calls after a first "
                  f"(compiling) one, which took {figures['lowrax']['forward_compile_s']:.1f} s for the forward; torch with "
                  f"{figures['torch']['threads']} threads.")


LORA_ROWS = {
    "uniform": "uniform 4 x 128, each side's default allocator",
    "uniform_both_reuse": "uniform 4 x 128, both reusing freed memory",
    "uniform_remat": "uniform 4 x 128, both recomputing layers",
    "default_task": "the embedded task, batch 16, each side's default allocator",
}


def lora_table(figures: dict) -> str:
    """scripts/bench_lora.py --table: the LoRA step against PEFT's in each setting."""
    body = []
    for name, r in figures["rows"].items():
        ours, theirs = r["lowrax"], r["peft"]
        body.append(f"| {LORA_ROWS.get(name, name)} | {ours['tokens_per_s']:.0f} / {theirs['tokens_per_s']:.0f} "
                    f"| {r['tokens_per_s_ratio_lowrax_over_peft']:.2f}x "
                    f"| {ours['peak_rss_bytes'] / 1e9:.2f} / {theirs['peak_rss_bytes'] / 1e9:.2f} GB "
                    f"| {r['peak_memory_ratio_lowrax_over_peft']:.2f}x | {ours['share_of_matmul_ceiling']:.0%} |")
    return _table(figures, "| setting | tokens/s lowrax / PEFT | ratio | peak memory lowrax / PEFT | ratio "
                  "| lowrax at XLA's matmul rate |", body,
                  f"SmolLM2-135M, float32, LoRA r {figures['rank']} on every linear layer, AdamW with clipping; each side "
                  "in its own process (its peak includes loading the model and one compilation); tokens/s over "
                  f"{figures['steps']} timed steps (the task counts real tokens only). \"At XLA's matmul rate\": the step's "
                  "compiled FLOPs per second over the same process's float32 2048 x 2048 matmul (best of 3, so it "
                  "moves with the machine's noise too).")


MIXED_TARGETS = {"single": 0.8, "looping": 4.0}  # the targets of mixed-adapter generation against each


def adapters_table(figures: dict) -> str:
    """scripts/bench_adapters.py's report: mixed-adapter generation, then combine_adapters' times."""
    g = figures["generation"]
    rows = [f"`{figures['command']}`", "", f"| generation, batch of {figures['adapters']} prompts | tokens/s "
            "| mixed vs this | target |", "| --- | ---: | ---: | ---: |",
            f"| every row its own adapter (`adapter_names=`, one program) | {g['mixed']['tokens_per_s']:.1f} | | |"]
    labels = {"single": "every row the same adapter (an ordinary LoRA tree)",
              "looping": "one batch-1 call per adapter (looping)"}
    for name, label in labels.items():
        ratio, target = g[f"mixed_over_{name}"], MIXED_TARGETS[name]
        verdict = "" if ratio >= target else " (missed)"
        rows.append(f"| {label} | {g[name]['tokens_per_s']:.1f} | {ratio:.2f}x | >= {target:g}x{verdict} |")
    combos = list(figures["combine_two_adapters"].items())
    half = -(-len(combos) // 2)
    rows += ["", "| combination_type | seconds | | combination_type | seconds |", "| --- | ---: | --- | --- | ---: |"]
    for left, right in zip(combos[:half], combos[half:] + [None] * (2 * half - len(combos))):
        cell = f"`{right[0]}` | {right[1]['seconds']:.1f}" if right else " | "
        rows.append(f"| `{left[0]}` | {left[1]['seconds']:.1f} | | {cell} |")
    rows += ["", f"{figures['model']}, {figures['dtype']}, {figures['adapters']} random LoRA adapters of rank "
                 f"{figures['rank']} on every linear kernel, prompts of {figures['prompt_tokens']} tokens, "
                 f"{figures['new_tokens']} greedy new tokens each, best of {figures['repeats']} (compile time excluded); "
                 "combining two of the adapters, best of the calls after a first. "
                 f"Measured {_machine(figures['machine'])}."]
    return "\n".join(rows)


def pruning_table(figures: dict) -> str:
    """scripts/bench_pruning.py's report: SparseGPT's solve per kernel of one layer, for each pattern."""
    patterns = figures["patterns"]
    first = next(iter(patterns.values()))["kernels"]
    heads = " | ".join(f"{p if ':' in p else p + ' ' + format(figures['sparsity'], '.0%')}: s" for p in patterns)
    body = [f"| {name.split('.')[-1]} ({' x '.join(map(str, k['out_in']))}) | "
            + " | ".join(f"{p['kernels'][name]['seconds']:.3f}" for p in patterns.values())
            + f" | {k['program_mb']:.1f} |" for name, k in first.items()]
    totals = " | ".join(f"{p['layer_seconds']:.2f}" for p in patterns.values())
    peak = max(p["layer_peak_program_mb"] for p in patterns.values())
    body.append(f"| one layer ({len(first)} kernels) | {totals} | {peak:.1f} (peak) |")
    return _table(figures, f"| kernel (out x in) | {heads} | program MB |", body,
                  f"{figures['model']}'s layer 0, a random full-rank Hessian of {figures['hessian_tokens']} tokens, best "
                  f"of {figures['repeats']} solves after a first (compiling) one; program MB is the compiled solve's "
                  "arguments, outputs and temporaries.")


QLORA_ROWS = {"lora_fp32": "float32 (LoRA)", "lora_bf16": "bfloat16 (LoRA)",
              "qlora_fp32_compute": "NF4 + double quantization, fp32 compute (QLoRA)",
              "qlora_bf16_compute": "NF4 + double quantization, bf16 compute (QLoRA)"}


def qlora_table(figures: dict) -> str:
    """scripts/bench_lora.py --qlora: the LoRA step over float32, bfloat16 and NF4 bases."""
    reference, body = figures["lora_fp32"]["step_s"], []
    for side, label in QLORA_ROWS.items():
        r = figures[side]
        bits = f"{r['nf4_bits_per_weight']:.3f}" if "nf4_bits_per_weight" in r else ""
        body.append(f"| {label} | {r['base_bytes'] / 1e6:.0f} MB | {bits} | {r['step_s']:.2f} s "
                    f"| {r['step_s'] / reference:.2f}x | {r['step_program_bytes'] / 1e9:.2f} GB "
                    f"| {r['peak_rss_bytes'] / 1e9:.2f} GB |")
    return _table(figures, "| base weights | base bytes | bits per quantized weight | step time | vs LoRA fp32 "
                  "| step program bytes | peak resident memory |", body,
                  f"{figures['model']}, uniform {figures['batch']} x {figures['seq']} batch, LoRA r {figures['rank']} on "
                  "every linear layer, float32 adapters and AdamW, each side in its own process; "
                  f"{figures['note'].split('; ', 1)[-1]}.")


GRPO_ROWS = (("rollout_s", "rollout (sampling and scoring), s", "{:.2f}", "time"),
             ("update_s", "update (loss, gradient, AdamW), s", "{:.2f}", "time"),
             ("step_s", "step, s", "{:.2f}", "time"),
             ("rollout_tokens_per_s", "completion tokens sampled per second", "{:.0f}", "rate"),
             ("first_step_s", "first step (compilation, warm-up), s", "{:.1f}", "time"),
             ("peak_rss_bytes", "peak RSS of the process, GB", "{:.2f}", "memory"))


def grpo_table(figures: dict) -> str:
    """scripts/bench_grpo.py: one GRPO step split into rollout and update, next to TRL + PEFT's."""
    body = []
    for key, label, fmt, kind in GRPO_ROWS:
        ours, theirs = figures["lowrax"][key], figures["trl"][key]
        scale = 1e9 if kind == "memory" else 1
        ratio = f"{theirs / ours:.2f}x TRL's speed" if kind == "time" else \
            f"{ours / theirs:.2f}x TRL's {'memory' if kind == 'memory' else 'speed'}"
        body.append(f"| {label} | {fmt.format(ours / scale)} | {fmt.format(theirs / scale)} | {ratio} |")
    return _table(figures, "| measure | lowrax | TRL + PEFT | lowrax |", body,
                  f"{figures['model']}, float32, LoRA r {figures['rank']} on every linear layer; {figures['prompts']} "
                  f"prompts x {figures['generations']} completions of up to {figures['completion_tokens']} tokens per "
                  f"step, dapo loss, medians of {figures['lowrax']['steps_timed']} steps after the first; TRL with "
                  f"{figures['trl']['threads']} torch threads, each side in its own process.")


PRUNE_METHODS = (("magnitude", "magnitude"), ("wanda", "Wanda"), ("sparsegpt", "SparseGPT"))
PRUNE_SETTINGS = ("unstructured-0.25", "unstructured-0.5", "2:4")


def prune_quality_table(figures: dict) -> str:
    """scripts/prune_table.py: held-out perplexity of the pruned embedded SmolLM2, then after LoRA recovery
    (adapter on / merged keeping the sparsity)."""
    results = figures["results"]
    dense = results["dense"]
    unpruned = f"{dense['perplexity']:.2f}"
    recovered = f"{dense['recovered_adapter']:.2f}" if "recovered_adapter" in dense else "-"
    body = [f"| dense (unpruned) | {' | '.join([unpruned] * 3 + [recovered] * 3)} |"]
    for key, name in PRUNE_METHODS:
        rows = [results.get(f"{key}/{setting}", {}) for setting in PRUNE_SETTINGS]
        cells = [f"{r['perplexity']:.2f}" if r else "-" for r in rows]
        cells += [f"{r['recovered_adapter']:.2f} / {r['recovered_merged_sparse']:.2f}" if "recovered_adapter" in r
                  else "-" for r in rows]
        body.append(f"| {name} | {' | '.join(cells)} |")
    return _table(figures, "| method | 25% | 50% | 2:4 | 25% + LoRA | 50% + LoRA | 2:4 + LoRA |", body,
                  f"Held-out perplexity on 16 x 256 tokens of the embedded text set; calibration 32 x 256 tokens; "
                  f"each \"+ LoRA\" cell is the recovered model with its adapter on / merged with the sparsity kept, "
                  f"after `configs/recover.yaml` for {figures['recover_steps']} steps.")


TABLES = {"recipes": recipes_table, "phases": phases_table, "variants": variants_table, "objectives": objectives_table,
          "forward": forward_table, "lora": lora_table, "qlora": qlora_table, "adapters": adapters_table,
          "pruning": pruning_table, "grpo": grpo_table, "prune_quality": prune_quality_table}


def rendered_page(text: str) -> str:
    def replace(match):
        name = match.group(1)
        figures = json.loads((FIGURES / f"{name}.json").read_text())
        return f"<!-- generated: {name} -->\n{TABLES[name](figures)}\n<!-- end generated -->"

    return re.sub(r"<!-- generated: (\w+) -->\n.*?<!-- end generated -->", replace, text, flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a table differs")
    args = parser.parse_args()
    for page in PAGES:
        text = page.read_text()
        new = rendered_page(text)
        if args.check and new != text:
            sys.exit(f"{page} differs from its figures: run scripts/performance_tables.py")
        if not args.check and new != text:
            partial = page.with_name(page.name + ".partial")
            partial.write_text(new)
            partial.replace(page)


if __name__ == "__main__":
    main()
