"""Fine-tuning methods side by side: what each one trains, and what it costs.

Every method starts from the same expanded base model (new vocabulary rows included, see vocab.py),
trains with the same loop (`minigpt.training.train_model`), the same data, steps and seed. They
differ only in which parameters train:

    method        trains                                                 stores
    full          every parameter                                        the whole model
    layer_frozen  the last block, ln_f, tok_emb and lm_head (all rows)    the whole model
    lora          LoRA A, B on the targets (Hu et al., 2021) + new rows   adapter + new rows
    dora          LoRA + a magnitude per output row (Liu et al., 2024)    adapter + new rows
    qlora         LoRA on an NF4 4-bit frozen base (Dettmers et al., 2023) adapter + new rows
    adalora       SVD-form LoRA whose ranks are pruned to a budget           the merged model
                  while training (Zhang et al., 2023) + new rows

"new rows" are the tok_emb / lm_head rows of the words the base model did not know; they train in
every method (train_new_rows_only keeps the old rows bit-identical in the adapter methods). The adapter
methods save an adapter folder (minigpt/adapter_folder.py), the others a whole checkpoint.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import lora
from lora.adalora import AdaLoRAConfig, apply_adalora, orthogonal_regularization
from lora.rank_allocator import RankAllocator
from minigpt.model import MiniGPT
from minigpt.predict import batched_probe_accuracy
from minigpt.training import TrainConfig, train_model
from minigpt.vocab import count_new_row_parameters, new_rows_param_group, train_new_rows_only
from quant import quantize_model
from quant.adamw8bit import AdamW8bit, PagedAdamW8bit
from runtime.distributed import SINGLE_PROCESS, DistributedContext

METHODS = ("full", "layer_frozen", "lora", "dora", "qlora", "adalora")
ADAPTER_METHODS = ("lora", "dora", "qlora")  # they save an adapter folder (adalora saves its merged model)
LOW_RANK_METHODS = ADAPTER_METHODS + ("adalora",)  # they train at --lr; full and layer_frozen at --full-lr


@dataclass
class MethodSetup:
    """A model ready to train with one method, and the optimizer groups that train it."""

    method: str
    model: MiniGPT  # the model to train (LoRA-wrapped and/or quantized for the adapter methods)
    param_groups: list  # for torch.optim.AdamW: only the trainable parameters
    trainable_params: int  # what actually changes (new rows only, for the adapter methods' embeddings)
    total_params: int  # every parameter of the model as it trains (a 4-bit weight counts in * out)
    extra_loss: Optional[Callable] = None  # added to the loss each step (adalora: its orthogonality term)
    rank_allocator: Optional[RankAllocator] = None  # adalora: prunes ranks after each step


@dataclass
class MethodResult:
    """What one method did: the numbers of the comparison table."""

    method: str
    trainable_params: int
    total_params: int
    val_loss: float  # new-domain validation loss at the end
    base_accuracy_after: float  # base-fact probe accuracy after fine-tuning (forgetting)
    domain_accuracy_after: float  # new-domain probe accuracy after fine-tuning
    weight_bytes: int  # parameters + buffers held while training (4-bit codes for QLoRA)
    training_bytes: int = 0  # weight_bytes + gradients + the optimizer's state (AdamW: two moments per weight)
    disk_bytes: int = 0  # the saved folder (adapter or whole model)
    wall_time_s: float = 0.0  # the training loop only
    layer_ranks: dict = field(default_factory=dict)  # adalora: {layer: ranks it ended with}; {} otherwise
    val_curve: list = field(default_factory=list)  # [(step, val_loss)]
    train_curve: list = field(default_factory=list)  # [(step, train_loss)]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer: the weight memory a model holds."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + one gradient + AdamW's exp_avg and exp_avg_sq per trainable tensor: what training holds
    besides activations. This is where LoRA saves memory: the frozen base needs no gradient or moments.

    Example:
        full fine-tuning of 130k float32 parameters: 4 x 130k x 4 bytes = 2.0 MB; LoRA on the same
        model: the 0.5 MB base + 3 x 4 bytes per adapter (and embedding) parameter.
    """
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                  for value in state.values() if torch.is_tensor(value) and value.dim() > 0)  # not "step"
    return weight_bytes(model) + gradients + moments


