"""apply_lora and friends: put LoRA adapters into any nn.Module, and manage them afterwards.

    model ──apply_lora(config)──► the same model, targets wrapped in place:
        blocks.0.attn.q_proj: nn.Linear  ──►  LoRALinear(base_layer=nn.Linear, lora_A, lora_B)
        everything else frozen; config.modules_to_save: lm_head ──► ModulesToSaveWrapper(original, copy per adapter)

Target matching (`LoRAConfig.target_modules`), as in PEFT:
    ["q_proj", "attn.v_proj"]  a module matches if its name is one of these or ends with "." + one
    "blocks\\.0\\..*_proj"       a single string is a regex that must match the whole module name
    "all-linear"               every Linear (4-bit ones and GPT-2 Conv1D included) except the output layer:
                               the model's `get_output_embeddings()` where it has one, else modules named `lm_head`

Targets can be nn.Linear, 4-bit linear and GPT-2 Conv1D layers (LoRALinear), nn.Embedding
(LoRAEmbedding) and nn.Conv1d / Conv2d / Conv3d (LoRAConv, lora/conv.py).

The model keeps a little bookkeeping next to its modules: `model.lora_configs` ({adapter name:
LoRAConfig}) and `model.active_lora_adapters` (the adapters that run). Every function here works on
any model (nn.Sequential, a custom module, MiniGPT); nothing is MiniGPT-specific.
"""

import contextlib
import difflib
import re
import warnings
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from lora.config import LoRAConfig
from lora.conv import CONV_TYPES, LoRAConv, check_conv, check_conv_rank, conv_adapter_shapes, max_conv_rank
from lora.embedding import LoRAEmbedding
from lora.layer import LoRALayerBase, LoRALinear, is_4bit_linear, is_linear_like
from lora.base_layer import linear_features
from lora.modules_to_save import ModulesToSaveWrapper
from runtime.save_guard import guard_save_pretrained
from lora.replication import check_no_shared_bases, replicate_for_config

OUTPUT_LAYER_NAMES = ("lm_head",)  # "all-linear" leaves these out, as PEFT leaves out the output embedding


# ----- finding modules ---------------------------------------------------------------------------------
def _name_matches(module_name: str, pattern: str) -> bool:
    """A leaf name or dotted suffix: 'q_proj' matches 'blocks.0.attn.q_proj'."""
    return module_name == pattern or module_name.endswith("." + pattern)


def _pattern_regex(key: str) -> re.Pattern:
    r"""rank_pattern / alpha_pattern keys, by PEFT's rule (`get_pattern_key`): the key is a regex that must
    match the whole name or a whole dotted suffix of it. For "blocks.1.v_proj", the keys "v_proj",
    "1.v_proj", "v_.*", "blocks.1.v_proj" and r"\d\.v_proj" match; "proj" and "blocks.1" do not."""
    return re.compile(rf"(?:.*\.)?(?:{key})")


def _compile_patterns(pattern: Dict[str, float]) -> List[Tuple[str, re.Pattern, float]]:
    """[(key, compiled regex, value)] in dict order: compiled once per apply, not once per module and key."""
    return [(key, _pattern_regex(key), value) for key, value in pattern.items()]


def _candidate_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) for every module outside our wrappers (LoRA layers, ModulesToSaveWrapper); a
    wrapper stands for the module it wraps."""
    skip_prefixes: List[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip_prefixes):
            continue
        if isinstance(module, (LoRALayerBase, ModulesToSaveWrapper)):
            skip_prefixes.append(name + ".")
        yield name, module


def _is_target_type(module: nn.Module) -> bool:
    return isinstance(module, (LoRALayerBase, nn.Embedding) + CONV_TYPES) or is_linear_like(module)


def _output_layer_names(model: nn.Module) -> List[str]:
    """The output layer "all-linear" leaves out, as PEFT: the module `model.get_output_embeddings()`
    returns (a transformers model: lm_head, BERT's cls.predictions.decoder, ...), else every `lm_head`."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        return [name for name, module in model.named_modules() if module is output]
    return [name for name, _ in model.named_modules() if name.split(".")[-1] in OUTPUT_LAYER_NAMES]


def _is_linear_target(module: nn.Module) -> bool:
    return isinstance(module, LoRALinear) or is_linear_like(module)


def find_targets(model: nn.Module, config: LoRAConfig) -> List[str]:
    """Names of the modules `config.target_modules` selects, in model order.

    Raises ValueError if nothing matches (listing the Linear / Embedding modules the model has and the
    closest name), or if a name matches a module LoRA cannot wrap.
    """
    target = config.target_modules
    target_regex = re.compile(target) if isinstance(target, str) and target != "all-linear" else None  # once
    found = []
    output_layers = _output_layer_names(model) if target == "all-linear" else []
    for name, module in _candidate_modules(model):
        if not name:
            continue
        if target == "all-linear":
            selected = _is_linear_target(module) and name not in output_layers
        elif isinstance(target, str):
            selected = target_regex.fullmatch(name) is not None
        else:
            selected = any(_name_matches(name, pattern) for pattern in target)
        if not selected:
            continue
        if not _is_target_type(module):
            if isinstance(target, str):  # a regex may well match containers too; only leaves count
                continue
            raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA wraps nn.Linear, 4-bit "
                             f"linear, GPT-2 Conv1D, nn.Conv1d/2d/3d and nn.Embedding layers. Name the layers "
                             f"inside it instead")
        found.append(name)
    if not found:
        raise ValueError(_no_match_message(model, target))
    return found


