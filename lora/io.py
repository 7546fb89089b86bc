"""Adapter folders: save_adapter / load_adapter (and converters to and from PEFT state dicts).

    adapter_dir/
        lora_config.json   every LoRAConfig field + "format_version"
        lora_weights.pt    {"blocks.0.attn.q_proj.lora_A": [r, in], "...lora_B": [out, r],
                            "...lora_magnitude": [out] (DoRA), "lm_head.weight": ... (modules_to_save:
                            the adapter's copy, under the module's own names)}

lora_config.json may also hold "base_fingerprint": a SHA-256 of the base the adapter was trained on (see
`model_fingerprint`), given to save_adapter; load_adapter given the fingerprint of the base it loads onto
warns when the two differ (or raises, with strict_base=True). A folder without one is "unknown, not checked".

Only one adapter per folder, stored without its name, so it can be loaded under any name. PEFT names
the same tensors `base_model.model.<path>.lora_A.weight` (`lora_embedding_A` for embeddings,
`lora_magnitude_vector` for DoRA); `to_peft_state_dict` / `from_peft_state_dict` translate.

PEFT's own folder (adapter_config.json + adapter_model.safetensors, what `PeftModel.from_pretrained`
reads) is written by `save_adapter(..., format="peft")` and recognised by load_adapter from its files;
lora/peft_format.py maps the config fields and lists what is refused.

Loading is all or nothing: the config is validated, every tensor's name and shape is checked against
the model, and only then is the model touched. Files are written to a temporary folder first and moved
into place with renames (runtime/atomic.py), so a crash never leaves half an adapter on disk; an existing
folder is only replaced if it holds nothing but an earlier adapter's two files (and its hidden marker).
"""

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, List, Union

import torch
import torch.nn as nn

from lora.base_layer import is_fan_in_fan_out
from lora.config import LoRAConfig
from lora.model import (_compile_patterns, _existing_configs, _modules_to_save, _pattern_value, adapter_shapes,
                        add_adapter, find_targets, lora_layers, saved_modules, set_adapter)
from lora.modules_to_save import ModulesToSaveWrapper
from lora.peft_format import (PEFT_CONFIG_FILE, PEFT_FILES, PEFT_PICKLE_FILE, check_base_weights, read_peft_config,
                              read_peft_weights, write_peft_files)
from runtime.atomic import MARKER, atomic_directory  # the same atomic write as checkpoints
from runtime.files import read_json_file

FORMAT_VERSION = 1
CONFIG_FILE = "lora_config.json"
WEIGHTS_FILE = "lora_weights.pt"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # everything save_adapter writes into an adapter folder
FINGERPRINT_KEY = "base_fingerprint"  # optional in lora_config.json; older folders have none
PathLike = Union[str, os.PathLike]


