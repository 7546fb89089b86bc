"""runtime: the plumbing every script shares, and nothing about models.

    atomic.py       write a whole output folder or nothing (build under a temporary name, rename into place)
    safetensors.py  the safetensors file format (what PEFT and transformers save), read and written from scratch
    cli.py          a config dataclass becomes a strict command line; errors and Ctrl-C end in one line
    distributed.py  data-parallel training under torchrun (a no-op for one process)
    threads.py      how many CPU threads a run uses: the cores free now, capped by what the model can use
    files.py        read JSON and regular expressions from untrusted files, bounded in time and memory
    save_guard.py   a transformers model holding LoRA or 4-bit layers refuses save_pretrained (and says what to do)

This is the bottom floor of the project: it imports nothing of minigpt, lora, quant, tokenizer or
finetuning, so every one of them may use it (the layers are drawn in README.md, "Layout").
"""
