"""The setup every course notebook shares, so that each one starts with its own idea.

What it does, and nothing more (the ideas stay in the notebooks that teach them: tokenizers and
pretraining in 01, `expand_vocabulary`, `TokenStream`, `setup_method` and `train_method` in 02):

    import course                      -> the repository root is importable (no `pip install -e .`)
    course.setup(threads=0)            -> CPU threads from the free cores (runtime/threads.py), printed
    course.load_base()                 -> the base model of notebook 01, pretrained first if it is missing
                                          (course.ensure_base() only makes sure it is there)
    course.readable(ratio)             -> a timing ratio, with a warning when its spread is too wide to read
    course.diagram(boxes, arrows)      -> a small box-and-arrow figure (the notebooks' diagrams)
    course.new_domain_job(...)         -> the new-domain job of notebooks 02-09, ready to fine-tune:

        base model ─ expand_vocabulary(new words) ─► expanded_model, tokenizer
        new-domain sentences ─ TokenStream ─► train_stream, val_stream
        probes, TrainConfig ─► job.finetune(method, lora_config) = setup_method + train_method

Usage (a notebook's first cell; its working directory is notebooks/):

    import course
    import lora

    course.setup()
    base_model, base_tokenizer = course.load_base()
    job = course.new_domain_job(base_model, base_tokenizer, steps=150, eval_interval=25)
    model, result = job.finetune("lora", lora.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    print(result.val_loss)
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: notebooks/.. (whatever the cwd)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # import the project from the repository (no `pip install -e .` needed)

# subtle: these imports need the sys.path line above, so they cannot sit at the top of the file
import torch  # noqa: E402

import lora  # noqa: E402
from finetuning.methods import MethodResult, setup_method, train_method  # noqa: E402
from minigpt import MiniGPT, load_model, pretrain  # noqa: E402
from minigpt.corpus import (Probe, TextSplit, TokenStream, base_fact_probes, new_domain_corpus,  # noqa: E402
                            new_domain_heldout_probes, new_domain_probes)
from minigpt.training import TrainConfig  # noqa: E402
from minigpt.vocab import expand_vocabulary, new_words_in  # noqa: E402
from runtime.threads import ThreadChoice, use_threads  # noqa: E402

BASE_DIR = ROOT / "dist" / "notebooks" / "base_model"  # the base model notebook 01 pretrains, all others load


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the attention projections most notebooks adapt


def spread(values, digits: int = 3) -> str:
    """'mean [min, max]' of a few runs' numbers: how a result over several seeds is printed.

    Example:
        >>> spread([1.0, 2.0, 4.0])
        '2.333 [1.000, 4.000]'
    """
    return f"{sum(values) / len(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def setup(threads: int = 0) -> ThreadChoice:
    """Pick the CPU threads as the scripts' --threads does, make torch use them, and print the choice.

    Args:
        threads: 0 picks them from the cores free now, capped by what MiniGPT's width can use (an
            OMP_NUM_THREADS in the environment counts as a request); N uses exactly N.

    Returns:
        The ThreadChoice (count and reason), e.g. ThreadChoice(count=1, reason="OMP_NUM_THREADS").
    """
    choice = use_threads(threads, embed_dim=pretrain.PretrainConfig().embed_dim)
    print(choice.describe())
    return choice


def readable(ratio, widest: float = 1.5) -> str:
    """A timing Ratio as text, plus a warning when its spread is too wide to read a ratio from.

    Args:
        ratio: a benchmarks.common.Ratio (median and the 25th / 75th percentiles of per-round ratios).
        widest: the largest p75 / p25 still read as a measurement; on a busy shared CPU a run can
            spread from 0.3x to 3.7x, and then its median says nothing.

    Example:
        >>> from benchmarks.common import Ratio
        >>> readable(Ratio(median=1.02, p25=0.97, p75=1.05))
        '1.020x [0.970-1.050]'
    """
    text = str(ratio)
    if ratio.p25 > 0 and ratio.p75 / ratio.p25 > widest:
        text += (f"  <- WARNING: the spread is {ratio.p75 / ratio.p25:.1f}x wide, too wide to read (other jobs "
                 f"share this CPU); see the recorded figures in docs/benchmarks.md, or run the cell again")
    return text


def diagram(boxes: dict, arrows: list, title: str = "", size: tuple = (8, 3), ax=None):
    """Draw a box-and-arrow diagram with matplotlib, on a 0-10 x 0-4 canvas; returns the axes.

    Args:
        boxes: name -> (x, y, width, height, text, colour); (x, y) is the box's lower-left corner.
        arrows: (from name, to name, label) tuples; the arrow joins the two boxes' centres' sides.
        title: the figure's title.
        size: the figure size in inches (when no `ax` is given).
        ax: draw into these axes instead of a new figure.

    Example:
        >>> ax = diagram({"x": (0, 1, 1, 1, "x", "white"), "y": (3, 1, 1, 1, "y", "white")}, [("x", "y", "")])
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=size)
    for x, y, width, height, text, colour in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0.05", facecolor=colour,
                                    edgecolor="black", linewidth=1.2))
        ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=10)
    for start, end, label in arrows:
        x0, y0, w0, h0, *_ = boxes[start]
        x1, y1, w1, h1, *_ = boxes[end]
        a = (x0 + w0 / 2, y0 + h0 / 2)
        b = (x1 + w1 / 2, y1 + h1 / 2)
        # leave each box through the side facing the other box
        if abs(b[0] - a[0]) >= abs(b[1] - a[1]):
            a = (x0 + w0 + 0.05, a[1]) if b[0] > a[0] else (x0 - 0.05, a[1])
            b = (x1 - 0.05, b[1]) if b[0] > a[0] else (x1 + w1 + 0.05, b[1])
        else:
            a = (a[0], y0 + h0 + 0.05) if b[1] > a[1] else (a[0], y0 - 0.05)
            b = (b[0], y1 - 0.05) if b[1] > a[1] else (b[0], y1 + h1 + 0.05)
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, linewidth=1.2, color="black"))
        if label:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, label, ha="center", va="bottom", fontsize=9,
                    color="dimgray")
    ax.set(xlim=(-0.2, 10.2), ylim=(-0.2, 4.2), title=title)
    ax.axis("off")
    return ax


