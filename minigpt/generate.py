"""Sample text from any saved MiniGPT: a base model, a merged or fully fine-tuned one, or base + adapter.

    python -m minigpt.generate --model dist/base_model --prompt "the cat sits on the"
    python -m minigpt.generate --model dist/finetuning_results/lora_merged --prompt "the soup"
    python -m minigpt.generate --model dist/base_model --adapter dist/finetuning_results/lora_adapter --prompt "the soup"
    python -m minigpt.generate --model dist/finetuning_results/lora_merged --prompt "the soup" --temperature 0

Prints the top-3 next words after the prompt, then `--samples` continuations of it.
"""

import sys
from dataclasses import dataclass

import torch

from minigpt.checkpoint import load_model
from minigpt.predict import top_next_words
from runtime.cli import parse_config
from runtime.options import MAX_THREADS, check_number, check_seed
from runtime.threads import use_threads


@dataclass(frozen=True)
class GenerateConfig:
    model: str = "dist/base_model"  # a checkpoint folder (with --adapter: the base the adapter was made from)
    adapter: str | None = None  # an adapter folder written by finetune.py, put on top of --model
    prompt: str = "the"  # the text to continue
    max_new_tokens: int = 12  # words to add (sentences here are short)
    temperature: float = 0.8  # below 1 sharpens the distribution; 0 always picks the most likely word
    top_k: int | None = 10  # sample only among the k most likely words
    samples: int = 3  # how many continuations to print
    seed: int = 0  # same seed, same samples
    stop_at_eos: bool = True  # cut each sample at the end of its first sentence
    threads: int = 0  # CPU threads; 0 picks them from the cores free at the start (runtime/threads.py)


MAX_NEW_TOKENS = 100_000
MAX_SAMPLES = 10_000


def check_config(config: GenerateConfig) -> None:
    """Refuse option values no run can use, before loading anything; each message names the option."""
    check_number("--max-new-tokens", config.max_new_tokens, 1, MAX_NEW_TOKENS, integer=True)
    check_number("--samples", config.samples, 1, MAX_SAMPLES, integer=True)
    check_number("--temperature", config.temperature, 0, note=" (0 = greedy, 1 = the model's own probabilities)")
    if config.top_k is not None:
        check_number("--top-k", config.top_k, 1, 2 ** 31 - 1, integer=True,
                     note=" (1 = greedy; leave it out for no limit)")
    check_seed("--seed", config.seed)
    check_number("--threads", config.threads, 0, MAX_THREADS, integer=True, note=" (0 picks them from the free cores)")


def main(config: GenerateConfig) -> dict:
    """Load the model, return {"top_words": [(word, p), ...], "samples": [text, ...]}."""
    check_config(config)
    model, tokenizer = load_model(config.model, adapter=config.adapter)
    use_threads(config.threads, model.config.embed_dim)
    prompt_ids = tokenizer.encode(config.prompt, add_bos=True)
    generator = torch.Generator().manual_seed(config.seed)
    idx = torch.tensor([prompt_ids] * config.samples, dtype=torch.long)  # (samples, T)
    out = model.generate(idx[:, -model.config.context_length:], config.max_new_tokens,
                         temperature=config.temperature, top_k=config.top_k, generator=generator)
    texts = []
    for row in out.tolist():
        new_ids = row[min(len(prompt_ids), model.config.context_length):]
        if config.stop_at_eos and tokenizer.eos_id in new_ids:
            new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
        texts.append((config.prompt + " " + tokenizer.decode(new_ids)).strip())
    return {"top_words": top_next_words(model, tokenizer, config.prompt, k=3), "samples": texts}


if __name__ == "__main__":
    config = parse_config(GenerateConfig, description="Sample from a saved MiniGPT (optionally base + adapter).")
    try:
        results = main(config)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print("next word: " + " | ".join(f"{word} {p:.0%}" for word, p in results["top_words"]))
    for text in results["samples"]:
        print(text)
