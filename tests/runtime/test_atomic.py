"""runtime/atomic.py: an output folder is replaced as a whole or not at all, and never one that holds
something else (a symbolic link, the current folder, a folder of other files)."""

import pytest

from runtime.atomic import atomic_directory, check_output_dir


def test_atomic_directory_by_default_replaces_only_what_it_writes(tmp_path):
    out = tmp_path / "results"
    with atomic_directory(out) as tmp:
        (tmp / "results.json").write_text("1")
    with atomic_directory(out) as tmp:  # its own previous output: replaced
        (tmp / "results.json").write_text("2")
    assert (out / "results.json").read_text() == "2"
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt"):
        with atomic_directory(out) as tmp:
            (tmp / "results.json").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [".minilora-output.json", "notes.txt", "results.json"]
    assert (out / "results.json").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["results"]


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    import os
    from runtime import atomic
    final = tmp_path / "out"
    with atomic.atomic_directory(final) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(source, destination):
        if ".tmp-" in str(source):  # the new folder taking the final name
            raise OSError("disk gone")
        return real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic.atomic_directory(final) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no .tmp- or .old- left


@pytest.mark.parametrize("name, message", [("", "empty name"), (".", "current folder"), ("..", "folder above it"),
                                           ("here", "current folder"), ("a_file", "is a file, not a folder")])
def test_check_output_dir_refuses_names_that_would_delete_too_much(tmp_path, monkeypatch, name, message):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "a_file").write_text("x")
    monkeypatch.chdir(tmp_path / "here")
    target = str(tmp_path / "here") if name == "here" else name
    with pytest.raises(ValueError, match=message):
        check_output_dir(target)
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["a_file"]


def test_a_symlinked_output_folder_is_refused(tmp_path):
    from runtime.atomic import check_output_dir
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="symbolic link"):
        check_output_dir(tmp_path / "link")
