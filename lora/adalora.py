"""AdaLoRA's adapter: LoRA in the form of an SVD, P diag(lambda) Q, whose singular values can be switched off
(Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", section 3.1).

    x ──► base_layer (frozen W, b) ─────────────────────────────────────────────┐
    │                                                                           (+) ──► y
    └──► dropout ──► A [r, in] (Q) ──► ⊙ E [r, 1] (lambda) ──► B [out, r] (P) ──► × alpha / ranknum

    y = W x + b + B (E ⊙ A x) · alpha / ranknum          ranknum = init_r (it does not shrink with the mask)

How it differs from LoRA (lora/layer.py):
  - a third, tiny parameter E: one "singular value" per rank. Setting E[i] = 0 removes the rank-one
    update B[:, i] A[i, :] without touching the shapes, so AdaLoRA can prune ranks while training
    (lora/rank_allocator.py decides which: the least important triplets (A[i], E[i], B[:, i]) first).
  - E starts at zero (the fresh adapter is a no-op), A and B are small Gaussians (std 0.02), not Kaiming/zero.
  - A and B are kept near-orthogonal by a term added to the loss (`orthogonal_regularization`), so that
    E really plays the part of singular values and zeroing one removes one direction.
  - the scale divides by ranknum = init_r (PEFT: `scaling / (ranknum + 1e-5)`), where LoRA divides by r.

Exact against Hugging Face PEFT 0.21 (`peft.tuners.adalora`: `SVDLinear`, `AdaLoraModel.forward`);
docs/reference.md#adalora has the formulas. One trainable adapter per model, on nn.Linear layers only
(as PEFT, which also refuses DoRA and has no embedding variant).
"""

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.model import _set_submodule, find_targets

RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum before dividing (`ranknum + 1e-5`); kept for exact numbers


@dataclass(frozen=True)
class AdaLoRAConfig:
    """What AdaLoRA adapts and how its rank budget shrinks (PEFT's `AdaLoraConfig`, same defaults).

    Training has three phases over `total_step` optimizer steps (rank_allocator.budget_schedule):
        steps 1 .. tinit                      every layer keeps init_r ranks (the adapters learn first)
        tinit .. total_step - tfinal          the budget falls along a cubic from init_r to target_r per layer
        the last tfinal steps                 the ranks are fixed; the kept triplets fine-tune
    """

    total_step: Optional[int] = None  # optimizer steps of the whole run: the schedule ends there (required)
    target_modules: Union[Sequence[str], str] = ("q_proj", "v_proj")  # as LoRAConfig (names, suffixes, a regex)
    init_r: int = 12  # ranks per layer at the start
    target_r: int = 8  # ranks per layer on average at the end: the budget is target_r * number of layers
    alpha: float = 8.0  # PEFT's lora_alpha; the update is scaled by alpha / init_r (not alpha / r)
    dropout: float = 0.0  # on the adapter's input, as in LoRA
    tinit: int = 0  # steps before any rank is pruned
    tfinal: int = 0  # steps at the end with the final ranks fixed
    delta_t: int = 1  # PEFT's deltaT: during the cubic phase, prune every delta_t steps
    beta1: float = 0.85  # EMA of the sensitivity |w * grad| (paper eq. 8)
    beta2: float = 0.85  # EMA of its uncertainty |sensitivity - its EMA| (paper eq. 9)
    orth_reg_weight: float = 0.5  # weight of the orthogonality term added to the loss

    def __post_init__(self):
        """Refuse settings the schedule cannot follow, naming the field and a value that works."""
        if not isinstance(self.total_step, int) or self.total_step < 1:
            raise ValueError(f"AdaLoRAConfig.total_step must be the number of training steps (an integer >= 1), "
                             f"got {self.total_step!r}: the rank budget schedule ends there")
        if not isinstance(self.init_r, int) or not isinstance(self.target_r, int) or not 1 <= self.target_r < self.init_r:
            raise ValueError(f"AdaLoRA prunes from init_r down to target_r ranks per layer, so it needs integers "
                             f"1 <= target_r < init_r; got init_r={self.init_r!r}, target_r={self.target_r!r} "
                             f"(PEFT's defaults: init_r=12, target_r=8; without pruning, use plain LoRA)")
        for name in ("tinit", "tfinal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"AdaLoRAConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no steps to prune ranks in "
                             f"(tinit must be < total_step - tfinal = {self.total_step - self.tfinal}); "
                             f"lower tinit / tfinal or raise total_step")
        if not isinstance(self.delta_t, int) or self.delta_t < 1:
            raise ValueError(f"AdaLoRAConfig.delta_t must be an integer >= 1 (prune every delta_t steps), "
                             f"got {self.delta_t!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} is an EMA factor and must lie in (0, 1), got "
                                 f"{getattr(self, name)!r} (default 0.85)")
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < math.inf):
            raise ValueError(f"AdaLoRAConfig.alpha must be a number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.orth_reg_weight < math.inf:
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


class AdaLoRALinear(nn.Module):
    """A frozen nn.Linear plus one AdaLoRA adapter in SVD form (PEFT's `SVDLinear`).

    Shapes: x (..., in) -> y (..., out); lora_A [r, in] (Q, right singular vectors), lora_E [r, 1]
    (lambda, singular values), lora_B [out, r] (P, left singular vectors), r = init_r.

    Example:
        >>> layer = AdaLoRALinear(nn.Linear(16, 8), init_r=4, alpha=8.0)
        >>> layer.lora_A.shape, layer.lora_E.shape, layer.lora_B.shape
        (torch.Size([4, 16]), torch.Size([4, 1]), torch.Size([8, 4]))
        >>> x = torch.randn(2, 16)
        >>> torch.equal(layer(x), layer.base_layer(x))     # E = 0: a fresh adapter is a no-op
        True
    """

    def __init__(self, base_layer: nn.Linear, init_r: int = 12, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__()
        if type(base_layer) is not nn.Linear:
            raise TypeError(f"AdaLoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.init_r, self.alpha = init_r, alpha
        self.ranknum = float(init_r)  # PEFT keeps it as a frozen parameter, always init_r: not the kept ranks
        weight = base_layer.weight
        # PEFT's reset_lora_parameters: E = 0 (a no-op start), A and B ~ N(0, 0.02^2)
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, dtype=weight.dtype, device=weight.device))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)  # subtle: A before B, as PEFT draws them
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> y (..., out):  y = W x + b + B (E ⊙ A x) · alpha / ranknum   (paper eq. 3)."""
        result = self.base_layer(x)  # W x + b   (..., out)
        # subtle: (A * E) x is E ⊙ (A x), the singular values scaling the rows of A; PEFT multiplies A by E
        # first, and the same order gives the same bits
        lora_out = F.linear(F.linear(self.lora_dropout(x), self.lora_A * self.lora_E), self.lora_B)  # (..., out)
        return result + lora_out * self.alpha / (self.ranknum + RANKNUM_EPS)

    def delta_weight(self) -> torch.Tensor:
        """The update of W: B (A * E) · alpha / ranknum   [out, in] (masked triplets contribute 0)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.alpha / (self.ranknum + RANKNUM_EPS)

    def kept_ranks(self) -> int:
        """How many singular values are not zero: the rank this layer's update has now."""
        return int((self.lora_E != 0).sum())

    def extra_repr(self) -> str:
        return f"init_r={self.init_r}, alpha={self.alpha}"


