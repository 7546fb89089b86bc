"""--sharding fsdp (runtime/sharding.py): FSDP2 shards under torchrun train like one process, the 4-bit base
shards and gathers back bit for bit, and the folders rank 0 writes are the files one process writes.

The torchrun tests start 2 CPU processes (gloo), a few seconds each; the rest runs in-process in a process
group of one rank (FSDP2 with one shard: the same code path, every collective a copy).
"""

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lora
from minigpt import GPTConfig, MiniGPT, pretrain
from quant import quantize_model
from runtime import distributed
from runtime.distributed import DistributedContext
from runtime.sharding import buffers_to_frozen_parameters
from runtime.atomic import MARKER  # the output marker records the writer's pid: the one file that may differ
from test_distributed import LOSS_RTOL, ROOT, TINY_TRAIN, cli_flags, one_rank_group, torchrun  # noqa: F401 (a fixture)


def tiny_qlora_model() -> MiniGPT:
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=30, embed_dim=64, n_heads=2, n_layers=2))
    quantize_model(model)
    return lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))


def test_4bit_storage_becomes_frozen_parameters_that_fsdp_can_shard():
    model = tiny_qlora_model()
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    names = buffers_to_frozen_parameters(model)
    parameters = dict(model.named_parameters())
    assert names and set(names) == {name for name, tensor in buffers.items() if tensor.dim() > 0}
    assert {parameters[name].dtype for name in names} == {torch.uint8, torch.float32}  # codes and scales
    assert all(torch.equal(parameters[name], buffers[name]) and not parameters[name].requires_grad for name in names)


def test_sharded_qlora_trains_and_gathers_back_to_the_same_4bit_weights(one_rank_group):
    model = tiny_qlora_model()
    weights = {name: module.dequantize_weight() for name, module in model.named_modules()
               if hasattr(module, "dequantize_weight")}
    frozen = {name: tensor.clone() for name, tensor in model.state_dict().items()
              if isinstance(tensor, torch.Tensor) and "lora_" not in name}
    buffer_names = [name for name, _ in model.named_buffers()]
    # subtle: a context of 2 so that it shards at all; the mesh is the real group's one rank (one whole shard)
    context = DistributedContext(rank=0, world_size=2, sharding="fsdp")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    idx = torch.randint(0, 30, (2, 8))  # (B, T)
    with context.training(model, optimizer) as sharded:
        assert all(p.numel() == 0 for p in model.parameters())  # the original's tensors are freed meanwhile
        for _ in range(2):
            _, loss = sharded(idx, idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert [name for name, _ in model.named_buffers()] == buffer_names  # the 4-bit storage is in buffers again
    for name, module in model.named_modules():
        if name in weights:
            assert torch.equal(module.dequantize_weight(), weights[name]), name  # gathered bit for bit
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in frozen.items())
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in model.parameters() if p.requires_grad)


def test_sharding_option_is_checked_even_in_one_process():
    with pytest.raises(ValueError, match="sharding 'zero3' is not one of: ddp .*, fsdp"):
        distributed.setup("cpu", "zero3")
    assert distributed.setup("cpu", "fsdp") == distributed.SINGLE_PROCESS  # one process: ignored, nothing set up
    model = tiny_qlora_model()
    with distributed.SINGLE_PROCESS.training(model) as training_model:
        assert training_model is model and not dist.is_initialized()


def other_files(folder: Path) -> list[Path]:
    return sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file() and path.name != MARKER)


