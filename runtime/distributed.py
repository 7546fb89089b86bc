"""Data-parallel training under torchrun: all the torch.distributed plumbing of train.py and finetune.py.

    torchrun --standalone --nproc_per_node=2 train.py --device cpu       # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node=4 finetune.py --device cuda   # 4 GPUs, one per process (nccl)

It follows PyTorch's own recipe, DistributedDataParallel (DDP; Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training"): every process ("rank") holds a full copy of the
model, computes the gradient on its own share of the batch, and DDP averages the gradients across ranks
during backward, so every rank takes the same optimizer step and the copies stay identical.

    every rank draws the same global batch           (B windows, from the shared seeded generator)
        rank 0: windows [0, B/N)         ─► forward, backward ─┐
        rank 1: windows [B/N, 2B/N)      ─► forward, backward ─┤  DDP all-reduce: mean of the gradients
        ...                                                    ─┘  (only parameters with requires_grad)
                                           ▼
        every rank: the same clipped AdamW step on the same weights

Each rank's loss is the mean over its B/N windows, so the mean over ranks of the gradients is exactly the
gradient of the single-process mean loss over all B windows: N ranks with B/N windows each train like one
process with batch B, up to the order of float additions.

One process (plain `python train.py`, or torchrun with one process) gets SINGLE_PROCESS: the scripts
still import this module and go through the same calls, and each returns at once. The only
torch.distributed calls on that path are the checks `dist.is_available()` / `dist.is_initialized()`:
no process group is set up, no model is wrapped, nothing is sent.

    with process_group("cpu") as distributed:          # reads RANK, WORLD_SIZE, ... set by torchrun
        model = MiniGPT(config)                        # same seed on every rank: identical weights
        result = train_model(distributed.wrap(model), train_stream, val_stream, train_config,
                             distributed=distributed)  # shards batches, averages the logged loss
        if distributed.is_main:                        # only rank 0 prints and writes folders
            save_model(model, tokenizer, "dist/base_model")   # the unwrapped model: no "module." prefixes
        distributed.barrier()                          # nobody exits before the folder is written
"""

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from runtime.atomic import atomic_directory

RENDEZVOUS_TIMEOUT_S = 60.0  # how long a rank waits for the others to show up before giving up, clearly
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # collectives, once started: PyTorch's own default
LAUNCH_HINT = "launch with: torchrun --standalone --nproc_per_node=N <script>.py ..."
FAILURE_KEY = "minilora/failure"  # in the rendezvous store: the first error of a rank other than 0
_store = None  # the rendezvous key-value store of this job (setup() keeps it), for report_failure