def state_fingerprint(state: Dict[str, torch.Tensor], extra: bytes = b"") -> str:
    """A SHA-256 (64 hex digits) over every tensor's name, dtype, shape and bytes, in name order, then `extra`.

    Two bases with the same shapes but different weights get different fingerprints; saving and loading
    a model (or moving it between devices) keeps its fingerprint.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode() + b"\n")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    digest.update(extra)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """`state_fingerprint` of a model's state_dict: call it on the base BEFORE apply_lora.

    (PiSSA / OLoRA rewrite the base layers into a residual; the fingerprint of the base as you gave it is
    the one that matches when the adapter is later loaded onto that same original base.)

    Example:
        >>> base_fingerprint = model_fingerprint(model)          # doctest: +SKIP
        >>> apply_lora(model, config); ...train...               # doctest: +SKIP
        >>> save_adapter(model, "adapter", base_fingerprint=base_fingerprint)               # doctest: +SKIP
        >>> load_adapter(other, "adapter", base_fingerprint=model_fingerprint(other))       # doctest: +SKIP
        UserWarning: ... was trained on base 1f0c2e9a7b3d, but is being loaded onto base 9e8d...
    """
    return state_fingerprint(model.state_dict())


def check_base_fingerprint(recorded, given, where: str, strict: bool = False, strict_option: str = "strict_base") -> None:
    """Warn (or, with `strict`, raise ValueError) when an adapter's recorded base differs from the given one.

    Nothing happens when either is None: a folder saved without a fingerprint is "unknown, not checked".
    """
    if recorded is None or given is None or recorded == given:
        return
    message = (f"{where} was trained on base {recorded[:12]}, but is being loaded onto base {given[:12]} "
               f"(SHA-256 fingerprints of weights and tokenizer): shapes may fit, yet its outputs will be wrong. "
               f"Load it onto the base it was fine-tuned from")
    if strict:
        raise ValueError(message)
    warnings.warn(f"{message}, or pass {strict_option}=True to make this an error", UserWarning, stacklevel=3)


def _check_fingerprint_text(value, where: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(char in "0123456789abcdef" for char in value)):
        raise ValueError(f"{where}: {FINGERPRINT_KEY} must be 64 lower-case hex digits (a SHA-256), got {value!r:.80}")
    return value


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """The flat {"<module path>.lora_A": tensor, ...} dict of one adapter (plus modules_to_save)."""
    configs = _existing_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(configs)}")
    state = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        state[f"{path}.lora_A"] = layer.lora_A[adapter_name].detach().clone()
        state[f"{path}.lora_B"] = layer.lora_B[adapter_name].detach().clone()
        if adapter_name in layer.lora_magnitude:
            state[f"{path}.lora_magnitude"] = layer.lora_magnitude[adapter_name].detach().clone()
    for module_name, wrapper in saved_modules(model):
        if adapter_name not in wrapper.modules_to_save:
            continue
        # subtle: keyed by the module's own names ("lm_head.weight"), not the wrapper's
        # ("lm_head.modules_to_save.default.weight"), so files do not depend on the wrapper
        for name, parameter in wrapper.modules_to_save[adapter_name].named_parameters():
            state[f"{module_name}.{name}"] = parameter.detach().clone()
    return state


def _foreign_entries(adapter_dir: Path, files=ADAPTER_FILES) -> List[str]:
    """Names in `adapter_dir` that save_adapter did not write (anything but `files`, as plain files,
    and the hidden marker every output folder holds)."""
    return sorted(entry.name for entry in adapter_dir.iterdir()
                  if entry.name != MARKER and (entry.name not in files or not entry.is_file()
                                               or entry.is_symlink()))


def save_adapter(model: nn.Module, adapter_dir: PathLike, adapter_name: str = "default",
                 base_fingerprint: str = None, format: str = "minilora", task_type: str = None,
                 base_model_name_or_path: str = None) -> Path:
    """Write adapter `adapter_name` to `adapter_dir` (lora_config.json + lora_weights.pt); returns the path.

    `base_fingerprint` (optional, `model_fingerprint(model)` taken before apply_lora) is written into
    lora_config.json, so load_adapter can tell when the adapter is loaded onto another base.

    format="peft" writes PEFT's folder instead: adapter_config.json + adapter_model.safetensors, which
    `PeftModel.from_pretrained(base, adapter_dir)` loads (fields mapped as lora/peft_format.py lists;
    `task_type` such as "CAUSAL_LM" and `base_model_name_or_path` go into the config as PEFT writes them;
    a base fingerprint goes into the safetensors metadata, which PEFT ignores). This is also the way to
    save a transformers model's adapter: its save_pretrained refuses while the model holds LoRA layers.

    Merged adapters are saved as their A, B (the base is not changed by saving). The folder is written
    whole or not at all (runtime/atomic.py). An existing folder is replaced only if it holds nothing but
    these two files (an earlier save); a folder with anything else in it is refused with FileExistsError,
    so a save never deletes files it did not write.
    """
    if format not in ("minilora", "peft"):
        raise ValueError(f"save_adapter format must be 'minilora' ({list(ADAPTER_FILES)}) or 'peft' "
                         f"({list(PEFT_FILES)}), got {format!r}")
    files = PEFT_FILES if format == "peft" else ADAPTER_FILES
    state = adapter_state_dict(model, adapter_name)
    adapter_dir = Path(adapter_dir)
    if base_fingerprint is not None:
        _check_fingerprint_text(base_fingerprint, "save_adapter")  # a bad value fails before anything is written
    if adapter_dir.exists() or adapter_dir.is_symlink():
        if not adapter_dir.is_dir() or adapter_dir.is_symlink():
            raise FileExistsError(f"{adapter_dir} exists and is not a folder; save the adapter to a new folder")
        foreign = _foreign_entries(adapter_dir, files)
        if foreign:
            raise FileExistsError(f"{adapter_dir} holds {foreign}, which save_adapter did not write (an adapter "
                                  f"folder holds only {list(files)}); save to an empty or new folder, "
                                  f"or move those out first")
    with atomic_directory(adapter_dir, kind="adapter", legacy_files=files) as tmp:
        if format == "peft":
            config = _existing_configs(model)[adapter_name]
            embeddings = {path for path, layer in lora_layers(model)
                          if adapter_name in layer.lora_A and isinstance(layer.base_layer, nn.Embedding)}
            targets = [path for path, layer in lora_layers(model) if adapter_name in layer.lora_A]
            conv1d = any(is_fan_in_fan_out(layer.base_layer) for path, layer in lora_layers(model)
                         if adapter_name in layer.lora_A)  # GPT-2's Conv1D: PEFT's config says fan_in_fan_out
            write_peft_files(tmp, config, targets, to_peft_state_dict(state, embeddings), task_type,
                             base_model_name_or_path, base_fingerprint, fan_in_fan_out=conv1d)
        else:
            write_adapter_files(model, tmp, adapter_name, state, base_fingerprint)
    return adapter_dir


def write_adapter_files(model: nn.Module, folder: PathLike, adapter_name: str = "default", state=None,
                        base_fingerprint: str = None) -> None:
    """Write lora_config.json + lora_weights.pt into the existing `folder` (no swap: the caller's
    atomic_directory makes the folder appear whole, e.g. minigpt's adapter folders with more files)."""
    config = _existing_configs(model).get(adapter_name)
    state = adapter_state_dict(model, adapter_name) if state is None else state
    recorded = {} if base_fingerprint is None else {FINGERPRINT_KEY: _check_fingerprint_text(base_fingerprint,
                                                                                               "save_adapter")}
    with open(Path(folder) / CONFIG_FILE, "w") as file:
        json.dump({"format_version": FORMAT_VERSION, **config.to_dict(), **recorded}, file, indent=2)
    torch.save(state, Path(folder) / WEIGHTS_FILE)


def _read_config_fields(adapter_dir: PathLike):
    """(LoRAConfig fields, recorded base fingerprint or None) of lora_config.json, each problem a ValueError."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(written by save_adapter)")
    # bounded size and nesting: adapter folders are shared like any download (see runtime/files.py)
    fields = read_json_file(path, f"an adapter's {CONFIG_FILE}", max_bytes=2**20)
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    fingerprint = fields.pop(FINGERPRINT_KEY, None)
    if fingerprint is not None:
        _check_fingerprint_text(fingerprint, str(path))
    known = set(LoRAConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; LoRAConfig fields are {sorted(known)}")
    return fields, fingerprint


def load_lora_config(adapter_dir: PathLike) -> LoRAConfig:
    """Read and validate `adapter_dir/lora_config.json`."""
    fields, _ = _read_config_fields(adapter_dir)
    try:
        return LoRAConfig(**fields)  # the same checks, and messages, as a LoRAConfig built in code
    except ValueError as error:
        raise ValueError(f"{Path(adapter_dir) / CONFIG_FILE}: {error}") from None


def load_base_fingerprint(adapter_dir: PathLike):
    """The base fingerprint recorded in `adapter_dir/lora_config.json`, or None for a folder without one."""
    return _read_config_fields(adapter_dir)[1]


def _load_weights(adapter_dir: PathLike) -> Dict[str, torch.Tensor]:
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        # mmap: only headers are read here; check_adapter_fits compares shapes before any bytes are copied
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated zip, pickle with code in it, not a torch file at all...
        raise ValueError(f"{path} could not be read as a tensor file ({type(error).__name__}: {error}); "
                         f"the adapter file is corrupt, save it again") from error
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                              for key, value in state.items()):
        raise ValueError(f"{path} must hold a flat {{name: tensor}} dict")
    return state


def _expected_shapes(model: nn.Module, config: LoRAConfig) -> Dict[str, torch.Size]:
    """{key: shape} the adapter file must hold for this model and config."""
    expected = {}
    rank_pattern = _compile_patterns(config.rank_pattern)  # once, not once per module
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        rank = _pattern_value(path, rank_pattern, config.r)
        for kind, shape in adapter_shapes(module, rank, config.use_dora).items():  # lora_A, lora_B (, magnitude)
            expected[f"{path}.{kind}"] = shape
    for module_name in _modules_to_save(model, config):
        module = model.get_submodule(module_name)
        if isinstance(module, ModulesToSaveWrapper):  # already saved by another adapter: shapes of the original
            module = module.original_module
        for name, parameter in module.named_parameters():
            expected[f"{module_name}.{name}"] = parameter.shape
    return expected


def check_adapter_fits(model: nn.Module, config: LoRAConfig, state: Dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first key that is missing, unexpected, or of the wrong shape."""
    expected = _expected_shapes(model, config)
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"adapter weights are missing {key!r} (expected shape {list(shape)}); "
                             f"the file does not belong to this model or config")
        if state[key].shape != shape:
            hint = ""
            if key.endswith((".lora_A", ".lora_B")):
                hint = f" (r in lora_config.json is {config.r}; the tensor suggests a different rank)"
            raise ValueError(f"adapter tensor {key!r} has shape {list(state[key].shape)}, the model needs "
                             f"{list(shape)}{hint}")
        if not state[key].is_floating_point():
            raise ValueError(f"adapter tensor {key!r} has dtype {state[key].dtype}; expected floating point")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"adapter weights have unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                         f"the model's adapter keys look like {next(iter(expected))!r}")