def ensure_base(base_dir: Path = BASE_DIR) -> Path:
    """The base model's folder; pretrains the base there first, as notebook 01 does, if it is missing.

    Pretraining uses the threads torch uses now (the ones `setup` chose), so nothing is chosen twice.
    """
    base_dir = Path(base_dir)
    if not (base_dir / "model.pt").is_file():  # notebook 01 makes it; train it here if it is missing
        print(f"no base model in {base_dir} yet: pretraining one as in notebook 01")
        start = time.perf_counter()
        pretrain.main(pretrain.PretrainConfig(out=str(base_dir), plot=False, progress=False,
                                              threads=torch.get_num_threads()))
        print(f"pretrained in {time.perf_counter() - start:.0f} s")
    return base_dir


def load_base(base_dir: Path = BASE_DIR) -> tuple[MiniGPT, object]:
    """(model, tokenizer) of the course's base model (ensure_base: pretrained first if it is missing)."""
    return load_model(ensure_base(base_dir))


@dataclass(frozen=True)
class DomainJob:
    """The new-domain fine-tuning job of notebooks 02-09: the base model taught 40 new words, the data,
    the probes and the training settings. Every method trains on exactly this, so runs compare."""

    base_vocab_size: int  # rows below this index are the base vocabulary; the new words come after
    expanded_model: MiniGPT  # the base model with one new tok_emb / lm_head row per new word
    tokenizer: object  # the base tokenizer plus the new words
    domain: TextSplit  # the new-domain sentences (weather, cooking), train and val
    new_words: list[str]  # the words of the domain the base tokenizer did not know
    train_stream: TokenStream  # domain.train as token windows
    val_stream: TokenStream  # domain.val as token windows: the validation loss
    base_probes: list[Probe]  # facts the base knows (forgetting)
    domain_probes: list[Probe]  # facts of the new domain, each a prefix of a training sentence (recall)
    train_config: TrainConfig  # steps, batch size, warmup, evaluation interval, seed of the batches
    # new combinations of the domain's words, never in a training sentence: generalisation, not recall
    heldout_probes: list[Probe] = field(default_factory=new_domain_heldout_probes)

    def finetune(self, method: str, lora_config: lora.LoRAConfig, lr: float = 5e-3, full_lr: float = 1e-3,
                 **options) -> tuple[MiniGPT, MethodResult]:
        """One run of the job: setup_method, then train_method, as notebook 02 writes them out.

        Args:
            method: "full", "layer_frozen", "lora", "dora" or "qlora" (finetuning.methods.METHODS).
            lora_config: the adapter of lora / dora / qlora (ignored by full and layer_frozen).
            lr: learning rate of the adapter methods (A, B, magnitude, new rows).
            full_lr: learning rate of full fine-tuning and layer freezing.
            **options: more setup_method arguments: weight_decay, lora_plus_ratio, seed, embedding_lr.

        Returns:
            (the trained model, its MethodResult); `expanded_model` itself is never changed.
        """
        setup = setup_method(method, self.expanded_model, self.base_vocab_size, lora_config, lr=lr,
                             full_lr=full_lr, **options)
        result = train_method(setup, self.train_stream, self.val_stream, self.train_config, self.tokenizer,
                              self.base_probes, self.domain_probes)
        return setup.model, result


