"""The fine-tuning experiment behind `python finetune.py`: every method on the same data, side by side.

    from finetuning import FinetuneConfig, main
    results = main(FinetuneConfig(methods="lora,qlora"))    # -> {"table": ..., "results": [...], ...}

Task "new-domain" (the default), in `new_domain`:

    base checkpoint ──► add the new words (minigpt/vocab.py) ──► for each method (methods.py):
                                                                    set up, train, measure, save
    ──► comparison table + comparison.png (report.py) ──► results folder, written atomically

Task "fact-correction", in `fact_correction`: LoRA on v_proj only and on q, k, v, o (fact_edit.py).
finetune.py's docstring lists what the results folder holds.
"""

import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lora
from lora.adalora import AdaLoRAConfig, check_adalora_targets, merge_adalora
from lora.config import INITS
from lora.model import check_layer_can_take
from finetuning.fact_edit import edit_report, edit_table
from finetuning.methods import (ADAPTER_METHODS, LOW_RANK_METHODS, METHODS, OPTIMIZERS, folder_bytes,
                                make_optimizer, max_logit_difference, merged_copy, setup_method, train_method)
from finetuning.report import comparison_table, plot_comparison, prediction_table
from minigpt import pretrain
from minigpt.adapter_folder import fingerprint_base, save_finetuned_adapter
from minigpt.checkpoint import check_model_dir, load_config, load_model, save_model
from minigpt.corpus import (TokenStream, base_corpus, base_fact_probes, fact_correction_set, new_domain_corpus,
                            new_domain_probes, read_text_file)
from minigpt.predict import batched_probe_accuracy
from minigpt.training import TrainConfig, check_compile, pick_device, train_model
from minigpt.vocab import expand_vocabulary, new_words_in
from runtime.atomic import check_inputs_outside, check_output_dir, check_room
from runtime.distributed import SINGLE_PROCESS, main_process_directory, process_group
from runtime.options import MAX_BATCH_TOKENS, MAX_STEPS, MAX_THREADS, check_batch_tokens, check_number, check_seed
from runtime.threads import use_threads

DEFAULT_BASE = "dist/base_model"
TASKS = ("new-domain", "fact-correction", "vision")
SAVED_FOLDER = {"full": "full_finetuned", "layer_frozen": "layer_frozen", "lora": "lora_adapter",
                "dora": "dora_adapter", "qlora": "qlora_adapter", "adalora": "adalora_merged"}
FACT_VARIANTS = {"v_proj only": ("v_proj",), "q,k,v,o": ("q_proj", "k_proj", "v_proj", "o_proj")}
FACT_FOLDER = {"v_proj only": "v_proj_adapter", "q,k,v,o": "attention_adapter"}
DEFAULT_OUT = {"new-domain": "dist/finetuning_results", "fact-correction": "dist/fact_correction",
               "vision": "dist/vision_results"}
