"""Fixtures of the fault suite: a private test-driver libvirtd with simulated guests, the tiny
guest for real TCG VMs, scratch directories, and the summary table printed after the run."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.faults import profile
from tests.faults.daemons import REPO
from tests.faults.guests import SimulatedGuests
from tests.faults.libvirtd import PrivateLibvirtd, searchable_tempdir


@dataclass(frozen=True)
class TinyGuest:
    kernel: str
    initrd: str


@pytest.fixture(scope="session")
def tiny_guest() -> TinyGuest:
    """images/build/tiny-guest (built by `make setup`), or $VACFACTORY_GUEST_DIR."""
    directory = os.environ.get("VACFACTORY_GUEST_DIR") or os.path.join(REPO, "images", "build", "tiny-guest")
    kernel, initrd = os.path.join(directory, "vmlinux"), os.path.join(directory, "initrd.img")
    if not (os.path.isfile(kernel) and os.path.isfile(initrd)):
        pytest.fail(f"tiny guest (vmlinux + initrd.img) not found in {directory}: run `make setup`")
    return TinyGuest(kernel, initrd)


@pytest.fixture(scope="session")
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    """One private libvirtd (test driver) for the suite; tests that stop it start their own."""
    daemon = PrivateLibvirtd()
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.remove()


@pytest.fixture(scope="session")
def guests(private_libvirtd) -> Iterator[SimulatedGuests]:
    """Ground truth and simulated guests on the private libvirtd (its connection also keeps the
    test driver's state alive between factory processes)."""
    sim = SimulatedGuests(private_libvirtd.uri)
    try:
        yield sim
    finally:
        sim.close()


@pytest.fixture
def workdir() -> Iterator[str]:
    """A scratch directory libvirt-qemu can traverse (for disks, kernels, console logs)."""
    path = searchable_tempdir("vffault-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_runtest_logreport(report) -> None:
    """A failed test of the suite shows in the table even if it never recorded its row."""
    if report.failed and report.nodeid.startswith("tests/faults/"):
        profile.record_failed_test(report.nodeid, report.when, report.longreprtext)


def pytest_collectreport(report) -> None:
    """A test module of the suite that cannot even be collected is a failed fault class too."""
    if report.failed and report.nodeid.startswith("tests/faults/"):
        profile.record_failed_test(report.nodeid, "collection", report.longreprtext)


def pytest_report_header(config) -> str:
    return f"vacfactory fault suite: {profile.PROFILE} profile (VACFACTORY_FAULTS_PROFILE)"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = profile.rows()
    if not rows:
        return
    terminalreporter.section(f"fault classes ({profile.PROFILE} profile)")
    terminalreporter.write_line(profile.table(rows))
