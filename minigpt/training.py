"""The one training loop, shared by train.py (pretraining) and finetune.py (every fine-tuning method).

Fine-tuning methods differ only in which parameters have requires_grad=True; this loop trains exactly
those. It is the loop people expect from nanoGPT and the Hugging Face Trainer:

    for step in 1..steps:
        x, y   = next random batch               (B, T) windows of the token stream
        loss   = model(x, y)                      under bf16 autocast on GPUs that support it
        loss.backward(); clip_grad_norm(1.0)      gradient clipping keeps early steps stable
        AdamW step, lr from warmup + cosine       weight decay on 2-D weights only
        every eval_interval steps: validation loss over the whole held-out stream (+ early stopping)

On a GPU the loop is host bound at MiniGPT's sizes (hundreds of small kernels a step), so it has two
faster modes, the same numbers: `TrainConfig(compile="forward")` runs the forward through torch.compile
(fused element-wise kernels), and `compile="graph"` records the whole step (forward, backward, clipping,
AdamW) once in a CUDA graph and replays it (minigpt/cuda_graph.py): one launch a step.

Under torchrun (see runtime/distributed.py) the same loop runs in every process: `model` is wrapped in
DistributedDataParallel, each rank keeps its slice of the global batch, and the logged losses are the
averages over ranks, so the history reads like a single-process run with the same global batch.
"""

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from minigpt.cuda_graph import CUDAGraphStep, check_graphable_optimizer
from runtime.distributed import SINGLE_PROCESS, DistributedContext, unwrap_model
from runtime.options import MAX_SEED, MAX_STEPS


COMPILE_MODES = ("off", "forward", "graph")  # TrainConfig.compile, finetune.py / train.py --compile


class TrainingDiverged(ValueError):
    """The loss (or a weight) became NaN or inf: the run is stopped there and nothing is saved.

    Attributes: step (1-based, the first bad one), loss (its value), lr (the highest peak learning rate).
    """

    def __init__(self, message: str, step: int, loss: float, lr: float):
        super().__init__(message)
        self.step, self.loss, self.lr = step, loss, lr


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 32  # windows per step (the global batch: under torchrun each rank takes a share)
    lr: float = 3e-3  # peak learning rate, reached after warmup (small models tolerate a high one)
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0: Adam's early steps are noisy
    weight_decay: float = 0.1  # AdamW decay, applied to 2-D weights only (never to biases or LayerNorms)
    grad_clip: float | None = 1.0  # max global gradient norm; 0 or None turns clipping off
    eval_interval: int = 100  # steps between validation passes (and at the last step)
    early_stopping_patience: int | None = None  # stop after this many evaluations without improvement
    seed: int = 0  # seeds the batch sampler; the same seed repeats a CPU run exactly
    device: str = "cpu"  # where the batches go; the model must already be there
    progress: bool = True  # show a tqdm progress bar
    desc: str = "train"  # the progress bar's label
    compile: str = "off"  # "forward": torch.compile the forward; "graph": the whole step in a CUDA graph (CUDA only)

    def __post_init__(self):
        """Refuse values the loop cannot use, with the option's name (e.g. eval_interval=0 divides by 0)."""
        def is_integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:  # subtle: NaN fails every comparison below, so it is refused too
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        at_least = {"steps": 1, "batch_size": 1, "eval_interval": 1, "warmup_steps": 0}
        for name, minimum in at_least.items():
            value = getattr(self, name)
            if not is_integer(value) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"TrainConfig.steps must be at most {MAX_STEPS:,}, got {self.steps:,}")
        if not is_number(self.lr) or not 0.0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a number > 0, got {self.lr!r}")
        if not is_number(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1] (the final lr as a share of lr), "
                             f"got {self.min_lr_ratio!r}")
        if not is_number(self.weight_decay) or not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not is_number(self.grad_clip) or not 0.0 <= self.grad_clip < math.inf):
            raise ValueError(f"TrainConfig.grad_clip must be a number > 0, or 0 / None for no clipping, "
                             f"got {self.grad_clip!r}")
        patience = self.early_stopping_patience
        if patience is not None and (not is_integer(patience) or patience < 1):
            raise ValueError(f"TrainConfig.early_stopping_patience must be an integer >= 1, or None to never stop "
                             f"early, got {patience!r}")
        check_compile(self.compile, self.device, flag="TrainConfig.compile")
        if not is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # dicts: step, lr, train_loss and (at evaluations) val_loss
    final_val_loss: float = float("nan")
    best_val_loss: float = float("inf")
    steps_done: int = 0
    stopped_early: bool = False
    wall_time_s: float = 0.0
    tokens_per_second: float = 0.0

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]

    @property
    def train_curve(self) -> list[tuple[int, float]]:
        return [(h["step"], h["train_loss"]) for h in self.history]


