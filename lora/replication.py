"""Layer replication: a deeper model from the base's own blocks, frozen weights shared, one adapter per copy.

PEFT's `layer_replication` (after mergekit's pass-through merges). A layer map lists [start, end)
ranges of the base's blocks, stacked in order:

    base blocks        0 1 2 3 4
    layer_map          [[0, 4], [2, 5]]
    replicated blocks  0 1 2 3 2 3 4          7 blocks, new positions 0 .. 6
                       └─────┘ └───┘
                       [0, 4)  [2, 5)         positions 2 and 4 hold the very same weight tensors (base
                                              block 2), as do 3 and 5 (base block 3): nothing is copied

Each new block is a fresh module object (so `apply_lora` wraps it separately and gives it its own
adapter) whose parameters and buffers are the base block's tensor objects, shared by reference. The
memory of the deeper model is the base's plus the adapters. The formula: docs/reference.md#layer-replication.

Finding the blocks (PEFT 0.21's rule, `peft.tuners.tuners_utils.replicate_layers`, plus MiniGPT's name):
go down `.model` while there is one (then into `.bert` if there is one) and take the first of
`.layers` (Llama, Mistral, Qwen...), `.encoder.layer` (BERT), `.h` (Falcon, GPT-2), `.blocks` (MiniGPT)
that is an nn.ModuleList.

    >>> model = replicate_layers(model, [[0, 2], [1, 2]])     # doctest: +SKIP  (MiniGPT: 2 blocks -> 3)
    >>> model = lora.apply_lora(model, LoRAConfig(...))       # doctest: +SKIP  each block its own adapter
    # or in one step: lora.apply_lora(model, LoRAConfig(..., layer_replication=[[0, 2], [1, 2]]))

To load a saved adapter of such a model, replicate the fresh base with the same map first
(`replicate_layers(base, lora.load_lora_config(folder).layer_replication)`), then `load_adapter`.

Merging is refused on such a model (as in PEFT): folding one block's adapter into a shared weight
would change every block that shares it (`check_no_shared_bases`).
"""

import copy
import dataclasses
from typing import Callable, List, Sequence, Tuple

import torch.nn as nn

LAYER_LIST_PATHS = ("layers", "encoder.layer", "h", "blocks")  # PEFT's three, then MiniGPT's


def check_layer_map(layer_map, n_layers: int = None) -> List[Tuple[int, int]]:
    """The map as [(start, end)], checked: a non-empty list of [start, end) pairs of ints, 0 <= start < end
    (and end <= n_layers when given). Ranges may overlap and repeat: that is the point.

        >>> check_layer_map([[0, 4], [2, 5]], n_layers=5)
        [(0, 4), (2, 5)]
    """
    example = "e.g. [[0, 4], [2, 5]] stacks blocks 0 1 2 3 then 2 3 4"
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, (list, tuple)) or not layer_map:
        raise ValueError(f"layer_replication must be a non-empty list of [start, end) block ranges ({example}), "
                         f"got {layer_map!r}")
    pairs = []
    for pair in layer_map:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(value, int) and not isinstance(value, bool) for value in pair)):
            raise ValueError(f"each layer_replication entry is one [start, end) pair of block indices ({example}); "
                             f"got {pair!r} in {layer_map!r}")
        start, end = pair
        if not 0 <= start < end:
            raise ValueError(f"layer_replication range {list(pair)} is empty or negative: a range [start, end) "
                             f"takes blocks start .. end-1 and needs 0 <= start < end ({example})")
        if n_layers is not None and end > n_layers:
            raise ValueError(f"layer_replication range {list(pair)} goes past the model's {n_layers} blocks "
                             f"(indices 0 .. {n_layers - 1}; an end may be at most {n_layers})")
        pairs.append((start, end))
    return pairs


def find_layer_list(model: nn.Module) -> Tuple[nn.ModuleList, Callable[[nn.ModuleList], None], str]:
    """(the ModuleList of blocks, a function that puts a new list in its place, its path) by PEFT's rule."""
    owner, path = model, ""
    while isinstance(getattr(owner, "model", None), nn.Module):  # LlamaForCausalLM.model -> LlamaModel
        owner, path = owner.model, path + "model."
    if isinstance(getattr(owner, "bert", None), nn.Module):  # some BERT variants nest it under .bert
        owner, path = owner.bert, path + "bert."
    for layers_path in LAYER_LIST_PATHS:
        parent_path, _, attribute = layers_path.rpartition(".")
        parent = getattr(owner, parent_path, None) if parent_path else owner  # .encoder for "encoder.layer"
        if isinstance(getattr(parent, attribute, None), nn.ModuleList):
            return getattr(parent, attribute), lambda new_layers: setattr(parent, attribute, new_layers), \
                path + layers_path
    raise ValueError(f"could not find the list of blocks in {type(model).__name__}: layer replication looks "
                     f"below `.model` for an nn.ModuleList at {', '.join('.' + name for name in LAYER_LIST_PATHS)} "
                     f"(Llama, BERT, Falcon / GPT-2, MiniGPT)")


