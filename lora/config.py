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
from typing import Dict, Tuple, Union

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

    def __post_init__(self):
        # subtle: lists are accepted for convenience but stored as tuples so the config stays immutable
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save or ()))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        check_rank(self.r, "LoRAConfig.r")
        check_alpha(self.alpha, "LoRAConfig.alpha")
        for name, rank in self.rank_pattern.items():
            check_rank(rank, f"LoRAConfig.rank_pattern[{name!r}]")
        for name, alpha in self.alpha_pattern.items():
            check_alpha(alpha, f"LoRAConfig.alpha_pattern[{name!r}]")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("LoRAConfig.target_modules is empty; give leaf names like ['q_proj', 'v_proj'], "
                                 "a regex, or 'all-linear'")
        elif not self.target_modules or not all(isinstance(name, str) and name for name in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules must be a non-empty list of module names, a regex "
                             f"string or 'all-linear', got {self.target_modules!r}")

    def scaling_for(self, rank: int, alpha: float) -> float:
        """The factor s in y = Wx + s·BAx: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": target,
                "use_dora": self.use_dora, "use_rslora": self.use_rslora, "init": self.init,
                "modules_to_save": list(self.modules_to_save), "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern)}


def check_rank(rank, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be a positive integer (the rank of B @ A), got {rank!r}")


def check_alpha(alpha, what: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{what} must be a positive number (the update is scaled by alpha / r), got {alpha!r}")