def _no_match_message(model: nn.Module, target) -> str:
    layers = [name for name, module in _candidate_modules(model) if name and _is_target_type(module)]
    leaf_names = sorted({name.split(".")[-1] for name in layers})
    message = (f"target_modules={target!r} matched no module of {type(model).__name__}. "
               f"Its Linear/Embedding modules are: {layers[:40]}{' ...' if len(layers) > 40 else ''}")
    wanted = [target] if isinstance(target, str) else list(target)
    suggestions = []
    for pattern in wanted:
        close = difflib.get_close_matches(pattern.split(".")[-1], leaf_names + layers, n=1, cutoff=0.5)
        if close and close[0] != pattern:  # the same name: the string form below is the mistake
            suggestions.append(f"{pattern!r} -> {close[0]!r}")
    if suggestions:
        message += f". Did you mean: {', '.join(suggestions)}?"
    if isinstance(target, str) and target in leaf_names:
        # subtle: as in PEFT, a string is a regular expression that must match the WHOLE module path
        message += (f" A string is a regular expression matched against the whole module path, so {target!r} "
                    f"matches only a top-level module of that name; write [{target!r}] (a list matches by "
                    f"name at any depth) or {'.*' + target!r}")
    return message


def _pattern_value(module_name: str, compiled: List[Tuple[str, re.Pattern, float]], default):
    """The value of the first key (in dict order, as PEFT) that matches `module_name`, else `default`.

    `compiled` is `_compile_patterns(config.rank_pattern)` (or alpha_pattern)."""
    for _, regex, value in compiled:
        if regex.fullmatch(module_name) is not None:
            return value
    return default


def _warn_unmatched_patterns(config: LoRAConfig, targets: Sequence[str]) -> None:
    """Warn about rank_pattern / alpha_pattern keys that match no target.

    A warning, not an error, as in PEFT 0.21 (which warns and ignores them): a config is often shared by
    models whose layers differ (a key for a layer one of them lacks is harmless there), and an error
    would make such a config unusable on the smaller model.
    """
    for what in ("rank_pattern", "alpha_pattern"):
        unmatched = sorted(key for key, regex, _ in _compile_patterns(getattr(config, what))
                           if not any(regex.fullmatch(name) for name in targets))
        if unmatched:
            warnings.warn(f"The following {what} keys did not match any targeted module and were ignored: "
                          f"{unmatched}. Targets: {list(targets)[:20]}", RuntimeWarning, stacklevel=3)


