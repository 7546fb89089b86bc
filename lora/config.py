"""LoRAConfig: every choice that decides what an adapter is, in one frozen, validated dataclass.

The same names as Hugging Face PEFT's `LoraConfig` where they mean the same thing (`r`,
`target_modules`, `use_dora`, `use_rslora`, `modules_to_save`, `rank_pattern`, `alpha_pattern`);
PEFT's `lora_alpha` / `lora_dropout` / `init_lora_weights` are plain `alpha` / `dropout` / `init` here.
The config is saved next to the adapter weights (`lora_config.json`), so an adapter folder always
knows how to rebuild itself.

    >>> config = LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    >>> config.scaling_for(rank=8, alpha=16)       # alpha / r
    2.0
    >>> LoRAConfig(r=8, alpha=16, use_rslora=True).scaling_for(rank=8, alpha=16)   # alpha / sqrt(r)
    5.656854249492381
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union

from lora.replication import check_layer_map
from runtime.files import compile_checked_regex

INITS = ("kaiming", "gaussian", "pissa", "olora")


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8  # rank of the update B @ A: small (4-64) keeps the adapter tiny
    alpha: float = 8.0  # the update is scaled by alpha / r, so changing r keeps the step size comparable
    dropout: float = 0.0  # dropout on the LoRA branch's input only; the frozen base never sees it
    # which modules get an adapter: a list of leaf names or dotted suffixes (["q_proj", "attn.v_proj"]),
    # a regex string that must match the whole module name, or "all-linear" (every Linear except lm_head)
    target_modules: Union[str, Tuple[str, ...]] = ("q_proj", "v_proj")
    use_dora: bool = False  # DoRA: learn a per-row magnitude too (Liu et al., 2024)
    use_rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r), which stays stable for large ranks
    init: str = "kaiming"  # "kaiming" | "gaussian" (B = 0: a no-op start) | "pissa" | "olora" (rewrite W!)
    modules_to_save: Tuple[str, ...] = ()  # modules trained fully and stored with the adapter (e.g. lm_head)
    rank_pattern: Dict[str, int] = field(default_factory=dict)  # per-module rank overrides {name: r}
    alpha_pattern: Dict[str, float] = field(default_factory=dict)  # per-module alpha overrides {name: alpha}
    # on a bf16 / fp16 base: True keeps A, B, m in float32 and adds the LoRA output in float32 before one
    # rounding, as PEFT's get_peft_model(autocast_adapter_dtype=True), its default; False (ours): the
    # adapters take the base's dtype (docs/reference.md#qlora, docs/reference.md#where-we-differ)
    autocast_adapter_dtype: bool = False
    # a deeper model from the base's own blocks, weights shared: [[start, end), ...] ranges stacked in order,
    # e.g. [[0, 2], [1, 2]] -> blocks 0 1 1, each with its own adapter (lora/replication.py)
    layer_replication: Optional[Tuple[Tuple[int, int], ...]] = None

    def __post_init__(self):
        # subtle: lists are accepted for convenience but stored as tuples so the config stays immutable
        object.__setattr__(self, "target_modules", _target_modules(self.target_modules))
        object.__setattr__(self, "modules_to_save", _module_names(self.modules_to_save))
        object.__setattr__(self, "rank_pattern", _pattern(self.rank_pattern, "rank_pattern"))
        object.__setattr__(self, "alpha_pattern", _pattern(self.alpha_pattern, "alpha_pattern"))
        check_rank(self.r, "LoRAConfig.r")
        check_alpha(self.alpha, "LoRAConfig.alpha")
        for name, rank in self.rank_pattern.items():
            check_rank(rank, f"LoRAConfig.rank_pattern[{name!r}]")
        for name, alpha in self.alpha_pattern.items():
            check_alpha(alpha, f"LoRAConfig.alpha_pattern[{name!r}]")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for flag in ("use_dora", "use_rslora", "autocast_adapter_dtype"):
            # subtle: a hand-edited JSON "false" is a non-empty string, which Python would treat as True
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"LoRAConfig.{flag} must be True or False, got {getattr(self, flag)!r} "
                                 f"({type(getattr(self, flag)).__name__})")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if self.layer_replication is not None:
            object.__setattr__(self, "layer_replication", tuple(check_layer_map(self.layer_replication)))

    def scaling_for(self, rank: int, alpha: float) -> float:
        """The factor s in y = Wx + s·BAx: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": target,
                "use_dora": self.use_dora, "use_rslora": self.use_rslora, "init": self.init,
                "modules_to_save": list(self.modules_to_save), "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern), "autocast_adapter_dtype": self.autocast_adapter_dtype,
                **({"layer_replication": [list(pair) for pair in self.layer_replication]}
                   if self.layer_replication is not None else {})}  # written only when set: older files unchanged


def _target_modules(target) -> Union[str, Tuple[str, ...]]:
    """A string stays a string (a regex for the whole name, or "all-linear"), as in PEFT; a list becomes a tuple."""
    if isinstance(target, str):
        if not target:
            raise ValueError("LoRAConfig.target_modules is empty; give leaf names like ['q_proj', 'v_proj'], "
                             "a regex, or 'all-linear'")
        _check_regex(target, "LoRAConfig.target_modules")
        return target
    if isinstance(target, (set, frozenset)):
        target = sorted(target)  # PEFT keeps a set; sorted, so the saved config is the same on every run
    if (not isinstance(target, (list, tuple)) or not target
            or not all(isinstance(name, str) and name for name in target)):
        raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of module names (['q_proj', "
                         f"'v_proj']), a regex string or 'all-linear', got {target!r}")
    return tuple(target)


def _module_names(names) -> Tuple[str, ...]:
    """modules_to_save: None, one name, or a list of names (leaf names or dotted suffixes)."""
    if names is None:
        return ()
    if isinstance(names, str):
        # subtle: one name, not its characters (tuple("lm_head") would be ('l', 'm', '_', ...))
        names = (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"LoRAConfig.modules_to_save must be a list of module names such as ['lm_head'], "
                         f"got {names!r}")
    return tuple(names)


def _pattern(pattern, what: str) -> dict:
    if pattern is None:
        return {}
    if not isinstance(pattern, dict) or not all(isinstance(key, str) and key for key in pattern):
        raise ValueError(f"LoRAConfig.{what} must be a dict {{module name or regex: value}}, got {pattern!r}")
    for key in pattern:
        _check_regex(key, f"LoRAConfig.{what} key")
    return dict(pattern)


def _check_regex(text: str, what: str) -> None:
    # subtle: configs come from files too (lora_config.json), so a regex is bounded in length and refused if
    # it could backtrack for minutes, like "(a+)+$" (see runtime/files.py); "all-linear" is no regex at all
    if text != "all-linear":
        compile_checked_regex(text, what)


def check_rank(rank, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be a positive integer (the rank of B @ A), got {rank!r}")


def check_alpha(alpha, what: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{what} must be a positive number (the update is scaled by alpha / r), got {alpha!r}")
