"""LoRALayerBase: the bookkeeping LoRALinear and LoRAEmbedding share (no math here).

One layer holds several named adapters ("default", "french", ...) in dicts keyed by adapter name
(docs/reference.md#several-adapters):

    lora_A["french"]      [r, in]     lora_B["french"]   [out, r]     lora_magnitude["french"]  [out]  (DoRA)
    rank / alpha / scaling / use_dora ["french"]                      lora_dropout["french"]

    active_adapters    the ones that run, in this order (their updates add up)
    merged_adapters    the ones folded into W, in merge order (unmerge goes backwards)

`set_adapter`, `set_scale` and `delete_adapter` change which adapters run and how strongly; every
such change, and train(True), calls `clear_caches()`, the hook a subclass that caches derived tensors
overrides (LoRALinear: its DoRA cache, lora/dora.py). Merging happens only through explicit
`merge()` / `unmerge()` calls, never in train()/eval().
"""

from typing import Dict, List, Optional, Sequence

import torch.nn as nn

from lora.config import INITS, check_alpha, check_rank


class LoRALayerBase(nn.Module):
    """What LoRALinear and LoRAEmbedding share: named adapters, active / merged lists, scales.

    Subclasses implement `add_adapter`, `lora_delta`, `forward`, `merged_weight`, `merge`, `unmerge`,
    `unloaded_base`, and override `clear_caches` if they cache anything.
    """

    # read by runtime/save_guard.py: a transformers model holding this layer refuses save_pretrained
    save_pretrained_refusal = ("from_pretrained would drop the adapter's keys (base_layer, lora_A, lora_B ...) and "
                               "start the layer afresh, silently. Save the adapter alone with lora.save_adapter(model, "
                               "folder, format='peft') (PeftModel.from_pretrained reads it), or merge first: "
                               "model = lora.merge_and_unload(model), then model.save_pretrained(folder)")
    mixed_adapter_names: Optional[List[str]] = None  # one adapter per batch row, set by lora.mixed_batch

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)  # the base is frozen: only adapters train
        self.lora_A = nn.ParameterDict()  # {adapter name: [r, in]}
        self.lora_B = nn.ParameterDict()  # {adapter name: [out, r]}
        self.lora_magnitude = nn.ParameterDict()  # {adapter name: [out]} (DoRA adapters only)
        self.lora_dropout = nn.ModuleDict()  # {adapter name: nn.Dropout or nn.Identity}
        self.rank: Dict[str, int] = {}
        self.alpha: Dict[str, float] = {}
        self.scaling: Dict[str, float] = {}  # s = alpha / r (or / sqrt(r)) times the user's scale factor
        self.base_scaling: Dict[str, float] = {}  # s before set_scale
        self.use_dora: Dict[str, bool] = {}
        self.active_adapters: List[str] = []
        self.merged_adapters: List[str] = []  # in merge order (unmerge goes backwards)
        self.adapters_disabled = False

    @property
    def adapter_names(self) -> List[str]:
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _adapters_to_run(self) -> List[str]:
        """The adapters forward adds: the active ones that are not merged (none while disabled)."""
        if self.adapters_disabled:
            if self.merged_adapters:
                raise RuntimeError(f"adapters {self.merged_adapters} are merged into the weight, so they cannot be "
                                   f"disabled; call unmerge(model) first")
            return []
        return [name for name in self.active_adapters if name not in self.merged_adapters]

    # ----- checks -------------------------------------------------------------------------------------
    def _check_new_adapter(self, adapter_name: str, rank: int, alpha: float, max_rank: int, init: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer "
                             f"(adapters: {self.adapter_names}); pick a new name or delete it first")
        check_rank(rank, "r")
        check_alpha(alpha, "alpha")
        if rank > max_rank:
            raise ValueError(f"r={rank} is larger than min(in, out) = {max_rank} of {self._describe()}; "
                             f"a rank above that adds parameters but no expressive power, use r <= {max_rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

    def _describe(self) -> str:
        return f"{type(self.base_layer).__name__}({self.in_features} -> {self.out_features})"

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} does not exist on this layer; adapters: {self.adapter_names}")

    def _unmerged_active(self, adapter_names: Optional[Sequence[str]]) -> List[str]:
        """The adapters a merge should fold in: the given ones (none may be merged yet), or by default
        every active adapter that is not merged yet (so a repeated merge() is a no-op)."""
        if adapter_names is None:
            return [name for name in self.active_adapters if name not in self.merged_adapters]
        for name in adapter_names:
            self._check_adapter(name)
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged into {self._describe()}; "
                                 f"merging it again would add its update twice (unmerge first)")
        return list(adapter_names)

    # ----- changing the adapters ----------------------------------------------------------------------
    def _register(self, adapter_name, rank, alpha, scaling, dropout, use_dora, lora_A, lora_B) -> None:
        """Store a new adapter's settings and its A `[r, in]`, B `[out, r]` as parameters."""
        self.rank[adapter_name], self.alpha[adapter_name] = rank, alpha
        self.scaling[adapter_name] = self.base_scaling[adapter_name] = scaling
        self.use_dora[adapter_name] = use_dora
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = nn.Parameter(lora_A)
        self.lora_B[adapter_name] = nn.Parameter(lora_B)
        self.clear_caches()

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        """Make exactly these adapters run (names this layer does not hold are ignored)."""
        self.active_adapters = [name for name in adapter_names if name in self.lora_A]
        self.clear_caches()

    def set_scale(self, adapter_name: str, factor: float) -> None:
        """Multiply adapter `adapter_name`'s update by `factor` (0 turns it off, 1 restores it)."""
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the weight; unmerge before rescaling it")
        self.scaling[adapter_name] = self.base_scaling[adapter_name] * factor
        self.clear_caches()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into the weight; unmerge before deleting it")
        for container in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if adapter_name in container:
                del container[adapter_name]
        for table in (self.rank, self.alpha, self.scaling, self.base_scaling, self.use_dora):
            table.pop(adapter_name, None)
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]
        self.clear_caches()

    def clear_caches(self) -> None:
        """Forget anything derived from the adapters (nothing here; LoRALinear drops its DoRA cache)."""

    def train(self, mode: bool = True):
        if mode:
            self.clear_caches()  # what is cached for eval (DoRA's norm) may change while training
        return super().train(mode)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={self.rank[name]}, s={self.scaling[name]:g}"
                             + (", dora" if self.use_dora[name] else "") for name in self.adapter_names)
        return f"adapters=[{adapters}], active={self.active_adapters}, merged={self.merged_adapters}"
