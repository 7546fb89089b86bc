"""Mixed-batch inference: a different adapter for each row of one batch, as PEFT's `adapter_names`.

Serving many adapters from one base model: the requests of several users, each with their own
adapter, go through the frozen base together, and each row gets only its own adapter's update:

    x (B, ...)  rows 0 1 2 3, adapter_names = ["french", "__base__", "german", "french"]

    result = W x + b                                        the whole batch, one matmul
    rows [0, 3]  += s_french · B_french A_french x[[0, 3]]   each adapter's update computed once,
    rows [2]     += s_german · B_german A_german x[[2]]      on its rows only
    rows [1]     (nothing: "__base__" is the base model alone)

So every row equals what the model gives that row with `set_adapter(name)` (or, for "__base__",
inside `disable_adapters`), but the base's matmuls are shared by all rows. The formula and the PEFT
0.21 functions it follows (`lora.Linear._mixed_batch_forward`, `LoraModel._enable_peft_forward_hooks`):
docs/reference.md#mixed-batch-inference.

Usage (eval mode, adapters not merged, no DoRA; the same refusals as PEFT):

    >>> with mixed_batch(model, ["french", "__base__", "german", "french"]):   # doctest: +SKIP
    ...     logits, _ = model(idx)                                             # idx (4, T)
    >>> logits, _ = forward_mixed(model, ["french", "__base__", "german", "french"], idx)   # doctest: +SKIP

The batch is the first dimension of every LoRA layer's input, as in PEFT: MiniGPT's layers see
(B, T, C) and (B, T) token ids, so `model(idx)` works unchanged. A model that reshapes its batch away
before a LoRA layer (e.g. flattening to (B*T, C)) cannot be served this way.
"""

import contextlib
import functools
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

BASE_MODEL = "__base__"  # the name for "no adapter" on a row, as in PEFT


@functools.lru_cache(maxsize=16)
def _row_groups(adapter_names: Tuple[str, ...], device: torch.device) -> Dict[str, torch.Tensor]:
    """{adapter name: the row indices that use it}, in the order the names first appear.

        >>> _row_groups(("a", "__base__", "b", "a"), torch.device("cpu"))
        {'a': tensor([0, 3]), '__base__': tensor([1]), 'b': tensor([2])}

    subtle: cached, because every LoRA layer asks for the same groups in one forward; on a GPU, building
    them anew would copy the indices from the host once per layer and stall the queue each time.
    (Made outside inference mode, so that a later forward with autograd can still use them.)
    """
    rows: Dict[str, List[int]] = {}
    for row, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(row)
    with torch.inference_mode(False):
        return {name: torch.tensor(indices, dtype=torch.long, device=device) for name, indices in rows.items()}


def _check_layer_call(layer: nn.Module, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    """The per-layer checks PEFT's `_check_forward_args` makes (and training mode, checked per call here)."""
    if len(x) != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but this layer's input has {len(x)} rows "
                         f"(shape {tuple(x.shape)}); give one adapter name per row of the batch (its first "
                         f"dimension), '{BASE_MODEL}' for a row that runs the base model alone")
    if layer.training:
        raise RuntimeError("mixed-batch inference runs in eval mode only (as PEFT); call model.eval() first")
    if layer.merged_adapters:
        raise RuntimeError(f"adapters {layer.merged_adapters} are merged into the weight, so every row would get "
                           f"them; call unmerge(model) before mixed-batch inference")


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
    """One LoRA layer (LoRALinear or LoRAEmbedding) with adapter `adapter_names[i]` on row i of x.

    Args:
        layer: the LoRA layer; its base runs on the whole batch, each adapter on its own rows.
        x: the layer's input, the batch first: (B, ..., in) for a linear layer, (B, ...) ids for an embedding.
        adapter_names: B names; "__base__" (or an adapter this layer does not hold) leaves the row as the base.

    Returns:
        (B, ..., out), row i equal to what `layer` gives row i with only `adapter_names[i]` active.
    """
    _check_layer_call(layer, x, adapter_names)
    result = layer.base_layer(x)  # W x + b for every row   (B, ..., out)
    if layer.adapters_disabled:  # disable_adapters wins, as in PEFT
        return result
    is_embedding = isinstance(layer.base_layer, nn.Embedding)
    for adapter_name, rows in _row_groups(tuple(adapter_names), x.device).items():
        if adapter_name == BASE_MODEL or adapter_name not in layer.lora_A:
            continue
        lora_A, lora_B, scaling = layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name]
        sub_batch = x[rows]  # this adapter's rows   (b, ...)
        if is_embedding:  # the same two steps as LoRAEmbedding.forward
            lora_rows = layer._lookup(sub_batch, lora_A.t())  # Aᵀ [vocab, r] -> (b, ..., r)
            result[rows] = result[rows] + (lora_rows @ lora_B.t()) * scaling  # (b, ..., dim)
        else:  # the same two steps as LoRALinear.forward, so each row is bit for bit the same
            dropout = layer.lora_dropout[adapter_name]
            lora_out = F.linear(F.linear(dropout(sub_batch.to(lora_A.dtype)), lora_A), lora_B)  # (b, ..., out)
            _add_scaled_rows(result, rows, lora_out, scaling)  # result[rows] += s · B A x, these rows only
    return result


