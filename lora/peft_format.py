"""PEFT's adapter folder, read and written without PEFT: what `PeftModel.from_pretrained` loads.

    adapter_dir/                  (save_adapter(model, dir, format="peft"); load_adapter finds it by its files)
        adapter_config.json       PEFT 0.21's LoraConfig fields: {"peft_type": "LORA", "r": 8, "lora_alpha": 16, ...}
        adapter_model.safetensors {"base_model.model.<path>.lora_A.weight": [r, in], ...} (runtime/safetensors.py)

Config fields, ours -> PEFT's (PEFT's LoraConfig, peft/tuners/lora/config.py):
    r -> r,  alpha -> lora_alpha,  dropout -> lora_dropout,  use_dora, use_rslora, modules_to_save,
    rank_pattern, alpha_pattern: the same;  target_modules: the same ("all-linear" is written as the list
    of module paths it selected: PEFT's own "all-linear" keeps lm_head on a model that is not a transformers one);
    init: "kaiming" -> init_lora_weights true, "gaussian" / "pissa" / "olora" -> that string.
Everything else is written at PEFT's default (bias "none", lora_bias false, ...); fan_in_fan_out is true when
the targets are GPT-2's Conv1D layers, as PEFT writes it for those models.

Reading refuses, with one line naming the field, what this library cannot compute: another peft_type,
`bias` other than "none", `lora_bias`, `use_qalora`, `layers_to_transform`,
`exclude_modules`, the other initialisations (LoftQ, EVA, CorDA, ...), and any field PEFT 0.21 does not know
whose value is not empty. `adapter_model.bin` (PEFT's old pickle format) is refused: a pickle can run code.
"""

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from lora.config import LoRAConfig
from runtime.files import read_json_file
from runtime.safetensors import load_file, save_file

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PEFT_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)
PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT version whose LoraConfig these files follow (tests load them with it)
FINGERPRINT_METADATA = "minilora_base_fingerprint"  # in the safetensors metadata, which PEFT ignores

INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}

# What PEFT 0.21's save_pretrained writes for a default LoraConfig, minus the fields we fill in; these
# are the values that mean "feature not used", so reading accepts exactly them for these fields.
PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "arrow_config": None, "auto_mapping": None, "bias": "none",
    "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
    "fan_in_fan_out": False, "inference_mode": True, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_bias": False,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "monteclora_config": None,
    "qalora_group_size": 16, "revision": None, "target_parameters": None, "trainable_token_indices": None,
    "use_bdlora": None, "use_qalora": False, "velora_config": None,
}
# Fields that say nothing about the computation: read, type-checked loosely, and otherwise ignored.
IGNORED = {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
           "megatron_core", "qalora_group_size", "runtime_config"}
OURS = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora",
        "init_lora_weights", "modules_to_save", "rank_pattern", "alpha_pattern",
        # subtle: PEFT overrides fan_in_fan_out by each layer's type (Conv1D: true, nn.Linear: false, with a
        # warning), and so does this library (lora/base_layer.py is_fan_in_fan_out): either value loads
        "fan_in_fan_out"}


def peft_config_dict(config: LoRAConfig, targets, task_type=None, base_model_name_or_path=None,
                     fan_in_fan_out: bool = False) -> dict:
    """adapter_config.json's fields for `config`; `targets` are the module paths it selected on the model.

    `fan_in_fan_out`: the targets are GPT-2's Conv1D layers (weight stored [in, out]); PEFT's own config
    for such a model says so, though PEFT (and this library) set it from each layer's type when loading."""
    target_modules = sorted(targets) if config.target_modules == "all-linear" else config.to_dict()["target_modules"]
    fields = {
        **PEFT_DEFAULTS,
        "peft_type": "LORA", "peft_version": PEFT_VERSION_WRITTEN, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": target_modules,
        "use_dora": config.use_dora, "use_rslora": config.use_rslora, "init_lora_weights": INIT_TO_PEFT[config.init],
        # subtle: PEFT writes null for "none" (and a list otherwise); an empty list would also load
        "modules_to_save": list(config.modules_to_save) or None,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "fan_in_fan_out": fan_in_fan_out,
    }
    return dict(sorted(fields.items()))  # PEFT's own file lists its fields sorted


def _is_empty(value) -> bool:
    return value is None or value is False or value == {} or value == []


