"""Fine-tuning methods side by side: what each one trains, and what it costs.

Every method starts from the same expanded base model (new vocabulary rows included, see vocab.py),
trains with the same loop (`minigpt.training.train_model`), the same data, steps and seed. They
differ only in which parameters train:

    method        trains                                                 stores
    full          every parameter                                        the whole model
    layer_frozen  the last block, ln_f, tok_emb and lm_head (all rows)    the whole model
    lora          LoRA A, B on the targets (Hu et al., 2021) + new rows   adapter + new rows
    dora          LoRA + a magnitude per output row (Liu et al., 2024)    adapter + new rows
    qlora         LoRA on an NF4 4-bit frozen base (Dettmers et al., 2023) adapter + new rows

"new rows" are the tok_emb / lm_head rows of the words the base model did not know; they train in
every method (train_new_rows_only keeps the old rows bit-identical in the adapter methods).

An adapter folder (what `save_finetuned_adapter` writes and `load_finetuned_adapter` reads):

    lora_adapter/
      lora_config.json      the LoRAConfig (lora.save_adapter)
      lora_weights.pt       A [r, in], B [out, r] (and DoRA's magnitude [out]) per target
      embedding_weights.pt  the new rows of tok_emb and lm_head, and the base vocabulary size
      tokenizer.json        the expanded tokenizer (base vocabulary + new words)
"""

import copy
import dataclasses
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lora
from minigpt.atomic import atomic_directory
from minigpt.model import MiniGPT
from minigpt.predict import probability_of, top_next_words
from minigpt.distributed import SINGLE_PROCESS, DistributedContext
from minigpt.training import TrainConfig, train_model
from minigpt.vocab import (EMBEDDING_FILE, check_tokenizer_extends, count_new_row_parameters, load_new_rows,
                           new_rows_param_group, save_new_rows, train_new_rows_only, with_new_rows)

METHODS = ("full", "layer_frozen", "lora", "dora", "qlora")
ADAPTER_METHODS = ("lora", "dora", "qlora")


@dataclass
class MethodSetup:
    """A model ready to train with one method, and the optimizer groups that train it."""

    method: str
    model: MiniGPT  # the model to train (LoRA-wrapped and/or quantized for the adapter methods)
    param_groups: list  # for torch.optim.AdamW: only the trainable parameters
    trainable_params: int  # what actually changes (new rows only, for the adapter methods' embeddings)
    total_params: int  # every parameter of the model as it trains (a 4-bit weight counts in * out)


@dataclass
class MethodResult:
    """What one method did: the numbers of the comparison table."""

    method: str
    trainable_params: int
    total_params: int
    val_loss: float  # new-domain validation loss at the end
    base_accuracy_after: float  # base-fact probe accuracy after fine-tuning (forgetting)
    domain_accuracy_after: float  # new-domain probe accuracy after fine-tuning
    weight_bytes: int  # parameters + buffers held while training (4-bit codes for QLoRA)
    training_bytes: int = 0  # weight_bytes + gradients + AdamW's two moments of every trainable tensor
    disk_bytes: int = 0  # the saved folder (adapter or whole model)
    wall_time_s: float = 0.0  # the training loop only
    val_curve: list = field(default_factory=list)  # [(step, val_loss)]
    train_curve: list = field(default_factory=list)  # [(step, train_loss)]

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer: the weight memory a model holds."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights + one gradient + AdamW's exp_avg and exp_avg_sq per trainable tensor: what training holds
    besides activations. This is where LoRA saves memory: the frozen base needs no gradient or moments.

    Example:
        full fine-tuning of 130k float32 parameters: 4 x 130k x 4 bytes = 2.0 MB; LoRA on the same
        model: the 0.5 MB base + 3 x 4 bytes per adapter (and embedding) parameter.
    """
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    moments = sum(value.numel() * value.element_size() for state in optimizer.state.values()
                  for value in state.values() if torch.is_tensor(value) and value.dim() > 0)  # not "step"
    return weight_bytes(model) + gradients + moments


def folder_bytes(folder) -> int:
    """Total size of the files in a folder (what it costs on disk)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