def _set_submodule(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


def lora_layers(model: nn.Module) -> Iterator[Tuple[str, LoRALayerBase]]:
    """(name, layer) for every LoRA wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayerBase):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[Tuple[str, ModulesToSaveWrapper]]:
    """(name, wrapper) for every module trained fully next to the adapters (modules_to_save)."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def _modules_to_save(model: nn.Module, config: LoRAConfig, targets: Sequence[str] = ()) -> List[str]:
    """Names of the modules `config.modules_to_save` selects (leaf names or dotted suffixes), checked:
    each pattern matches something, and none of them is, holds or lies inside a LoRA layer or target."""
    names = [name for name, _ in _candidate_modules(model) if name
             and any(_name_matches(name, pattern) for pattern in config.modules_to_save)]
    missing = [pattern for pattern in config.modules_to_save
               if not any(_name_matches(name, pattern) for name in names)]
    if missing:
        all_names = [name for name, _ in model.named_modules() if name]
        raise ValueError(f"modules_to_save {missing} matched no module; the model has: {all_names[:40]}")
    lora_paths = list(targets) + [path for path, _ in lora_layers(model)]
    saved_paths = [path for path, _ in saved_modules(model)] + names
    for name in names:
        clashes = ([path for path in lora_paths if path == name or path.startswith(name + ".")]
                   + [path for path in saved_paths if path.startswith(name + ".")])
        if clashes:
            clash = clashes[0]
            raise ValueError(f"modules_to_save module {name!r} overlaps the LoRA layer or saved module {clash!r}; "
                             f"a module is either trained fully (modules_to_save) or gets an adapter "
                             f"(target_modules), and saved modules cannot nest")
    return names


# ----- applying -------------------------------------------------------------------------------------------
def _lora_configs(model: nn.Module) -> Dict[str, LoRAConfig]:
    """The model's {adapter name: LoRAConfig}, created (empty) on first use: call it only when changing the model."""
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
        model.active_lora_adapters = []
    return model.lora_configs


def _existing_configs(model: nn.Module) -> Dict[str, LoRAConfig]:
    """The model's adapter configs for reading: {} for a model without LoRA, which is left as it is."""
    return getattr(model, "lora_configs", {})


def check_layer_can_take(name: str, module: nn.Module, adapter_name: str, rank: int, config: LoRAConfig) -> None:
    """Raise if `module` (a target, wrapped or not) cannot get adapter `adapter_name`: every check that the
    layer's own add_adapter makes, so that callers can run them on all layers before changing any."""
    conv = module.base_layer if isinstance(module, LoRAConv) else module
    if isinstance(conv, CONV_TYPES):
        check_conv(conv)
        size = (max_conv_rank(conv),)  # ΔW is [out, in · prod(kernel)]
        check_conv_rank(conv, rank, config.use_dora, repr(name))
    elif isinstance(module, nn.Embedding):
        size = (module.num_embeddings, module.embedding_dim)
    elif isinstance(module, LoRALayerBase):  # a LoRA wrapper getting one more adapter
        size = (module.in_features, module.out_features)
    else:  # nn.Linear, a 4-bit linear, a GPT-2 Conv1D
        size = linear_features(module)
    if rank > min(size):
        raise ValueError(f"r={rank} for {name!r} is larger than min(in, out) = {min(size)} of that layer "
                         f"{size}; use r <= {min(size)} (or a rank_pattern entry for it)")
    if isinstance(module, LoRALayerBase):
        if adapter_name in module.lora_A:
            raise ValueError(f"{name!r} already holds an adapter named {adapter_name!r}; pick another name")
        if module.merged_adapters:
            raise RuntimeError(f"{name!r} has adapters {module.merged_adapters} merged into its weight; "
                               f"unmerge(model) before adding adapter {adapter_name!r}")
    embedding = isinstance(module, (nn.Embedding, LoRAEmbedding))
    if embedding and config.use_dora:
        raise ValueError(f"DoRA is not supported on the embedding {name!r}; leave it out of target_modules")
    four_bit = is_4bit_linear(module) or (isinstance(module, LoRALinear) and module.is_4bit)
    if config.init in ("pissa", "olora") and (four_bit or embedding or isinstance(conv, CONV_TYPES)):
        kind = "4-bit layer" if four_bit else "embedding" if embedding else "convolution"
        raise ValueError(f"init={config.init!r} rewrites the base weight from its SVD / QR, which the {kind} "
                         f"{name!r} cannot take; use init='kaiming' or 'gaussian'")


def add_adapter(model: nn.Module, config: LoRAConfig, adapter_name: str) -> nn.Module:
    """Add adapter `adapter_name` to the modules `config` targets, without activating it.

    Every check (names, ranks against layer sizes, merged layers) runs on every target before the model
    is touched, so a call that fails leaves the model exactly as it was. `config.layer_replication`
    first replicates the blocks (lora/replication.py), undone again if a check fails.
    """
    undo_replication = replicate_for_config(model, config)
    try:
        return _add_adapter(model, config, adapter_name)
    except BaseException:
        undo_replication()
        raise


def _add_adapter(model: nn.Module, config: LoRAConfig, adapter_name: str) -> nn.Module:
    configs = _existing_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(configs)}); "
                         f"pick another name or delete_adapter it first")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    targets = find_targets(model, config)
    _warn_unmatched_patterns(config, targets)
    saved = _modules_to_save(model, config, targets)
    plans = []
    rank_pattern, alpha_pattern = _compile_patterns(config.rank_pattern), _compile_patterns(config.alpha_pattern)
    for name in targets:
        module = model.get_submodule(name)
        rank = _pattern_value(name, rank_pattern, config.r)
        alpha = _pattern_value(name, alpha_pattern, config.alpha)
        check_layer_can_take(name, module, adapter_name, rank, config)
        plans.append((name, module, rank, alpha))
    configs = _lora_configs(model)
    for name, module, rank, alpha in plans:
        options = dict(rank=rank, alpha=alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                       use_dora=config.use_dora, init=config.init)
        if isinstance(module, LoRALayerBase):
            module.add_adapter(adapter_name, **options)
        else:
            wrapper = _wrapper_class(module)(module, adapter_name=adapter_name, **options)
            wrapper.train(module.training)
            _set_submodule(model, name, wrapper)
        if config.autocast_adapter_dtype:
            _upcast_adapter(model.get_submodule(name), adapter_name)
        model.get_submodule(name).set_adapter(model.active_lora_adapters)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.train(module.training)
            _set_submodule(model, name, wrapper)
            module = wrapper
        module.add_adapter(adapter_name)  # a frozen copy of the original; set_adapter makes it train
        module.set_adapter(model.active_lora_adapters)
    configs[adapter_name] = config
    guard_save_pretrained(model)  # a transformers model's save_pretrained now refuses (runtime/save_guard.py)
    return model