def folder_bytes(folder) -> int:
    """Total size of the files in a folder (what it costs on disk)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def setup_method(method: str, expanded_model: MiniGPT, base_vocab_size: int, lora_config: lora.LoRAConfig,
                 lr: float, full_lr: float, weight_decay: float = 0.1, lora_plus_ratio: float = 1.0,
                 seed: int = 0, embedding_lr: float | None = None,
                 adalora_config: AdaLoRAConfig | None = None) -> MethodSetup:
    """A deep copy of `expanded_model` prepared for `method` (the input is never changed).

    Args:
        method: one of METHODS.
        expanded_model: the base model with its new vocabulary rows (vocab.expand_vocabulary).
        base_vocab_size: rows below this index are the base vocabulary.
        lora_config: the adapter for lora / dora / qlora. "dora" always uses DoRA; "lora" and "qlora" use
            it when lora_config.use_dora is set (finetune.py --dora), as plain LoRA otherwise.
        lr: learning rate of the adapter methods (A, B, magnitude, new rows).
        full_lr: learning rate of full fine-tuning and layer freezing.
        weight_decay: AdamW decay of the 2-D weights in full / layer_frozen (adapters use 0, as PEFT).
        lora_plus_ratio: LoRA+: B (and DoRA's magnitude) learn lora_plus_ratio times faster; 1 is plain LoRA.
        seed: seeds the adapter initialisation (A ~ kaiming uniform).
        embedding_lr: None (the default): tok_emb / lm_head train like the rest of each method, at
            full_lr with weight_decay in full / layer_frozen, at lr without decay in the adapter
            methods. A number: they train at that lr without decay in every method (the adapter
            methods train only their new rows), so the new words learn alike everywhere.
        adalora_config: the AdaLoRA settings, needed by "adalora" only (its total_step is the run's steps).

    Returns:
        MethodSetup with the model and its optimizer groups.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model = copy.deepcopy(expanded_model)
    torch.manual_seed(seed)
    if method in ("full", "layer_frozen"):
        for parameter in model.parameters():
            parameter.requires_grad_(method == "full")
        if method == "layer_frozen":
            for module in (model.blocks[-1], model.ln_f, model.tok_emb, model.lm_head):
                module.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Why the default (embedding_lr None) gives the new rows full_lr here but lr in the adapter methods:
        # each method trains everything it trains at its own learning rate, and at full_lr the new words learn
        # slowly (the table's "domain" column). One rate for the new rows everywhere is not a fairer default
        # either: docs/measurements.md ("The new rows' learning rate") has both rates measured, and
        # finetune.py prints a note on it under its table.
        # subtle: AdamW groups hold whole tensors, so with embedding_lr the old rows share that treatment
        tables = {id(p) for p in (model.tok_emb.weight, model.lm_head.weight)} if embedding_lr else set()
        others = [p for p in trainable if id(p) not in tables]
        param_groups = [{"params": [p for p in others if p.dim() >= 2], "lr": full_lr, "weight_decay": weight_decay},
                        {"params": [p for p in others if p.dim() < 2], "lr": full_lr, "weight_decay": 0.0}]
        if embedding_lr:
            param_groups.append(new_rows_param_group(model, embedding_lr))
        total = sum(p.numel() for p in model.parameters())
        return MethodSetup(method, model, param_groups, sum(p.numel() for p in trainable), total)

    if method == "adalora":
        if adalora_config is None:
            raise ValueError("method 'adalora' needs adalora_config (an AdaLoRAConfig with the run's total_step)")
        apply_adalora(model, adalora_config)  # freezes everything, adds A, E, B (E = 0: the start is the base model)
        adapter = [p for p in model.parameters() if p.requires_grad]
        param_groups = [{"params": adapter, "lr": lr, "weight_decay": 0.0}]
        train_new_rows_only(model, base_vocab_size)
        param_groups.append(new_rows_param_group(model, embedding_lr or lr))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in adapter) + count_new_row_parameters(model, base_vocab_size)
        weight = adalora_config.orth_reg_weight
        return MethodSetup(method, model, param_groups, trainable, total,
                           extra_loss=lambda: weight * orthogonal_regularization(model),
                           rank_allocator=RankAllocator(model, adalora_config))

    if method == "qlora":
        quantize_model(model)  # every Linear but lm_head -> frozen NF4 (QLoRA section 3)
    # subtle: keep the caller's use_dora (finetune.py --dora); "dora" turns it on, it never turns it off
    config = dataclasses.replace(lora_config, use_dora=lora_config.use_dora or method == "dora")
    lora.apply_lora(model, config)  # freezes everything, adds A, B (B = 0: the start is the base model)
    # subtle: groups first, while only the adapter trains; then the new rows get their own group
    param_groups = lora.lora_plus_param_groups(model, lr=lr, ratio=lora_plus_ratio, weight_decay=0.0)
    adapter_params = sum(p.numel() for group in param_groups for p in group["params"])
    train_new_rows_only(model, base_vocab_size)
    param_groups.append(new_rows_param_group(model, embedding_lr or lr))
    _, total = lora.count_parameters(model)
    trainable = adapter_params + count_new_row_parameters(model, base_vocab_size)
    return MethodSetup(method, model, param_groups, trainable, total)


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")  # finetune.py --optim


def make_optimizer(param_groups: list, lr: float, optim: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95) over the non-empty groups, its moments in float32 or in 8 bits.

    "adamw8bit" / "paged_adamw8bit" (quant/adamw8bit.py, docs/reference.md#8-bit-adamw) store both moments
    of every tensor of 4096 elements or more in 8 bits (2 bytes per parameter instead of 8); smaller
    tensors, such as MiniGPT's rank-16 adapters, keep float32 moments, as in bitsandbytes.
    """
    groups = [group for group in param_groups if group["params"]]
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if optim in ("adamw8bit", "paged_adamw8bit"):
        return (AdamW8bit if optim == "adamw8bit" else PagedAdamW8bit)(groups, lr=lr, betas=(0.9, 0.95))
    raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")


def train_method(setup: MethodSetup, train_stream, val_stream, train_config: TrainConfig, tokenizer,
                 base_probes, domain_probes, distributed: DistributedContext = SINGLE_PROCESS,
                 optim: str = "adamw") -> MethodResult:
    """Train `setup.model` with the shared loop and measure it (val loss, probe accuracy, memory, time).

    Under torchrun (`distributed` from runtime.distributed.process_group) the model trains wrapped in
    DistributedDataParallel, which all-reduces only the trainable parameters (adapters, new rows); with
    --sharding fsdp it trains as FSDP2 shards (runtime/sharding.py) and is whole again afterwards.
    `optim` picks the optimizer (`make_optimizer`); its state counts in `training_bytes`.
    """
    optimizer = make_optimizer(setup.param_groups, train_config.lr, optim)
    allocator = setup.rank_allocator
    with distributed.training(setup.model, optimizer) as training_model:  # FSDP: shards, gathered back after
        result = train_model(training_model, train_stream, val_stream, train_config, optimizer=optimizer,
                             distributed=distributed, extra_loss=setup.extra_loss,
                             after_step=allocator.update_and_allocate if allocator else None)
    setup.model.cpu().eval()
    def accuracy(probes) -> float:  # NaN when there are no probes (a user's own --data has none)
        return batched_probe_accuracy(setup.model, tokenizer, probes) if probes else float("nan")

    return MethodResult(
        method=setup.method, trainable_params=setup.trainable_params, total_params=setup.total_params,
        val_loss=result.final_val_loss, base_accuracy_after=accuracy(base_probes),
        domain_accuracy_after=accuracy(domain_probes),
        weight_bytes=weight_bytes(setup.model), training_bytes=training_state_bytes(setup.model, optimizer),
        wall_time_s=result.wall_time_s, layer_ranks=allocator.ranks() if allocator else {},
        val_curve=result.val_curve, train_curve=result.train_curve)


def merged_copy(model: torch.nn.Module) -> MiniGPT:
    """A plain MiniGPT with the active adapter folded into the weights (W' = W + s B A); `model` is kept."""
    return lora.merge_and_unload(copy.deepcopy(model)).eval()


@torch.no_grad()
def max_logit_difference(model_a: torch.nn.Module, model_b: torch.nn.Module, stream, batch_size: int = 64) -> float:
    """Largest |logit_a - logit_b| over one sweep of `stream` (e.g. merged vs base + adapter)."""
    worst = 0.0
    for x, _ in stream.iter_windows(batch_size):
        logits_a, _ = model_a(x)  # (B, T, V)
        logits_b, _ = model_b(x)  # (B, T, V)
        worst = max(worst, float((logits_a - logits_b).abs().max()))
    return worst
