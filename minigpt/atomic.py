"""Write a whole output folder or nothing: build it under a temporary name, then rename it into place.

An interrupted run (Ctrl-C, a crash, a full disk) must never leave a half-written checkpoint that a
later run would load. Renaming a folder is atomic on one filesystem, so readers see either the old
folder or the complete new one.

    with atomic_directory("dist/base_model") as tmp:
        torch.save(model.state_dict(), tmp / "model.pt")
        ...                      # on an exception, tmp is deleted and dist/base_model is untouched
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(final_dir):
    """Yield a fresh temporary folder next to `final_dir`; on success it replaces `final_dir`."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        yield tmp_dir
    except BaseException:  # subtle: KeyboardInterrupt too, so Ctrl-C leaves nothing behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if final_dir.exists():
        # Two renames: the old folder moves aside, the new one takes its name, then the old one goes.
        old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        os.rmdir(old_dir)
        os.replace(final_dir, old_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
