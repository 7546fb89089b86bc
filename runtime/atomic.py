"""Write a whole output folder or nothing: build it under a temporary name, then swap it in with renames.

An interrupted run (Ctrl-C, a crash, `kill -9`, a full disk) must never leave a half-written checkpoint
that a later run would load, and must never lose the previous result. The idea, in two steps:

    1. build      dist/.base_model.tmp-4242-k3j9/       every file of the new folder, then the marker
    2. swap       dist/base_model  -> dist/.base_model.old-4242-k3j9    (rename 1: the old result aside)
                  dist/.base_model.tmp-4242-k3j9 -> dist/base_model     (rename 2: the new one in)
                  then delete the .old- folder

A rename is atomic on one filesystem: readers see the old folder or the complete new one, never a mix.

    with atomic_directory("dist/base_model", kind="checkpoint") as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        ...                      # on an exception, tmp is deleted and dist/base_model is untouched

The marker. Every folder written here holds `.minilora-output.json` (MARKER): the kind of output
("checkpoint", "adapter", "finetune-results", ...), the files it was written with, and the writer's
process id. Replacing a folder deletes everything in it, so an existing folder is replaced only when
it is empty, or its marker says it is a previous output of the same kind and it holds nothing but
the files written then. A folder without a marker (your own config.json, your results.json) is
refused with a clear message and left untouched. One exception, for folders written before markers
existed: a checkpoint or adapter folder that holds exactly that output's full file set
(`legacy_files`) is accepted, as before; results folders need the marker. The marker's name starts
with a dot, so folder listings (`ls`) leave it out; the loaders only open the files they know.

Recovery. A process killed at the wrong moment leaves something behind; the next start (check_output_dir
and atomic_directory call recover_interrupted_swap) repairs it, by three rules:

    rule 1  killed between the two renames: the output path is missing and the new folder is complete
            (its marker says so) -> finish the swap: rename the new folder into place.
    rule 2  the output path is missing, no complete new folder, but an .old- folder -> put it back.
    rule 3  every other leftover .tmp- / .old- folder is garbage: delete it.

It touches only leftovers it can prove are its own: named `.<name>.tmp-<pid>-...` or `.<name>.old-<pid>-...`,
holding the marker, and whose writing process <pid> is gone (os.kill(pid, 0) fails). A running run's
temporary folder is never touched.

Before training, scripts call check_output_dir (is the folder ours to replace?), check_inputs_outside
(is no input inside the output folder?) and check_room (can we write there, is there space?), so a
refusal comes before any work. A full disk or a read-only folder while writing is a one-line
OutputWriteError, and the previous folder stays as it was.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

MARKER = ".minilora-output.json"  # written inside every output folder this project creates
MARKER_FORMAT_VERSION = 1
ROOM_MARGIN = 1.5  # check_room asks for the estimated size times this, plus ROOM_EXTRA_BYTES
ROOM_EXTRA_BYTES = 1 << 20
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk, a full quota, a read-only filesystem


class OutputWriteError(ValueError):
    """Writing an output folder failed (full disk, read-only folder); the previous folder is intact."""


# ---- the marker -------------------------------------------------------------------------------------

def write_marker(folder: Path, kind: str, complete: bool) -> None:
    """Write MARKER into `folder`: the kind, the writer's pid and host, and, once complete, its file list."""
    fields = {"format_version": MARKER_FORMAT_VERSION, "kind": kind, "pid": os.getpid(),
              "host": socket.gethostname(), "complete": complete}
    if complete:
        fields["files"] = sorted(path.name for path in folder.iterdir() if path.name != MARKER)
    (folder / MARKER).write_text(json.dumps(fields, indent=1) + "\n")


def read_marker(folder: Path) -> Optional[dict]:
    """The marker's fields, or None when `folder` has no readable marker (a folder minilora did not write)."""
    try:
        fields = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) and isinstance(fields.get("kind"), str) else None


# ---- is this folder ours to replace? ---------------------------------------------------------------

def check_output_dir(final_dir, kind: Optional[str] = None, legacy_files=None) -> Path:
    """Raise ValueError unless `final_dir` may be written as a whole (created, or replaced); returns it as a Path.

    Args:
        final_dir: the output folder.
        kind: the kind of output about to be written ("checkpoint", "adapter", "finetune-results",
            "fact-correction-results", "benchmarks"). None checks only the path itself.
        legacy_files: the exact file set of this kind written before markers existed (e.g.
            ("config.json", "model.pt", "tokenizer.json")); such a folder without a marker is
            accepted. None: a folder without a marker is refused unless empty.

    Before looking at the folder, an interrupted swap of a dead run is repaired (recover_interrupted_swap).

    Example:
        >>> check_output_dir("dist/a_new_run", kind="checkpoint").name
        'a_new_run'
        >>> check_output_dir(".")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: output folder '.' is the current folder or a folder above it; replacing it would delete ...
        >>> check_output_dir("")
        Traceback (most recent call last):
        ValueError: output folder is an empty name; give a folder name, e.g. dist/run1
    """
    if not str(final_dir).strip():
        raise ValueError("output folder is an empty name; give a folder name, e.g. dist/run1")
    final_dir = Path(final_dir)
    resolved, here = final_dir.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise ValueError(f"output folder {str(final_dir)!r} is the current folder or a folder above it; replacing "
                         f"it would delete everything in it, so choose a new folder name, e.g. dist/run1")
    if final_dir.is_symlink():
        raise ValueError(f"output folder {final_dir} is a symbolic link; replacing it would replace the link, not "
                         f"the folder it points to: give the real folder's path")
    if final_dir.exists() and not final_dir.is_dir():
        raise ValueError(f"output folder {final_dir} is a file, not a folder; it is left alone: move it away or "
                         f"choose another output folder")
    if kind is None:
        return final_dir
    recover_interrupted_swap(final_dir)
    if final_dir.is_dir():
        check_replaceable(final_dir, kind, legacy_files)
    return final_dir


