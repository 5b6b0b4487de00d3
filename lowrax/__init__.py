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

import importlib

__version__ = "0.1.0"

# The public API, by the module that defines each name. `import lowrax` itself loads nothing (so
# `lowrax --help` starts at once); the first public name used imports them all, as one import would,
# which also registers every built-in adapter method and kernel type.
_PUBLIC: dict[str, tuple[str, ...]] = {
    # models: loading, running, generating, saving
    "lowrax.models.pretrained": ("load_pretrained", "load_tokenizer", "save_pretrained", "embedded_model_path",
                                 "embedded_minilm_path"),
    "lowrax.models": ("EncoderOutput", "supported_model_types"),
    "lowrax.models.generate": ("generate", "generate_ids", "SamplingConfig"),
    "lowrax.io.images": ("ImageProcessor",),
    # the projection dispatch and kernel types
    "lowrax.core.linear": ("linear",),
    "lowrax.core.kernels": ("KernelType", "register_kernel_type", "register_linear"),
    # adapter methods
    "lowrax.adapters.wrap": ("wrap",),
    "lowrax.adapters.registry": ("method_names",),
    "lowrax.core.node": ("AdapterNode", "FullyTrained"),
    "lowrax.adapters.lora": ("LoraConfig", "LoraKernel", "DoraKernel", "VeraKernel", "DeltaLoraKernel"),
    "lowrax.adapters.adalora": ("AdaLoraConfig", "AdaLoraKernel"),
    "lowrax.adapters.bottleneck": ("BottleneckConfig", "BottleneckAdapter"),
    "lowrax.adapters.ia3": ("IA3Config", "IA3Kernel"),
    "lowrax.adapters.lycoris": ("LoHaConfig", "LoHaKernel", "LoKrConfig", "LoKrKernel"),
    "lowrax.adapters.oft": ("OFTConfig", "OFTKernel"),
    "lowrax.adapters.c3a": ("C3AConfig", "C3AKernel"),
    "lowrax.adapters.fourierft": ("FourierFTConfig", "FourierFTKernel"),
    "lowrax.adapters.hira": ("HiraConfig", "HiraKernel"),
    "lowrax.adapters.shira": ("ShiraConfig", "ShiraKernel"),
    "lowrax.adapters.delora": ("DeloraConfig", "DeloraKernel"),
    "lowrax.adapters.miss": ("MissConfig", "MissKernel"),
    "lowrax.adapters.gralora": ("GraloraConfig", "GraloraKernel"),
    "lowrax.adapters.hra": ("HRAConfig", "HRAKernel"),
    "lowrax.adapters.boft": ("BOFTConfig", "BOFTKernel"),
    "lowrax.adapters.road": ("RoadConfig", "RoadKernel"),
    "lowrax.adapters.beft": ("BeftConfig", "BeftKernel"),
    "lowrax.adapters.peanut": ("PeanutConfig", "PeanutKernel"),
    "lowrax.adapters.supertuning": ("SupertuningConfig", "SupertuningKernel"),
    "lowrax.adapters.deft": ("DeftConfig", "DeftKernel"),
    "lowrax.adapters.vblora": ("VBLoRAConfig", "VBLoRAKernel"),
    "lowrax.adapters.pvera": ("PveraConfig", "PveraKernel"),
    "lowrax.adapters.randlora": ("RandLoraConfig", "RandLoraKernel"),
    "lowrax.adapters.tinylora": ("TinyLoraConfig", "TinyLoraKernel"),
    "lowrax.adapters.unilora": ("UniLoraConfig", "UniLoraKernel"),
    "lowrax.adapters.osf": ("OSFConfig", "OSFKernel"),
    "lowrax.adapters.lily": ("LilyConfig", "LilyKernel"),
    "lowrax.adapters.glora": ("GloraConfig", "GloraKernel"),
    "lowrax.adapters.frod": ("FrodConfig", "FrodKernel"),
    "lowrax.adapters.ln_tuning": ("LNTuningConfig", "TunedNorm"),
    "lowrax.adapters.trainable_tokens": ("TrainableTokensConfig", "TrainableTokens"),
    "lowrax.adapters.prompt": ("PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "PromptTable",
                               "PromptEncoder", "PrefixEncoder"),
    # the parameter tree with adapters
    "lowrax.adapters.tree": ("split", "combine", "merge", "unmerge", "labels", "count_params", "adapters_off"),
    # PEFT's format and many adapters on one base
    "lowrax.adapters.named.exchange": ("save_peft", "load_peft"),
    "lowrax.adapters.named.named": ("add_adapter", "set_adapter", "disable_adapters", "delete_adapter",
                                    "extract_adapter", "adapter_names", "active_adapter", "base_params"),
    "lowrax.adapters.slots": ("LoraSlots",),
    "lowrax.merging.combine_adapters": ("combine_adapters",),
    "lowrax.merging.models": ("merge_models",),
    # objectives
    "lowrax.objectives": ("dpo_loss", "orpo_loss", "simpo_loss", "kto_loss", "distill_loss", "group_advantages",
                          "grpo_loss"),
    # training
    "lowrax.train.optim": ("OptimizerConfig", "make_optimizer"),
    "lowrax.train.step": ("TrainState", "init_state", "make_train_step"),
    "lowrax.train.config": ("TrainConfig", "load_config"),
    "lowrax.train.trainer": ("run_training",),
    "lowrax.train.host_memory": ("reuse_freed_host_memory",),
    # quantized and pruned bases
    "lowrax.quant.tree": ("QuantConfig", "quantize"),
    "lowrax.quant.nf4": ("NF4Tensor",),
    "lowrax.quant.int8": ("Int8Tensor",),
    "lowrax.merging.requantize": ("merge_requantized",),
    "lowrax.pruning.prune": ("prune",),
    "lowrax.sparse.kernel": ("SparseKernel", "sparse_modules"),
    # several devices and hosts
    "lowrax.dist.sharding": ("MeshConfig", "make_mesh", "param_shardings"),
    "lowrax.dist.parallel": ("DistConfig", "global_batch", "sharded_train_step"),
    # errors
    "lowrax.errors": ("LowraxError", "NotAModelError", "UnsupportedModelError", "CheckpointError", "NonFiniteError",
                      "OutputExistsError"),
}
_SUBMODULES = {"lora": "lowrax.adapters.lora"}  # `lowrax.lora.wrap(...)`, the LoRA family's own functions
_BUILTINS = ("lowrax.adapters.catalog", "lowrax.quant")  # imported for what they register

__all__ = [*_SUBMODULES, *(name for names in _PUBLIC.values() for name in names)]


def load_all() -> None:
    """Import the whole public API now (what the first use of a public name does)."""
    for module in _BUILTINS:
        importlib.import_module(module)
    for module, names in _PUBLIC.items():
        loaded = importlib.import_module(module)
        globals().update({name: getattr(loaded, name) for name in names})
    globals().update({name: importlib.import_module(module) for name, module in _SUBMODULES.items()})


def __getattr__(name: str):
    if name in __all__:
        load_all()
        return globals()[name]
    raise AttributeError(f"module 'lowrax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