def pick_device(name: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; any other name is checked and returned."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this PyTorch sees no CUDA GPU; use --device cpu")
    return name


def autocast_context(device: str):
    """bf16 autocast on CUDA GPUs that support it (Ampere and later), full fp32 elsewhere."""
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=use_bf16)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; 2-D weights decay, 1-D ones (biases, norms) do not.

    Example: a 1-layer MiniGPT has 9 matrices (tok_emb, pos_emb, q/k/v/o_proj, up/down_proj, lm_head)
    and 12 vectors (biases, LayerNorm weights and biases): two groups, decayed and not.

        >>> from minigpt import GPTConfig, MiniGPT
        >>> model = MiniGPT(GPTConfig(vocab_size=10, embed_dim=8, n_heads=2, n_layers=1))
        >>> optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
        >>> [(len(group["params"]), group["weight_decay"]) for group in optimizer.param_groups]
        [(9, 0.1), (12, 0.0)]
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio (Loshchilov & Hutter, 2017).

    The learning rate at optimizer step `step` (0-based) is config.lr * lr_multiplier(step, config).

    Example: 10 warmup steps of 100, ending at 10% of the peak.

        >>> config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
        >>> [round(lr_multiplier(step, config), 3) for step in (0, 4, 9, 10, 55, 100)]
        [0.1, 0.5, 1.0, 1.0, 0.55, 0.1]
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream, batch_size: int = 64, device: str = "cpu") -> float:
    """Mean next-token loss over one full sweep of `stream` (a minigpt.corpus.TokenStream)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for x, y in stream.iter_windows(batch_size, device=device):
        with autocast_context(device):
            _, loss = model(x, y)
        total_loss += float(loss) * y.numel()
        total_tokens += y.numel()
    model.train(was_training)
    return total_loss / total_tokens


def diverged(config: TrainConfig, optimizer: torch.optim.Optimizer, step: int, what: str,
             value: float) -> TrainingDiverged:
    """The TrainingDiverged for a NaN / inf `what` at `step`, with the likely cause: the learning rate.

    Example: `python train.py --lr 1e30` stops at step 2 (step 1's loss is computed before any update):
        pretrain: training diverged at step 2 of 600: the training loss is nan; nothing was saved. Likely
        cause: the learning rate 1e+30 is far too high; try 1e-3
    """
    # subtle: LambdaLR keeps each group's peak rate as "initial_lr"; "lr" is the (warming-up) current one
    rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    peak = max(rates)
    groups = f" (the highest of its parameter groups' rates {', '.join(f'{r:g}' for r in rates)})" \
        if len(set(rates)) > 1 else ""
    if peak >= 0.1:  # AdamW moves every weight by about lr per step: 0.1 already scrambles a transformer
        cause = f"the learning rate {peak:g}{groups} is far too high; try 1e-3"
    else:
        cause = (f"the learning rate {peak:g}{groups} may be too high for this model and data; "
                 f"try {peak / 10:g}, or more --warmup-steps")
    label = f"{config.desc}: " if config.desc else ""
    return TrainingDiverged(f"{label}training diverged at step {step} of {config.steps}: the {what} is {value}; "
                            f"nothing was saved. Likely cause: {cause}", step=step, loss=value, lr=peak)


@torch.no_grad()
def check_trained_model(model, trainable, x, y, last_record: dict, config: TrainConfig, optimizer,
                        distributed: DistributedContext = SINGLE_PROCESS) -> None:
    """Raise TrainingDiverged if the last update left NaN / inf weights, or weights that give a NaN / inf loss.

    The loop checks each step's loss, but that loss is computed before the step's update: without this,
    `--steps 1 --lr 1e30` would save weights of 1e30 whose every output is NaN.
    """
    step = last_record["step"]
    bad = sum(int((~torch.isfinite(parameter)).sum()) for parameter in trainable)
    if bad:
        raise diverged(config, optimizer, step, "count of NaN / inf weights after the last update", bad)
    if "val_loss" in last_record:  # evaluated after the last update already
        return
    with autocast_context(config.device):
        _, loss = unwrap_model(model)(x, y)  # the last batch again, in eval mode: no dropout, no randomness
    loss = distributed.mean(loss.item())
    if not math.isfinite(loss):
        raise diverged(config, optimizer, step, "loss after the last update", loss)


def check_compile(mode: str, device: str, world_size: int = 1, flag: str = "--compile") -> None:
    """Refuse a compile mode this run cannot use, naming the option (`flag`) and what would work.

    Example:
        >>> check_compile("graph", "cuda")
        >>> check_compile("graph", "cpu")
        Traceback (most recent call last):
        ...
        ValueError: --compile graph needs a CUDA GPU; this run is on cpu: use --compile forward or off
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"{flag} must be one of {', '.join(COMPILE_MODES)} (off: eager; forward: torch.compile of "
                         f"the forward; graph: the whole step in a CUDA graph, CUDA only), got {mode!r}")
    if mode == "graph" and not device.startswith("cuda"):
        raise ValueError(f"{flag} graph needs a CUDA GPU; this run is on {device}: use {flag} forward or off")
    if mode == "graph" and world_size > 1:
        raise ValueError(f"{flag} graph runs in one process (a graph does not replay the gradient reduction "
                         f"between ranks); under torchrun use {flag} forward or off")


