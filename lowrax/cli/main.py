"""The `lowrax` command line: thin wrappers over the library.

    lowrax train [CONFIG.yaml] [section.key=value ...]   (default: configs/default.yaml)
    lowrax generate [--model PATH] "prompt" ["prompt" ...]
    lowrax convert --model PATH OUT_DIR        (e.g. the embedded GGUF -> HF safetensors)
    lowrax export-peft RUN_DIR OUT_DIR         (a run's adapter in PEFT format)
    lowrax import-peft ADAPTER_DIR RUN_DIR [--model PATH] [section.key=value ...]
    lowrax merge RUN_DIR OUT_DIR               (base + adapters merged, HF safetensors)
"""

from __future__ import annotations

import argparse
import sys
import time

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype(name: str):
    import jax.numpy as jnp

    return getattr(jnp, _DTYPES[name])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="parameter and compute dtype")


def cmd_generate(args) -> int:
    import lowrax

    model, params = lowrax.load_pretrained(args.model, dtype=_dtype(args.dtype))
    tokenizer = lowrax.load_tokenizer(args.model)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    start = time.perf_counter()
    texts = lowrax.generate(model, params, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=chat)
    elapsed = time.perf_counter() - start
    for prompt, text in zip(args.prompts, texts):
        print(f">>> {prompt}\n{text}\n")
    print(f"[{len(texts)} prompt(s), {elapsed:.1f}s including compilation]", file=sys.stderr)
    return 0


def _default_config() -> str | None:
    from pathlib import Path

    for candidate in (Path.cwd() / "configs" / "default.yaml", Path(__file__).resolve().parent.parent / "configs" / "default.yaml"):
        if candidate.exists():
            return str(candidate)
    return None


def cmd_train(args) -> int:
    from lowrax.train.config import load_config
    from lowrax.train.trainer import run_training

    items = list(args.items)
    config_path = items.pop(0) if items and "=" not in items[0] else _default_config()
    cfg = load_config(config_path, items)
    print(f"config: {config_path or 'built-in defaults'}; output: {cfg.train.output_dir}", file=sys.stderr)
    summary = run_training(cfg)
    if summary.get("metric"):
        print(f"{summary['metric']}: {summary.get('metric_before', float('nan')):.3f} before -> "
              f"{summary['metric_after']:.3f} after training")
    return 0


def cmd_convert(args) -> int:
    import lowrax

    model, params = lowrax.load_pretrained(args.model, dtype=_dtype(args.dtype))
    tokenizer = lowrax.load_tokenizer(args.model)
    out = lowrax.save_pretrained(params, model, args.out_dir, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_export_peft(args) -> int:
    from lowrax.train.runs import export_peft

    print(f"wrote {export_peft(args.run_dir, args.out_dir, overwrite=args.overwrite)}")
    return 0


def cmd_import_peft(args) -> int:
    from lowrax.train.runs import import_peft

    print(f"wrote {import_peft(args.adapter_dir, args.run_dir, args.model, args.overrides)}")
    return 0


def cmd_merge(args) -> int:
    from lowrax.train.runs import merge_run

    print(f"wrote {merge_run(args.run_dir, args.out_dir, overwrite=args.overwrite, requantize=args.requantize)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrax", description="Low-rank fine-tuning of HF transformers in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="adapter fine-tune (default: LoRA on SmolLM2 and the embedded date task)")
    t.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value]",
                   help="a YAML preset (default configs/default.yaml) followed by overrides such as lora.r=8 "
                        "or method=ia3")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with a causal LM")
    _add_model_args(g)
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a model (HF directory or GGUF) as an HF safetensors directory")
    _add_model_args(c)
    c.add_argument("out_dir")
    c.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export-peft", help="write a training run's adapter in PEFT format")
    e.add_argument("run_dir", help="a `lowrax train` output directory (config.yaml + checkpoints/)")
    e.add_argument("out_dir")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_peft)

    i = sub.add_parser("import-peft", help="turn a PEFT adapter into a lowrax run directory (orbax checkpoint)")
    i.add_argument("adapter_dir", help="directory with adapter_config.json + adapter_model.safetensors")
    i.add_argument("run_dir", help="new run directory to create")
    i.add_argument("--model", default=None, help="base model the adapter belongs to (default: embedded SmolLM2)")
    i.add_argument("overrides", nargs="*", metavar="section.key=value", help="settings for continuing training")
    i.set_defaults(func=cmd_import_peft)

    m = sub.add_parser("merge", help="merge a run's adapters into the base and write HF safetensors")
    m.add_argument("run_dir")
    m.add_argument("out_dir")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--requantize", action="store_true",
                   help="QLoRA runs: save 4-bit NF4 weights again (reports the rounding error it adds)")
    m.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lowrax.errors import LowraxError
    from lowrax.train.host_memory import reuse_freed_host_memory

    reuse_freed_host_memory()  # before the first JAX computation; see lowrax/train/host_memory.py

    try:
        return args.func(args)
    except (LowraxError, FileExistsError) as e:
        print(f"lowrax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
