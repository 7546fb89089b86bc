"""Pretrain MiniGPT on the built-in corpus (or your own text) and save it as dist/base_model/.

    python train.py                                 # built-in corpus (docs/benchmarks.md has timings)
    python train.py --steps 300 --out dist/tiny     # a quicker run somewhere else
    python train.py --data my_text.txt              # your own text, one sentence per line
    python train.py --tokenizer bpe                 # byte-level BPE instead of the word-level tokenizer
    torchrun --standalone --nproc_per_node=2 train.py --device cpu   # 2 processes, same global batch

Writes `<out>/` (config.json, model.pt, tokenizer.json; atomically) and `<out>_loss.png`, and prints
the final validation loss, tokens per second and, on the built-in corpus, the accuracy on the
base-fact probes ("the capital of france is" -> "paris"). An existing `<out>/` is replaced only if it
is a previous checkpoint (its hidden .minilora-output.json marker says so; from before markers: exactly
those three files); any other folder, `.`, a folder above the current one, a --data file inside `<out>/`,
a folder you cannot write in or a disk without room is refused before training starts, and nothing is
written.

Under torchrun every process runs main(): each trains on its share of the global --batch-size with
DistributedDataParallel (runtime/distributed.py), and only rank 0 prints, plots and writes the folder.
"""

import sys

from minigpt.pretrain import PretrainConfig, main
from runtime.cli import parse_config, run_script


def parse_args(argv=None) -> PretrainConfig:
    return parse_config(PretrainConfig, argv, description="Pretrain MiniGPT and save it as a checkpoint folder.")


if __name__ == "__main__":
    config = parse_args()
    results = run_script(main, config, config.out)  # errors and Ctrl-C: one line and an exit status
    if results["rank"] != 0:  # under torchrun, rank 0 speaks for all
        sys.exit(0)
    print(f"saved {results['out_dir']} ({results['parameters']:,} parameters, vocabulary {results['vocab_size']}) "
          f"in {results['wall_time_s']:.1f} s on {results['device']}"
          + (f" x {results['world_size']} processes" if results["world_size"] > 1 else ""))
    print(f"final loss: train {results['final_train_loss']:.3f}, validation {results['final_val_loss']:.3f}; "
          f"{results['tokens_per_second']:,.0f} tokens/s")
    if results["probe_accuracy"] is not None:
        print(f"base-fact probe accuracy: {results['probe_accuracy']:.1%}")
