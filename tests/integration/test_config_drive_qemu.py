"""The config drive, proved with a real TCG guest created by the real daemon (`vacfactory run`).

One factory with ``config_drive = true`` and a ``root_public_key`` starts one tiny guest. The
guest's /init (images/guest-init) looks for an ISO labelled ``config-2`` before it asks the
metadata server, and says on the console which source its user_data came from. The user_data
reads the drive's ``openstack/latest/meta_data.json`` and POSTs what it found to the joboutputs
URL named in it; the test checks the report against what the factory recorded for the VM
(uuid, token, the public key, the MJF URLs) and that the guest never fetched user_data over
HTTP.

Only one daemon at a time can serve 169.254.169.253/.254 port 80, and every factory gives slot
0 the same MAC and IP: run it when no other real-VM test runs (``flock /tmp/vf-realvm.lock``).
``VFVB_KEEP=1`` keeps the state directory and logs (in /tmp/vfcd-*).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Dict

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.integration.realfactory import RealFactory, read, wait_for
from vacfactory.state.machines import Machine

pytestmark = pytest.mark.integration

#: the guest's report: one KEY=VALUE line per fact it read from the config drive
REPORTER = r"""#!/bin/sh
export PATH=/bin:/sbin
CD=$VF_CONFIG_DRIVE
MD=$CD/openstack/latest/meta_data.json
field() {  # NAME: the string value of "NAME" in meta_data.json (one key per line, no commas)
    tr ',{}' '\n\n\n' < "$MD" |
        sed -n "s/^[[:space:]]*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p" | head -n 1
}
R=/tmp/config_drive_report
{
    echo "config_drive=$CD"
    echo "uuid_in_user_data=##user_data_uuid##"
    echo "uuid=$(field uuid)"
    echo "hostname=$(field hostname)"
    echo "token=$(field vacfactory_token)"
    echo "public_key=$(field vacfactory)"
    echo "machinefeatures=$(field machinefeatures)"
    echo "joboutputs=$(field joboutputs)"
    # the script that runs is the drive's user_data, byte for byte
    if cmp -s "$CD/openstack/latest/user_data" /tmp/user_data; then
        echo "user_data_is_the_drives=yes"
    else
        echo "user_data_is_the_drives=no"
    fi
    if cmp -s "$MD" /tmp/meta_data.json; then
        echo "meta_data_is_the_drives=yes"
    else
        echo "meta_data_is_the_drives=no"
    fi
} > "$R"
cat "$R"
JO=$(field joboutputs)
for _try in 1 2 3 4 5; do
    timeout -s KILL 10 wget -q -O /dev/null --post-file="$R" "$JO/config_drive_report" && break
    sleep 2
done
printf '300 Nothing to do\n' > /tmp/message
timeout -s KILL 10 wget -q -O /dev/null --post-file=/tmp/message "$JO/shutdown_message"
poweroff -f
"""


@dataclass
class DriveRun:
    factory: RealFactory
    machine: Machine
    public_key: str
    report: Dict[str, str]
    console: str
    log: str


@pytest.fixture(scope="module")
def drive_run(tiny_guest) -> DriveRun:
    workdir = tempfile.mkdtemp(prefix="vfcd-")
    os.chmod(workdir, 0o755)
    f = RealFactory(workdir, "c")
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " root@factory"
    key_path = os.path.join(f.dir, "root_key.pub")
    with open(key_path, "w") as out:
        out.write(key + "\n")
    script = os.path.join(f.dir, "reporter.sh")
    with open(script, "w") as out:
        out.write(REPORTER)
    f.write_config(
        f"total_processors = 1\nnfs_exporter = none\nroot_public_key = {key_path}\n",
        f"""
[machinetype drive]
target_share = 1
machine_model = vm-raw
kernel_image = {tiny_guest.kernel}
initrd_image = {tiny_guest.initrd}
kernel_cmdline = console=ttyS0 quiet panic=-1
user_data = {script}
config_drive = true
fizzle_seconds = 1
backoff_seconds = 900
max_wallclock_seconds = 600
""")
    try:
        f.start()
        machine = wait_for(lambda: next((m for m in f.machines().values() if m.started), None), 60,
                           "the VM to start", factory=f)
        wait_for(lambda: f.machines()[machine.uuid].finished, 180, "the VM to finish", factory=f)
        machine = f.machines()[machine.uuid]
        report_path = os.path.join(machine.joboutputs_dir, "config_drive_report")
        report = {}
        for line in read(report_path).splitlines():
            name, sep, value = line.partition("=")
            if sep:
                report[name] = value
        f.stop()
        f.assert_alone()
        return DriveRun(f, machine, key, report, read(machine.console_log), f.log_text())
    finally:
        f.cleanup()
        if not os.environ.get("VFVB_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def test_the_guest_takes_its_user_data_from_the_config_drive_not_from_http(drive_run):
    console = drive_run.console
    assert "GUEST: config drive /dev/" in console and " mounted on /mnt/config" in console, console
    assert "GUEST: user_data from config drive" in console, console
    assert "GUEST: user_data from http" not in console, console
    report = drive_run.report
    assert report.get("config_drive") == "/mnt/config", console
    assert report["user_data_is_the_drives"] == "yes" and report["meta_data_is_the_drives"] == "yes"


def test_the_drives_meta_data_json_is_the_vms_own_and_complete(drive_run):
    machine, report = drive_run.machine, drive_run.report
    assert report, drive_run.console
    assert report["uuid"] == machine.uuid == report["uuid_in_user_data"]
    assert report["hostname"] == machine.name
    assert report["token"] == machine.record.token
    assert report["public_key"] == drive_run.public_key
    assert report["machinefeatures"] == "http://169.254.169.253/machinefeatures"
    assert report["joboutputs"] == "http://169.254.169.253/joboutputs"


def test_the_report_went_to_the_joboutputs_url_on_the_drive_and_the_vm_ended_as_it_said(drive_run):
    # the report arrived through the URL the drive named (the test read it from joboutputs)
    assert drive_run.report.get("joboutputs"), drive_run.console
    finished = drive_run.machine.finished
    assert (finished.code, finished.text) == (300, "Nothing to do"), finished
    assert "Traceback" not in drive_run.log