def _upcast_adapter(layer: LoRALayerBase, adapter_name: str) -> None:
    """LoRAConfig.autocast_adapter_dtype: a float16 / bfloat16 adapter's A, B (and m) become float32, as
    PEFT's `cast_adapter_dtype` does after creating them. The forward then runs the branch in float32
    and adds it to the base output in float32, rounding once (`lora.layer._add_scaled`)."""
    for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
        if adapter_name in container and container[adapter_name].dtype in (torch.float16, torch.bfloat16):
            container[adapter_name] = nn.Parameter(container[adapter_name].detach().to(torch.float32))
    layer.clear_caches()


def _wrapper_class(module: nn.Module) -> type:
    """The LoRA wrapper for a target: LoRAEmbedding, LoRAConv, or LoRALinear (nn.Linear, 4-bit, Conv1D)."""
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    return LoRAConv if isinstance(module, CONV_TYPES) else LoRALinear


def adapter_shapes(module: nn.Module, rank: int, use_dora: bool) -> Dict[str, torch.Size]:
    """{"lora_A": shape, "lora_B": shape(, "lora_magnitude": shape)} an adapter of rank `rank` has on a
    target (wrapped or not): what an adapter file must hold for it (lora/io.py)."""
    base = module.base_layer if isinstance(module, LoRALayerBase) else module
    if isinstance(base, CONV_TYPES):
        return conv_adapter_shapes(base, rank, use_dora)
    if isinstance(base, nn.Embedding):
        size_in, size_out = base.num_embeddings, base.embedding_dim  # A [r, vocab], B [dim, r]
    else:  # nn.Linear, 4-bit linear, GPT-2 Conv1D
        size_in, size_out = linear_features(base)
    shapes = {"lora_A": torch.Size((rank, size_in)), "lora_B": torch.Size((size_out, rank))}
    if use_dora:
        shapes["lora_magnitude"] = torch.Size((size_out,))
    return shapes