def shared_clone(module: nn.Module) -> nn.Module:
    """A new module object of the same structure whose parameters and buffers ARE the original's tensors.

    `copy.deepcopy` with a memo that maps every tensor to itself: the modules (and their plain
    attributes) are copied, the tensors are not. (PEFT's `clone_module` deep-copies everything and then
    re-registers the parameters; it copies the buffers, this shares them too.)
    """
    memo = {id(tensor): tensor for tensor in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def replicate_layers(model: nn.Module, layer_map: Sequence[Sequence[int]]) -> nn.Module:
    """Replace the model's blocks by the stack `layer_map` describes, weights shared; returns the model.

    Args:
        model: a model without LoRA layers yet (MiniGPT, a transformers Llama-style model, ...).
        layer_map: [[start, end), ...] ranges of the current blocks, stacked in order.

    Sets each block's `layer_idx` (transformers' attention uses it for its KV cache) to its new position,
    and the block count in the model's config (`num_hidden_layers`, or MiniGPT's `n_layers`).
    """
    if getattr(model, "lora_layer_replication", None) is not None:
        raise RuntimeError(f"the model's blocks are already replicated (layer map {model.lora_layer_replication}); "
                           f"replicate the original model once, with one map that describes the whole stack")
    if any(hasattr(type(module), "mixed_adapter_names") for module in model.modules()):  # a LoRA layer or saved module
        raise RuntimeError("replicate the blocks before adding adapters: a copied LoRA layer would share its "
                           "adapter with the block it copies (apply_lora does this first when the LoRAConfig has "
                           "layer_replication)")
    layers, put_back, _ = find_layer_list(model)
    pairs = check_layer_map(layer_map, len(layers))
    new_layers = []
    for start, end in pairs:
        for index in range(start, end):
            block = shared_clone(layers[index])
            for submodule in block.modules():
                if hasattr(submodule, "layer_idx"):  # as PEFT: transformers' attention indexes its cache by it
                    submodule.layer_idx = len(new_layers)
            new_layers.append(block)
    put_back(nn.ModuleList(new_layers))
    _set_layer_count(model, len(new_layers))
    model.lora_layer_replication = [list(pair) for pair in pairs]  # what was done, for add_adapter's check
    return model


def replicate_for_config(model: nn.Module, config) -> Callable[[], None]:
    """What `add_adapter` does with `config.layer_replication` (PEFT: `LoraModel._prepare_model`): replicate
    the blocks the first time, accept the same map again, refuse another one. Returns a function that
    undoes the replication (add_adapter calls it if a later check fails, so a failed call changes nothing).
    """
    done = getattr(model, "lora_layer_replication", None)
    if done is not None and config.init in ("pissa", "olora"):
        raise ValueError(f"init={config.init!r} rewrites each base weight with its residual, but the replicated "
                         f"blocks share their weights, so each copy would rewrite the same tensor; use "
                         f"init='kaiming' or 'gaussian'")
    if config.layer_replication is None:
        return lambda: None
    wanted = [list(pair) for pair in config.layer_replication]
    if done is not None:
        if wanted != done:
            raise ValueError(f"the model's blocks are already replicated with {done}; an adapter with "
                             f"layer_replication={wanted} needs the original model (or give the same map)")
        return lambda: None
    layers, put_back, _ = find_layer_list(model)
    old_config = getattr(model, "config", None)
    replicate_layers(model, wanted)

    def undo() -> None:
        put_back(layers)
        if dataclasses.is_dataclass(old_config):
            model.config = old_config
        elif hasattr(old_config, "num_hidden_layers"):
            old_config.num_hidden_layers = len(layers)
        del model.lora_layer_replication

    return undo


def _set_layer_count(model: nn.Module, n_layers: int) -> None:
    config = getattr(model, "config", None)
    if hasattr(config, "num_hidden_layers"):  # transformers (PEFT does the same)
        config.num_hidden_layers = n_layers
    elif dataclasses.is_dataclass(config) and hasattr(config, "n_layers"):  # MiniGPT's frozen GPTConfig
        model.config = dataclasses.replace(config, n_layers=n_layers)


def check_no_shared_bases(layers, action: str) -> None:
    """Raise if two of these (name, LoRA layer) share one base weight (a replicated model): `action` (a
    merge) would change both."""
    owners = {}
    for name, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if weight is None:  # a 4-bit base keeps its weight in buffers, and cannot be merged in place anyway
            continue
        if id(weight) in owners:
            raise RuntimeError(f"cannot {action}: {owners[id(weight)]!r} and {name!r} share one base weight (layer "
                               f"replication), so merging one block's adapter would change the other block too "
                               f"(PEFT refuses this as well). Run the model unmerged")
        owners[id(weight)] = name
