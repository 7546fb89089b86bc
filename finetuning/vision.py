"""`python finetune.py --task vision`: the four LoRA strategies for a vision-language model, side by side.

    python finetune.py --task vision                           # about a minute on one CPU thread
    python finetune.py --task vision --rank 8 --encoder-rank 4 # rank per component (decoder, encoder)
    python finetune.py --task vision --rank-sweep              # also: every (decoder, encoder) rank pair

    dist/vision_base/  (pretrained first if missing)      MiniVLM on the base domain: filled shapes on black
        │  fine-tune on the new domain (outlined shapes on noisy grey), same data, steps and seed:
        ├── decoder       LoRA on the language decoder's projections  (decoder.blocks.*)
        ├── encoder       LoRA on the vision encoder: patch_embed (a Conv2d) and its blocks' projections
        ├── both          the two together, the encoder at --encoder-rank
        ├── cross         LoRA on the gated cross-attention blocks (cross_blocks.*), their tanh gates trained
        └── full          every weight (the reference)
    dist/vision_results/
        results.json  comparison.png  {decoder,encoder,both,cross}_adapter/ (lora.save_adapter)  full_finetuned/

Measured for each: trainable parameters, caption loss on new-domain validation images, content-word
accuracy (size, colour, shape) on the new domain's held-out-combination probes, the same accuracy kept
on the base domain's probes, the adapter's size on disk, and the training time.
"""

import dataclasses
import json
import time
from pathlib import Path

import torch

import lora
from finetuning.methods import folder_bytes
from runtime.atomic import atomic_directory, check_output_dir
from runtime.threads import use_threads
from vision.checkpoint import load_vlm, save_vlm
from vision.config import VLMConfig
from vision.model import MiniVLM
from vision.shapes import make_split
from vision.training import (caption_loss, caption_tokenizer, content_accuracy, encode_captions, left_object_labels,
                             train_loop, train_vlm)

DEFAULT_VISION_BASE = "dist/vision_base"
RESULT_KIND = "vision-results"
MAX_CAPTION_TOKENS = 12  # "<bos> a small red circle left of a big blue square" is 11
LAYER = r"blocks\.\d+\.(attn\.[qkvo]_proj|mlp\.(up|down)_proj)"  # the six projections of every block
STRATEGY_TARGETS = {  # regexes matched against the whole module name (PEFT's rule for a string target)
    "decoder": rf"decoder\.{LAYER}",
    "encoder": rf"encoder\.(patch_embed|{LAYER})",
    "both": rf"(decoder\.{LAYER}|encoder\.(patch_embed|{LAYER}))",
    "cross": rf"cross_{LAYER}",
}
STRATEGIES = (*STRATEGY_TARGETS, "full")
ENCODER_KEY = r"encoder\..*"  # rank_pattern / alpha_pattern key: every encoder layer


@dataclasses.dataclass(frozen=True)
class VisionSizes:
    """How much data and training; the defaults fit the two-minute budget on one CPU thread."""
    n_base_train: int = 512  # base-domain captioned images
    n_new_train: int = 256  # new-domain images for fine-tuning
    n_eval: int = 128  # images in each validation / probe set
    vit_steps: int = 100  # MiniViT classification pretraining (the encoder's warm start)
    base_steps: int = 400  # MiniVLM captioning pretraining on the base domain
    finetune_steps: int = 150  # per strategy, unless --steps
    batch_size: int = 32


def pretrain_base(seed: int = 0, sizes: VisionSizes = VisionSizes(), say=print) -> tuple[MiniVLM, object]:
    """MiniViT on the base images (classify the left object's colour and shape), then the whole MiniVLM on
    base captions; returns (model, tokenizer)."""
    tokenizer = caption_tokenizer()
    split = make_split("base", sizes.n_base_train, sizes.n_eval, sizes.n_eval, seed=seed)
    torch.manual_seed(seed)
    model = MiniVLM(VLMConfig(vocab_size=tokenizer.vocab_size, max_caption_tokens=MAX_CAPTION_TOKENS))
    vit, labels = model.encoder, left_object_labels(split.train.captions)
    losses = train_loop(lambda batch: vit(split.train.images[batch], labels[batch])[1], vit.parameters(),
                        sizes.vit_steps, 3e-3, len(labels), sizes.batch_size, seed)
    say(f"MiniViT pretraining: classification loss {losses[0]:.2f} -> {losses[-1]:.2f} in {sizes.vit_steps} steps")
    inputs, targets = encode_captions(tokenizer, split.train.captions, MAX_CAPTION_TOKENS)
    losses = train_vlm(model, split.train.images, inputs, targets, sizes.base_steps, 3e-3, sizes.batch_size, seed)
    say(f"MiniVLM pretraining: caption loss {losses[0]:.2f} -> {losses[-1]:.2f} in {sizes.base_steps} steps")
    return model, tokenizer


