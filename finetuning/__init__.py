"""finetuning: the experiment of finetune.py, each method on the same data, steps and seed.

    experiment.py  FinetuneConfig and main(): the new-domain comparison and the fact-correction task
    methods.py     what each method (full, layer_frozen, lora, dora, qlora) trains, and training it
    report.py      the comparison table, comparison.png, the top next words before and after
    fact_edit.py   efficacy and locality of a fact correction

The top floor of the library: it uses minigpt, lora, quant, tokenizer and runtime, and nothing imports
it but the scripts (finetune.py) and the notebooks.

    from finetuning import FinetuneConfig, main
    results = main(FinetuneConfig(methods="lora", steps=50))
"""

from finetuning.experiment import FinetuneConfig, main

__all__ = ["FinetuneConfig", "main"]