# the kind recorded in a results folder's marker (runtime/atomic.py): a previous folder is replaced as a whole
# (one results.json describes one run) only when its marker names the same kind; any other folder is refused
RESULT_KIND = {"new-domain": "finetune-results", "fact-correction": "fact-correction-results",
               "vision": "vision-results"}


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = "new-domain"  # "new-domain" (compare methods) or "fact-correction" (v_proj vs all attention)
    methods: str = "full,layer_frozen,lora,dora,qlora"  # comma-separated subset to run, in this order
    base: str = DEFAULT_BASE  # the base checkpoint; the default one is pretrained first if missing
    out: str | None = None  # results folder; default dist/finetuning_results (dist/fact_correction for the task)
    data: str | None = None  # your own fine-tuning text instead of the built-in new-domain set
    rank: int = 16  # r of B @ A: a quarter of the 64-dim width, room for ~40 new words and their patterns
    alpha: float = 64.0  # scaling alpha / r = 4: in only 150 steps B A must move far (docs/measurements.md)
    dropout: float = 0.0  # LoRA dropout; the set is tiny and we evaluate on held-out sentences anyway
    targets: str = "q_proj,k_proj,v_proj,o_proj"  # every attention projection (QLoRA: adapt them all)
    dora: bool = False  # DoRA for lora (lora_adapter/) and qlora too; the dora method always is
    rslora: bool = False  # rsLoRA scaling alpha / sqrt(r)
    lora_plus_ratio: float = 1.0  # LoRA+: B learns this many times faster than A (16 in the paper); 1 = off
    init: str = "kaiming"  # LoRA A init: kaiming | gaussian | pissa | olora
    lr: float = 5e-3  # adapter learning rate: LoRA tolerates (and needs) more than full fine-tuning
    full_lr: float = 1e-3  # learning rate of full fine-tuning and layer freezing
    optim: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit: moments in float32 or 8 bits (memory column)
    embedding_lr: float | None = None  # one lr (no decay) for tok_emb / lm_head in every method; unset: each method's own (docs)
    epochs: float = 50.0  # passes over the fine-tuning tokens (one epoch = tokens / (batch_size * context))
    steps: int | None = None  # set to train exactly this many steps instead of epochs
    batch_size: int = 16  # windows per step
    warmup_steps: int = 10  # linear warmup before the cosine decay
    shuffled_copies: int = 8  # train stream = 8 differently shuffled copies: no memorised sentence order
    replay: float = 1.0  # base-corpus sentences mixed in per fine-tuning sentence ("rehearsal"); 0 = none
    early_stopping_patience: int | None = None  # stop after this many epochs without a better val loss
    threads: int = 0  # CPU threads; 0 picks them from the cores free at the start (runtime/threads.py)
    seed: int = 0  # same seed, same numbers (on CPU)
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    sharding: str = "ddp"  # under torchrun: "ddp" (a whole model per process) or "fsdp" (FSDP2 shards)
    compile: str = "off"  # off | forward (torch.compile the forward) | graph (the whole step as a CUDA graph)
    plot: bool = True  # write comparison.png
    encoder_rank: int | None = None  # --task vision: LoRA rank on the image encoder; default rank // 2
    rank_sweep: bool = False  # --task vision: also train "both" at several (decoder, encoder) rank pairs
    progress: bool = True  # tqdm progress bars


DEFAULTS = FinetuneConfig()
MAX_RANK = 4096  # the check against the base's layers (check_lora_fits) gives the real, smaller bound
MAX_REPLAY = 1000  # base sentences per fine-tuning sentence
# options the fact-correction task does not read: giving one is a mistake worth saying so
# options --task vision does not read (it has its own data, strategies and targets: finetuning/vision.py)
VISION_UNUSED = ("data", "methods", "targets", "dora", "rslora", "lora_plus_ratio", "init", "embedding_lr", "epochs",
                 "shuffled_copies", "early_stopping_patience", "compile", "dropout")
FACT_CORRECTION_UNUSED = ("data", "methods", "targets", "dora", "replay", "full_lr", "early_stopping_patience")


def parse_methods(text: str) -> list[str]:
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown:
        raise ValueError(f"--methods {text!r}: unknown or empty; "
                         f"choose a comma-separated subset of {','.join(METHODS)}")
    return [name for name in METHODS if name in methods]


