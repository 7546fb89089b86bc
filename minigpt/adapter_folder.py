"""A fine-tuned MiniGPT saved small: the base's checkpoint plus an adapter folder.

finetune.py's adapter methods (LoRA, DoRA, QLoRA) change only the LoRA tensors and the rows of the new
words, so that is all an adapter folder holds; the base checkpoint it was made from supplies the rest:

    lora_adapter/
      lora_config.json      the LoRAConfig (lora.save_adapter), and the base's fingerprint (fingerprint_base)
      lora_weights.pt       A [r, in], B [out, r] (and DoRA's magnitude [out]) per target
      embedding_weights.pt  the new rows of tok_emb and lm_head, and the base vocabulary size (vocab.py)
      tokenizer.json        the expanded tokenizer (base vocabulary + new words)

    model, tokenizer = load_finetuned_adapter(base_model, base_tokenizer, "dist/finetuning_results/lora_adapter")

The fingerprint (a SHA-256 over the base's weights and tokenizer) ties the adapter to its base: loading
it onto another base with the same shapes warns (strict_base=True: raises), instead of silently giving
wrong logits. Folders saved without one load unchecked.

This is the one file of minigpt that uses lora/ and quant/ (both sit below minigpt: neither imports it).
"""

from pathlib import Path

import json

import torch

import lora
from minigpt.model import MiniGPT
from minigpt.vocab import EMBEDDING_FILE, check_tokenizer_extends, load_new_rows, save_new_rows, with_new_rows
from quant import quantize_model
from runtime.atomic import atomic_directory
from tokenizer import load_tokenizer


ADAPTER_FOLDER_FILES = ("lora_config.json", "lora_weights.pt", EMBEDDING_FILE, "tokenizer.json")  # what the folder holds


def fingerprint_base(base_model: MiniGPT, base_tokenizer) -> str:
    """SHA-256 (64 hex digits) of a base: its state_dict (names, shapes, dtypes, bytes) and its tokenizer's
    canonical JSON. Take it from the base as loaded, before vocabulary expansion, quantization or PiSSA."""
    tokenizer_json = json.dumps({"type": base_tokenizer.type_name, **base_tokenizer.to_dict()},
                                sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return lora.state_fingerprint(base_model.state_dict(), extra=tokenizer_json.encode("utf-8"))


def save_finetuned_adapter(model: torch.nn.Module, tokenizer, base_vocab_size: int, out_dir,
                           base_fingerprint: str = None) -> Path:
    """Write an adapter folder (lora files + new embedding rows + tokenizer), atomically.

    `base_fingerprint`: `fingerprint_base(base_model, base_tokenizer)` of the base it was fine-tuned from,
    recorded in lora_config.json (None: the folder records no base, and loading it checks none).
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, kind="adapter", legacy_files=ADAPTER_FOLDER_FILES) as tmp:
        lora.write_adapter_files(model, tmp, base_fingerprint=base_fingerprint)  # lora_config.json + lora_weights.pt
        save_new_rows(model, base_vocab_size, tmp / EMBEDDING_FILE)
        tokenizer.save(tmp / "tokenizer.json")
    return out_dir


def load_finetuned_adapter(base_model: MiniGPT, base_tokenizer, adapter_dir, quantize_base: bool = False,
                           strict_base: bool = False):
    """Rebuild a fine-tuned model from its base and an adapter folder; returns (model, tokenizer).

    Checks, before anything is built, that the adapter's tokenizer extends the base tokenizer and that
    its embedding rows and LoRA tensors fit the base model; each mismatch is a ValueError naming it.

    Args:
        base_model, base_tokenizer: the base, as `load_model(base_dir)` returns them (not modified).
        adapter_dir: a folder written by `save_finetuned_adapter`.
        quantize_base: quantize the base to NF4 first, as a QLoRA adapter was trained (exact QLoRA
            logits); False puts the adapter on the full-precision base (close, and faster).
        strict_base: raise ValueError (instead of a warning) when the folder records a base fingerprint
            and `base_model` / `base_tokenizer` have another one.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist; finetune.py writes one, "
                                f"e.g. dist/finetuning_results/lora_adapter")
    tokenizer_path = adapter_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found: an adapter folder holds lora_config.json, "
                                f"lora_weights.pt, {EMBEDDING_FILE} and tokenizer.json")
    recorded = lora.load_base_fingerprint(adapter_dir)
    if recorded is not None:  # hashing the base costs a pass over its weights: only when there is something to compare
        lora.check_base_fingerprint(recorded, fingerprint_base(base_model, base_tokenizer), str(adapter_dir),
                                    strict=strict_base)
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_extends(base_tokenizer, tokenizer, str(adapter_dir))
    new_rows = load_new_rows(adapter_dir / EMBEDDING_FILE, base_model)
    if base_model.config.vocab_size + new_rows["tok_emb.weight"].size(0) != tokenizer.vocab_size:
        raise ValueError(f"{adapter_dir}: {EMBEDDING_FILE} adds {new_rows['tok_emb.weight'].size(0)} rows to "
                         f"{base_model.config.vocab_size}, but tokenizer.json has {tokenizer.vocab_size} tokens")
    model = with_new_rows(base_model, new_rows)
    if quantize_base:
        quantize_model(model)
    lora.load_adapter(model, adapter_dir)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval(), tokenizer