def adalora_layers(model: nn.Module) -> Iterator[Tuple[str, AdaLoRALinear]]:
    """(name, layer) for every AdaLoRA layer, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdaLoRALinear):
            yield name, module


def check_adalora_targets(model: nn.Module, config: AdaLoRAConfig) -> List[str]:
    """The names `config.target_modules` selects, checked: nn.Linear layers at least init_r wide."""
    targets = find_targets(model, config)  # the same matching rules and messages as LoRA
    for name in targets:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ValueError(f"AdaLoRA target {name!r} is a {type(module).__name__}; AdaLoRA here adapts "
                             f"nn.Linear layers only (no 4-bit, embedding or already-adapted layers)")
        if config.init_r > min(module.in_features, module.out_features):
            raise ValueError(f"init_r={config.init_r} for {name!r} is larger than min(in, out) = "
                             f"{min(module.in_features, module.out_features)}; use init_r <= that")
    return targets


def apply_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Wrap the targets with AdaLoRALinear in place and freeze everything else; returns the model.

    The layers are created in model order, each drawing A then B from the global generator (seed it first
    for the same adapter each time). `model.adalora_config` records the config.
    """
    targets = check_adalora_targets(model, config)
    model.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        layer = AdaLoRALinear(base, config.init_r, config.alpha, config.dropout)
        layer.train(base.training)
        _set_submodule(model, name, layer)
    model.adalora_config = config
    return model


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """R = mean over the matrices A, B of every layer of ||A A^T - I||_F and ||B^T B - I||_F   (a scalar).

    subtle: the paper's eq. 4 squares the norms (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2); PEFT 0.21
    (`AdaLoraModel.forward`) takes them unsquared and averages over the 2 x layers matrices, and so do we.
    The training loss is loss + orth_reg_weight * R.
    """
    total, count = 0, 0
    for _, layer in adalora_layers(model):
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # [r, r] each
            identity = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
            total = total + torch.norm(gram - identity, p="fro")
            count += 1
    return total / count if count else torch.zeros(())


@torch.no_grad()
def merge_adalora(model: nn.Module) -> nn.Module:
    """Replace every AdaLoRA layer by its base nn.Linear holding W + B (A * E) · alpha / ranknum; in place."""
    for name, layer in list(adalora_layers(model)):
        base = layer.base_layer
        base.weight += layer.delta_weight().to(base.weight.dtype)
        _set_submodule(model, name, base)
    if hasattr(model, "adalora_config"):
        del model.adalora_config
    return model
