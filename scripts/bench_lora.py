"""LoRA training-step benchmark, printed as JSON, lowrax next to HF PEFT in the same run.

    python scripts/bench_lora.py [--model PATH] [--batch 4] [--seq 128] [--rank 16] [--steps 5] [--vs-peft]
    python scripts/bench_lora.py --default-task [--vs-peft]     (real tokens/s on the embedded date task)
    python scripts/bench_lora.py --qlora                        (QLoRA next to LoRA with fp32 and bf16 bases)
    python scripts/bench_lora.py --method dora --mesh 1,1,1     (another variant; the mesh as data,fsdp,tensor)
    python scripts/bench_lora.py --remat --vs-peft              (both sides recompute each layer in the backward)
    python scripts/bench.py --lora --table --out docs/figures/lora.json   (every setting of the docs' step table)

On a uniform batch (every token trained), LoRA on all linear layers, float32,
AdamW: tokens/s, compiled FLOPs per step, achieved FLOP/s as a share of a
same-run matmul ceiling (a large float32 matmul), and with --vs-peft the same
step in transformers + PEFT (torch) and the ratio. With --qlora, the same step
over NF4 base weights (double quantization, blocksize 64) next to LoRA over
float32 and bfloat16 bases: bits per quantized weight, base-model bytes, step
time and peak memory of each, and the QLoRA / LoRA step-time ratios.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_common import (RANDOM_LLAMA, base_parser, command_line, device_peak_flops, emit,  # noqa: E402
                          in_fresh_process, load_torch_causal_lm, machine_facts, random_llama, timed)

import lowrax  # noqa: E402
from lowrax.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from lowrax.train.step import init_state, make_train_step  # noqa: E402


def matmul_ceiling(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n float32 matmul on this backend: the ceiling the step is measured against."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def default_task_batches(tokenizer, batch_size: int, steps: int, seq_len: int = 32, loss_positions: int = 12):
    """The embedded task's first `steps` batches: lowrax's (fixed 32-token rows, logits only at
    response positions) and the same examples as a PEFT user batches them (padded to the
    batch's longest, labels -100 on prompt and padding)."""
    from lowrax.train.config import DataSection
    from lowrax.train.data import Batches, encode_all
    from lowrax.train.default_task import make_splits

    records, _ = make_splits(batch_size * steps, 0, seed=0)
    data = encode_all(tokenizer, records, DataSection(), "causal_lm")
    ours = Batches(data, seq_len, batch_size, seed=0, pad_id=tokenizer.pad_token_id, loss_positions=loss_positions)
    lowrax_batches = [ours.batch(k) for k in range(steps)]
    torch_batches = []
    for k in range(steps):
        rows = [ours.row_at(k * batch_size + i)[0] for i in range(batch_size)]
        width = max(len(data.ids[i]) for i in rows)
        ids = np.full((batch_size, width), tokenizer.pad_token_id, np.int64)
        labels = np.full((batch_size, width), -100, np.int64)
        mask = np.zeros((batch_size, width), np.int64)
        for r, i in enumerate(rows):
            n = len(data.ids[i])
            ids[r, :n] = data.ids[i]
            mask[r, :n] = 1
            labels[r, :n] = np.where(np.asarray(data.targets[i]) == 1, data.ids[i], -100)
        torch_batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return lowrax_batches, torch_batches


def compiled_flops(jitted, *args) -> float:
    """XLA's cost-analysis FLOPs of one call (compiles, does not run)."""
    return program_costs(jitted.lower(*args).compile())[0]


def program_costs(compiled) -> tuple[float, int]:
    """(FLOPs, bytes the step's program holds: arguments + outputs + temporaries) of a compiled step.

    The byte count is the step's own memory, apart from loading and compilation."""
    cost = compiled.cost_analysis()
    mem = compiled.memory_analysis()
    held = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"], int(held)


# --qlora sides: (base dtype, NF4 base?)
QLORA_SIDES = {"lora_fp32": ("float32", False), "lora_bf16": ("bfloat16", False),
               "qlora_fp32_compute": ("float32", True), "qlora_bf16_compute": ("bfloat16", True)}


def base_storage(params) -> dict:
    """Bytes of the base model as stored, and bits per weight of its NF4 kernels."""
    from lowrax.quant.nf4 import NF4Tensor

    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, NF4Tensor))
    quantized = [x for x in leaves if isinstance(x, NF4Tensor)]
    out = {"base_bytes": sum(x.nbytes() if isinstance(x, NF4Tensor) else x.nbytes for x in leaves)}
    if quantized:
        out["nf4_bits_per_weight"] = 8 * sum(x.nbytes() for x in quantized) / sum(x.size for x in quantized)
        out["nf4_share_of_params"] = sum(x.size for x in quantized) / sum(x.size for x in leaves)
    return out


