"""vacfactory.atomic: whole-file replacement, modes, no temporaries left behind, stale
temporaries removed, and the fsyncs that make a write durable."""

from __future__ import annotations

import json
import os
import stat

import pytest

from vacfactory import atomic
from vacfactory.atomic import (
    TEMP_PREFIX,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_directory,
    remove_stale_temporaries,
    write_new_file,
)


def temporaries(directory) -> list:
    return sorted(name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX))


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def restrictive_umask():
    old = os.umask(0o077)
    yield
    os.umask(old)


# --------------------------------------------------------------------------- content


def test_a_shorter_write_replaces_the_whole_file(tmp_path):
    path = str(tmp_path / "status.json")
    atomic_write_bytes(path, b"x" * 10000)
    atomic_write_bytes(path, b"short")
    with open(path, "rb") as f:
        assert f.read() == b"short"  # no tail of the old content
    assert temporaries(tmp_path) == []


def test_the_file_is_replaced_by_rename_so_a_reader_keeps_the_old_version(tmp_path):
    path = str(tmp_path / "heartbeat")
    atomic_write_text(path, "old version\n")
    inode = os.stat(path).st_ino
    with open(path) as reader:
        atomic_write_text(path, "new version\n", sync=False)
        assert reader.read() == "old version\n"  # never rewritten in place
    assert os.stat(path).st_ino != inode
    with open(path) as f:
        assert f.read() == "new version\n"


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    path = str(tmp_path / "vm.json")
    atomic_write_json(path, {"b": 1, "a": [1, 2], "c": "é"})
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text == json.dumps({"a": [1, 2], "b": 1, "c": "é"}, sort_keys=True, indent=1) + "\n"
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')


def test_text_is_written_as_utf8(tmp_path):
    path = str(tmp_path / "note")
    atomic_write_text(path, "naïve\n")
    with open(path, "rb") as f:
        assert f.read() == "naïve\n".encode("utf-8")


def test_a_relative_path_is_written_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_bytes("relative", b"here")
    with open(tmp_path / "relative", "rb") as f:
        assert f.read() == b"here"
    assert temporaries(tmp_path) == []


# --------------------------------------------------------------------------- modes


def test_a_new_file_gets_0644_by_default_whatever_the_umask(tmp_path, restrictive_umask):
    path = str(tmp_path / "record")
    atomic_write_bytes(path, b"data")
    assert mode_of(path) == 0o644  # mkstemp makes 0600; the helper sets the documented mode


def test_the_given_mode_is_set_even_over_an_existing_file_with_another_mode(tmp_path, restrictive_umask):
    path = str(tmp_path / "secret")
    atomic_write_bytes(path, b"first", mode=0o600)
    assert mode_of(path) == 0o600
    atomic_write_text(path, "second", mode=0o640)
    assert mode_of(path) == 0o640  # the mode argument wins: the old file's mode is not kept
    atomic_write_json(path, [1])
    assert mode_of(path) == 0o644


def test_write_new_file_creates_with_its_mode_and_refuses_an_existing_name(tmp_path):
    path = str(tmp_path / "user_data")
    write_new_file(path, b"#!/bin/sh\n", mode=0o600)
    with open(path, "rb") as f:
        assert f.read() == b"#!/bin/sh\n"
    assert mode_of(path) == 0o600
    with pytest.raises(FileExistsError):
        write_new_file(path, b"again")
    with open(path, "rb") as f:
        assert f.read() == b"#!/bin/sh\n"


def test_write_new_file_never_follows_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_new_file(str(link), b"through the link")
    assert target.read_bytes() == b"untouched"


# --------------------------------------------------------------------------- failures


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "finished")
    atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert temporaries(tmp_path) == []


