"""ModulesToSaveWrapper: a module trained fully next to the adapters (`LoRAConfig.modules_to_save`), as PEFT's.

    lm_head: nn.Linear  ──add_adapter──►  ModulesToSaveWrapper
                                              original_module          the module as it was, frozen
                                              modules_to_save["a"]     a trainable copy for adapter "a"
                                              modules_to_save["b"]     another one for adapter "b"

The forward runs the active adapter's copy. `disable_adapters()` runs the original, `unload()` puts the
original back and `merge_and_unload()` keeps the active adapter's copy (as PEFT 0.21's does; its
`unload()` differs: it keeps the active copy too, see model.py); a second adapter gets its own copy of the original, so adapters never
share or overwrite each other's module, and the base module itself is never trained.

Saved adapter files keep the module's own parameter names ("lm_head.weight"), taken from the adapter's
copy, so a file does not depend on this wrapper (and files saved before it existed still load).
Attributes the wrapper does not have are looked up on the module that runs: `model.lm_head.weight` is
the active copy's weight, as in PEFT.
"""

import copy
from typing import List, Optional, Sequence

import torch.nn as nn

from lora.mixed_batch import mixed_batch_saved_module


class ModulesToSaveWrapper(nn.Module):
    """The original module (frozen) plus one trainable copy per adapter; the active adapter's copy runs.

    Args:
        original_module: the module to train fully (e.g. `lm_head`); it is frozen and kept unchanged.

    Example:
        >>> wrapper = ModulesToSaveWrapper(nn.Linear(4, 2))
        >>> wrapper.add_adapter("default"); wrapper.set_adapter(["default"])
        >>> wrapper.active_module is wrapper.modules_to_save["default"]
        True
    """

    # read by runtime/save_guard.py: a transformers model holding this layer refuses save_pretrained
    save_pretrained_refusal = ("from_pretrained would drop the adapter's keys (original_module, modules_to_save ...) and "
                               "keep the untrained module, silently. Save the adapter alone with lora.save_adapter(model, "
                               "folder, format='peft') (PeftModel.from_pretrained reads it), or merge first: "
                               "model = lora.merge_and_unload(model), then model.save_pretrained(folder)")
    mixed_adapter_names: Optional[List[str]] = None  # one adapter per batch row, set by lora.mixed_batch

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()  # {adapter name: a copy of original_module}
        self.active_adapter: Optional[str] = None  # at most one: two trained copies cannot both run
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> List[str]:
        return list(self.modules_to_save.keys())

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original when none is active
        or adapters are disabled."""
        if self.adapters_disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def add_adapter(self, adapter_name: str) -> None:
        """Give adapter `adapter_name` its own copy of the original module (frozen until it is active)."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy here (adapters: {self.adapter_names})")
        # subtle: a copy of the original, not of another adapter's trained copy
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def adapters_among(self, adapter_names: Sequence[str]) -> List[str]:
        """The given adapters that have a copy here."""
        return [name for name in adapter_names if name in self.modules_to_save]

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        """Run the copy of the one adapter among `adapter_names` that has one (the original if none has)."""
        held = self.adapters_among(adapter_names)
        if len(held) > 1:
            raise ValueError(f"adapters {held} each have their own copy of this module; only one of them can be "
                             f"active at a time (as in PEFT)")
        self.active_adapter = held[0] if held else None

    def delete_adapter(self, adapter_name: str) -> None:
        del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.mixed_adapter_names is not None:  # one adapter's copy per batch row (lora/mixed_batch.py)
            return mixed_batch_saved_module(self, *args, adapter_names=self.mixed_adapter_names, **kwargs)
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            pass
        # subtle: while the object is being built or copied there is no _modules yet; looking up
        # active_module then would recurse forever
        modules = self.__dict__.get("_modules")
        if not modules or "original_module" not in modules:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return getattr(self.active_module, name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapter}, disabled={self.adapters_disabled}"