@torch.no_grad()
def batched_probe_accuracy(model: MiniGPT, tokenizer, probes) -> float:
    """`minigpt.predict.probe_accuracy` in one forward pass: the same number, ~50x fewer model calls.

    Prompts are right-padded to one (P, T) batch; causal attention means a position never sees the
    padding after it, so the logits at each prompt's last real token are those of the prompt alone.

    Example:
        probes "the cat sits on the" -> table, "the dog says" -> woof: ids (2, 6) with the second padded
        after its 4 tokens; logits[0, 5] and logits[1, 3] are compared with the answers' ids.
    """
    if len(probes) == 0:
        raise ValueError("probe accuracy needs at least one probe")
    context = model.config.context_length
    prompts = [tokenizer.encode(probe.prompt, add_bos=True)[-context:] for probe in probes]
    lengths = torch.tensor([len(ids) for ids in prompts])  # (P,)
    idx = torch.full((len(prompts), int(lengths.max())), tokenizer.pad_id, dtype=torch.long)  # (P, T)
    for row, ids in enumerate(prompts):
        idx[row, :len(ids)] = torch.tensor(ids)
    answers = torch.tensor([tokenizer.token_to_id(probe.answer) if tokenizer.token_to_id(probe.answer) is not None
                            else -1 for probe in probes])  # (P,), -1 never matches
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, _ = model(idx.to(device))  # (P, T, V)
    model.train(was_training)
    last = logits[torch.arange(len(prompts)), (lengths - 1).to(device)]  # (P, V): each prompt's last real token
    hits = int((last.argmax(dim=-1).cpu() == answers).sum())
    return hits / len(probes)