def _add_scaled_rows(result: torch.Tensor, rows: torch.Tensor, lora_out: torch.Tensor, scaling: float) -> None:
    """result[rows] += s · lora_out in place, in result's dtype: one `index_add_`, the same arithmetic as
    `lora.layer._add_scaled` (`torch.add(..., alpha=s)`) on those rows, without gathering them first."""
    if lora_out.dtype == result.dtype:
        result.index_add_(0, rows, lora_out, alpha=scaling)
    else:  # adapters cast to another dtype than the base's output
        result.index_add_(0, rows, (lora_out * scaling).to(result.dtype))


def mixed_batch_saved_module(wrapper: nn.Module, x: torch.Tensor, *args, adapter_names: Sequence[str],
                             **kwargs) -> torch.Tensor:
    """A modules_to_save module: each row through its adapter's own copy (the original for "__base__" or an
    adapter without a copy), as PEFT's `AuxiliaryTrainingWrapper._mixed_batch_forward`."""
    if len(x) != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but this module's input has {len(x)} rows; "
                         f"give one adapter name per row of the batch")
    if wrapper.adapters_disabled:
        return wrapper.original_module(x, *args, **kwargs)
    result = None
    for adapter_name, rows in _row_groups(tuple(adapter_names), x.device).items():
        module = wrapper.modules_to_save[adapter_name] if adapter_name in wrapper.modules_to_save \
            else wrapper.original_module
        output = module(x[rows], *args, **kwargs)  # (b, ...)
        if result is None:
            result = output.new_empty((len(x),) + tuple(output.shape[1:]))
        result[rows] = output
    return result


# ----- on a whole model --------------------------------------------------------------------------------------
def _mixed_layers(model: nn.Module) -> List[nn.Module]:
    """The modules that read the per-row names: every LoRA layer and modules_to_save wrapper (the classes
    that declare `mixed_adapter_names`: LoRALayerBase and ModulesToSaveWrapper)."""
    return [module for module in model.modules() if hasattr(type(module), "mixed_adapter_names")]


def check_mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """Raise unless `model` can run `adapter_names` row by row: PEFT's checks, with what to do instead."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) \
            or not all(isinstance(name, str) for name in adapter_names) or not adapter_names:
        raise TypeError(f"adapter_names must be a non-empty list of adapter names, one per row of the batch "
                        f"(e.g. ['french', '{BASE_MODEL}', 'german']), got {adapter_names!r}")
    layers = _mixed_layers(model)
    if not any(hasattr(layer, "lora_A") for layer in layers):
        raise ValueError("the model has no LoRA layers; apply_lora / add_adapter first")
    if model.training:
        raise RuntimeError("mixed-batch inference runs in eval mode only (as PEFT: 'Cannot pass `adapter_names` "
                           "when the model is in training mode'); call model.eval() first")
    known = set()
    for layer in layers:
        known |= set(layer.adapter_names)
    unknown = sorted({name for name in adapter_names if name != BASE_MODEL} - known)
    if unknown:
        raise ValueError(f"adapter(s) {unknown} do not exist; the model's adapters are {sorted(known)}, and "
                         f"'{BASE_MODEL}' runs a row on the base model alone")
    merged = sorted({name for layer in layers for name in getattr(layer, "merged_adapters", [])})
    if merged:
        raise RuntimeError(f"adapters {merged} are merged into the base weights, so every row would get them; "
                           f"call unmerge(model) before mixed-batch inference (PEFT refuses this too)")
    dora = sorted({name for layer in layers if hasattr(layer, "use_dora")
                   for name in adapter_names if layer.use_dora.get(name, False)})
    if dora:
        raise ValueError(f"adapter(s) {dora} use DoRA, which mixed-batch inference does not support (as PEFT 0.21: "
                         f"its per-row weight norm would need one norm per adapter); run them with set_adapter")


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the `with` block, row i of every batch runs adapter `adapter_names[i]` ("__base__": none).

    Sets the names on every LoRA layer (and modules_to_save wrapper) and takes them off again on exit,
    even after an error. `model(...)` is called as usual; every batch in the block must have
    len(adapter_names) rows.

        >>> with mixed_batch(model, ["french", "__base__"]):     # doctest: +SKIP
        ...     logits, _ = model(idx)                           # idx (2, T): row 0 French, row 1 the base
    """
    check_mixed_batch(model, adapter_names)
    layers = _mixed_layers(model)
    names = list(adapter_names)
    for layer in layers:
        layer.mixed_adapter_names = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.mixed_adapter_names = None


def forward_mixed(model: nn.Module, adapter_names: Sequence[str], *args, **kwargs):
    """`model(*args, **kwargs)` with adapter `adapter_names[i]` on row i: `mixed_batch` for one call.

        >>> logits, _ = forward_mixed(model, ["french", "__base__"], idx)   # doctest: +SKIP
    """
    with mixed_batch(model, adapter_names):
        return model(*args, **kwargs)