def apply_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap `config.target_modules` with LoRA in place, freeze everything else, return the model.

    Args:
        model: any nn.Module.
        config: the LoRAConfig.
        adapter_name: name of this adapter ("default"); a model can hold several (see add_adapter).

    Returns:
        The same model object, with adapter `adapter_name` active and the only thing (with
        `config.modules_to_save`) left trainable.

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> model = apply_lora(model, LoRAConfig(r=4, target_modules=["0", "2"]))
        >>> print_trainable_parameters(model)
        trainable params: 336 || all params: 1,012 || trainable%: 33.2016
    """
    add_adapter(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_names: Union[str, Sequence[str]]) -> None:
    """Make these adapters the active ones (their updates add up); they alone train (plus modules_to_save).

    On a merged model it warns and unmerges first, as PEFT does (merge(model) again to fold in the new ones).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = _existing_configs(model)
    for name in names:
        if name not in configs:
            raise ValueError(f"adapter {name!r} does not exist; adapters: {list(configs)}")
    for path, wrapper in saved_modules(model):
        held = wrapper.adapters_among(names)
        if len(held) > 1:
            raise ValueError(f"adapters {held} each train their own copy of {path!r} (modules_to_save); only one "
                             f"of them can be active at a time, as in PEFT")
    merged = [name for name, layer in lora_layers(model) if layer.merged_adapters]
    if merged:
        # as PEFT 0.21 (`set_adapter` on a merged model): warn and unmerge, so that no adapter stays in W
        # unseen while other ones run
        warnings.warn(f"Adapter cannot be set when the model is merged ({merged[:3]}"
                      f"{' ...' if len(merged) > 3 else ''}). Unmerging the model first.", UserWarning, stacklevel=2)
        unmerge(model)
    model.active_lora_adapters = names
    for _, layer in lora_layers(model):
        layer.set_adapter(names)
    for _, wrapper in saved_modules(model):
        wrapper.set_adapter(names)
    mark_only_lora_as_trainable(model)


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the active adapters' parameters and their own copies of modules_to_save."""
    active = getattr(model, "active_lora_adapters", [])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, layer in lora_layers(model):
        for name in active:
            for container in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                if name in container:
                    container[name].requires_grad_(True)
    for _, wrapper in saved_modules(model):
        for name in wrapper.adapters_among(active):
            wrapper.modules_to_save[name].requires_grad_(True)  # the adapter's copy; the original stays frozen


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the `with` block; adapters come back afterwards.

        >>> with disable_adapters(model):
        ...     base_logits = model(idx)
    """
    layers = [layer for _, layer in lora_layers(model)] + [wrapper for _, wrapper in saved_modules(model)]
    merged = [name for name, layer in lora_layers(model) if layer.merged_adapters]
    if merged:
        raise RuntimeError(f"adapters are merged into {merged[:3]}...; call unmerge(model) before disabling them")
    previous = [layer.adapters_disabled for layer in layers]  # a saved module runs its original meanwhile
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_disabled = state


def set_adapter_scale(model: nn.Module, adapter_name: str, factor: float) -> None:
    """Multiply adapter `adapter_name`'s update by `factor` everywhere (1.0 restores it)."""
    if adapter_name not in _existing_configs(model):
        raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(model.lora_configs)}")
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            layer.set_scale(adapter_name, factor)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter `adapter_name` from every layer (it must not be merged)."""
    configs = _existing_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(configs)}")
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.lora_A]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge(model) before deleting it")
    for layer in layers:
        layer.delete_adapter(adapter_name)
    for path, wrapper in list(saved_modules(model)):
        if adapter_name in wrapper.modules_to_save:
            wrapper.delete_adapter(adapter_name)
            if not wrapper.modules_to_save:  # no adapter trains this module any more: the original is back
                _set_submodule(model, path, wrapper.original_module)
    del configs[adapter_name]
    model.active_lora_adapters = [name for name in model.active_lora_adapters if name != adapter_name]


# ----- merging and unloading -------------------------------------------------------------------------------
def _tied_targets(model: nn.Module) -> Dict[str, List[str]]:
    """{LoRA layer: [other modules holding its base weight]} for the layers about to merge whose weight
    is shared (tied): e.g. an output layer tied to the token embedding (`tie_word_embeddings`)."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name)
    tied = {}
    for name, layer in lora_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        if weight is None or not layer._unmerged_active(None):
            continue
        others = [owner for owner in owners.get(id(weight), []) if owner != name + ".base_layer"]
        if others:
            tied[name] = others
    return tied