def setup_method(method: str, expanded_model: MiniGPT, base_vocab_size: int, lora_config: lora.LoRAConfig,
                 lr: float, full_lr: float, weight_decay: float = 0.1, lora_plus_ratio: float = 1.0,
                 seed: int = 0, embedding_lr: float | None = None) -> MethodSetup:
    """A deep copy of `expanded_model` prepared for `method` (the input is never changed).

    Args:
        method: one of METHODS.
        expanded_model: the base model with its new vocabulary rows (vocab.expand_vocabulary).
        base_vocab_size: rows below this index are the base vocabulary.
        lora_config: the adapter for lora / dora / qlora. "dora" always uses DoRA; "lora" and "qlora" use
            it when lora_config.use_dora is set (finetune.py --dora), as plain LoRA otherwise.
        lr: learning rate of the adapter methods (A, B, magnitude, new rows).
        full_lr: learning rate of full fine-tuning and layer freezing.
        weight_decay: AdamW decay of the 2-D weights in full / layer_frozen (adapters use 0, as PEFT).
        lora_plus_ratio: LoRA+: B (and DoRA's magnitude) learn lora_plus_ratio times faster; 1 is plain LoRA.
        seed: seeds the adapter initialisation (A ~ kaiming uniform).
        embedding_lr: None (the default): tok_emb / lm_head train like the rest of each method, at
            full_lr with weight_decay in full / layer_frozen, at lr without decay in the adapter
            methods. A number: they train at that lr without decay in every method (the adapter
            methods train only their new rows), so the new words learn alike everywhere.

    Returns:
        MethodSetup with the model and its optimizer groups.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model = copy.deepcopy(expanded_model)
    torch.manual_seed(seed)
    if method in ("full", "layer_frozen"):
        for parameter in model.parameters():
            parameter.requires_grad_(method == "full")
        if method == "layer_frozen":
            for module in (model.blocks[-1], model.ln_f, model.tok_emb, model.lm_head):
                module.requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # Why the default (embedding_lr None) gives the new rows full_lr here but lr in the adapter methods:
        # each method trains everything it trains at its own learning rate, and at 1e-3 the new words learn
        # slowly (the "domain" column: 17% against LoRA's 100%; weight decay 0.1 changes nothing measurable
        # in 150 steps). One rate for the new rows everywhere is not a fairer default either: measured with
        # --embedding-lr (default run, seed 0), 5e-3 makes full fine-tuning 1.232 against LoRA's 1.500 (and forget more, 82%),
        # 1e-3 makes LoRA 1.794 against full's 1.411. finetune.py prints this note under its table.
        # subtle: AdamW groups hold whole tensors, so with embedding_lr the old rows share that treatment
        tables = {id(p) for p in (model.tok_emb.weight, model.lm_head.weight)} if embedding_lr else set()
        others = [p for p in trainable if id(p) not in tables]
        param_groups = [{"params": [p for p in others if p.dim() >= 2], "lr": full_lr, "weight_decay": weight_decay},
                        {"params": [p for p in others if p.dim() < 2], "lr": full_lr, "weight_decay": 0.0}]
        if embedding_lr:
            param_groups.append(new_rows_param_group(model, embedding_lr))
        total = sum(p.numel() for p in model.parameters())
        return MethodSetup(method, model, param_groups, sum(p.numel() for p in trainable), total)

    if method == "qlora":
        from quant import quantize_model
        quantize_model(model)  # every Linear but lm_head -> frozen NF4 (QLoRA section 3)
    # subtle: keep the caller's use_dora (finetune.py --dora); "dora" turns it on, it never turns it off
    config = dataclasses.replace(lora_config, use_dora=lora_config.use_dora or method == "dora")
    lora.apply_lora(model, config)  # freezes everything, adds A, B (B = 0: the start is the base model)
    # subtle: groups first, while only the adapter trains; then the new rows get their own group
    param_groups = lora.lora_plus_param_groups(model, lr=lr, ratio=lora_plus_ratio, weight_decay=0.0)
    adapter_params = sum(p.numel() for group in param_groups for p in group["params"])
    train_new_rows_only(model, base_vocab_size)
    param_groups.append(new_rows_param_group(model, embedding_lr or lr))
    _, total = lora.count_parameters(model)
    trainable = adapter_params + count_new_row_parameters(model, base_vocab_size)
    return MethodSetup(method, model, param_groups, trainable, total)


def train_method(setup: MethodSetup, train_stream, val_stream, train_config: TrainConfig, tokenizer,
                 base_probes, domain_probes, distributed: DistributedContext = SINGLE_PROCESS) -> MethodResult:
    """Train `setup.model` with the shared loop and measure it (val loss, probe accuracy, memory, time).

    Under torchrun (`distributed` from minigpt.distributed.process_group) the model trains wrapped in
    DistributedDataParallel, which all-reduces only the trainable parameters (adapters, new rows).
    """
    optimizer = torch.optim.AdamW([group for group in setup.param_groups if group["params"]],
                                  lr=train_config.lr, betas=(0.9, 0.95))
    result = train_model(distributed.wrap(setup.model), train_stream, val_stream, train_config, optimizer=optimizer,
                         distributed=distributed)
    setup.model.cpu().eval()
    def accuracy(probes) -> float:  # NaN when there are no probes (a user's own --data has none)
        return batched_probe_accuracy(setup.model, tokenizer, probes) if probes else float("nan")

    return MethodResult(
        method=setup.method, trainable_params=setup.trainable_params, total_params=setup.total_params,
        val_loss=result.final_val_loss, base_accuracy_after=accuracy(base_probes),
        domain_accuracy_after=accuracy(domain_probes),
        weight_bytes=weight_bytes(setup.model), training_bytes=training_state_bytes(setup.model, optimizer),
        wall_time_s=result.wall_time_s,
        val_curve=result.val_curve, train_curve=result.train_curve)


# ---- adapter folders ------------------------------------------------------------------------------------

def save_finetuned_adapter(model: torch.nn.Module, tokenizer, base_vocab_size: int, out_dir) -> Path:
    """Write an adapter folder (lora files + new embedding rows + tokenizer), atomically."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        lora.save_adapter(model, tmp)  # lora_config.json + lora_weights.pt
        save_new_rows(model, base_vocab_size, tmp / EMBEDDING_FILE)
        tokenizer.save(tmp / "tokenizer.json")
    return out_dir


