"""`lowrax merge-models`: merge fine-tuned checkpoints on disk (HF directories, `lowrax merge`
outputs, or GGUF files) with `merge_models` and write an HF directory."""

from __future__ import annotations

from pathlib import Path

from lowrax.core.atomic import check_output
from lowrax.errors import LowraxError
from lowrax.models.pretrained import load_pretrained, load_tokenizer, save_pretrained
from lowrax.merging.models import merge_models


def _architecture(model) -> dict:
    """What two checkpoints must share to be merged tensor by tensor."""
    c = model.config
    return {k: getattr(c, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_layers")}


def merge_checkpoints(base_path: str | None, model_paths: list[str], out_dir: str | Path, method: str,
                      overwrite: bool = False, log=print, **options) -> Path:
    """Load the checkpoints, merge them (`lowrax.merge_models` options) and write the result with the
    base's (else the first model's) config and tokenizer."""
    if not model_paths:
        raise LowraxError("give the fine-tuned checkpoints to merge: --model PATH (repeated)")
    check_output(out_dir, overwrite, (base_path, *model_paths))
    model, base = (None, None) if base_path is None else load_pretrained(base_path)
    models = []
    for path in model_paths:
        loaded, params = load_pretrained(path)
        reference = model or loaded
        if _architecture(loaded) != _architecture(reference):
            raise LowraxError(f"{path} is a {_architecture(loaded)} model, the others {_architecture(reference)}: "
                              "models merged together must share one architecture")
        model = reference
        models.append(params)
    merged = merge_models(base, models, method, progress=True, **options)
    source = base_path if base_path is not None else model_paths[0]
    try:
        tokenizer = load_tokenizer(source)
    except (LowraxError, OSError, ValueError) as e:
        log(f"note: no tokenizer written ({source} has none that loads: {e})")
        tokenizer = None
    return save_pretrained(merged, model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
