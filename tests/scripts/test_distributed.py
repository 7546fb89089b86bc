"""torch.distributed support (runtime/distributed.py): train.py under torchrun trains like one process with
the same global batch, only trainable parameters are synchronised, and bad launches get clear messages.

The torchrun tests start 2 CPU processes (gloo) with `python -m torch.distributed.run --standalone`; they
cost a few seconds each (process start-up and imports), the rest of the file runs in-process.
"""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lora
from minigpt import pretrain
from minigpt import GPTConfig, MiniGPT, load_model
from runtime import distributed
from minigpt.corpus import TokenStream, base_corpus
from runtime.distributed import DistributedContext, RendezvousError
from minigpt.training import evaluate
from quant import quantize_model

ROOT = Path(__file__).resolve().parents[2]  # the repository: train.py and finetune.py live there
# Two ranks sum the same float32 numbers in a different order than one process does; over a few AdamW steps
# that moves the loss by ~1e-7 relative. 1e-4 relative leaves room and still catches any wrong sharding
# (another batch, or a gradient summed instead of averaged, changes the loss at the 1e-2 level).
LOSS_RTOL = 1e-4
TINY_TRAIN = dict(steps=6, eval_interval=3, embed_dim=16, n_heads=2, n_layers=1, batch_size=8, warmup_steps=2,
                  lr=1e-2, device="cpu", plot=False, progress=False)


def cli_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def torchrun(script: str, options: dict, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes, one thread each (the test machine is small)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               script, *cli_flags(options)]
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in this process too, as the torchrun ranks (OMP_NUM_THREADS=1): tiny models run as fast,
    and several times faster when the 2-core machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, in this process (enough to build DDP and look inside it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_lora_model() -> MiniGPT:
    torch.manual_seed(0)
    model = MiniGPT(GPTConfig(vocab_size=30, embed_dim=16, n_heads=2, n_layers=1))
    return lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))


# ---- sharding and the batch-size rule ------------------------------------------------------------------

def test_shards_of_all_ranks_put_together_are_the_global_batch():
    batch = torch.arange(8 * 3).view(8, 3)  # (B, T)
    shards = [DistributedContext(rank=rank, world_size=2).shard(batch) for rank in range(2)]
    assert [shard.shape for shard in shards] == [torch.Size([4, 3])] * 2
    assert torch.equal(torch.cat(shards), batch)
    assert DistributedContext().shard(batch) is batch  # one process: the whole batch, untouched


def test_batch_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size 10 .* 4 processes.*--batch-size 8 or 12"):
        DistributedContext(rank=0, world_size=4).local_batch_size(10)
    with pytest.raises(ValueError, match=r"--batch-size 4\b"):
        DistributedContext(rank=0, world_size=4).local_batch_size(3)
    assert DistributedContext(rank=3, world_size=4).local_batch_size(32) == 8


def test_train_py_checks_the_batch_before_any_work(tmp_path):
    config = pretrain.PretrainConfig(out=str(tmp_path / "base"), **{**TINY_TRAIN, "batch_size": 7})
    with pytest.raises(ValueError, match="batch_size 7 does not split evenly over 2 processes"):
        pretrain.pretrain(config, DistributedContext(rank=0, world_size=2), start=0.0)
    assert not (tmp_path / "base").exists()


def test_single_process_context_does_nothing_distributed():
    context = distributed.setup("cpu")  # no torchrun environment in the test process
    assert context == distributed.SINGLE_PROCESS and not dist.is_initialized()
    model = tiny_lora_model()
    assert context.wrap(model) is model and context.mean(2.5) == 2.5 and context.from_main(1.5) == 1.5
    context.barrier()


def test_only_rank_0_prints(capsys):
    DistributedContext(rank=0, world_size=2).print("from rank 0")
    DistributedContext(rank=1, world_size=2).print("from rank 1")
    assert capsys.readouterr().out == "from rank 0\n"


def test_each_rank_draws_its_own_dropout_masks():
    dropout = torch.nn.Dropout(p=0.5)
    ones = torch.ones(64)

    def mask_on(rank: int) -> torch.Tensor:
        seed = DistributedContext(rank=rank, world_size=2).manual_seed(7)
        assert seed == 7 + rank
        return dropout(ones) == 0  # which units this rank drops

    rank_0, rank_1 = mask_on(0), mask_on(1)
    assert not torch.equal(rank_0, rank_1)  # 64 coin flips: the same mask by chance has probability 2**-64
    assert torch.equal(mask_on(1), rank_1)  # and each rank repeats itself
    torch.manual_seed(7)
    assert torch.equal(dropout(ones) == 0, rank_0)  # rank 0 (and one process): the plain seed
    assert distributed.SINGLE_PROCESS.manual_seed(7) == 7


