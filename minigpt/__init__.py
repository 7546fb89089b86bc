"""minigpt: a small GPT to pretrain and then fine-tune, and everything around it.

    from minigpt import GPTConfig, MiniGPT, save_model, load_model
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size))
    logits, loss = model(idx, targets)             # idx, targets: (B, T) token ids
    save_model(model, tokenizer, "dist/base_model")
    model, tokenizer = load_model("dist/base_model")

Files, in reading order: config.py (GPTConfig), model.py (MiniGPT), data.py (the built-in corpora and
batching), training.py (the shared training loop), predict.py (next-word predictions and probe
accuracy), checkpoint.py (save/load folders), atomic.py (all-or-nothing folder writes), cli.py,
then fine-tuning: vocab.py (new words: tokenizer + embedding rows), finetuning.py (the methods side by
side, adapter folders), generate.py (sampling from any saved model).

    model, tokenizer = load_model("dist/base_model", adapter="dist/finetuning_results/lora_adapter")
"""

from minigpt.checkpoint import load_model, save_model
from minigpt.config import GPTConfig
from minigpt.model import MiniGPT
from minigpt.predict import probe_accuracy, top_next_words
from minigpt.vocab import expand_vocabulary

__all__ = ["GPTConfig", "MiniGPT", "save_model", "load_model", "probe_accuracy", "top_next_words",
           "expand_vocabulary"]