def check_graph_mode(optimizer, distributed: DistributedContext, after_step) -> None:
    """Refuse compile="graph" where a replayed CUDA graph would not do what the eager loop does."""
    check_graphable_optimizer(optimizer)
    check_compile("graph", "cuda", distributed.world_size, flag="TrainConfig.compile")
    if after_step is not None:
        raise ValueError('compile="graph" cannot run an after_step callback (AdaLoRA\'s rank allocation reads the '
                         'gradients on the host between steps); use compile="forward" or "off"')


def train_model(model: torch.nn.Module, train_stream, val_stream, config: TrainConfig,
                optimizer: torch.optim.Optimizer | None = None,
                distributed: DistributedContext = SINGLE_PROCESS, extra_loss=None, after_step=None) -> TrainResult:
    """Train the parameters of `model` that require grad; returns losses, timings and the best val loss.

    Args:
        model: a model whose forward(x, y) returns (logits, loss); already on config.device.
        train_stream, val_stream: TokenStreams (get_batch / iter_windows); val_stream may be None.
        config: the TrainConfig.
        optimizer: optional, e.g. built from LoRA+ parameter groups; default make_optimizer(model, ...).
        distributed: under torchrun, the DistributedContext from runtime.distributed.process_group(), with
            `model` wrapped by its wrap(); the default SINGLE_PROCESS does nothing.
        extra_loss: optional `extra_loss() -> tensor`, added to each step's loss before backward (AdaLoRA's
            orthogonality term). The history's train_loss stays the model's own loss, comparable across methods.
        after_step: optional `after_step(step)`, called with step = 1, 2, ... after optimizer.step(), while the
            gradients are still there (AdaLoRA's rank allocation).

    Returns:
        a TrainResult: `history` (one dict per step), `val_curve`, `final_val_loss`, timings.

    Example: 30 steps on one repeated sentence; the loss falls from about ln(10) = 2.3 (a uniform guess
    over the 10 tokens) to below 1.

        >>> from minigpt import GPTConfig, MiniGPT
        >>> from minigpt.corpus import TokenStream
        >>> from tokenizer import WordTokenizer
        >>> sentences = ["the cat sits on the mat ."] * 8
        >>> tokenizer = WordTokenizer.from_corpus(sentences)
        >>> stream = TokenStream(sentences, tokenizer, context_length=8)
        >>> _ = torch.manual_seed(0)
        >>> model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, embed_dim=16,
        ...                           n_heads=2, n_layers=1))
        >>> config = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=5, eval_interval=10, progress=False)
        >>> result = train_model(model, stream, stream, config)
        >>> result.steps_done, [step for step, _ in result.val_curve]
        (30, [10, 20, 30])
        >>> result.history[0]["train_loss"] > 2.0 > 1.0 > result.final_val_loss
        True

    Raises:
        TrainingDiverged: at the first step whose loss is NaN or inf, or if the last step left NaN / inf
            weights or outputs; the caller saves nothing (a diverged model only produces NaN).
    """
    distributed.local_batch_size(config.batch_size)  # a clear error now if the ranks cannot share the batch
    optimizer = optimizer or make_optimizer(model, config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    evals_without_improvement = 0
    model.train()
    step_model = torch.compile(model) if config.compile == "forward" else model  # the same weights, compiled forward

    def training_step(x, y):  # one optimizer step on the batch (x, y); returns the loss, a tensor
        with autocast_context(config.device):
            _, loss = step_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        (loss + extra_loss() if extra_loss is not None else loss).backward()
        if config.grad_clip:  # None or 0: no clipping
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        # subtle: detached, so that no step's autograd graph outlives it (a CUDA graph's capture warns when the
        # gradient-accumulation nodes of an earlier, side-stream warm-up step are still alive)
        return loss.detach()

    if config.compile == "graph":  # the same step, replayed from a CUDA graph: one launch (minigpt/cuda_graph.py)
        check_graph_mode(optimizer, distributed, after_step)
        training_step = CUDAGraphStep(training_step, optimizer)
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=config.desc, disable=not (config.progress and distributed.is_main),
               leave=False)
    for step in bar:
        # subtle: every rank draws the whole global batch from the same seeded generator and keeps its own
        # slice, so N ranks see exactly the windows one process with batch_size would see
        x, y = train_stream.get_batch(config.batch_size, generator, device=config.device)  # (B, T), (B, T)
        x, y = distributed.shard(x), distributed.shard(y)  # (B / world_size, T) each; all B in one process
        loss = training_step(x, y)
        scheduler.step()
        if after_step is not None:
            after_step(step + 1)
        train_loss = distributed.mean(loss.item())  # the global batch's loss: the mean of the ranks' losses
        if not math.isfinite(train_loss):  # every rank sees the same mean, so every rank stops here
            raise diverged(config, optimizer, step + 1, "training loss", train_loss)
        record = {"step": step + 1, "lr": float(scheduler.get_last_lr()[0]), "train_loss": train_loss}
        last_step = step + 1 == config.steps
        if val_stream is not None and ((step + 1) % config.eval_interval == 0 or last_step):
            # every rank holds the same weights and sweeps the whole (small) val stream; rank 0's number
            # is shared so that early stopping stops every rank at the same step
            val_loss = evaluate(unwrap_model(model), val_stream, device=config.device)
            record["val_loss"] = distributed.from_main(val_loss)
            if not math.isfinite(record["val_loss"]):
                raise diverged(config, optimizer, step + 1, "validation loss", record["val_loss"])
            result.final_val_loss = record["val_loss"]
            if record["val_loss"] < result.best_val_loss - 1e-4:
                result.best_val_loss, evals_without_improvement = record["val_loss"], 0
            else:
                evals_without_improvement += 1
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{record['val_loss']:.3f}")
        result.history.append(record)
        result.steps_done = step + 1
        patience = config.early_stopping_patience
        if patience is not None and evals_without_improvement >= patience:
            result.stopped_early = True
            break
    bar.close()
    if isinstance(training_step, CUDAGraphStep):
        training_step.close()  # free the graph and the gradients in its memory
    model.eval()
    check_trained_model(model, trainable, x, y, result.history[-1], config, optimizer, distributed)
    result.wall_time_s = time.perf_counter() - start
    tokens = result.steps_done * config.batch_size * x.size(1)  # the global batch: all ranks together
    result.tokens_per_second = tokens / max(result.wall_time_s, 1e-9)
    return result
