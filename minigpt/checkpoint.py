"""Save and load a MiniGPT checkpoint folder: config.json + model.pt + tokenizer.json.

    dist/base_model/
      config.json      GPTConfig fields and a format version: enough to rebuild the model
      model.pt         the state_dict (tensors only; loaded with weights_only=True, so no pickled code runs)
      tokenizer.json   the tokenizer that produced the token ids the model was trained on

Saving is atomic (see runtime/atomic.py): an interrupted save leaves the previous folder intact.

Loading treats the folder as untrusted (it may be a download): config.json is read with bounded size
and nesting, model.pt is opened memory-mapped (only the tensors' headers are read), and every name,
shape and dtype the config implies is compared with those headers before the model is built. A
230-byte config.json claiming embed_dim=10**9 is refused at once, without allocating anything.
"""

import dataclasses
import json
import typing
from pathlib import Path

import torch


from minigpt.config import GPTConfig
from minigpt.model import MiniGPT
from tokenizer import load_tokenizer
from runtime.atomic import atomic_directory
from runtime.files import read_json_file

FORMAT_VERSION = 1
CHECKPOINT_FILES = ("config.json", "model.pt", "tokenizer.json")


def save_model(model: MiniGPT, tokenizer, out_dir) -> Path:
    """Write model and tokenizer to `out_dir` atomically; returns the folder's path.

    An existing `out_dir` is replaced only if it is a previous checkpoint (its marker, the hidden
    .minilora-output.json, says so; or, written before markers existed, it holds exactly CHECKPOINT_FILES);
    any other folder is a ValueError and stays as it was.

    Example:
        >>> import tempfile
        >>> from tokenizer import WordTokenizer
        >>> tokenizer = WordTokenizer.from_corpus(["the cat sits on the mat ."])
        >>> model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, n_heads=2, n_layers=1))
        >>> with tempfile.TemporaryDirectory() as parent:
        ...     folder = save_model(model, tokenizer, Path(parent) / "tiny_model")
        ...     folder.name, sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))
        ('tiny_model', ['config.json', 'model.pt', 'tokenizer.json'])
    """
    wrapped = [name for name, module in model.named_modules()
               if type(module).__name__ in ("Linear4bit", "LoRALinear", "LoRAEmbedding", "ModulesToSaveWrapper")]
    if wrapped:  # load_model builds a plain MiniGPT: these layers' state would not fit it
        kind = type(model.get_submodule(wrapped[0])).__name__
        raise ValueError(f"save_model writes a plain MiniGPT, but {wrapped[0]} is a {kind} "
                         f"({len(wrapped)} such layers); call lora.merge_and_unload(model) (adapters) or "
                         f"quant.dequantize_model(model) (4-bit layers) first, or lora.save_adapter for the adapter alone")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model has {model.config.vocab_size} token rows but the tokenizer has "
                         f"{tokenizer.vocab_size} tokens; they must match to be saved together")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, kind="checkpoint", legacy_files=CHECKPOINT_FILES) as tmp:
        config = {"format_version": FORMAT_VERSION, **dataclasses.asdict(model.config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        torch.save(state, tmp / "model.pt")
        tokenizer.save(tmp / "tokenizer.json")
    return out_dir


def load_config(model_dir) -> GPTConfig:
    """Read and validate `config.json` of a checkpoint folder; every problem is a ValueError naming the file.

    Example: {"format_version": 1, "vocab_size": 120, "bias": "no"} -> ValueError: ... config.json:
    "bias" must be true or false, got 'no' ...
    """
    path = Path(model_dir) / "config.json"
    corrupt = "the checkpoint is corrupt; re-run train.py (or the script that wrote it)"
    fields = read_json_file(path, "a checkpoint's config.json", max_bytes=2**16)  # a few hundred bytes in practice
    if not isinstance(fields, dict):
        raise ValueError(f"{path} holds a JSON {type(fields).__name__}, not an object of GPTConfig fields; {corrupt}")
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    known = typing.get_type_hints(GPTConfig)  # field name -> int, float or bool
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}; expected only {sorted(known)}")
    if "vocab_size" not in fields:
        raise ValueError(f'{path} has no "vocab_size" (the one GPTConfig field without a default); {corrupt}')
    for name, value in fields.items():
        expected = known[name]
        if expected is bool and not isinstance(value, bool):
            raise ValueError(f'{path}: "{name}" must be true or false, got {value!r}; {corrupt}')
        # subtle: JSON true is a Python bool, and bool is a subclass of int; a count must not be one
        if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f'{path}: "{name}" must be a number, got {value!r}; {corrupt}')
    try:
        return GPTConfig(**fields)
    except ValueError as error:  # the range checks of GPTConfig.__post_init__ (e.g. n_heads must divide embed_dim)
        raise ValueError(f"{path}: {error}; {corrupt}") from None