def check_replaceable(final_dir: Path, kind: str, legacy_files=None) -> None:
    """Raise ValueError unless the existing folder `final_dir` is empty or a previous `kind` output."""
    names = {path.name for path in final_dir.iterdir()}
    marker = read_marker(final_dir)
    if not names:
        return
    if marker is None:
        if legacy_files is not None and names == set(legacy_files):
            return  # a complete folder written before markers existed
        raise ValueError(
            f"output folder {final_dir} already holds {_shown(names)} but no {MARKER} (the marker minilora "
            f"writes into every output folder it creates), so it is not a previous output of kind {kind!r}; writing "
            f"there would replace the whole folder and lose it, so nothing was written: move those files "
            f"away, delete the folder, or choose another output folder")
    if marker["kind"] != kind:
        raise ValueError(
            f"output folder {final_dir} holds a minilora output of kind {marker['kind']!r} (its {MARKER} says "
            f"so), not of kind {kind!r}; nothing was written: choose another output folder, or delete that one")
    foreign = names - set(marker.get("files") or ()) - {MARKER}
    if foreign:
        raise ValueError(
            f"output folder {final_dir} already holds {_shown(foreign)}, which is not part of the output "
            f"written there ({', '.join(marker.get('files') or ())}); writing there would replace the whole "
            f"folder and lose it, so nothing was written: move those files away, delete the folder, or choose "
            f"another output folder")


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_inputs_outside(final_dir, inputs: dict) -> None:
    """Raise ValueError if an input lies inside the output folder (or is it), or the output inside an input.

    The output folder is replaced as a whole, so an input inside it would be deleted by the run that
    reads it. Paths are compared after resolving links and "..".

    Args:
        final_dir: the output folder.
        inputs: {option: path}, e.g. {"--base": "dist/base_model", "--data": None}; None entries are skipped.

    Example: check_inputs_outside("dist/out", {"--base": "dist/out/base"}) -> ValueError: --base
    dist/out/base is inside --out dist/out ...
    """
    out = Path(final_dir).resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == out or out in source.parents:
            raise ValueError(f"{option} {path} is inside the output folder {final_dir} (or is it), which the run "
                             f"replaces as a whole, deleting its own input; nothing was done: choose an output "
                             f"folder outside {path}, or move the input out")
        if source in out.parents:
            raise ValueError(f"the output folder {final_dir} is inside {option} {path}; nothing was done: choose "
                             f"an output folder outside {path}")


def check_room(final_dir, estimated_bytes: int) -> None:
    """Raise OutputWriteError unless the folder that will hold `final_dir` is writable and has room.

    A probe file is written and removed in the nearest existing folder above `final_dir`, and the free
    space (shutil.disk_usage) must cover `estimated_bytes` * ROOM_MARGIN + ROOM_EXTRA_BYTES.
    """
    final_dir = Path(final_dir).absolute()
    parent = final_dir.parent
    while not parent.exists():
        parent = parent.parent
    probe = parent / f".{final_dir.name}.probe-{os.getpid()}"
    try:
        with open(probe, "wb") as file:
            file.write(b"minilora")
        free = shutil.disk_usage(parent).free
    except OSError as error:
        raise OutputWriteError(f"cannot write in {parent} ({error.strerror or error}); nothing was written: "
                               f"choose an output folder where you may write") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    needed = int(estimated_bytes * ROOM_MARGIN) + ROOM_EXTRA_BYTES
    if free < needed:
        raise OutputWriteError(f"{parent} has {free / 1e6:.1f} MB free, but {final_dir.name} needs about "
                               f"{needed / 1e6:.1f} MB (an estimate with a margin); nothing was written: free "
                               f"some space or choose an output folder on another disk")


