"""AdaLoRA's rank allocator: score every singular triplet, and zero the least important ones while training
(Zhang et al. 2023, sections 3.2-3.3; PEFT 0.21 `RankAllocator` and `AdaLoraModel.update_and_allocate`).

Each step, after optimizer.step() and before the gradients are cleared:

    1. importance of every adapter entry w (A, E and B):  I = |w · grad|               (eq. 6, sensitivity)
           smoothed:     I_bar = beta1 · I_bar + (1 - beta1) · I                        (eq. 8)
           uncertainty:  U_bar = beta2 · U_bar + (1 - beta2) · |I - I_bar|              (eq. 9)
           score:        s(w)  = I_bar · U_bar                                          (eq. 10)
    2. one score per triplet i of a layer:  S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)   (eq. 7)
    3. the budget b(t) (all layers' ranks together) from the cubic schedule (`budget_schedule`, eq. 12)
    4. E_i = 0 for every triplet whose S_i is among the (init budget - b(t)) lowest of the whole model

The masked triplets stay in the model (E is zero, A and B keep training); the optimizer can nudge a zeroed
E away from 0 for one step, and the next allocation zeroes it again, as in PEFT. Layers compete for one
budget: an important layer keeps more than target_r ranks, an unimportant one fewer.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lora.adalora import AdaLoRAConfig, adalora_layers


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> Tuple[int, bool]:
    """The rank budget after step `step` (1-based), and whether to prune at this step (paper eq. 12).

        step <= tinit:                   b = init_budget                               (no pruning yet)
        step >  total_step - tfinal:     b = target_budget                             (ranks fixed)
        otherwise:                       b = int((init - target) · (1 - (step - tinit) / (total_step - tfinal - tinit))^3
                                                 + target),  pruning when step % delta_t == 0

    Example: 12 -> 8 ranks per layer over 2 layers, steps 1..10 (no tinit / tfinal):

        >>> [budget_schedule(step, 24, 16, 0, 0, 10, 1)[0] for step in range(0, 11)]
        [24, 21, 20, 18, 17, 17, 16, 16, 16, 16, 16]
    """
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)  # 1 -> 0 over the pruning phase
    budget = int((init_budget - target_budget) * (remaining ** 3) + target_budget)
    return budget, step % delta_t == 0


class RankAllocator:
    """Importance scores of a model's AdaLoRA triplets and the masks they give (PEFT's `RankAllocator`).

    Args:
        model: a model after `apply_adalora(model, config)`.
        config: the same AdaLoRAConfig.

    Attributes:
        init_budget: the ranks of all layers at the start (init_r x layers); target_budget: target_r x layers.
        rank_pattern: {layer name: [keep?] * init_r} after the first pruning, None before (every rank kept).

    Use:
        loss = model(x, y)[1] + config.orth_reg_weight * orthogonal_regularization(model)
        loss.backward(); optimizer.step()
        allocator.update_and_allocate(step)          # step = 1, 2, ..., total_step; before zero_grad
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig):
        self.config = config
        self.layers = list(adalora_layers(model))
        if not self.layers:
            raise ValueError("the model has no AdaLoRA layers; call apply_adalora(model, config) first")
        self.init_budget = sum(layer.init_r for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.rank_pattern: Optional[Dict[str, List[bool]]] = None
        self.reset_importance()

    def reset_importance(self) -> None:
        """Forget the EMAs (PEFT does so once the final ranks are fixed)."""
        self.sensitivity_ema: Dict[Tuple[str, str], torch.Tensor] = {}  # I_bar per (layer, "A" / "E" / "B")
        self.uncertainty_ema: Dict[Tuple[str, str], torch.Tensor] = {}  # U_bar, same keys

    def _parameters(self):
        for name, layer in self.layers:
            yield (name, "A"), layer.lora_A
            yield (name, "E"), layer.lora_E
            yield (name, "B"), layer.lora_B

    @torch.no_grad()
    def update_importance(self) -> None:
        """Eqs. 6, 8, 9: fold this step's sensitivity |w · grad| into the two EMAs of every entry."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, parameter in self._parameters():
            if parameter.grad is None:
                raise RuntimeError(f"{key[0]}.lora_{key[1]} has no gradient: call update_and_allocate after "
                                   f"loss.backward() and optimizer.step(), before optimizer.zero_grad()")
            sensitivity = (parameter * parameter.grad).abs()  # I = |w · dL/dw|, same shape as w
            smoothed = self.sensitivity_ema.get(key, torch.zeros_like(parameter))
            uncertainty = self.uncertainty_ema.get(key, torch.zeros_like(parameter))
            smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
            uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - smoothed).abs()
            self.sensitivity_ema[key], self.uncertainty_ema[key] = smoothed, uncertainty

    def triplet_scores(self) -> Dict[str, torch.Tensor]:
        """Eqs. 10 and 7: {layer name: S [init_r]}, S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)."""
        def score(name, which):  # s = I_bar · U_bar, per entry
            return self.sensitivity_ema[(name, which)] * self.uncertainty_ema[(name, which)]

        scores = {}
        for name, _ in self.layers:
            score_A = score(name, "A").mean(dim=1)  # [r, in] -> [r]: over the entries of each row
            score_B = score(name, "B").mean(dim=0)  # [out, r] -> [r]: over the entries of each column
            score_E = score(name, "E").view(-1)  # [r, 1] -> [r]
            scores[name] = score_E + (score_A + score_B)  # subtle: PEFT's order of additions, for the same bits
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> Dict[str, List[bool]]:
        """Zero E of the (init_budget - budget) lowest-scoring triplets of the whole model; the rank pattern.

        The cut is the k-th smallest score, k = init_budget - budget; every triplet scoring <= it goes (so
        ties at the cut can take a few more, as in PEFT).
        """
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget).values.item()
        self.rank_pattern = {}
        for name, layer in self.layers:
            keep = scores[name] > threshold  # [r]
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            self.rank_pattern[name] = keep.tolist()
        return self.rank_pattern

    @torch.no_grad()
    def _apply_rank_pattern(self) -> None:
        for name, layer in self.layers:
            keep = torch.tensor(self.rank_pattern[name], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> Optional[Dict[str, List[bool]]]:
        """One step of AdaLoRA's allocation (step = 1, 2, ...); the new rank pattern when it pruned, else None.

        Before total_step - tfinal: update the scores, and prune to the scheduled budget when it is time.
        At total_step - tfinal: prune to the final budget (no score update) and forget the scores.
        After it: keep the final pattern (re-zero what the optimizer moved).
        """
        final_step = self.config.total_step - self.config.tfinal
        if step < final_step:
            self.update_importance()
            budget, prune_now = budget_schedule(step, self.init_budget, self.target_budget, self.config.tinit,
                                                self.config.tfinal, self.config.total_step, self.config.delta_t)
            return self.mask_to_budget(budget) if prune_now else None
        if step == final_step:
            pattern = self.mask_to_budget(self.target_budget)
            self.reset_importance()
            return pattern
        if self.rank_pattern is not None:
            self._apply_rank_pattern()
        return None

    def ranks(self) -> Dict[str, int]:
        """{layer name: ranks kept} by the latest pattern (init_r everywhere before the first pruning)."""
        if self.rank_pattern is None:
            return {name: layer.init_r for name, layer in self.layers}
        return {name: sum(keep) for name, keep in self.rank_pattern.items()}