def new_domain_job(base_model: MiniGPT, base_tokenizer, steps: int = 150, eval_interval: int = 50,
                   batch_size: int = 16, seed: int = 0) -> DomainJob:
    """The new-domain job on `base_model` (which is not changed), as notebook 02 builds it step by step.

    Args:
        base_model, base_tokenizer: the pretrained base (load_base).
        steps: optimizer steps per run (150 in notebooks 02, 06, 08, 09; 100 in the seed sweeps of 03, 04, 07).
        eval_interval: steps between validation passes (the points of each run's val_curve).
        batch_size: windows of context_length tokens per step.
        seed: seeds the batch sampler (setup_method's own `seed` seeds the adapter's init); notebooks 03,
            04 and 07 build one job per seed.

    Example:
        >>> job = new_domain_job(base_model, base_tokenizer, steps=100)   # doctest: +SKIP
        >>> base_tokenizer.vocab_size, job.tokenizer.vocab_size, len(job.new_words)   # doctest: +SKIP
        (176, 216, 40)
    """
    domain = new_domain_corpus()
    new_words = new_words_in(base_tokenizer, domain.train + domain.val)
    expanded_model, tokenizer, _ = expand_vocabulary(base_model, base_tokenizer, new_words)
    context_length = base_model.config.context_length
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=5e-3, warmup_steps=10,
                               eval_interval=eval_interval, seed=seed, progress=False)
    return DomainJob(base_vocab_size=base_model.config.vocab_size, expanded_model=expanded_model,
                     tokenizer=tokenizer, domain=domain, new_words=new_words,
                     train_stream=TokenStream(domain.train, tokenizer, context_length),
                     val_stream=TokenStream(domain.val, tokenizer, context_length),
                     base_probes=base_fact_probes(), domain_probes=new_domain_probes(),
                     train_config=train_config)


SEEDS = (0, 1, 2)  # the seeds a result is repeated over before the course draws a conclusion from it


def new_domain_jobs(base_model: MiniGPT, base_tokenizer, seeds=SEEDS, **options) -> dict:
    """{seed: new_domain_job(..., seed=seed, **options)}: the same job, one per seed of the batch order."""
    return {seed: new_domain_job(base_model, base_tokenizer, seed=seed, **options) for seed in seeds}


def plot_seed_curves(results: dict, title: str, ax=None):
    """Validation curves of several runs per variant ({name: [MethodResult, ...]}), one colour per variant."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for index, (name, runs) in enumerate(results.items()):
        for seed_index, run in enumerate(runs):
            steps, losses = zip(*run.val_curve)
            ax.plot(steps, losses, color=plt.cm.tab10(index), marker="o", alpha=0.7,
                    label=name if seed_index == 0 else None)
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title=title)
    return ax
