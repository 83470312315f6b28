"""Shared fixtures for integration tests: the tiny guest, the libvirt URI, a Podman service.

Integration tests need a running libvirtd and the tiny guest (or podman); when one is missing they
fail (they never skip), so a broken CI machine cannot pass silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyGuest:
    """Paths of the tiny test guest (Debian kernel + busybox initramfs)."""

    directory: str
    kernel: str  # uncompressed vmlinux: PVH entry, about 40% faster to boot under TCG
    initrd: str


@pytest.fixture(scope="session")
def tiny_guest() -> TinyGuest:
    """The tiny guest from $VACFACTORY_GUEST_DIR if set, else images/build/tiny-guest
    (built by `make setup`, which `make test` runs first)."""
    explicit = os.environ.get("VACFACTORY_GUEST_DIR")
    if explicit:
        candidates = [explicit]
    else:
        candidates = [str(REPO / "images" / "build" / "tiny-guest")]
    for directory in candidates:
        kernel, initrd = os.path.join(directory, "vmlinux"), os.path.join(directory, "initrd.img")
        if os.path.isfile(kernel) and os.path.isfile(initrd):
            return TinyGuest(directory=directory, kernel=kernel, initrd=initrd)
    pytest.fail(f"tiny guest (vmlinux + initrd.img) not found in any of {candidates}")


@pytest.fixture(scope="session")
def qemu_uri() -> str:
    """The libvirt URI integration tests run real (TCG) domains on."""
    return "qemu:///system"


@pytest.fixture(scope="session")
def podman():
    """A private Podman API service with the busybox image (tests/podman_lab.py); stopped, with
    every container it made, at the end of the session. Fails (never skips) without podman."""
    from tests.podman_lab import running_lab

    with running_lab() as service:
        yield service
