"""Output folders never vanish and never replace a user's files (runtime/atomic.py).

A swap interrupted between its two renames is repaired by the next start; only a dead run's own
leftovers are cleaned; a folder is replaced only when its marker says it is a previous output of the
same kind; inputs inside the output folder are refused before any work; a full disk or a read-only
folder is a one-line error and the previous folder stays.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime import atomic
from runtime.atomic import MARKER, OutputWriteError, atomic_directory, check_output_dir

ROOT = Path(__file__).resolve().parents[2]


def write_output(out: Path, text: str, kind: str = "benchmarks") -> None:
    with atomic_directory(out, kind=kind) as tmp:
        (tmp / "results.json").write_text(text)


def dead_pid() -> int:
    """The pid of a process that has just ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(out: Path, role: str, pid: int, text: str, complete: bool, marked: bool = True,
             suffix: str = "abc123") -> Path:
    """A `.out.tmp-PID-x` / `.out.old-PID-x` folder as a killed writer leaves it."""
    folder = out.parent / f".{out.name}.{role}-{pid}-{suffix}"
    folder.mkdir()
    (folder / "results.json").write_text(text)
    if marked:
        atomic.write_marker(folder, "benchmarks", complete=complete)
        if role == "tmp":  # the marker a writer wrote names that writer, not this test
            fields = json.loads((folder / MARKER).read_text())
            (folder / MARKER).write_text(json.dumps({**fields, "pid": pid}))
    return folder


# ---- a swap interrupted between its two renames ------------------------------------------------------

def test_a_process_killed_between_the_renames_is_finished_by_the_next_start(tmp_path):
    out = tmp_path / "out"
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from runtime import atomic
        out = atomic.Path({str(out)!r})
        with atomic.atomic_directory(out, kind="benchmarks") as tmp:
            (tmp / "results.json").write_text("old")
        real_replace = os.replace
        def replace(source, destination):
            if ".tmp-" in str(source) and not out.exists():  # rename 2, after rename 1 moved out aside
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(source, destination)
        atomic.os.replace = replace
        with atomic.atomic_directory(out, kind="benchmarks") as tmp:
            (tmp / "results.json").write_text("new")
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()  # what kill -9 leaves: no folder at the output path, only hidden ones
    assert sorted(path.name.split("-")[0] for path in tmp_path.iterdir()) == [".out.old", ".out.tmp"]

    check_output_dir(out, kind="benchmarks")  # the next start
    assert (out / "results.json").read_text() == "new"  # the new folder was complete: the swap is finished
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # and the old one deleted


def test_an_old_folder_is_put_back_when_the_new_one_was_not_complete(tmp_path):
    out, pid = tmp_path / "out", dead_pid()
    leftover(out, "old", pid, "old", complete=True)
    leftover(out, "tmp", pid, "half", complete=False)
    check_output_dir(out, kind="benchmarks")
    assert (out / "results.json").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_a_failing_second_rename_puts_the_old_folder_back_and_says_so_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_output(out, "old")
    real_replace = os.replace

    def full_disk(source, destination):
        if ".tmp-" in str(source):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        return real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(OutputWriteError) as error:
        write_output(out, "new")
    assert "\n" not in str(error.value) and "No space left on device" in str(error.value)
    assert f"{out} keeps its previous contents" in str(error.value)
    assert (out / "results.json").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


# ---- stale temporaries: only a dead run's own ---------------------------------------------------------

def test_stale_temporaries_of_a_dead_run_are_cleaned_and_a_live_runs_are_left(tmp_path):
    out = tmp_path / "out"
    write_output(out, "current")
    gone = dead_pid()
    stale = [leftover(out, "tmp", gone, "half", complete=False), leftover(out, "old", gone, "older", True)]
    live_writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = leftover(out, "tmp", live_writer.pid, "running", complete=False)
        unmarked = leftover(out, "tmp", gone, "?", complete=False, marked=False, suffix="nomark")  # not provably ours
        check_output_dir(out, kind="benchmarks")
        assert not any(path.exists() for path in stale)
        assert live.is_dir() and unmarked.is_dir()  # a running run's folder and an unmarked one stay
        assert (out / "results.json").read_text() == "current"
    finally:
        live_writer.kill()
        live_writer.wait()


# ---- a folder is replaced only when its marker says it is ours --------------------------------------

@pytest.mark.parametrize("files", [["config.json"], ["config.json", "model.pt"]])
def test_a_user_folder_without_the_marker_is_refused_by_save_model(tmp_path, files):
    from minigpt.checkpoint import save_model
    from minigpt.config import GPTConfig
    from minigpt.model import MiniGPT
    from tokenizer import WordTokenizer
    tokenizer = WordTokenizer.from_corpus(["the cat sits ."])
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, n_heads=2, n_layers=1))
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in files:
        (mine / name).write_text("my own")
    with pytest.raises(ValueError, match=rf"already holds .* but no {MARKER}.*nothing was written"):
        save_model(model, tokenizer, mine)
    assert sorted(path.name for path in mine.iterdir()) == files
    assert all((mine / name).read_text() == "my own" for name in files)
    assert [path.name for path in tmp_path.iterdir()] == ["mine"]


