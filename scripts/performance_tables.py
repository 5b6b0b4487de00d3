"""The docs' measured tables, generated from the benchmarks' JSON so that no table drifts from its command.

    .venv-test/bin/python scripts/bench.py --recipes --out docs/figures/recipes.json   # measure (about an hour)
    .venv-test/bin/python scripts/bench.py --variants --out docs/figures/variants.json  # the methods (about 40 min)
    .venv-test/bin/python scripts/bench.py --objectives --pairs 8 --seq 64 --out docs/figures/objectives.json
    .venv-test/bin/python scripts/memory_phases.py --out docs/figures/phases.json train.steps=3 \
        train.output_dir=runs/phases                                                     # a run's phases
    .venv-test/bin/python scripts/performance_tables.py                              # rewrite the tables
    .venv-test/bin/python scripts/performance_tables.py --check                      # exit 1 if a table differs

Each table sits in a page of PAGES (docs/performance.md, docs/preference-and-distillation.md) between
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
PAGES = (REPO / "docs" / "performance.md", REPO / "docs" / "preference-and-distillation.md")
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
    rows = [f"`{figures['command']}`", "", "| step | memory (GB) | x SFT | time (s) | x SFT |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name, step in figures["steps"].items():
        rows.append(f"| {OBJECTIVE_NAMES.get(name, name)} | {step['step_bytes'] / 1e9:.2f} "
                    f"| {figures['memory_over_sft'][name]:.2f} | {step['step_s']:.2f} | {figures['time_over_sft'][name]:.2f} |")
    rows += ["", f"{figures['rows']} rows of {figures['seq']} tokens, LoRA r {figures['rank']} on every linear layer; "
                 "memory is the compiled step's arguments, outputs and temporaries (XLA's memory analysis), time the "
                 f"best of the repeats. Measured {_machine(figures['machine'])}."]
    return "\n".join(rows)


TABLES = {"recipes": recipes_table, "phases": phases_table, "variants": variants_table, "objectives": objectives_table}


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