def load_finetuned_adapter(base_model: MiniGPT, base_tokenizer, adapter_dir, quantize_base: bool = False):
    """Rebuild a fine-tuned model from its base and an adapter folder; returns (model, tokenizer).

    Checks, before anything is built, that the adapter's tokenizer extends the base tokenizer and that
    its embedding rows and LoRA tensors fit the base model; each mismatch is a ValueError naming it.

    Args:
        base_model, base_tokenizer: the base, as `load_model(base_dir)` returns them (not modified).
        adapter_dir: a folder written by `save_finetuned_adapter`.
        quantize_base: quantize the base to NF4 first, as a QLoRA adapter was trained (exact QLoRA
            logits); False puts the adapter on the full-precision base (close, and faster).
    """
    from tokenizer import load_tokenizer

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} does not exist; finetune.py writes one, "
                                f"e.g. dist/finetuning_results/lora_adapter")
    tokenizer_path = adapter_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} not found: an adapter folder holds lora_config.json, "
                                f"lora_weights.pt, {EMBEDDING_FILE} and tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_path)
    check_tokenizer_extends(base_tokenizer, tokenizer, str(adapter_dir))
    new_rows = load_new_rows(adapter_dir / EMBEDDING_FILE, base_model)
    if base_model.config.vocab_size + new_rows["tok_emb.weight"].size(0) != tokenizer.vocab_size:
        raise ValueError(f"{adapter_dir}: {EMBEDDING_FILE} adds {new_rows['tok_emb.weight'].size(0)} rows to "
                         f"{base_model.config.vocab_size}, but tokenizer.json has {tokenizer.vocab_size} tokens")
    model = with_new_rows(base_model, new_rows)
    if quantize_base:
        from quant import quantize_model
        quantize_model(model)
    lora.load_adapter(model, adapter_dir)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval(), tokenizer


def merged_copy(model: torch.nn.Module) -> MiniGPT:
    """A plain MiniGPT with the active adapter folded into the weights (W' = W + s B A); `model` is kept."""
    return lora.merge_and_unload(copy.deepcopy(model)).eval()


@torch.no_grad()
def max_logit_difference(model_a: torch.nn.Module, model_b: torch.nn.Module, stream, batch_size: int = 64) -> float:
    """Largest |logit_a - logit_b| over one sweep of `stream` (e.g. merged vs base + adapter)."""
    worst = 0.0
    for x, _ in stream.iter_windows(batch_size):
        logits_a, _ = model_a(x)  # (B, T, V)
        logits_b, _ = model_b(x)  # (B, T, V)
        worst = max(worst, float((logits_a - logits_b).abs().max()))
    return worst


# ---- what a person wants to see -------------------------------------------------------------------------

def format_top_words(predictions: list[tuple[str, float]]) -> str:
    """[("oven", 0.91), ("pot", 0.05)] -> "oven 91% | pot 5%"."""
    return " | ".join(f"{word} {probability:.0%}" for word, probability in predictions)


def prediction_table(models: dict, tokenizer, prompts: list[str], k: int = 3) -> str:
    """A text table: one row per prompt, one column per model, the top-k next words with probabilities."""
    lines = []
    width = max((len(name) for name in models), default=0)  # "layer_frozen" is 12 characters
    for prompt in prompts:
        lines.append(f'"{prompt} ..."')
        for name, (model, model_tokenizer) in models.items():
            lines.append(f"    {name:<{width}}  {format_top_words(top_next_words(model, model_tokenizer, prompt, k))}")
    return "\n".join(lines)


