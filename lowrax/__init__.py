"""lowrax: low-rank fine-tuning of pretrained Hugging Face transformers in pure JAX.

The public API (see README.md):

    model, params = lowrax.load_pretrained(path)        # HF dir, .gguf file, or None = embedded SmolLM2
    logits = model.apply(params, input_ids, attention_mask)
    tokenizer = lowrax.load_tokenizer(path)
    texts = lowrax.generate(model, params, tokenizer, prompts, max_new_tokens=64)
    lowrax.save_pretrained(params, model, out_dir)      # HF safetensors that transformers loads

    params = lowrax.wrap(params, lowrax.LoraConfig(r=8, target_modules="all-linear"), key)
    params = lowrax.wrap(params, lowrax.LoraConfig(r=8, variant="dora"), key)   # or lora_fa, vera, delta_lora
    params = lowrax.wrap(params, lowrax.IA3Config(), key, model.model_type)   # any registered method
    trainable, frozen = lowrax.split(params)
    merged = lowrax.merge(params)
    lowrax.save_peft(params, out_dir, model)            # PEFT's adapter format

    params = lowrax.load_peft(params, dir_a, model, adapter_name="a")   # named adapters (LoRA), first one active
    params = lowrax.set_adapter(params, "b")            # or disable_adapters, delete_adapter, extract_adapter
    logits = model.apply(params, ids, mask, adapter_names=["a", "b"])   # one adapter per row, one program
    params = lowrax.combine_adapters(params, ["a", "b"], [0.7, 0.3], "ab", combination_type="ties", density=0.5)
    merged = lowrax.merge_models(base, [tuned_a, tuned_b], "ties", weights=[0.6, 0.4], density=0.5)   # as mergekit

    loss, metrics = lowrax.dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid")
    loss = lowrax.distill_loss(student_logits, teacher_logits, labels, beta=0.5, temperature=1.0)   # TRL's GKD JSD
    off = lowrax.adapters_off(params)                   # the reference model: same arrays, every adapter switched off

    pruned, report = lowrax.prune(params, model, calibration_ids, method="sparsegpt", sparsity=0.5)   # or wanda, 2:4
    merged = lowrax.merge(lora_over_pruned, keep_sparsity=True)   # the LoRA delta masked: still 50% zeros

    mesh = lowrax.make_mesh(lowrax.MeshConfig(fsdp=4))   # sharded: load_pretrained(path, mesh=mesh), sharded_train_step
    summary = lowrax.run_training(lowrax.load_config("configs/default.yaml", ["lora.r=8"]))
    lowrax.reuse_freed_host_memory()                     # CPU training: reuse each step's freed memory
"""

import lowrax.adapters.catalog  # noqa: F401  registers the built-in adapter methods
from lowrax.adapters import lora
from lowrax.adapters.adalora import AdaLoraConfig, AdaLoraKernel
from lowrax.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from lowrax.adapters.ia3 import IA3Config, IA3Kernel
from lowrax.adapters.ln_tuning import LNTuningConfig, TunedNorm
from lowrax.adapters.lycoris import LoHaConfig, LoHaKernel, LoKrConfig, LoKrKernel
from lowrax.adapters.lora import DeltaLoraKernel, DoraKernel, LoraConfig, LoraKernel, VeraKernel
from lowrax.merging.combine_adapters import combine_adapters
from lowrax.adapters.named.exchange import load_peft, save_peft
from lowrax.adapters.named.named import (active_adapter, add_adapter, adapter_names, base_params, delete_adapter,
                                         disable_adapters, extract_adapter, set_adapter)
from lowrax.adapters.slots import LoraSlots
from lowrax.core.node import AdapterNode, FullyTrained
from lowrax.adapters.oft import OFTConfig, OFTKernel
from lowrax.adapters.prompt import (PrefixEncoder, PrefixTuningConfig, PromptEncoder, PromptEncoderConfig, PromptTable,
                                    PromptTuningConfig)
from lowrax.adapters.registry import method_names
from lowrax.adapters.tree import adapters_off, combine, count_params, labels, merge, split, unmerge
from lowrax.adapters.wrap import wrap
from lowrax.dist.parallel import DistConfig, global_batch, sharded_train_step
from lowrax.dist.sharding import MeshConfig, make_mesh, param_shardings
from lowrax.merging.models import merge_models
from lowrax.objectives import distill_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from lowrax.errors import (CheckpointError, LowraxError, NonFiniteError, NotAModelError, OutputExistsError,
                           UnsupportedModelError)
from lowrax.io.images import ImageProcessor
from lowrax.models.pretrained import embedded_minilm_path, embedded_model_path, load_pretrained, load_tokenizer, save_pretrained
from lowrax.models import EncoderOutput, supported_model_types
from lowrax.models.generate import SamplingConfig, generate, generate_ids
from lowrax.core.kernels import KernelType, register_kernel_type, register_linear
from lowrax.core.linear import linear
from lowrax.pruning.prune import prune
from lowrax.sparse.kernel import SparseKernel, sparse_modules
from lowrax.quant.nf4 import NF4Tensor
from lowrax.quant import nf4_kernel  # noqa: F401  (registers NF4 as a kernel type)
from lowrax.quant.int8 import Int8Tensor
from lowrax.merging.requantize import merge_requantized
from lowrax.quant.tree import QuantConfig, quantize
from lowrax.train.config import TrainConfig, load_config
from lowrax.train.host_memory import reuse_freed_host_memory
from lowrax.train.optim import OptimizerConfig, make_optimizer
from lowrax.train.step import TrainState, init_state, make_train_step
from lowrax.train.trainer import run_training

__version__ = "0.1.0"

__all__ = [
    "load_pretrained", "load_tokenizer", "save_pretrained", "ImageProcessor", "generate", "generate_ids", "SamplingConfig",
    "EncoderOutput", "supported_model_types", "embedded_model_path", "embedded_minilm_path",
    "linear", "register_linear", "KernelType", "register_kernel_type",
    "wrap", "method_names", "AdapterNode", "AdaLoraConfig", "AdaLoraKernel", "BottleneckConfig", "BottleneckAdapter", "IA3Config", "IA3Kernel", "LoHaConfig", "LoHaKernel", "LoKrConfig", "LoKrKernel", "OFTConfig", "OFTKernel", "LNTuningConfig", "TunedNorm", "PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig",
    "PromptTable", "PromptEncoder", "PrefixEncoder",
    "lora", "LoraConfig", "LoraKernel", "DoraKernel", "VeraKernel", "DeltaLoraKernel", "FullyTrained", "split", "combine", "merge", "unmerge", "labels",
    "count_params", "save_peft", "load_peft",
    "add_adapter", "combine_adapters", "merge_models", "set_adapter", "disable_adapters", "delete_adapter", "extract_adapter", "adapter_names",
    "active_adapter", "base_params", "LoraSlots",
    "adapters_off", "dpo_loss", "orpo_loss", "simpo_loss", "kto_loss", "distill_loss",
    "OptimizerConfig", "make_optimizer", "TrainState", "init_state", "make_train_step",
    "TrainConfig", "load_config", "run_training", "QuantConfig", "quantize", "NF4Tensor", "Int8Tensor", "merge_requantized",
    "MeshConfig", "make_mesh", "param_shardings", "DistConfig", "global_batch", "sharded_train_step",
    "reuse_freed_host_memory", "prune", "SparseKernel", "sparse_modules",
    "LowraxError", "NotAModelError", "UnsupportedModelError", "CheckpointError", "NonFiniteError", "OutputExistsError",
]
