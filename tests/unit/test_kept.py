"""state.kept: disks of abnormally ended VMs kept read-only, capped, expired, crash-safe."""

from __future__ import annotations

import os
import stat

import pytest

from vacfactory.errors import StateError
from vacfactory.state import kept
from vacfactory.state.kept import abnormal_end, expire_kept, keep_overlay, kept_backing_files, list_kept, load_kept

NOW = 1705499379.0
DAY = 86400.0


def machine_with_disks(tmp_path, uuid: str, disks=("root.qcow2", "scratch.qcow2", "config.iso")) -> str:
    path = tmp_path / "state" / "machines" / uuid
    (path / "disks").mkdir(parents=True)
    for name in disks:
        (path / "disks" / name).write_bytes(b"QFI\xfb" + name.encode())
    return str(path)


def keep(tmp_path, uuid: str, **changes):
    args = dict(uuid=uuid, name=f"f-{uuid[:2]}.example.org", machinetype="alpha", reason="killed: wallclock",
                now=NOW, days=7, backing_file="/var/lib/vacfactory/imagecache/base-1.img")
    args.update(changes)
    return keep_overlay(str(tmp_path / "state"), machine_with_disks(tmp_path, uuid), **args)


@pytest.mark.parametrize("reason,code,expected", [
    ("heartbeat_not_updated", 700, "killed: heartbeat_not_updated"),
    ("heartbeat_not_created", 700, "killed: heartbeat_not_created"),
    ("wallclock", None, "killed: wallclock"),
    ("paused", None, "killed: paused"),
    ("shutdown_message", 503, "shutdown_message 503"),
    ("shutdown_message", 600, "shutdown_message 600"),
    ("shutdown_message", 799, "shutdown_message 799"),
    ("shutdown_message", 200, None),
    ("shutdown_message", 300, None),
    ("shutdown_message", 400, None),
    ("no_message", None, None),
    ("shutdown_time", None, None),
    ("draining", None, None),
    ("create_failed", None, None),
])
def test_which_ends_are_abnormal(reason, code, expected):
    assert abnormal_end(reason, code) == expected


def test_disks_move_read_only_with_a_record(tmp_path):
    uuid = "aa000000-0000-4000-8000-000000000001"
    record = keep(tmp_path, uuid)
    state = str(tmp_path / "state")
    assert record is not None and record.disks == ("root.qcow2", "scratch.qcow2")
    assert record.until == NOW + 7 * DAY and record.path == os.path.join(state, "kept", uuid)
    machine_disks = os.listdir(os.path.join(state, "machines", uuid, "disks"))
    assert machine_disks == ["config.iso"]  # left for the clean step to remove
    for path in record.disk_paths():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
        with open(path, "rb") as f:
            assert f.read().startswith(b"QFI\xfb")
    assert stat.S_IMODE(os.stat(record.path).st_mode) == 0o500
    assert load_kept(state, uuid) == record
    assert kept_backing_files(state) == {"/var/lib/vacfactory/imagecache/base-1.img"}


def test_keeping_twice_returns_the_first_record(tmp_path):
    uuid = "aa000000-0000-4000-8000-000000000002"
    first = keep(tmp_path, uuid)
    again = keep_overlay(str(tmp_path / "state"), str(tmp_path / "state" / "machines" / uuid), uuid=uuid,
                         name="x", machinetype="alpha", reason="other", now=NOW + 100, days=1)
    assert again == first


def test_nothing_to_keep_without_disks(tmp_path):
    uuid = "aa000000-0000-4000-8000-000000000003"
    assert keep(tmp_path, uuid) is not None
    other = "aa000000-0000-4000-8000-000000000004"
    path = machine_with_disks(tmp_path, other, disks=("config.iso",))
    assert keep_overlay(str(tmp_path / "state"), path, uuid=other, name="n", machinetype="alpha",
                        reason="r", now=NOW, days=1) is None


def test_the_cap_keeps_older_evidence(tmp_path):
    state = str(tmp_path / "state")
    for i in range(2):
        assert keep(tmp_path, f"bb00000{i}-0000-4000-8000-000000000000", max_kept=2) is not None
    assert keep(tmp_path, "bb000009-0000-4000-8000-000000000000", max_kept=2) is None
    assert [k.uuid[:8] for k in list_kept(state)] == ["bb000000", "bb000001"]
    assert os.path.exists(os.path.join(state, "machines", "bb000009-0000-4000-8000-000000000000", "disks",
                                       "root.qcow2"))


def test_a_crash_midway_is_finished_by_the_retry(tmp_path, monkeypatch):
    uuid = "cc000000-0000-4000-8000-000000000001"
    state = str(tmp_path / "state")
    path = machine_with_disks(tmp_path, uuid)
    real_rename = os.rename
    calls = []

    def crash_after_first_disk(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(kept.os, "rename", crash_after_first_disk)
    with pytest.raises(StateError):
        keep_overlay(state, path, uuid=uuid, name="n", machinetype="alpha", reason="killed: wallclock",
                     now=NOW, days=7)
    monkeypatch.setattr(kept.os, "rename", real_rename)
    assert load_kept(state, uuid) is None  # still staging
    record = keep_overlay(state, path, uuid=uuid, name="n", machinetype="alpha", reason="retry",
                          now=NOW + 60, days=7)
    assert record is not None and record.reason == "killed: wallclock" and record.kept_time == NOW
    assert sorted(os.listdir(record.path)) == ["kept.json", "root.qcow2", "scratch.qcow2"]
    assert not os.path.exists(os.path.join(state, "kept", ".new-" + uuid))


def test_expire_removes_past_their_time_and_abandoned_staging(tmp_path):
    state = str(tmp_path / "state")
    short = keep(tmp_path, "dd000000-0000-4000-8000-000000000001", days=1)
    long = keep(tmp_path, "dd000000-0000-4000-8000-000000000002", days=30)
    stale = os.path.join(state, "kept", ".new-dd000000-0000-4000-8000-000000000003")
    os.makedirs(stale)
    os.utime(stale, (NOW - 2 * DAY, NOW - 2 * DAY))
    fresh = os.path.join(state, "kept", ".new-dd000000-0000-4000-8000-000000000004")
    os.makedirs(fresh)
    os.utime(fresh, (NOW + 1.5 * DAY, NOW + 1.5 * DAY))
    assert expire_kept(state, NOW + 0.5 * DAY) == ["dd000000-0000-4000-8000-000000000003"]
    assert sorted(expire_kept(state, NOW + 2 * DAY)) == [short.uuid]
    assert not os.path.exists(short.path) and os.path.exists(long.path) and os.path.exists(fresh)
    assert [k.uuid for k in list_kept(state)] == [long.uuid]
