"""What a person wants to see after fine-tuning: the methods table, the comparison figure, top next words.

    comparison_table(results, base_accuracy)   -> the printed table (one row per method)
    plot_comparison(results, base_accuracy, p) -> comparison.png, four panels
    prediction_table(models, tokenizer, prompts) -> the top-k next words of each model, side by side
"""

import math
import textwrap
from pathlib import Path

from finetuning.methods import MethodResult
from minigpt.predict import top_next_words


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

    Loss panels are dot plots on an axis zoomed to the data (differences of a few percent stay
    visible, and no bar length pretends to start at 0); the base-fact panel runs from 0 to 100%, so
    losing one probe of 82 looks as small as it is; the cost panels are bars on linear axes from 0,
    so a bar 10x shorter is 10x cheaper.
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
        facts.set_xlim(-28, 104)  # from 0 to 100%, with room on the left for the labels
        facts.set_xticks(range(0, 101, 20))
        facts.set(title="base facts kept: probe accuracy before -> after (forgetting)",
                  xlabel="% of the base-fact probes (training-sentence prefixes: recall) answered right\n"
                         "open: the base model, filled: after")
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
