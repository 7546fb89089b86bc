"""runtime/threads.py: the thread count comes from --threads, then OMP_NUM_THREADS, then the free cores."""

import pytest
import torch

from runtime import threads


def test_a_positive_request_is_taken_as_it_is():
    assert threads.choose_threads(3) == threads.ThreadChoice(3, "--threads")


def test_omp_num_threads_counts_as_a_request(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(0).count == 2
    assert threads.choose_threads(1).count == 1  # --threads wins over the environment


@pytest.mark.parametrize("cores, busy, embed_dim, processes, expected", [
    (2, 0.0, 64, 1, 2),    # quiet laptop, MiniGPT: both cores
    (2, 1.0, 64, 1, 1),    # one core kept busy by something else: one thread, no spinning against it
    (2, 1.9, 64, 1, 1),    # everything busy: still one
    (16, 0.0, 64, 1, 2),   # many free cores, but a 64-wide model cannot use them
    (16, 0.0, 1024, 1, 16),  # a wide model can
    (16, 2.0, 1024, 4, 3),   # torchrun, 4 processes on the machine: 14 free cores shared out
    (2, 0.4, 64, 1, 2),    # a core 40% busy is still mostly free (rounded, not floored)
])
def test_automatic_choice_is_the_free_cores_capped_by_the_width(monkeypatch, cores, busy, embed_dim, processes,
                                                               expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    choice = threads.choose_threads(0, embed_dim)
    assert choice.count == expected
    assert f"{cores} cores" in choice.describe() and "--threads N" in choice.describe()


def test_without_proc_stat_the_load_average_is_used(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 1.0, 1.0))
    choice = threads.choose_threads(0, embed_dim=1024)
    assert choice.count == 1 and "load average" in choice.reason


def test_busy_cores_sees_a_busy_process():
    """A process spinning on one core shows up as about one busy core (other jobs may add more)."""
    import subprocess
    import sys
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.busy_cores(0.3)
    finally:
        spinner.kill()
        spinner.wait()
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert busy >= 0.5


def test_negative_request_is_refused_and_use_threads_sets_torch():
    with pytest.raises(ValueError, match="--threads must be 0"):
        threads.choose_threads(-1)
    before = torch.get_num_threads()
    try:
        assert threads.use_threads(1).count == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