def test_finetune_py_fsdp_matches_one_process_for_lora_and_qlora(tmp_path):
    from finetuning import experiment

    base = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "base"), **TINY_TRAIN))["out_dir"]
    options = dict(base=base, methods="lora,qlora", steps=4, batch_size=4, warmup_steps=1, rank=2, alpha=4.0,
                   device="cpu", plot=False, progress=False)
    result = torchrun("finetune.py", {**options, "sharding": "fsdp", "out": str(tmp_path / "fsdp" / "results")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert sorted(path.name for path in (tmp_path / "fsdp").iterdir()) == ["results"]  # one folder, no leftovers

    single = experiment.main(experiment.FinetuneConfig(**options, out=str(tmp_path / "single" / "results")))
    summary = json.loads((tmp_path / "fsdp" / "results" / "results.json").read_text())
    for fsdp_method, single_method in zip(summary["methods"], single["results"], strict=True):
        assert fsdp_method["method"] == single_method.method
        fsdp_losses = [loss for _, loss in fsdp_method["train_curve"]]
        single_losses = [loss for _, loss in single_method.train_curve]
        assert fsdp_losses == pytest.approx(single_losses, rel=LOSS_RTOL)  # step by step
        assert fsdp_method["val_loss"] == pytest.approx(single_method.val_loss, rel=LOSS_RTOL)
    for folder in ("lora_adapter", "lora_merged", "qlora_adapter"):
        fsdp_folder, single_folder = (tmp_path / run / "results" / folder for run in ("fsdp", "single"))
        files = other_files(single_folder)
        assert other_files(fsdp_folder) == files and (fsdp_folder / MARKER).exists()
        for name in files:
            if name.suffix != ".pt":  # config.json, tokenizer.json, adapter_config.json: the same bytes
                assert filecmp.cmp(fsdp_folder / name, single_folder / name, shallow=False), f"{folder}/{name}"
                continue
            # subtle: not the same bytes: 2 ranks average two half-batch gradients, one process sums the whole
            # batch, in another float order; the weights agree to ~1e-7 (the same keys, shapes and dtypes)
            fsdp, single_state = (torch.load(root / name, weights_only=True) for root in (fsdp_folder, single_folder))
            assert list(fsdp) == list(single_state), f"{folder}/{name}"
            for key in single_state:
                if isinstance(single_state[key], torch.Tensor):
                    assert fsdp[key].dtype == single_state[key].dtype, key
                    torch.testing.assert_close(fsdp[key], single_state[key], rtol=LOSS_RTOL, atol=1e-6,
                                               msg=f"{folder}/{name}: {key}")
                else:
                    assert fsdp[key] == single_state[key], key



def test_train_py_fsdp_saves_the_single_process_checkpoint_up_to_rounding(tmp_path):
    from minigpt import load_model

    result = torchrun("train.py", {**TINY_TRAIN, "sharding": "fsdp", "out": str(tmp_path / "fsdp" / "base")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1 and "x 2 processes" in result.stdout  # rank 0 alone prints
    single = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "single" / "base"), **TINY_TRAIN))
    printed = [line for line in result.stdout.splitlines() if line.startswith("final loss:")][0]
    assert f"train {single['final_train_loss']:.3f}, validation {single['final_val_loss']:.3f}" in printed
    (fsdp_model, _), (single_model, _) = load_model(tmp_path / "fsdp" / "base"), load_model(single["out_dir"])
    assert list(fsdp_model.state_dict()) == list(single_model.state_dict())  # gathered whole: the same keys
    for (name, a), b in zip(fsdp_model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

# ---- failures: an error of one rank, SIGTERM to the whole job ------------------------------------------------

# finetune.py with train_model replaced: "error" fails on rank 1 only, once the model is sharded; "sigterm" marks
# the flag file and waits (every rank holds shards, the originals' tensors are freed) until the job is killed
FAILING_FINETUNE = """
import os, runpy, sys, time
from pathlib import Path
import finetuning.methods as methods
mode, flag, real_train_model = os.environ["FSDP_TEST_MODE"], Path(os.environ["FSDP_TEST_FLAG"]), methods.train_model

def train_model(model, *args, distributed, **kwargs):
    if mode == "error" and distributed.rank == 1:
        raise ValueError("rank 1 alone fails here")
    if mode == "sigterm":
        flag.write_text("training")
        time.sleep(60)
    return real_train_model(model, *args, distributed=distributed, **kwargs)

methods.train_model = train_model
sys.argv = ["finetune.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "finetune.py"), run_name="__main__")
"""


@pytest.fixture
def previous_results(tmp_path):
    """A finished single-process run's folder (marker included) and its files' bytes."""
    from finetuning import experiment

    base = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "base"), **TINY_TRAIN))["out_dir"]
    options = dict(base=base, methods="lora", steps=2, batch_size=4, warmup_steps=1, rank=2, alpha=4.0,
                   device="cpu", plot=False, progress=False, out=str(tmp_path / "out" / "results"))
    experiment.main(experiment.FinetuneConfig(**options))
    out = Path(options["out"])
    return options, {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}


def start_failing_finetune(tmp_path, options: dict, mode: str) -> subprocess.Popen:
    script = tmp_path / "failing_finetune.py"
    script.write_text(FAILING_FINETUNE)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FSDP_TEST_MODE": mode,
                   "FSDP_TEST_FLAG": str(tmp_path / "flag")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               *cli_flags({**options, "sharding": "fsdp"})]
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own process group, as a shell job


def assert_unchanged(previous: dict, out: Path) -> None:
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == previous
    assert sorted(path.name for path in out.parent.iterdir()) == ["results"]  # no temporary folder left


def test_an_error_on_one_rank_is_printed_once_and_every_rank_exits(tmp_path, previous_results):
    options, previous = previous_results
    job = start_failing_finetune(tmp_path, options, "error")
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert stderr.count("rank 1 alone fails here") == 1, stderr[-3000:]  # rank 0 prints rank 1's error
    assert "error: rank 1 alone fails here (process 1 of 2)" in stderr
    assert "Connection closed by peer" not in stderr  # no traceback of the collective it broke
    assert_unchanged(previous, Path(options["out"]))


def test_sigterm_to_the_torchrun_job_leaves_the_previous_results(tmp_path, previous_results):
    options, previous = previous_results
    job = start_failing_finetune(tmp_path, options, "sigterm")
    deadline = time.monotonic() + 60
    while not (tmp_path / "flag").exists():  # the ranks are training (sharded)
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGTERM)  # what Ctrl-C in the shell, or a batch system's time limit, does
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0
    assert stderr.count(f"interrupted; {options['out']} unchanged") == 1, stderr[-3000:]
    assert_unchanged(previous, Path(options["out"]))
