"""vmio.jobfs without mounting anything: the commands it runs, what release keeps (hostile
input through vmio.joboutputs), and that plain directories are left alone. The mounts
themselves are tested in tests/integration/test_joboutputs_quota.py."""

from __future__ import annotations

import os
from typing import List, Sequence

import pytest

from vacfactory.vmio import jobfs
from vacfactory.vmio.jobfs import JobOutputsFS, copy_accepted
from vacfactory.vmio.joboutputs import JobOutputsLimits

KiB = 1024
#: sizes in whole blocks: the caps count allocated blocks too
LIMITS = JobOutputsLimits(max_file_bytes=16 * KiB, max_total_bytes=40 * KiB, max_files=4)


class Recorder:
    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def __call__(self, argv: Sequence[str]) -> None:
        self.calls.append(list(argv))


def _vm(tmp_path) -> str:
    directory = tmp_path / "machines" / "u1" / "joboutputs"
    directory.mkdir(parents=True)
    return str(directory)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="ext4, tmpfs, none"):
        JobOutputsFS("xfs")


def test_tmpfs_is_mounted_with_the_caps_and_without_suid_devices_or_exec(tmp_path):
    runner = Recorder()
    directory = _vm(tmp_path)
    JobOutputsFS("tmpfs", LIMITS, runner=runner).create(directory)
    assert runner.calls == [["mount", "-t", "tmpfs", "-o",
                             "size=40960,nr_inodes=68,mode=0755,nosuid,nodev,noexec,noatime",
                             "tmpfs", directory]]


def test_none_makes_nothing_and_release_leaves_a_plain_directory_alone(tmp_path):
    runner = Recorder()
    directory = _vm(tmp_path)
    (tmp_path / "machines" / "u1" / "joboutputs" / "heartbeat").write_text("x")
    fs = JobOutputsFS("none", LIMITS, runner=runner)
    fs.create(directory)
    fs.release(directory)
    JobOutputsFS("ext4", LIMITS, runner=runner).release(directory)
    assert runner.calls == []
    assert os.listdir(directory) == ["heartbeat"]
    assert sorted(os.listdir(os.path.dirname(directory))) == ["joboutputs"]


def test_remount_does_nothing_without_an_image(tmp_path):
    runner = Recorder()
    assert JobOutputsFS("ext4", LIMITS, runner=runner).remount(_vm(tmp_path)) is False
    assert runner.calls == []


def test_release_keeps_only_what_passes_the_hostile_input_rules(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "shutdown_message").write_bytes(b"200 Success\n")
    (source / "log").write_bytes(b"a" * 8 * KiB)
    os.utime(source / "log", (1_000_000, 1_000_000))
    (source / "huge").write_bytes(b"b" * 20 * KiB)      # over max_file_bytes
    (source / "secret").symlink_to("/etc/shadow")       # never followed
    os.mkfifo(source / "heartbeat")                     # never opened
    (source / "linked").write_bytes(b"c")
    os.link(source / "linked", source / "linked2")      # hard links: refused
    (source / "bad\nname").write_bytes(b"d")            # bad name
    (source / "sub").mkdir()                            # directories are not copied
    dest = tmp_path / "dest"
    dest.mkdir()
    assert copy_accepted(str(source), str(dest), LIMITS) == 2
    assert sorted(os.listdir(dest)) == ["log", "shutdown_message"]
    assert (dest / "shutdown_message").read_bytes() == b"200 Success\n"
    assert os.stat(dest / "log").st_mtime == 1_000_000   # heartbeat ages stay true


def test_release_keeps_no_more_than_the_total_cap(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(5):
        (source / f"f{i}").write_bytes(b"x" * 16 * KiB)
    dest = tmp_path / "dest"
    dest.mkdir()
    copied = copy_accepted(str(source), str(dest), LIMITS)
    assert copied == 2 and sum(os.path.getsize(dest / n) for n in os.listdir(dest)) <= 40 * KiB


def test_the_image_and_saved_copy_sit_beside_joboutputs(tmp_path):
    directory = _vm(tmp_path)
    parent = os.path.dirname(directory)
    assert jobfs.image_path(directory) == os.path.join(parent, "joboutputs.img")
    assert jobfs.saved_path(directory + "/") == os.path.join(parent, "joboutputs.saved")


@pytest.mark.parametrize("settings,kind", [
    ("", "ext4"),  # the default: ganesha, ext4
    ("joboutputs_nfs_filesystem = tmpfs\n", "tmpfs"),
    ("nfs_exporter = exportfs\njoboutputs_nfs_filesystem = none\n", "none"),
    ("nfs_exporter = none\n", "none"),  # nothing is exported: nobody writes over NFS
])
def test_the_daemon_makes_the_configured_kind_with_the_joboutputs_caps(tmp_path, settings, kind):
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import ConfigSources, load_config
    from vacfactory.daemon import make_jobfs

    main = tmp_path / "vacfactory.conf"
    main.write_text("[settings]\nvac_space = vac01.example.com\nfactory_name = wn01.example.com\n"
                    f"state_dir = {tmp_path / 'state'}\njoboutputs_max_total_bytes = 50000000\n"
                    "joboutputs_max_files = 7\n" + settings)
    config = load_config(ConfigSources.for_main_file(str(main)),
                         host_facts=HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384))
    made = make_jobfs(config)
    assert made.kind == kind
    assert (made.limits.max_total_bytes, made.limits.max_files) == (50000000, 7)


def test_an_unknown_filesystem_kind_is_a_located_config_error(tmp_path):
    from vacfactory.config.hostfacts import HostFacts
    from vacfactory.config.loader import ConfigSources, load_config
    from vacfactory.errors import ConfigErrors

    main = tmp_path / "vacfactory.conf"
    main.write_text("[settings]\nvac_space = vac01.example.com\nfactory_name = wn01.example.com\n"
                    f"state_dir = {tmp_path / 'state'}\njoboutputs_nfs_filesystem = xfs\n")
    with pytest.raises(ConfigErrors) as caught:
        load_config(ConfigSources.for_main_file(str(main)),
                    host_facts=HostFacts(fqdn="wn01.example.com", cpu_count=8, mem_total_mb=16384))
    assert any(str(e).startswith(f"{main}:5: [settings] joboutputs_nfs_filesystem: ")
               for e in caught.value.errors), [str(e) for e in caught.value.errors]