def comparison_table(results: list[MethodResult], base_accuracy: float, notes=()) -> str:
    """The methods table: trainable parameters, val loss, forgetting, bytes on disk and in memory, time.

    `notes` are printed under the table, each wrapped to its width (finetune.py: replay, learning rates).
    """
    header = (f"{'method':<13}{'trainable':>10}{'%':>8}{'val loss':>10}{'base facts':>18}{'domain':>8}"
              f"{'disk':>11}{'weights':>11}{'+grad+adam':>12}{'time':>8}")
    lines = [header, "-" * len(header)]
    for result in results:
        facts = f"{base_accuracy:.0%}->{result.base_accuracy_after:.0%}"
        lines.append(f"{result.method:<13}{result.trainable_params:>10,}{result.trainable_percent:>7.2f}%"
                     f"{result.val_loss:>10.3f}{facts:>18}{result.domain_accuracy_after:>8.0%}"
                     f"{_kilobytes(result.disk_bytes):>11}{_kilobytes(result.weight_bytes):>11}"
                     f"{_kilobytes(result.training_bytes):>12}{result.wall_time_s:>7.1f}s")
    legend = ("base facts: probe accuracy before->after (forgetting); domain: new-domain probe accuracy; "
              "disk: saved folder; weights: parameters + buffers while training (NF4 codes for qlora); "
              "+grad+adam: weights plus gradients and AdamW moments; time: the training loop")
    for note in (legend, *notes):
        lines += textwrap.wrap(note, width=len(header), subsequent_indent="  ")
    return "\n".join(lines)


def _kilobytes(size: int) -> str:
    return f"{size / 1024:,.1f} KB"


METHOD_COLORS = {"full": "#444444", "layer_frozen": "#a6761d", "lora": "#1f77b4", "dora": "#2ca02c",
                 "qlora": "#ff7f0e"}  # one colour per method in every panel