def test_is_main_process_from_env(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.is_main_process_from_env()  # plain python
    for rank, expected in (("0", True), ("", True), ("1", False), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        assert distributed.is_main_process_from_env() is expected, rank


def test_process_group_inside_a_running_group_joins_it_and_leaves_it_open(one_rank_group):
    # what finetune.py does under torchrun when it pretrains its missing base with train.py's main()
    with distributed.process_group("cpu") as context:
        assert (context.rank, context.world_size, context.device) == (0, 1, "cpu")
    assert dist.is_initialized()  # closing it is the outer block's job


# ---- a missing rendezvous ----------------------------------------------------------------------------

def torchrun_environment(monkeypatch, rank: int, **extra):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def test_world_size_without_master_address_says_to_use_torchrun(monkeypatch):
    torchrun_environment(monkeypatch, rank=0)
    with pytest.raises(RendezvousError, match=r"MASTER_ADDR and MASTER_PORT are not set.*torchrun --standalone "
                                              r"--nproc_per_node=N"):
        distributed.setup("cpu")
    assert not dist.is_initialized()


def test_world_size_without_rank_says_to_use_torchrun(monkeypatch):
    torchrun_environment(monkeypatch, rank=0)
    monkeypatch.delenv("RANK")
    with pytest.raises(RendezvousError, match="RANK is not.*torchrun"):
        distributed.setup("cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ranks_that_never_meet_time_out_quickly_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(distributed, "RENDEZVOUS_TIMEOUT_S", 0.5)
    torchrun_environment(monkeypatch, rank=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with pytest.raises(RendezvousError, match=r"rank 1 of 2 could not reach the others .* within 0.5 s.*torchrun"):
        distributed.setup("cpu")  # nobody listens at MASTER_PORT: rank 0 never started
    assert not dist.is_initialized()


def test_cli_reports_a_missing_rendezvous_without_a_traceback(monkeypatch, tmp_path):
    torchrun_environment(monkeypatch, rank=0)
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:  # in-process: what `python train.py` does, minus start-up
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "torchrun --standalone --nproc_per_node=N" in message
    assert not (tmp_path / "x").exists()


# ---- what DDP synchronises -------------------------------------------------------------------------------

def test_ddp_synchronises_only_the_trainable_lora_parameters(one_rank_group):
    model = tiny_lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = distributed.wrap_model(model, "cpu")
    # DDP's own record of what it registered in its gradient buckets (what gets all-reduced)
    bucketed = wrapped._get_ddp_logging_data()
    assert bucketed["num_parameter_tensors"] == len(trainable) == 4  # A and B of q_proj and v_proj
    assert bucketed["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in trainable)
    assert sum(p.numel() for p in model.parameters()) > 10 * sum(p.numel() for p in trainable)
    assert distributed.unwrap_model(wrapped) is model
    assert list(distributed.unwrap_model(wrapped).state_dict()) == list(model.state_dict())  # no "module."


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_elements_ddp_synchronises_in_the_default_finetune_setup(one_rank_group, method):
    """The figures docs/distributed.md quotes: DDP all-reduces whole parameters, so besides A and B it sends
    both embedding tables whole, though only their 40 new rows train (vocab.train_new_rows_only)."""
    from finetuning import experiment
    from finetuning.methods import setup_method
    from minigpt.corpus import new_domain_corpus
    from minigpt.vocab import expand_vocabulary, new_words_in
    from tokenizer import WordTokenizer

    defaults, pretrain_defaults = experiment.FinetuneConfig(), pretrain.PretrainConfig()
    tokenizer = WordTokenizer.from_corpus(base_corpus().train)  # what train.py builds: the default base
    base = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=pretrain_defaults.context_length,
                             embed_dim=pretrain_defaults.embed_dim, n_layers=pretrain_defaults.n_layers, n_heads=pretrain_defaults.n_heads))
    domain = new_domain_corpus()
    expanded, _, new_ids = expand_vocabulary(base, tokenizer, new_words_in(tokenizer, domain.train + domain.val))
    setup = setup_method(method, expanded, base.config.vocab_size, experiment.lora_config_from(defaults),
                         lr=defaults.lr, full_lr=defaults.full_lr)
    element_size = 4  # float32
    synchronised = distributed.wrap_model(setup.model, "cpu")._get_ddp_logging_data()
    elements = synchronised["total_parameter_size_bytes"] // element_size
    width, vocab = pretrain_defaults.embed_dim, expanded.config.vocab_size
    adapter = 2 * 4 * (width * defaults.rank + defaults.rank * width)  # 2 blocks x q,k,v,o x (A + B)
    assert (tokenizer.vocab_size, len(new_ids), adapter) == (176, 40, 16_384)
    assert elements == adapter + 2 * vocab * width == 44_032  # A, B and both tables whole
    assert setup.trainable_params == adapter + 2 * len(new_ids) * width == 21_504  # what really changes
    assert elements - setup.trainable_params == 2 * tokenizer.vocab_size * width == 22_528  # old rows: zero grads
    assert synchronised["num_parameter_tensors"] == 2 * 4 * 2 + 2


def test_qlora_trains_under_ddp_and_its_4bit_buffers_stay_put(one_rank_group):
    model = tiny_lora_model()
    model = lora.merge_and_unload(model)  # a plain MiniGPT again, then QLoRA: 4-bit base + fresh adapters
    quantize_model(model)
    model = lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    buffers_before = {name: tensor.clone() for name, tensor in model.named_buffers()}
    frozen_before = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = distributed.wrap_model(model, "cpu")
    assert wrapped._get_ddp_logging_data()["num_parameter_tensors"] == len(trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    idx = torch.randint(0, 30, (2, 8))  # (B, T)
    for _ in range(2):
        _, loss = wrapped(idx, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(tensor, buffers_before[name]) for name, tensor in model.named_buffers())
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in trainable)
    with torch.no_grad():
        assert torch.equal(wrapped(idx)[0], model(idx)[0])  # the wrapper computes the model itself


# ---- train.py under torchrun -------------------------------------------------------------------------------

def test_train_py_under_torchrun_matches_one_process_with_the_same_global_batch(tmp_path):
    result = torchrun("train.py", {**TINY_TRAIN, "out": str(tmp_path / "ddp" / "base")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1 and "x 2 processes" in result.stdout  # rank 0 alone prints
    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == ["base"]  # one folder, no leftovers

    single = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "single" / "base"), **TINY_TRAIN))
    ddp_model, tokenizer = load_model(tmp_path / "ddp" / "base")
    single_model, _ = load_model(single["out_dir"])
    assert list(ddp_model.state_dict()) == list(single_model.state_dict())  # saved unwrapped: same keys
    val_stream = TokenStream(base_corpus().val, tokenizer, ddp_model.config.context_length)
    ddp_loss, single_loss = evaluate(ddp_model, val_stream), evaluate(single_model, val_stream)
    assert ddp_loss == pytest.approx(single["final_val_loss"], rel=LOSS_RTOL)
    assert ddp_loss == pytest.approx(single_loss, rel=LOSS_RTOL)
    printed = [line for line in result.stdout.splitlines() if line.startswith("final loss:")][0]
    assert f"train {single['final_train_loss']:.3f}, validation {single['final_val_loss']:.3f}" in printed
    for (name, a), b in zip(ddp_model.state_dict().items(), single_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


# ---- finetune.py under torchrun ----------------------------------------------------------------------------

def test_finetune_py_under_torchrun_matches_one_process_for_lora_and_qlora(tmp_path):
    from finetuning import experiment  # imported here: the rest of the file does not need it

    base = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "base"), **TINY_TRAIN))["out_dir"]
    options = dict(base=base, methods="lora,qlora", steps=4, batch_size=4, warmup_steps=1, rank=2, alpha=4.0,
                   device="cpu", plot=False, progress=False)
    result = torchrun("finetune.py", {**options, "out": str(tmp_path / "ddp" / "results")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone prints
    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == ["results"]  # one folder, no leftovers
    assert sorted(path.name for path in (tmp_path / "ddp" / "results").iterdir()
                  if not path.name.startswith(".")) == [
        "lora_adapter", "lora_merged", "qlora_adapter", "results.json"]

    single = experiment.main(experiment.FinetuneConfig(**options, out=str(tmp_path / "single" / "results")))
    summary = json.loads((tmp_path / "ddp" / "results" / "results.json").read_text())
    assert [entry["method"] for entry in summary["methods"]] == ["lora", "qlora"]
    for ddp_method, single_method in zip(summary["methods"], single["results"]):
        assert ddp_method["method"] == single_method.method
        assert ddp_method["val_loss"] == pytest.approx(single_method.val_loss, rel=LOSS_RTOL)
        ddp_losses = [loss for _, loss in ddp_method["train_curve"]]
        single_losses = [loss for _, loss in single_method.train_curve]
        assert ddp_losses == pytest.approx(single_losses, rel=LOSS_RTOL)  # step by step, global batch means


def test_finetune_fact_correction_under_torchrun_matches_one_process(tmp_path):
    from finetuning import experiment

    base = pretrain.main(pretrain.PretrainConfig(out=str(tmp_path / "base"), **TINY_TRAIN))["out_dir"]
    options = dict(base=base, task="fact-correction", steps=4, batch_size=4, warmup_steps=1, rank=2, alpha=4.0,
                   device="cpu", plot=False, progress=False)
    result = torchrun("finetune.py", {**options, "out": str(tmp_path / "ddp" / "facts")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("efficacy") == 2  # rank 0 alone prints
    assert sorted(path.name for path in (tmp_path / "ddp").iterdir()) == ["facts"]  # one folder, no leftovers
    folders = ["attention_adapter", "fact_correction.txt", "v_proj_adapter"]
    assert sorted(path.name for path in (tmp_path / "ddp" / "facts").iterdir()
                  if not path.name.startswith(".")) == folders

    experiment.main(experiment.FinetuneConfig(**options, out=str(tmp_path / "single" / "facts")))
    for adapter in ("v_proj_adapter", "attention_adapter"):
        ddp, single = (torch.load(tmp_path / run / "facts" / adapter / "lora_weights.pt", weights_only=True)
                       for run in ("ddp", "single"))
        assert list(ddp) == list(single)
        for name in ddp:  # 4 steps of the same global batches: the same adapter up to float rounding
            torch.testing.assert_close(ddp[name], single[name], rtol=LOSS_RTOL, atol=1e-6, msg=name)