def test_a_user_folder_with_results_and_a_plot_is_refused_by_finetune_before_any_work(tmp_path, monkeypatch):
    from finetuning import experiment
    monkeypatch.setattr(experiment, "use_threads", lambda *args: pytest.fail("work started"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text("{}")
    (mine / "comparison.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=rf"comparison.png, results.json but no {MARKER}"):
        experiment.main(experiment.FinetuneConfig(out=str(mine), base=str(tmp_path / "base")))
    assert sorted(path.name for path in mine.iterdir()) == ["comparison.png", "results.json"]


def test_a_marked_folder_of_another_kind_is_refused(tmp_path):
    out = tmp_path / "out"
    write_output(out, "a checkpoint, say", kind="checkpoint")
    with pytest.raises(ValueError, match="output of kind 'checkpoint'.*not of kind 'benchmarks'"):
        write_output(out, "results")
    assert (out / "results.json").read_text() == "a checkpoint, say"


# ---- inputs inside the output folder ------------------------------------------------------------------

@pytest.mark.parametrize("base, out, message", [
    ("run/base", "run", "--base .*run/base is inside the output folder"),
    ("run", "run", "--base .*run is inside the output folder"),
    ("run", "run/results", "output folder .*run/results is inside --base"),
])
def test_base_and_out_overlapping_is_refused_before_any_work(tmp_path, monkeypatch, base, out, message):
    from finetuning import experiment
    monkeypatch.setattr(experiment, "use_threads", lambda *args: pytest.fail("work started"))
    (tmp_path / base).mkdir(parents=True, exist_ok=True)
    (tmp_path / base / "model.pt").write_text("the base")
    config = experiment.FinetuneConfig(base=str(tmp_path / base), out=str(tmp_path / out))
    with pytest.raises(ValueError, match=message):
        experiment.main(config)
    assert (tmp_path / base / "model.pt").read_text() == "the base"


def test_train_py_data_inside_out_is_refused_before_training(tmp_path):
    from minigpt import pretrain
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "text.txt").write_text("the cat sits on the mat .\n" * 30)
    config = pretrain.PretrainConfig(data=str(tmp_path / "run" / "text.txt"), out=str(tmp_path / "run"),
                                     device="cpu", progress=False, plot=False)
    with pytest.raises(ValueError, match="--data .*text.txt is inside the output folder"):
        pretrain.main(config)
    assert (tmp_path / "run" / "text.txt").is_file()


# ---- no room, no permission: refused up front, in one line -------------------------------------------

def test_a_read_only_folder_is_refused_before_training(tmp_path, monkeypatch):
    from minigpt import pretrain

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(atomic, "open", read_only, raising=False)  # the probe write (root ignores chmod)
    monkeypatch.setattr(pretrain, "train_model", lambda *args, **kwargs: pytest.fail("training started"))
    config = pretrain.PretrainConfig(out=str(tmp_path / "base"), device="cpu", progress=False, plot=False)
    with pytest.raises(OutputWriteError, match=r"cannot write in .*Read-only file system.*nothing was written"):
        pretrain.main(config)
    assert not list(tmp_path.iterdir())


def test_a_nearly_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    from minigpt import pretrain
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    monkeypatch.setattr(pretrain, "train_model", lambda *args, **kwargs: pytest.fail("training started"))
    config = pretrain.PretrainConfig(out=str(tmp_path / "base"), device="cpu", progress=False, plot=False)
    with pytest.raises(OutputWriteError, match=r"has 0.0 MB free, but base needs about .* MB"):
        pretrain.main(config)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_failing_while_writing_keeps_the_old_checkpoint_and_exits_with_one_line(tmp_path, monkeypatch, code):
    from minigpt import checkpoint
    from minigpt.config import GPTConfig
    from minigpt.model import MiniGPT
    from runtime.cli import run_script
    from tokenizer import WordTokenizer
    tokenizer = WordTokenizer.from_corpus(["the cat sits ."])
    model = MiniGPT(GPTConfig(vocab_size=tokenizer.vocab_size, embed_dim=8, n_heads=2, n_layers=1))
    out = checkpoint.save_model(model, tokenizer, tmp_path / "base")
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def failing_save(obj, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_script(lambda config: checkpoint.save_model(model, tokenizer, out), None, out)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)  # run_script installs its own
    message = str(exit_info.value.code)
    assert message.startswith(f"error: could not write {out}: {os.strerror(code)}") and "\n" not in message
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["base"]