def _warn_tied_targets(model: nn.Module) -> None:
    """Warn, as PEFT does when merging, that a merge into a tied weight changes every module sharing it.

    PEFT 0.21 (`BaseTuner._check_merge_allowed`) warns when the config has `tie_word_embeddings` and a
    target is named `embed_tokens` or `lm_head`; here the condition is the tie itself: the same weight
    Parameter held by another module."""
    tied = _tied_targets(model)
    if tied:
        pairs = ", ".join(f"{name!r} (shared with {others})" for name, others in tied.items())
        warnings.warn(f"The adapter targets tied weights: {pairs}. This can lead to complications: merging "
                      f"writes the update into the shared weight, so every module holding it changes, not "
                      f"only the adapted one (an input embedding tied to the output layer then looks up "
                      f"adapted rows too). You can opt to merge the adapter after cloning the weight (to "
                      f"untie it), or keep the adapter unmerged.", UserWarning, stacklevel=3)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights in place (repeat-safe: merged ones are skipped).

    Refused on 4-bit bases (see merge_and_unload). The model then runs at the base model's speed.
    Warns when a merged weight is tied to another module (`_warn_tied_targets`), as PEFT does.
    """
    layers = [layer for _, layer in lora_layers(model)]
    check_no_shared_bases(lora_layers(model), "merge")  # replicated blocks (lora/replication.py)
    for name, layer in lora_layers(model):
        if isinstance(layer, LoRALinear) and layer.is_4bit and layer._unmerged_active(None):
            layer._refuse_4bit(f"merge {name!r}")  # checked for all layers before any is touched
    _warn_tied_targets(model)
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters out of the base weights again (repeat-safe: a no-op if none is merged)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def _replace_wrappers(model: nn.Module, merge_first: bool, requantize: bool) -> nn.Module:
    for name, layer in list(lora_layers(model)):
        _set_submodule(model, name, layer.unloaded_base(merge_first, requantize))
    for name, wrapper in list(saved_modules(model)):
        # merge_and_unload keeps what ran: the active adapter's copy (the original if none is active), as
        # PEFT's ModulesToSaveWrapper does. unload gives the original back. subtle: PEFT 0.21's unload()
        # keeps the active copy too; here unload means "the base model again", which is what unload
        # promises for the LoRA layers, so the trained copy goes with the adapters.
        kept = wrapper.modules_to_save[wrapper.active_adapter] if merge_first and wrapper.active_adapter else None
        _set_submodule(model, name, kept if kept is not None else wrapper.original_module)
    for attribute in ("lora_configs", "active_lora_adapters"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Merge the active adapters and replace every wrapper by a plain layer; no adapter parameters remain.

    A modules_to_save module becomes the active adapter's trained copy, as in PEFT.
    Warns when a merged weight is tied to another module (`_warn_tied_targets`), as PEFT does.

    An nn.Linear base keeps its dtype. A 4-bit base becomes a full-precision nn.Linear holding
    dequantize(W) + update, computed in float32 and stored in the dtype the weight had before it was
    quantized (its `weight_dtype`, float32 if it has none; not the compute dtype: a bf16-compute base
    quantized from float32 merges back to float32), or, with requantize=True, a 4-bit layer of the same
    type holding the merged weight re-quantized (lossy).

    So that a QLoRA model comes back as one full-precision model, the 4-bit layers that had no adapter
    are dequantized too (`quant.dequantize_model`: bit for bit what they computed when their compute_dtype
    is None; with a bf16 compute dtype the full-precision matmul differs by bf16 rounding); with requantize=True
    every 4-bit layer stays 4-bit. (PEFT differs: its merge into a bitsandbytes 4-bit base always
    re-quantizes, so the whole model stays 4-bit.)

    This is the route to a transformers checkpoint: `lora.merge_and_unload(model).save_pretrained(folder)`
    (before it, the model's save_pretrained refuses: runtime/save_guard.py).
    """
    _warn_tied_targets(model)
    check_no_shared_bases(lora_layers(model), "merge_and_unload")  # replicated blocks (lora/replication.py)
    _replace_wrappers(model, merge_first=True, requantize=requantize)
    if not requantize and any(is_4bit_linear(module) for module in model.modules()):
        from quant import dequantize_model  # only a model that has 4-bit layers needs quant/
        dequantize_model(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter and give back the base layers (merged adapters are unmerged first).

    modules_to_save modules get their original (untrained) module back; the adapters' copies are dropped
    (PEFT 0.21 differs: its unload keeps the active adapter's copy). After PiSSA / OLoRA the base layers
    hold the residual weight, not the original one.
    """
    unmerge(model)
    return _replace_wrappers(model, merge_first=False, requantize=False)


# ----- reporting ------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's `get_nb_trainable_parameters` counts them.

    A 4-bit layer stores its weight in buffers, not parameters; it counts as in_features * out_features
    (subtle: PEFT counts a bitsandbytes Params4bit as numel * 2 of its packed uint8 storage, which is
    the same in * out).
    """
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    for module in model.modules():
        if is_4bit_linear(module):
            total += module.in_features * module.out_features
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: `trainable params: 1,536 || all params: 10,026 || trainable%: 15.3202`."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
