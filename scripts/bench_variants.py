"""The adapter methods (the LoRA family, IA3, LoHa, LoKr, OFT and PEFT's further per-layer methods, LN tuning,
prompt learning) side by side on the embedded default task, printed as JSON and a Markdown table.

    python scripts/bench.py --variants [--steps 30] [--only lora,dora] [--out variants.json]

Every method runs `lowrax train` with configs/default.yaml and the same step budget
(30 steps x 16 examples), each in its own process so that its peak resident
memory (model loading included) is its own. Per method: trainable parameters,
PEFT adapter size, median step time (the first, compiling step excluded), peak
memory, and the task metric (exact match on the 64 held-out dates) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import command_line, emit, machine_facts  # noqa: E402

# method: overrides of configs/default.yaml (r=16, alpha=32, all linear layers, lr 1e-3).
METHODS = {
    "lora": [],
    "qlora": ["model.quantize=nf4"],
    "rslora": ["lora.use_rslora=true"],
    "lora_fa": ["lora.variant=lora_fa"],
    "lora+": ["optim.loraplus_lr_ratio=4"],
    "dora": ["lora.variant=dora"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "corda": ["lora.init=corda"],
    "eva": ["lora.init=eva"],
    "lora_ga": ["lora.init=lora_ga"],
    # LoftQ's factors are not divided by the LoRA scale (PEFT's): alpha = r keeps base + A B ~ W
    "loftq": ["lora.init=loftq", "lora.alpha=16"],
    "delta_lora": ["lora.variant=delta_lora", "lora.delta_start_step=10"],
    # VeRA trains vectors only: the paper uses a large shared rank and a larger learning rate.
    "vera": ["lora.variant=vera", "lora.r=256", "optim.learning_rate=5.0e-2"],
    # IA3 on PEFT's default targets (k_proj, v_proj, down_proj) trains vectors only, as VeRA: a larger rate.
    "ia3": ["method=ia3", "optim.learning_rate=5.0e-2"],
    # LoHa at r=8 has LoRA r=16's parameter count (two rank-8 pairs); delta rank up to 64.
    "loha": ["method=loha", "loha.target_modules=all-linear", "loha.r=8", "loha.alpha=16"],
    # LoKr with PEFT's defaults (left full, right rank-r) at the preset's r and alpha.
    "lokr": ["method=lokr", "lokr.target_modules=all-linear", "lokr.r=16", "lokr.alpha=32"],
    # AdaLoRA from the preset's rank 16 down to 8 per layer on average (PEFT's default ratio,
    # 12 -> 8, scaled), budget falling between steps 5 and 25 of 30.
    "adalora": ["method=adalora", "adalora.target_modules=all-linear", "adalora.init_r=16", "adalora.target_r=8",
                "adalora.alpha=32", "adalora.tinit=5", "adalora.tfinal=5", "optim.learning_rate=1.0e-2"],
    # Bottleneck adapters with AdapterHub's presets (reduction factor 16: 36 of SmolLM2's 576 channels;
    # the parallel preset's own factor 2 would be 288).
    "bottleneck_pfeiffer": ["method=bottleneck", "bottleneck.preset=pfeiffer"],
    "bottleneck_houlsby": ["method=bottleneck", "bottleneck.preset=houlsby"],
    "bottleneck_parallel": ["method=bottleneck", "bottleneck.preset=parallel", "bottleneck.reduction_factor=16"],
    # OFT with PEFT's default block size on every linear layer.
    "oft": ["method=oft", "oft.target_modules=all-linear", "oft.oft_block_size=32"],
    # LN tuning on PEFT's default norms trains 35 K scalars: a larger rate, as for IA3 and VeRA.
    "ln_tuning": ["method=ln_tuning", "optim.learning_rate=1.0e-2"],
    # Prompt tuning from a task description (PEFT's TEXT init), 20 virtual tokens.
    "prompt_tuning": ["method=prompt_tuning", "prompt_tuning.num_virtual_tokens=20", "prompt_tuning.prompt_tuning_init=TEXT",
                      "prompt_tuning.prompt_tuning_init_text=Write the date in the lowrax date format",
                      "optim.learning_rate=3.0e-2"],
    # PEFT's further per-layer methods on every linear layer; where a size is free, near LoRA r=16's 4.9 M
    # trained parameters (BOFT, HiRA, SHiRA, DeLoRA, MiSS, GraLoRA, Super-Tuning); C3A, FourierFT, HRA, RoAd, BEFT and PEANuT
    # train fewer.
    "boft": ["method=boft", "boft.target_modules=all-linear", "boft.boft_block_size=32"],
    "hra": ["method=hra", "hra.target_modules=all-linear", "hra.r=8"],
    "road": ["method=road", "road.target_modules=all-linear", "optim.learning_rate=1.0e-2"],
    # C3A divides its output by the input width (as PEFT's): PEFT's MetaMathQA comparison trains it at 0.3
    "c3a": ["method=c3a", "c3a.target_modules=all-linear", "c3a.block_size=64", "optim.learning_rate=3.0e-1"],
    "fourierft": ["method=fourierft", "fourierft.target_modules=all-linear", "fourierft.n_frequency=1000"],
    "hira": ["method=hira", "hira.target_modules=all-linear", "hira.r=16"],
    "shira": ["method=shira", "shira.target_modules=all-linear", "shira.r=16"],
    "delora": ["method=delora", "delora.target_modules=all-linear", "delora.r=16"],
    "miss": ["method=miss", "miss.target_modules=all-linear", "miss.r=32"],
    "gralora": ["method=gralora", "gralora.target_modules=all-linear", "gralora.r=16", "gralora.alpha=32"],
    "beft": ["method=beft", "beft.target_modules=all-linear", "optim.learning_rate=1.0e-2"],
    "supertuning": ["method=supertuning", "supertuning.target_modules=all-linear", "supertuning.sparsity=0.955"],
    "vblora": ["method=vblora", "vblora.target_modules=all-linear", "vblora.vector_length=64", "vblora.r=4"],
    "pvera": ["method=pvera", "pvera.target_modules=all-linear", "optim.learning_rate=1.0e-2"],
    "randlora": ["method=randlora", "randlora.target_modules=all-linear"],
    "tinylora": ["method=tinylora", "tinylora.target_modules=all-linear", "optim.learning_rate=1.0e-2"],
    "unilora": ["method=unilora", "unilora.target_modules=all-linear", "unilora.theta_d_length=4096",
                "optim.learning_rate=1.0e-2"],
    "osf": ["method=osf", "osf.target_modules=all-linear", "osf.effective_rank=0.9"],
    "lily": ["method=lily", "lily.target_modules=all-linear", "lily.r=16", "lily.stride_A=2", "lily.num_B=4"],
    "glora": ["method=glora", "glora.target_modules=all-linear", "glora.r=8"],
    "frod": ["method=frod", "frod.target_modules=all-linear", "optim.learning_rate=1.0e-2"],
    "trainable_tokens": ["method=trainable_tokens", "trainable_tokens.token_indices=[0,1,2]",
                         "optim.learning_rate=1.0e-2"],
    "bottleneck": ["method=bottleneck", "bottleneck.preset=houlsby"],
    "deft": ["method=deft", "deft.target_modules=all-linear", "deft.r=16"],
    "peanut": ["method=peanut", "peanut.target_modules=all-linear", "peanut.r=16", "peanut.depth=1"],
    "p_tuning": ["method=p_tuning", "p_tuning.num_virtual_tokens=20", "optim.learning_rate=1.0e-2"],
    "prefix_tuning": ["method=prefix_tuning", "prefix_tuning.num_virtual_tokens=10", "optim.learning_rate=1.0e-2"],
}


def run_child(overrides: list[str]) -> dict:
    """Train in this process (the child) and report what the table needs."""
    from lowrax.train.config import load_config
    from lowrax.train.trainer import run_training

    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"), overrides + ["train.samples=0"])
    summary = run_training(cfg, progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in open(os.path.join(cfg.train.output_dir, "metrics.jsonl"))]
    step_s = sorted(r["tokens"] / r["tokens_per_s"] for r in rows[1:] if "loss" in r)
    return {"trainable_params": summary["trainable_params"], "adapter_bytes": summary["adapter_bytes"],
            "median_step_s": step_s[len(step_s) // 2], "metric_before": summary.get("metric_before"),
            "metric_after": summary.get("metric_after"), "final_loss": summary.get("final_loss"),
            "eval_loss": summary.get("eval_loss"),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def table(results: dict) -> str:
    lines = ["| method | trainable params | adapter file | step time | peak memory | eval loss | exact match before -> after |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['trainable_params'] / 1e6:.2f} M | {r['adapter_bytes'] / 1e6:.1f} MB | "
                     f"{r['median_step_s']:.2f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['eval_loss']:.4f} | "
                     f"{r['metric_before']:.3f} -> {r['metric_after']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    if "--child" in sys.argv:
        overrides = json.loads(sys.argv[sys.argv.index("--child") + 1])
        print(json.dumps(run_child(overrides)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per method (the default run's 30)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    results, failed = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            overrides = METHODS[name] + [f"train.steps={args.steps}", f"train.output_dir={os.path.join(tmp, name)}"]
            print(f"[bench --variants] {name}: lowrax train {' '.join(overrides)}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides)], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0:  # report it and go on: one method's failure must not lose the others'
                failed[name] = proc.stderr[-4000:]
                print(f"[bench --variants] {name} FAILED:\n{failed[name]}", file=sys.stderr, flush=True)
                continue
            results[name] = dict(json.loads(proc.stdout.strip().splitlines()[-1]), overrides=METHODS[name])
            print(f"[bench --variants] {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    emit({"task": "embedded date task, configs/default.yaml", "steps": args.steps, "methods": results,
          "failed": failed, "table": table(results), "machine": machine_facts(("jax", "flax", "optax")),
          "command": command_line("--variants")}, args.out)
    print(table(results))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
