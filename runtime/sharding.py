"""Sharded training under torchrun: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), one block per unit.

    torchrun --standalone --nproc_per_node=2 finetune.py --device cpu --sharding fsdp   # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=8 finetune.py --device cuda --sharding fsdp  # 8 GPUs (nccl)

DDP (runtime/distributed.py) keeps a whole copy of the model in every process. Fully Sharded Data
Parallel (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel"; here its
second version, FSDP2, built on DTensor) keeps only 1/N of every parameter in each of the N processes,
and gathers a block's full weights just before that block runs:

    rank r holds rows [r*ceil(d0/N), (r+1)*ceil(d0/N)) of every parameter (dim 0), frozen or not
        forward, block i:   all-gather block i's shards ─► full weights ─► compute ─► free them again
        backward, block i:  all-gather again ─► gradients ─► reduce-scatter: each rank keeps the mean
                            gradient of its own rows (only for parameters that train: A, B, new rows)
        optimizer:          each rank steps its own rows (AdamW state for 1/N of the adapters)

So the frozen base, float or 4-bit, costs parameters x bytes / N per process, and at most one or two
blocks are ever whole at once. Each `model.blocks[i]` is its own unit (`fully_shard(block)`), then the
root (embeddings, final norm, lm_head).

What this module adds around `fully_shard`, so that the scripts' code before and after training stays the
one-process code:

- `training_copy` shards a deep copy of the model and frees the original's tensors; when training ends it
  gathers the full weights (`DTensor.full_tensor()`) back into the original, on every rank. Saving,
  merging and evaluating then run on a plain model, as in one process, and the folders rank 0 writes are
  the same files. (Until the model is built straight into its shards, a rank still holds the whole model
  while it is built and after training: sharding saves memory during training, not around it.)
- The 4-bit base: quant/linear4bit.py keeps its packed codes and scales in buffers, and FSDP2 shards
  only parameters (buffers are moved to the device and stay whole on every rank). The training copy
  therefore holds every buffer of one dimension or more as a frozen Parameter (uint8 codes, float32
  scales), which FSDP2 shards and gathers like any weight; back in the original they are buffers again.
- The optimizer built before sharding is pointed at the sharded parameters (same groups, same settings).
- Gradient hooks on the original parameters do not follow a parameter into its shards. The one this
  project uses, `minigpt/vocab.py`'s "only the new rows train", marks the weight with `frozen_rows`; the
  sharded parameter gets a hook that zeroes its local rows below that index after the reduce-scatter
  (zeroing the mean of the ranks' gradients is the same as averaging zeroed ones).
"""

import contextlib
import copy
import math

import torch
import torch.distributed as dist

SHARDINGS = ("ddp", "fsdp")  # --sharding: whole copies (DDP, the default) or FSDP2 shards
FROZEN_ROWS_ATTRIBUTE = "frozen_rows"  # set by minigpt/vocab.py on tok_emb / lm_head: rows below it never train


def fsdp_available() -> bool:
    """True when this PyTorch has FSDP2 (`torch.distributed.fsdp.fully_shard`, PyTorch 2.6 and later)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """fully_shard every transformer block, then the root; returns `model`, sharded in place.

    Needs an initialised process group of N ranks. Every parameter becomes a DTensor with placement
    Shard(0) on a 1-D mesh of the N ranks; `model.blocks` (MiniGPT's nn.ModuleList) gives the units.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),))
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"--sharding fsdp shards a model block by block through its `blocks` list; "
                         f"{type(model).__name__} has none (use --sharding ddp)")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def buffers_to_frozen_parameters(model: torch.nn.Module) -> list[str]:
    """Turn every buffer with at least one dimension into a Parameter with requires_grad=False; their names.

    FSDP2 shards parameters only: this way the 4-bit codes and scales of Linear4bit are sharded too.
    Forward code reads them as attributes (`self.packed`), which works the same for either.
    """
    names = []
    for module_name, module in model.named_modules():
        for name, tensor in list(module._buffers.items()):
            if tensor is None or tensor.dim() == 0:
                continue  # subtle: a 0-dim tensor has no dim 0 to shard; it stays a (tiny) replicated buffer
            del module._buffers[name]
            module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
            names.append(f"{module_name}.{name}" if module_name else name)
    return names


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a sharded model, whole (a collective: call it on every rank, same order)."""
    from torch.distributed.tensor import DTensor

    gathered = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        value = tensor.detach()
        gathered[name] = value.full_tensor() if isinstance(value, DTensor) else value  # all-gather of the shards
    return gathered


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf].data = value
    else:
        module._buffers[leaf] = value


def zero_frozen_rows_hook(parameter: torch.nn.Parameter, frozen_rows: int) -> None:
    """After FSDP2's reduce-scatter, zero the gradient of this rank's rows whose global index < frozen_rows."""
    rows = parameter.size(0)  # the global row count (a DTensor reports the full shape)
    rows_per_rank = math.ceil(rows / dist.get_world_size())  # FSDP2 pads dim 0 to N equal chunks
    start = dist.get_rank() * rows_per_rank  # this rank's first global row

    def zero_old_rows(sharded: torch.nn.Parameter) -> None:
        if sharded.grad is None:
            return
        local = sharded.grad.to_local()  # (rows on this rank, C): a view of the sharded gradient
        local[:max(0, min(frozen_rows - start, local.size(0)))] = 0.0

    parameter.register_post_accumulate_grad_hook(zero_old_rows)


@contextlib.contextmanager
def training_copy(model: torch.nn.Module, device: str, optimizer: torch.optim.Optimizer | None = None):
    """Yield a sharded copy of `model` to train; afterwards the full trained weights are back in `model`.

    Args:
        model: the plain model (any device); its tensors are freed while the copy trains.
        device: this rank's device ("cpu" with gloo, "cuda:i" with nccl).
        optimizer: an optimizer over `model`'s parameters, not yet stepped; its groups are pointed at the
            copy's sharded parameters (same names). None: train_model builds one from the copy.

    On an error nothing is gathered (the run is failing on every rank) and `model` keeps no weights.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    frozen_rows = {name: getattr(p, FROZEN_ROWS_ATTRIBUTE) for name, p in model.named_parameters()
                   if hasattr(p, FROZEN_ROWS_ATTRIBUTE)}
    sharded = copy.deepcopy(model)
    buffers_to_frozen_parameters(sharded)
    shard_model(sharded, device)
    sharded_parameters = dict(sharded.named_parameters())
    for name, rows in frozen_rows.items():
        zero_frozen_rows_hook(sharded_parameters[name], rows)
    if optimizer is not None:
        for group in optimizer.param_groups:  # subtle: no step taken yet, so there is no state to move
            group["params"] = [sharded_parameters[names[id(p)]] for p in group["params"]]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        _set_tensor(model, name, tensor.new_empty(0))  # the whole copy is not kept while the shards train
    yield sharded
    for name, value in full_tensors(sharded).items():
        _set_tensor(model, name, value.to(device).clone())
    del sharded