def load_adapter(model: nn.Module, adapter_dir: PathLike, adapter_name: str = "default",
                 base_fingerprint: str = None, strict_base: bool = False) -> nn.Module:
    """Rebuild a saved adapter on `model` under `adapter_name`, make it the active one, return the model.

    A model without LoRA gets `apply_lora` with the saved config first; a model that already has other
    adapters gets this one added. Nothing is changed unless config and every tensor fit the model.
    (PiSSA / OLoRA: re-applying the config recomputes the same residual base from the original W, then
    the saved A and B are loaded; so load those onto the original base model.)

    `base_fingerprint`, when given (`model_fingerprint(model)` of the base, before any adapter), is compared
    with the one save_adapter recorded: a difference warns, or raises ValueError with `strict_base=True`.

    A PEFT folder (adapter_config.json + adapter_model.safetensors, from PEFT's save_pretrained or
    save_adapter(format="peft")) is read too; what it may not hold is listed in lora/peft_format.py.
    """
    folder = Path(adapter_dir)
    peft_folder = not (folder / CONFIG_FILE).is_file() and ((folder / PEFT_CONFIG_FILE).is_file()
                                                            or (folder / PEFT_PICKLE_FILE).is_file())
    base_weights = {}
    if peft_folder:  # PEFT's adapter_config.json + adapter_model.safetensors (lora/peft_format.py)
        if not (folder / PEFT_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder / PEFT_CONFIG_FILE} not found: a PEFT adapter folder holds "
                                    f"{list(PEFT_FILES)}")
        config = read_peft_config(folder)
        peft_state, base_weights, recorded = read_peft_weights(folder)
        if recorded is not None:
            _check_fingerprint_text(recorded, str(folder))
        state = _from_peft_folder_state(peft_state)
    else:
        config = load_lora_config(adapter_dir)
        recorded = load_base_fingerprint(adapter_dir)
    check_base_fingerprint(recorded, base_fingerprint, str(adapter_dir), strict_base)
    if not peft_folder:
        state = _load_weights(adapter_dir)
    configs = _existing_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists on the model (adapters: {list(configs)}); "
                         f"load it under another name or delete_adapter it first")
    check_base_weights(model, base_weights, str(adapter_dir))
    check_adapter_fits(model, config, state)
    add_adapter(model, config, adapter_name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if adapter_name not in layer.lora_A:
                continue
            for kind, container in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B),
                                    ("lora_magnitude", layer.lora_magnitude)):
                if adapter_name in container:
                    container[adapter_name].copy_(state[f"{path}.{kind}"])
            layer.clear_caches()
        for module_name, wrapper in saved_modules(model):
            if adapter_name in wrapper.modules_to_save:
                for name, parameter in wrapper.modules_to_save[adapter_name].named_parameters():
                    parameter.copy_(state[f"{module_name}.{name}"])
    set_adapter(model, adapter_name)
    return model