def check_config(config: FinetuneConfig) -> None:
    """Reject bad option values before any work starts."""
    if config.task not in TASKS:
        raise ValueError(f"--task {config.task!r} is unknown; use one of {', '.join(TASKS)}")
    parse_methods(config.methods)
    integers = {"--rank": (config.rank, 1, MAX_RANK, " (and at most min(in, out) of every targeted layer)"),
                "--batch-size": (config.batch_size, 1, MAX_BATCH_TOKENS, ""),
                "--warmup-steps": (config.warmup_steps, 0, MAX_STEPS, ""),
                "--shuffled-copies": (config.shuffled_copies, 0, 1000, " (0 keeps the file's order)"),
                "--threads": (config.threads, 0, MAX_THREADS, " (0 picks them from the free cores)")}
    if config.steps is not None:
        integers["--steps"] = (config.steps, 1, MAX_STEPS, " (or leave it out to train --epochs)")
    if config.early_stopping_patience is not None:
        integers["--early-stopping-patience"] = (config.early_stopping_patience, 1, MAX_STEPS,
                                                 " (or leave it out to never stop early)")
    for flag, (value, low, high, note) in integers.items():
        check_number(flag, value, low, high, integer=True, note=note)
    check_seed("--seed", config.seed)
    check_number("--epochs", config.epochs, 0, MAX_STEPS, low_open=True)
    if not config.replay >= 0:
        raise ValueError(f"--replay must be >= 0 (base sentences per fine-tuning sentence; 0 = none), got {config.replay}")
    check_number("--replay", config.replay, 0, MAX_REPLAY, note=" (base sentences per fine-tuning sentence)")
    check_number("--alpha", config.alpha, 0, low_open=True, note=" (the update is scaled by alpha / rank)")
    check_number("--dropout", config.dropout, 0, 1, high_open=True)
    check_number("--lora-plus-ratio", config.lora_plus_ratio, 0, low_open=True, note=" (1 = off)")
    for flag, rate in (("--lr", config.lr), ("--full-lr", config.full_lr)):
        check_number(flag, rate, 0, low_open=True)
    if config.embedding_lr is not None:
        check_number("--embedding-lr", config.embedding_lr, 0, low_open=True, note=" (or left out: each method's own)")
    if config.init not in INITS:
        raise ValueError(f"--init must be one of {', '.join(INITS)}, got {config.init!r}")
    if config.optim not in OPTIMIZERS:
        raise ValueError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got {config.optim!r}")
    check_compile(config.compile, "cuda")  # the value; the device and torchrun are checked once they are known
    if config.compile == "graph" and config.optim != "adamw":
        raise ValueError(f"--compile graph replays torch's AdamW in a CUDA graph; --optim {config.optim} keeps its "
                         f"step count on the host: use --optim adamw with --compile graph, or --compile forward")
    if config.compile == "graph" and config.task == "new-domain" and "adalora" in parse_methods(config.methods):
        raise ValueError("--compile graph cannot train adalora (its rank allocation reads the gradients on the host "
                         "between steps): leave adalora out of --methods, or use --compile forward")
    if config.sharding == "fsdp" and config.optim != "adamw":
        # untested together: the 8-bit states would have to be quantized per shard (DTensor), which no test covers
        raise ValueError(f"--optim {config.optim} with --sharding fsdp is not supported; use --optim adamw with "
                         f"--sharding fsdp, or --sharding ddp with --optim {config.optim}")
    try:  # the targets' spelling (a regex must compile, a list must not be empty): LoRAConfig's own checks
        lora_config_from(config)
    except ValueError as error:
        raise ValueError(f"--targets {config.targets!r}: {error}") from None
    if config.encoder_rank is not None:
        check_number("--encoder-rank", config.encoder_rank, 1, 32, integer=True, note=" (the encoder is 32 wide)")
    if config.task != "vision" and (config.encoder_rank is not None or config.rank_sweep):
        raise ValueError("--encoder-rank and --rank-sweep are options of --task vision; leave them out")
    if config.task == "vision":
        unused = [option for option in VISION_UNUSED if getattr(config, option) != getattr(DEFAULTS, option)]
        if unused:
            raise ValueError(f"--task vision does not use {', '.join('--' + o.replace('_', '-') for o in unused)}: it "
                             f"compares its own LoRA strategies on its own images (finetuning/vision.py); leave them out")
    elif config.task == "fact-correction":
        unused = [option for option in FACT_CORRECTION_UNUSED if getattr(config, option) != getattr(DEFAULTS, option)]
        if unused:
            flags = ", ".join("--" + option.replace("_", "-") for option in unused)
            raise ValueError(f"--task fact-correction does not use {flags}: it always trains plain LoRA on the "
                             f"built-in fact-edit set, once on v_proj only and once on q,k,v,o, and compares the "
                             f"two; leave {'that option' if len(unused) == 1 else 'those options'} out")
    elif config.init in ("pissa", "olora") and "qlora" in parse_methods(config.methods):
        # checked here, not after four methods have trained: the qlora step would fail and nothing be saved
        others = ",".join(method for method in parse_methods(config.methods) if method != "qlora")
        raise ValueError(f"--init {config.init} rewrites the base weight from its SVD / QR, which QLoRA's frozen "
                         f"4-bit base cannot take; use --methods without qlora"
                         + (f" (--methods {others})" if others else "") + ", or --init kaiming / gaussian")