def plot_comparison(results: list[MethodResult], base_accuracy: float, path) -> Path:
    """Save the comparison as a 2 x 2 PNG that reads at a glance, every number written next to its mark:

        validation loss during training     | final validation loss (and % vs full)
        base facts before -> after           | costs: trainable parameters, saved folder, training memory

    Loss and accuracy panels are dot plots on an axis zoomed to the data (differences of a few percent
    stay visible, and no bar length pretends to start at 0); the cost panels are bars on linear axes
    from 0, so a bar 10x shorter is 10x cheaper.
    """
    import matplotlib
    matplotlib.use("Agg")  # subtle: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    names = [result.method for result in results]
    colors = [METHOD_COLORS.get(name, "tab:gray") for name in names]
    rows = list(range(len(results)))[::-1]  # first method at the top of the dot plots
    full = next((result for result in results if result.method == "full"), None)

    fig = plt.figure(figsize=(14, 9.5))
    grid = fig.add_gridspec(2, 2, hspace=0.38, wspace=0.28)
    curves, final_loss, facts = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 0])
    cost_axes = grid[1, 1].subgridspec(1, 3, wspace=0.08).subplots(sharey=True)

    # 1. validation loss during training, zoomed to where the methods separate
    steps = max((step for result in results for step, _ in result.val_curve), default=1)
    late = [loss for result in results for step, loss in result.val_curve if step >= 0.25 * steps]
    for result, color in zip(results, colors):
        if result.val_curve:
            curves.plot(*zip(*result.val_curve), "-", color=color, linewidth=1.6, label=result.method)
    if late:
        low, high = min(late), max(late)
        pad = 0.05 * (high - low) or 0.05
        curves.set_ylim(low - pad, high + pad)
        _end_labels(curves, [(result.val_curve[-1], result.method, color)
                             for result, color in zip(results, colors) if result.val_curve], (low - pad, high + pad))
    earliest = max(loss for result in results for _, loss in result.val_curve[:1]) if late else float("nan")
    curves.set(title="new-domain validation loss during training", ylabel="loss (nats/token)",
               xlabel=f"step   (y zoomed: the first evaluations, up to {earliest:.1f}, are above the top)",
               xlim=(0, steps * 1.22))
    curves.grid(alpha=0.3)

    # 2. final validation loss, one dot per method, with the difference to full fine-tuning
    losses = [result.val_loss for result in results]
    final_loss.scatter(losses, rows, color=colors, s=70, zorder=3)
    for loss, row in zip(losses, rows):
        versus = f"  ({100 * (loss / full.val_loss - 1):+.1f}% vs full)" if full and loss != full.val_loss else ""
        final_loss.annotate(f"{loss:.3f}{versus}", (loss, row), xytext=(8, 0), textcoords="offset points",
                            va="center", fontsize=9)
    _zoomed_x(final_loss, losses, right_room=0.9)
    final_loss.set(title="new-domain validation loss at the end (lower is better)", xlabel="loss (nats/token)")
    _method_rows(final_loss, names, rows)

    # 3. base facts: before -> after, the forgetting
    if math.isnan(base_accuracy):
        facts.text(0.5, 0.5, "no base-fact probes for this base model", ha="center", va="center",
                   transform=facts.transAxes)
        facts.set(title="base-fact probes", xticks=[], yticks=[])
    else:
        afters = [100 * result.base_accuracy_after for result in results]
        before = 100 * base_accuracy
        for after, row, color in zip(afters, rows, colors):
            facts.annotate("", (after, row), (before, row), arrowprops=dict(arrowstyle="->", color=color, lw=1.8))
            facts.scatter([after], [row], color=color, s=70, zorder=3)
            facts.annotate(f"{before:.0f}% -> {after:.0f}%", (min(after, before), row), xytext=(-8, 0),
                           textcoords="offset points", ha="right", va="center", fontsize=9)
        facts.scatter([before] * len(rows), rows, color="white", edgecolor="black", s=50, zorder=3)
        facts.axvline(0.95 * before, color="gray", linestyle=":", linewidth=1)
        facts.text(0.95 * before, rows[0] + 0.55, " 95% of the base", color="gray", fontsize=8, va="center")
        _zoomed_x(facts, afters + [before], left_room=0.9, right_room=0.1)
        facts.set(title="base facts kept: probe accuracy before -> after (forgetting)",
                  xlabel="% of the base-fact probes answered right   (open: the base model, filled: after)")
        _method_rows(facts, names, rows)
        facts.set_ylim(-0.6, len(rows) - 0.2)

    # 4. what each method costs, on linear axes from 0
    costs = [("trainable\nparameters", [result.trainable_params for result in results], lambda v: f"{v:,.0f}"),
             ("saved folder\n(KB)", [result.disk_bytes / 1024 for result in results], lambda v: f"{v:,.0f}"),
             ("training memory (KB)\nweights+grads+AdamW", [result.training_bytes / 1024 for result in results],
              lambda v: f"{v:,.0f}")]
    for axis, (title, values, text) in zip(cost_axes, costs):
        axis.barh(rows, values, color=colors, height=0.6)
        largest = max(values) or 1
        for value, row in zip(values, rows):
            inside = value > 0.55 * largest
            axis.text(value * (0.97 if inside else 1.0) + (0 if inside else 0.03 * largest), row, text(value),
                      ha="right" if inside else "left", va="center", fontsize=8,
                      color="white" if inside else "black")
        axis.set_xlim(0, largest * 1.05)
        axis.set_title(title, fontsize=9)
        axis.tick_params(axis="x", labelsize=7)
        axis.xaxis.set_major_formatter(lambda value, _: f"{value / 1000:g}k" if value >= 1000 else f"{value:g}")
        axis.locator_params(axis="x", nbins=3)
        axis.grid(axis="x", alpha=0.3)
    _method_rows(cost_axes[0], names, rows)
    middle = cost_axes[1].get_position()
    fig.text((middle.x0 + middle.x1) / 2, middle.y1 + 0.055, "what each method costs (linear axes from 0)",
             ha="center", fontsize=12)

    fig.suptitle("Fine-tuning methods side by side: same data, steps and seed", fontsize=13)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _method_rows(axis, names, rows) -> None:
    """One labelled row per method on a horizontal dot or bar plot."""
    axis.set_yticks(rows, names)
    axis.set_ylim(-0.6, len(rows) - 0.4)
    axis.grid(axis="x", alpha=0.3)


