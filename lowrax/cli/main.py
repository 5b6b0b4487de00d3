"""The `lowrax` command line: thin wrappers over the library.

    lowrax train [CONFIG.yaml] [section.key=value ...]   (default: configs/default.yaml)
    lowrax generate [--model PATH] [--adapter RUN_OR_ADAPTER_DIR] "prompt" ["prompt" ...]
    lowrax generate --adapter a=DIR --adapter b=DIR [--prompt-adapters a,b] "prompt" "prompt"   (one adapter per prompt)
    lowrax chat [--model PATH] [--adapter RUN_OR_ADAPTER_DIR]   (interactive, streamed)
    lowrax convert --model PATH OUT_DIR        (e.g. the embedded GGUF -> HF safetensors)
    lowrax export-peft RUN_DIR OUT_DIR         (a run's adapter in PEFT format)
    lowrax import-peft ADAPTER_DIR RUN_DIR [--model PATH] [CONFIG.yaml] [section.key=value ...]
    lowrax merge RUN_DIR OUT_DIR [--sparsity keep|fill]   (base + adapters merged, HF safetensors)
    lowrax prune [CONFIG.yaml] [section.key=value ...]   (magnitude / Wanda / SparseGPT; default: configs/prune.yaml's)
    lowrax merge-adapters --adapter a=DIR --adapter b=DIR --weights 0.7 0.3 OUT_DIR [--combination-type svd]
    lowrax merge-models OUT_DIR --base PATH --model PATH --model PATH --weights 0.6 0.4 [--method ties --density 0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# The combination types of `lowrax merge-adapters` (kept here so --help does not import jax).
COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd",
                     "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "linear")
# What `lowrax train --help` lists, kept here for the same reason (tests/test_cli_basics.py checks
# them against the registries).
TRAIN_METHODS = ("adalora", "beft", "boft", "bottleneck", "c3a", "deft", "delora", "fourierft", "frod", "glora", "gralora", "hira", "hra",
                 "ia3", "lily", "ln_tuning", "loha", "lokr", "lora", "miss", "oft", "osf", "p_tuning", "peanut", "prefix_tuning",
                 "prompt_tuning", "pvera", "randlora", "road", "shira", "supertuning", "tinylora", "trainable_tokens", "unilora", "vblora")
TRAIN_OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto", "distill", "grpo")
TRAIN_TASKS = ("causal_lm", "classification", "seq2seq")
TRAIN_EPILOG = f"""\
methods (method=NAME, settings in the section NAME): {", ".join(TRAIN_METHODS)}
  LoRA variants: lora.variant=lora_fa|dora|vera|delta_lora, lora.use_rslora=true
  LoRA inits: lora.init=pissa|pissa_niter_K|olora|loftq|corda|eva|lora_ga|mica|orthogonal|gaussian
objectives (objective=NAME): {", ".join(TRAIN_OBJECTIVES)}
tasks (model.task=NAME): {", ".join(TRAIN_TASKS)}

examples:
  lowrax train                                        the default fine-tune (configs/default.yaml)
  lowrax train data.source=my.jsonl model.path=DIR train.epochs=3
  lowrax train data.source=notes.txt train.quick=true
  lowrax train configs/qlora.yaml lora.r=8            a preset, then overrides
  lowrax train train.output_dir=runs/default train.steps=60   continue a run
  lowrax train --help-config method=ia3               every key of that run, with its value and meaning