# ----- PEFT interop ---------------------------------------------------------------------------------------
def to_peft_state_dict(state: Dict[str, torch.Tensor], adapter_names=None) -> Dict[str, torch.Tensor]:
    """Our flat keys -> PEFT's `get_peft_model_state_dict` keys (adapter name left out, as PEFT saves).

    `adapter_names` optionally lists the paths that are embeddings ({path, ...}), whose PEFT names
    are lora_embedding_A / lora_embedding_B without ".weight".
    """
    embeddings = set(adapter_names or ())
    converted = {}
    for key, tensor in state.items():
        path, _, kind = key.rpartition(".")
        prefix = f"base_model.model.{path}"
        if kind in ("lora_A", "lora_B") and path in embeddings:
            converted[f"{prefix}.lora_embedding_{kind[-1]}"] = tensor
        elif kind in ("lora_A", "lora_B"):
            converted[f"{prefix}.{kind}.weight"] = tensor
        elif kind == "lora_magnitude":
            converted[f"{prefix}.lora_magnitude_vector"] = tensor
        else:
            converted[f"base_model.model.{key}"] = tensor
    return converted


def _from_peft_folder_state(peft_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A PEFT file's tensors -> our keys: LoRA tensors by from_peft_state_dict, everything else (PEFT's
    modules_to_save copies, "base_model.model.lm_head.weight") under the module's own name."""
    state = {}
    for key, tensor in peft_state.items():
        converted = from_peft_state_dict({key: tensor})
        state.update(converted if converted else {key.removeprefix("base_model.model."): tensor})
    return state


def from_peft_state_dict(peft_state: Dict[str, torch.Tensor], adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """PEFT keys (with or without the adapter name, e.g. from `model.state_dict()`) -> our flat keys.

    Only adapter tensors are kept (base weights in a full PEFT state dict are skipped).
    """
    converted = {}
    replacements = ((f".lora_A.{adapter_name}.weight", ".lora_A"), (".lora_A.weight", ".lora_A"),
                    (f".lora_B.{adapter_name}.weight", ".lora_B"), (".lora_B.weight", ".lora_B"),
                    (f".lora_embedding_A.{adapter_name}", ".lora_A"), (".lora_embedding_A", ".lora_A"),
                    (f".lora_embedding_B.{adapter_name}", ".lora_B"), (".lora_embedding_B", ".lora_B"),
                    (f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude"),
                    (f".lora_magnitude_vector.{adapter_name}", ".lora_magnitude"),
                    (".lora_magnitude_vector", ".lora_magnitude"))
    for key, tensor in peft_state.items():
        for old, new in replacements:
            if key.endswith(old):
                path = key[: -len(old)].removeprefix("base_model.model.")
                converted[path + new] = tensor
                break
    return converted
