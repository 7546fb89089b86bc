"""Adapter folders: save_adapter / load_adapter (and converters to and from PEFT state dicts).

    adapter_dir/
        lora_config.json   every LoRAConfig field + "format_version"
        lora_weights.pt    {"blocks.0.attn.q_proj.lora_A": [r, in], "...lora_B": [out, r],
                            "...lora_magnitude": [out] (DoRA), "lm_head.weight": ... (modules_to_save:
                            the adapter's copy, under the module's own names)}

Only one adapter per folder, stored without its name, so it can be loaded under any name. PEFT names
the same tensors `base_model.model.<path>.lora_A.weight` (`lora_embedding_A` for embeddings,
`lora_magnitude_vector` for DoRA); `to_peft_state_dict` / `from_peft_state_dict` translate.

Loading is all or nothing: the config is validated, every tensor's name and shape is checked against
the model, and only then is the model touched. Files are written to a temporary folder first and moved
into place with renames (runtime/atomic.py), so a crash never leaves half an adapter on disk; an existing
folder is only replaced if it holds nothing but an earlier adapter's two files (and its hidden marker).
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Union

import torch
import torch.nn as nn

from lora.config import LoRAConfig
from lora.model import (_existing_configs, _modules_to_save, _pattern_value, adapter_shapes, add_adapter, find_targets,
                        lora_layers, saved_modules, set_adapter)
from lora.modules_to_save import ModulesToSaveWrapper
from runtime.atomic import MARKER, atomic_directory  # the same atomic write as checkpoints

FORMAT_VERSION = 1
CONFIG_FILE = "lora_config.json"
WEIGHTS_FILE = "lora_weights.pt"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # everything save_adapter writes into an adapter folder
PathLike = Union[str, os.PathLike]


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


def _foreign_entries(adapter_dir: Path) -> List[str]:
    """Names in `adapter_dir` that save_adapter did not write (anything but ADAPTER_FILES, as plain files,
    and the hidden marker every output folder holds)."""
    return sorted(entry.name for entry in adapter_dir.iterdir()
                  if entry.name != MARKER and (entry.name not in ADAPTER_FILES or not entry.is_file()
                                               or entry.is_symlink()))


def save_adapter(model: nn.Module, adapter_dir: PathLike, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` to `adapter_dir` (lora_config.json + lora_weights.pt); returns the path.

    Merged adapters are saved as their A, B (the base is not changed by saving). The folder is written
    whole or not at all (runtime/atomic.py). An existing folder is replaced only if it holds nothing but
    these two files (an earlier save); a folder with anything else in it is refused with FileExistsError,
    so a save never deletes files it did not write.
    """
    state = adapter_state_dict(model, adapter_name)
    adapter_dir = Path(adapter_dir)
    if adapter_dir.exists() or adapter_dir.is_symlink():
        if not adapter_dir.is_dir() or adapter_dir.is_symlink():
            raise FileExistsError(f"{adapter_dir} exists and is not a folder; save the adapter to a new folder")
        foreign = _foreign_entries(adapter_dir)
        if foreign:
            raise FileExistsError(f"{adapter_dir} holds {foreign}, which save_adapter did not write (an adapter "
                                  f"folder holds only {list(ADAPTER_FILES)}); save to an empty or new folder, "
                                  f"or move those out first")
    with atomic_directory(adapter_dir, kind="adapter", legacy_files=ADAPTER_FILES) as tmp:
        write_adapter_files(model, tmp, adapter_name, state)
    return adapter_dir


def write_adapter_files(model: nn.Module, folder: PathLike, adapter_name: str = "default", state=None) -> None:
    """Write lora_config.json + lora_weights.pt into the existing `folder` (no swap: the caller's
    atomic_directory makes the folder appear whole, e.g. minigpt's adapter folders with more files)."""
    config = _existing_configs(model).get(adapter_name)
    state = adapter_state_dict(model, adapter_name) if state is None else state
    with open(Path(folder) / CONFIG_FILE, "w") as file:
        json.dump({"format_version": FORMAT_VERSION, **config.to_dict()}, file, indent=2)
    torch.save(state, Path(folder) / WEIGHTS_FILE)


def load_lora_config(adapter_dir: PathLike) -> LoRAConfig:
    """Read and validate `adapter_dir/lora_config.json`."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                                f"(written by save_adapter)")
    try:
        with open(path) as file:
            fields = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the adapter folder is corrupt") from error
    if not isinstance(fields, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(fields).__name__}")
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    known = set(LoRAConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path} has unknown field(s) {unknown}; LoRAConfig fields are {sorted(known)}")
    try:
        return LoRAConfig(**fields)  # the same checks, and messages, as a LoRAConfig built in code
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _load_weights(adapter_dir: PathLike) -> Dict[str, torch.Tensor]:
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        rank = _pattern_value(path, config.rank_pattern, config.r)
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


def load_adapter(model: nn.Module, adapter_dir: PathLike, adapter_name: str = "default") -> nn.Module:
    """Rebuild a saved adapter on `model` under `adapter_name`, make it the active one, return the model.

    A model without LoRA gets `apply_lora` with the saved config first; a model that already has other
    adapters gets this one added. Nothing is changed unless config and every tensor fit the model.
    (PiSSA / OLoRA: re-applying the config recomputes the same residual base from the original W, then
    the saved A and B are loaded; so load those onto the original base model.)
    """
    config = load_lora_config(adapter_dir)
    state = _load_weights(adapter_dir)
    configs = _existing_configs(model)
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists on the model (adapters: {list(configs)}); "
                         f"load it under another name or delete_adapter it first")
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
