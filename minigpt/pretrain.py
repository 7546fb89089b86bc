"""Pretraining: MiniGPT learns the built-in corpus (or your text) and is saved as a checkpoint folder.

`python train.py` is the command-line face of this file; notebooks and finetune.py call `main` directly:

    from minigpt.pretrain import PretrainConfig, main
    results = main(PretrainConfig(out="dist/base_model"))     # -> {"out_dir": ..., "final_val_loss": ...}

    corpus ──► tokenizer (word-level or BPE) ──► TokenStream ──► train_model (training.py) ──► save_model
                                                                                                 │
                                           <out>/config.json  model.pt  tokenizer.json  ◄────────┘

An existing `<out>/` is replaced only if it is a previous checkpoint (its hidden .minilora-output.json
marker says so, or, from before markers, it holds exactly those three files); any other folder, `.`, a
folder above the current one, a --data file inside `<out>/`, a folder we cannot write in or a disk
without room for the checkpoint is refused before training starts, and nothing is written. Under torchrun every process runs main(): each trains on its share of the
global batch_size with DistributedDataParallel (runtime/distributed.py), and only rank 0 writes.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt.checkpoint import CHECKPOINT_FILES, save_model
from minigpt.config import GPTConfig
from minigpt.corpus import TokenStream, base_corpus, base_fact_probes, read_text_file
from minigpt.model import MiniGPT
from minigpt.predict import probe_accuracy
from minigpt.training import TrainConfig, check_compile, pick_device, train_model
from runtime.atomic import check_inputs_outside, check_output_dir, check_room
from runtime.distributed import process_group
from runtime.options import MAX_STEPS, MAX_THREADS, check_batch_tokens, check_number, check_seed
from runtime.threads import use_threads
from tokenizer import BPETokenizer, WordTokenizer
from tokenizer.bpe import FIRST_MERGE_ID


@dataclass(frozen=True)
class PretrainConfig:
    out: str = "dist/base_model"  # the checkpoint folder to write
    data: str | None = None  # a text file to train on instead of the built-in corpus
    tokenizer: str = "word"  # "word" (default: next-word probes, one row per new word) or "bpe"
    bpe_vocab_size: int = 512  # vocabulary size when tokenizer="bpe"
    steps: int = 600  # enough for 100% on the built-in probes; longer only memorises harder (val loss rises)
    batch_size: int = 32  # windows of context_length tokens per step, in all (torchrun: split over processes)
    lr: float = 3e-3  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warmup before the cosine decay
    shuffled_copies: int = 8  # train stream = 8 differently shuffled copies: no memorised sentence order
    eval_interval: int = 100  # steps between validation passes
    context_length: int = 32  # tokens the model sees at once
    embed_dim: int = 64  # model width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout everywhere in the model
    seed: int = 0  # same seed, same weights (on CPU); dropout is seeded with seed + rank under torchrun
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    sharding: str = "ddp"  # under torchrun: "ddp" (a whole model per process) or "fsdp" (FSDP2 shards)
    threads: int = 0  # CPU threads; 0 picks them from the cores free at the start (runtime/threads.py)
    compile: str = "off"  # off | forward (torch.compile the forward) | graph (the whole step as a CUDA graph)
    plot: bool = True  # write the loss-curve PNG
    progress: bool = True  # show a progress bar


TOKENIZERS = ("word", "bpe")
MAX_WIDTH = 4096  # embed_dim, context_length: far beyond what this toy corpus can use
MAX_LAYERS = 64
MAX_BPE_VOCAB = 65536


def check_config(config: PretrainConfig) -> None:
    """Refuse option values that no run can use, before any work: one message naming the option and its range.

    Example:
        >>> check_config(PretrainConfig(batch_size=10**9))
        Traceback (most recent call last):
        ...
        ValueError: --batch-size must be an integer from 1 to 1,048,576, got 1000000000
    """
    if config.tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {config.tokenizer!r}")
    check_compile(config.compile, "cuda")  # the value; the device is checked once it is known
    integers = {"--bpe-vocab-size": (config.bpe_vocab_size, FIRST_MERGE_ID, MAX_BPE_VOCAB,
                                         " (special tokens + 256 bytes + the merges)"),
                "--steps": (config.steps, 1, MAX_STEPS, ""),
                "--batch-size": (config.batch_size, 1, 2 ** 20, ""),
                "--warmup-steps": (config.warmup_steps, 0, MAX_STEPS, ""),
                "--shuffled-copies": (config.shuffled_copies, 0, 1000, " (0 keeps the file's order)"),
                "--eval-interval": (config.eval_interval, 1, MAX_STEPS, ""),
                "--context-length": (config.context_length, 1, MAX_WIDTH, ""),
                "--embed-dim": (config.embed_dim, 1, MAX_WIDTH, ""),
                "--n-layers": (config.n_layers, 1, MAX_LAYERS, ""),
                "--n-heads": (config.n_heads, 1, MAX_WIDTH, ""),
                "--threads": (config.threads, 0, MAX_THREADS, " (0 picks them from the free cores)")}
    for flag, (value, low, high, note) in integers.items():
        check_number(flag, value, low, high, integer=True, note=note)
    check_number("--lr", config.lr, 0, low_open=True)
    check_number("--dropout", config.dropout, 0, 1, high_open=True)
    check_seed("--seed", config.seed)
    if config.embed_dim % config.n_heads:
        raise ValueError(f"--embed-dim {config.embed_dim} must be divisible by --n-heads {config.n_heads} "
                         f"(each head gets embed_dim / n_heads dimensions)")
    check_batch_tokens("--batch-size", config.batch_size, config.context_length)


def build_tokenizer(config: PretrainConfig, sentences: list[str]):
    if config.tokenizer == "word":
        return WordTokenizer.from_corpus(sentences)
    if config.tokenizer == "bpe":
        return BPETokenizer.train("\n".join(sentences), vocab_size=config.bpe_vocab_size)
    raise ValueError(f"unknown tokenizer {config.tokenizer!r}; use 'word' or 'bpe'")


def plot_losses(result, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # subtle: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps, losses = zip(*result.train_curve)
    ax.plot(steps, losses, label="train", alpha=0.6)
    if result.val_curve:
        ax.plot(*zip(*result.val_curve), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats/token)", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(config: PretrainConfig) -> dict:
    """Pretrain, save, and return the figures of the run (losses, timings, probe accuracy).

    Under torchrun every rank returns the same losses; only rank 0 writes the folder and the plot and
    measures probe accuracy ("rank" in the results says which process this is).
    """
    start = time.perf_counter()
    check_config(config)
    threads = use_threads(config.threads, config.embed_dim)
    with process_group(pick_device(config.device), config.sharding) as distributed:  # one process: nothing to set up
        distributed.print(threads.describe())
        return {**pretrain(config, distributed, start), "threads": threads.count}


def pretrain(config: PretrainConfig, distributed, start: float) -> dict:
    device = distributed.device
    check_compile(config.compile, device, distributed.world_size)
    # Every check that can fail comes before any work: the training options, the ranks' share of the
    # batch, the data file, and the output folder (never replace a folder that is not a checkpoint).
    train_config = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=config.warmup_steps, eval_interval=config.eval_interval,
                               seed=config.seed, device=device, progress=config.progress, desc="pretrain",
                               compile=config.compile)
    distributed.local_batch_size(config.batch_size)
    corpus = read_text_file(config.data) if config.data else base_corpus()
    check_inputs_outside(config.out, {"--data": config.data})
    check_output_dir(config.out, kind="checkpoint", legacy_files=CHECKPOINT_FILES)
    source = config.data or "the built-in corpus"
    held_out = " (its every 10th non-blank line)" if config.data else ""  # read_text_file's split
    tokenizer = build_tokenizer(config, corpus.train + corpus.val)
    train_stream = TokenStream(corpus.train, tokenizer, config.context_length,  # why copies: see TokenStream
                               shuffled_copies=config.shuffled_copies, shuffle_seed=config.seed,
                               name=f"the training split of {source}")
    val_stream = TokenStream(corpus.val, tokenizer, config.context_length,
                             name=f"the validation split of {source}{held_out}")

    torch.manual_seed(config.seed)  # the same seed on every rank: identical initial weights
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=config.context_length,
                             embed_dim=config.embed_dim, n_layers=config.n_layers, n_heads=config.n_heads,
                             dropout=config.dropout)
    model = MiniGPT(model_config).to(device)
    if distributed.is_main:  # float32 weights plus the tokenizer: a full disk is refused before training
        check_room(config.out, 4 * sum(p.numel() for p in model.parameters()) + 100 * tokenizer.vocab_size)
    torch.manual_seed(config.seed + distributed.rank)  # dropout masks differ between ranks (rank 0: seed)
    with distributed.training(model) as training_model:  # DDP-wrapped, or FSDP shards gathered back after
        result = train_model(training_model, train_stream, val_stream, train_config, distributed=distributed)

    out_dir, accuracy, plot_path = Path(config.out), None, None
    if distributed.is_main:  # one writer; `model` is the unwrapped MiniGPT, so no "module." prefixes
        out_dir = save_model(model.cpu(), tokenizer, config.out)
        if config.data is None and config.tokenizer == "word":  # probes are whole words of the built-in corpus
            accuracy = probe_accuracy(model, tokenizer, base_fact_probes())
        if config.plot:
            plot_path = out_dir.parent / f"{out_dir.name}_loss.png"
            plot_losses(result, plot_path, f"MiniGPT pretraining ({model.num_parameters():,} parameters)")
    distributed.barrier()  # the other ranks wait here until the folder is complete
    return {
        "out_dir": str(out_dir),
        "plot": str(plot_path) if plot_path else None,
        "parameters": model.num_parameters(),
        "vocab_size": tokenizer.vocab_size,
        "device": device,
        "rank": distributed.rank,
        "world_size": distributed.world_size,
        "steps": result.steps_done,
        "final_train_loss": result.history[-1]["train_loss"],
        "final_val_loss": result.final_val_loss,
        "probe_accuracy": accuracy,
        "tokens_per_second": result.tokens_per_second,
        "train_time_s": result.wall_time_s,
        "wall_time_s": time.perf_counter() - start,
        "history": result.history,
    }
