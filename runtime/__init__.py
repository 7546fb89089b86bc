"""runtime: the plumbing every script shares, and nothing about models.

    atomic.py       write a whole output folder or nothing (build under a temporary name, rename into place)
    cli.py          a config dataclass becomes a strict command line; errors and Ctrl-C end in one line
    distributed.py  data-parallel training under torchrun (a no-op for one process)
    files.py        read JSON and regular expressions from untrusted files, bounded in time and memory

This is the bottom floor of the project: it imports nothing of minigpt, lora, quant, tokenizer or
finetuning, so every one of them may use it (the layers are drawn in README.md, "Layout").
"""