def test_data_that_cannot_be_written_leaves_no_temporary(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(str(tmp_path / "record"), "not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_a_failing_rename_leaves_no_temporary(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "child").write_bytes(b"x")  # a non-empty directory cannot be renamed over
    with pytest.raises(OSError):
        atomic_write_bytes(str(target), b"data")
    assert temporaries(tmp_path) == []
    assert (target / "child").read_bytes() == b"x"


def test_an_interrupted_write_leaves_no_temporary(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(str(tmp_path / "record"), b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_is_an_error_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(str(tmp_path / "absent" / "record"), b"data")
    assert not (tmp_path / "absent").exists()


# --------------------------------------------------------------------------- stale temporaries


def test_stale_temporaries_are_removed_and_counted_other_files_kept(tmp_path):
    for name in (f"{TEMP_PREFIX}abc", f"{TEMP_PREFIX}xyz", "vm.json", "tmp-not-ours", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"{TEMP_PREFIX}dir").mkdir()  # not a file a write left: skipped, not an error
    assert remove_stale_temporaries(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == sorted([".hidden", f"{TEMP_PREFIX}dir", "tmp-not-ours", "vm.json"])
    assert remove_stale_temporaries(str(tmp_path)) == 0


def test_stale_temporaries_of_a_missing_directory_are_none(tmp_path):
    assert remove_stale_temporaries(str(tmp_path / "absent")) == 0


def test_a_temporary_left_by_a_crash_has_the_prefix_the_cleaner_removes(tmp_path, monkeypatch):
    def crash(src, dst):
        raise SystemExit("killed between the write and the rename")

    # the cleanup in the helper is what a kill -9 would skip: simulate that by making unlink fail
    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "unlink", lambda path: None)
    with pytest.raises(SystemExit):
        atomic_write_bytes(str(tmp_path / "record"), b"data")
    monkeypatch.undo()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(TEMP_PREFIX)
    assert remove_stale_temporaries(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- fsync


def test_a_synced_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("file", fd)), real_fsync(fd))[1])
    monkeypatch.setattr(atomic, "fsync_directory", lambda d: calls.append(("dir", d)))
    path = str(tmp_path / "accounted")
    atomic_write_bytes(path, b"data")
    assert [kind for kind, _ in calls] == ["file", "dir"]
    assert calls[1][1] == str(tmp_path)


def test_an_unsynced_write_makes_no_fsync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    monkeypatch.setattr(atomic, "fsync_directory", lambda d: calls.append(d))
    atomic_write_json(str(tmp_path / "heartbeat"), {"time": 1}, sync=False)
    assert calls == []
    with open(tmp_path / "heartbeat") as f:
        assert json.load(f) == {"time": 1}


def test_fsync_directory_syncs_an_existing_directory_and_refuses_anything_else(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                real_fsync(fd))[1])
    fsync_directory(str(tmp_path))
    assert synced == [os.path.realpath(tmp_path)]
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fsync_directory(str(tmp_path / "file"))
    with pytest.raises(FileNotFoundError):
        fsync_directory(str(tmp_path / "absent"))


def test_a_temporary_file_is_removed_when_its_writing_fails_and_kept_when_it_succeeds(tmp_path):
    failed, kept = tmp_path / ".tmp-failed", tmp_path / ".tmp-kept"
    failed.write_bytes(b"half")
    with pytest.raises(KeyboardInterrupt):  # a signal too, not only errors
        with atomic.removed_on_failure(str(failed)):
            raise KeyboardInterrupt
    assert not failed.exists()
    with pytest.raises(OSError):
        with atomic.removed_on_failure(str(tmp_path / ".tmp-never-made")):  # nothing to remove: fine
            raise OSError("disk full")
    kept.write_bytes(b"whole")
    with atomic.removed_on_failure(str(kept)):
        pass
    assert kept.read_bytes() == b"whole"


def test_write_new_file_writes_a_body_larger_than_one_write(tmp_path):
    path = str(tmp_path / "record")
    body = os.urandom(3 << 20)  # every byte lands even where one os.write would take only part
    write_new_file(path, body)
    with open(path, "rb") as f:
        assert f.read() == body
