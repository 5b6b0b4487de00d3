"""`lowrax prune`: load a model, prune it on calibration text, measure it, save it."""

from __future__ import annotations

import time

from lowrax.core.atomic import check_output
from lowrax.pruning.config import PruneConfig
from lowrax.pruning.prune import prune
from lowrax.pruning.text import perplexity, read_texts, token_windows


def run_prune(cfg: PruneConfig, overwrite: bool = False, log=print) -> dict:
    """Prune the configured model and write it to `cfg.prune.output_dir` (HF safetensors, tokenizer,
    pruning.json with the report). Returns the summary that pruning.json holds besides the modules."""
    import jax.numpy as jnp

    from lowrax.io.hf_checkpoint import save_hf_directory
    from lowrax.models.pretrained import load_pretrained, load_tokenizer

    started = time.perf_counter()
    out = check_output(cfg.prune.output_dir, overwrite, (cfg.model.path, cfg.calibration.source, cfg.evaluation.source))
    model, params = load_pretrained(cfg.model.path, dtype=getattr(jnp, cfg.model.dtype))
    tokenizer = load_tokenizer(cfg.model.path)
    c, e = cfg.calibration, cfg.evaluation
    # Magnitude pruning needs no data: no calibration passes (nor their reconstruction errors) for it.
    calibration = None if cfg.prune.method == "magnitude" else \
        token_windows(tokenizer, read_texts(c.source, "calibration", c.text_field), c.samples, c.length)
    heldout = None
    if e.samples and model.is_causal_lm:
        heldout = token_windows(tokenizer, read_texts(e.source, "heldout", e.text_field), e.samples, e.length)
    dense_ppl = perplexity(model, params, heldout) if heldout is not None else None
    p = cfg.prune
    pruned, report = prune(params, model, calibration, method=p.method, sparsity=p.sparsity, pattern=p.pattern,
                           chunk_rows=p.chunk_rows, blocksize=p.blocksize, dampening=p.dampening, ignore=p.ignore)
    pruned_ppl = perplexity(model, pruned, heldout) if heldout is not None else None
    summary = {"method": p.method, "pattern": p.pattern, "sparsity": report["sparsity"],
               "model_sparsity": report["model_sparsity"], "perplexity_dense": dense_ppl,
               "perplexity_pruned": pruned_ppl, "evaluation": {"source": e.source, "rows": e.samples, "length": e.length},
               "config": cfg.to_dict(), "report": report, "seconds": round(time.perf_counter() - started, 1)}
    save_hf_directory(pruned, model, out, tokenizer=tokenizer, overwrite=overwrite, record_extra=summary)
    worst = max(report["layers"].items(), key=lambda kv: kv[1].get("relative_error", 0.0))
    log(f"{p.method} ({p.pattern if p.pattern != 'unstructured' else f'{p.sparsity:.0%} unstructured'}): "
        f"{report['sparsity']:.1%} of the {len(report['layers'])} pruned layers' weights removed "
        f"({report['model_sparsity']:.1%} of the model's) in {report['seconds']:.0f} s")
    if "relative_error" in worst[1]:
        log(f"largest relative reconstruction error on the calibration inputs: {worst[1]['relative_error']:.3f} "
            f"({worst[0]})")
    if dense_ppl is not None:
        log(f"held-out perplexity ({e.samples} x {e.length} tokens): {dense_ppl:.2f} dense -> {pruned_ppl:.2f} pruned")
    log(f"wrote {out} (pruning.json: per-layer sparsity and error); LoRA recovery: "
        f"lowrax train configs/recover.yaml model.path={out}")
    return summary
