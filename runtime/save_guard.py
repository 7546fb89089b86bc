"""A guard on one model's `save_pretrained`: refuse to write a checkpoint `from_pretrained` cannot restore.

A transformers model that holds LoRA wrappers or 4-bit layers has state_dict keys a plain model does not
have ("...q_proj.base_layer.weight", "...q_proj.lora_A.default", "...q_proj.weight_codes"). Its
`save_pretrained` writes them without a word, and `from_pretrained` later drops them with a warning and
starts those layers from random weights: the fine-tuning is silently gone. So `apply_lora` and
`quantize_model` call `guard_save_pretrained(model)`:

    model.save_pretrained  ──►  any module with a `save_pretrained_refusal` text?  ── yes ──►  ValueError(text)
                                                                                  ── no  ──►  the class's own save_pretrained

The guard is an attribute of that one model object (the class, and every other model, are left alone);
transformers is never imported: a model "is a transformers model" when it has a `save_pretrained`
method. Once the special layers are gone (`lora.merge_and_unload`, `quant.dequantize_model`) the guard
passes the call through, so the supported route needs no extra step.
"""

import torch.nn as nn

REFUSAL_ATTRIBUTE = "save_pretrained_refusal"  # a class attribute of the layers save_pretrained cannot restore


def save_pretrained_refusal(model: nn.Module):
    """The first refusal text of a module in `model` (with its path), or None when the model is plain."""
    for path, module in model.named_modules():
        text = getattr(type(module), REFUSAL_ATTRIBUTE, None)
        if text:
            return f"{path or 'the model'} is a {type(module).__name__}: {text}"
    return None


class GuardedSavePretrained:
    """`model.save_pretrained` while guarded: refuses while the model holds layers it cannot save.

    subtle: an object holding the model, not a closure, so that copy.deepcopy(model) gives the copy a
    guard of its own (a closure would be shared, and would check and save the original model).
    """

    is_minilora_guard = True

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        refusal = save_pretrained_refusal(self.model)
        if refusal is not None:
            raise ValueError(f"save_pretrained would write a checkpoint that from_pretrained cannot restore: "
                             f"{refusal}")
        return type(self.model).save_pretrained(self.model, *args, **kwargs)  # the class's own method


def guard_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained(...)` raise while the model holds layers it cannot save (see above).

    A no-op for a model without a `save_pretrained` method, and for one already guarded.
    """
    method = getattr(model, "save_pretrained", None)
    if method is None or getattr(method, "is_minilora_guard", False):
        return
    # subtle: set on the instance (its __dict__), so only this model object is guarded, not its class
    object.__setattr__(model, "save_pretrained", GuardedSavePretrained(model))
