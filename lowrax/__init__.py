"""lowrax: low-rank fine-tuning of pretrained Hugging Face transformers in pure JAX.

The public API (see README.md):

    model, params = lowrax.load_pretrained(path)        # HF dir, .gguf file, or None = embedded SmolLM2
    logits = model.apply(params, input_ids, attention_mask)
    tokenizer = lowrax.load_tokenizer(path)
    texts = lowrax.generate(model, params, tokenizer, prompts, max_new_tokens=64)
    lowrax.save_pretrained(params, model, out_dir)      # HF safetensors that transformers loads

    params = lowrax.lora.wrap(params, lowrax.LoraConfig(r=8, target_modules="all-linear"), key)
    params = lowrax.lora.wrap(params, lowrax.LoraConfig(r=8, variant="dora"), key)   # or lora_fa, vera, delta_lora
    trainable, frozen = lowrax.split(params)
    merged = lowrax.merge(params)
    lowrax.save_peft(params, out_dir, model)            # PEFT's adapter format

    mesh = lowrax.make_mesh(lowrax.MeshConfig(fsdp=4))   # sharded: load_pretrained(path, mesh=mesh), sharded_train_step
    summary = lowrax.run_training(lowrax.load_config("configs/default.yaml", ["lora.r=8"]))
    lowrax.reuse_freed_host_memory()                     # CPU training: reuse each step's freed memory
"""

from lowrax.config import TrainConfig, load_config
from lowrax.errors import CheckpointError, LowraxError, NotAModelError, UnsupportedModelError
from lowrax.generate import SamplingConfig, generate, generate_ids
from lowrax.models import EncoderOutput, supported_model_types
from lowrax import lora
from lowrax.lora import LoraConfig
from lowrax.nodes import FullyTrained, LoraKernel
from lowrax.variants import DeltaLoraKernel, DoraKernel, VeraKernel
from lowrax.ops import linear, register_linear
from lowrax.peft_format import load_peft, save_peft
from lowrax.optim import OptimizerConfig, make_optimizer
from lowrax.train_step import TrainState, init_state, make_train_step
from lowrax.quant.nf4 import NF4Tensor
from lowrax.quant.tree import QuantConfig, merge_requantized, quantize
from lowrax.tree import combine, count_params, labels, merge, split, unmerge
from lowrax.sharding import MeshConfig, make_mesh, param_shardings
from lowrax.parallel import DistConfig, global_batch, sharded_train_step
from lowrax.host_memory import reuse_freed_host_memory


def run_training(cfg, progress: bool = True):
    """Run a fine-tune described by a TrainConfig (see lowrax.trainer.run_training)."""
    from lowrax.trainer import run_training as _run

    return _run(cfg, progress=progress)
from lowrax.pretrained import embedded_minilm_path, embedded_model_path, load_pretrained, load_tokenizer, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "load_pretrained", "load_tokenizer", "save_pretrained", "generate", "generate_ids", "SamplingConfig",
    "EncoderOutput", "supported_model_types", "embedded_model_path", "embedded_minilm_path",
    "linear", "register_linear",
    "lora", "LoraConfig", "LoraKernel", "DoraKernel", "VeraKernel", "DeltaLoraKernel", "FullyTrained", "split", "combine", "merge", "unmerge", "labels",
    "count_params", "save_peft", "load_peft",
    "OptimizerConfig", "make_optimizer", "TrainState", "init_state", "make_train_step",
    "TrainConfig", "load_config", "run_training", "QuantConfig", "quantize", "NF4Tensor", "merge_requantized",
    "MeshConfig", "make_mesh", "param_shardings", "DistConfig", "global_batch", "sharded_train_step",
    "reuse_freed_host_memory",
    "LowraxError", "NotAModelError", "UnsupportedModelError", "CheckpointError",
]
