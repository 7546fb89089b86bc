"""How many CPU threads a run should use: the cores that are free now, and no more than the work can use.

torch's default is one thread per core. OpenMP's threads then spin-wait for each other at every small
matmul; when another program keeps a core busy, the thread that shares that core falls behind and the
others spin waiting for it, so a tiny model such as MiniGPT (embed_dim 64) can run several times slower
with two threads than with one (docs/benchmarks.md, "CPU threads", has the measured figures). A laptop
always runs something else, so every script picks its thread count when it starts:

    threads = min(free cores now, threads the model's width can use)

    free cores now   the CPUs this process may run on, minus the share the others kept busy over a
                     short sample of /proc/stat (Linux), else the 1-minute load average; at least 1
    width can use    1 + embed_dim // 64: MiniGPT's default width gains little from a second thread
                     and nothing from a third; wider models split their matmuls further

    threads = choose_threads(requested=0, embed_dim=64)     # 0: automatic; N: exactly N
    torch.set_num_threads(threads.count); print(threads.describe())

`OMP_NUM_THREADS` set in the environment counts as a request, as it does for torch itself. Under
torchrun the free cores are shared out between the processes of the machine (LOCAL_WORLD_SIZE).
"""

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

SAMPLE_SECONDS = 0.2  # how long to watch /proc/stat: long enough to see a busy core, short enough to not wait
WIDTH_PER_THREAD = 64  # model width (embed_dim) that keeps one more thread busy enough to pay for itself


@dataclass(frozen=True)
class ThreadChoice:
    count: int  # the number of threads the run uses
    reason: str  # why, in words, for the run's header line

    def describe(self) -> str:
        return f"threads: {self.count} ({self.reason})"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def busy_cores(sample_seconds: float = SAMPLE_SECONDS) -> Optional[float]:
    """How many cores other programs keep busy right now, from two reads of /proc/stat; None off Linux.

    Example:
        >>> busy = busy_cores(0.05)
        >>> busy is None or 0.0 <= busy <= os.cpu_count()
        True
    """
    def read() -> Optional[tuple[int, int]]:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = read()
    if first is None:
        return None
    time.sleep(sample_seconds)
    second = read()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (1.0 - idle / total)


def free_cores() -> tuple[int, str]:
    """(cores free for this run, how that was measured)."""
    cores = usable_cores()
    busy = busy_cores()
    source = "busy now"
    if busy is None:
        try:
            busy, source = os.getloadavg()[0], "load average"
        except OSError:
            busy, source = 0.0, "load unknown"
    # subtle: round, not floor: a core 40% busy is still mostly free, one 60% busy mostly taken
    return max(1, cores - round(busy)), f"{cores} cores, {busy:.1f} {source}"


def choose_threads(requested: int = 0, embed_dim: int = 64) -> ThreadChoice:
    """The thread count for a run: `requested` if it is positive, else the rule in the module docstring.

    Args:
        requested: the script's --threads (0 = automatic).
        embed_dim: the model's width: how many threads its matmuls can keep busy.

    Example:
        >>> choose_threads(3).count
        3
        >>> 1 <= choose_threads(0, embed_dim=64).count <= 2
        True
    """
    if requested < 0:
        raise ValueError(f"--threads must be 0 (choose from the free cores) or a positive count, got {requested}")
    if requested > 0:
        return ThreadChoice(requested, "--threads")
    from_environment = os.environ.get("OMP_NUM_THREADS", "")
    if from_environment.isdigit() and int(from_environment) > 0:
        return ThreadChoice(int(from_environment), "OMP_NUM_THREADS")
    free, measured = free_cores()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: processes on this machine
    free_each = max(1, free // processes)
    useful = 1 + embed_dim // WIDTH_PER_THREAD
    count = min(free_each, useful)
    share = f", shared by {processes} processes" if processes > 1 else ""
    return ThreadChoice(count, f"{measured}{share}; embed_dim {embed_dim} uses up to {useful}; "
                               f"--threads N to choose")


def use_threads(requested: int = 0, embed_dim: int = 64) -> ThreadChoice:
    """choose_threads, then make torch use that many (intra-op) threads; returns the choice."""
    choice = choose_threads(requested, embed_dim)
    torch.set_num_threads(choice.count)
    return choice