class RendezvousError(RuntimeError):
    """The processes could not find each other (no torchrun environment, or a rank that never came)."""


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0  # this process's index, 0 .. world_size-1; rank 0 prints, plots and writes folders
    local_rank: int = 0  # the index among this machine's processes: picks the GPU (cuda:local_rank)
    world_size: int = 1  # processes in all; 1 means a plain single-process run, nothing distributed
    device: str = "cpu"  # where this rank's model and batches live
    sharding: str = "ddp"  # several processes: "ddp" (a whole copy each) or "fsdp" (runtime/sharding.py)

    @property
    def enabled(self) -> bool:
        """True when several processes train together (the process group is set up)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one process that prints, shows progress bars and writes files."""
        return self.rank == 0

    def local_batch_size(self, batch_size: int) -> int:
        """Windows per rank for a global batch of `batch_size`; a clear error when it does not divide.

        Example: batch_size=32 on 4 ranks -> 8 windows each; batch_size=10 on 4 ranks -> ValueError
        suggesting 8 or 12.
        """
        if batch_size % self.world_size != 0:
            lower = (batch_size // self.world_size) * self.world_size
            upper = lower + self.world_size
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"batch_size {batch_size} does not split evenly over {self.world_size} processes "
                f"(torchrun --nproc_per_node={self.world_size}): each process takes batch_size / "
                f"world_size windows of the global batch; use a multiple of {self.world_size}, e.g. "
                f"--batch-size {nearest}")
        return batch_size // self.world_size

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: rows [rank * b, (rank + 1) * b) with b = B / world_size.

        Args:
            batch: (B, ...) the same global batch on every rank.

        Returns:
            (B / world_size, ...) a view; the whole batch in one process.

        Example: B = 8 on 2 ranks -> rank 0 gets rows 0-3, rank 1 rows 4-7.
        """
        if not self.enabled:
            return batch
        per_rank = self.local_batch_size(batch.size(0))
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]  # (B / world_size, ...)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in DistributedDataParallel when several processes train; the model itself otherwise.

        Keep a reference to the unwrapped model for saving (or use unwrap_model): its state_dict has no
        "module." prefixes, so checkpoints are the same as single-process ones.
        """
        if not self.enabled:
            return model
        return wrap_model(model, self.device)

    @contextlib.contextmanager
    def training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        """Yield the model to hand to train_model; after the block `model` holds the trained weights, whole.

        One process: `model` itself. DDP: `model` wrapped (the same parameters). FSDP: a sharded copy
        (runtime/sharding.py), whose full weights are gathered back into `model` on every rank at the end;
        `optimizer` (built over `model`, not yet stepped) is pointed at the copy's shards.

            with distributed.training(model, optimizer) as training_model:
                result = train_model(training_model, ..., optimizer=optimizer, distributed=distributed)
            save_model(model, ...)                 # a plain model again, as in one process
        """
        if self.enabled and self.sharding == "fsdp":
            from runtime.sharding import training_copy  # subtle: imported only when used (FSDP2 is large)
            with training_copy(model, self.device, optimizer) as sharded:
                yield sharded
        else:
            yield self.wrap(model)

    def mean(self, value: float) -> float:
        """The average of a number over all ranks (e.g. each rank's loss on its shard); itself in one process."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item()) / self.world_size

    def from_main(self, value: float) -> float:
        """Rank 0's value of a number on every rank, so that decisions taken from it (early stopping)
        are the same everywhere and no rank waits forever for one that already stopped."""
        if not self.enabled:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def manual_seed(self, seed: int) -> int:
        """Seed torch's global generator with `seed + rank` and return that seed.

        Call it after the model is built (from `seed` alone, identical on every rank): what torch draws
        afterwards, the dropout masks, then differs between ranks, as it must (with the same masks
        everywhere, N ranks would drop the same units of every window position). One process: `seed`.

        Example: seed 0 on 2 ranks -> rank 0 draws from seed 0, rank 1 from seed 1.
        """
        torch.manual_seed(seed + self.rank)
        return seed + self.rank

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only: one copy of every message, not one per process."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. until rank 0 finished writing the output folder)."""
        if self.enabled:
            dist.barrier()

    @property
    def _collective_device(self) -> str:
        # subtle: nccl only reduces GPU tensors, gloo only CPU ones
        return self.device if self.device.startswith("cuda") else "cpu"


SINGLE_PROCESS = DistributedContext()


def wrap_model(model: torch.nn.Module, device: str) -> DistributedDataParallel:
    """Wrap `model` in DDP. Needs an initialised process group (process_group() sets one up).

    Only parameters with requires_grad=True are registered in DDP's gradient buckets and all-reduced:
    with LoRA that is the small A and B matrices, never the frozen base. QLoRA's 4-bit base lives in
    buffers (packed codes and scales), which DDP would otherwise re-broadcast from rank 0 before every
    forward. We turn that off: the buffers never change, and they are identical on every rank anyway
    (the same seed gives the same base weights, and NF4 quantization is deterministic).
    """
    device_ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, **_no_buffer_sync())


def is_main_process_from_env() -> bool:
    """True unless torchrun's RANK says this is another process than rank 0 (unset, "" or "0": True).

    For the scripts' `__main__` blocks, which must decide whether to print an error before (or without)
    a process group: under torchrun every rank meets the same bad option or missing file, and one copy
    of the message is enough.

        except ValueError as error:
            sys.exit(f"error: {error}" if is_main_process_from_env() else 1)
    """
    return os.environ.get("RANK", "0").strip() in ("", "0")


@contextlib.contextmanager
def main_process_directory(final_dir, context: DistributedContext, kind: str = "output", legacy_files=None):
    """atomic_directory(final_dir, kind, legacy_files) on rank 0; None on the other ranks, which write nothing.

    On leaving the block every rank waits until rank 0's folder is complete (on success; an error on
    one rank ends the whole torchrun job anyway).

        with main_process_directory("dist/results", distributed, kind="finetune-results") as tmp:
            ...train on every rank...
            if tmp is not None:                  # rank 0 only
                save_model(model, tokenizer, tmp / "model")
    """
    if context.is_main:
        with atomic_directory(final_dir, kind, legacy_files) as tmp_dir:
            yield tmp_dir
    else:
        yield None
    context.barrier()


def _no_buffer_sync() -> dict:
    """DDP's option for "do not broadcast buffers before each forward", under this PyTorch's name."""
    # subtle: PyTorch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name now warns and
    # also skips the one broadcast at construction); earlier versions only know broadcast_buffers
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (what to save or evaluate); else `model`."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _environment_int(name: str) -> int:
    """An integer that torchrun puts in the environment (RANK, LOCAL_RANK); a clear error if it is not there."""
    text = os.environ.get(name)
    if text is None:
        raise RendezvousError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is not; {LAUNCH_HINT} "
                              f"(it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every "
                              f"process)")
    try:
        return int(text)
    except ValueError:
        raise RendezvousError(f"environment variable {name}={text!r} is not an integer; {LAUNCH_HINT}") from None