def lora_config_for(strategy: str, rank: int, encoder_rank: int, alpha: float) -> lora.LoRAConfig:
    """The strategy's LoRAConfig; the encoder's layers get `encoder_rank`, alpha scaled so alpha / r is the same."""
    patterns = {}
    if strategy in ("encoder", "both"):
        patterns = {"rank_pattern": {ENCODER_KEY: encoder_rank},
                    "alpha_pattern": {ENCODER_KEY: alpha * encoder_rank / rank}}
    return lora.LoRAConfig(r=rank, alpha=alpha, target_modules=STRATEGY_TARGETS[strategy], **patterns)


def prepare(strategy: str, base: MiniVLM, rank: int, encoder_rank: int, alpha: float) -> MiniVLM:
    """A copy of `base` set up for `strategy`: adapters in place and only they trainable (full: everything)."""
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    if strategy == "full":
        return model
    model = lora.apply_lora(model, lora_config_for(strategy, rank, encoder_rank, alpha))
    if strategy == "cross":  # subtle: with tanh(gate) ~ 0 the block's output, and the adapters' gradient, is ~0
        for name, parameter in model.named_parameters():
            if name.endswith("_gate"):
                parameter.requires_grad_(True)
    return model


def evaluate(model, sets: dict) -> dict:
    """{name: (loss, accuracy)} over `sets` = {name: (images, inputs, targets)}."""
    return {name: (caption_loss(model, *tensors), content_accuracy(model, *tensors)) for name, tensors in sets.items()}