def expected_state_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of MiniGPT(config).state_dict(), computed from the numbers alone (nothing is built).

    Example:
        >>> shapes = expected_state_shapes(GPTConfig(vocab_size=10, embed_dim=8, n_heads=2, n_layers=1))
        >>> shapes["tok_emb.weight"], shapes["blocks.0.mlp.up_proj.weight"], len(shapes)
        ((10, 8), (32, 8), 21)
    """
    C, V, hidden = config.embed_dim, config.vocab_size, config.mlp_ratio * config.embed_dim
    shapes = {"tok_emb.weight": (V, C), "pos_emb.weight": (config.context_length, C)}
    per_layer = {"ln_1.weight": (C,), "ln_2.weight": (C,),
                 "attn.q_proj.weight": (C, C), "attn.k_proj.weight": (C, C), "attn.v_proj.weight": (C, C),
                 "attn.o_proj.weight": (C, C), "mlp.up_proj.weight": (hidden, C), "mlp.down_proj.weight": (C, hidden)}
    if config.bias:  # every LayerNorm and Linear of a block has a bias of its output width
        per_layer.update({name.replace(".weight", ".bias"): shape[:1] for name, shape in per_layer.items()})
    for layer in range(config.n_layers):
        shapes.update({f"blocks.{layer}.{name}": shape for name, shape in per_layer.items()})
    shapes["ln_f.weight"] = (C,)
    if config.bias:
        shapes["ln_f.bias"] = (C,)
    shapes["lm_head.weight"] = (V, C)
    return shapes


def check_state_fits(state: dict, config: GPTConfig, path) -> None:
    """Raise a one-line ValueError unless `state` holds exactly the tensors MiniGPT(config) has.

    Cheap whatever config.json claims: the layer count is first bounded by the number of tensors in the
    file, then names, shapes and dtypes are compared with the tensors' headers (nothing is allocated).
    """
    fix = "config.json and model.pt come from different models, or the checkpoint is corrupt; re-run train.py"
    per_layer = 8  # ln_1, ln_2 and six Linear weights, without biases
    if config.n_layers * per_layer > len(state):
        raise ValueError(f"{path} holds {len(state)} tensors, too few for n_layers={config.n_layers} "
                         f"({per_layer} or more per layer); {fix}")
    expected = expected_state_shapes(config)
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{path} does not fit the model described by config.json: it has no tensor "
                             f"{name!r} (shape {list(shape)}); {fix}")
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path} does not fit the model described by config.json: {name} has shape "
                             f"{list(tensor.shape)}, config.json implies {list(shape)}; {fix}")
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {name} has dtype {tensor.dtype}; MiniGPT's weights are floating point; {fix}")
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        raise ValueError(f"{path} does not fit the model described by config.json: unexpected tensor "
                         f"{unexpected[0]!r} ({len(unexpected)} in all); {fix}")
    claimed = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    if claimed > path.stat().st_size:
        raise ValueError(f"{path} is {path.stat().st_size} bytes but its tensors claim {claimed}; "
                         f"the file is truncated or corrupt; re-run train.py")


def check_model_dir(model_dir) -> Path:
    """Raise a clear error unless `model_dir` is a folder holding every checkpoint file."""
    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise ValueError(f"{model_dir} is a file, not a model folder; a model folder holds "
                         f"{', '.join(CHECKPOINT_FILES)} (written by `python train.py --out FOLDER`)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist; create one with `python train.py --out {model_dir}`")
    missing = [name for name in CHECKPOINT_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a MiniGPT checkpoint: missing {', '.join(missing)} "
                                f"(a checkpoint folder holds {', '.join(CHECKPOINT_FILES)})")
    return model_dir


def load_model(model_dir, adapter=None, device="cpu", quantize_base: bool = False, strict_base: bool = False):
    """Rebuild (model, tokenizer) from a checkpoint folder, optionally with a fine-tuned adapter on top.

    Args:
        model_dir: a folder written by save_model (a base model, or a merged / fully fine-tuned one).
        adapter: an adapter folder written by finetune.py (lora_config.json, lora_weights.pt,
            embedding_weights.pt, tokenizer.json), made from this base; its new vocabulary rows are
            added and its LoRA / DoRA adapter applied (see minigpt/adapter_folder.py).
        device: where the model goes.
        quantize_base: with an adapter, quantize the base to NF4 first (as QLoRA trained it).
        strict_base: with an adapter that records the fingerprint of another base, raise ValueError
            instead of warning (see minigpt/adapter_folder.py).

    Returns:
        (model in eval mode, tokenizer); with an adapter, the expanded tokenizer of the adapter folder.

    Example:
        >>> model, tokenizer = load_model("dist/base_model")   # doctest: +SKIP
        >>> model, tokenizer = load_model("dist/base_model", adapter="dist/finetuning_results/lora_adapter")  # doctest: +SKIP
        >>> model, tokenizer = load_model("dist/finetuning_results/lora_merged")   # doctest: +SKIP
    """
    if adapter is not None:
        from minigpt.adapter_folder import load_finetuned_adapter  # only an adapter needs lora/ and quant/

        base_model, base_tokenizer = load_model(model_dir)
        model, tokenizer = load_finetuned_adapter(base_model, base_tokenizer, adapter, quantize_base=quantize_base,
                                                  strict_base=strict_base)
        check_finite_weights(model, f"{model_dir} + the adapter {adapter}")
        return model.to(device).eval(), tokenizer
    model_dir = check_model_dir(model_dir)
    config = load_config(model_dir)
    try:
        # mmap: only the headers are read now; a tensor's bytes are read when it is copied into the model
        state = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a truncated or foreign file: say which one and what to do
        raise ValueError(f"{model_dir / 'model.pt'} could not be read ({type(error).__name__}: {error}); "
                         f"the checkpoint is corrupt, re-run train.py") from None
    if not isinstance(state, dict) or not all(isinstance(name, str) and isinstance(value, torch.Tensor)
                                              for name, value in state.items()):
        held = "a dict with entries other than name -> tensor" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ValueError(f"{model_dir / 'model.pt'} holds {held}, not a state_dict (a dict of parameter names "
                         f"to tensors); the checkpoint is corrupt, re-run train.py")
    check_state_fits(state, config, model_dir / "model.pt")  # before MiniGPT(config) allocates anything
    model = MiniGPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{model_dir / 'model.pt'} does not fit the model described by config.json: {error}") from None
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json says "
                         f"vocab_size={config.vocab_size}; the folder mixes files from different models")
    check_finite_weights(model, str(model_dir / "model.pt"))
    return model.to(device).eval(), tokenizer


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Raise ValueError naming each tensor of `model` that holds NaN or inf, and how many values.

    A run that diverged leaves such weights, and every output of the model is then NaN: sampling from it
    would fail deep inside torch.multinomial. Integer tensors (NF4 codes) cannot hold NaN and are skipped.

    Example message:
        dist/base_model/model.pt holds non-finite weights (NaN or inf): blocks.0.attn.q_proj.weight (4096 of
        4096 values); it was saved from a run that diverged: train it again with a lower learning rate
    """
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()} values)")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else "")
        raise ValueError(f"{source} holds non-finite weights (NaN or inf): {shown}; it was saved from a run that "
                         f"diverged: train it again with a lower learning rate")
