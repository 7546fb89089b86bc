"""Write a whole output folder or nothing: build it under a temporary name, then rename it into place.

An interrupted run (Ctrl-C, a crash, a full disk) must never leave a half-written checkpoint that a
later run would load. Renaming a folder is atomic on one filesystem, so readers see either the old
folder or the complete new one.

    with atomic_directory("dist/base_model", outputs=CHECKPOINT_FILES) as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        ...                      # on an exception, tmp is deleted and dist/base_model is untouched

Replacing a folder deletes everything in it, so an existing folder is replaced only when it is a
previous output of the same kind: it is empty, or every name in it is one that this kind of output
consists of (`outputs`; by default the names the new folder holds). A folder with anything else in it
(your notes.txt, a project, the current folder) is refused with a clear message and left untouched.
Scripts call check_output_dir() with the same `outputs` before they train, so the refusal comes first.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional


def check_output_dir(final_dir, outputs=None) -> Path:
    """Raise ValueError unless `final_dir` may be written as a whole (created, or replaced); returns it as a Path.

    Args:
        final_dir: the output folder.
        outputs: the file and folder names this kind of output consists of, e.g.
            ("config.json", "model.pt", "tokenizer.json"). An existing folder holding anything else is
            refused. None checks only the path itself (atomic_directory then checks the contents
            against what it wrote, before it replaces anything).

    Example:
        >>> check_output_dir("dist/a_new_run", outputs=["config.json", "model.pt", "tokenizer.json"]).name
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
    if outputs is not None and final_dir.is_dir():
        foreign = sorted(path.name for path in final_dir.iterdir() if path.name not in set(outputs))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(
                f"output folder {final_dir} already holds {shown}, which is not part of this output "
                f"({', '.join(sorted(outputs))}); writing there would replace the whole folder and lose it, "
                f"so nothing was written: move those files away, delete the folder, or choose another output folder")
    return final_dir


@contextlib.contextmanager
def atomic_directory(final_dir, outputs=None):
    """Yield a fresh temporary folder next to `final_dir`; on success it replaces `final_dir`.

    Args:
        final_dir: the folder to write.
        outputs: the names this kind of output consists of (see check_output_dir). An existing
            `final_dir` is replaced only if it holds nothing but these names and the names written
            into the temporary folder; otherwise ValueError, and `final_dir` is untouched.
    """
    final_dir = check_output_dir(final_dir, outputs)  # before anything is written
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield tmp_dir
        written = {path.name for path in tmp_dir.iterdir()}
        check_output_dir(final_dir, written | set(outputs or ()))  # subtle: the folder may have changed meanwhile
        # subtle: mkdtemp makes the folder private (0o700); give it the permissions mkdir would have given
        os.chmod(tmp_dir, 0o777 & ~current_umask())
        old_dir = swap_into_place(tmp_dir, final_dir)
    except BaseException:  # subtle: KeyboardInterrupt too, so Ctrl-C leaves nothing behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def swap_into_place(new_dir: Path, final_dir: Path) -> Optional[Path]:
    """Rename `new_dir` to `final_dir`; an existing `final_dir` first moves aside, and is returned
    (the caller deletes it) or, if the second rename fails, is put back, so `final_dir` always holds a
    complete folder: the old one or the new one."""
    if not final_dir.exists():
        os.replace(new_dir, final_dir)
        return None
    old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
    os.rmdir(old_dir)
    os.replace(final_dir, old_dir)
    try:
        os.replace(new_dir, final_dir)
    except BaseException:
        os.replace(old_dir, final_dir)  # put the previous folder back before the error goes on
        raise
    return old_dir


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
