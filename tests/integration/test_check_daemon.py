"""`vacfactory check` against a real daemon process (libvirt's test driver, in the daemon):
live and healthy, stopped with SIGTERM, and live with a creation error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from tests.waiting import scaled, wait_for

VACFACTORY = str(Path(sys.executable).with_name("vacfactory"))


def write_config(directory: Path, kernel: str, name: str = "vfops-ok") -> str:
    state = directory / "vfops-state"
    path = directory / "vfops.conf"
    path.write_text(f"""\
[settings]
vac_space = vfops.example.com
factory_name = vfops1.example.com
state_dir = {state}
domain_type = test
libvirt_uri = test:///default
total_processors = 2
nfs_exporter = none
cycle_seconds = 0.5
# the test machine may be busy: never veto creation on load here
overload_per_processor = 100000
check_disk_free_warning_mb = 1
check_disk_free_critical_mb = 1

[machinetype {name}]
target_share = 1
machine_model = vm-raw
kernel_image = {kernel}
""")
    return str(path)


def run_check(config: str, *extra: str) -> Tuple[int, str]:
    result = subprocess.run([VACFACTORY, "--config", config, "check", *extra], capture_output=True, text=True,
                            timeout=scaled(60), check=False)
    return result.returncode, result.stdout


class Daemon:
    def __init__(self, config: str, log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([VACFACTORY, "--config", config, "run", "--log-level", "DEBUG"],
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        return self.process.returncode

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_daemon(tmp_path) -> Iterator:
    started = []

    def start(config: str) -> Daemon:
        daemon = Daemon(config, tmp_path / f"vfops-daemon-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def test_check_is_ok_for_a_live_daemon_and_critical_once_it_stopped(tmp_path, start_daemon):
    kernel = tmp_path / "vfops-kernel"
    kernel.write_bytes(b"not really a kernel: the test driver never boots it")
    config = write_config(tmp_path, str(kernel))
    state = tmp_path / "vfops-state"
    daemon = start_daemon(config)

    def running_two() -> bool:
        assert daemon.process.poll() is None, daemon.output()
        code, out = run_check(config)
        return code == 0 and "2/2 processors, 2 VMs" in out

    wait_for(running_two, "the daemon to fill its 2 processors", 60, details=daemon.output)
    code, out = run_check(config)
    assert code == 0, out
    assert out.startswith("VACFACTORY OK - 2/2 processors, 2 VMs | running_processors=2;;;0;2 running_vms=2;;;0 ")
    assert out.count("\n") == 1

    assert daemon.stop() == 0, daemon.output()
    assert "running VMs were left running" in daemon.output()
    code, out = run_check(config)
    assert code == 2 and out.startswith("VACFACTORY CRITICAL - daemon not running"), out
    # the heartbeat ages from now on: with a short --max-age it is reported too
    time.sleep(1.5)
    code, out = run_check(config, "--max-age", "1")
    assert code == 2 and "no factory heartbeat for" in out and "daemon not running" in out
    assert (state / "factory-heartbeat").exists()


def test_check_is_critical_for_a_live_daemon_with_a_creation_error(tmp_path, start_daemon):
    config = write_config(tmp_path, str(tmp_path / "vfops-missing-kernel"), name="vfops-broken")
    daemon = start_daemon(config)
    error_file = tmp_path / "vfops-state" / "factory-error"
    wait_for(lambda: error_file.exists() or daemon.process.poll() is not None, "a creation error", 60,
             details=daemon.output)
    assert daemon.process.poll() is None, daemon.output()
    code, out = run_check(config)
    assert code == 2, out
    assert out.startswith("VACFACTORY CRITICAL - creation error: vfops1-0"), out
    assert "creation of a vfops-broken VM failed" in out and "vfops-missing-kernel" in out
    assert "daemon not running" not in out
    assert daemon.stop() == 0


def test_check_is_unknown_when_the_configuration_does_not_load(tmp_path):
    config = tmp_path / "vfops-broken.conf"
    config.write_text("[settings]\nvac_space = vfops.example.com\ncycle_seconds = never\n")
    code, out = run_check(str(config))
    assert code == 3 and out.startswith("VACFACTORY UNKNOWN - configuration does not load: "), out
    assert os.path.basename(str(config)) in out
