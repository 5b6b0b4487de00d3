"""Helpers shared by the benchmark scripts: timing, the torch reference model, JSON output."""

from __future__ import annotations

import argparse
import json
import time


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: model, batch shape, JSON output."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (fn must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_torch_causal_lm(path):
    """The transformers (torch, float32) model for the same checkpoint lowrax loads from `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    from lowrax.pretrained import resolve_model_path

    source = resolve_model_path(path)
    if source.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)


def emit(result: dict, out: str | None) -> None:
    """Print the result as JSON and, when asked, write it to `out`."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
