"""The pruning page's perplexity table: held-out perplexity of the embedded SmolLM2 pruned by each method,
then after a short LoRA recovery run, kept as JSON (with its command and machine) that
`scripts/performance_tables.py` renders into docs/pruning.md.

    .venv-test/bin/python scripts/prune_table.py [--out docs/figures/prune_quality.json] [--recover-steps 20]

Calibration: 32 rows of 256 tokens of the embedded text set's calibration split; evaluation: 16
rows of 256 tokens of its held-out split (`lowrax.pruning.text`). Each setting's results are
added to the JSON file as they come (a rerun skips settings already there). Recovery (every
setting): `configs/recover.yaml` (LoRA r=16 on every linear layer, trained on the
calibration split's text), evaluated with the adapter on and after `lowrax merge` keeping the
sparsity (the deployable sparse model); the same LoRA run on the dense model is the reference
(the recovery text is in-domain, so it lowers perplexity below the dense model's by itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import command_line, machine_facts  # noqa: E402

import lowrax  # noqa: E402
from lowrax.pruning.text import perplexity, read_texts, token_windows  # noqa: E402

SETTINGS = [(method, sparsity, pattern) for method in ("magnitude", "wanda", "sparsegpt")
            for sparsity, pattern in ((0.25, "unstructured"), (0.5, "unstructured"), (0.5, "2:4"))]
RECOVERED = ("unstructured-0.25", "unstructured-0.5", "2:4")


def label(sparsity, pattern) -> str:
    return "2:4" if pattern == "2:4" else f"{pattern}-{sparsity}"


def recover(model, pruned, tokenizer, heldout, steps: int, workdir: Path) -> dict:
    from lowrax.train.runs import restore_run
    from lowrax.train.trainer import run_training

    base_dir = lowrax.save_pretrained(pruned, model, workdir / "pruned", tokenizer=tokenizer)
    cfg = lowrax.load_config("configs/recover.yaml", [f"model.path={base_dir}", f"train.steps={steps}",
                                                      f"train.output_dir={workdir / 'run'}"])
    start = time.perf_counter()
    run_training(cfg)
    _, _, adapted = restore_run(workdir / "run")
    kept = lowrax.merge(adapted, keep_sparsity=True)
    return {"recovered_adapter": perplexity(model, adapted, heldout),
            "recovered_merged_sparse": perplexity(model, kept, heldout),
            "recovery_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/figures/prune_quality.json")
    ap.add_argument("--recover-steps", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    kept = json.loads(out.read_text()) if out.exists() else {}
    if kept.get("recover_steps", args.recover_steps) != args.recover_steps:
        sys.exit(f"{out} holds results of --recover-steps {kept['recover_steps']}: use another --out")
    figures = {"command": command_line(""), "machine": kept.get("machine") or machine_facts(("jax",)),
               "recover_steps": args.recover_steps, "results": kept.get("results", {})}
    results = figures["results"]

    def save():
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(figures, indent=2) + "\n")
        partial.replace(out)

    model, params = lowrax.load_pretrained(None, progress=False)
    tokenizer = lowrax.load_tokenizer(None)
    calibration = token_windows(tokenizer, read_texts("embedded", "calibration"), 32, 256)
    heldout = token_windows(tokenizer, read_texts("embedded", "heldout"), 16, 256)
    if "dense" not in results:
        results["dense"] = {"perplexity": perplexity(model, params, heldout)}
        save()
    if "recovered_adapter" not in results["dense"] and args.recover_steps:
        # the same LoRA run on the unpruned model: the recovery data is in-domain, so this, not the
        # dense perplexity, is what a recovered model can at best come back to
        with tempfile.TemporaryDirectory() as tmp:
            results["dense"].update(recover(model, params, tokenizer, heldout, args.recover_steps, Path(tmp)))
        save()
    for method, sparsity, pattern in SETTINGS:
        key = f"{method}/{label(sparsity, pattern)}"
        if key in results:
            continue
        pruned, report = lowrax.prune(params, model, None if method == "magnitude" else calibration, method=method,
                                      sparsity=sparsity, pattern=pattern, measure_error=False)
        row = {"sparsity": report["sparsity"], "seconds": report["seconds"],
               "perplexity": perplexity(model, pruned, heldout)}
        if label(sparsity, pattern) in RECOVERED and args.recover_steps:
            with tempfile.TemporaryDirectory() as tmp:
                row.update(recover(model, pruned, tokenizer, heldout, args.recover_steps, Path(tmp)))
        results[key] = row
        save()
        print(key, row, flush=True)


if __name__ == "__main__":
    main()
