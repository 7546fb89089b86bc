"""minigpt: a small GPT to pretrain and then fine-tune, and everything around it.

    from minigpt import GPTConfig, MiniGPT, save_model, load_model
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size))
    logits, loss = model(idx, targets)             # idx, targets: (B, T) token ids
    save_model(model, tokenizer, "dist/base_model")
    model, tokenizer = load_model("dist/base_model")

Files, in reading order: config.py (GPTConfig), model.py (MiniGPT), corpus.py (the built-in corpora,
probes and batching; the text files are in data/), training.py (the shared training loop), pretrain.py
(what `python train.py` runs), predict.py (next-word predictions and probe accuracy), checkpoint.py
(save/load folders), then what fine-tuning needs of the model: vocab.py (new words: tokenizer +
embedding rows), adapter_folder.py (a base plus an adapter folder), generate.py (sampling from any
saved model). The experiment that compares the fine-tuning methods is the package above this one,
finetuning/; the plumbing (atomic folder writes, the command line, torchrun) is runtime/, below it.

    model, tokenizer = load_model("dist/base_model", adapter="dist/finetuning_results/lora_adapter")
"""

from minigpt.checkpoint import load_model, save_model
from minigpt.config import GPTConfig
from minigpt.model import MiniGPT
from minigpt.predict import probe_accuracy, top_next_words
from minigpt.vocab import expand_vocabulary

__all__ = ["GPTConfig", "MiniGPT", "save_model", "load_model", "probe_accuracy", "top_next_words",
           "expand_vocabulary"]