def bench_lowrax(model, params, ids, rank, steps, batches=None, full_flops=True, method="lora", mesh=None, remat=False):
    """The method's train step on `mesh` (default: every device on the data axis)."""
    from lowrax.dist.parallel import global_batch, sharded_train_step
    from lowrax.dist.sharding import MeshConfig, make_mesh

    mesh = mesh or make_mesh(MeshConfig())
    cfg = lowrax.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear", variant=method)
    wrapped = lowrax.lora.wrap(params, cfg, jax.random.key(0), model.model_type)
    trainable, frozen = lowrax.split(wrapped)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4, total_steps=1000))
    step, state, frozen = sharded_train_step(model, optimizer, mesh, init_state(trainable, optimizer), frozen,
                                             remat=remat)
    if batches is None:
        batches = [{"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32),
                    "loss_mask": np.ones(ids.shape, np.int32)}] * (steps + 1)
    batches = [global_batch(mesh, b) for b in batches]
    # One compilation serves the cost analysis and the timed steps, so the process's peak
    # memory holds what a training process holds: the loaded model, one compile, the steps.
    compiled = step.lower(state, frozen, batches[0]).compile()
    flops, step_bytes = program_costs(compiled)
    state, m = compiled(state, frozen, batches[0])
    m["loss"].block_until_ready()
    times, tokens = [], 0
    before = resource.getrusage(resource.RUSAGE_SELF)
    for batch in batches[1:]:
        start = time.perf_counter()
        state, m = compiled(state, frozen, batch)
        m["loss"].block_until_ready()
        times.append(time.perf_counter() - start)
        tokens += int(np.asarray(batch["attention_mask"]).sum())
    after = resource.getrusage(resource.RUSAGE_SELF)
    # What reuse_freed_host_memory removes: page faults and kernel time inside the timed steps.
    out = {"peak_rss_bytes": peak_rss_bytes(),
           "minor_page_faults_per_step": (after.ru_minflt - before.ru_minflt) / len(times),
           "system_cpu_s_per_step": (after.ru_stime - before.ru_stime) / len(times)}
    if full_flops:
        # The same step training every weight (compiled only, never run, and after the peak
        # memory is read): what LoRA saves in FLOPs.
        full_trainable, full_frozen = lowrax.split(jax.tree.map(lowrax.FullyTrained, params))
        full_step = jax.jit(make_train_step(model, optimizer))
        full = compiled_flops(full_step, jax.eval_shape(lambda t: init_state(t, optimizer), full_trainable),
                              full_frozen, batches[0])
        out.update(full_finetune_flops_per_step=full, lora_over_full_finetune_flops=flops / full)
    t = float(np.median(times))
    return {"tokens_per_s": tokens / sum(times), "step_s": t, "flops_per_step": flops, "step_program_bytes": step_bytes,
            **out, "achieved_flops_per_s": flops / t, "trainable_params": lowrax.count_params(trainable)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PEFT_METHODS = ("lora", "dora", "vera")


def bench_peft(path, ids, rank, steps, batches=None, method="lora", random_preset=None, dtype="float32", remat=False):
    import peft
    import torch
    import transformers

    torch_dtype = getattr(torch, dtype)
    if random_preset:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**RANDOM_LLAMA[random_preset])).to(torch_dtype)
    else:
        hf = load_torch_causal_lm(path).to(torch_dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device)
    config = (peft.VeraConfig(r=rank, target_modules="all-linear") if method == "vera" else
              peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=method == "dora"))
    if remat:  # transformers' per-layer recomputation, the counterpart of lowrax's remat
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(hf, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if batches is None:
        batches = [{"input_ids": ids, "attention_mask": np.ones(ids.shape), "labels": ids}] * (steps + 1)
    batches = [{k: torch.tensor(v, dtype=torch.long, device=device) for k, v in b.items()} for b in batches]

    def one_step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    one_step(batches[0])
    times = [timed(lambda: one_step(b)) for b in batches[1:]]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    return {"tokens_per_s": tokens / sum(times), "step_s": float(np.median(times)), "threads": torch.get_num_threads(),
            "matmul_ceiling_flops_per_s": torch_matmul_ceiling(device)}


def torch_matmul_ceiling(device: str, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of torch's n x n float32 matmul: the same ceiling as `matmul_ceiling`, on torch's kernels."""
    import torch

    a = torch.ones((n, n), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ a
    sync()
    best = min(timed(lambda: (a @ a, sync())) for _ in range(repeats))
    return 2 * n**3 / best


def run_side(side: str, args) -> dict:
    """One side's measurements, taken in this (fresh) process so its peak memory is its own."""
    # lowrax as `lowrax train` runs (glibc's defaults unless LOWRAX_REUSE_HOST_MEMORY=1); each side reuses
    # freed memory on request (--peft-reuse-memory for PEFT, both in the table's "both reuse" row).
    from lowrax.train.host_memory import host_memory_policy

    if side == "peft":
        reused = lowrax.reuse_freed_host_memory() if args.peft_reuse_memory else False
    else:
        reused = lowrax.reuse_freed_host_memory() if getattr(args, "lowrax_reuse_memory", False) else host_memory_policy()
    out = run_measurements(side, args)
    out["host_memory_reused"] = reused
    return out


def run_measurements(side: str, args) -> dict:
    if side in QLORA_SIDES:
        from lowrax.train.build import DTYPES

        dtype, nf4 = QLORA_SIDES[side]
        model, params = lowrax.load_pretrained(args.model, dtype=DTYPES[dtype], progress=False,
                                               quantize=lowrax.QuantConfig() if nf4 else None)
        ids = np.random.default_rng(0).integers(10, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
        return {**base_storage(params), **bench_lowrax(model, params, ids, args.rank, args.steps, full_flops=False)}
    from lowrax.dist.sharding import MeshConfig, make_mesh
    from lowrax.train.build import DTYPES

    mesh = make_mesh(MeshConfig(*args.mesh))
    if args.random_llama:
        model, params = random_llama(args.random_llama, DTYPES[args.dtype], mesh)
    else:
        model, params = lowrax.load_pretrained(args.model, dtype=DTYPES[args.dtype], mesh=mesh, progress=False)
    ids = np.random.default_rng(0).integers(10, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    ours = theirs = None
    if args.default_task:
        ours, theirs = default_task_batches(lowrax.load_tokenizer(args.model), 16, args.steps + 1)
    if side == "lowrax":
        out = bench_lowrax(model, params, ids, args.rank, args.steps, ours, method=args.method, mesh=mesh,
                           remat=args.remat)
        out["mesh"] = dict(mesh.shape)
    else:
        del model, params  # the torch side loads its own copy
        out = bench_peft(args.model, ids, args.rank, args.steps, theirs, method=args.method,
                         random_preset=args.random_llama, dtype=args.dtype, remat=args.remat)
    out.setdefault("peak_rss_bytes", peak_rss_bytes())  # the whole process, model loading included
    return out


def in_subprocess(side: str, args) -> dict:
    return in_fresh_process(run_side, side, args)


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--vs-peft", action="store_true")
    ap.add_argument("--default-task", action="store_true",
                    help="the embedded date task (batch 16, real tokens/s) instead of a uniform batch")
    ap.add_argument("--qlora", action="store_true", help="QLoRA next to LoRA over float32 and bfloat16 bases")
    ap.add_argument("--method", default="lora", choices=lowrax.lora.VARIANTS, help="the LoRA variant to time")
    ap.add_argument("--mesh", default="-1,1,1", type=lambda v: tuple(int(x) for x in v.split(",")),
                    help="data,fsdp,tensor sizes of the device mesh (default: every device on data)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="base weights and compute")
    ap.add_argument("--peft-reuse-memory", action="store_true",
                    help="give the PEFT process lowrax's malloc settings too (lowrax.reuse_freed_host_memory)")
    ap.add_argument("--remat", action="store_true",
                    help="recompute each layer in the backward pass (PEFT side: gradient checkpointing)")
    ap.add_argument("--table", action="store_true", help="every setting of the docs' step table, against PEFT")
    ap.add_argument("--random-llama", default=None, choices=sorted(RANDOM_LLAMA),
                    help="a random-weight Llama of this shape instead of --model (e.g. 1b for MFU on a GPU)")
    args = ap.parse_args()
    if args.vs_peft and args.method not in PEFT_METHODS:
        ap.error(f"--vs-peft compares {', '.join(PEFT_METHODS)}; PEFT has no {args.method!r} adapter to time")
    if args.qlora:
        return emit({**qlora_report(args), "command": command_line("--lora"), "machine": machine_facts()}, args.out)
    if args.table:
        return emit(step_table(args), args.out)
    emit(step_report(args), args.out)


# The docs' LoRA step table: (row name, what differs from the uniform 4 x 128 batch with each side's
# default allocator). Each row is one lowrax and one PEFT process.
TABLE_SETTINGS = (
    ("uniform", {}),
    ("uniform_both_reuse", {"reuse": True}),
    ("uniform_remat", {"remat": True}),
    ("default_task", {"default_task": True}),
)


def step_table(args) -> dict:
    """Every row of TABLE_SETTINGS against PEFT, one after another on the same machine."""
    import copy

    rows = {}
    for name, setting in TABLE_SETTINGS:
        row_args = copy.copy(args)
        row_args.vs_peft, row_args.remat = True, setting.get("remat", False)
        row_args.default_task = setting.get("default_task", False)
        row_args.peft_reuse_memory = row_args.lowrax_reuse_memory = setting.get("reuse", False)
        rows[name] = step_report(row_args)
        print(f"{name}: lowrax {rows[name]['lowrax']['tokens_per_s']:.0f} tok/s, "
              f"PEFT {rows[name]['peft']['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    return {"command": command_line("--lora"), "machine": machine_facts(), "rank": args.rank, "steps": args.steps,
            "rows": rows}


def step_report(args) -> dict:
    model_name = f"random Llama ({args.random_llama})" if args.random_llama else str(args.model or "embedded SmolLM2-135M-Instruct")
    result = {"model": model_name, "method": args.method, "dtype": args.dtype, "rank": args.rank, "remat": args.remat,
              "batch": args.batch, "seq": args.seq, "backend": jax.default_backend(),
              "matmul_ceiling_flops_per_s": matmul_ceiling(),
              "note": "each side runs in its own process; peak_rss_bytes is that process's peak resident memory"}
    if args.default_task:
        result.update(batch=16, seq="default task: lowrax 32-token rows, logits at <= 12 positions; PEFT padded to batch max")
    result["lowrax"] = in_subprocess("lowrax", args)
    result["lowrax"]["share_of_matmul_ceiling"] = result["lowrax"]["achieved_flops_per_s"] / result["matmul_ceiling_flops_per_s"]
    peak = device_peak_flops()
    if peak:  # on a known accelerator: model FLOPs utilisation against its dense bf16 peak
        # (XLA's cost analysis counts the FLOPs of one device's program, so this is per device)
        result["device_peak_bf16_flops_per_s"] = peak
        result["lowrax"]["mfu"] = result["lowrax"]["achieved_flops_per_s"] / peak
    if args.vs_peft:
        result["peft"] = in_subprocess("peft", args)
        result["tokens_per_s_ratio_lowrax_over_peft"] = result["lowrax"]["tokens_per_s"] / result["peft"]["tokens_per_s"]
        result["peak_memory_ratio_lowrax_over_peft"] = result["lowrax"]["peak_rss_bytes"] / result["peft"]["peak_rss_bytes"]
        # How fast each framework's own matmul kernel is here: the ceiling each side works under.
        result["matmul_ceiling_ratio_xla_over_torch"] = result["matmul_ceiling_flops_per_s"] / result["peft"]["matmul_ceiling_flops_per_s"]
    return result


def qlora_report(args) -> dict:
    result = {"model": str(args.model or "embedded SmolLM2-135M-Instruct"), "rank": args.rank, "batch": args.batch,
              "seq": args.seq, "backend": jax.default_backend(),
              "note": "each side in its own process; NF4 with double quantization, blocksize 64; adapters float32"}
    for side in QLORA_SIDES:
        result[side] = in_subprocess(side, args)
    for q in ("qlora_fp32_compute", "qlora_bf16_compute"):
        for ref in ("lora_fp32", "lora_bf16"):
            result[f"step_time_ratio_{q}_over_{ref}"] = result[q]["step_s"] / result[ref]["step_s"]
    result["base_bytes_ratio_bf16_over_qlora"] = result["lora_bf16"]["base_bytes"] / result["qlora_bf16_compute"]["base_bytes"]
    return result


if __name__ == "__main__":
    main()