"""
OVERWRITE_HELP = ("replace the output directory if lowrax wrote it (never a directory of other files, nor the "
                  "command's input)")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype(name: str):
    import jax.numpy as jnp

    return getattr(jnp, _DTYPES[name])


def _add_model_args(p: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    p.add_argument("--model", default=None,
                   help="HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=dtype_default, choices=sorted(_DTYPES),
                   help="parameter and compute dtype" + ("" if dtype_default else " (default: the run's, or float32)"))


def _add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    _add_model_args(p, dtype_default=None)
    p.add_argument("--adapter", action="append", default=None, metavar="RUN_OR_ADAPTER_DIR",
                   help="a `lowrax train` run directory or a PEFT adapter directory, on its base model "
                        "(or the --model given); several LoRA adapters as NAME=DIR, repeated")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens generated per prompt (default {max_new_tokens}; stops earlier at the end-of-text token)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --temperature > 0)")


def _load_for_generation(args):
    """(model, params, tokenizer, chat setting the model was trained with or None) for generate / chat."""
    import lowrax

    if args.adapter and any("=" in a for a in args.adapter):
        from lowrax.train.adapter_sets import load_named_adapters, parse_named

        adapted = load_named_adapters(parse_named(args.adapter), args.model, args.dtype)
        print(f"[{adapted.source}]", file=sys.stderr)
        return adapted.model, adapted.params, adapted.tokenizer, adapted.chat
    if args.adapter is not None:
        from lowrax.errors import LowraxError
        from lowrax.train.runs import load_adapted

        if len(args.adapter) > 1:
            raise LowraxError("several --adapter need names: --adapter a=DIR --adapter b=DIR")
        adapted = load_adapted(args.adapter[0], args.model, args.dtype)
        print(f"[{adapted.source}]", file=sys.stderr)
        return adapted.model, adapted.params, adapted.tokenizer, adapted.chat
    model, params = lowrax.load_pretrained(args.model, dtype=_dtype(args.dtype or "float32"))
    return model, params, lowrax.load_tokenizer(args.model), None


def cmd_generate(args) -> int:
    import lowrax

    model, params, tokenizer, trained_chat = _load_for_generation(args)
    adapter_names = _prompt_adapters(args, params)
    # auto: as the run was trained (a run's prompts with or without the template), else the tokenizer's default
    chat = {"auto": trained_chat, "on": True, "off": False}[args.chat]
    start = time.perf_counter()
    texts = lowrax.generate(model, params, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=chat,
                            adapter_names=adapter_names)
    elapsed = time.perf_counter() - start
    for i, (prompt, text) in enumerate(zip(args.prompts, texts)):
        print(f">>> {prompt}" + (f"  [{adapter_names[i]}]" if adapter_names else "") + f"\n{text}\n")
    print(f"[{len(texts)} prompt(s), {elapsed:.1f}s including compilation]", file=sys.stderr)
    return 0


def _prompt_adapters(args, params) -> list[str] | None:
    """--prompt-adapters a,b,...: one adapter name per prompt (or "__base__"), checked against those loaded."""
    from lowrax.adapters.named.named import adapter_names
    from lowrax.core.slot_directory import BASE_NAME, has_named_adapters
    from lowrax.errors import LowraxError

    if args.prompt_adapters is None:
        return None
    if not has_named_adapters(params):
        raise LowraxError("--prompt-adapters picks among named adapters: load them as --adapter NAME=DIR")
    names = [n.strip() for n in args.prompt_adapters.split(",")]
    if len(names) != len(args.prompts):
        raise LowraxError(f"--prompt-adapters names {len(names)} adapter(s) for {len(args.prompts)} prompt(s): give one "
                          "per prompt, comma-separated")
    loaded = adapter_names(params)
    for name in names:
        if name != BASE_NAME and name not in loaded:
            raise LowraxError(f"--prompt-adapters: no adapter named {name!r} (loaded: {', '.join(loaded)}; "
                              f"{BASE_NAME} for the base model)")
    return names


def cmd_chat(args) -> int:
    from lowrax.cli.chat import chat_loop
    from lowrax.models.generate import SamplingConfig

    model, params, tokenizer, trained_chat = _load_for_generation(args)
    if trained_chat is False:
        print("note: this run was trained on prompts without the chat template; `lowrax generate --adapter` "
              "prompts it as it was trained", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    chat_loop(model, params, tokenizer, sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
              max_new_tokens=args.max_new_tokens, seed=args.seed, system=args.system, interactive=interactive)
    return 0


def _default_config(objective: str = "sft") -> str | None:
    """The embedded task's preset: configs/OBJECTIVE.yaml (dpo, distill, grpo) where there is one, else
    configs/default.yaml; of the working directory, else of the source tree lowrax runs from (an editable
    install), so `lowrax train` trains the same run from any directory."""
    for name in (f"{objective}.yaml", "default.yaml"):
        for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
            if (root / "configs" / name).exists():
                return str(root / "configs" / name)
    return None


def train_config(items: list[str]):
    """(config, where it came from) for `lowrax train [CONFIG.yaml] [key=value ...]`.

    Without a preset, a `train.output_dir` that already holds a run continues that run:
    its own config.yaml is the preset, and the overrides apply on top (e.g. train.steps=60).
    Otherwise the overrides apply to the embedded task's preset (configs/OBJECTIVE.yaml, else
    configs/default.yaml) when the run trains on that task, and to the built-in defaults when `data.source` names other data (the
    preset's short rows and scored positions fit only the embedded task).
    With a preset, the run's config must match it (the trainer checks).
    """
    from lowrax.train.config import load_config, load_run_config

    items = list(items)
    if items and "=" not in items[0]:
        path = items.pop(0)
        return load_config(path, items), path
    own_data = load_config(None, items)
    preset = _default_config(own_data.objective)
    cfg, source = (own_data, "built-in defaults") if own_data.data.source != "default" or preset is None else \
        (load_config(preset, items), preset)
    out = Path(cfg.train.output_dir)
    if (out / "config.yaml").exists():
        return load_run_config(out, items), f"{out / 'config.yaml'} (the run being continued)"
    return cfg, source


def cmd_train(args) -> int:
    cfg, source = train_config(args.items)
    if args.help_config:
        from lowrax.train.config_reference import config_reference

        print(f"# the config of `lowrax train {' '.join(args.items)}`: {source}\n" + config_reference(cfg), end="")
        return 0
    from lowrax.train.trainer import run_training

    print(f"config: {source}; output: {cfg.train.output_dir}", file=sys.stderr)
    summary = run_training(cfg, started=args.started)
    if summary.get("steps") == 0:  # train.steps=0: scored, not trained
        if summary.get("eval_loss_before") is not None:
            print(f"held-out loss before training: {summary['eval_loss_before']:.4f}")
        if summary.get("metric_before") is not None:
            print(f"{summary['metric']} before training: {summary['metric_before']:.3f}")
        return 0
    if summary.get("eval_loss") is not None:
        before = summary.get("eval_loss_before")
        before = f"{before:.4f} before" if before is not None else "not measured before"
        print(f"held-out loss: {before} -> {summary['eval_loss']:.4f} after training")
    elif summary.get("final_loss") is not None and summary.get("objective") != "grpo":  # an RL loss says little
        print(f"training loss at the last step: {summary['final_loss']:.4f} (no held-out data to measure)")
    if summary.get("metric"):
        before = summary.get("metric_before")
        before = f"{before:.3f} before" if before is not None else "not scored before"
        teacher = summary.get("teacher_metric")
        teacher = f" (the teacher's: {teacher:.3f})" if teacher is not None else ""
        what = "held-out mean reward" if summary["metric"] == "reward" else summary["metric"]
        print(f"{what}: {before} -> {summary['metric_after']:.3f} after training{teacher}")
    return 0


def cmd_convert(args) -> int:
    import lowrax
    from lowrax.core.atomic import check_output

    check_output(args.out_dir, args.overwrite, (args.model,))
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

    items = list(args.items)
    preset = items.pop(0) if items and "=" not in items[0] else _default_config()
    out = import_peft(args.adapter_dir, args.run_dir, args.model, items, preset=preset)
    print(f"wrote {out} (settings: {preset or 'built-in defaults'} with the adapter's own); "
          f"continue training it with: lowrax train train.output_dir={out} [train.steps=N]")
    return 0


def cmd_merge(args) -> int:
    from lowrax.train.runs import merge_run

    out = merge_run(args.run_dir, args.out_dir, overwrite=args.overwrite, requantize=args.requantize,
                    keep_sparsity=args.sparsity == "keep")
    print(f"wrote {out}")
    return 0


def cmd_prune(args) -> int:
    from lowrax.pruning.config import load_prune_config
    from lowrax.pruning.run import run_prune

    preset = args.items[0] if args.items and "=" not in args.items[0] else None
    overrides = args.items[1:] if preset is not None else args.items
    run_prune(load_prune_config(preset, overrides), overwrite=args.overwrite)
    return 0


def cmd_merge_adapters(args) -> int:
    from lowrax.errors import LowraxError
    from lowrax.train.adapter_sets import merge_adapter_dirs, parse_named

    named = parse_named(args.adapter)
    if len(args.weights) != len(named):
        raise LowraxError(f"--weights gives {len(args.weights)} weight(s) for {len(named)} adapter(s): one per --adapter")
    options = {k: getattr(args, k) for k in ("svd_rank", "svd_clamp", "density", "majority_sign_method")}
    out = merge_adapter_dirs(named, args.weights, args.out_dir, args.combination_type, args.model,
                             overwrite=args.overwrite, seed=args.seed, **options)
    print(f"wrote {out} ({args.combination_type} of {', '.join(n for n, _ in named)})")
    return 0


def cmd_merge_models(args) -> int:
    import jax

    from lowrax.merging.checkpoints import merge_checkpoints

    options = dict(weights=args.weights, normalize=args.normalize, rescale=args.rescale, lambda_=args.scale,
                   t=args.t, consensus=args.consensus, key=jax.random.key(args.seed))
    if args.density is not None:
        options["density"] = args.density[0] if len(args.density) == 1 else args.density
    out = merge_checkpoints(args.base, args.model, args.out_dir, args.method, overwrite=args.overwrite, **options)
    print(f"wrote {out} ({args.method} of {len(args.model)} model(s))")
    return 0


def _add_run_commands(sub) -> None:
    """train, generate, chat, convert."""
    t = sub.add_parser("train", help="adapter fine-tune (default: LoRA on SmolLM2 and the embedded date task)",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value]",
                   help="a YAML preset (default configs/default.yaml) followed by overrides such as lora.r=8 "
                        "or method=ia3")
    t.add_argument("--help-config", action="store_true",
                   help="print every config key with the value this command would use, its form and what it does "
                        "(as a YAML preset), and exit; add method=NAME to see that method's section")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text with a causal LM (and a trained adapter)")
    _add_generation_args(g, max_new_tokens=64)
    g.add_argument("prompts", nargs="+", help="one or more prompts")
    g.add_argument("--prompt-adapters", default=None, metavar="NAME,NAME,...",
                   help="with --adapter NAME=DIR: the adapter of each prompt, comma-separated (__base__: none); "
                        "default: the first adapter for every prompt")
    g.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: as the --adapter run was trained; "
                        "without one, when the tokenizer has a template)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="talk to a chat model (and a trained adapter), replies streamed as they come")
    _add_generation_args(ch, max_new_tokens=256)
    ch.add_argument("--system", default=None, help="a system message to start the conversation with")
    ch.set_defaults(func=cmd_chat)

    c = sub.add_parser("convert", help="write a model (HF directory or GGUF) as an HF safetensors directory")
    _add_model_args(c)
    c.add_argument("out_dir", help="new directory for config.json, model.safetensors and the tokenizer")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    c.set_defaults(func=cmd_convert)


def _add_adapter_commands(sub) -> None:
    """export-peft, import-peft, merge, prune."""
    e = sub.add_parser("export-peft", help="write a training run's adapter in PEFT format")
    e.add_argument("run_dir", help="a `lowrax train` output directory (config.yaml + checkpoints/)")
    e.add_argument("out_dir", help="new directory for adapter_config.json and adapter_model.safetensors")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.set_defaults(func=cmd_export_peft)

    i = sub.add_parser("import-peft", help="turn a PEFT adapter into a lowrax run directory (orbax checkpoint)")
    i.add_argument("adapter_dir", help="directory with adapter_config.json + adapter_model.safetensors")
    i.add_argument("run_dir", help="new run directory to create")
    i.add_argument("--model", default=None,
                   help="base model the adapter belongs to (default: the one its adapter_config.json names)")
    i.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value]",
                   help="settings for continuing training: a preset (default configs/default.yaml) and overrides")
    i.set_defaults(func=cmd_import_peft)

    m = sub.add_parser("merge", help="merge a run's adapters into the base and write HF safetensors")
    m.add_argument("run_dir", help="a `lowrax train` output directory")
    m.add_argument("out_dir", help="new directory for the merged model (HF safetensors, with the tokenizer)")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    m.add_argument("--requantize", action="store_true",
                   help="QLoRA runs: save 4-bit NF4 weights again (reports the rounding error it adds)")
    m.add_argument("--sparsity", choices=("keep", "fill"), default="keep",
                   help="a pruned base: keep its zeros (the adapter's delta masked; default) or fill them with the delta")
    m.set_defaults(func=cmd_merge)

    pr = sub.add_parser("prune", help="prune a model's linear layers (magnitude, Wanda, SparseGPT) and save it")
    pr.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value]",
                    help="a preset (e.g. configs/prune.yaml; default: the built-in defaults) and overrides")
    pr.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pr.set_defaults(func=cmd_prune)


def _add_merging_commands(sub) -> None:
    """merge-adapters, merge-models."""
    ma = sub.add_parser("merge-adapters", help="combine LoRA adapters into one (PEFT's add_weighted_adapter)")
    ma.add_argument("out_dir", help="new directory for the combined PEFT LoRA adapter")
    ma.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                    help="a PEFT LoRA adapter directory or a `lowrax train` run, repeated")
    ma.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per --adapter")
    ma.add_argument("--combination-type", default="svd", choices=list(COMBINATION_TYPES),
                    help="how the adapters are combined, as PEFT's add_weighted_adapter (default: svd)")
    ma.add_argument("--svd-rank", type=int, default=None, help="svd types: the new rank (default: the largest)")
    ma.add_argument("--svd-clamp", type=float, default=None, help="svd types: clamp at this quantile")
    ma.add_argument("--density", type=float, default=None, help="ties, dare, magnitude_prune: the fraction kept")
    ma.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"],
                    help="ties types: elect each entry's sign by total magnitude or by count (default: total)")
    ma.add_argument("--seed", type=int, default=0, help="dare types: the seed of the random drop")
    ma.add_argument("--model", default=None, help="the base model (default: the one the first adapter names)")
    ma.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    ma.set_defaults(func=cmd_merge_adapters)

    mm = sub.add_parser("merge-models", help="merge fine-tuned checkpoints of one architecture (as mergekit does)")
    mm.add_argument("out_dir", help="new directory for the merged model (HF safetensors)")
    mm.add_argument("--method", default="task_arithmetic", choices=list(MERGE_METHODS),
                    help="the merging rule, as mergekit's (default: task_arithmetic)")
    mm.add_argument("--base", default=None, help="the model the others were fine-tuned from (all but linear need it)")
    mm.add_argument("--model", action="append", required=True, help="a fine-tuned checkpoint (HF dir or .gguf), repeated")
    mm.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per --model")
    mm.add_argument("--density", type=float, nargs="+", default=None,
                    help="ties, dare: the fraction of each task vector kept (one, or one per --model)")
    mm.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="divide by the (agreeing) weights' sum (default: on for ties and linear)")
    mm.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                    help="rescale kept elements to the task vector's L1 norm (default: on for dare)")
    mm.add_argument("--lambda", dest="scale", type=float, default=1.0, help="scale of the merged task vector")
    mm.add_argument("--t", type=float, default=0.5, help="slerp: 0 is the base, 1 the model")
    mm.add_argument("--consensus", default="sum", choices=["sum", "count"], help="ties: how signs are elected")
    mm.add_argument("--seed", type=int, default=0, help="dare: the seed of the random drop")
    mm.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    mm.set_defaults(func=cmd_merge_models)


def version_line() -> str:
    """lowrax's version with the versions it runs on, read from package metadata (JAX is not imported)."""
    from importlib import metadata

    import lowrax

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    runs_on = ", ".join(f"{name} {installed(name)}" for name in ("jax", "flax", "optax", "orbax-checkpoint"))
    return f"lowrax {lowrax.__version__} ({runs_on}; Python {sys.version.split()[0]})"


class _PrintVersion(argparse.Action):
    """--version printed as one line (argparse's own action wraps it to the terminal's width)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrax", description="Low-rank fine-tuning of HF transformers in JAX")
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="print lowrax's version and those of JAX, Flax, Optax and Orbax, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_adapter_commands(sub)
    _add_merging_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    from lowrax.core.compile_cache import use_compilation_cache
    from lowrax.errors import LowraxError
    from lowrax.train.host_memory import host_memory_policy

    host_memory_policy()  # before the first JAX computation; see lowrax/train/host_memory.py
    use_compilation_cache()  # a rerun of the same shapes compiles nothing

    try:
        return args.func(args)
    except LowraxError as e:
        print(f"lowrax: error: {e.for_cli()}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only file system, a permission: one line naming the path
        where = f" ({e.filename})" if e.filename else ""
        print(f"lowrax: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def command() -> None:
    """The `lowrax` executable (and `python -m lowrax`): main() on the command line, in a process
    whose malloc uses huge pages where that helps (`train.host_memory.relaunch_with_huge_pages`)."""
    from lowrax.train.host_memory import relaunch_with_huge_pages

    relaunch_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    command()