def output_folder(config: FinetuneConfig) -> Path:
    """--out, or the task's default folder."""
    return Path(config.out or DEFAULT_OUT[config.task])


def say_if_replacing(out_dir: Path, distributed=SINGLE_PROCESS) -> None:
    """One line when a previous run's results are there: the whole folder goes, not just the methods rerun."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        distributed.print(f"{out_dir}/ holds a previous run: it is replaced as a whole when this run finishes "
                          f"(one results.json per run; --out OTHER_FOLDER keeps it)")


def base_bytes(model) -> int:
    """Bytes of a model's float32 weights: the unit of check_room's estimate of a results folder."""
    return 4 * sum(parameter.numel() for parameter in model.parameters())


def lora_config_from(config: FinetuneConfig, targets=None) -> lora.LoRAConfig:
    target_names = targets or tuple(name.strip() for name in config.targets.split(",") if name.strip())
    return lora.LoRAConfig(r=config.rank, alpha=config.alpha, dropout=config.dropout, target_modules=target_names,
                           use_dora=config.dora, use_rslora=config.rslora, init=config.init)


def adalora_config_from(config: FinetuneConfig, steps: int) -> AdaLoRAConfig:
    """AdaLoRA for the run: from 1.5 x --rank ranks per layer down to --rank on average (PEFT's 12 -> 8),
    the first 10% of the steps unpruned, the last 20% with the final ranks (PEFT's docstring example)."""
    targets = tuple(name.strip() for name in config.targets.split(",") if name.strip())
    return AdaLoRAConfig(total_step=steps, target_modules=targets, init_r=max(config.rank + 1, config.rank * 3 // 2),
                         target_r=config.rank, alpha=config.alpha, dropout=config.dropout, tinit=steps // 10,
                         tfinal=steps // 5)


def check_lora_fits(model, lora_configs: dict, config: FinetuneConfig) -> None:
    """Check each adapter config against the model before anything trains: its targets name layers of the
    model and --rank fits each of them (lora's own checks: find_targets, check_layer_can_take).

    Without this a typo in --targets, or a --rank above a layer's width, surfaced only when the first
    adapter method started, after full fine-tuning and layer freezing had trained for a minute.

    Args:
        model: the (vocabulary-expanded) base model the methods start from.
        lora_configs: {what it is for: LoRAConfig}, e.g. {"dora": LoRAConfig(..., use_dora=True)}.
    """
    for lora_config in lora_configs.values():
        try:
            targets = lora.find_targets(model, lora_config)
        except ValueError as error:
            raise ValueError(f"--targets {config.targets!r} does not fit the base {config.base}: {error}") from None
        for name in targets:
            try:
                check_layer_can_take(name, model.get_submodule(name), "default", lora_config.r, lora_config)
            except ValueError as error:
                raise ValueError(f"--rank {config.rank} with --targets {config.targets!r} does not fit the base "
                                 f"{config.base}: {error}") from None


def load_or_pretrain_base(config: FinetuneConfig, device: str, distributed=SINGLE_PROCESS):
    """(model, tokenizer) of --base; the default base is pretrained first if it does not exist yet.

    Under torchrun every rank pretrains together (pretrain.main joins the running process group); rank 0
    writes the folder and the others wait for it before loading.
    """
    if config.base == DEFAULT_BASE and not Path(DEFAULT_BASE).exists():
        distributed.print(f"no base model at {DEFAULT_BASE}/: pretraining one first (python train.py)")
        pretrain.main(pretrain.PretrainConfig(out=DEFAULT_BASE, device=device, seed=config.seed, progress=config.progress,
                                              plot=config.plot, threads=config.threads))
    check_model_dir(config.base)
    return load_model(config.base)


def train_stream_for(config: FinetuneConfig, sentences: list[str], tokenizer, context_length: int) -> TokenStream:
    """The fine-tuning stream: `shuffled_copies` seeded shuffles of the sentences (see TokenStream)."""
    return TokenStream(sentences, tokenizer, context_length, shuffled_copies=config.shuffled_copies,
                       shuffle_seed=config.seed)


def replay_sentences(config: FinetuneConfig, base_tokenizer, n_finetune_sentences: int) -> list[str]:
    """`config.replay` base-corpus sentences per fine-tuning sentence, drawn with a seeded RNG.

    Why: the fine-tuning set never mentions the base facts, so every method drifts towards the new
    domain and forgets them ("catastrophic forgetting"). Mixing some of the old data back in
    ("rehearsal" or "replay", the standard cure) keeps them; LoRA, which can only make a low-rank
    change, keeps them better than full fine-tuning on the same mix (measured in the closing table;
    `--replay 0` shows the bare forgetting). Only sentences whose words the base tokenizer knows are
    used, so a base pretrained on other text (`--base`) gets fewer of them, or none.

    Example:
        138 new-domain sentences with replay 1.0 -> 138 sentences of minigpt/data/base_train.txt.
    """
    count = round(config.replay * n_finetune_sentences)
    unknown = getattr(base_tokenizer, "unknown_words", None)  # BPE knows every string
    known = [sentence for sentence in base_corpus().train if unknown is None or not unknown(sentence)]
    rng = random.Random(config.seed)
    picked = []
    while known and len(picked) < count:  # whole passes over the corpus, then a sample of it
        picked += rng.sample(known, min(len(known), count - len(picked)))
    return picked


def train_config_for(config: FinetuneConfig, tokens_once: int, context_length: int, device: str,
                     desc: str) -> TrainConfig:
    """Steps from --steps, or from --epochs over `tokens_once` tokens; validation each epoch.

    One epoch is the fine-tuning sentences' tokens once (replayed base sentences not counted, so
    `--replay` changes what a step sees, never how many steps there are).
    """
    check_batch_tokens("--batch-size", config.batch_size, context_length)
    steps_per_epoch = max(1, math.ceil(tokens_once / (config.batch_size * context_length)))
    steps = config.steps or max(1, round(config.epochs * steps_per_epoch))
    if steps > MAX_STEPS:
        raise ValueError(f"--epochs {config.epochs:g} is {steps:,} steps of {steps_per_epoch:,} per epoch; at most "
                         f"{MAX_STEPS:,} here, so use --epochs <= {MAX_STEPS // steps_per_epoch:,}")
    return TrainConfig(steps=steps, batch_size=config.batch_size, lr=config.lr,
                       warmup_steps=min(config.warmup_steps, steps // 2), eval_interval=steps_per_epoch,
                       early_stopping_patience=config.early_stopping_patience, seed=config.seed, device=device,
                       progress=config.progress, desc=desc, compile=config.compile)


def table_notes(config: FinetuneConfig, n_replayed: int) -> list[str]:
    """What a reader of the table must know to read the base-facts and domain columns right."""
    if config.replay == 0:
        replay = ("replay: none (--replay 0): the base facts are never seen while fine-tuning, so this table "
                  "shows the bare forgetting; the default replays one base sentence per new-domain sentence.")
    else:
        share = ("one base sentence per new-domain sentence (the default)" if config.replay == 1
                 else f"{config.replay:g} base sentences per new-domain sentence (default 1)")
        replay = (f"replay: this run mixes {share} into the fine-tuning data, {n_replayed} in all, so the base "
                  f"facts are rehearsed; --replay 0 shows the bare forgetting: without them every method loses "
                  f"most base facts, LoRA as much as full fine-tuning (docs/measurements.md, \"Replay\").")
    if config.embedding_lr:
        rows = f"new rows: every method trains tok_emb / lm_head at --embedding-lr {config.embedding_lr:g}, no decay."
    else:
        rows = (f"new rows: each method trains the new words' tok_emb / lm_head rows at its own learning rate "
                f"(full, layer_frozen: --full-lr {config.full_lr:g} with weight decay; adapters: --lr "
                f"{config.lr:g} without): that rate, not the method, makes the domain column's gap. "
                f"--embedding-lr gives every method one rate (what that does to each method: "
                f"docs/measurements.md, \"The new rows' learning rate\").")
    return [replay, rows]


def tokens_in(sentences: list[str], tokenizer) -> int:
    """Tokens of the sentences once, as a TokenStream holds them (<bos> sentence <eos>)."""
    return sum(len(tokenizer.encode(sentence, add_bos=True, add_eos=True)) for sentence in sentences if sentence.strip())


def known_probes(probes, tokenizer):
    """The probes whose prompt and answer the tokenizer knows (all of them for the built-in base)."""
    if not hasattr(tokenizer, "unknown_words"):
        return []
    return [probe for probe in probes if not tokenizer.unknown_words(probe.prompt + " " + probe.answer)]


def base_width(config: FinetuneConfig) -> int:
    """embed_dim of --base (read from its config.json), or of the base that would be pretrained."""
    try:
        return load_config(config.base).embed_dim
    except (OSError, ValueError):  # no base yet (or a broken one, which load_or_pretrain_base reports)
        return pretrain.PretrainConfig().embed_dim


def main(config: FinetuneConfig) -> dict:
    """Run the task of `config`; returns its figures (see the module docstring).

    Under torchrun every rank runs this with its share of each --batch-size (runtime/distributed.py);
    only rank 0 prints and writes the results folder.
    """
    check_config(config)
    if config.task == "vision":  # its own models and data: finetuning/vision.py
        from finetuning.vision import run_vision
        return run_vision(config)
    check_inputs_outside(output_folder(config), {"--base": config.base, "--data": config.data})
    check_output_dir(output_folder(config), RESULT_KIND[config.task])  # a foreign folder: refused before any work
    threads = use_threads(config.threads, base_width(config))
    config = dataclasses.replace(config, threads=threads.count)  # a base pretrained first uses the same count
    with process_group(pick_device(config.device), config.sharding) as distributed:  # one process: nothing to set up
        distributed.print(threads.describe())
        distributed.local_batch_size(config.batch_size)  # fail before any work if the ranks cannot share it
        check_compile(config.compile, distributed.device, distributed.world_size)
        if config.task == "fact-correction":
            return fact_correction(config, distributed)
        return new_domain(config, distributed)


def new_domain(config: FinetuneConfig, distributed=SINGLE_PROCESS) -> dict:
    start = time.perf_counter()
    device = distributed.device
    methods = parse_methods(config.methods)
    out_dir = output_folder(config)
    base_model, base_tokenizer = load_or_pretrain_base(config, device, distributed)
    lora_config = lora_config_from(config)
    adapter_methods = [method for method in methods if method in ADAPTER_METHODS]
    # as setup_method configures each adapter method: "dora" turns DoRA on (and so refuses embedding targets)
    check_lora_fits(base_model, {method: dataclasses.replace(lora_config, use_dora=lora_config.use_dora or method == "dora")
                                 for method in adapter_methods}, config)  # before full fine-tuning trains a minute
    say_if_replacing(out_dir, distributed)

    corpus = read_text_file(config.data) if config.data else new_domain_corpus()
    new_words = new_words_in(base_tokenizer, corpus.train + corpus.val)
    if not new_words and hasattr(base_tokenizer, "unknown_words"):
        raise ValueError(f"{config.data or 'the fine-tuning data'} has no words the base model does not know; "
                         f"this run teaches new words, so give it text with a new vocabulary")
    model, tokenizer, new_ids = expand_vocabulary(base_model, base_tokenizer, new_words, seed=config.seed)
    base_vocab_size = base_model.config.vocab_size
    distributed.print(f"base {config.base}: {base_model.num_parameters():,} parameters, vocabulary {base_vocab_size} "
          f"+ {len(new_ids)} new words ({', '.join(new_words[:8])}{', ...' if len(new_words) > 8 else ''})")
    replayed = replay_sentences(config, base_tokenizer, len(corpus.train))
    context_length = base_model.config.context_length
    train_stream = train_stream_for(config, corpus.train + replayed, tokenizer, context_length)
    val_stream = TokenStream(corpus.val, tokenizer, context_length)
    tokens_once = tokens_in(corpus.train, tokenizer)
    train_config = train_config_for(config, tokens_once, context_length, device, desc="")
    adalora_config = adalora_config_from(config, train_config.steps)
    if "adalora" in methods:  # before full fine-tuning trains a minute
        try:
            check_adalora_targets(model, adalora_config)
        except ValueError as error:
            raise ValueError(f"--rank {config.rank} (adalora starts at {adalora_config.init_r}) with --targets "
                             f"{config.targets!r} does not fit the base {config.base}: {error}") from None
    base_probes = known_probes(base_fact_probes(), base_tokenizer)
    domain_probes = known_probes(new_domain_probes(), tokenizer) if config.data is None else []
    base_accuracy = batched_probe_accuracy(base_model, base_tokenizer, base_probes) if base_probes else float("nan")

    results, trained, plot_path = [], {}, None
    if distributed.is_main:  # at most one full-size float32 copy of the base per method, and one merged
        check_room(out_dir, (len(methods) + 1) * base_bytes(base_model))
    with main_process_directory(out_dir, distributed, RESULT_KIND["new-domain"]) as tmp:  # rank 0 only: a folder
        for method in methods:
            setup = setup_method(method, model, base_vocab_size, lora_config, lr=config.lr, full_lr=config.full_lr,
                                 lora_plus_ratio=config.lora_plus_ratio, seed=config.seed,
                                 embedding_lr=config.embedding_lr, adalora_config=adalora_config)
            distributed.manual_seed(config.seed)  # seed + rank: under torchrun, dropout differs between ranks
            setup.model.to(device)
            method_config = TrainConfig(**{**asdict(train_config), "desc": method,
                                           "lr": config.lr if method in LOW_RANK_METHODS else config.full_lr})
            result = train_method(setup, train_stream, val_stream, method_config, tokenizer, base_probes, domain_probes,
                                  distributed, optim=config.optim)
            if tmp is not None:  # rank 0 writes
                folder = tmp / SAVED_FOLDER[method]
                if method in ADAPTER_METHODS:
                    save_finetuned_adapter(setup.model, tokenizer, base_vocab_size, folder,
                                           base_fingerprint=fingerprint_base(base_model, base_tokenizer))
                elif method == "adalora":  # no adapter folder format for it (yet): the merged model
                    save_model(merge_adalora(copy.deepcopy(setup.model)), tokenizer, folder)
                else:
                    save_model(setup.model, tokenizer, folder)
                result.disk_bytes = folder_bytes(folder)
            results.append(result)
            trained[method] = setup.model
            if method == "lora":
                merged = merged_copy(setup.model)
                if tmp is not None:
                    save_model(merged, tokenizer, tmp / "lora_merged")
                merged_difference = max_logit_difference(merged, setup.model, val_stream)
                distributed.print(f"lora_merged vs base + lora_adapter: max |logit difference| = "
                                  f"{merged_difference:.2e}")
        table = comparison_table(results, base_accuracy, table_notes(config, len(replayed)))
        if tmp is not None:
            plot_path = plot_comparison(results, base_accuracy, tmp / "comparison.png") if config.plot else None
            summary = {"config": asdict(config), "base_accuracy": base_accuracy, "new_words": new_words,
                       "replayed_sentences": len(replayed),
                       "steps": train_config.steps, "methods": [asdict(r) for r in results]}
            (tmp / "results.json").write_text(json.dumps(summary, indent=1) + "\n")

    distributed.print(f"\n{tokens_once:,} fine-tuning tokens + {len(replayed)} replayed base sentences, "
                      f"{train_config.steps} steps of {config.batch_size} x {context_length} tokens, "
                      f"seed {config.seed}, device {device}")
    distributed.print(table)
    for result in results:
        if result.layer_ranks:  # adalora: where its pruned budget went
            distributed.print(f"\n{result.method} ranks per layer (from {adalora_config.init_r}, "
                              f"{adalora_config.target_r} on average): "
                              + ", ".join(f"{name} {rank}" for name, rank in result.layer_ranks.items()))
    models = {"base": (base_model, base_tokenizer)}
    models.update({method: (trained[method], tokenizer) for method in trained})
    domain_prompts = [probe.prompt for probe in domain_probes[:3]]
    fact_prompts = [probe.prompt for probe in base_probes[:3]]
    predictions = prediction_table(models, tokenizer, domain_prompts + fact_prompts)
    distributed.print("\ntop-3 next words, before (base) and after:\n" + predictions)
    wall_time = time.perf_counter() - start
    distributed.print(f"\nwrote {out_dir}/ in {wall_time:.1f} s")
    return {"out_dir": str(out_dir), "results": results, "base_accuracy": base_accuracy, "table": table,
            "new_words": new_words, "steps": train_config.steps,
            "plot": str(out_dir / "comparison.png") if plot_path else None,
            "merged_max_difference": merged_difference if "lora" in trained else None,
            "predictions": predictions, "wall_time_s": wall_time}


def fact_correction(config: FinetuneConfig, distributed=SINGLE_PROCESS) -> dict:
    """LoRA on v_proj only vs on q, k, v, o: efficacy (edited facts) and locality (related facts)."""
    start = time.perf_counter()
    device = distributed.device
    out_dir = output_folder(config)
    base_model, base_tokenizer = load_or_pretrain_base(config, device, distributed)
    check_lora_fits(base_model, {variant: lora_config_from(config, targets) for variant, targets in FACT_VARIANTS.items()},
                    config)
    say_if_replacing(out_dir, distributed)
    edit_set = fact_correction_set()
    new_words = new_words_in(base_tokenizer, edit_set.train)
    model, tokenizer, _ = expand_vocabulary(base_model, base_tokenizer, new_words, seed=config.seed)
    base_vocab_size = base_model.config.vocab_size
    train_stream = train_stream_for(config, edit_set.train, tokenizer, base_model.config.context_length)
    reports = []
    if distributed.is_main:  # two adapters, each far smaller than the base
        check_room(out_dir, base_bytes(base_model))
    with main_process_directory(out_dir, distributed, RESULT_KIND["fact-correction"]) as tmp:  # rank 0: a folder
        for variant, targets in FACT_VARIANTS.items():
            setup = setup_method("lora", model, base_vocab_size, lora_config_from(config, targets), lr=config.lr,
                                 full_lr=config.full_lr, lora_plus_ratio=config.lora_plus_ratio, seed=config.seed,
                                 embedding_lr=config.embedding_lr)
            distributed.manual_seed(config.seed)  # seed + rank: under torchrun, dropout differs between ranks
            setup.model.to(device)
            optimizer = make_optimizer(setup.param_groups, config.lr, config.optim)
            with distributed.training(setup.model, optimizer) as training_model:  # FSDP: whole again after
                train_model(training_model, train_stream, None,
                            train_config_for(config, tokens_in(edit_set.train, tokenizer),
                                             base_model.config.context_length, device, variant),
                            optimizer=optimizer, distributed=distributed)
            setup.model.cpu().eval()
            reports.append(edit_report(variant, setup.trainable_params, model, setup.model, tokenizer, edit_set))
            if tmp is not None:  # rank 0 writes
                save_finetuned_adapter(setup.model, tokenizer, base_vocab_size, tmp / FACT_FOLDER[variant],
                                       base_fingerprint=fingerprint_base(base_model, base_tokenizer))
        table = edit_table(reports)
        if tmp is not None:
            (tmp / "fact_correction.txt").write_text(table + "\n")
    distributed.print(table)
    wall_time = time.perf_counter() - start
    distributed.print(f"\nwrote {out_dir}/ in {wall_time:.1f} s")
    return {"out_dir": str(out_dir), "reports": reports, "table": table, "wall_time_s": wall_time}


DESCRIPTION = ("Fine-tune MiniGPT with LoRA and compare it with full fine-tuning, layer freezing, DoRA and QLoRA. "
               "Writes --out (default dist/finetuning_results; dist/fact_correction for --task fact-correction) "
               "as a whole: a run replaces the previous folder entirely, folders of methods it did not run "
               "included (one results.json describes one run), and only once it has finished.")
