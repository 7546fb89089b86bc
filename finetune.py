"""Fine-tune the base MiniGPT on a new domain with LoRA, save adapter and merged model, compare methods.

    python finetune.py                              # everything below (aim: about a minute on a laptop CPU)
    python finetune.py --methods lora               # only LoRA (any subset of full,layer_frozen,lora,dora,qlora)
    python finetune.py --methods lora,adalora       # AdaLoRA too (not in the default run): ranks pruned to a budget
    python finetune.py --rank 16 --alpha 32 --targets q_proj,v_proj --lr 3e-3 --epochs 40
    python finetune.py --data my_text.txt           # your own text (it must contain words the base lacks)
    python finetune.py --task fact-correction       # LoRA on v_proj only vs on all attention projections
    python finetune.py --optim adamw8bit            # AdamW moments in 8 bits (or paged_adamw8bit): memory column
    python finetune.py --task vision                # LoRA on a tiny vision-language model: decoder, encoder,
                                                    # both, cross-attention, full (finetuning/vision.py)
    python -m minigpt.generate --model dist/finetuning_results/lora_merged --prompt "the soup"
    python -m minigpt.generate --model dist/base_model --adapter dist/finetuning_results/lora_adapter --prompt "the soup"
    torchrun --standalone --nproc_per_node=2 finetune.py --device cpu   # 2 processes (docs/distributed.md)

The default run (task "new-domain"):
  1. loads dist/base_model/ (pretraining it first with train.py's main if it does not exist);
  2. adds the new-domain words (weather, cooking) to the tokenizer, and new rows to tok_emb / lm_head
     (minigpt/vocab.py);
  3. fine-tunes with LoRA on q/k/v/o, training only the adapters and the new rows;
  4. writes, atomically (Ctrl-C, SIGTERM or an error leaves the previous results untouched; a finished run
     replaces the whole folder, folders of methods it did not run included):

         dist/finetuning_results/
           lora_adapter/    lora_weights.pt  embedding_weights.pt  lora_config.json  tokenizer.json
           lora_merged/     config.json  model.pt  tokenizer.json
           full_finetuned/  layer_frozen/  dora_adapter/  qlora_adapter/
           comparison.png   results.json

     and checks that the merged model and base + adapter give the same logits;
  5. trains full fine-tuning, layer freezing, DoRA and QLoRA on the same data, steps and seed and prints
     the comparison table (trainable parameters, validation loss, forgetting, bytes, memory, time);
  6. prints the top-3 next words for a few prompts before and after.
With --methods ...,adalora also adalora_merged/ (AdaLoRA's merged model; it has no adapter folder yet), and
the rank each AdaLoRA layer ended with, printed under the table and stored in results.json ("layer_ranks").
"""

from finetuning.experiment import DESCRIPTION, FinetuneConfig, main, output_folder
from runtime.cli import parse_config, run_script


def parse_args(argv=None) -> FinetuneConfig:
    return parse_config(FinetuneConfig, argv, description=DESCRIPTION)


if __name__ == "__main__":
    config = parse_args()
    run_script(main, config, output_folder(config))