def run_vision(config, sizes: VisionSizes = VisionSizes()) -> dict:
    """The experiment for a FinetuneConfig with task "vision" (only the options it reads: see check)."""
    start = time.perf_counter()
    out_dir = Path(config.out or "dist/vision_results")
    check_output_dir(out_dir, RESULT_KIND)  # a foreign folder: refused before any work
    threads = use_threads(config.threads, 64)
    print(threads.describe())
    encoder_rank = config.encoder_rank or max(1, config.rank // 2)
    base_dir = Path(DEFAULT_VISION_BASE if config.base == "dist/base_model" else config.base)
    if base_dir == Path(DEFAULT_VISION_BASE) and not base_dir.exists():
        print(f"no vision base at {base_dir}/: pretraining one first")
        save_vlm(*pretrain_base(config.seed, sizes), base_dir)
    base, tokenizer = load_vlm(base_dir)
    base_time = time.perf_counter() - start

    def tensors(caption_set):
        return (caption_set.images, *encode_captions(tokenizer, caption_set.captions, base.config.max_caption_tokens))

    base_split = make_split("base", sizes.n_base_train, sizes.n_eval, sizes.n_eval, seed=config.seed)
    new_split = make_split("new", sizes.n_new_train, sizes.n_eval, sizes.n_eval, seed=config.seed)
    sets = {"new_val": tensors(new_split.val), "new_probe": tensors(new_split.probe),
            "base_probe": tensors(base_split.probe)}
    # replay ("rehearsal"): --replay base-domain training images per new-domain image, as the text task does;
    # without them every strategy forgets a third of the base domain (--replay 0 shows it)
    n_replay = min(round(config.replay * sizes.n_new_train), sizes.n_base_train)
    replayed = torch.randperm(sizes.n_base_train, generator=torch.Generator().manual_seed(config.seed))[:n_replay]
    new_tensors, base_tensors = tensors(new_split.train), tensors(base_split.train)
    train_images, train_inputs, train_targets = (torch.cat([new, old[replayed]])
                                                 for new, old in zip(new_tensors, base_tensors))
    steps = config.steps or sizes.finetune_steps
    before = evaluate(base, sets)
    print(f"base model: new-domain loss {before['new_val'][0]:.3f}, new-domain probes {before['new_probe'][1]:.0%}, "
          f"base-domain probes {before['base_probe'][1]:.0%}")
    runs = [(strategy, config.rank, encoder_rank) for strategy in STRATEGIES]
    if config.rank_sweep:
        runs += [("both", rank, enc) for rank in (4, 16) for enc in (2, 4, 16) if (rank, enc) != (config.rank, encoder_rank)]
    results, trained = [], {}
    for strategy, rank, enc in runs:
        torch.manual_seed(config.seed)
        model = prepare(strategy, base, rank, enc, config.alpha)
        trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        lr = config.full_lr if strategy == "full" else config.lr
        tic = time.perf_counter()
        train_vlm(model, train_images, train_inputs, train_targets, steps, lr, sizes.batch_size, config.seed)
        seconds = time.perf_counter() - tic
        after = evaluate(model, sets)
        name = strategy if (rank, enc) == (config.rank, encoder_rank) else f"both r{rank}/enc{enc}"
        results.append({"strategy": name, "rank": None if strategy == "full" else rank,
                        "encoder_rank": enc if strategy in ("encoder", "both") else None,
                        "trainable_params": trainable, "new_loss": after["new_val"][0],
                        "new_probe_accuracy": after["new_probe"][1], "base_probe_accuracy": after["base_probe"][1],
                        "base_kept": after["base_probe"][1] / max(before["base_probe"][1], 1e-9),
                        "train_time_s": seconds})
        trained[name] = model
        print(f"{name:<18} trainable {trainable:>7,}  new loss {after['new_val'][0]:.3f}  new probes "
              f"{after['new_probe'][1]:.0%}  base probes {after['base_probe'][1]:.0%}  {seconds:.1f} s")
    with atomic_directory(out_dir, kind=RESULT_KIND) as tmp:
        for result in results:
            model, folder = trained[result["strategy"]], tmp / folder_name(result["strategy"])
            if result["strategy"] == "full":
                save_vlm(model, tokenizer, folder)
            else:
                lora.save_adapter(model, folder)
            result["disk_bytes"] = folder_bytes(folder)
        full = next(result for result in results if result["strategy"] == "full")
        for result in results:
            result["loss_vs_full"] = result["new_loss"] / full["new_loss"] - 1  # +0.05: 5% above full's loss
        table = results_table(results, before)
        summary = {"base": str(base_dir), "steps": steps, "replayed_base_images": n_replay, "rank": config.rank, "encoder_rank": encoder_rank,
                   "alpha": config.alpha, "lr": config.lr, "full_lr": config.full_lr, "seed": config.seed,
                   "base_model": {"new_loss": before["new_val"][0], "new_probe_accuracy": before["new_probe"][1],
                                  "base_probe_accuracy": before["base_probe"][1]},
                   "results": results, "base_time_s": base_time, "table": table}
        if config.plot:
            plot_strategies(results, before, tmp / "comparison.png")
        summary["wall_time_s"] = time.perf_counter() - start
        (tmp / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table + f"\n\nwrote {out_dir}/ in {summary['wall_time_s']:.1f} s")
    return {"out_dir": str(out_dir), **summary}


def folder_name(strategy: str) -> str:
    return "full_finetuned" if strategy == "full" else strategy.replace(" ", "_").replace("/", "_") + "_adapter"


def results_table(results: list[dict], before: dict) -> str:
    header = f"{'strategy':<18}{'trainable':>10}{'new loss':>10}{'vs full':>9}{'new probes':>12}{'base probes':>13}{'disk':>11}{'time':>8}"
    lines = [header, "-" * len(header),
             f"{'(base model)':<18}{'':>10}{before['new_val'][0]:>10.3f}{'':>9}{before['new_probe'][1]:>12.0%}"
             f"{before['base_probe'][1]:>13.0%}"]
    for result in results:
        lines.append(f"{result['strategy']:<18}{result['trainable_params']:>10,}{result['new_loss']:>10.3f}"
                     f"{result['loss_vs_full']:>+9.0%}{result['new_probe_accuracy']:>12.0%}"
                     f"{result['base_probe_accuracy']:>13.0%}{result['disk_bytes'] / 1024:>8.1f} KB"
                     f"{result['train_time_s']:>7.1f}s")
    lines.append("new loss: caption loss on new-domain validation images; new / base probes: size, colour and shape "
                 "words right on held-out (colour, shape) combinations of each domain")
    return "\n".join(lines)


def plot_strategies(results: list[dict], before: dict, path: Path) -> None:
    """comparison.png: one panel per measure, a bar per strategy with its value, axes from 0, the base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [result["strategy"] for result in results]
    panels = [("new-domain caption loss (nats/token)", "new_loss", before["new_val"][0], "{:.3f}"),
              ("new-domain probes right (held-out pairs)", "new_probe_accuracy", before["new_probe"][1], "{:.0%}"),
              ("base-domain probes right (held-out pairs)", "base_probe_accuracy", before["base_probe"][1], "{:.0%}"),
              ("trainable parameters", "trainable_params", None, "{:,}")]
    colors = ["#444444" if name == "full" else "#1f77b4" for name in names]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), constrained_layout=True)
    for axis, (title, key, reference, label) in zip(axes, panels):
        values = [result[key] for result in results]
        bars = axis.barh(names, values, color=colors)
        axis.bar_label(bars, labels=[label.format(value) for value in values], padding=2, fontsize=7)
        if reference is not None:
            axis.axvline(reference, color="#d62728", linestyle="--", label="base model", zorder=0)
            axis.legend(fontsize=7, loc="lower right")
        if "probe" in key:  # accuracies: the whole 0-100% scale, so a probe more or less looks its size
            axis.set_xlim(0, 1.15)
            axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:.0%}"))
        else:
            axis.set_xlim(0, max(values + ([reference] if reference else [])) * 1.3)
        if key == "trainable_params":
            axis.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value / 1000:.0f}k"))
        axis.set_title(title, fontsize=9)
        axis.invert_yaxis()
    figure.savefig(path, dpi=100)
    plt.close(figure)