def setup(device: str, sharding: str = "ddp") -> DistributedContext:
    """Join the process group that torchrun describes in the environment; SINGLE_PROCESS without one.

    Args:
        device: the device picked for one process ("cpu", "cuda", "cuda:0", "mps"). Under torchrun on
            GPUs each rank takes cuda:LOCAL_RANK instead, and the backend is nccl; on CPU it is gloo.
        sharding: "ddp" or "fsdp" (--sharding), used only with several processes.

    Returns:
        a DistributedContext (rank, local_rank, world_size, this rank's device).

    Raises:
        RendezvousError: WORLD_SIZE > 1 but the rest of torchrun's environment is missing, or the other
            ranks did not show up within RENDEZVOUS_TIMEOUT_S.
        ValueError: a device that cannot be shared between processes (mps), or more processes per
            machine than GPUs.
    """
    if dist.is_available() and dist.is_initialized():
        # already in a group, e.g. finetune.py pretraining its missing base with train.py's main()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistributedContext(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                                  device=_rank_device(device, local_rank), sharding=sharding)
    world_size_text = os.environ.get("WORLD_SIZE", "1")
    if not world_size_text.isdigit():
        raise RendezvousError(f"environment variable WORLD_SIZE={world_size_text!r} is not a number of "
                              f"processes; {LAUNCH_HINT}")
    world_size = int(world_size_text)
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"sharding {sharding!r} is not one of: ddp (a whole model per process), fsdp (FSDP2 shards)")
    if world_size <= 1:
        return DistributedContext(device=device)  # plain python, or torchrun with one process
    rank, local_rank = _environment_int("RANK"), _environment_int("LOCAL_RANK")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RendezvousError(f"WORLD_SIZE={world_size} asks for {world_size} processes, but "
                              f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so "
                              f"they cannot find each other; {LAUNCH_HINT}")
    device = _rank_device(device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # subtle: before the process group, so nccl binds the right GPU
    backend = "nccl" if device.startswith("cuda") else "gloo"
    try:
        # subtle: find the other ranks with a short timeout (a missing rank fails in seconds, not after
        # PyTorch's 30-minute default), then keep the default timeout for the collectives themselves,
        # which may legitimately wait while rank 0 writes a checkpoint
        store, rank, world_size = next(dist.rendezvous(
            "env://", rank, world_size, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)))
    except RuntimeError as error:
        raise RendezvousError(
            f"rank {rank} of {world_size} could not reach the others at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} within {RENDEZVOUS_TIMEOUT_S:g} s ({error}); {LAUNCH_HINT}") from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    global _store
    _store = store
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                              sharding=sharding)


def _rank_device(device: str, local_rank: int) -> str:
    """This rank's device: cuda:LOCAL_RANK on GPUs (one GPU per process), the CPU as it is."""
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process with LOCAL_RANK={local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; use --nproc_per_node at most "
                             f"{torch.cuda.device_count()}, or --device cpu")
        return f"cuda:{local_rank}"
    if device == "mps":
        raise ValueError("torchrun with several processes on one Apple GPU (mps) is not supported by "
                         "torch.distributed; use --device cpu (gloo) or a single process")
    return device


def report_failure(message: str) -> None:
    """On a rank other than 0: leave `message` in the job's store, for rank 0 to print (see failure_elsewhere).

    Only rank 0 prints, so that an error every rank meets (a bad option) appears once. An error that one
    rank alone meets (its GPU out of memory, its shard of a file) would then appear nowhere: that rank
    exits, rank 0 is stopped in a collective (gloo: "Connection closed by peer") or by torchrun's SIGTERM.
    """
    if _store is None:
        return
    try:
        _store.set(FAILURE_KEY, message)
    except Exception:  # subtle: the job is ending anyway; the store may be gone already
        pass


def failure_elsewhere() -> str | None:
    """The message another rank left with report_failure, or None (one process; nobody failed)."""
    if _store is None:
        return None
    try:
        return _store.get(FAILURE_KEY).decode() if _store.check([FAILURE_KEY]) else None
    except Exception:
        return None


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str, sharding: str = "ddp"):
    """setup() on entry, cleanup() on exit, also when training fails; yields the DistributedContext.

    Nested use (finetune.py calling train.py's main() under torchrun) joins the group already there and
    leaves it to the outer block to close.
    """
    joined_here = not (dist.is_available() and dist.is_initialized())
    context = setup(device, sharding)
    try:
        yield context
    finally:
        if context.enabled and joined_here:
            cleanup()
