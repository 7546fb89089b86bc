"""lora: hand-written LoRA and DoRA that compute what Hugging Face PEFT computes, on any nn.Module.

Before (full fine-tuning: every weight trains):

    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

After (LoRA: the model is frozen, small adapters A, B train next to q_proj and v_proj):

    import lora
    config = lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    model = lora.apply_lora(model, config)
    lora.print_trainable_parameters(model)       # trainable params: ... || all params: ... || trainable%: ...
    optimizer = torch.optim.AdamW(lora.lora_plus_param_groups(model, lr=2e-4))   # or any optimizer
    ...train...
    lora.save_adapter(model, "dist/my_adapter")  # a few KB: lora_config.json + lora_weights.pt
    lora.load_adapter(fresh_base_model, "dist/my_adapter")
    lora.save_adapter(model, "dist/for_peft", format="peft")   # PEFT's folder: PeftModel.from_pretrained reads it
    plain = lora.merge_and_unload(model)         # nn.Linear layers again, no adapter parameters left

A transformers model refuses `save_pretrained` while it holds LoRA layers (from_pretrained could not
restore them): save the adapter with format="peft", or merge_and_unload first and then save_pretrained.

Files, in reading order: config.py (LoRAConfig), layer.py (LoRALinear: the LoRA forward, merge),
dora.py (DoRA: the formula, then the fast path and its cache), inits.py (kaiming, gaussian, PiSSA,
OLoRA), bookkeeping.py (LoRALayerBase: named adapters), base_layer.py (nn.Linear or 4-bit base),
embedding.py (LoRAEmbedding), conv.py (LoRAConv: nn.Conv1d/2d/3d; GPT-2's Conv1D is a LoRALinear,
base_layer.py), modules_to_save.py (ModulesToSaveWrapper: a module trained fully,
one copy per adapter), model.py (apply_lora, target matching, adapters on a model),
combine.py (weighted combinations), io.py (adapter folders, PEFT keys), peft_format.py (PEFT's
folder: adapter_config.json + adapter_model.safetensors), lora_plus.py (LoRA+),
fused.py (the same LoRA training forward/backward in fewer GPU kernels; `lora.set_fused(False)` turns it off),
loftq.py (LoftQ: QLoRA's adapter started at the quantization error), mixed_batch.py (a different
adapter on each row of one batch), replication.py (a deeper model from shared blocks, each with its own adapter).
"""

from lora.combine import combine_adapters
from lora.config import LoRAConfig
from lora.conv import LoRAConv
from lora.embedding import LoRAEmbedding
from lora.fused import fused_enabled, set_fused
from lora.io import (adapter_state_dict, check_adapter_fits, check_base_fingerprint, from_peft_state_dict,
                     load_adapter, load_base_fingerprint, load_lora_config, model_fingerprint, save_adapter,
                     state_fingerprint, to_peft_state_dict, write_adapter_files)
from lora.layer import LoRALinear, base_weight
from lora.loftq import apply_loftq, loftq_init
from lora.lora_plus import lora_plus_param_groups
from lora.mixed_batch import forward_mixed, mixed_batch
from lora.replication import replicate_layers
from lora.modules_to_save import ModulesToSaveWrapper
from lora.model import (add_adapter, apply_lora, count_parameters, delete_adapter, disable_adapters, find_targets,
                        lora_layers, mark_only_lora_as_trainable, merge, merge_and_unload, print_trainable_parameters,
                        set_adapter, set_adapter_scale, unload, unmerge)

__all__ = [
    "LoRAConfig", "LoRALinear", "LoRAEmbedding", "LoRAConv", "ModulesToSaveWrapper", "base_weight",
    "apply_lora", "add_adapter", "set_adapter", "disable_adapters", "set_adapter_scale", "delete_adapter",
    "combine_adapters", "merge", "unmerge", "merge_and_unload", "unload",
    "print_trainable_parameters", "count_parameters", "find_targets", "lora_layers", "mark_only_lora_as_trainable",
    "save_adapter", "write_adapter_files", "load_adapter", "load_lora_config", "adapter_state_dict",
    "check_adapter_fits", "model_fingerprint", "state_fingerprint", "load_base_fingerprint", "check_base_fingerprint",
    "to_peft_state_dict", "from_peft_state_dict", "lora_plus_param_groups", "set_fused", "fused_enabled",
    "apply_loftq", "loftq_init",
    "mixed_batch", "forward_mixed", "replicate_layers",
]