# ---- the atomic write -------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(final_dir, kind: str = "output", legacy_files=None):
    """Yield a fresh temporary folder next to `final_dir`; on success it replaces `final_dir`.

    Args:
        final_dir: the folder to write.
        kind: the kind of output, recorded in its marker (see check_output_dir).
        legacy_files: see check_output_dir. An existing `final_dir` that is not a previous `kind`
            output is a ValueError, and `final_dir` is untouched.

    Raises:
        OutputWriteError: the disk is full or read-only; the previous `final_dir` is intact.
    """
    final_dir = check_output_dir(final_dir, kind, legacy_files)  # before anything is written
    existed = final_dir.is_dir()
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        # the pid in the name and in the marker lets a later run tell a dead run's leftovers from a live one
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-{os.getpid()}-", dir=final_dir.parent))
    except OSError as error:
        raise _write_error(error, final_dir, existed) from None
    try:
        write_marker(tmp_dir, kind, complete=False)
        yield tmp_dir
        write_marker(tmp_dir, kind, complete=True)  # from here on, recovery rule 1 may finish this swap
        check_output_dir(final_dir, kind, legacy_files)  # subtle: the folder may have changed meanwhile
        if final_dir.is_dir() and read_marker(final_dir) is None:
            write_marker(final_dir, kind, complete=True)  # a legacy folder: marked, so rule 2 can put it back
        # subtle: mkdtemp makes the folder private (0o700); give it the permissions mkdir would have given
        os.chmod(tmp_dir, 0o777 & ~current_umask())
        old_dir = swap_into_place(tmp_dir, final_dir)
    except BaseException as error:  # subtle: KeyboardInterrupt too, so Ctrl-C leaves nothing behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            raise _write_error(error, final_dir, existed) from None
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _write_error(error: OSError, final_dir: Path, existed: bool) -> OutputWriteError:
    kept = f"{final_dir} keeps its previous contents" if existed else f"{final_dir} was not created"
    return OutputWriteError(f"could not write {final_dir}: {os.strerror(error.errno)} ({error.filename or final_dir}); "
                            f"{kept}: free some space or choose a writable output folder")


def swap_into_place(new_dir: Path, final_dir: Path) -> Optional[Path]:
    """Rename `new_dir` (named `.<name>.tmp-<token>`) to `final_dir`; returns the previous folder, or None.

    An existing `final_dir` first moves aside to `.<name>.old-<token>` and is returned (the caller
    deletes it); if the second rename fails, it is put back. Killed between the two renames, the
    process leaves no `final_dir`: recover_interrupted_swap repairs that on the next start.
    """
    if not final_dir.exists():
        os.replace(new_dir, final_dir)
        return None
    token = new_dir.name[len(f".{final_dir.name}.tmp-"):]
    old_dir = final_dir.parent / f".{final_dir.name}.old-{token}"
    os.replace(final_dir, old_dir)  # rename 1
    try:
        os.replace(new_dir, final_dir)  # rename 2
    except BaseException:
        os.replace(old_dir, final_dir)  # put the previous folder back before the error goes on
        raise
    return old_dir


# ---- recovery after a killed run --------------------------------------------------------------------

def recover_interrupted_swap(final_dir) -> None:
    """Repair what a killed writer of `final_dir` left next to it (rules 1-3 of the module docstring).

    Only leftovers of writers that are gone are touched (dead_leftovers); renames that fail (another
    process repairing the same folder at the same moment) are skipped.
    """
    final_dir = Path(final_dir)
    leftovers = dead_leftovers(final_dir)
    if not final_dir.exists() and not final_dir.is_symlink():
        newest_first = sorted(leftovers, key=lambda path: path.stat().st_mtime, reverse=True)
        complete = [path for path in newest_first if ".tmp-" in path.name and read_marker(path).get("complete")]
        previous = [path for path in newest_first if ".old-" in path.name]
        for candidate in (complete + previous)[:1]:  # rule 1 (finish the swap), else rule 2 (put the old back)
            with contextlib.suppress(OSError):
                os.replace(candidate, final_dir)
    for path in leftovers:  # rule 3: the rest is garbage
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def dead_leftovers(final_dir: Path) -> list:
    """The `.<name>.tmp-<pid>-*` and `.<name>.old-<pid>-*` folders next to `final_dir` that provably
    belong to a writer that is gone: the name matches, the marker is there, and process <pid> is not
    running (a .tmp- folder's marker must also name that pid and this host)."""
    pattern = re.compile(rf"\.{re.escape(final_dir.name)}\.(tmp|old)-(\d+)-\w+")
    if not final_dir.parent.is_dir():
        return []
    found = []
    for path in final_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        role, pid = match.group(1), int(match.group(2))
        marker = read_marker(path)
        if marker is None or not process_is_gone(pid):
            continue
        if role == "tmp" and (marker.get("pid") != pid or marker.get("host") != socket.gethostname()):
            continue  # subtle: a pid means nothing on another machine sharing this disk
        found.append(path)
    return found


def process_is_gone(pid: int) -> bool:
    """True when no process `pid` runs on this machine (signal 0 checks, and sends nothing)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, under another user
    except (OverflowError, OSError):
        return False  # not a pid we can check: leave it alone
    return False


def current_umask() -> int:
    """The process's umask (e.g. 0o022), which decides the permissions of newly created files."""
    mask = os.umask(0)  # subtle: the only portable way to read it is to set it, then put it back at once
    os.umask(mask)
    return mask


def folder_identity(path) -> Optional[tuple]:
    """(device, inode) of a folder, or None if there is none: compared before and after a run, it tells
    whether the atomic rename replaced the folder meanwhile (an interrupted run then says so)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino
