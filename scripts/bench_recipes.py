"""Real recipes, lowrax next to PEFT + transformers: peak resident memory and wall time of the whole command.

    .venv-test/bin/python scripts/bench.py --recipes [--only text,classifier] [--repeats 5] [--out recipes.json]

Each run is a fresh process (`lowrax train` on one side, this script's `--peft-side` on the other) whose
peak RSS is the kernel's count for that child (`os.wait4`), so imports, loading, compilation, evaluation
and the adapter's saving are all in it. The recipes:

  text        SmolLM2-135M-Instruct (the embedded GGUF, float32) on `embedded_text` (the Python
              documentation every CPython carries, as paragraphs), LoRA r 16 / alpha 32 on every linear
              layer, batch 4 of up to 256 tokens, one epoch, AdamW 2e-4 with cosine decay and clipping
              at 1.0, then the held-out loss. PEFT trains the same records (in file order; lowrax shuffles them).
  classifier  all-MiniLM-L6-v2 with a fresh 2-class head, LoRA r 8 on query and value, batch 16 of up to
              128 tokens, 10 epochs of 140 rows (88 steps), AdamW 2e-3, then accuracy on 500 held-out rows:
              the sentiment recipe of scripts/compare_sentiment.py (its data come from PyPI).

Padding, `--padding longest` (the default): neither side pads a training batch further than it needs,
PEFT to the batch's longest row (as transformers' `DataCollatorWithPadding` does), lowrax to a quarter,
a half or all of the row length (`data.trim_padding`). `--padding max`: both pad every training batch
to the full row length (256 / 128 tokens), the same work on both sides; its results are keyed
`text_padded` / `classifier_padded`.

The JSON holds, per recipe, every run's peak RSS (MiB), wall seconds,
seconds from its start to the end of its first training step, and real (unpadded) tokens per second of
training; and per recipe the median ratios lowrax / PEFT, the spread (max / min - 1) of each side's
peaks and the machine and commit it was measured on. `scripts/performance_tables.py` turns it into the table on the docs' performance page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()  # a PEFT child's start, for its seconds to first step
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import machine_facts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEXT = dict(r=16, alpha=32, batch=4, seq_len=256, lr=2e-4)


def prepare_text(scratch: Path) -> tuple[Path, Path, Path]:
    """The text recipe's inputs, shared by both sides: the embedded SmolLM2 written as an HF directory
    (float32 safetensors, tokenizer) and its `embedded_text` train / held-out records as JSONL."""
    import lowrax
    from lowrax.train.config import load_config
    from lowrax.train.data import load_records

    model_dir = scratch / "smollm2-hf"
    model, params = lowrax.load_pretrained(None, progress=False)
    lowrax.save_pretrained(params, model, model_dir, tokenizer=lowrax.load_tokenizer(None))
    train, held_out = load_records(load_config(None, ["data.source=embedded_text"]).data)
    files = []
    for name, rows in (("text-train.jsonl", train), ("text-held-out.jsonl", held_out)):
        (scratch / name).write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        files.append(scratch / name)
    return model_dir, files[0], files[1]


def text_overrides(out: Path, inputs: tuple[Path, Path, Path]) -> list[str]:
    model_dir, train, held_out = inputs
    return [f"model.path={model_dir}", f"data.source={train}", f"data.eval_source={held_out}",
            f"data.seq_len={TEXT['seq_len']}", f"train.batch_size={TEXT['batch']}", "train.epochs=1",
            f"lora.r={TEXT['r']}", f"lora.alpha={TEXT['alpha']}", "lora.target_modules=all-linear",
            f"optim.learning_rate={TEXT['lr']}", "train.quick=true", "train.save_every=0", f"train.output_dir={out}"]


def classifier_overrides(out: Path, data: tuple[Path, Path]) -> list[str]:
    from compare_sentiment import EVAL_ROWS, RECIPE
    from lowrax.models.pretrained import embedded_minilm_path

    return [f"model.path={embedded_minilm_path()}", "model.task=classification", f"data.source={data[0]}",
            f"data.eval_source={data[1]}", f"data.seq_len={RECIPE['seq_len']}", f"train.batch_size={RECIPE['batch']}",
            f"train.epochs={RECIPE['epochs']}", f"lora.r={RECIPE['r']}", f"lora.alpha={RECIPE['alpha']}",
            f"lora.target_modules={json.dumps(RECIPE['targets'])}", f"optim.learning_rate={RECIPE['lr']}",
            f"train.eval_examples={EVAL_ROWS}", "train.quick=true", "train.save_every=0", f"train.output_dir={out}"]


TIMINGS = ("seconds_to_first_step", "real_tokens_per_s")


def measured(command: list[str], summary: Path | None = None) -> dict:
    """Run `command` as a child: its peak RSS (MiB, from the kernel), wall seconds, and its TIMINGS, read
    from `summary` (lowrax's summary.json) or else from the JSON object the child prints last."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True)
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{stderr[-3000:]}")
        out.seek(0)
        printed = out.read().strip().splitlines()
    result = {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - start}
    reported = json.loads(summary.read_text()) if summary is not None else json.loads(printed[-1])
    return {**result, **{k: reported.get(k) for k in TIMINGS}}


def peft_text_side(padding: str, model_dir: str, train_file: str, held_out_file: str) -> None:
    """The text recipe with PEFT + transformers (float32 on the CPU): only torch, transformers and peft
    are imported, as in a PEFT user's script."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=TEXT["r"], lora_alpha=TEXT["alpha"], target_modules="all-linear"))
    texts = [json.loads(line)["text"] for line in Path(train_file).read_text().splitlines()]
    held = [json.loads(line)["text"] for line in Path(held_out_file).read_text().splitlines()]
    steps = math.ceil(len(texts) / TEXT["batch"])
    train_start, tokens, first_step = time.perf_counter(), 0, None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TEXT["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

    def encoded(part):
        enc = tokenizer([t + tokenizer.eos_token for t in part], padding=padding, truncation=True,
                        max_length=TEXT["seq_len"], return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return enc, labels

    model.train()
    for step in range(steps):
        enc, labels = encoded(texts[step * TEXT["batch"]:(step + 1) * TEXT["batch"]])
        model(**enc, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        tokens += int(enc["attention_mask"].sum())
        first_step = first_step or time.perf_counter() - STARTED
    train_seconds = time.perf_counter() - train_start
    model.eval()
    with torch.no_grad():
        for i in range(0, len(held), TEXT["batch"]):
            enc, labels = encoded(held[i:i + TEXT["batch"]])
            model(**enc, labels=labels)
    model.save_pretrained(tempfile.mkdtemp())
    print(json.dumps({"seconds_to_first_step": first_step, "real_tokens_per_s": tokens / train_seconds}))


def peft_classifier_side(padding: str, model_dir: str, train: str, held_out: str) -> None:
    from compare_sentiment import peft_run  # torch, transformers and peft only

    print(json.dumps(peft_run(Path(model_dir), Path(train), Path(held_out), 0, started=STARTED, padding=padding)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="text,classifier")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--sdist", help="a downloaded vaderSentiment-3.3.2.tar.gz (the classifier's data)")
    parser.add_argument("--padding", choices=("longest", "max"), default="longest",
                        help="training batches padded as each side needs (longest) or both to the full length (max)")
    parser.add_argument("--peft-side", nargs="+", help=argparse.SUPPRESS)  # a child process: one PEFT run
    args = parser.parse_args()
    if args.peft_side:
        side = peft_text_side if args.peft_side[0] == "text" else peft_classifier_side
        return side(*args.peft_side[1:])
    peft_padding = "longest" if args.padding == "longest" else "max_length"
    trim = [] if args.padding == "longest" else ["data.trim_padding=false"]
    scratch = Path(tempfile.mkdtemp(prefix="lowrax-recipes-"))
    results: dict = {}
    try:
        for recipe in args.only.split(","):
            if recipe == "text":
                inputs = prepare_text(scratch)
                lowrax_args = lambda out, inputs=inputs: text_overrides(out, inputs) + trim  # noqa: E731
                peft_args = ["text", peft_padding, *map(str, inputs)]
            else:
                from compare_sentiment import rated_snippets, vader_sdist, write_split

                data = write_split(rated_snippets(Path(args.sdist) if args.sdist else vader_sdist(scratch)), scratch)
                lowrax_args = lambda out, data=data: classifier_overrides(out, data) + trim  # noqa: E731
                from lowrax.models.pretrained import embedded_minilm_path

                peft_args = ["classifier", peft_padding, str(embedded_minilm_path()), str(data[0]), str(data[1])]
            runs = {"lowrax": [], "peft": []}
            for i in range(args.repeats):
                out = scratch / f"{recipe}-{i}"
                runs["lowrax"].append(measured([sys.executable, "-m", "lowrax", "train", *lowrax_args(out)],
                                               summary=out / "summary.json"))
                shutil.rmtree(out, ignore_errors=True)
                runs["peft"].append(measured([sys.executable, __file__, "--peft-side", *peft_args]))
                print(f"{recipe} run {i + 1}: lowrax {runs['lowrax'][-1]}, peft {runs['peft'][-1]}", flush=True)
            peaks = {side: [r["peak_rss_mb"] for r in rs] for side, rs in runs.items()}
            results[recipe if args.padding == "longest" else f"{recipe}_padded"] = {"runs": runs,
                               "median_peak_ratio_lowrax_over_peft": statistics.median(peaks["lowrax"]) / statistics.median(peaks["peft"]),
                               "peak_spread": {side: max(p) / min(p) - 1 for side, p in peaks.items()},
                               "median_wall_ratio_lowrax_over_peft": statistics.median(r["wall_s"] for r in runs["lowrax"])
                               / statistics.median(r["wall_s"] for r in runs["peft"]),
                               "median_tokens_per_s_ratio_lowrax_over_peft":
                               statistics.median(r["real_tokens_per_s"] for r in runs["lowrax"])
                               / statistics.median(r["real_tokens_per_s"] for r in runs["peft"]),
                               "machine": machine_facts()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {"recipes": results}
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