def _zoomed_x(axis, values, left_room: float = 0.3, right_room: float = 0.3) -> None:
    """x limits around the data: a few percent apart stays visible (dot plots only; bars start at 0)."""
    low, high = min(values), max(values)
    span = (high - low) or max(abs(high) * 0.02, 1e-3)
    axis.set_xlim(low - left_room * span - 0.05 * span, high + right_room * span + 0.05 * span)


def _end_labels(axis, ends, y_range) -> None:
    """Write each curve's method and last value at its right end, nudged apart so that none overlap."""
    low, high = y_range
    gap = 0.055 * (high - low)
    placed = []
    for (step, loss), name, color in sorted(ends, key=lambda end: end[0][1]):
        y = max(loss, placed[-1] + gap) if placed else loss
        placed.append(y)
        axis.annotate(f"{name} {loss:.3f}", (step, loss), xytext=(step * 1.02, y), textcoords="data",
                      va="center", fontsize=8, color=color)


# ---- fact correction ------------------------------------------------------------------------------------

@dataclass
class EditReport:
    """Efficacy and locality of one fact-correction run."""

    variant: str
    trainable_params: int
    edited: list  # (prompt, new_answer, p_new before, p_new after, top-1 after)
    locality: list  # (prompt, answer, top-1 before, top-1 after)

    @property
    def efficacy(self) -> float:
        """Fraction of edited facts whose top-1 is now the new answer."""
        return sum(top == new for _, new, _, _, top in self.edited) / len(self.edited)

    @property
    def locality_kept(self) -> float:
        """Fraction of related, unedited facts whose top-1 did not change."""
        return sum(before == after for _, _, before, after in self.locality) / len(self.locality)


def edit_report(variant: str, trainable_params: int, base_model, edited_model, tokenizer, edit_set) -> EditReport:
    """Measure an edit: p(new answer) before/after for edited probes, top-1 before/after for locality probes."""
    edited = []
    for probe in edit_set.edited_probes:
        before = probability_of(base_model, tokenizer, probe.prompt, probe.new_answer)
        after = probability_of(edited_model, tokenizer, probe.prompt, probe.new_answer)
        top = top_next_words(edited_model, tokenizer, probe.prompt, k=1)[0][0]
        edited.append((probe.prompt, probe.new_answer, before, after, top))
    locality = []
    for probe in edit_set.locality_probes:
        before = top_next_words(base_model, tokenizer, probe.prompt, k=1)[0][0]
        after = top_next_words(edited_model, tokenizer, probe.prompt, k=1)[0][0]
        locality.append((probe.prompt, probe.answer, before, after))
    return EditReport(variant, trainable_params, edited, locality)


def edit_table(reports: list[EditReport]) -> str:
    """Efficacy per edited fact and locality per related fact, one column per variant."""
    lines = [f"{'edited fact':<34}{'new':>8}{'p before':>10}" + "".join(f"{r.variant:>24}" for r in reports)]
    for index, (prompt, new, before, _, _) in enumerate(reports[0].edited):
        cells = "".join(f"{f'{r.edited[index][3]:.0%} (top: {r.edited[index][4]})':>24}" for r in reports)
        lines.append(f"{prompt:<34}{new:>8}{before:>10.0%}{cells}")
    lines.append("")
    lines.append(f"{'locality fact':<34}{'answer':>8}{'base':>10}" + "".join(f"{r.variant:>24}" for r in reports))
    for index, (prompt, answer, before, _) in enumerate(reports[0].locality):
        cells = "".join(f"{r.locality[index][3]:>24}" for r in reports)
        lines.append(f"{prompt:<34}{answer:>8}{before:>10}{cells}")
    lines.append("")
    for report in reports:
        lines.append(f"{report.variant}: efficacy {report.efficacy:.0%}, locality kept {report.locality_kept:.0%}, "
                     f"{report.trainable_params:,} trainable parameters")
    return "\n".join(lines)
