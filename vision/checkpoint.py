"""Save and load a MiniVLM folder, as minigpt/checkpoint.py does for MiniGPT.

    dist/vision_base/
      config.json      VLMConfig fields (the encoder's ViTConfig nested) and a format version
      model.pt         the state_dict, loaded with weights_only=True (no pickled code runs)
      tokenizer.json   the caption tokenizer

Saving is atomic (runtime/atomic.py, kind "vision-checkpoint"). Loading checks every tensor's name and
shape against a model built on the meta device (shapes only, nothing allocated) before building it.
"""

import dataclasses
import json
from pathlib import Path

import torch

from runtime.atomic import atomic_directory
from runtime.files import read_json_file
from tokenizer import load_tokenizer
from vision.config import VLMConfig, ViTConfig
from vision.model import MiniVLM

FORMAT_VERSION = 1
CHECKPOINT_FILES = ("config.json", "model.pt", "tokenizer.json")
KIND = "vision-checkpoint"


def save_vlm(model: MiniVLM, tokenizer, out_dir) -> Path:
    """Write model and tokenizer to `out_dir` atomically; a folder of another kind is refused."""
    wrapped = [name for name, module in model.named_modules() if type(module).__name__.startswith("LoRA")]
    if wrapped:
        raise ValueError(f"save_vlm writes a plain MiniVLM, but {wrapped[0]} carries a LoRA adapter; call "
                         f"lora.merge_and_unload(model) first, or lora.save_adapter for the adapter alone")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model has {model.config.vocab_size} token rows but the tokenizer has "
                         f"{tokenizer.vocab_size} tokens; they must match to be saved together")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, kind=KIND) as tmp:
        fields = {"format_version": FORMAT_VERSION, **dataclasses.asdict(model.config)}
        (tmp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        torch.save({name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}, tmp / "model.pt")
        tokenizer.save(tmp / "tokenizer.json")
    return out_dir


def load_vlm_config(model_dir) -> VLMConfig:
    path = Path(model_dir) / "config.json"
    fields = read_json_file(path, "a vision checkpoint's config.json", max_bytes=2**16)
    if not isinstance(fields, dict) or not isinstance(fields.get("vision"), dict):
        raise ValueError(f"{path} is not a MiniVLM config (an object with a nested \"vision\" object); "
                         f"re-run `python finetune.py --task vision`")
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    known, known_vision = {f.name for f in dataclasses.fields(VLMConfig)}, {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(fields) - known) + sorted(f"vision.{name}" for name in set(fields["vision"]) - known_vision)
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}; expected only {sorted(known)}")
    try:
        return VLMConfig(**{**fields, "vision": ViTConfig(**fields["vision"])})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}; the checkpoint is corrupt, re-run `python finetune.py --task vision`") from None


def load_vlm(model_dir, device: str = "cpu"):
    """(MiniVLM in eval mode, tokenizer) from a folder written by save_vlm; every problem is a clear error."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"vision model folder {model_dir} does not exist; `python finetune.py --task vision` "
                                f"pretrains one into dist/vision_base/")
    missing = [name for name in CHECKPOINT_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a MiniVLM checkpoint: missing {', '.join(missing)} "
                                f"(a checkpoint folder holds {', '.join(CHECKPOINT_FILES)})")
    config = load_vlm_config(model_dir)
    with torch.device("meta"):  # shapes only: a config claiming a huge model allocates nothing
        expected = {name: tuple(tensor.shape) for name, tensor in MiniVLM(config).state_dict().items()}
    try:
        state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"{model_dir / 'model.pt'} could not be read ({type(error).__name__}: {error}); "
                         f"the checkpoint is corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{model_dir / 'model.pt'} is not a state_dict (a dict of names to tensors)")
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [name for name in expected if found[name] != expected[name]]
        raise ValueError(f"{model_dir / 'model.pt'} does not fit the model config.json describes (first "
                         f"mismatch: {wrong[0]!r}); the folder mixes files from different models")
    model = MiniVLM(config)
    model.load_state_dict(state)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json says "
                         f"vocab_size={config.vocab_size}")
    return model.to(device).eval(), tokenizer