def lora_config_from_peft(fields, where: str) -> LoRAConfig:
    """The LoRAConfig an adapter_config.json describes; ValueError (one line, naming the field) otherwise."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(fields).__name__}")
    peft_type = fields.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type!r}; load_adapter reads LoRA adapters only (\"LORA\")")
    for name, value in fields.items():
        if name in OURS or name in IGNORED:
            continue
        if name in PEFT_DEFAULTS:
            if value != PEFT_DEFAULTS[name] and not (_is_empty(value) and _is_empty(PEFT_DEFAULTS[name])):
                raise ValueError(f"{where}: {name} = {value!r:.80} is a PEFT feature this library does not "
                                 f"implement; only {PEFT_DEFAULTS[name]!r} can be loaded")
        elif not _is_empty(value):
            raise ValueError(f"{where}: unknown field {name!r} = {value!r:.80} (not a PEFT 0.21 LoraConfig field); "
                             f"this library cannot tell what it would change, so it refuses the adapter")
    for name in IGNORED & {"task_type", "base_model_name_or_path", "revision", "peft_version"}:
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise ValueError(f"{where}: {name} must be a string or null, got {fields[name]!r:.80}")
    init = fields.get("init_lora_weights", True)
    inits = {True: "kaiming", False: "kaiming", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
    # subtle: init False (PEFT: "random A and B, not a no-op") only decided how training started; the file's
    # A and B replace whatever the init made, so any non-rewriting init loads the same adapter
    if not isinstance(init, (bool, str)) or init not in inits:
        raise ValueError(f"{where}: init_lora_weights = {init!r:.80} is an initialisation this library does not "
                         f"implement; it loads true, false, 'gaussian', 'pissa' and 'olora'")
    if "r" not in fields or "target_modules" not in fields or fields["target_modules"] is None:
        raise ValueError(f"{where} needs 'r' and 'target_modules' (a PEFT LoraConfig always has them)")
    try:
        # LoRAConfig checks every type and range, with the same messages as a config built in code
        return LoRAConfig(r=fields["r"], alpha=fields.get("lora_alpha", 8), dropout=fields.get("lora_dropout", 0.0),
                          target_modules=fields["target_modules"], use_dora=fields.get("use_dora", False),
                          use_rslora=fields.get("use_rslora", False), init=inits[init],
                          modules_to_save=fields.get("modules_to_save"), rank_pattern=fields.get("rank_pattern"),
                          alpha_pattern=fields.get("alpha_pattern"))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def is_peft_folder(adapter_dir) -> bool:
    """True when `adapter_dir` looks like a PEFT adapter folder (it has adapter_config.json)."""
    return (Path(adapter_dir) / PEFT_CONFIG_FILE).is_file()


def read_peft_config(adapter_dir) -> LoRAConfig:
    path = Path(adapter_dir) / PEFT_CONFIG_FILE
    # bounded size and nesting: adapter folders are downloads (see runtime/files.py)
    return lora_config_from_peft(read_json_file(path, f"a PEFT {PEFT_CONFIG_FILE}", max_bytes=2**20), str(path))


def read_peft_weights(adapter_dir) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], object]:
    """(adapter tensors under PEFT's keys, {path: base embedding weight} PEFT saved next to them, fingerprint)."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / PEFT_WEIGHTS_FILE
    if not path.is_file():
        if (adapter_dir / PEFT_PICKLE_FILE).is_file():
            raise ValueError(f"{adapter_dir / PEFT_PICKLE_FILE} is a pickle (PEFT's old format), which can run code "
                             f"when loaded, so it is not read; save the adapter again with PEFT's "
                             f"save_pretrained(folder, safe_serialization=True) to get {PEFT_WEIGHTS_FILE}")
        raise FileNotFoundError(f"{path} not found: a PEFT adapter folder holds {PEFT_CONFIG_FILE} and "
                                f"{PEFT_WEIGHTS_FILE}")
    tensors, metadata = load_file(path)  # every header field checked before a tensor is built
    base_weights = {}
    for key in [key for key in tensors if key.endswith(".base_layer.weight")]:
        # subtle: PEFT's save_pretrained stores a targeted embedding's own weight too (in case the vocabulary
        # was resized); it is the base's, not the adapter's, so load_adapter only checks it
        base_weights[key.removeprefix("base_model.model.").removesuffix(".base_layer.weight")] = tensors.pop(key)
    return tensors, base_weights, (metadata or {}).get(FINGERPRINT_METADATA)


def write_peft_files(folder, config: LoRAConfig, targets, peft_state: Dict[str, torch.Tensor],
                     task_type=None, base_model_name_or_path=None, base_fingerprint=None,
                     fan_in_fan_out: bool = False) -> None:
    """Write adapter_config.json + adapter_model.safetensors into the existing `folder`."""
    fields = peft_config_dict(config, targets, task_type, base_model_name_or_path, fan_in_fan_out)
    with open(Path(folder) / PEFT_CONFIG_FILE, "w") as file:
        json.dump(fields, file, indent=2)
    metadata = {"format": "pt"}  # what PEFT writes
    if base_fingerprint is not None:
        metadata[FINGERPRINT_METADATA] = base_fingerprint
    save_file(peft_state, Path(folder) / PEFT_WEIGHTS_FILE, metadata=metadata)


def check_base_weights(model, base_weights: Dict[str, torch.Tensor], where: str) -> None:
    """Refuse a folder whose saved base embedding differs from the model's (a resized or retrained vocabulary)."""
    for path, saved in base_weights.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{where} holds a base weight for {path!r}, which the model does not have") from None
        weight = getattr(getattr(module, "base_layer", module), "weight", None)
        if weight is None or weight.shape != saved.shape or not torch.equal(weight.detach().cpu(), saved.to(weight.dtype)):
            raise ValueError(f"{where} holds a base weight for {path!r} that differs from the model's (shape "
                             f"{list(saved.shape)}); it was saved from a changed embedding (a resized vocabulary?), "
                             f"which load_adapter does not load: load it onto the base it was trained on")

